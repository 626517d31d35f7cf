// Host-side launchers: pick the scan kernel (line-parallel fast path or generic) and its block shape,
// then launch; the backward is the adjoint scan followed by the gradient pass.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <cuda_runtime.h>

#include "gspn_gradients.cuh"
#include "gspn_columns.cuh"
#include "gspn_rows.cuh"
#include "gspn_scan.cuh"
#include "gspn_taps.cuh"

namespace gspn {

// Positions per thread so that `longest` positions fit in `max_threads` threads (a power of two).
inline int positions_per_thread(int longest, int max_threads) {
  int p = 1;
  while (p * max_threads < longest) p *= 2;
  return p;
}

// Whether every non-null pointer is a multiple of `bytes`.
inline bool aligned_to(size_t bytes, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  return true;
}

// Lets `kernel` take `smem` bytes of dynamic shared memory (an opt-in past 48 KB).
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, size_t smem) {
  return smem > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem))
                          : cudaSuccess;
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 blocks, dim3 threads, size_t smem, cudaStream_t stream, void** args) {
  if (const cudaError_t err = allow_shared_memory(kernel, smem); err != cudaSuccess) return err;
  const cudaError_t err = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), blocks, threads, args, smem, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// The same, in clusters of `cluster` blocks along x.
template <typename Kernel>
cudaError_t launch_clusters(Kernel kernel, unsigned blocks, unsigned cluster, unsigned threads, size_t smem,
                            cudaStream_t stream, void** args) {
  if (const cudaError_t err = allow_shared_memory(kernel, smem); err != cudaSuccess) return err;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(kernel), args);
  return err != cudaSuccess ? err : cudaGetLastError();
}

#define GSPN_SWITCH_P(P_VALUE, ...)                       \
  switch (P_VALUE) {                                      \
    case 1: { constexpr int P = 1; __VA_ARGS__; break; }  \
    case 2: { constexpr int P = 2; __VA_ARGS__; break; }  \
    case 4: { constexpr int P = 4; __VA_ARGS__; break; }  \
    default: { constexpr int P = 8; __VA_ARGS__; break; } \
  }

// Whether the current device has thread-block clusters and the TMA (sm_90 on), which the column scans use.
inline bool has_clusters() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major >= 9;
}

// The column scans of the line-parallel path: TMA maps of the staged inputs, then clusters of blocks.
template <typename T, bool kAdjoint, int K, bool kTaps>
cudaError_t launch_columns(const T* x, const T* gates, const float* taps, const T* lam, const T* u, T* y,
                           float* state, Shape s, cudaStream_t stream) {
  const ColumnSplit split(s.H);
  const int box_w = column_steps<T, K, kTaps>(), box_h = split.box_rows;
  const long long dense = 4LL * s.C * s.H * s.W;  // a (4, C, H, W) batch item
  ColumnMaps maps = {};
  // gates (B, 4 * 3 * G planes) or taps (B, 4 * 2 * G); x (B, C) or grad_y (B, 4 * C); lam or u, and u:
  // (B, 4 * C).
  cudaError_t err =
      kTaps ? column_map<float>(&maps.taps, taps, s.B, 8LL * s.G, 8LL * s.G * s.H * s.W, s.H, s.W, box_w, box_h)
            : column_map<T>(&maps.taps, gates, s.B, 12LL * s.G, s.gates_batch_stride, s.H, s.W, box_w, box_h);
  if (err == cudaSuccess)
    err = kAdjoint ? column_map<T>(&maps.a0, x, s.B, 4LL * s.C, dense, s.H, s.W, box_w, box_h)
                   : column_map<T>(&maps.a0, x, s.B, s.C, (long long)s.C * s.H * s.W, s.H, s.W, box_w, box_h);
  const T* a1 = kAdjoint ? u : lam;
  const long long a1_stride = kAdjoint ? s.u_batch_stride : s.lam_batch_stride;
  if (err == cudaSuccess) err = column_map<T>(&maps.a1, a1, s.B, 4LL * s.C, a1_stride, s.H, s.W, box_w, box_h);
  if (err == cudaSuccess && !kAdjoint)
    err = column_map<T>(&maps.u, u, s.B, 4LL * s.C, s.u_batch_stride, s.H, s.W, box_w, box_h);
  if (err == cudaSuccess && !kAdjoint)  // y goes out in boxes of a band
    err = column_map<T>(&maps.y, y, s.B, 4LL * s.C, dense, s.H, s.W, box_w, split.band);
  if (err != cudaSuccess) return err;
  void* args[] = {&maps, &x, &gates, &taps, &lam, &u, &y, &state, &s};
  const unsigned blocks = unsigned(s.B) * 2 * s.C / K * split.cluster;
  return launch_clusters(columns_scan_kernel<T, kAdjoint, K, kTaps>, blocks, split.cluster, split.threads(),
                         columns_smem<T, K, kTaps>(split), stream, args);
}

