// Column scans (d = 0, 1) of 16-byte-aligned grids with columns of up to kColumnMaxBlocks * kBand rows:
// the forward, and the backward's adjoint scan (gspn_step.cuh has both recurrences).
//
// A column scan step reads one element of every row. DRAM serves 64-byte pieces, and the L2 keeps the
// rest of a piece for the next group of steps only while few rows are open at once across the GPU
// (benchmarks/probes/column_access.cu): a block owning a whole 1024-row column with 16 bytes per row
// and tensor read 4.3x the useful bytes from DRAM (ncu, paper shape). So a block owns a band of at most
// kBand rows and stages column_bytes per row and tensor, and the blocks of one column plane form a
// thread-block cluster. Each block also scans kHalo rows on either side of its band. Those go stale
// one row per step from the outside in, so every kHalo steps the neighbours hand over their edge rows
// through distributed shared memory: one exchange per kHalo steps, not one per step (an exchange with
// cluster.sync() costs about 1 us, benchmarks/probes/cluster_exchange.cu), and as remote stores counted
// on the receiver's mbarrier rather than a cluster barrier. Inputs arrive through the TMA
// (gspn_tma.cuh).
//
// Thread k owns row first - halo + k (Q = 1) in each of the K channels of one gate group the block scans,
// and writes y as column_bytes per row and group.
#pragma once

#include <cooperative_groups.h>

#include "gspn_step.cuh"
#include "gspn_tma.cuh"

