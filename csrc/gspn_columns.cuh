// Column scans (d = 0, 1) of 16-byte-aligned grids with columns of up to kColumnMaxBlocks * kBand rows:
// the forward, and the backward's adjoint scan (gspn_step.cuh has both recurrences).
//
// A column scan step reads one element of every row. DRAM serves 64-byte pieces, and the L2 keeps the
// rest of a piece for the next group of steps only while few rows are open at once across the GPU
// (benchmarks/probes/column_access.cu): a block owning a whole 1024-row column with 16 bytes per row
// and tensor read 4.3x the useful bytes from DRAM (ncu, paper shape). So a block owns a band of at most
// kBand rows and stages kColumnBytes per row and tensor, and the blocks of one column plane form a
// thread-block cluster. Each block also scans kHalo rows on either side of its band. Those go stale
// one row per step from the outside in, so every kHalo steps the neighbours hand over their edge rows
// through distributed shared memory: one cluster barrier per kHalo steps, not one per step (an
// exchange costs about 1 us, benchmarks/probes/cluster_exchange.cu).
//
// Thread k owns row first - halo + k (Q = 1) in each of the K channels of one gate group the block scans,
// and writes y as kColumnBytes per row and group.
#pragma once

#include <cooperative_groups.h>

#include "gspn_step.cuh"

namespace gspn {

constexpr int kBand = 256;
constexpr int kHalo = 16;
constexpr int kColumnBytes = 32;
constexpr int kColumnMaxBlocks = 4;  // columns of up to 1024 rows
constexpr int kColumnMaxThreads = kBand + 2 * kHalo;

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

// Shared memory of columns_scan_kernel: two stages of the staged tensors x kColumnBytes per row, the warp
// edges, and the halo inbox [2][top, bottom][K][kHalo].
inline size_t columns_smem(int threads, int K) {
  const size_t edges = K == 2 ? WarpEdges<2>::bytes(threads) : WarpEdges<1>::bytes(threads);
  return size_t(2) * staged_tensors(K) * kColumnBytes * threads + edges + 4 * K * kHalo * sizeof(float);
}

// Arguments as rows_scan_kernel's. Launched in clusters of ColumnSplit(H).cluster blocks, one cluster
// per (batch, column direction, K channels).
template <typename T, bool kAdjoint, int K>
__global__ void __launch_bounds__(kColumnMaxThreads)
    columns_scan_kernel(const T* __restrict__ x, const T* __restrict__ gates, const T* __restrict__ lam,
                        const T* __restrict__ u, T* __restrict__ y, float* __restrict__ state, Shape s) {
  namespace cg = cooperative_groups;
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int SPAN = kColumnBytes / 16;  // 16-byte vectors per row and tensor in a group
  constexpr int STEPS = SPAN * VEC;        // scan steps per group
  constexpr int NT = staged_tensors(K);
  enum { G0 = 0, G1 = 1, G2 = 2 };
  auto XS = [](int k) { return 3 + 3 * k; };  // tensor of channel k's first factor of a; then lam (or u), u
  using Vec = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Vec* slots = reinterpret_cast<Vec*>(smem_raw);
  const size_t slot_bytes = size_t(2) * NT * SPAN * blockDim.x * sizeof(Vec);
  const WarpEdges<K> ex{reinterpret_cast<float*>(smem_raw + slot_bytes), int(blockDim.x / 32),
                        int(threadIdx.x / 32), int(threadIdx.x % 32)};
  float* inbox = reinterpret_cast<float*>(smem_raw + slot_bytes + WarpEdges<K>::bytes(blockDim.x));

  const cg::cluster_group cluster = cg::this_cluster();
  const ColumnSplit split(s.H);
  const int rank = int(cluster.block_rank());
  const ScanPlanes<T, kAdjoint> io(PlaneId(blockIdx.x / split.cluster, s.C, K, 0, 2), x, gates, lam, u, y, state,
                                   s);
  const Lines& ln = io.ln;
  const T* planes[NT];
  planes[G0] = io.gate[0], planes[G1] = io.gate[1], planes[G2] = io.gate[2];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    planes[XS(k)] = io.a0 + k * io.plane;
    planes[XS(k) + 1] = io.a1 ? io.a1 + k * io.plane : nullptr;
    planes[XS(k) + 2] = io.u ? io.u + k * io.plane : nullptr;
  }
  const int first = rank * split.band, last = min(ln.L, first + split.band);  // the band this block owns
  const int i = first - split.halo + int(threadIdx.x);                         // this thread's row
  const bool scanned = i >= 0 && i < ln.L && i < last + split.halo;
  const bool owned = i >= first && i < last;
  ex.clear();
  cluster.sync();  // every block of the cluster runs (its shared memory exists) and the edges are clear

