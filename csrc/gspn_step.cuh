// One scan step of the line-parallel kernels, a thread's positions' state kept in registers and the
// neighbours inside a warp by shuffle. Stepper (row scans, gspn_rows.cuh): a thread owns Q consecutive
// positions of a line, and the two edge values of each warp go through shared memory (one barrier per
// step). LaneStepper (column scans, gspn_columns.cuh): one position per lane, no barrier; the kernel
// refreshes the warps' outer lanes.
//
// Forward:  h_t[i] = lam x + m_t sum_k w_k[t, i] h_{t-1}[i+k-1].
// Adjoint:  the same lines scanned in reverse, gh_t[i] = u gy + sum of what line t+1 sends: position i'
//           of line t+1 sends m_{t+1} w_k[t+1, i'] gh_{t+1}[i'] to i = i'+k-1 (the transpose of the
//           forward's stencil). gspn_gradients.cuh turns gh into every input's gradient.
#pragma once

#include <type_traits>

#include "gspn_common.cuh"

namespace gspn {

// Tensors the line-parallel scans stage for K channels of one gate group: per channel the two factors
// of the step input a and u, in T; then the tap inputs, of type TapInput: the three gate logits, or with
// staged taps (gspn_api.h: staged_taps) the two float32 weights w_0 and w_2.
__host__ __device__ constexpr int channel_tensors(int K) { return 3 * K; }
__host__ __device__ constexpr int tap_tensors(bool taps) { return taps ? 2 : 3; }
// Index of channel k's first factor of a among the channel tensors; its second factor (lam, or u in the
// adjoint) and u follow.
__host__ __device__ constexpr int staged_x(int k) { return 3 * k; }
template <typename T, bool kTaps>
using TapInput = std::conditional_t<kTaps, float, T>;

// The planes of the channel tensors a block stages, in that order (null where the op has no such tensor).
template <int K, typename T, bool kAdjoint>
__device__ __forceinline__ void channel_planes(const ScanPlanes<T, kAdjoint>& io,
                                               const T* (&planes)[channel_tensors(K)]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    planes[staged_x(k)] = io.a0 + k * io.plane;
    planes[staged_x(k) + 1] = io.a1 ? io.a1 + k * io.plane : nullptr;
    planes[staged_x(k) + 2] = io.u ? io.u + k * io.plane : nullptr;
  }
}
// The planes of the tap inputs.
template <bool kTaps, typename T, bool kAdjoint>
__device__ __forceinline__ void tap_planes(const ScanPlanes<T, kAdjoint>& io,
                                           const TapInput<T, kTaps>* (&planes)[tap_tensors(kTaps)]) {
  if constexpr (kTaps) planes[0] = io.tap[0], planes[1] = io.tap[1];
  else planes[0] = io.gate[0], planes[1] = io.gate[1], planes[2] = io.gate[2];
}

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
      float v[3];
      tap_weights(g0[q], g1[q], g2[q], i0 + q > 0, i0 + q < L - 1, v);
#pragma unroll
      for (int k = 0; k < 3; ++k) w[k][q] = v[k];
    }
  }
};

// The weights of positions i0 .. i0+Q-1 from their staged tap inputs: the three logits, or (staged taps)
// w_0 and w_2, where w_1 = 1 - w_0 - w_2 (the taps pass has dropped the taps that read outside the line).
template <bool kTaps, int Q>
__device__ __forceinline__ Weights<Q> weights_from(const float (&in)[tap_tensors(kTaps)][Q], int i0, int L) {
  if constexpr (kTaps) {
    Weights<Q> wt;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      wt.w[0][q] = in[0][q];
      wt.w[1][q] = 1.f - in[0][q] - in[1][q];
      wt.w[2][q] = in[1][q];
    }
    return wt;
  } else {
    return Weights<Q>(in[0], in[1], in[2], i0, L);
  }
}

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

__host__ __device__ constexpr size_t warp_edges_bytes(int threads, int K) { return size_t(16) * K * (threads / 32); }

// Edge values between the warps of the block for K channels, double-buffered by step parity:
// [2][warps][K][left, right].
template <int K>
struct WarpEdges {
  float* edges;
  int warps, warp, lane;
  __host__ __device__ static constexpr size_t bytes(int threads) { return warp_edges_bytes(threads, K); }
  __device__ __forceinline__ float& at(int parity, int w, int k, int side) const {
    return edges[((parity * warps + w) * K + k) * 2 + side];
  }
  __device__ __forceinline__ void clear() const {
    for (int k = threadIdx.x; k < 4 * K * warps; k += blockDim.x) edges[k] = 0.f;
  }
  // What the neighbouring threads published on the previous line: `left` is the `last` of the thread
  // before, `right` the `first` of the thread after (zero outside the block).
  __device__ __forceinline__ void neighbours(const float (&first)[K], const float (&last)[K], int parity,
                                             float (&left)[K], float (&right)[K]) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      left[k] = __shfl_up_sync(0xffffffffu, last[k], 1);
      right[k] = __shfl_down_sync(0xffffffffu, first[k], 1);
      if (lane == 0) left[k] = warp > 0 ? at(parity, warp - 1, k, 1) : 0.f;
      if (lane == 31) right[k] = warp + 1 < warps ? at(parity, warp + 1, k, 0) : 0.f;
    }
  }
  // Publishes this step's warp edges, then the barrier that ends the step.
  __device__ __forceinline__ void publish(const float (&first)[K], const float (&last)[K], int parity) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (lane == 0) at(parity ^ 1, warp, k, 0) = first[k];
      if (lane == 31) at(parity ^ 1, warp, k, 1) = last[k];
    }
    __syncthreads();
  }
};

