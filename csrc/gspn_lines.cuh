// Line-parallel scans: the fast path for 16-byte-aligned grids with lines of at most
// kLineMaxThreads * kLineQ positions, of both the forward scan and the backward's adjoint scan.
//
// Forward:  h_t[i] = lam x + m_t sum_k w_k[t, i] h_{t-1}[i+k-1]; writes y = u h (and h in float32,
//           line by line: Lines::state_offset).
// Adjoint:  the same line geometry scanned in reverse, gh_t[i] = u gy + sum of what line t+1 sends:
//           position i' of line t+1 sends m_{t+1} w_k[t+1, i'] gh_{t+1}[i'] to i = i'+k-1 (the
//           transpose of the forward's stencil); writes gh in float32. gspn_gradients.cuh turns gh
//           into every input's gradient.
//
// A block scans the lines of one (batch, direction, channel); thread k owns Q = 4 consecutive positions
// 4k .. 4k+3 of a line and keeps their state in registers. Neighbours inside a warp come by shuffle;
// only the two edge values of each warp go through shared memory (one barrier per step). Inputs travel
// in groups of span x VEC scan steps (VEC = 16 / sizeof(T), span = column_span(blockDim.x)),
// double-buffered with cp.async:
//   rows (d = 2, 3):    the block copies the group's rows into a shared tile [tensor][step][position], so
//                       a step reads its four positions with one vector load per tensor;
//   columns (d = 0, 1): the steps of one position are contiguous: span 16-byte vectors per position and
//                       tensor. Each thread copies those of its own four positions into its private slots
//                       and takes them into registers one vector at a time, so no other thread touches
//                       them (no transpose, no barrier for the staging), and writes y back as 16-byte
//                       vectors per position. The float32 state goes out every step as one contiguous
//                       line (its column planes are stored transposed); strided 16-byte writes of it
//                       made the training forward 11.9 instead of 9.0 ms on SDXL 16K level 1 (H100),
//                       the adjoint 6.5 instead of 4.9 ms.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

constexpr int kLineQ = 4;
constexpr int kLineMaxThreads = 256;  // lines of up to 1024 positions

// 16-byte vectors per position and tensor that a column group moves, measured on an H100: column scans
// that read 16 bytes per row and tensor at a time get ~25% of the DRAM bandwidth, 32 bytes ~50%, 64
// bytes ~95%; but a wider group takes shared memory that would hold more blocks per multiprocessor,
// which the row scans need. Two vectors win for lines of up to 512 positions (SDXL 8K level 1: 2.11 ->
// 1.79 ms), four lose everywhere.
__host__ __device__ constexpr int column_span(int threads) { return threads <= 128 ? 2 : 1; }

// Shared memory of lines_scan_kernel: two stages of 6 tensors x span x 16 bytes per position, then
// the warp edges.
inline size_t lines_smem(int threads) {
  return size_t(2) * 6 * 16 * kLineQ * threads * column_span(threads) + size_t(16) * (threads / 32);
}

template <typename T, int N>
__device__ __forceinline__ void load_quad(const T* p, float (&out)[N]) {
  const Pack<T, N> v = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int q = 0; q < N; ++q) out[q] = to_acc(v.v[q]);
}

