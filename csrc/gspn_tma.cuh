// Tensor-memory-accelerator (TMA) copies for the column scans: the host builds a tensor map per staged
// input, a 4-D view (w, h, plane, batch) of it; a block asks the TMA for a box of rows x columns of a
// plane, and an mbarrier tells it when the bytes have landed. One thread issues a whole group's copies,
// rows outside the tensor arrive as zeros, and the load/store units stay free for the scan itself (with
// cp.async, a warp's copies of 32 bytes from 16 different rows stalled the issuing warps).
#pragma once

#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace gspn {

// The staged inputs of a column scan (the tap inputs: gate logits or staged float32 weights; x or grad_y;
// lam or u; u), and y (forward) for the TMA stores (a map is unused where its tensor is null).
struct ColumnMaps {
  CUtensorMap taps, a0, a1, u, y;
};

template <typename T> constexpr CUtensorMapDataType tma_type();
template <> constexpr CUtensorMapDataType tma_type<float>() { return CU_TENSOR_MAP_DATA_TYPE_FLOAT32; }
template <> constexpr CUtensorMapDataType tma_type<__half>() { return CU_TENSOR_MAP_DATA_TYPE_FLOAT16; }
template <> constexpr CUtensorMapDataType tma_type<__nv_bfloat16>() { return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16; }

// cuTensorMapEncodeTiled from the driver, found at run time (no link against libcuda).
inline decltype(&cuTensorMapEncodeTiled) encode_tiled() {
  static const auto fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(p);
  }();
  return fn;
}

// The TMA's swizzle of boxes whose rows are `span` bytes (32, 64 or 128: CU_TENSOR_MAP_SWIZZLE_32B, 64B,
// 128B): 16-byte chunk c of row r lands in chunk c ^ (bits 7.. of the row's byte offset), so that the
// lanes of a warp, each reading chunk c of its own row, touch every bank once (unswizzled, rows of 32
// bytes took 2 passes per read and rows of 64 bytes 4). The pattern repeats every 8 rows: a box must
// start at a multiple of 8 * span bytes of shared memory.
__host__ __device__ constexpr int swizzled(int span, int r, int c) {
  return r * span + 16 * (c ^ ((r * span >> 7) & (span / 16 - 1)));
}
inline CUtensorMapSwizzle swizzle_for(int span) {
  return span == 32 ? CU_TENSOR_MAP_SWIZZLE_32B : span == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
}

// A map of `planes` H x W planes per batch item (batch items `batch_stride` elements apart), read in
// boxes of box_w columns x box_h rows, swizzled (box_w elements of T make the span). A null tensor leaves
// the map unused.
template <typename T>
cudaError_t column_map(CUtensorMap* map, const T* base, int B, long long planes, long long batch_stride, int H,
                       int W, int box_w, int box_h) {
  if (!base) return cudaSuccess;
  const auto encode = encode_tiled();
  if (!encode) return cudaErrorNotSupported;
  const cuuint64_t e = sizeof(T);
  const cuuint64_t dims[4] = {cuuint64_t(W), cuuint64_t(H), cuuint64_t(planes), cuuint64_t(B)};
  const cuuint64_t strides[3] = {W * e, cuuint64_t(H) * W * e, cuuint64_t(batch_stride) * e};
  const cuuint32_t box[4] = {cuuint32_t(box_w), cuuint32_t(box_h), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const int span = box_w * int(sizeof(T));
  if (span != 32 && span != 64 && span != 128) return cudaErrorInvalidValue;  // no swizzle for that span
  const CUresult r = encode(map, tma_type<T>(), 4, const_cast<T*>(base), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle_for(span),
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The device side needs sm_90 (the column kernel compiles to a trap below it).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(arrivals));
}
// Makes the initialised barriers visible to the TMA (the async proxy) and the cluster.
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::); }
// The one arrival of a phase, announcing the bytes its copies will bring.
__device__ __forceinline__ void mbarrier_expect(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}
// An L2 cache policy under which the lines an access touches are evicted first.
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
// The address of a shared-memory location (32-bit, this block's) in block `rank` of the cluster.
__device__ __forceinline__ unsigned cluster_address(unsigned address, int rank) {
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(address), "r"(rank));
  return remote;
}
// Stores v at `remote` (a cluster address) and counts its 4 bytes on the mbarrier at `remote_bar` (there).
__device__ __forceinline__ void store_remote(unsigned remote, float v, unsigned remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(remote),
               "r"(__float_as_uint(v)), "r"(remote_bar)
               : "memory");
}
// Box (w0.., h0.., plane, batch) of `map` into shared memory at dst, completing on bar. dst: 128-byte
// aligned, and a multiple of the swizzle's period (8 rows of the box) from where the pattern starts.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int w0, int h0, int plane, int batch,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(w0), "r"(h0), "r"(plane), "r"(batch), "r"(smem_address(bar))
      : "memory");
}
// Box of `map` at (w0.., h0.., plane, batch) from shared memory at src (aligned as tma_load's dst), as a bulk
// group of this thread. Only boxes inside the plane: one reaching past its ends in w stopped the kernel
// with an illegal instruction (H100), where loads are clipped. Evicted from L2 first: nothing here reads y
// again, while the input lines that the 128-byte L2 promotion of the loads brought in serve the next
// groups (H100, SDXL 16K level 1 column scans: 3.30 -> 2.62 GB read from DRAM, 1.72 -> 1.58 ms).
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int w0, int h0, int plane,
                                          int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group.L2::cache_hint [%0, {%2, %3, %4, %5}], [%1], %6;\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(smem_address(src)), "r"(w0), "r"(h0), "r"(plane), "r"(batch), "l"(l2_policy_evict_first())
      : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until this thread's bulk groups have read their shared memory (`read`), or are done.
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void tma_store_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Makes this thread's shared-memory writes visible to the TMA (the async proxy).
__device__ __forceinline__ void fence_shared_for_tma() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Named barrier kId (1 to 15; 0 is __syncthreads) of `threads` threads (whole warps): wait for them all,
// or only count this warp's arrival (its earlier shared-memory writes are visible to the waiters).
template <int kId>
__device__ __forceinline__ void barrier_sync(int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
template <int kId>
__device__ __forceinline__ void barrier_arrive(int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
#endif

}  // namespace gspn
