// Probe: what one scan step costs when a line is split across the blocks of a thread-block cluster.
//
// Splitting a long column over several multiprocessors would let each stage more bytes per row (see
// column_access.cu), but every step then needs the edge values of the neighbouring blocks. Each step
// here stores one value into the next block's shared memory and waits on the cluster barrier (whole,
// or split into arrive / independent work / wait), against __syncthreads inside one block; `work` is
// a chain of dependent FMAs standing in for a step's arithmetic. One block per multiprocessor.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -o /tmp/cluster_exchange benchmarks/probes/cluster_exchange.cu && /tmp/cluster_exchange
#include <cooperative_groups.h>
#include <cstdio>
#include <cuda_runtime.h>

namespace cg = cooperative_groups;

enum Mode { kBlockBarrier = 0, kClusterSync = 1, kClusterSplit = 2 };

template <int MODE>
__global__ void steps(float* out, int iters, int work) {
  extern __shared__ float edge[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), blocks = cluster.num_blocks();
  float v = threadIdx.x, acc = 0.f;
  for (int it = 0; it < iters; ++it) {
    const int parity = it & 1;
    if (MODE == kBlockBarrier) {
      if (threadIdx.x == 0) edge[parity] = v;
      __syncthreads();
    } else {
      if (threadIdx.x == 0) cluster.map_shared_rank(edge, (rank + 1) % blocks)[parity] = v;
      if (MODE == kClusterSync) {
        cluster.sync();
      } else {
        asm volatile("barrier.cluster.arrive.release.aligned;\n" ::);
        for (int w = 0; w < work; ++w) v = v * 1.0001f + 0.5f;
        asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::);
      }
    }
    acc += edge[parity];
    if (MODE != kClusterSplit)
      for (int w = 0; w < work; ++w) v = v * 1.0001f + 0.5f;
  }
  if (acc == 1.2345f) out[0] = acc + v;
}

template <int MODE>
double nanoseconds_per_step(int cluster_size, int work, int sms, float* out) {
  constexpr int kShared = 150 * 1024, kIters = 20000;
  cudaFuncSetAttribute(steps<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared);
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster_size;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(sms / cluster_size * cluster_size);
  config.blockDim = dim3(256);
  config.dynamicSmemBytes = kShared;
  config.attrs = &attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, steps<MODE>, out, 100, work);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start);
  cudaLaunchKernelEx(&config, steps<MODE>, out, kIters, work);
  cudaEventRecord(stop);
  cudaEventSynchronize(stop);
  float ms;
  cudaEventElapsedTime(&ms, start, stop);
  return ms * 1e6 / kIters;
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  float* out;
  if (cudaMalloc(&out, 64) != cudaSuccess) return 1;
  printf("%s: ns per step, 256 threads per block\n", prop.name);
  printf("| work (FMAs) | block barrier | cluster 2 sync | cluster 2 split | cluster 4 sync | cluster 4 split |\n");
  printf("|---|---|---|---|---|---|\n");
  for (int work : {0, 64, 256}) {
    printf("| %d | %.0f |", work, nanoseconds_per_step<kBlockBarrier>(1, work, prop.multiProcessorCount, out));
    for (int size : {2, 4})
      printf(" %.0f | %.0f |", nanoseconds_per_step<kClusterSync>(size, work, prop.multiProcessorCount, out),
             nanoseconds_per_step<kClusterSplit>(size, work, prop.multiProcessorCount, out));
    printf("\n");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) printf("CUDA error: %s\n", cudaGetErrorString(err));
  return err != cudaSuccess;
}
