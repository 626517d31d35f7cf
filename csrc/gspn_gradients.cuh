// The backward's second pass: every input's gradient from the adjoint state gh (gspn_step.cuh) and the
// forward's state h, pointwise but for a 3-tap stencil over h, in the inputs' memory order whatever the
// direction (the column directions' states, stored transposed, pass through shared memory):
//   glam = gh x,   gu = gy h,   gx = sum over d of gh lam,
//   gw_k[t, i] = m_t sum over the group's channels of gh_t[i] h_{t-1}[i+k-1],
//   g logit_k = s_k (1 - s_k) / S (gw_k - sum_j w_j gw_j)     (d w_j / d s_k = (delta_jk - w_j) / S)
// The logit gradient is linear in gw, so partial sums over slices of a group's channels add up.
#pragma once

#include <type_traits>

#include "gspn_common.cuh"

namespace gspn {

// A block takes a kTileH x kTileW tile of positions (one per thread) of up to kGradChannels channels of
// one gate group. Measured on an H100, SDXL 16K level 1, float16: tiles of 8 x 32 at 4 blocks per
// multiprocessor 7.74 ms, 16 x 32 at 2 8.04 ms, 32 x 32 at 1 8.30 ms; 16 channels a block 6.52 ms
// against 8 channels 6.98 ms (an earlier untiled version; fewer channels, more gate-gradient atomics).
constexpr int kTileH = 8, kTileW = 32;  // kGradChannels: gspn_api.h

// Channel slices per gate group: with more than one, blocks add their gate gradients atomically into
// a zero-filled ggates.
__host__ __device__ inline int gradient_slices(const Shape& s) {
  return (s.C / s.G + kGradChannels - 1) / kGradChannels;
}

// Starts copying a column direction's float32 state (stored transposed, W x H: Lines::state_offset)
// around the tile, rows hh0 - halo .. and columns ww0 - halo .., into tile[hh][ww] (pitch kTileW +
// 2 halo + 1); consecutive threads read consecutive hh, along the stored lines. Outside the plane: zero.
__device__ __forceinline__ void load_column_state(float* tile, const float* plane, int H, int W, int hh0, int ww0,
                                                  int halo) {
  const int rows = kTileH + 2 * halo, cols = kTileW + 2 * halo, pitch = cols + 1;
  for (int k = threadIdx.y * blockDim.x + threadIdx.x; k < rows * cols; k += blockDim.x * blockDim.y) {
    const int hl = k % rows, wl = k / rows;
    const int hh = hh0 - halo + hl, ww = ww0 - halo + wl;
    const bool valid = hh >= 0 && hh < H && ww >= 0 && ww < W;
    cp_async_f32(tile + hl * pitch + wl, plane + (valid ? int64_t(ww) * H + hh : 0), valid);
  }
}

// gy, glam, gu: (B, 4, C, H, W), dense; h, gh: the float32 states (line by line, Lines::state_offset);
// gx like x; ggates: (B, 4, 3, G, H, W), dense, of type GG: float32 when a group has several slices.
// Block (tile, slice, g, b) takes a tile of positions of up to kGradChannels channels of one gate group,
// in all four directions. The column directions' states are stored transposed: they pass through shared
// memory, read along their lines.
template <typename T, typename GG>
__global__ void __launch_bounds__(kTileH * kTileW, 4)
    gradients_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ gates,
                     const T* __restrict__ lam, const T* __restrict__ u, const float* __restrict__ h,
                     const float* __restrict__ gh, T* __restrict__ gx, GG* __restrict__ ggates,
                     T* __restrict__ glam, T* __restrict__ gu, Shape s) {
  constexpr int kHaloPitch = kTileW + 3, kPitch = kTileW + 1;
  // Two stages (channels c, c + 1) of directions 0, 1: h around the tile, (hh, ww) at (hh+1, ww+1), and gh.
  __shared__ float h_tile[2][2][(kTileH + 2) * kHaloPitch];
  __shared__ float gh_tile[2][2][kTileH * kPitch];

  const int per_group = s.C / s.G;
  const int slices = gradient_slices(s);
  const int tiles_w = (s.W + kTileW - 1) / kTileW, tiles_h = (s.H + kTileH - 1) / kTileH;
  int blk = blockIdx.x;
  const int tile = blk % (tiles_w * tiles_h);
  blk /= tiles_w * tiles_h;
  const int slice = blk % slices;
  blk /= slices;
  const int g = blk % s.G;
  const int b = blk / s.G;
  const int hh0 = tile / tiles_w * kTileH, ww0 = tile % tiles_w * kTileW;
  const int hh = hh0 + threadIdx.y, ww = ww0 + threadIdx.x;
  const bool inside = hh < s.H && ww < s.W;
  const int plane = s.H * s.W;
  const int pos = hh * s.W + ww;
  const int c_begin = g * per_group + slice * kGradChannels;
  const int c_end = min(c_begin + kGradChannels, (g + 1) * per_group);

  auto stage = [&](int c) {  // the column tiles of channel c, into stage c & 1
    const int64_t channel0 = (int64_t(b) * 4 * s.C + c) * plane;
#pragma unroll
    for (int d = 0; d < 2; ++d) {
      load_column_state(h_tile[c & 1][d], h + channel0 + d * int64_t(s.C) * plane, s.H, s.W, hh0, ww0, 1);
      load_column_state(gh_tile[c & 1][d], gh + channel0 + d * int64_t(s.C) * plane, s.H, s.W, hh0, ww0, 0);
    }
  };
  stage(c_begin);
  cp_async_commit();

  float gw[4][3] = {};
  for (int c = c_begin; c < c_end; ++c) {
    const int64_t channel0 = (int64_t(b) * 4 * s.C + c) * plane;  // dense (b, 0, c) plane
    if (c + 1 < c_end) stage(c + 1);  // into the stage the last channel used (released by the barrier below)
    cp_async_commit();
    cp_async_wait_previous();  // this channel's tiles have landed
    __syncthreads();
    if (inside) {
      const float xv = to_acc(x[(int64_t(b) * s.C + c) * plane + pos]);
      float gx_sum = 0.f;
#pragma unroll
      for (int d = 0; d < 4; ++d) {
        const Lines ln(d, s.H, s.W);
        int t, i;
        ln.locate(hh, ww, t, i);
        const int64_t in_batch = int64_t(d) * s.C + c;
        const int64_t base = channel0 + d * int64_t(s.C) * plane;
        // h_{t-1}[i + k - 1] for tap k, and h_t[i]: from the tile (columns) or the state itself (rows).
        auto h_at = [&](int tt, int ii) {
          if (d >= 2) return h[base + ln.state_offset(tt, ii)];
          const int th = ii - hh0 + 1, tw = ln.pos(tt) - ww0 + 1;
          return h_tile[c & 1][d][th * kHaloPitch + tw];
        };
        const float ghv = d < 2 ? gh_tile[c & 1][d][threadIdx.y * kPitch + threadIdx.x] : gh[base + pos];
        glam[base + pos] = from_acc<T>(ghv * xv);
        gx_sum += ghv * to_acc(lam[b * s.lam_batch_stride + in_batch * plane + pos]);
        if (u) gu[base + pos] = from_acc<T>(to_acc(gy[base + pos]) * h_at(t, i));
        if ((t % s.chunk) != 0) {
          if (i > 0) gw[d][0] += ghv * h_at(t - 1, i - 1);
          gw[d][1] += ghv * h_at(t - 1, i);
          if (i < ln.L - 1) gw[d][2] += ghv * h_at(t - 1, i + 1);
        }
      }
      gx[(int64_t(b) * s.C + c) * plane + pos] = from_acc<T>(gx_sum);
    }
    __syncthreads();  // stage c & 1 is consumed: channel c + 2 may overwrite it
  }
  if (!inside) return;

#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const Lines ln(d, s.H, s.W);
    int t, i;
    ln.locate(hh, ww, t, i);
    GG* out = ggates + ((int64_t(b) * 4 + d) * 3 * s.G + g) * plane + pos;  // tap k at k * G * plane
    const int64_t tap_stride = int64_t(s.G) * plane;
    if ((t % s.chunk) == 0) {
      if (slices == 1) out[0] = out[tap_stride] = out[2 * tap_stride] = from_acc<GG>(0.f);
      continue;
    }
    const T* logits = gates + b * s.gates_batch_stride + (int64_t(d) * 3 * s.G + g) * plane + pos;
    const Taps<float> taps(to_acc(logits[0]), to_acc(logits[tap_stride]), to_acc(logits[2 * tap_stride]), i > 0,
                           i < ln.L - 1);
    const float mean = taps.w(0) * gw[d][0] + taps.w(1) * gw[d][1] + taps.w(2) * gw[d][2];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const float v = taps.s[k] * (1.f - taps.s[k]) * taps.inv_sum * (gw[d][k] - mean);
      if (slices == 1) {
        out[k * tap_stride] = from_acc<GG>(v);
      } else if constexpr (std::is_same_v<GG, float>) {
        atomicAdd(out + k * tap_stride, v);
      }
    }
  }
}

}  // namespace gspn
