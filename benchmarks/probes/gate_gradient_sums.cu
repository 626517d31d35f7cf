// Probe: what summing the gate gradients over a gate group's channels would cost inside a fused backward.
//
// A backward that fused the adjoint scan with the gradient pass (so that the float32 adjoint state gh
// never goes to memory) would hold gh only for the K channels a block scans, while the gate gradient of
// a position sums gh_t[i] h_{t-1}[i+k-1] over all of its gate group's channels (gspn_gradients.cuh): with
// the SDXL settings (G = 1, 80 or 160 channels, two a block) 40 or 80 blocks would each contribute a
// partial sum of 3 float32 per position and line. This times that traffic alone, without any scan:
// every block walks the T lines of its plane and, per line, adds its partial sums for all W positions
// (one float4 per thread and tap) to the (plane, tap, line, position) float32 buffer,
//   - atomic, lockstep: with float4 atomics (red.global.add.v4.f32), the blocks of a plane on the same
//     line at about the same time, as blocks launched together would scan;
//   - atomic, scattered: the same, each block starting at its own line (no two of a plane's blocks near
//     each other), as blocks of later waves would;
//   - partials stored: each block writes its partial sums to a buffer of its own (the alternative to the
//     atomics, which a later pass would then have to read back and add);
// against the time the gradient pass spends (docs/kernels.md) and against moving the summed buffer once.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -o /tmp/gate_gradient_sums benchmarks/probes/gate_gradient_sums.cu && /tmp/gate_gradient_sums
#include <cstdio>
#include <cuda_runtime.h>

constexpr int kThreads = 256;
constexpr int kTaps = 3;

enum Mode { kLockstep, kScattered, kPartials };

// Block b contributes to plane b / contributors. Thread k owns positions 4k .. 4k+3 of every line.
__global__ void contribute(float* sums, float* partials, int lines, int width, int contributors, Mode mode) {
  const int plane = blockIdx.x / contributors, member = blockIdx.x % contributors;
  const int vectors = width / 4;
  const int start = mode == kScattered ? member * lines / contributors : 0;
  float4 v = make_float4(1.f + member, 2.f, 3.f, 4.f);
  for (int n = 0; n < lines; ++n) {
    const int t = (start + n) % lines;
    for (int q = threadIdx.x; q < vectors; q += blockDim.x)
#pragma unroll
      for (int k = 0; k < kTaps; ++k) {
        v.x += 1e-7f;  // a value the compiler cannot hoist out of the loop
        if (mode == kPartials) {
          float4* out = reinterpret_cast<float4*>(partials) +
                        ((size_t(blockIdx.x) * kTaps + k) * lines + t) * vectors + q;
          __stcs(out, v);
        } else {
          float4* out = reinterpret_cast<float4*>(sums) + ((size_t(plane) * kTaps + k) * lines + t) * vectors + q;
          atomicAdd(out, v);
        }
      }
  }
}

__global__ void copy(const float4* in, float4* out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = in[i];
}

template <typename Launch>
float time_ms(Launch launch, int repeats = 5) {
  launch();  // warm-up
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int r = 0; r < repeats; ++r) launch();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / repeats;
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("%s, %d multiprocessors, %d MB of L2\n\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  // (name, planes = batch x 4 directions, lines, width, blocks a plane's sums come from)
  const struct { const char* name; int planes, lines, width, contributors; } cases[] = {
      {"SDXL 16K level 1 (C 80)", 8, 1024, 1024, 40},
      {"SDXL 16K level 2 (C 160)", 8, 512, 512, 80},
      {"SDXL 8K level 1 (C 80)", 8, 512, 512, 40},
      {"slices of 16 channels, 16K level 1", 8, 1024, 1024, 8},
  };
  std::printf("| case | summed buffer MB | copy of it ms | lockstep atomics ms | scattered atomics ms | "
              "partials stored ms (GB) |\n|---|---|---|---|---|---|\n");
  for (const auto& c : cases) {
    const size_t sums_n = size_t(c.planes) * kTaps * c.lines * c.width;
    const size_t partials_n = sums_n * c.contributors;
    float *sums = nullptr, *other = nullptr, *partials = nullptr;
    if (cudaMalloc(&sums, sums_n * 4) != cudaSuccess || cudaMalloc(&other, sums_n * 4) != cudaSuccess) return 1;
    const bool partials_fit = cudaMalloc(&partials, partials_n * 4) == cudaSuccess;
    if (!partials_fit) cudaGetLastError();
    const int blocks = c.planes * c.contributors;
    auto run = [&](Mode mode) {
      return time_ms([&] { contribute<<<blocks, kThreads>>>(sums, partials, c.lines, c.width, c.contributors, mode); });
    };
    const float copied = time_ms([&] {
      copy<<<4 * prop.multiProcessorCount, 512>>>(reinterpret_cast<const float4*>(sums), reinterpret_cast<float4*>(other),
                                                 sums_n / 4);
    });
    const float lockstep = run(kLockstep), scattered = run(kScattered);
    char stored[64] = "did not fit";
    if (partials_fit) std::snprintf(stored, sizeof stored, "%.3f (%.2f)", run(kPartials), partials_n * 4 / 1e9);
    const cudaError_t err = cudaDeviceSynchronize();
    std::printf("| %s | %.0f | %.3f | %.3f | %.3f | %s |%s\n", c.name, sums_n * 4 / 1e6, copied, lockstep, scattered,
                stored, err == cudaSuccess ? "" : cudaGetErrorString(err));
    cudaFree(sums);
    cudaFree(other);
    if (partials) cudaFree(partials);
  }
  return 0;
}
