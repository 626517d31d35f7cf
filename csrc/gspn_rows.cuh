// Row scans (d = 2, 3) of 16-byte-aligned grids with rows of at most kRowMaxThreads * kRowQ positions:
// the forward, and the backward's adjoint scan (gspn_step.cuh has both recurrences).
//
// A block scans the rows of one (batch, direction) in K channels of one gate group; thread k owns Q = 4
// consecutive positions 4k .. 4k+3 of a row in each channel. Inputs travel in groups of row_group rows,
// double-buffered with cp.async: the block copies the group's rows of every tensor into a shared tile
// [tensor][step][position], so that a step reads its four positions with one vector load per tensor. y
// and the float32 state go out as one contiguous row per step.
#pragma once

#include "gspn_step.cuh"

namespace gspn {

constexpr int kRowQ = 4;
constexpr int kRowMaxThreads = 256;  // rows of up to 1024 positions

// Rows staged per group: 4 in the forward of 16-bit inputs, else 2. (H100, forward: SDXL 4K level 2
// 0.167 -> 0.125 ms, 8K 3% faster, 16K level 1 equal. The adjoint with 4 took 11% longer at 16K, where
// its stages leave room for one block per multiprocessor, not two; float32 stages of 4 rows and two
// channels would not fit.)
__host__ __device__ constexpr int row_group(size_t element, bool adjoint) { return element == 2 && !adjoint ? 4 : 2; }

// Shared memory of rows_scan_kernel: two stages of the staged tensors x row_group rows, then the warp
// edges.
inline size_t rows_smem(int threads, size_t element, int K, bool adjoint) {
  return size_t(2) * staged_tensors(K) * row_group(element, adjoint) * kRowQ * threads * element +
         warp_edges_bytes(threads, K);
}

// Forward (kAdjoint = false): x, lam, u as in the op; writes y = u h and, when `state` is not null, h.
// Adjoint (kAdjoint = true): x is grad_y (B, 4, C, H, W), u the op's u (may be null), lam and y unused;
// writes gh to `state`. One block per (batch, row direction, K channels): B * 2 * C / K blocks.
template <typename T, bool kAdjoint, int K>
__global__ void __launch_bounds__(kRowMaxThreads)
    rows_scan_kernel(const T* __restrict__ x, const T* __restrict__ gates, const T* __restrict__ lam,
                     const T* __restrict__ u, T* __restrict__ y, float* __restrict__ state, Shape s) {
  constexpr int VEC = 16 / int(sizeof(T));  // positions per 16-byte chunk
  constexpr int RG = row_group(sizeof(T), kAdjoint);
  constexpr int NT = staged_tensors(K);
  enum { G0 = 0, G1 = 1, G2 = 2 };
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cap = kRowQ * blockDim.x;
  const size_t buffer = size_t(NT) * RG * cap;  // elements of one stage
  T* buffers = reinterpret_cast<T*>(smem_raw);
  const WarpEdges<K> ex{reinterpret_cast<float*>(smem_raw + 2 * buffer * sizeof(T)), int(blockDim.x / 32),
                        int(threadIdx.x / 32), int(threadIdx.x % 32)};

  const ScanPlanes<T, kAdjoint> io(PlaneId(blockIdx.x, s.C, K, 2, 2), x, gates, lam, u, y, state, s);
  const Lines& ln = io.ln;
  const T* planes[NT];
  staged_planes<K>(io, planes);
  ex.clear();

  const int groups = (ln.T + RG - 1) / RG;
  const int i0 = kRowQ * threadIdx.x;  // first of this thread's positions
  const bool active = i0 < ln.L;       // L = W is a multiple of VEC, so quads are whole
  Stepper<kRowQ, K, kAdjoint> stepper(ln, s.chunk);

  auto tile_of = [&](int grp) { return buffers + (grp & 1) * buffer; };
  auto tslot = [&](T* tile, int k, int st) { return tile + (size_t(k) * RG + st) * cap; };
  auto stage = [&](int grp) {
    const int t0 = grp * RG;
    T* tile = tile_of(grp);
    const int chunks_per_row = ln.L / VEC;
    for (int ch = threadIdx.x; ch < chunks_per_row * RG; ch += blockDim.x) {
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
    const int t0 = grp * RG;
    // The weights and inputs of the group's rows first (independent of the state), then the steps.
    Weights<kRowQ> wt[RG];
    float a[RG][K][kRowQ] = {};
#pragma unroll
    for (int st = 0; st < RG; ++st) {
      float g0[kRowQ] = {}, g1[kRowQ] = {}, g2[kRowQ] = {};
      if (active && t0 + st < ln.T) {
        load_pack<T, kRowQ>(tslot(tile, G0, st) + i0, g0);
        load_pack<T, kRowQ>(tslot(tile, G1, st) + i0, g1);
        load_pack<T, kRowQ>(tslot(tile, G2, st) + i0, g2);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          load_pack<T, kRowQ>(tslot(tile, staged_x(k), st) + i0, a[st][k]);
          if (planes[staged_x(k) + 1]) {
            float lv[kRowQ];
            load_pack<T, kRowQ>(tslot(tile, staged_x(k) + 1, st) + i0, lv);
#pragma unroll
            for (int q = 0; q < kRowQ; ++q) a[st][k][q] *= lv[q];
          }
        }
      }
      wt[st] = Weights<kRowQ>(g0, g1, g2, i0, ln.L);
      pin(wt[st]);
    }
#pragma unroll
    for (int st = 0; st < RG; ++st) {
      const int t = t0 + st;
      if (t >= ln.T) break;  // uniform across the block
      stepper.step(ex, a[st], wt[st], i0, ln.L);
      if (!active) continue;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float(&h)[kRowQ] = stepper.state[k];
        if constexpr (!kAdjoint) {
          float out[kRowQ];
          if (planes[staged_x(k) + 2]) {
            load_pack<T, kRowQ>(tslot(tile, staged_x(k) + 2, st) + i0, out);
#pragma unroll
            for (int q = 0; q < kRowQ; ++q) out[q] *= h[q];
          } else {
#pragma unroll
            for (int q = 0; q < kRowQ; ++q) out[q] = h[q];
          }
          store_pack<T, kRowQ>(io.y + k * io.plane + ln.offset(t, i0), out);
        }
        if (io.state) store_pack<float, kRowQ>(io.state + k * io.plane + ln.offset(t, i0), h);  // = state_offset
      }
    }
  }
}

}  // namespace gspn
