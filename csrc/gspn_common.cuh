// Shared pieces of the fused GSPN-2 kernels: launch parameters, line geometry, packed loads and
// stores, and the stability-context tap normalisation.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "gspn_api.h"

namespace gspn {

// Direction d scans lines one after another: t is the scan index, i the index inside a line.
//   d = 0: columns, w = t          d = 1: columns, w = W-1-t
//   d = 2: rows,    h = t          d = 3: rows,    h = H-1-t
// The offset of (t, i) inside one H x W plane is i * stride_i + pos(t) * stride_t.
struct Lines {
  int T, L;
  int stride_i, stride_t;  // offsets inside one plane fit in 32 bits (lines of at most 4096)
  bool columns, reversed;
  __device__ __forceinline__ Lines(int d, int H, int W) {
    columns = d < 2;
    T = columns ? W : H;
    L = columns ? H : W;
    stride_i = columns ? W : 1;
    stride_t = columns ? 1 : W;
    reversed = (d & 1) != 0;
  }
  // Where line t lies in memory order: w of a column, h of a row.
  __device__ __forceinline__ int pos(int t) const { return reversed ? T - 1 - t : t; }
  __device__ __forceinline__ int offset(int t, int i) const { return i * stride_i + pos(t) * stride_t; }
  // Where the float32 states (h, and the adjoint's gh) keep (t, i): see state_offset below.
  __device__ __forceinline__ int64_t state_offset(int t, int i) const;
  // Scan index t and line index i of the element at row hh, column ww (the inverse of offset).
  __device__ __forceinline__ void locate(int hh, int ww, int& t, int& i) const {
    i = columns ? hh : ww;
    t = columns ? ww : hh;
    if (reversed) t = T - 1 - t;
  }
};

// The float32 states of a column direction are stored in tiles of 4 columns, one after another, each
// tile row-major (H x 4; the last H x W % 4): a column scan then writes 4 steps of consecutive rows as
// one contiguous run, and the gradient pass reads 4 consecutive columns of a row as one vector. A row
// direction's states are in the plane's own layout, which serves both already.
__host__ __device__ __forceinline__ int64_t column_state_offset(int hh, int ww, int H, int W) {
  const int w4 = ww & ~3;
  return int64_t(w4) * H + int64_t(hh) * (W - w4 < 4 ? W - w4 : 4) + (ww & 3);
}

__device__ __forceinline__ int64_t Lines::state_offset(int t, int i) const {
  return columns ? column_state_offset(i, pos(t), L, T) : offset(t, i);
}

// The (batch, direction, channel) a block scans. Blocks enumerate them with the channel fastest, over
// `directions` directions from `first` on (all four for the generic kernels, a pair, rows or columns, for
// the line-parallel ones), and K consecutive channels c .. c+K-1 of one gate group per block.
struct PlaneId {
  int b, d, c;
  __device__ __forceinline__ PlaneId(int block, int C, int K, int first, int directions) {
    const int per_direction = C / K;
    c = block % per_direction * K;
    d = first + block / per_direction % directions;
    b = block / per_direction / directions;
  }
};

// What the block scanning one (batch, direction, channel) reads and writes; the planes of the next
// channels follow at `plane` elements.
// Forward: step input a = x lam, y = u h, state = h. Adjoint (the backward's reverse scan, see
// gspn_step.cuh): x is grad_y (B, 4, C, H, W), a = grad_y u (grad_y when u is null), no y, state = gh,
// and the lines are walked in reverse.
template <typename T, bool kAdjoint>
struct ScanPlanes {
  int d;
  Lines ln;
  const T* gate[3];      // logits of taps 0, 1, 2
  const float* tap[2];   // the staged weights w_0, w_2 (gspn_api.h: staged_taps), or null
  const T* a0;       // the factors of the step input; a1 may be null
  const T* a1;
  const T* u;  // forward only (may be null)
  T* y;        // forward only
  float* state;  // may be null in the forward
  int64_t plane;  // elements of one H x W plane: the next channel's planes of a0, a1, u, y, state
  __device__ __forceinline__ ScanPlanes(PlaneId id, const T* x, const T* gates, const float* taps, const T* lam,
                                        const T* u_, T* y_, float* state_, const Shape& s)
      : d(id.d), ln(kAdjoint ? d ^ 1 : d, s.H, s.W) {
    const int c = id.c, b = id.b, g = c / (s.C / s.G);
    plane = int64_t(s.H) * s.W;
    const int64_t dense = ((int64_t(b) * 4 + d) * s.C + c) * plane;  // (b, d, c) of a dense (B, 4, C, H, W)
    for (int k = 0; k < 3; ++k) gate[k] = gates + b * s.gates_batch_stride + ((int64_t(d) * 3 + k) * s.G + g) * plane;
    for (int k = 0; k < 2; ++k) tap[k] = taps ? taps + (((int64_t(b) * 4 + d) * 2 + k) * s.G + g) * plane : nullptr;
    const T* u_plane = u_ ? u_ + b * s.u_batch_stride + (int64_t(d) * s.C + c) * plane : nullptr;
    a0 = kAdjoint ? x + dense : x + (int64_t(b) * s.C + c) * plane;
    a1 = kAdjoint ? u_plane : lam + b * s.lam_batch_stride + (int64_t(d) * s.C + c) * plane;
    u = kAdjoint ? nullptr : u_plane;
    y = kAdjoint ? nullptr : y_ + dense;
    state = state_ ? state_ + dense : nullptr;
  }
};

// Position inside the current chunk, followed along the scan without a division per step.
struct ChunkPhase {
  int phase, chunk;
  __device__ __forceinline__ ChunkPhase(int t, int chunk_) : phase(t % chunk_), chunk(chunk_) {}
  __device__ __forceinline__ bool starts() const { return phase == 0; }
  __device__ __forceinline__ void forward() { phase = (phase + 1 == chunk) ? 0 : phase + 1; }
  __device__ __forceinline__ void backward() { phase = (phase == 0) ? chunk - 1 : phase - 1; }
};

template <typename T> __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved as one aligned access.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

// N consecutive elements at p (aligned to N elements) as float32, and back.
template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
  const Pack<T, N> v = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int q = 0; q < N; ++q) out[q] = to_acc(v.v[q]);
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> pack_of(const float (&in)[N]) {
  Pack<T, N> v;
#pragma unroll
  for (int q = 0; q < N; ++q) v.v[q] = from_acc<T>(in[q]);
  return v;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack_of<T, N>(in);
}