// The step of a thread's Q positions i0 .. i0+Q-1 (positions outside [0, L) hold zero) in K channels
// that share their gates, forward or adjoint. `a` holds the step's input and `wt` the line's tap weights
// (one set for the K channels); `state` becomes the new line's state (h, or gh in the adjoint).
template <int Q, int K, bool kAdjoint>
struct Stepper {
  float state[K][Q] = {};
  float m0[K][Q] = {}, m1[K][Q] = {}, m2[K][Q] = {};  // adjoint: this line's sends
  int parity = 0;
  ChunkPhase phase;
  __device__ __forceinline__ Stepper(const Lines& ln, int chunk) : phase(kAdjoint ? ln.T - 1 : 0, chunk) {}

  __device__ __forceinline__ void step(const WarpEdges<K>& ex, float (&a)[K][Q], const Weights<Q>& wt, int i0,
                                       int L) {
    const bool restart = phase.starts();  // forward: nothing arrives; adjoint: nothing leaves
    float first[K], last[K], left[K], right[K];
    if constexpr (kAdjoint) {
      phase.backward();
#pragma unroll
      for (int k = 0; k < K; ++k) first[k] = m0[k][0], last[k] = m2[k][Q - 1];  // the sends that cross
      ex.neighbours(first, last, parity, left, right);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        gather(a[k], m0[k], m1[k], m2[k], left[k], right[k]);
#pragma unroll
        for (int q = 0; q < Q; ++q) state[k][q] = (i0 + q >= 0 && i0 + q < L) ? a[k][q] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        scatter(m0[k], m1[k], m2[k], state[k], wt, restart);
        first[k] = m0[k][0], last[k] = m2[k][Q - 1];
      }
      ex.publish(first, last, parity);
    } else {
      phase.forward();
#pragma unroll
      for (int k = 0; k < K; ++k) first[k] = state[k][0], last[k] = state[k][Q - 1];
      ex.neighbours(first, last, parity, left, right);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        propagate(a[k], state[k], left[k], right[k], wt, restart);
#pragma unroll
        for (int q = 0; q < Q; ++q) state[k][q] = (i0 + q >= 0 && i0 + q < L) ? a[k][q] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) first[k] = state[k][0], last[k] = state[k][Q - 1];
      ex.publish(first, last, parity);
    }
    parity ^= 1;
  }
};

// The step of one position per lane (i, Q = 1) in K channels with no barrier: the neighbours are the
// lanes beside it, so a warp's first and last lanes read garbage and go stale one lane per step from the
// outside in (the column scans overlap their warps and refresh those lanes, gspn_columns.cuh). `inside`:
// the lane's position is one the block scans (else its state stays zero). Otherwise as Stepper.
template <int K, bool kAdjoint>
struct LaneStepper {
  float state[K][1] = {};
  float m0[K][1] = {}, m1[K][1] = {}, m2[K][1] = {};  // adjoint: this line's sends
  ChunkPhase phase;
  __device__ __forceinline__ LaneStepper(const Lines& ln, int chunk) : phase(kAdjoint ? ln.T - 1 : 0, chunk) {}

  template <typename Between>
  __device__ __forceinline__ void step(float (&a)[K][1], const Weights<1>& wt, bool inside, Between&& between) {
    const bool restart = phase.starts();
    if constexpr (kAdjoint) {
      phase.backward();
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float left = __shfl_up_sync(0xffffffffu, m2[k][0], 1);  // what the lane before sends on
        const float right = __shfl_down_sync(0xffffffffu, m0[k][0], 1);
        gather(a[k], m0[k], m1[k], m2[k], left, right);
        state[k][0] = inside ? a[k][0] : 0.f;
      }
      between(state);
#pragma unroll
      for (int k = 0; k < K; ++k) scatter(m0[k], m1[k], m2[k], state[k], wt, restart);
    } else {
      phase.forward();
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float left = __shfl_up_sync(0xffffffffu, state[k][0], 1);
        const float right = __shfl_down_sync(0xffffffffu, state[k][0], 1);
        propagate(a[k], state[k], left, right, wt, restart);
        state[k][0] = inside ? a[k][0] : 0.f;
      }
      between(state);
    }
  }
};

// Channels a line-parallel block scans together: two when they share a gate group, so that the tap
// weights (most of a step's arithmetic) and the gate loads serve both.
inline int channels_per_block(int C, int G) { return (C / G) % 2 == 0 ? 2 : 1; }

}  // namespace gspn
