// What the torch binding (host C++) sees of the CUDA side: the problem shape and the launchers.
#pragma once

#include <cuda_runtime.h>

namespace gspn {

constexpr int kMaxThreads = 512;           // threads of the generic kernels
constexpr int kMaxLine = 8 * kMaxThreads;  // longest line: 8 positions per thread

// x (B, C, H, W); gates (B, 4, 3, G, H, W); lam, u, y, h (B, 4, C, H, W). Every tensor is contiguous
// inside one batch item; gates, lam and u may have a larger batch stride (views of one wider tensor).
struct Shape {
  int B, C, H, W, G;
  int chunk;           // lines per chunk; a value above max(H, W) means global propagation
  long long gates_batch_stride, lam_batch_stride, u_batch_stride;  // in elements
};

// The streams the kernels run on: all on `main` but the column scans, which run on `side` concurrently
// with the row scans (both only read the inputs, and they write disjoint planes), so that each fills the
// multiprocessors the other's last blocks leave idle. side == main runs them one after the other.
struct Streams {
  cudaStream_t main, side;
};

// Gate groups of at least kTapsMinChannels channels have their normalised tap weights computed once per
// (batch, direction, group, position) by a pass of their own, into `taps` (B, 4, 2, G, H, W) float32 (w_0
// and w_2; w_1 = 1 - w_0 - w_2), which the line-parallel scans then read instead of the three logits:
// otherwise every block scanning channels of the group computes them again (gspn_taps.cuh).
constexpr int kTapsMinChannels = 4;
inline bool staged_taps(const Shape& s) { return s.C / s.G >= kTapsMinChannels; }

// y = u * h (y = h when u is null); h_out (may be null) receives the state h in float32, for the
// backward: each (b, d, c) plane of a row direction in its own H x W layout, of a column direction in
// tiles of 4 columns, each H x 4 row-major (Lines::state_offset).
// `aligned`: every pointer is 16-byte aligned (the line-parallel kernels need it). `taps`: scratch of
// (B, 4, 2, G, H, W) float32 where staged_taps(s), else null.
template <typename T>
cudaError_t launch_forward(const T* x, const T* gates, const T* lam, const T* u, T* y, float* h_out, float* taps,
                           Shape s, bool aligned, Streams streams);

#if defined(__CUDACC__)
#define GSPN_HOST_DEVICE __host__ __device__
#else
#define GSPN_HOST_DEVICE
#endif

// The backward's gradient pass: a block takes a tile of kGradRows rows x 32 P columns (P = 4 on aligned
// grids, else 1; gspn_gradients.cuh) and a slice of one gate group's channels, and sums their gate
// gradients itself. A group is split into slices only where the grid holds fewer than kGradBlocks tiles
// of kGradRows x 128 positions, whatever P the launch takes (so a P = 1 grid, of 4x as many narrower
// blocks, gets the slices of an aligned grid of its size); its slices then add their partial sums
// atomically, in float32. (H100, SDXL: 16K level 1 takes one slice of 80 channels, 5.17 ms against 5.50
// with slices of 16; 4K level 2 needs its slices, 0.22 ms against 0.43 with whole groups.)
constexpr int kGradRows = 8;
constexpr long long kGradBlocks = 512;

// Channels of a slice (the last slice of a group may have fewer). Host and device must agree on it
// without knowing P: the binding picks ggates' dtype from it.
GSPN_HOST_DEVICE inline int gradient_slice_channels(const Shape& s) {
  const long long tiles = (long long)s.B * s.G * ((s.H + kGradRows - 1) / kGradRows) * ((s.W + 127) / 128);
  const int per_group = s.C / s.G;
  const long long wanted = (kGradBlocks + tiles - 1) / tiles;  // slices
  return wanted >= per_group ? 1 : int((per_group + wanted - 1) / wanted);
}
GSPN_HOST_DEVICE inline int gradient_slices(const Shape& s) {
  const int channels = gradient_slice_channels(s);
  return (s.C / s.G + channels - 1) / channels;
}
inline bool gate_gradients_in_float32(const Shape& s) { return gradient_slices(s) > 1; }

// The backward: gh (float32, (B, 4, C, H, W)) is scratch for the adjoint state (laid out as h); gx takes
// x's shape and dtype; ggates (B, 4, 3, G, H, W) is float32 when gate_gradients_in_float32(s), else of
// type T; glam and gu (null when u is) lam's shape. h is the forward's float32 state; taps as the
// forward's.
template <typename T>
cudaError_t launch_backward(const T* gy, const T* x, const T* gates, const T* lam, const T* u, const float* h,
                            float* gh, T* gx, void* ggates, T* glam, T* gu, float* taps, Shape s, bool aligned,
                            cudaStream_t stream);

}  // namespace gspn
