// Probe: the DRAM bandwidth of the column scans' access pattern (directions 0 and 1 of gspn_propagate).
//
// A column scan walks across rows: per group of steps it reads, from every row of a plane, the few
// contiguous bytes of those steps. Each block here walks one 1024 x 1024 float32 plane of 6 tensors that
// way, with about 96 KB of cp.async copies in flight (one group, like the kernels), and only reads. The
// table gives the read bandwidth per bytes-per-row and number of resident blocks (one per
// multiprocessor): 16 bytes per row reach a quarter of what 64 bytes reach once more than ~44 blocks
// run, because the L2 then no longer holds the rest of each 64-byte DRAM fetch until the next group.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -o /tmp/column_access benchmarks/probes/column_access.cu && /tmp/column_access
#include <cstdio>
#include <cuda_runtime.h>

constexpr int kRows = 1024, kCols = 1024, kTensors = 6, kPlanes = 128;
constexpr int kShared = 200 * 1024;  // one block per multiprocessor

__device__ __forceinline__ void copy16(void* smem, const float* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

// blockDim.x = 1024 / VECS threads, one row each per iteration: 6 tensors x VECS x 16 B per thread.
template <int VECS>
__global__ void columns(const float* __restrict__ in, float* out) {
  extern __shared__ float4 staging[];
  float acc = 0.f;
  for (int plane = blockIdx.x; plane < kPlanes; plane += gridDim.x)
    for (int c0 = 0; c0 < kCols; c0 += VECS * 4)
      for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
#pragma unroll
        for (int k = 0; k < kTensors; ++k) {
          const float* p = in + ((size_t(plane) * kTensors + k) * kRows + r) * kCols + c0;
#pragma unroll
          for (int q = 0; q < VECS; ++q) copy16(staging + (threadIdx.x * kTensors + k) * VECS + q, p + 4 * q);
        }
        asm volatile("cp.async.wait_all;\n" ::);
        acc += staging[threadIdx.x * kTensors * VECS].x;
      }
  if (acc == 1.2345f) out[0] = acc;  // keeps the loads
}

template <int VECS>
double gigabytes_per_second(int grid, const float* in, float* out) {
  cudaFuncSetAttribute(columns<VECS>, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared);
  columns<VECS><<<grid, 1024 / VECS, kShared>>>(in, out);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start);
  for (int i = 0; i < 3; ++i) columns<VECS><<<grid, 1024 / VECS, kShared>>>(in, out);
  cudaEventRecord(stop);
  cudaEventSynchronize(stop);
  float ms;
  cudaEventElapsedTime(&ms, start, stop);
  return 3.0 * kPlanes * kTensors * kRows * kCols * 4 / (ms * 1e-3) / 1e9;
}

int main() {
  const size_t n = size_t(kPlanes) * kTensors * kRows * kCols;
  float *in, *out;
  if (cudaMalloc(&in, n * 4) != cudaSuccess || cudaMalloc(&out, 64) != cudaSuccess) return 1;
  cudaMemset(in, 0, n * 4);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("%s: column-scan reads, %d planes x %d tensors x %dx%d float32, GB/s read\n", prop.name, kPlanes, kTensors,
         kRows, kCols);
  const int grids[] = {22, 44, 66, prop.multiProcessorCount};
  printf("| bytes per row |");
  for (int g : grids) printf(" %d blocks |", g);
  printf("\n|---|---|---|---|---|\n");
  printf("| 16 |");
  for (int g : grids) printf(" %.0f |", gigabytes_per_second<1>(g, in, out));
  printf("\n| 32 |");
  for (int g : grids) printf(" %.0f |", gigabytes_per_second<2>(g, in, out));
  printf("\n| 64 |");
  for (int g : grids) printf(" %.0f |", gigabytes_per_second<4>(g, in, out));
  printf("\n| 128 |");
  for (int g : grids) printf(" %.0f |", gigabytes_per_second<8>(g, in, out));
  printf("\n");
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) printf("CUDA error: %s\n", cudaGetErrorString(err));
  return err != cudaSuccess;
}
