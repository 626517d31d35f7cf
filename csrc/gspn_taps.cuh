// The taps pass: the normalised tap weights of every (batch, direction, gate group, position), computed
// once, for the line-parallel scans of groups of many channels (gspn_api.h: staged_taps). Without it each
// block scanning channels of a group computes them again from the three logits, which is about half of a
// row scan's instructions (ncu, SDXL 16K level 1: ~25 instructions a position, 80 channels per group).
//
// taps (B, 4, 2, G, H, W) float32: w_0 and w_2 of `tap_weights` (zero where the tap reads outside the
// line); the scans take w_1 = 1 - w_0 - w_2.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

constexpr int kTapsQ = 4;  // consecutive positions of a row per thread

// One thread per kTapsQ positions of one (batch, direction, group) plane; W % kTapsQ == 0 and the gate
// planes start 4-element aligned (the line-parallel scans' alignment gives both).
template <typename T>
__global__ void taps_kernel(const T* __restrict__ gates, float* __restrict__ taps, Shape s, long long quads) {
  const long long q = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (q >= quads) return;
  const long long plane = (long long)s.H * s.W;
  const long long at = q * kTapsQ;  // in the (B, 4, G) planes of H x W
  const long long inside = at % plane, bdg = at / plane;
  const int g = int(bdg % s.G), d = int(bdg / s.G % 4), b = int(bdg / s.G / 4);
  const int hh = int(inside / s.W), w0 = int(inside % s.W);
  const T* logits = gates + b * s.gates_batch_stride + (int64_t(d) * 3 * s.G + g) * plane + inside;
  float lg[3][kTapsQ];
#pragma unroll
  for (int k = 0; k < 3; ++k) load_pack<T, kTapsQ>(logits + k * s.G * plane, lg[k]);
  float w0s[kTapsQ], w2s[kTapsQ];
  const bool columns = d < 2;  // the line index i is h there, w in the rows
  const int L = columns ? s.H : s.W;
#pragma unroll
  for (int p = 0; p < kTapsQ; ++p) {
    const int i = columns ? hh : w0 + p;
    float w[3];
    tap_weights(lg[0][p], lg[1][p], lg[2][p], i > 0, i < L - 1, w);
    w0s[p] = w[0], w2s[p] = w[2];
  }
  float* out = taps + ((int64_t(b) * 4 + d) * 2 * s.G + g) * plane + inside;
  store_pack<float, kTapsQ>(out, w0s);
  store_pack<float, kTapsQ>(out + s.G * plane, w2s);
}

template <typename T>
cudaError_t launch_taps(const T* gates, float* taps, const Shape& s, cudaStream_t stream) {
  const long long quads = (long long)s.B * 4 * s.G * s.H * s.W / kTapsQ;
  const unsigned threads = 256;
  const long long blocks = (quads + threads - 1) / threads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  taps_kernel<T><<<unsigned(blocks), threads, 0, stream>>>(gates, taps, s, quads);
  return cudaGetLastError();
}

}  // namespace gspn
