// Backward of GSPN-2: a reverse scan per (batch, direction, channel slice), all in one launch.
//
// With a_t = lam * x and h_t[i] = a_t[i] + m_t * sum_k w_k[t, i] h_{t-1}[i+k-1] (m_t = 0 where a chunk
// starts), y = u * h, the gradient of the state runs backwards:
//   gh_t[i] = gy_t[i] u_t[i] + m_{t+1} (w_0[t+1, i+1] gh_{t+1}[i+1] + w_1[t+1, i] gh_{t+1}[i]
//                                        + w_2[t+1, i-1] gh_{t+1}[i-1])
// and gives every input's gradient at the same step:
//   glam = gh x,   gx_d = gh lam (summed over d outside),   gu = gy h,
//   gw_k[t, i] = m_t sum_{c in slice} gh_t[i] h_{t-1}[i+k-1]   -> through the normalisation to the logits.
// The taps are recomputed from the logits; h is the forward's float32 state, read once
// per step: the previous line's values reach the neighbours through shared memory.
// Gate gradients of a block cover only its CB channels: they go to a float32 (B, 4, 3, G, H, W) buffer,
// stored when the block holds the whole group and summed atomically over the group's blocks otherwise.
// gx_d goes to a float32 (B, 4, C, H, W) buffer, summed over directions outside.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

template <typename T, int P>
__host__ __device__ constexpr int backward_vec() {
  constexpr int v = int(8 / sizeof(T)) / P;
  return v < 1 ? 1 : v;
}

template <typename T, int CB, int P>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ gates,
                                const T* __restrict__ lam, const T* __restrict__ u, const float* __restrict__ h,
                                float* __restrict__ gx_dir, float* __restrict__ ggates, T* __restrict__ glam,
                                T* __restrict__ gu, Shape s) {
  using A = typename Acc<T>::type;
  constexpr int VEC = backward_vec<T, P>();
  extern __shared__ unsigned char smem_raw[];
  const int row = max(s.H, s.W) + 2;
  A* smem = reinterpret_cast<A*>(smem_raw);
  A* gh_lines = smem;                   // [2][CB][row]  gh_{t+1} for the carry into line t
  A* w_lines = gh_lines + 2 * CB * row;  // [2][3][row]   m_{t+1} w_k[t+1]
  A* h_prev = w_lines + 2 * 3 * row;    // [CB][row]     h_{t-1} for the gate gradients

  int blk = blockIdx.x;
  const int slices = s.C / CB;
  const int c0 = (blk % slices) * CB;
  blk /= slices;
  const int d = blk % 4;
  const int b = blk / 4;
  const int g = c0 / (s.C / s.G);
  const bool sum_over_slices = (s.C / s.G) > CB;
  const Lines ln(d, s.H, s.W);
  const int64_t plane = int64_t(s.H) * s.W;

  for (int k = threadIdx.x; k < (2 * CB + 6 + CB) * row; k += blockDim.x) smem[k] = A(0);

  const T *gyp[CB], *xp[CB], *lp[CB], *up[CB];
  const float* hp[CB];
  float* gxp[CB];
  T *glp[CB], *gup[CB];
#pragma unroll
  for (int j = 0; j < CB; ++j) {
    const int64_t chan = (int64_t(b) * 4 + d) * s.C + c0 + j;
    gyp[j] = gy + chan * plane;
    xp[j] = x + (int64_t(b) * s.C + c0 + j) * plane;
    const int64_t in_batch = int64_t(d) * s.C + c0 + j;
    lp[j] = lam + b * s.lam_batch_stride + in_batch * plane;
    up[j] = u ? u + b * s.u_batch_stride + in_batch * plane : nullptr;
    hp[j] = h + chan * plane;
    gxp[j] = gx_dir + chan * plane;
    glp[j] = glam + chan * plane;
    gup[j] = u ? gu + chan * plane : nullptr;
  }
  const T* gp[3];
  float* ggp[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    gp[k] = gates + b * s.gates_batch_stride + ((int64_t(d) * 3 + k) * s.G + g) * plane;
    ggp[k] = ggates + (((int64_t(b) * 4 + d) * 3 + k) * s.G + g) * plane;
  }

  const bool columns = d < 2;
  const bool packed = columns && (s.W % VEC == 0);
  __syncthreads();

  int parity = 0;
  const int groups = (ln.T + VEC - 1) / VEC;
  for (int grp = groups - 1; grp >= 0; --grp) {
    const int t0 = grp * VEC;
    A gyin[P][CB][VEC], xin[P][CB][VEC], lin[P][CB][VEC], uin[P][CB][VEC], hin[P][CB][VEC], gin[P][3][VEC];
    A h_before[P][CB];  // h at line t0 - 1
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
#pragma unroll
      for (int k = 0; k < 3; ++k) load_steps<T, VEC>(gp[k], ln, t0, i, packed, gin[p][k]);
#pragma unroll
      for (int j = 0; j < CB; ++j) {
        load_steps<T, VEC>(gyp[j], ln, t0, i, packed, gyin[p][j]);
        load_steps<T, VEC>(xp[j], ln, t0, i, packed, xin[p][j]);
        load_steps<T, VEC>(lp[j], ln, t0, i, packed, lin[p][j]);
        load_steps<float, VEC>(hp[j], ln, t0, i, packed, hin[p][j]);
        if (u) load_steps<T, VEC>(up[j], ln, t0, i, packed, uin[p][j]);
        h_before[p][j] = t0 > 0 ? hp[j][ln.offset(t0 - 1, i)] : A(0);
      }
    }

    A glam_o[P][CB][VEC], gu_o[P][CB][VEC], gx_o[P][CB][VEC], gg_o[P][3][VEC];
#pragma unroll
    for (int st = VEC - 1; st >= 0; --st) {
      const int t = t0 + st;
      if (t >= ln.T) continue;  // uniform across the block
      const bool restart = (t % s.chunk) == 0;
      const bool carried = t + 1 < ln.T && ((t + 1) % s.chunk) != 0;

      // Phase A: publish h_{t-1}[i] for the neighbours' gate gradients.
      if (!restart) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const int i = threadIdx.x + p * blockDim.x;
          if (i >= ln.L) continue;
#pragma unroll
          for (int j = 0; j < CB; ++j) h_prev[j * row + i + 1] = st > 0 ? hin[p][j][st - 1] : h_before[p][j];
        }
      }
      __syncthreads();

      // Phase B: gh_t from line t+1, every gradient at line t, then publish gh_t and m_t w[t].
      const A* gh_next = gh_lines + (parity ^ 1) * CB * row;
      const A* w_next = w_lines + (parity ^ 1) * 3 * row;
      A* gh_here = gh_lines + parity * CB * row;
      A* w_here = w_lines + parity * 3 * row;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= ln.L) continue;
        const Taps<A> taps(gin[p][0][st], gin[p][1][st], gin[p][2][st], i > 0, i < ln.L - 1);
        A gw[3] = {A(0), A(0), A(0)};
