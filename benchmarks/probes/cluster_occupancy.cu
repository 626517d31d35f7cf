// Probe: how many multiprocessors thread-block clusters can occupy at once.
//
// The column scans split a plane of 1024 rows over a cluster of 4 blocks, one block per multiprocessor
// (their two stages fill the shared memory). A cluster must sit inside one GPC, so where a GPC's
// multiprocessor count is not a multiple of the cluster size, some of them stay idle while only such
// clusters run. This prints cudaOccupancyMaxActiveClusters for cluster sizes 1 to 8 and for blocks that
// take a whole multiprocessor's shared memory, half of it, or little, and how many multiprocessors the
// clusters then hold, against the blocks that fit without clusters.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -o /tmp/cluster_occupancy benchmarks/probes/cluster_occupancy.cu && /tmp/cluster_occupancy
#include <cstdio>
#include <cuda_runtime.h>

__global__ void idle(float* out) {
  extern __shared__ float smem[];
  if (out) out[blockIdx.x] = smem[threadIdx.x];
}

int main() {
  int device = 0, sms = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, device);
  std::printf("%s: %d multiprocessors, %d KB of shared memory per block at most\n", prop.name, sms, smem_optin / 1024);
  cudaFuncSetAttribute(idle, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin);
  cudaFuncSetAttribute(idle, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  const int threads = 416;  // the column scans' block: 12 scanning warps and the TMA warp
  const struct { const char* name; int smem; } blocks[] = {
      {"whole shared memory", smem_optin}, {"half of it", smem_optin / 2 - 1024}, {"8 KB", 8 * 1024}};
  std::printf("| block | cluster size | max active clusters | blocks held | blocks that fit unclustered |\n"
              "|---|---|---|---|---|\n");
  for (const auto& b : blocks) {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, idle, threads, b.smem);
    for (int size = 1; size <= 8; ++size) {
      cudaLaunchAttribute attribute = {};
      attribute.id = cudaLaunchAttributeClusterDimension;
      attribute.val.clusterDim.x = size;
      attribute.val.clusterDim.y = 1;
      attribute.val.clusterDim.z = 1;
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(size * sms);
      config.blockDim = dim3(threads);
      config.dynamicSmemBytes = b.smem;
      config.attrs = &attribute;
      config.numAttrs = 1;
      int clusters = 0;
      const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, idle, &config);
      if (err != cudaSuccess) {
        std::printf("| %s | %d | %s | |\n", b.name, size, cudaGetErrorString(err));
        cudaGetLastError();
        continue;
      }
      std::printf("| %s | %d | %d | %d | %d |\n", b.name, size, clusters, clusters * size, per_sm * sms);
    }
  }
  return 0;
}