// store_pack as a streaming store (st.global.cs): L2 evicts these lines first. For what the scans write
// and only a later kernel reads (y, the float32 states), so that L2 keeps the input lines the scans still
// need: the column scans of the training forward, which also write h, took 3.04 -> 2.83 ms with the
// states' stores streaming (H100, SDXL 16K level 1; gspn_tma.cuh: tma_store for y).
template <typename T, int N>
__device__ __forceinline__ void store_streaming(T* p, const float (&in)[N]) {
  const Pack<T, N> v = pack_of<T, N>(in);
  if constexpr (sizeof(v) == 16) __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
  else if constexpr (sizeof(v) == 8) __stcs(reinterpret_cast<uint2*>(p), *reinterpret_cast<const uint2*>(&v));
  else if constexpr (sizeof(v) == 4) __stcs(reinterpret_cast<unsigned*>(p), *reinterpret_cast<const unsigned*>(&v));
  else *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Reads the values of scan steps t0 .. t0+VEC-1 at line index i into out[0..VEC).
// packed: the VEC steps are contiguous and aligned in memory (columns, W % VEC == 0, full group).
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_steps(const T* __restrict__ plane, const Lines& g, int t0, int i,
                                           bool packed, A (&out)[VEC]) {
  if (VEC > 1 && packed) {
    // Columns: the steps are neighbours along w, ascending for d = 0 and descending for d = 1.
    const int first = g.reversed ? g.offset(t0 + VEC - 1, i) : g.offset(t0, i);
    const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(plane + first);
#pragma unroll
    for (int s = 0; s < VEC; ++s) out[s] = to_acc(p.v[g.reversed ? VEC - 1 - s : s]);
  } else {
#pragma unroll
    for (int s = 0; s < VEC; ++s) out[s] = (t0 + s < g.T) ? to_acc(plane[g.offset(t0 + s, i)]) : A(0);
  }
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_steps(T* __restrict__ plane, const Lines& g, int t0, int i, bool packed,
                                            const A (&in)[VEC]) {
  if (VEC > 1 && packed) {
    Pack<T, VEC> p;
#pragma unroll
    for (int s = 0; s < VEC; ++s) p.v[g.reversed ? VEC - 1 - s : s] = from_acc<T>(in[s]);
    const int first = g.reversed ? g.offset(t0 + VEC - 1, i) : g.offset(t0, i);
    *reinterpret_cast<Pack<T, VEC>*>(plane + first) = p;
  } else {
#pragma unroll
    for (int s = 0; s < VEC; ++s)
      if (t0 + s < g.T) plane[g.offset(t0 + s, i)] = from_acc<T>(in[s]);
  }
}

// Asynchronous global -> shared copies (sm_80+) of 16 bytes (zeros where !valid).
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gmem_ptr) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_ptr));
}
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gmem_ptr, bool valid) {  // zeros if !valid
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_ptr), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async8(void* smem_ptr, const void* gmem_ptr, bool valid) {  // zeros if !valid
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem_ptr), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void cp_async_wait_previous() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Stability-context normalisation: s_k = sigmoid(logit_k); the taps that would read outside the line
// are dropped (k = 0 at i = 0, k = 2 at i = L-1); w_k = s_k / sum(s). Rows of the propagation matrix
// then sum to one.
//
// Both forms below compute d_k = e^b (1 + e^{-logit_k}) = e^b / s_k, for a shift b common to a position's
// taps, so that any finite logits give finite weights: b = 0 while the largest kept logit m is at least
// -kShiftBelow (then d_k = 1 + e^{-logit_k}, the plain form), else b = m, where e^b < e^-20 is dropped
// beside e^{b - logit_k} >= 1 (weights move by less than 1e-8 relative). Without the shift, logits below
// about -88 on every kept tap overflow e^{-logit} and give 0/0. Exponents b - logit_k above kLowestLogit
// are lowered to it so that the products below stay finite: such a tap's weight is below e^-20 either way.
constexpr float kShiftBelow = 20.f;
constexpr float kLowestLogit = 40.f;