namespace gspn {

constexpr int kBand = 256;
constexpr int kHalo = 16;
constexpr int kColumnMaxBlocks = 4;  // columns of up to 1024 rows
constexpr int kColumnMaxThreads = kBand + 2 * kHalo;
constexpr int kBoxRows = kColumnMaxThreads / 2;  // rows of one TMA box (at most 256)

// Bytes per row and tensor that a group of steps moves: 64 where both stages fit in shared memory, else
// 16 steps (a halo's worth), else 32 bytes. So groups with one channel per block are 64 bytes (32 steps
// of float16/bfloat16, 16 of float32), with two 16 steps of 32 bytes (float16/bfloat16) or 8 steps of
// 32 bytes (float32). (Float16, one channel per block: 32-byte groups left room for two blocks per
// multiprocessor, and the paper shape's column scans took 3.26 ms against 2.24 ms with 64.)
template <typename T, int K>
__host__ __device__ constexpr int column_bytes() {
  constexpr size_t kFit = 224 * 1024, kRows = size_t(2) * staged_tensors(K) * kColumnMaxThreads;
  return kRows * 64 <= kFit ? 64 : kRows * 16 * sizeof(T) <= kFit ? 16 * int(sizeof(T)) : 32;
}

// How the blocks of one column plane split it: `cluster` blocks of `band` rows each (the last may hold
// fewer), each scanning `halo` more rows on either side, one thread per row.
struct ColumnSplit {
  int cluster, band, halo, threads;
  __host__ __device__ explicit ColumnSplit(int H)
      : cluster((H + kBand - 1) / kBand),
        band((H + cluster - 1) / cluster),
        halo(cluster > 1 ? kHalo : 0),
        threads((band + 2 * halo + 31) / 32 * 32) {}
};

// TMA boxes per tensor that cover a block's rows, one thread per row.
__host__ __device__ constexpr int column_boxes(int threads) { return (threads + kBoxRows - 1) / kBoxRows; }

// Shared memory of columns_scan_kernel: two stages of the staged tensors (TMA boxes of column_bytes per
// row, 128-byte aligned), the warp edges, the halo inboxes [2][top, bottom][K][kHalo] and four mbarriers.
template <typename T, int K>
size_t columns_smem(int threads) {
  return 128 + size_t(2) * staged_tensors(K) * column_boxes(threads) * kBoxRows * column_bytes<T, K>() +
         WarpEdges<K>::bytes(threads) + 4 * K * kHalo * sizeof(float) + 4 * sizeof(uint64_t);
}

// Arguments as rows_scan_kernel's, and `maps` of the staged inputs (gates, x or grad_y, lam or u, u).
// Launched in clusters of ColumnSplit(H).cluster blocks, one cluster per (batch, column direction, K
// channels).
template <typename T, bool kAdjoint, int K>
__global__ void __launch_bounds__(kColumnMaxThreads)
    columns_scan_kernel(const __grid_constant__ ColumnMaps maps, const T* __restrict__ x,
                        const T* __restrict__ gates, const T* __restrict__ lam, const T* __restrict__ u,
                        T* __restrict__ y, float* __restrict__ state, Shape s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters and the TMA need sm_90; launch_scan takes the generic scans below it
#else
  namespace cg = cooperative_groups;
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int BYTES = column_bytes<T, K>();  // per row and tensor in a group
  constexpr int SPAN = BYTES / 16;             // 16-byte vectors
  constexpr int STEPS = SPAN * VEC;            // scan steps per group
  constexpr int NT = staged_tensors(K);
  enum { G0 = 0, G1 = 1, G2 = 2 };
  using Vec = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* stages = smem_raw + (128 - smem_address(smem_raw) % 128) % 128;  // TMA destinations
  const int rows_staged = column_boxes(blockDim.x) * kBoxRows;
  const size_t tensor_bytes = size_t(rows_staged) * BYTES;  // one tensor of one stage
  const size_t stage_bytes = NT * tensor_bytes;
  const WarpEdges<K> ex{reinterpret_cast<float*>(stages + 2 * stage_bytes), int(blockDim.x / 32),
                        int(threadIdx.x / 32), int(threadIdx.x % 32)};
  float* inbox = reinterpret_cast<float*>(stages + 2 * stage_bytes + WarpEdges<K>::bytes(blockDim.x));
  uint64_t* landed = reinterpret_cast<uint64_t*>(inbox + 4 * K * kHalo);  // one mbarrier per stage
  uint64_t* halo_landed = landed + 2;                                       // one per inbox

  const cg::cluster_group cluster = cg::this_cluster();
  const ColumnSplit split(s.H);
  const int rank = int(cluster.block_rank());
  const PlaneId id(blockIdx.x / split.cluster, s.C, K, 0, 2);
  const ScanPlanes<T, kAdjoint> io(id, x, gates, lam, u, y, state, s);
  const Lines& ln = io.ln;
  const T* planes[NT];
  staged_planes<K>(io, planes);
  const CUtensorMap* map[NT];  // and where each tensor's plane sits in its map
  int map_plane[NT];
  const int g = id.c / (s.C / s.G);
#pragma unroll
  for (int k = 0; k < 3; ++k) map[k] = &maps.gates, map_plane[k] = (id.d * 3 + k) * s.G + g;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int dense = id.d * s.C + id.c + k;  // (d, c + k) inside a (4, C) batch item
    map[staged_x(k)] = &maps.a0, map_plane[staged_x(k)] = kAdjoint ? dense : id.c + k;
    map[staged_x(k) + 1] = &maps.a1, map_plane[staged_x(k) + 1] = dense;
    map[staged_x(k) + 2] = &maps.u, map_plane[staged_x(k) + 2] = dense;
  }
  const int first = rank * split.band, last = min(ln.L, first + split.band);  // the band this block owns
  const int i = first - split.halo + int(threadIdx.x);                         // this thread's row
  const bool scanned = i >= 0 && i < ln.L && i < last + split.halo;
  const bool owned = i >= first && i < last;
  ex.clear();
  if (threadIdx.x == 0) {
    for (int k = 0; k < 4; ++k) mbarrier_init(landed + k, 1);  // the stages', then the inboxes'
    mbarrier_init_fence();
  }
  cluster.sync();  // every block of the cluster runs (its shared memory exists); edges and barriers are set