// The line-parallel scans: the row scans on streams.main, the column scans on streams.side.
template <typename T, bool kAdjoint, int K, bool kTaps>
cudaError_t launch_lines(const T* x, const T* gates, const float* taps, const T* lam, const T* u, T* y,
                         float* state, Shape s, Streams streams) {
  const unsigned blocks = unsigned(s.B) * 2 * s.C / K;  // (batch, direction of the pair, K channels)
  const int q = row_positions(s.W);
  const int threads = ((s.W + q - 1) / q + 31) / 32 * 32;
  const size_t smem = rows_smem(threads, q, sizeof(T), K, kAdjoint, kTaps);
  void* args[] = {&x, &gates, &taps, &lam, &u, &y, &state, &s};
  auto rows = [&](auto kernel) { return launch(kernel, blocks, threads, smem, streams.main, args); };
  cudaError_t err = q == 2 ? rows(rows_scan_kernel<T, kAdjoint, K, kTaps, 2>)
                           : rows(rows_scan_kernel<T, kAdjoint, K, kTaps, 4>);
  return err == cudaSuccess ? launch_columns<T, kAdjoint, K, kTaps>(x, gates, taps, lam, u, y, state, s, streams.side)
                            : err;
}

// Makes `later` wait for the work queued so far on `earlier`.
inline cudaError_t stream_wait(cudaStream_t later, cudaStream_t earlier) {
  cudaEvent_t event;
  cudaError_t err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  if (err != cudaSuccess) return err;
  err = cudaEventRecord(event, earlier);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(later, event, 0);
  const cudaError_t destroyed = cudaEventDestroy(event);  // released once the wait is done
  return err != cudaSuccess ? err : destroyed;
}

// One scan of every line of every (batch, direction, channel): the forward or the adjoint (arguments as
// rows_scan_kernel's; `taps` the scratch of gspn_api.h, or null). On sm_90 and later, 16-byte-aligned grids
// with lines of up to 1024 positions take two launches, the row scans (2 or 4 positions per thread) and the
// column scans (clusters of blocks with one row per thread), the column scans on streams.side (gspn_api.h:
// Streams), after the taps pass where staged_taps(s); the generic kernel takes the rest.
// (H100, forward with the column scans on a second stream: SDXL 8K level 1 1.04 -> 0.92 ms, 16K level 1
// 3.31 -> 3.02 ms. The row scans of those shapes are 160 blocks on 132 multiprocessors: 28 take two, and
// without a second stream the others wait idle for them.)
template <typename T, bool kAdjoint>
cudaError_t launch_scan(const T* x, const T* gates, float* taps, const T* lam, const T* u, T* y, float* state,
                        Shape s, bool aligned, Streams streams) {
  const cudaStream_t stream = streams.main;
  const int longest = std::max(s.H, s.W);
  // The line-parallel kernels copy 16-byte pieces of every plane: every plane must start 16-byte aligned.
  const long long vec = 16 / int(sizeof(T));
  const bool planes_aligned = aligned && s.W % vec == 0 && s.gates_batch_stride % vec == 0 &&
                              s.lam_batch_stride % vec == 0 && s.u_batch_stride % vec == 0;
  if (planes_aligned && s.W <= kRowMaxLine && s.H <= kBand * kColumnMaxBlocks && has_clusters()) {
    const int K = channels_per_block(s.C, s.G);
    const bool staged = taps && staged_taps(s);
    cudaError_t err = staged ? launch_taps<T>(gates, taps, s, stream) : cudaSuccess;
    const bool forked = streams.side != streams.main;
    if (err == cudaSuccess && forked) err = stream_wait(streams.side, stream);
    if (err == cudaSuccess) {
      if (staged)
        err = K == 2 ? launch_lines<T, kAdjoint, 2, true>(x, gates, taps, lam, u, y, state, s, streams)
                     : launch_lines<T, kAdjoint, 1, true>(x, gates, taps, lam, u, y, state, s, streams);
      else
        err = K == 2 ? launch_lines<T, kAdjoint, 2, false>(x, gates, nullptr, lam, u, y, state, s, streams)
                     : launch_lines<T, kAdjoint, 1, false>(x, gates, nullptr, lam, u, y, state, s, streams);
    }
    if (err == cudaSuccess && forked) err = stream_wait(stream, streams.side);
    return err;
  }
  cudaError_t err = cudaSuccess;
  void* args[] = {&x, &gates, &lam, &u, &y, &state, &s};
  const int p = positions_per_thread(longest, kMaxThreads);
  const int threads = std::min(kMaxThreads, ((longest + p - 1) / p + 31) / 32 * 32);
  GSPN_SWITCH_P(p, err = launch(scan_kernel<T, P, kAdjoint>, s.B * 4 * s.C, threads, scan_smem(longest, kAdjoint),
                                stream, args));
  return err;
}

