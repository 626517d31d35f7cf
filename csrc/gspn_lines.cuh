// Line-parallel forward scan: the fast path of the forward for 16-byte-aligned grids.
//
// A block scans the lines of one (batch, direction, channel); thread k owns Q = 4 consecutive positions
// 4k .. 4k+3 of a line and keeps their state in registers. Neighbours inside a warp come by shuffle;
// only the two edge values of each warp go through shared memory (one barrier per step). Inputs travel
// VEC = 16 / sizeof(T) scan steps at a time into a shared tile laid out [tensor][step][position], so a
// step reads its four positions with one vector load per tensor:
//   rows (d = 2, 3):    cp.async copies VEC rows straight into that layout, double-buffered;
//   columns (d = 0, 1): cp.async copies each row's VEC steps (16 bytes) into a raw buffer, which the
//                       block transposes into the tile; the outputs of a group go back through the tile
//                       (into the slots of inputs already consumed) and leave as 16-byte row chunks.
#pragma once

#include "gspn_staged.cuh"

namespace gspn {

constexpr int kLineQ = 4;

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

// float32 state kept in two 16-bit tile slots (16-bit dtypes) or one 32-bit slot (float32).
template <typename T>
__device__ __forceinline__ void put_state(T* slot0, T* slot1, float v) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float*>(slot0) = v;
  } else {
    const unsigned bits = __float_as_uint(v);
    *reinterpret_cast<unsigned short*>(slot0) = static_cast<unsigned short>(bits & 0xffffu);
    *reinterpret_cast<unsigned short*>(slot1) = static_cast<unsigned short>(bits >> 16);
  }
}
template <typename T>
__device__ __forceinline__ float get_state(const T* slot0, const T* slot1) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float*>(slot0);
  } else {
    const unsigned lo = *reinterpret_cast<const unsigned short*>(slot0);
    const unsigned hi = *reinterpret_cast<const unsigned short*>(slot1);
    return __uint_as_float(lo | (hi << 16));
  }
}

template <typename T>
__global__ void __launch_bounds__(1024)
    lines_forward_kernel(const T* __restrict__ x, const T* __restrict__ gates, const T* __restrict__ lam,
                         const T* __restrict__ u, T* __restrict__ y, float* __restrict__ h_out, Shape s) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int NT = 6;  // tile slots: gate taps 0..2, x, lam, u
  enum { G0 = 0, G1 = 1, XS = 3, LAMS = 4, US = 5 };
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cap = kLineQ * blockDim.x;
  const size_t buffer = size_t(NT) * VEC * cap;  // elements of one tile / raw buffer
  T* buffers = reinterpret_cast<T*>(smem_raw);
  float* edges = reinterpret_cast<float*>(smem_raw + 2 * buffer * sizeof(T));  // [2][warps][2]
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  int blk = blockIdx.x;
  const int c = blk % s.C;
  blk /= s.C;
  const int d = blk % 4;
  const int b = blk / 4;
  const int g = c / (s.C / s.G);
  const Lines ln(d, s.H, s.W);
  const int64_t plane = int64_t(s.H) * s.W;
  const bool columns = d < 2;
  const int64_t out_plane = ((int64_t(b) * 4 + d) * s.C + c) * plane;

  const T* planes[NT];