  // Run by each step once the state is final: rows this block does not scan stay zero.
  auto keep_scanned = [&](float (&h)[K][1]) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (!scanned) h[k][0] = 0.f;
  };
  // Run by the last step of each vector instead: every kHalo steps (a multiple of VEC), the halo also
  // takes the neighbours' fresh edge rows.
  int since = 0, box = 0;
  auto refresh_halo = [&](float (&h)[K][1]) {
    keep_scanned(h);
    since += VEC;
    if (split.halo == 0 || since < kHalo) return;
    since = 0;
    float* mail = inbox + box * 2 * K * kHalo;  // [top halo, bottom halo][K][kHalo]
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (owned && rank > 0 && i < first + kHalo)  // the block above: its bottom halo
        cluster.map_shared_rank(mail, rank - 1)[(K + k) * kHalo + i - first] = h[k][0];
      if (owned && rank + 1 < split.cluster && i >= last - kHalo)  // the block below: its top halo
        cluster.map_shared_rank(mail, rank + 1)[k * kHalo + i - (last - kHalo)] = h[k][0];
    }
    cluster.sync();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (scanned && i < first) h[k][0] = mail[k * kHalo + i - (first - kHalo)];
      if (scanned && i >= last) h[k][0] = mail[(K + k) * kHalo + i - last];
    }
    box ^= 1;
  };
  static_assert(kHalo % VEC == 0, "the halo is refreshed at the end of a vector");

  // Slot (stage, tensor, vector j) of row r of the block (thread r) in shared memory.
  auto slot = [&](int stage, int k, int j, int r) {
    return slots + ((size_t(stage) * NT + k) * SPAN + j) * blockDim.x + r;
  };
  // Memory offset of the lowest w of steps t0 .. t0+VEC-1 on row i.
  auto first_of = [&](int t0, int i) { return ln.reversed ? ln.offset(t0 + VEC - 1, i) : ln.offset(t0, i); };
  auto vectors_in = [&](int grp) { return min(SPAN, (ln.T - grp * STEPS) / VEC); };  // W % VEC == 0
  // The block copies a group together: consecutive threads take the consecutive vectors of a row, so
  // that a warp's copies are whole 32-byte sectors.
  const int row_lo = max(0, first - split.halo), row_hi = min(ln.L, last + split.halo);  // rows scanned
  auto stage = [&](int grp) {
    const int n = vectors_in(grp);
    for (int piece = threadIdx.x; piece < int(blockDim.x) * SPAN; piece += blockDim.x) {
      const int r = piece / SPAN, j = piece % SPAN, row = first - split.halo + r;
      if (j >= n || row < row_lo || row >= row_hi) continue;
      const int off = first_of(grp * STEPS + j * VEC, row);
#pragma unroll
      for (int k = 0; k < NT; ++k)
        if (planes[k]) cp_async16(slot(grp & 1, k, j, r), planes[k] + off);
    }
  };
  // This thread's vector j of tensor k in stage `stage` as float32, memory order (zero where nothing was
  // staged, so that unscanned rows stay finite).
  auto take = [&](int stage, int k, int j, float (&out)[VEC]) {
    const Vec v = (planes[k] && scanned) ? *slot(stage, k, j, threadIdx.x) : Vec{};
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
    cp_async_commit();
    for (int grp = 0; grp < groups; ++grp) {
      cp_async_wait_all();
      __syncthreads();  // the group's copies of every thread have landed
      if (grp + 1 < groups) stage(grp + 1);  // into the other stage, consumed a group ago
      cp_async_commit();
      const int n = vectors_in(grp), now = grp & 1;
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
          for (int k = 0; k < 3; ++k) take(now, k, j, g[k]);
#pragma unroll
          for (int st = 0; st < VEC; ++st) {
            const float g0[1] = {g[0][mem(st)]}, g1[1] = {g[1][mem(st)]}, g2[1] = {g[2][mem(st)]};
            wt[st] = Weights<1>(g0, g1, g2, i, ln.L);
            pin(wt[st]);
          }
#pragma unroll
          for (int k = 0; k < K; ++k) {
            float xa[VEC], xb[VEC];
            take(now, XS(k), j, xa);
            take(now, XS(k) + 1, j, xb);
#pragma unroll
            for (int st = 0; st < VEC; ++st) {
              a[st][k][0] = planes[XS(k) + 1] ? xa[mem(st)] * xb[mem(st)] : xa[mem(st)];
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
          for (int k = 0; k < K; ++k) {
            h[k][st] = stepper.state[k][0];
            if (io.state && owned)
              io.state[k * io.plane + ln.state_offset(grp * STEPS + j * VEC + st, i)] = h[k][st];
          }
        }
        if constexpr (!kAdjoint) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            float uv[VEC];
            take(now, XS(k) + 2, j, uv);
#pragma unroll
            for (int st = 0; st < VEC; ++st)
              out[k][j].v[mem(st)] = from_acc<T>(planes[XS(k) + 2] ? uv[mem(st)] * h[k][st] : h[k][st]);
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
}

}  // namespace gspn
