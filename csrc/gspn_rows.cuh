// Row scans (d = 2, 3) of 16-byte-aligned grids with rows of at most kRowMaxLine positions: the forward,
// and the backward's adjoint scan (gspn_step.cuh has both recurrences).
//
// A block scans the rows of one (batch, direction) in K channels of one gate group; thread k owns Q
// consecutive positions Qk .. Qk+Q-1 of a row in each channel (Q = row_positions(W)). Inputs travel in
// groups of row_group rows, double-buffered with cp.async: the block copies the group's rows of every
// tensor into a shared tile [tensor][step][position], so that a step reads its Q positions with one
// vector load per tensor. y and the float32 state go out as one contiguous row per step.
#pragma once

#include "gspn_step.cuh"

namespace gspn {

constexpr int kRowMaxThreads = 256;
constexpr int kRowMaxLine = 4 * kRowMaxThreads;  // rows of up to 1024 positions

// Positions per thread: 2 on rows of 257 to 512 positions (blocks of 8 warps instead of 4), else 4.
// (H100, the forward alone, four interleaved runs, ms: SDXL 8K level 1 0.82-0.84 -> 0.74-0.75, 16K level
// 2 1.43-1.45 -> 1.39-1.40, the other SDXL shapes equal. On shorter rows 1 or 2 positions were mixed, 4K
// level 1 0.23 -> 0.24-0.27 but 8K level 2 0.39 -> 0.36 with 2; 2 on 1024-long rows, 16 warps a block,
// 16K level 1 2.68 -> 2.71.)
inline int row_positions(int W) { return W > kRowMaxThreads && W <= 2 * kRowMaxThreads ? 2 : 4; }

// Rows staged per group: 4 in the forward of 16-bit inputs, else 2. (H100, forward: SDXL 4K level 2
// 0.167 -> 0.125 ms, 8K 3% faster, 16K level 1 equal. The adjoint with 4 took 11% longer at 16K, where
// its stages leave room for one block per multiprocessor, not two; float32 stages of 4 rows and two
// channels would not fit.)
__host__ __device__ constexpr int row_group(size_t element, bool adjoint) { return element == 2 && !adjoint ? 4 : 2; }

// Shared memory of rows_scan_kernel: two stages of the staged tensors x row_group rows, then the warp
// edges. `taps`: the tap inputs are float32 weights (two tensors), else logits of `element` bytes (three).
inline size_t rows_smem(int threads, int Q, size_t element, int K, bool adjoint, bool taps) {
  const size_t row = size_t(Q) * threads;
  const size_t tensors = channel_tensors(K) * element + tap_tensors(taps) * (taps ? sizeof(float) : element);
  return 2 * tensors * row_group(element, adjoint) * row + warp_edges_bytes(threads, K);
}

// Forward (kAdjoint = false): x, lam, u as in the op; writes y = u h and, when `state` is not null, h.
// Adjoint (kAdjoint = true): x is grad_y (B, 4, C, H, W), u the op's u (may be null), lam and y unused;
// writes gh to `state`. The tap weights come from `taps` (kTaps, gspn_taps.cuh), else from the logits in
// `gates`. One block per (batch, row direction, K channels): B * 2 * C / K blocks, of W / Q threads.
template <typename T, bool kAdjoint, int K, bool kTaps, int Q>
__global__ void __launch_bounds__(kRowMaxThreads)
    rows_scan_kernel(const T* __restrict__ x, const T* __restrict__ gates, const float* __restrict__ taps,
                     const T* __restrict__ lam, const T* __restrict__ u, T* __restrict__ y,
                     float* __restrict__ state, Shape s) {
  using Tap = TapInput<T, kTaps>;
  constexpr int RG = row_group(sizeof(T), kAdjoint);
  constexpr int NX = channel_tensors(K), NW = tap_tensors(kTaps);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cap = Q * blockDim.x;
  // One stage: [NX][RG][cap] of T, then [NW][RG][cap] of Tap.
  const size_t channel_bytes = size_t(NX) * RG * cap * sizeof(T);
  const size_t buffer = channel_bytes + size_t(NW) * RG * cap * sizeof(Tap);
  const WarpEdges<K> ex{reinterpret_cast<float*>(smem_raw + 2 * buffer), int(blockDim.x / 32),
                        int(threadIdx.x / 32), int(threadIdx.x % 32)};

  const ScanPlanes<T, kAdjoint> io(PlaneId(blockIdx.x, s.C, K, 2, 2), x, gates, taps, lam, u, y, state, s);
  const Lines& ln = io.ln;
  const T* planes[NX];
  channel_planes<K>(io, planes);
  const Tap* tap_plane[NW];
  tap_planes<kTaps>(io, tap_plane);
  ex.clear();

  const int groups = (ln.T + RG - 1) / RG;
  const int i0 = Q * threadIdx.x;  // first of this thread's positions
  const bool active = i0 < ln.L;   // L = W is a multiple of 16 bytes' elements (and of Q)
  Stepper<Q, K, kAdjoint> stepper(ln, s.chunk);

  auto tile_of = [&](int grp) { return smem_raw + (grp & 1) * buffer; };
  auto tslot = [&](unsigned char* tile, int k, int st) {
    return reinterpret_cast<T*>(tile) + (size_t(k) * RG + st) * cap;
  };
  auto wslot = [&](unsigned char* tile, int k, int st) {
    return reinterpret_cast<Tap*>(tile + channel_bytes) + (size_t(k) * RG + st) * cap;
  };
  // Copies the group's rows of the planes `from` (an array) into the tile's slots, 16 bytes at a time.
  auto copy_rows = [&](int t0, const auto& from, auto slot) {
    constexpr int n = int(std::extent_v<std::remove_reference_t<decltype(from)>>);
    constexpr int VEC = 16 / int(sizeof(*from[0]));  // elements per 16-byte chunk
    const int chunks_per_row = ln.L / VEC;
    for (int ch = threadIdx.x; ch < chunks_per_row * RG; ch += blockDim.x) {
      const int st = ch / chunks_per_row;
      const int e = (ch - st * chunks_per_row) * VEC;
      if (t0 + st >= ln.T) continue;
      const int off = ln.offset(t0 + st, e);
#pragma unroll
      for (int k = 0; k < n; ++k)
        if (from[k]) cp_async16(slot(k, st) + e, from[k] + off);
    }
  };
  auto stage = [&](int grp) {
    unsigned char* tile = tile_of(grp);
    copy_rows(grp * RG, planes, [&](int k, int st) { return tslot(tile, k, st); });
    copy_rows(grp * RG, tap_plane, [&](int k, int st) { return wslot(tile, k, st); });
  };

  stage(0);
  cp_async_commit();
  for (int grp = 0; grp < groups; ++grp) {
    cp_async_wait_all();
    __syncthreads();
    if (grp + 1 < groups) stage(grp + 1);
    cp_async_commit();

    unsigned char* tile = tile_of(grp);
    const int t0 = grp * RG;
    // The weights and inputs of the group's rows first (independent of the state), then the steps.
    Weights<Q> wt[RG];
    float a[RG][K][Q] = {};
#pragma unroll
    for (int st = 0; st < RG; ++st) {
      float tin[NW][Q] = {};
      if (active && t0 + st < ln.T) {
#pragma unroll
        for (int k = 0; k < NW; ++k) load_pack<Tap, Q>(wslot(tile, k, st) + i0, tin[k]);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          load_pack<T, Q>(tslot(tile, staged_x(k), st) + i0, a[st][k]);
          if (planes[staged_x(k) + 1]) {
            float lv[Q];
            load_pack<T, Q>(tslot(tile, staged_x(k) + 1, st) + i0, lv);
#pragma unroll
            for (int q = 0; q < Q; ++q) a[st][k][q] *= lv[q];
          }
        }
      }
      wt[st] = weights_from<kTaps>(tin, i0, ln.L);
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
        const float(&h)[Q] = stepper.state[k];
        if constexpr (!kAdjoint) {
          float out[Q];
          if (planes[staged_x(k) + 2]) {
            load_pack<T, Q>(tslot(tile, staged_x(k) + 2, st) + i0, out);
#pragma unroll
            for (int q = 0; q < Q; ++q) out[q] *= h[q];
          } else {
#pragma unroll
            for (int q = 0; q < Q; ++q) out[q] = h[q];
          }
          store_streaming<T, Q>(io.y + k * io.plane + ln.offset(t, i0), out);
        }
        if (io.state) store_streaming<float, Q>(io.state + k * io.plane + ln.offset(t, i0), h);  // = state_offset
      }
    }
  }
}

}  // namespace gspn
