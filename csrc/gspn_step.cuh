// One scan step of the line-parallel kernels (gspn_rows.cuh, gspn_columns.cuh): a thread owns Q
// consecutive positions of a line and keeps their state in registers; neighbours inside a warp come by
// shuffle, and only the two edge values of each warp go through shared memory (one barrier per step).
//
// Forward:  h_t[i] = lam x + m_t sum_k w_k[t, i] h_{t-1}[i+k-1].
// Adjoint:  the same lines scanned in reverse, gh_t[i] = u gy + sum of what line t+1 sends: position i'
//           of line t+1 sends m_{t+1} w_k[t+1, i'] gh_{t+1}[i'] to i = i'+k-1 (the transpose of the
//           forward's stencil). gspn_gradients.cuh turns gh into every input's gradient.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

// Tensors the line-parallel scans stage: gate taps 0..2; the two factors of the step input a; u.
constexpr int kScanTensors = 6;

// A compile-time flag passed to a generic lambda, so that one body serves both scan orders.
template <bool B> struct Flag { static constexpr bool value = B; };

// The normalised tap weights of positions i0 .. i0+Q-1 of one line, from the gate logits g0, g1, g2.
// The line-parallel kernels compute them ahead of the steps that use them, so that a step's chain of
// dependent instructions between two barriers is the propagation alone.
template <int Q>
struct Weights {
  float w[3][Q];
  __device__ __forceinline__ Weights() {}
  __device__ __forceinline__ Weights(const float (&g0)[Q], const float (&g1)[Q], const float (&g2)[Q], int i0, int L) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const Taps<float> taps(g0[q], g1[q], g2[q], i0 + q > 0, i0 + q < L - 1);
#pragma unroll
      for (int k = 0; k < 3; ++k) w[k][q] = taps.w(k);
    }
  }
};

// Keeps the compiler from moving the computation of v past this point: weights computed ahead of a run
// of steps would otherwise sink into the step that uses them, behind its barrier.
__device__ __forceinline__ void pin(float& v) { asm volatile("" : "+f"(v)); }
template <int Q>
__device__ __forceinline__ void pin(Weights<Q>& wt) {
#pragma unroll
  for (int k = 0; k < 3; ++k)
#pragma unroll
    for (int q = 0; q < Q; ++q) pin(wt.w[k][q]);
}

// next[q] += sum_k w_k h_prev[i + k - 1] unless the line starts a chunk; the neighbours of the first and
// last position on the previous line arrive in `left` and `right`.
template <int Q>
__device__ __forceinline__ void propagate(float (&next)[Q], const float (&h)[Q], float left, float right,
                                          const Weights<Q>& wt, bool restart) {
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const float hl = q > 0 ? h[q - 1] : left;
    const float hr = q + 1 < Q ? h[q + 1] : right;
    const float arrived = wt.w[0][q] * hl + wt.w[1][q] * h[q] + wt.w[2][q] * hr;
    next[q] = restart ? next[q] : next[q] + arrived;  // a select, not a branch around the weights' use
  }
}

// Adjoint step: gh[q] += what the previous line sends to this thread's positions; m0, m1, m2 are their
// own sends (m_k[q] goes to position q + k - 1), `left` the left neighbour's m2 and `right` the right
// neighbour's m0.
template <int Q>
__device__ __forceinline__ void gather(float (&gh)[Q], const float (&m0)[Q], const float (&m1)[Q],
                                       const float (&m2)[Q], float left, float right) {
#pragma unroll
  for (int q = 0; q < Q; ++q) gh[q] += m1[q] + (q + 1 < Q ? m0[q + 1] : right) + (q > 0 ? m2[q - 1] : left);
}

