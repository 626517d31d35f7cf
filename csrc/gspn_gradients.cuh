// The backward's second pass: every input's gradient from the adjoint state gh (gspn_lines.cuh) and the
// forward's state h, pointwise but for a 3-tap stencil over h, in memory order whatever the direction:
//   glam = gh x,   gu = gy h,   gx = sum over d of gh lam,
//   gw_k[t, i] = m_t sum over the group's channels of gh_t[i] h_{t-1}[i+k-1],
//   g logit_k = s_k (1 - s_k) / S (gw_k - sum_j w_j gw_j)     (d w_j / d s_k = (delta_jk - w_j) / S)
// The logit gradient is linear in gw, so partial sums over slices of a group's channels add up.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

// Channels of one gate group per thread, and the occupancy, measured on an H100 (SDXL 16K level 1,
// float16): 16 channels 6.52 ms, 8 6.98, 32 6.20 (but fewer threads for small grids); 4 blocks of 256
// threads per multiprocessor (64 registers) against 3 (80 registers): 6.98 vs 7.61 ms at 8 channels,
// and 5 spill (8.82 ms).
constexpr int kGradChannels = 16;
constexpr int kGradThreads = 256;

// Channel slices per gate group: with more than one, threads add their gate gradients atomically into
// a zero-filled ggates.
__host__ __device__ inline int gradient_slices(const Shape& s) {
  return (s.C / s.G + kGradChannels - 1) / kGradChannels;
}

// gy, h, gh, glam, gu: (B, 4, C, H, W), dense; gx like x; ggates: float32 (B, 4, 3, G, H, W), dense.
// A thread takes one position of up to kGradChannels channels of one gate group, in all four directions.
template <typename T>
__global__ void __launch_bounds__(kGradThreads, 4)
    gradients_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ gates,
                     const T* __restrict__ lam, const T* __restrict__ u, const float* __restrict__ h,
                     const float* __restrict__ gh, T* __restrict__ gx, float* __restrict__ ggates,
                     T* __restrict__ glam, T* __restrict__ gu, Shape s) {
  const int per_group = s.C / s.G;
  const int slices = gradient_slices(s);
  const int plane = s.H * s.W;
  const int64_t total = int64_t(s.B) * s.G * slices * plane;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int pos = int(e % plane);
    int64_t rest = e / plane;
    const int slice = int(rest % slices);
    rest /= slices;
    const int g = int(rest % s.G);
    const int b = int(rest / s.G);
    const int hh = pos / s.W, ww = pos - hh * s.W;
    const int c_begin = g * per_group + slice * kGradChannels;
    const int c_end = min(c_begin + kGradChannels, (g + 1) * per_group);

    float gw[4][3] = {};
    for (int c = c_begin; c < c_end; ++c) {
      const float xv = to_acc(x[(int64_t(b) * s.C + c) * plane + pos]);
      float gx_sum = 0.f;
#pragma unroll
      for (int d = 0; d < 4; ++d) {
        const Lines ln(d, s.H, s.W);
        int t, i;
        ln.locate(hh, ww, t, i);
        const bool receives = (t % s.chunk) != 0;
        const int64_t in_batch = int64_t(d) * s.C + c;
        const int64_t base = (int64_t(b) * 4 * s.C + in_batch) * plane;  // dense (b, d, c) plane
        const float ghv = gh[base + pos];
        glam[base + pos] = from_acc<T>(ghv * xv);
        gx_sum += ghv * to_acc(lam[b * s.lam_batch_stride + in_batch * plane + pos]);
        if (u) gu[base + pos] = from_acc<T>(to_acc(gy[base + pos]) * h[base + pos]);
        if (receives) {
          const float* hl = h + base + ln.offset(t - 1, i);  // h_{t-1}[i]
          if (i > 0) gw[d][0] += ghv * hl[-ln.stride_i];
          gw[d][1] += ghv * hl[0];
          if (i < ln.L - 1) gw[d][2] += ghv * hl[ln.stride_i];
        }
      }
      gx[(int64_t(b) * s.C + c) * plane + pos] = from_acc<T>(gx_sum);
    }

#pragma unroll
    for (int d = 0; d < 4; ++d) {
      const Lines ln(d, s.H, s.W);
      int t, i;
      ln.locate(hh, ww, t, i);
      float* out = ggates + ((int64_t(b) * 4 + d) * 3 * s.G + g) * plane + pos;  // tap k at k * G * plane
      const int64_t tap_stride = int64_t(s.G) * plane;
      if ((t % s.chunk) == 0) {
        if (slices == 1) out[0] = out[tap_stride] = out[2 * tap_stride] = 0.f;
        continue;
      }
      const T* logits = gates + b * s.gates_batch_stride + (int64_t(d) * 3 * s.G + g) * plane + pos;
      const Taps<float> taps(to_acc(logits[0]), to_acc(logits[tap_stride]), to_acc(logits[2 * tap_stride]), i > 0,
                             i < ln.L - 1);
      const float mean = taps.w(0) * gw[d][0] + taps.w(1) * gw[d][1] + taps.w(2) * gw[d][2];
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        const float v = taps.s[k] * (1.f - taps.s[k]) * taps.inv_sum * (gw[d][k] - mean);
        if (slices == 1) out[k * tap_stride] = v;
        else atomicAdd(out + k * tap_stride, v);
      }
    }
  }
}

}  // namespace gspn