  // Run by each step once the state is final: rows this block does not scan stay zero.
  auto keep_scanned = [&](float (&h)[K][1]) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (!scanned) h[k][0] = 0.f;
  };
  // Run by the last step of each vector instead: every kHalo steps (a multiple of VEC), the halo also
  // takes the neighbours' fresh edge rows. They arrive as asynchronous remote stores that count their
  // bytes on this block's mbarrier of the exchange (two, alternating), so no cluster-wide barrier or
  // memory fence is needed; two inboxes suffice, since a block can send exchange e + 2 only after its
  // neighbour has sent e + 1, which it does after reading e.
  int since = 0, exchange = 0;
  const unsigned halo_bytes = unsigned(((rank > 0) + (rank + 1 < split.cluster)) * K * kHalo * sizeof(float));
  auto refresh_halo = [&](float (&h)[K][1]) {
    keep_scanned(h);
    since += VEC;
    if (split.halo == 0 || since < kHalo) return;
    since = 0;
    const int box = exchange & 1;
    float* mail = inbox + box * 2 * K * kHalo;  // [top halo, bottom halo][K][kHalo]
    const unsigned bar = smem_address(halo_landed + box);
    if (threadIdx.x == 0) mbarrier_expect(halo_landed + box, halo_bytes);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (owned && rank > 0 && i < first + kHalo)  // the block above: its bottom halo
        store_remote(cluster_address(smem_address(mail + (K + k) * kHalo + i - first), rank - 1), h[k][0],
                     cluster_address(bar, rank - 1));
      if (owned && rank + 1 < split.cluster && i >= last - kHalo)  // the block below: its top halo
        store_remote(cluster_address(smem_address(mail + k * kHalo + i - (last - kHalo)), rank + 1), h[k][0],
                     cluster_address(bar, rank + 1));
    }
    mbarrier_wait(halo_landed + box, (exchange >> 1) & 1);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (scanned && i < first) h[k][0] = mail[k * kHalo + i - (first - kHalo)];
      if (scanned && i >= last) h[k][0] = mail[(K + k) * kHalo + i - last];
    }
    ++exchange;
  };
  static_assert(kHalo % VEC == 0, "the halo is refreshed at the end of a vector");
  static_assert(VEC % 4 == 0, "the state goes out in whole tiles of 4 columns");

  // Row r of the block (thread r) of tensor k in stage `stage`: BYTES, w ascending.
  auto row_of = [&](int stage, int k, int r) {
    return stages + stage * stage_bytes + k * tensor_bytes + r * BYTES;
  };
  // Memory offset of the lowest w of steps t0 .. t0+VEC-1 on row i.
  auto first_of = [&](int t0, int i) { return ln.reversed ? ln.offset(t0 + VEC - 1, i) : ln.offset(t0, i); };
  auto vectors_in = [&](int grp) { return min(SPAN, (ln.T - grp * STEPS) / VEC); };  // W % VEC == 0
  // Thread 0 asks the TMA for a group: per tensor, the boxes of columns w0 .. w0+STEPS-1 of the block's
  // rows (zeros outside the plane, also past its ends in w).
  unsigned group_bytes = 0;