#pragma unroll
  for (int k = 0; k < 3; ++k) planes[k] = gates + b * s.gates_batch_stride + ((int64_t(d) * 3 + k) * s.G + g) * plane;
  planes[XS] = x + (int64_t(b) * s.C + c) * plane;
  planes[LAMS] = lam + b * s.lam_batch_stride + (int64_t(d) * s.C + c) * plane;
  planes[US] = u ? u + b * s.u_batch_stride + (int64_t(d) * s.C + c) * plane : nullptr;
  T* yp = y + out_plane;
  float* hp = h_out ? h_out + out_plane : nullptr;

  for (int k = threadIdx.x; k < 4 * warps; k += blockDim.x) edges[k] = 0.f;

  // Tile of group grp: rows use the two buffers in turn; columns compute from buffer 1, raw in buffer 0.
  auto tile_of = [&](int grp) { return buffers + (columns ? buffer : (grp & 1) * buffer); };
  auto raw_of = [&](int grp) { return buffers + (columns ? 0 : (grp & 1) * buffer); };
  auto slot = [&](T* tile, int k, int st) { return tile + (size_t(k) * VEC + st) * cap; };

  // Issue the copies of group grp: rows into their tile, columns into the raw buffer [k][row][VEC].
  auto stage = [&](int grp) {
    const int t0 = grp * VEC;
    T* raw = raw_of(grp);
    if (columns) {
      for (int r = threadIdx.x; r < ln.L; r += blockDim.x) {
        const int first = ln.reversed ? ln.offset(t0 + VEC - 1, r) : ln.offset(t0, r);
#pragma unroll
        for (int k = 0; k < NT; ++k)
          if (planes[k]) cp_async<16>(raw + (size_t(k) * cap + r) * VEC, planes[k] + first);
      }
    } else {
      const int chunks_per_row = ln.L / VEC;  // a 16-byte chunk holds VEC positions
      for (int ch = threadIdx.x; ch < chunks_per_row * VEC; ch += blockDim.x) {
        const int st = ch / chunks_per_row;
        const int e = (ch - st * chunks_per_row) * VEC;
        if (t0 + st >= ln.T) continue;
        const int off = ln.offset(t0 + st, e);
#pragma unroll
        for (int k = 0; k < NT; ++k)
          if (planes[k]) cp_async<16>(slot(raw, k, st) + e, planes[k] + off);
      }
    }
  };

  // Columns: outputs of group grp (y in the x slot, the state in the gate slots) back to memory.
  auto write_back = [&](int grp) {
    const int t0 = grp * VEC;
    T* tile = tile_of(grp);
    for (int r = threadIdx.x; r < ln.L; r += blockDim.x) {
      const int first = ln.reversed ? ln.offset(t0 + VEC - 1, r) : ln.offset(t0, r);
      float yv[VEC], hv[VEC];
#pragma unroll
      for (int st = 0; st < VEC; ++st) {
        const int q = ln.reversed ? VEC - 1 - st : st;  // memory order
        yv[q] = to_acc(slot(tile, XS, st)[r]);
        hv[q] = get_state<T>(slot(tile, G0, st) + r, slot(tile, G1, st) + r);
      }
      store_quad<T, VEC>(yp + first, yv);
      if (hp) {
#pragma unroll
        for (int half = 0; half < VEC; half += 4) {
          float part[4] = {hv[half], hv[half + 1], hv[half + 2], hv[half + 3]};
          store_quad<float, 4>(hp + first + half, part);
        }
      }
    }
  };

  // Columns: raw [k][row][VEC] -> tile [k][step][row].
  auto transpose = [&](int grp) {
    const T* raw = raw_of(grp);
    T* tile = tile_of(grp);
    for (int r = threadIdx.x; r < ln.L; r += blockDim.x) {
#pragma unroll
      for (int k = 0; k < NT; ++k) {
        if (!planes[k]) continue;
        const Pack<T, VEC> v = reinterpret_cast<const Pack<T, VEC>*>(raw)[size_t(k) * cap + r];
#pragma unroll
        for (int st = 0; st < VEC; ++st) slot(tile, k, st)[r] = v.v[ln.reversed ? VEC - 1 - st : st];
      }
    }
  };

  const int groups = (ln.T + VEC - 1) / VEC;
  const int i0 = kLineQ * threadIdx.x;  // first of this thread's positions
  float h[kLineQ] = {0.f, 0.f, 0.f, 0.f};
  int parity = 0;
  ChunkPhase phase(0, s.chunk);

  stage(0);
  cp_async_commit();
  for (int grp = 0; grp < groups; ++grp) {
    cp_async_wait_all();
    __syncthreads();
    if (columns) {
      if (grp > 0) write_back(grp - 1);
      transpose(grp);
      __syncthreads();
    }
    if (grp + 1 < groups) stage(grp + 1);
    cp_async_commit();

    T* tile = tile_of(grp);
    const int t0 = grp * VEC;
#pragma unroll 1
    for (int st = 0; st < VEC; ++st) {
      const int t = t0 + st;
      if (t >= ln.T) break;  // uniform across the block
      const bool restart = phase.starts();
      phase.forward();

      // Neighbours of this thread's quad on the previous line.
      float left = __shfl_up_sync(0xffffffffu, h[kLineQ - 1], 1);
      float right = __shfl_down_sync(0xffffffffu, h[0], 1);
      if (lane == 0) left = warp > 0 ? edges[parity * 2 * warps + 2 * (warp - 1) + 1] : 0.f;
      if (lane == 31) right = warp + 1 < warps ? edges[parity * 2 * warps + 2 * (warp + 1)] : 0.f;

      if (i0 < ln.L) {
        float xv[kLineQ], lv[kLineQ], out[kLineQ];
        load_quad<T, kLineQ>(slot(tile, XS, st) + i0, xv);
        load_quad<T, kLineQ>(slot(tile, LAMS, st) + i0, lv);
        float next[kLineQ];
#pragma unroll
        for (int q = 0; q < kLineQ; ++q) next[q] = lv[q] * xv[q];
        if (!restart) {
          float g0[kLineQ], g1[kLineQ], g2[kLineQ];
          load_quad<T, kLineQ>(slot(tile, 0, st) + i0, g0);
          load_quad<T, kLineQ>(slot(tile, 1, st) + i0, g1);
          load_quad<T, kLineQ>(slot(tile, 2, st) + i0, g2);
#pragma unroll
          for (int q = 0; q < kLineQ; ++q) {
            const int i = i0 + q;
            const Taps<float> taps(g0[q], g1[q], g2[q], i > 0, i < ln.L - 1);
            const float hl = q > 0 ? h[q - 1] : left;
            const float hr = q + 1 < kLineQ ? h[q + 1] : right;
            next[q] += taps.w(0) * hl + taps.w(1) * h[q] + taps.w(2) * hr;
          }
        }
#pragma unroll
        for (int q = 0; q < kLineQ; ++q) h[q] = (i0 + q < ln.L) ? next[q] : 0.f;
        if (u) {
          float uv[kLineQ];
          load_quad<T, kLineQ>(slot(tile, US, st) + i0, uv);
#pragma unroll
          for (int q = 0; q < kLineQ; ++q) out[q] = uv[q] * h[q];
        } else {
#pragma unroll
          for (int q = 0; q < kLineQ; ++q) out[q] = h[q];
        }
        if (columns) {  // into consumed slots; written back with the group
          store_quad<T, kLineQ>(slot(tile, XS, st) + i0, out);
#pragma unroll
          for (int q = 0; q < kLineQ; ++q) put_state<T>(slot(tile, G0, st) + i0 + q, slot(tile, G1, st) + i0 + q, h[q]);
        } else {
          const int off = ln.offset(t, i0);
          store_quad<T, kLineQ>(yp + off, out);
          if (hp) store_quad<float, kLineQ>(hp + off, h);
        }
      }
      if (lane == 0) edges[(parity ^ 1) * 2 * warps + 2 * warp] = h[0];
      if (lane == 31) edges[(parity ^ 1) * 2 * warps + 2 * warp + 1] = h[kLineQ - 1];
      __syncthreads();
      parity ^= 1;
    }
  }
  if (columns) write_back(groups - 1);
}

}  // namespace gspn
