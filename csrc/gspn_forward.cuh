// Forward scan of GSPN-2: all four directions, all chunks, one launch.
//
// One block scans the lines of one (batch, direction) for `CB` channels of one gate group; threads own
// positions i of a line (P each). Per scan step a thread reads its inputs from registers, the
// previous line h_{t-1}[i-1 .. i+1] from shared memory (double-buffered, zero borders), and writes h_t
// back there: one barrier per step. Inputs are staged VEC steps at a time: for columns (d = 0, 1)
// the VEC steps of a position are adjacent in memory and move as one aligned vector, so reads and
// writes stay sector-efficient although the scan walks across rows; for rows (d = 2, 3) consecutive
// threads read consecutive addresses. Gates are loaded once per position and shared by the CB channels.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

template <typename T, int P>
__host__ __device__ constexpr int forward_vec() {
  constexpr int v = int(16 / sizeof(T)) / P;
  return v < 1 ? 1 : v;
}

template <typename T, int CB, int P>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const T* __restrict__ x, const T* __restrict__ gates, const T* __restrict__ lam,
                               const T* __restrict__ u, T* __restrict__ y, float* __restrict__ h_out, Shape s) {
  using A = typename Acc<T>::type;
  constexpr int VEC = forward_vec<T, P>();
  extern __shared__ unsigned char smem_raw[];
  A* lines = reinterpret_cast<A*>(smem_raw);  // [2][CB][Lmax + 2], position i at i + 1

  int blk = blockIdx.x;
  const int slices = s.C / CB;
  const int c0 = (blk % slices) * CB;
  blk /= slices;
  const int d = blk % 4;
  const int b = blk / 4;
  const int g = c0 / (s.C / s.G);
  const Lines ln(d, s.H, s.W);
  const int row = max(s.H, s.W) + 2;
  const int64_t plane = int64_t(s.H) * s.W;

  for (int k = threadIdx.x; k < 2 * CB * row; k += blockDim.x) lines[k] = A(0);

  const T* xp[CB];
  const T* lp[CB];
  const T* up[CB];
  T* yp[CB];
  float* hp[CB];
#pragma unroll
  for (int j = 0; j < CB; ++j) {
    const int64_t chan = (int64_t(b) * 4 + d) * s.C + c0 + j;
    xp[j] = x + (int64_t(b) * s.C + c0 + j) * plane;
    const int64_t in_batch = int64_t(d) * s.C + c0 + j;
    lp[j] = lam + b * s.lam_batch_stride + in_batch * plane;
    up[j] = u ? u + b * s.u_batch_stride + in_batch * plane : nullptr;
    yp[j] = y + chan * plane;
    hp[j] = h_out ? h_out + chan * plane : nullptr;
  }
  const T* gp[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) gp[k] = gates + b * s.gates_batch_stride + ((int64_t(d) * 3 + k) * s.G + g) * plane;

  const bool columns = d < 2;
  __syncthreads();

  int parity = 0;
  for (int t0 = 0; t0 < ln.T; t0 += VEC) {
    const bool packed = columns && (s.W % VEC == 0);
    A xin[P][CB][VEC], lin[P][CB][VEC], uin[P][CB][VEC], gin[P][3][VEC];
    A hv[P][CB][VEC];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
#pragma unroll
      for (int k = 0; k < 3; ++k) load_steps<T, VEC>(gp[k], ln, t0, i, packed, gin[p][k]);
#pragma unroll
      for (int j = 0; j < CB; ++j) {
        load_steps<T, VEC>(xp[j], ln, t0, i, packed, xin[p][j]);
        load_steps<T, VEC>(lp[j], ln, t0, i, packed, lin[p][j]);
        if (u) load_steps<T, VEC>(up[j], ln, t0, i, packed, uin[p][j]);
      }
    }

#pragma unroll
    for (int st = 0; st < VEC; ++st) {
      const int t = t0 + st;
      if (t >= ln.T) break;  // uniform across the block
      const bool restart = (t % s.chunk) == 0;
      const A* prev = lines + parity * CB * row;
      A* next = lines + (parity ^ 1) * CB * row;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= ln.L) continue;
        A w0 = A(0), w1 = A(0), w2 = A(0);
        if (!restart) {
          const Taps<A> taps(gin[p][0][st], gin[p][1][st], gin[p][2][st], i > 0, i < ln.L - 1);
          w0 = taps.w(0);
          w1 = taps.w(1);
          w2 = taps.w(2);
        }
#pragma unroll
        for (int j = 0; j < CB; ++j) {
          const A* pr = prev + j * row + i;  // pr[0], pr[1], pr[2] = h_{t-1}[i-1], [i], [i+1]
          A h = lin[p][j][st] * xin[p][j][st];
          if (!restart) h += w0 * pr[0] + w1 * pr[1] + w2 * pr[2];
          next[j * row + i + 1] = h;
          hv[p][j][st] = h;
        }
      }
      __syncthreads();
      parity ^= 1;
    }

#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
#pragma unroll
      for (int j = 0; j < CB; ++j) {
        if (hp[j]) store_steps<float, VEC>(hp[j], ln, t0, i, packed, hv[p][j]);
        if (u) {
#pragma unroll
          for (int st = 0; st < VEC; ++st) hv[p][j][st] *= uin[p][j][st];
        }
        store_steps<T, VEC>(yp[j], ln, t0, i, packed, hv[p][j]);
      }
    }
  }
}

}  // namespace gspn