template <typename T>
cudaError_t launch_forward(const T* x, const T* gates, const T* lam, const T* u, T* y, float* h, float* taps, Shape s,
                           bool aligned, Streams streams) {
  return launch_scan<T, false>(x, gates, taps, lam, u, y, h, s, aligned, streams);
}

template <typename T>
cudaError_t launch_backward(const T* gy, const T* x, const T* gates, const T* lam, const T* u, const float* h,
                            float* gh, T* gx, void* ggates, T* glam, T* gu, float* taps, Shape s, bool aligned,
                            cudaStream_t stream) {
  // On one stream: with the column scans on a second one, the adjoint of the SDXL 4K cases took 7% longer
  // (H100, forward + backward 1.05 -> 1.12 ms), while the forward gained.
  cudaError_t err = launch_scan<T, true>(gy, gates, taps, nullptr, u, nullptr, gh, s, aligned, {stream, stream});
  if (err != cudaSuccess) return err;
  const bool summed = gate_gradients_in_float32(s);  // several slices per group, added atomically
  if (summed) {
    err = cudaMemsetAsync(ggates, 0, size_t(s.B) * 12 * s.G * s.H * s.W * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  void* args[] = {&gy, &x, &gates, &lam, &u, &h, &gh, &gx, &ggates, &glam, &gu, &s};
  // Four positions per thread where every plane starts 4-element (and the states 16-byte) aligned.
  const bool by_four = s.W % 4 == 0 && s.lam_batch_stride % 4 == 0 && s.gates_batch_stride % 4 == 0 &&
                       aligned_to(4 * sizeof(T), {gy, x, gates, lam, u, gx, glam, gu}) &&
                       aligned_to(16, {h, gh, ggates});
  const int P = by_four ? 4 : 1;
  const int64_t blocks = int64_t(s.B) * s.G * gradient_slices(s) * gradient_tiles(s, P);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned threads = 32 * kGradRows;
  const size_t smem = gradients_smem<T>(P);
  if (summed)
    return by_four ? launch(gradients_kernel<T, float, 4>, unsigned(blocks), threads, smem, stream, args)
                   : launch(gradients_kernel<T, float, 1>, unsigned(blocks), threads, smem, stream, args);
  return by_four ? launch(gradients_kernel<T, T, 4>, unsigned(blocks), threads, smem, stream, args)
                 : launch(gradients_kernel<T, T, 1>, unsigned(blocks), threads, smem, stream, args);
}

#define GSPN_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_forward<T>(const T*, const T*, const T*, const T*, T*, float*, float*, Shape, bool, \
                                         Streams);                                                               \
  template cudaError_t launch_backward<T>(const T*, const T*, const T*, const T*, const T*, const float*, float*,  \
                                          T*, void*, T*, T*, float*, Shape, bool, cudaStream_t);

}  // namespace gspn
