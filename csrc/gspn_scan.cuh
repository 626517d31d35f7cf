// Generic scans of GSPN-2 for any shape: the forward, and the backward's adjoint scan (see
// gspn_step.cuh for both recurrences), all four directions and all chunks in one launch.
//
// One block scans the lines of one (batch, direction, channel); threads own positions i of a line (P
// each). Per scan step a thread reads its inputs from registers and what it needs of the last line from
// shared memory (double-buffered, zero borders): the forward its neighbours' h, the adjoint the sends
// m_0 of i + 1 and m_2 of i - 1. One barrier per step. Inputs are loaded VEC steps at a time: for
// columns (d = 0, 1) the VEC steps of a position are adjacent in memory and move as one aligned vector
// when the grid allows it; for rows (d = 2, 3) consecutive threads read consecutive addresses.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

template <typename T, int P>
__host__ __device__ constexpr int scan_vec() {
  constexpr int v = int(16 / sizeof(T)) / P;
  return v < 1 ? 1 : v;
}

// Line buffers of shared memory: two (double-buffered) of h forward, two of (m_0, m_2) in the adjoint.
inline size_t scan_smem(int longest, bool adjoint) { return size_t(adjoint ? 4 : 2) * (longest + 2) * sizeof(float); }

// Arguments as rows_scan_kernel's.
template <typename T, int P, bool kAdjoint>
__global__ void __launch_bounds__(kMaxThreads)
    scan_kernel(const T* __restrict__ x, const T* __restrict__ gates, const T* __restrict__ lam,
                const T* __restrict__ u, T* __restrict__ y, float* __restrict__ state, Shape s) {
  constexpr int VEC = scan_vec<T, P>();
  constexpr int NL = kAdjoint ? 2 : 1;  // line buffers per parity
  extern __shared__ unsigned char smem_raw[];
  float* lines = reinterpret_cast<float*>(smem_raw);  // [2][NL][row], position i at i + 1

  const ScanPlanes<T, kAdjoint> io(PlaneId(blockIdx.x, s.C, 1, 0, 4), x, gates, nullptr, lam, u, y, state,
                                   s);
  const Lines& ln = io.ln;
  const int row = max(s.H, s.W) + 2;
  for (int k = threadIdx.x; k < 2 * NL * row; k += blockDim.x) lines[k] = 0.f;

  const T *xp = io.a0, *lp = io.a1, *up = io.u;  // step input a = xp * lp
  T* yp = io.y;
  float* hp = io.state;
  const T* const* gp = io.gate;
  const bool packed = io.d < 2 && (s.W % VEC == 0);
  __syncthreads();

  float m1[P];  // adjoint: what each own position sends to itself on the next line
#pragma unroll
  for (int p = 0; p < P; ++p) m1[p] = 0.f;
  int parity = 0;
  for (int t0 = 0; t0 < ln.T; t0 += VEC) {
    float xin[P][VEC], lin[P][VEC], uin[P][VEC], gin[P][3][VEC], hv[P][VEC];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
#pragma unroll
      for (int k = 0; k < 3; ++k) load_steps<T, VEC>(gp[k], ln, t0, i, packed, gin[p][k]);
      load_steps<T, VEC>(xp, ln, t0, i, packed, xin[p]);
      if (lp) load_steps<T, VEC>(lp, ln, t0, i, packed, lin[p]);
      if (up) load_steps<T, VEC>(up, ln, t0, i, packed, uin[p]);
    }

#pragma unroll
    for (int st = 0; st < VEC; ++st) {
      const int t = t0 + st;
      if (t >= ln.T) break;  // uniform across the block
      // forward: nothing arrives at a chunk start; adjoint: nothing leaves it
      const bool restart = ((kAdjoint ? ln.T - 1 - t : t) % s.chunk) == 0;
      const float* prev = lines + parity * NL * row;
      float* next = lines + (parity ^ 1) * NL * row;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= ln.L) continue;
        float a = lp ? lin[p][st] * xin[p][st] : xin[p][st];
        if constexpr (kAdjoint) {
          a += m1[p] + prev[i + 2] + prev[row + i];  // m_0 of i + 1, m_2 of i - 1
          float w0 = 0.f, w1 = 0.f, w2 = 0.f;
          if (!restart) {
            float w[3];
            tap_weights(gin[p][0][st], gin[p][1][st], gin[p][2][st], i > 0, i < ln.L - 1, w);
            w0 = w[0], w1 = w[1], w2 = w[2];
          }
          next[i + 1] = w0 * a;
          next[row + i + 1] = w2 * a;
          m1[p] = w1 * a;
        } else {
          if (!restart) {
            float w[3];
            tap_weights(gin[p][0][st], gin[p][1][st], gin[p][2][st], i > 0, i < ln.L - 1, w);
            const float* pr = prev + i;  // pr[0], pr[1], pr[2] = h_{t-1}[i-1], [i], [i+1]
            a += w[0] * pr[0] + w[1] * pr[1] + w[2] * pr[2];
          }
          next[i + 1] = a;
        }
        hv[p][st] = a;
      }
      __syncthreads();
      parity ^= 1;
    }

#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
      if (hp) {
#pragma unroll
        for (int st = 0; st < VEC; ++st)
          if (t0 + st < ln.T) hp[ln.state_offset(t0 + st, i)] = hv[p][st];
      }
      if constexpr (!kAdjoint) {
        if (up) {
#pragma unroll
          for (int st = 0; st < VEC; ++st) hv[p][st] *= uin[p][st];
        }
        store_steps<T, VEC>(yp, ln, t0, i, packed, hv[p]);
      }
    }
  }
}

}  // namespace gspn