#pragma unroll
  for (int k = 0; k < NT; ++k) group_bytes += planes[k] ? unsigned(tensor_bytes) : 0u;
  auto stage = [&](int grp) {
    if (threadIdx.x != 0) return;
    uint64_t* bar = landed + (grp & 1);
    mbarrier_expect(bar, group_bytes);
    const int t0 = grp * STEPS, w0 = ln.reversed ? ln.T - t0 - STEPS : t0;
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      if (!planes[k]) continue;
      for (int box = 0; box * kBoxRows < rows_staged; ++box)
        tma_load(row_of(grp & 1, k, box * kBoxRows), map[k], w0, first - split.halo + box * kBoxRows, map_plane[k],
                 id.b, bar);
    }
  };
  // This thread's steps grp * STEPS + j * VEC .. +VEC-1 of tensor k as float32, in memory order (rows
  // outside the plane arrived as zeros, and a null tensor reads as zeros: unscanned rows stay finite).
  auto take = [&](int grp, int k, int j, float (&out)[VEC]) {
    const int vector = ln.reversed ? SPAN - 1 - j : j;  // the box holds w ascending
    const Vec v = planes[k] ? reinterpret_cast<const Vec*>(row_of(grp & 1, k, threadIdx.x))[vector] : Vec{};
#pragma unroll
    for (int m = 0; m < VEC; ++m) out[m] = to_acc(v.v[m]);
  };

  Stepper<1, K, kAdjoint> stepper(ln, s.chunk);
  const int groups = (ln.T + STEPS - 1) / STEPS;
  // Reversed lines walk each vector from its end: the body is compiled once per order so that every
  // register index stays a compile-time constant.
  auto scan = [&](auto reversed_flag) {
    constexpr bool kReversed = decltype(reversed_flag)::value;
    auto mem = [](int st) { return kReversed ? VEC - 1 - st : st; };  // step st's place inside a vector
    stage(0);
    for (int grp = 0; grp < groups; ++grp) {
      __syncthreads();  // every thread is done with the other stage (the last group's u)
      if (grp + 1 < groups) stage(grp + 1);
      mbarrier_wait(landed + (grp & 1), (grp >> 1) & 1);
      const int n = vectors_in(grp);
      Vec out[K][SPAN];  // forward: y of the group, written at its end
      (void)out;
#pragma unroll
      for (int j = 0; j < SPAN; ++j) {
        if (j >= n) continue;
        // The weights and inputs of the vector's VEC steps first (independent of the state), then
        // the steps, then y = u h.
        Weights<1> wt[VEC];
        float a[VEC][K][1];
        {
          float g[3][VEC];
#pragma unroll
          for (int k = 0; k < 3; ++k) take(grp, k, j, g[k]);
#pragma unroll
          for (int st = 0; st < VEC; ++st) {
            const float g0[1] = {g[0][mem(st)]}, g1[1] = {g[1][mem(st)]}, g2[1] = {g[2][mem(st)]};
            wt[st] = Weights<1>(g0, g1, g2, i, ln.L);
            pin(wt[st]);
          }
#pragma unroll
          for (int k = 0; k < K; ++k) {
            float xa[VEC], xb[VEC];
            take(grp, staged_x(k), j, xa);
            take(grp, staged_x(k) + 1, j, xb);
#pragma unroll
            for (int st = 0; st < VEC; ++st) {
              a[st][k][0] = planes[staged_x(k) + 1] ? xa[mem(st)] * xb[mem(st)] : xa[mem(st)];
              pin(a[st][k][0]);
            }
          }
        }
        float h[K][VEC];
#pragma unroll
        for (int st = 0; st < VEC; ++st) {
          if (st + 1 < VEC) stepper.step(ex, a[st], wt[st], i, ln.L, keep_scanned);
          else stepper.step(ex, a[st], wt[st], i, ln.L, refresh_halo);
#pragma unroll
          for (int k = 0; k < K; ++k) h[k][st] = stepper.state[k][0];
        }
        if (io.state && owned) {  // whole tiles of 4 columns (W % VEC == 0), 4 steps at a time
          const int t0 = grp * STEPS + j * VEC, w0 = ln.reversed ? ln.T - t0 - VEC : t0;
#pragma unroll
          for (int k = 0; k < K; ++k)
#pragma unroll
            for (int m = 0; m < VEC; m += 4) {
              const float v[4] = {h[k][mem(m)], h[k][mem(m + 1)], h[k][mem(m + 2)], h[k][mem(m + 3)]};
              store_pack<float, 4>(io.state + k * io.plane + (w0 + m) * ln.L + 4 * i, v);  // = state_offset
            }
        }
        if constexpr (!kAdjoint) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            float uv[VEC];
            take(grp, staged_x(k) + 2, j, uv);
#pragma unroll
            for (int st = 0; st < VEC; ++st)
              out[k][j].v[mem(st)] = from_acc<T>(planes[staged_x(k) + 2] ? uv[mem(st)] * h[k][st] : h[k][st]);
          }
        }
      }
      if constexpr (!kAdjoint) {
        if (owned) {
#pragma unroll
          for (int k = 0; k < K; ++k)
#pragma unroll
            for (int j = 0; j < SPAN; ++j)
              if (j < n) *reinterpret_cast<Vec*>(io.y + k * io.plane + first_of(grp * STEPS + j * VEC, i)) = out[k][j];
        }
      }
    }
  };
  if (ln.reversed) scan(Flag<true>{});
  else scan(Flag<false>{});
#endif
}

}  // namespace gspn