struct TapShift {
  float b, one;  // the shift b, and e^b where b = 0 (1), else 0
  __device__ __forceinline__ TapShift(float g0, float g1, float g2, bool has_left, bool has_right) {
    const float m = fmaxf(fmaxf(has_left ? g0 : g1, g1), has_right ? g2 : g1);
    const bool low = m < -kShiftBelow;
    b = low ? m : 0.f;
    one = low ? 0.f : 1.f;
  }
  // e^{b - logit}: d = one + exp_of(logit).
  __device__ __forceinline__ float exp_of(float g) const { return __expf(fminf(b - g, kLowestLogit)); }
};

// The weights and each tap's 1 - s_k = sigmoid(-logit_k), for the gate gradients:
// dL/dlogit_k = (1 - s_k) w_k (dL/dw_k - sum_j w_j dL/dw_j).
struct Taps {
  float w[3];
  float rest[3];  // 1 - s_k
  __device__ __forceinline__ Taps(float g0, float g1, float g2, bool has_left, bool has_right) {
    const TapShift shift(g0, g1, g2, has_left, has_right);
    const float g[3] = {g0, g1, g2};
    float e[3], q[3];  // e^{b - logit_k} and e^-b s_k = 1 / d_k
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      e[k] = shift.exp_of(g[k]);  // computed for the dropped taps too, then dropped: no branch around it
      q[k] = 1.f / (shift.one + e[k]);
    }
    q[0] = has_left ? q[0] : 0.f;  // a dropped tap's 1 / d may be infinite where b = m
    q[2] = has_right ? q[2] : 0.f;
    const float inv_sum = 1.f / (q[0] + q[1] + q[2]);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      w[k] = q[k] * inv_sum;
      rest[k] = e[k] * q[k];  // e / (e^b + e) = 1 - s_k; 0 for a dropped tap
    }
  }
};

// The weights w_k alone, for the scans, in fewer multi-function-unit operations: s_k = e^b / d_k, so
// w_k = prod_{j != k} d_j / sum_m prod_{j != m} d_j: three exponentials and one reciprocal where Taps takes
// three and four (H100, forward column scans: paper float16 2.24 -> 2.01 ms, SDXL 16K level 1 2.16 ->
// 2.07 ms). A dropped tap leaves the products (its d counts as 1). Each d_k lies in [1, 1 + e^40], so the
// products stay below 6e34.
__device__ __forceinline__ void tap_weights(float g0, float g1, float g2, bool has_left, bool has_right,
                                            float (&w)[3]) {
  const TapShift shift(g0, g1, g2, has_left, has_right);
  const float d0 = has_left ? shift.one + shift.exp_of(g0) : 1.f;
  const float d1 = shift.one + shift.exp_of(g1);
  const float d2 = has_right ? shift.one + shift.exp_of(g2) : 1.f;
  const float p0 = has_left ? d1 * d2 : 0.f, p1 = d0 * d2, p2 = has_right ? d0 * d1 : 0.f;
  const float r = 1.f / (p0 + p1 + p2);
  w[0] = p0 * r, w[1] = p1 * r, w[2] = p2 * r;
}

}  // namespace gspn
