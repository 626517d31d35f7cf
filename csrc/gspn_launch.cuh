// Host-side launchers: pick the kernel (staged fast path or generic) and its block shape, then launch.
#pragma once

#include <algorithm>
#include <cuda_runtime.h>

#include "gspn_backward.cuh"
#include "gspn_forward.cuh"
#include "gspn_lines.cuh"
#include "gspn_staged.cuh"

namespace gspn {

// Positions per thread so that `longest` positions fit in `max_threads` threads (a power of two).
inline int positions_per_thread(int longest, int max_threads) {
  int p = 1;
  while (p * max_threads < longest) p *= 2;
  return p;
}

inline int threads_for(int longest, int p, int max_threads) {
  const int per_thread = (longest + p - 1) / p;
  return std::min(max_threads, (per_thread + 31) / 32 * 32);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int blocks, int threads, size_t smem, cudaStream_t stream, void** args) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err =
      cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(threads), args, smem, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

#define GSPN_SWITCH_P(P_VALUE, ...)                       \
  switch (P_VALUE) {                                      \
    case 1: { constexpr int P = 1; __VA_ARGS__; break; }  \
    case 2: { constexpr int P = 2; __VA_ARGS__; break; }  \
    case 4: { constexpr int P = 4; __VA_ARGS__; break; }  \
    default: { constexpr int P = 8; __VA_ARGS__; break; } \
  }

// The staged kernels need rows of whole 16-byte chunks, lines of at most 4096 positions and, per group,
// copies of at least 4 bytes (cp.async's smallest) per thread, position and tensor (vector_bytes / P).
template <typename T>
inline bool staged_fits(const Shape& s, int vector_bytes, bool aligned) {
  const int longest = std::max(s.H, s.W);
  const int p = positions_per_thread(longest, kStagedThreads);
  return aligned && s.W % (16 / int(sizeof(T))) == 0 && longest <= 4 * kStagedThreads &&
         vector_bytes / p >= 4;
}

// Column span of the line-parallel forward, measured on an H100: column scans that read 16 bytes per row
// and tensor at a time get ~25% of the DRAM bandwidth, 32 bytes ~50%, 64 bytes ~95%; but a wider group
// takes shared memory that would hold more blocks per multiprocessor, which the row scans need. Two
// vectors win for lines of up to 512 positions (SDXL 8K level 1: 2.11 -> 1.79 ms), four lose everywhere.
inline int default_column_span(int threads) { return threads <= 128 ? 2 : 1; }

template <typename T>
cudaError_t launch_forward(const T* x, const T* gates, const T* lam, const T* u, T* y, float* h, Shape s, bool aligned,
                           cudaStream_t stream) {
  const int longest = std::max(s.H, s.W);
  void* args[] = {&x, &gates, &lam, &u, &y, &h, &s};
  // Line-parallel kernel (lines up to 1024): 4 positions per thread, two stages of 6 tensors x 16 bytes
  // x column span per position in shared memory.
  const int line_threads = ((longest + kLineQ - 1) / kLineQ + 31) / 32 * 32;
  if (aligned && s.W % (16 / int(sizeof(T))) == 0 && line_threads <= kLineMaxThreads) {
    if (s.column_span <= 0) s.column_span = default_column_span(line_threads);
    while (s.column_span > 1 && lines_smem(line_threads, s.column_span) > kSharedLimit) s.column_span /= 2;
    return launch(lines_forward_kernel<T>, s.B * 4 * s.C, line_threads, lines_smem(line_threads, s.column_span),
                  stream, args);
  }
  cudaError_t err = cudaSuccess;
  const int p = positions_per_thread(longest, kMaxThreads);
  const int threads = threads_for(longest, p, kMaxThreads);
  const size_t smem = size_t(2) * (longest + 2) * sizeof(float);
  GSPN_SWITCH_P(p, err = launch(forward_kernel<T, 1, P>, s.B * 4 * s.C, threads, smem, stream, args));
  return err;
}

// The generic and staged kernels can scan CB channels of a gate group per block (sharing the gate loads);
// the launchers use one: two halved the blocks per multiprocessor and measured 1.0-2.0x slower on an H100
// (SDXL backward, 4K level 1: 2.49 -> 4.56 ms; 16K level 2: 21.5 -> 30.2 ms; paper shape G=1: equal).
template <typename T>
cudaError_t launch_backward(const T* gy, const T* x, const T* gates, const T* lam, const T* u, const float* h,
                            float* gx_dir, float* ggates, T* glam, T* gu, Shape s, bool aligned, cudaStream_t stream) {
  const int longest = std::max(s.H, s.W);
  void* args[] = {&gy, &x, &gates, &lam, &u, &h, &gx_dir, &ggates, &glam, &gu, &s};
  cudaError_t err = cudaSuccess;
  if (staged_fits<T>(s, 8, aligned)) {
    const int p = positions_per_thread(longest, kStagedThreads);
    const int threads = threads_for(longest, p, kStagedThreads);
    // two stages of, per thread, 8 / P bytes of each of the 7 T tensors and the float32 state at the same
    // steps; then the 9 line buffers
    const int state_bytes = 8 / p / int(sizeof(T)) * 4 * p;
    const size_t smem = size_t(2) * (7 * 8 + state_bytes) * threads + size_t(9) * (longest + 2) * 4;
    GSPN_SWITCH_P(p, if constexpr (8 / P >= 4) err = launch(staged_backward_kernel<T, 1, P>, s.B * 4 * s.C, threads,
                                                            smem, stream, args));
    return err;
  }
  const int p = positions_per_thread(longest, kMaxThreads);
  const int threads = threads_for(longest, p, kMaxThreads);
  const size_t smem = size_t(9) * (longest + 2) * sizeof(float);
  GSPN_SWITCH_P(p, err = launch(backward_kernel<T, 1, P>, s.B * 4 * s.C, threads, smem, stream, args));
  return err;
}

#define GSPN_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_forward<T>(const T*, const T*, const T*, const T*, T*, float*, Shape, bool,          \
                                         cudaStream_t);                                                        \
  template cudaError_t launch_backward<T>(const T*, const T*, const T*, const T*, const T*, const float*, float*, \
                                          float*, T*, T*, Shape, bool, cudaStream_t);

}  // namespace gspn