// What this thread's positions send to the next line of the adjoint scan: m_k[q] = w_k gh[q] (zero where
// a chunk starts; positions outside the line hold gh = 0).
template <int Q>
__device__ __forceinline__ void scatter(float (&m0)[Q], float (&m1)[Q], float (&m2)[Q], const float (&gh)[Q],
                                        const Weights<Q>& wt, bool restart) {
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const float v = restart ? 0.f : gh[q];
    m0[q] = wt.w[0][q] * v;
    m1[q] = wt.w[1][q] * v;
    m2[q] = wt.w[2][q] * v;
  }
}

// Edge values between the warps of the block, double-buffered by step parity: [2][warps][left, right].
struct WarpEdges {
  float* edges;
  int warps, warp, lane;
  __host__ __device__ static constexpr size_t bytes(int threads) { return size_t(16) * (threads / 32); }
  __device__ __forceinline__ void clear() const {
    for (int k = threadIdx.x; k < 4 * warps; k += blockDim.x) edges[k] = 0.f;
  }
  // What the neighbouring threads published on the previous line: `left` is the `last` of the thread
  // before, `right` the `first` of the thread after (zero outside the block).
  __device__ __forceinline__ void neighbours(float first, float last, int parity, float& left, float& right) const {
    left = __shfl_up_sync(0xffffffffu, last, 1);
    right = __shfl_down_sync(0xffffffffu, first, 1);
    if (lane == 0) left = warp > 0 ? edges[parity * 2 * warps + 2 * (warp - 1) + 1] : 0.f;
    if (lane == 31) right = warp + 1 < warps ? edges[parity * 2 * warps + 2 * (warp + 1)] : 0.f;
  }
  // Publishes this step's warp edges, then the barrier that ends the step.
  __device__ __forceinline__ void publish(float first, float last, int parity) const {
    if (lane == 0) edges[(parity ^ 1) * 2 * warps + 2 * warp] = first;
    if (lane == 31) edges[(parity ^ 1) * 2 * warps + 2 * warp + 1] = last;
    __syncthreads();
  }
};

// The step of a thread's Q positions i0 .. i0+Q-1 (positions outside [0, L) hold zero), forward or
// adjoint. `a` holds the step's input and `wt` the line's tap weights; `state` becomes the new line's
// state (h, or gh in the adjoint). `between(state)` runs after the state is final and before the warp
// edges go out (the column kernel refreshes its halo there).
template <int Q, bool kAdjoint>
struct Stepper {
  float state[Q] = {};
  float m0[Q] = {}, m1[Q] = {}, m2[Q] = {};  // adjoint: this line's sends
  int parity = 0;
  ChunkPhase phase;
  __device__ __forceinline__ Stepper(const Lines& ln, int chunk) : phase(kAdjoint ? ln.T - 1 : 0, chunk) {}

  template <typename Between>
  __device__ __forceinline__ void step(const WarpEdges& ex, float (&a)[Q], const Weights<Q>& wt, int i0, int L,
                                       Between&& between) {
    const bool restart = phase.starts();  // forward: nothing arrives; adjoint: nothing leaves
    float left, right;
    if constexpr (kAdjoint) {
      phase.backward();
      ex.neighbours(m0[0], m2[Q - 1], parity, left, right);  // the sends that cross to the neighbours
      gather(a, m0, m1, m2, left, right);
#pragma unroll
      for (int q = 0; q < Q; ++q) state[q] = (i0 + q >= 0 && i0 + q < L) ? a[q] : 0.f;
      between(state);
      scatter(m0, m1, m2, state, wt, restart);
      ex.publish(m0[0], m2[Q - 1], parity);
    } else {
      phase.forward();
      ex.neighbours(state[0], state[Q - 1], parity, left, right);
      propagate(a, state, left, right, wt, restart);
#pragma unroll
      for (int q = 0; q < Q; ++q) state[q] = (i0 + q >= 0 && i0 + q < L) ? a[q] : 0.f;
      between(state);
      ex.publish(state[0], state[Q - 1], parity);
    }
    parity ^= 1;
  }
};

}  // namespace gspn
