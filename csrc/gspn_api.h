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

// y = u * h (y = h when u is null); h_out (may be null) receives the state h in float32, for the
// backward: each (b, d, c) plane of a row direction in its own H x W layout, of a column direction in
// tiles of 4 columns, each H x 4 row-major (Lines::state_offset).
// `aligned`: every pointer is 16-byte aligned (the line-parallel kernels need it).
template <typename T>
cudaError_t launch_forward(const T* x, const T* gates, const T* lam, const T* u, T* y, float* h_out, Shape s,
                           bool aligned, cudaStream_t stream);

// The backward's gradient pass sums the gate gradients of up to kGradChannels channels of a group in one
// block; larger groups add the partial sums of their channel slices atomically, in float32.
constexpr int kGradChannels = 16;
inline bool gate_gradients_in_float32(const Shape& s) { return s.C / s.G > kGradChannels; }

// The backward: gh (float32, (B, 4, C, H, W)) is scratch for the adjoint state (laid out as h); gx takes
// x's shape and dtype; ggates (B, 4, 3, G, H, W) is float32 when gate_gradients_in_float32(s), else of
// type T; glam and gu (null when u is) lam's shape. h is the forward's float32 state.
template <typename T>
cudaError_t launch_backward(const T* gy, const T* x, const T* gates, const T* lam, const T* u, const float* h,
                            float* gh, T* gx, void* ggates, T* glam, T* gu, Shape s, bool aligned,
                            cudaStream_t stream);

}  // namespace gspn