#pragma unroll
        for (int j = 0; j < CB; ++j) {
          A gh = u ? gyin[p][j][st] * uin[p][j][st] : gyin[p][j][st];
          if (carried) {
            const A* gn = gh_next + j * row + i;  // gn[k] = gh_{t+1}[i + k - 1]
            gh += w_next[0 * row + i + 2] * gn[2] + w_next[1 * row + i + 1] * gn[1] + w_next[2 * row + i] * gn[0];
          }
          glam_o[p][j][st] = gh * xin[p][j][st];
          gx_o[p][j][st] = gh * lin[p][j][st];
          gu_o[p][j][st] = gyin[p][j][st] * hin[p][j][st];
          if (!restart) {
            const A* hn = h_prev + j * row + i;  // hn[k] = h_{t-1}[i + k - 1]
            gw[0] += gh * hn[0];
            gw[1] += gh * hn[1];
            gw[2] += gh * hn[2];
          }
          gh_here[j * row + i + 1] = gh;
        }
        if (restart) {
          gg_o[p][0][st] = gg_o[p][1][st] = gg_o[p][2][st] = A(0);
          w_here[0 * row + i + 1] = w_here[1 * row + i + 1] = w_here[2 * row + i + 1] = A(0);
        } else {
          // d/ds_k of w_m = s_m / S is (delta_km - w_m) / S; d s_k / d logit_k = s_k (1 - s_k).
          const A mean = taps.w(0) * gw[0] + taps.w(1) * gw[1] + taps.w(2) * gw[2];
#pragma unroll
          for (int k = 0; k < 3; ++k) {
            gg_o[p][k][st] = taps.s[k] * (A(1) - taps.s[k]) * taps.inv_sum * (gw[k] - mean);
            w_here[k * row + i + 1] = taps.w(k);
          }
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
        store_steps<T, VEC>(glp[j], ln, t0, i, packed, glam_o[p][j]);
        store_steps<float, VEC>(gxp[j], ln, t0, i, packed, gx_o[p][j]);
        if (u) store_steps<T, VEC>(gup[j], ln, t0, i, packed, gu_o[p][j]);
      }
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        if (!sum_over_slices) {
          store_steps<float, VEC>(ggp[k], ln, t0, i, packed, gg_o[p][k]);
        } else {
#pragma unroll
          for (int st = 0; st < VEC; ++st)
            if (t0 + st < ln.T) atomicAdd(ggp[k] + ln.offset(t0 + st, i), gg_o[p][k][st]);
        }
      }
    }
  }
}

}  // namespace gspn