template <typename T, int N>
__device__ __forceinline__ void store_quad(T* p, const float (&in)[N]) {
  Pack<T, N> v;
#pragma unroll
  for (int q = 0; q < N; ++q) v.v[q] = from_acc<T>(in[q]);
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// A compile-time flag passed to a generic lambda, so that one body serves both scan orders.
template <bool B> struct Flag { static constexpr bool value = B; };

// Tap weights applied to this thread's quad: next[q] += sum_k w_k h_prev[i + k - 1]; neighbours of the
// quad on the previous line arrive in `left` and `right`.
__device__ __forceinline__ void propagate_quad(float (&next)[kLineQ], const float (&h)[kLineQ], float left,
                                               float right, const float (&g0)[kLineQ], const float (&g1)[kLineQ],
                                               const float (&g2)[kLineQ], int i0, int L) {
#pragma unroll
  for (int q = 0; q < kLineQ; ++q) {
    const int i = i0 + q;
    const Taps<float> taps(g0[q], g1[q], g2[q], i > 0, i < L - 1);
    const float hl = q > 0 ? h[q - 1] : left;
    const float hr = q + 1 < kLineQ ? h[q + 1] : right;
    next[q] += taps.w(0) * hl + taps.w(1) * h[q] + taps.w(2) * hr;
  }
}

// Adjoint step: gh[q] += what the previous line sends to this quad; m0, m1, m2 are this quad's own
// sends (m_k[q] goes to position q + k - 1), `left` the left neighbour's m2 and `right` the right
// neighbour's m0.
__device__ __forceinline__ void gather_quad(float (&gh)[kLineQ], const float (&m0)[kLineQ], const float (&m1)[kLineQ],
                                            const float (&m2)[kLineQ], float left, float right) {
#pragma unroll
  for (int q = 0; q < kLineQ; ++q) gh[q] += m1[q] + (q + 1 < kLineQ ? m0[q + 1] : right) + (q > 0 ? m2[q - 1] : left);
}

// What this quad sends to the next line of the adjoint scan: m_k[q] = w_k gh[q] (zero where a chunk starts).
__device__ __forceinline__ void scatter_quad(float (&m0)[kLineQ], float (&m1)[kLineQ], float (&m2)[kLineQ],
                                             const float (&gh)[kLineQ], const float (&g0)[kLineQ],
                                             const float (&g1)[kLineQ], const float (&g2)[kLineQ], int i0, int L,
                                             bool restart) {
#pragma unroll
  for (int q = 0; q < kLineQ; ++q) {
    const int i = i0 + q;
    if (restart || i >= L) {  // nothing crosses a chunk start; positions past the line stay silent
      m0[q] = m1[q] = m2[q] = 0.f;
      continue;
    }
    const Taps<float> taps(g0[q], g1[q], g2[q], i > 0, i < L - 1);
    m0[q] = taps.w(0) * gh[q];
    m1[q] = taps.w(1) * gh[q];
    m2[q] = taps.w(2) * gh[q];
  }
}

// Edge values between the warps of the block, double-buffered by step parity: [2][warps][left, right].
struct WarpEdges {
  float* edges;
  int warps, warp, lane;
  // Neighbours of this thread's quad on the previous line (zero outside the line).
  __device__ __forceinline__ void neighbours(const float (&h)[kLineQ], int parity, float& left, float& right) const {
    left = __shfl_up_sync(0xffffffffu, h[kLineQ - 1], 1);
    right = __shfl_down_sync(0xffffffffu, h[0], 1);
    if (lane == 0) left = warp > 0 ? edges[parity * 2 * warps + 2 * (warp - 1) + 1] : 0.f;
    if (lane == 31) right = warp + 1 < warps ? edges[parity * 2 * warps + 2 * (warp + 1)] : 0.f;
  }
  // Publishes this step's warp edges, then the barrier that ends the step.
  __device__ __forceinline__ void publish(const float (&h)[kLineQ], int parity) const {
    if (lane == 0) edges[(parity ^ 1) * 2 * warps + 2 * warp] = h[0];
    if (lane == 31) edges[(parity ^ 1) * 2 * warps + 2 * warp + 1] = h[kLineQ - 1];
    __syncthreads();
  }
};

// Forward (kAdjoint = false): x, lam, u as in the op; writes y = u h and, when `state` is not null, h.
// Adjoint (kAdjoint = true): x is grad_y (B, 4, C, H, W), u the op's u (may be null), lam and y unused;
// writes gh to `state`.
template <typename T, bool kAdjoint>
__global__ void __launch_bounds__(kLineMaxThreads)
    lines_scan_kernel(const T* __restrict__ x, const T* __restrict__ gates, const T* __restrict__ lam,
                      const T* __restrict__ u, T* __restrict__ y, float* __restrict__ state, Shape s) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int NT = 6;  // staged tensors: gate taps 0..2; the two factors of the step input a; u
  enum { G0 = 0, G1 = 1, G2 = 2, XS = 3, LAMS = 4, US = 5 };
  using Vec = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cap = kLineQ * blockDim.x;
  const int span = column_span(blockDim.x);  // 16-byte vectors per position and tensor in a group
  const int steps_per_group = span * VEC;
  const size_t buffer = size_t(NT) * steps_per_group * cap;  // elements of one stage (either layout)
  T* buffers = reinterpret_cast<T*>(smem_raw);
  const WarpEdges ex{reinterpret_cast<float*>(smem_raw + 2 * buffer * sizeof(T)), int(blockDim.x / 32),
                     int(threadIdx.x / 32), int(threadIdx.x % 32)};

  const ScanPlanes<T, kAdjoint> io(blockIdx.x, x, gates, lam, u, y, state, s);
  const Lines& ln = io.ln;
  const T* planes[NT] = {io.gate[0], io.gate[1], io.gate[2], io.a0, io.a1, io.u};  // step input a = XS * LAMS
  T* yp = io.y;
  float* hp = io.state;

  for (int k = threadIdx.x; k < 4 * ex.warps; k += blockDim.x) ex.edges[k] = 0.f;

  const int groups = (ln.T + steps_per_group - 1) / steps_per_group;
  const int i0 = kLineQ * threadIdx.x;  // first of this thread's positions
  const bool active = i0 < ln.L;        // rows: L = W is a multiple of VEC, so quads are whole
  const bool whole_quads = ln.L % kLineQ == 0;
  float h[kLineQ] = {0.f, 0.f, 0.f, 0.f};  // the state of the last line: h, or gh in the adjoint
  float m0[kLineQ] = {0.f, 0.f, 0.f, 0.f}, m1[kLineQ] = {0.f, 0.f, 0.f, 0.f}, m2[kLineQ] = {0.f, 0.f, 0.f, 0.f};
  int parity = 0;
  ChunkPhase phase(kAdjoint ? ln.T - 1 : 0, s.chunk);  // follows the forward's scan index

  // One scan step of this thread's quad: `a` holds the step's input; h becomes the new line's state.
  auto advance = [&](float (&a)[kLineQ], const float (&g0)[kLineQ], const float (&g1)[kLineQ],
                     const float (&g2)[kLineQ]) {
    const bool restart = phase.starts();  // forward: nothing arrives; adjoint: nothing leaves
    float left, right;
    if constexpr (kAdjoint) {
      phase.backward();
      const float arrived[kLineQ] = {m0[0], 0.f, 0.f, m2[kLineQ - 1]};  // the quad's edges, as neighbours see them
      ex.neighbours(arrived, parity, left, right);
      gather_quad(a, m0, m1, m2, left, right);
#pragma unroll
      for (int q = 0; q < kLineQ; ++q) h[q] = (i0 + q < ln.L) ? a[q] : 0.f;
      scatter_quad(m0, m1, m2, h, g0, g1, g2, i0, ln.L, restart);
      const float sent[kLineQ] = {m0[0], 0.f, 0.f, m2[kLineQ - 1]};
      ex.publish(sent, parity);
    } else {
      phase.forward();
      ex.neighbours(h, parity, left, right);
      if (!restart) propagate_quad(a, h, left, right, g0, g1, g2, i0, ln.L);
#pragma unroll
      for (int q = 0; q < kLineQ; ++q) h[q] = (i0 + q < ln.L) ? a[q] : 0.f;  // positions past the line stay zero
      ex.publish(h, parity);
    }
    parity ^= 1;
  };

  if (io.d < 2) {
    // Columns. A group is `span` vectors of VEC steps per position and tensor: contiguous in memory, so
    // that DRAM sees span x 16 bytes per row at once. Slot (stage, tensor, q, vector) of this thread is
    // thread-interleaved so that a warp's shared-memory accesses are contiguous.
    Vec* slots = reinterpret_cast<Vec*>(smem_raw);
    auto slot = [&](int stage, int k, int q, int j) {
      return slots + (((size_t(stage) * NT + k) * kLineQ + q) * span + j) * blockDim.x + threadIdx.x;
    };
    auto first_of = [&](int t0, int i) {  // memory offset of the lowest w of steps t0 .. t0+VEC-1 at row i
      return ln.reversed ? ln.offset(t0 + VEC - 1, i) : ln.offset(t0, i);
    };
    auto vectors_in = [&](int grp) { return min(span, (ln.T - grp * steps_per_group) / VEC); };  // W % VEC == 0
    auto stage = [&](int grp) {
      const int t0 = grp * steps_per_group, n = vectors_in(grp);
#pragma unroll
      for (int q = 0; q < kLineQ; ++q) {
        const int i = i0 + q;
        if (i >= ln.L) continue;
        for (int j = 0; j < n; ++j) {
          const int first = first_of(t0 + j * VEC, i);
#pragma unroll
          for (int k = 0; k < NT; ++k)
            if (planes[k]) cp_async16(slot(grp & 1, k, q, j), planes[k] + first);
        }
      }
    };
    // Reversed lines walk each vector from its end: the body is compiled once per order so that every
    // register index stays a compile-time constant.
    auto scan = [&](auto reversed_flag) {
      constexpr bool kReversed = decltype(reversed_flag)::value;
      stage(0);
      cp_async_commit();
      for (int grp = 0; grp < groups; ++grp) {
        cp_async_wait_all();  // this thread's own copies only: no barrier needed
        if (grp + 1 < groups) stage(grp + 1);  // into the other stage, consumed a group ago
        cp_async_commit();
        const int n = vectors_in(grp);
#pragma unroll 1
        for (int j = 0; j < n; ++j) {
          Vec in[NT][kLineQ];
#pragma unroll
          for (int k = 0; k < NT; ++k)
#pragma unroll
            for (int q = 0; q < kLineQ; ++q)
              if (planes[k] && i0 + q < ln.L) in[k][q] = *slot(grp & 1, k, q, j);
          Vec out[kLineQ];  // forward: y
          (void)out;
#pragma unroll
          for (int st = 0; st < VEC; ++st) {
            const int m = kReversed ? VEC - 1 - st : st;  // memory order inside the vectors
            float a[kLineQ], g0[kLineQ], g1[kLineQ], g2[kLineQ];
#pragma unroll
            for (int q = 0; q < kLineQ; ++q) {
              a[q] = to_acc(in[XS][q].v[m]);
              if (planes[LAMS]) a[q] *= to_acc(in[LAMS][q].v[m]);
              g0[q] = to_acc(in[G0][q].v[m]);
              g1[q] = to_acc(in[G1][q].v[m]);
              g2[q] = to_acc(in[G2][q].v[m]);
            }
            advance(a, g0, g1, g2);
            if constexpr (!kAdjoint) {
#pragma unroll
              for (int q = 0; q < kLineQ; ++q)
                out[q].v[m] = from_acc<T>(planes[US] ? to_acc(in[US][q].v[m]) * h[q] : h[q]);
            }
            if (hp && active) {  // the state line by line: this step's line is contiguous
              float* line = hp + ln.state_offset(grp * steps_per_group + j * VEC + st, i0);
              if (whole_quads) {
                store_quad<float, kLineQ>(line, h);
              } else {
#pragma unroll
                for (int q = 0; q < kLineQ; ++q)
                  if (i0 + q < ln.L) line[q] = h[q];
              }
            }
          }
          if constexpr (!kAdjoint) {
            const int t0 = grp * steps_per_group + j * VEC;
#pragma unroll
            for (int q = 0; q < kLineQ; ++q)
              if (i0 + q < ln.L) *reinterpret_cast<Vec*>(yp + first_of(t0, i0 + q)) = out[q];
          }
        }
      }
    };
    if (ln.reversed) scan(Flag<true>{});
    else scan(Flag<false>{});
    return;
  }

  // Rows: the block copies the group's rows of every tensor into tile [tensor][step][position].
  auto tile_of = [&](int grp) { return buffers + (grp & 1) * buffer; };
  auto tslot = [&](T* tile, int k, int st) { return tile + (size_t(k) * steps_per_group + st) * cap; };
  auto stage = [&](int grp) {
    const int t0 = grp * steps_per_group;
    T* tile = tile_of(grp);
    const int chunks_per_row = ln.L / VEC;  // a 16-byte chunk holds VEC positions
    for (int ch = threadIdx.x; ch < chunks_per_row * steps_per_group; ch += blockDim.x) {
      const int st = ch / chunks_per_row;
      const int e = (ch - st * chunks_per_row) * VEC;
      if (t0 + st >= ln.T) continue;
      const int off = ln.offset(t0 + st, e);
#pragma unroll
      for (int k = 0; k < NT; ++k)
        if (planes[k]) cp_async16(tslot(tile, k, st) + e, planes[k] + off);
    }
  };

  stage(0);
  cp_async_commit();
  for (int grp = 0; grp < groups; ++grp) {
    cp_async_wait_all();
    __syncthreads();
    if (grp + 1 < groups) stage(grp + 1);
    cp_async_commit();

    T* tile = tile_of(grp);
    const int t0 = grp * steps_per_group;
#pragma unroll 1
    for (int st = 0; st < steps_per_group; ++st) {
      const int t = t0 + st;
      if (t >= ln.T) break;  // uniform across the block
      float a[kLineQ] = {0.f, 0.f, 0.f, 0.f}, g0[kLineQ] = {0.f, 0.f, 0.f, 0.f}, g1[kLineQ] = {0.f, 0.f, 0.f, 0.f},
            g2[kLineQ] = {0.f, 0.f, 0.f, 0.f};
      if (active) {
        load_quad<T, kLineQ>(tslot(tile, XS, st) + i0, a);
        if (planes[LAMS]) {
          float lv[kLineQ];
          load_quad<T, kLineQ>(tslot(tile, LAMS, st) + i0, lv);
#pragma unroll
          for (int q = 0; q < kLineQ; ++q) a[q] *= lv[q];
        }
        load_quad<T, kLineQ>(tslot(tile, G0, st) + i0, g0);
        load_quad<T, kLineQ>(tslot(tile, G1, st) + i0, g1);
        load_quad<T, kLineQ>(tslot(tile, G2, st) + i0, g2);
      }
      advance(a, g0, g1, g2);
      if (active) {
        const int off = ln.offset(t, i0);
        if constexpr (!kAdjoint) {
          float out[kLineQ];
          if (planes[US]) {
            load_quad<T, kLineQ>(tslot(tile, US, st) + i0, out);
#pragma unroll
            for (int q = 0; q < kLineQ; ++q) out[q] *= h[q];
          } else {
#pragma unroll
            for (int q = 0; q < kLineQ; ++q) out[q] = h[q];
          }
          store_quad<T, kLineQ>(yp + off, out);
        }
        if (hp) store_quad<float, kLineQ>(hp + ln.state_offset(t, i0), h);  // = off for rows
      }
    }
  }
}

}  // namespace gspn
