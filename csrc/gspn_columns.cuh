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
// (gspn_tma.cuh), asked for by a warp of the block that does nothing else (the TMA warp).
//
// Inside a block the warps need no barrier per step either: warp w's lanes hold rows w * kLaneRows -
// kLaneHalo + lane (one row per lane, Q = 1, in each of the K channels of one gate group the block scans),
// so neighbouring warps overlap by kLaneHalo lanes on either side. A lane's neighbours come by shuffle;
// the outermost lanes of a warp go stale one lane per step from the outside in, and every kLaneHalo steps
// each warp takes its neighbours' fresh rows through shared memory (one barrier per kLaneHalo steps).
// Only a row's owner (a warp's inner lanes) writes y and the state. (With one barrier per step and the
// edge values through shared memory, barrier waits were 30% of the stall samples, ncu, SDXL 16K.)
#pragma once

#include <cooperative_groups.h>

#include "gspn_step.cuh"
#include "gspn_tma.cuh"

namespace gspn {

constexpr int kBand = 256;
constexpr int kHalo = 16;
constexpr int kColumnMaxBlocks = 4;  // columns of up to 1024 rows
constexpr int kLaneHalo = 4;
constexpr int kLaneRows = 32 - 2 * kLaneHalo;   // rows a warp owns
constexpr int kColumnRows = kBand + 2 * kHalo;  // rows a block scans, at most
constexpr int kColumnMaxThreads = (kColumnRows + kLaneRows - 1) / kLaneRows * 32 + 32;  // + the TMA warp
// Registers a thread of the column scans may take: a block of 12 warps (256 rows and the TMA warp) then
// fits beside two 64-thread row-scan blocks of 160 registers, as the SDXL 4K level 1 forward runs them
// (H100: 0.206 ms at 112 registers, 0.28 ms at 128, where such multiprocessors could not take it; the
// forward's float16 kernels spill 16 bytes).
constexpr int kColumnRegisters = 112;
static_assert(kColumnMaxThreads * kColumnRegisters <= 64 * 1024, "a block of the column scans fits the registers");

// Bytes per row and channel tensor that a group of steps moves: 64 where both stages fit in shared memory,
// else 16 steps (a halo's worth), else 32 bytes; float32 tap weights take sizeof(float) / sizeof(T) times
// as many per step. With logits, one channel per block moves 64 bytes (32 steps of float16/bfloat16, 16
// of float32), two channels 16 steps of 32 bytes (float16/bfloat16) or 8 (float32); with staged tap
// weights, float16/bfloat16 take 16 steps of 32 bytes, float32 16 steps with one channel, 8 with two.
// (Float16, one channel per block: 32-byte groups left room for two blocks per multiprocessor, and the
// paper shape's column scans took 3.26 ms against 2.24 ms with 64.)
template <typename T, int K, bool kTaps>
__host__ __device__ constexpr int column_bytes() {
  constexpr size_t units = channel_tensors(K) + tap_tensors(kTaps) * sizeof(TapInput<T, kTaps>) / sizeof(T);
  constexpr size_t kFit = 224 * 1024, kRows = size_t(2) * units * kColumnRows;
  return kRows * 64 <= kFit ? 64 : kRows * 16 * sizeof(T) <= kFit ? 16 * int(sizeof(T)) : 32;
}
// Scan steps per group.
template <typename T, int K, bool kTaps>
__host__ __device__ constexpr int column_steps() { return column_bytes<T, K, kTaps>() / int(sizeof(T)); }

// How the blocks of one column plane split it: `cluster` blocks of `band` rows each (the last may hold
// fewer), each scanning `halo` more rows on either side with `warps` warps of kLaneRows rows (`rows`,
// from its first halo row on); a block stages them in one or two TMA boxes of `box_rows` rows, a multiple
// of 8 (the swizzle's period), `staged` rows in all. One more warp issues the TMA copies.
struct ColumnSplit {
  int cluster, band, halo, warps, rows, box_rows, staged;
  __host__ __device__ explicit ColumnSplit(int H)
      : cluster((H + kBand - 1) / kBand),
        band((H + cluster - 1) / cluster),
        halo(cluster > 1 ? kHalo : 0),
        warps((band + 2 * halo + kLaneRows - 1) / kLaneRows),
        rows(warps * kLaneRows),
        box_rows(rows <= 256 ? rows : (rows / 2 + 7) / 8 * 8),
        staged(rows <= 256 ? rows : 2 * box_rows) {}
  __host__ __device__ int threads() const { return 32 * (warps + 1); }
};

// Bytes of one staged tensor in one stage (a multiple of 1024, so that every box starts at a multiple of
// its swizzle's period): a channel tensor's, or (tap) a tap input's.
template <typename T, int K, bool kTaps>
__host__ __device__ size_t column_tensor_bytes(const ColumnSplit& split, bool tap) {
  const int per_row = tap ? column_steps<T, K, kTaps>() * int(sizeof(TapInput<T, kTaps>)) : column_bytes<T, K, kTaps>();
  return (size_t(split.staged) * per_row + 1023) / 1024 * 1024;
}
template <typename T, int K, bool kTaps>
__host__ __device__ size_t column_stage_bytes(const ColumnSplit& split) {
  return channel_tensors(K) * column_tensor_bytes<T, K, kTaps>(split, false) +
         tap_tensors(kTaps) * column_tensor_bytes<T, K, kTaps>(split, true);
}

// Shared memory of columns_scan_kernel: two stages of the staged tensors (1024-byte aligned), the warps'
// edge rows [2][warps][top, bottom][kLaneHalo][K], the halo inboxes [2][top, bottom][K][kHalo] and four
// mbarriers.
template <typename T, int K, bool kTaps>
size_t columns_smem(const ColumnSplit& split) {
  return 1024 + 2 * column_stage_bytes<T, K, kTaps>(split) +
         (size_t(4) * split.warps * kLaneHalo + 4 * kHalo) * K * sizeof(float) + 4 * sizeof(uint64_t);
}

// Arguments as rows_scan_kernel's, and `maps` of the staged inputs (the tap inputs, x or grad_y, lam or u,
// u) and of y.
// Launched in clusters of ColumnSplit(H).cluster blocks, one cluster per (batch, column direction, K
// channels).
template <typename T, bool kAdjoint, int K, bool kTaps>
__global__ void __maxnreg__(kColumnRegisters)
    columns_scan_kernel(const __grid_constant__ ColumnMaps maps, const T* __restrict__ x,
                        const T* __restrict__ gates, const float* __restrict__ taps, const T* __restrict__ lam,
                        const T* __restrict__ u, T* __restrict__ y, float* __restrict__ state, Shape s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters and the TMA need sm_90; launch_scan takes the generic scans below it
#else
  namespace cg = cooperative_groups;
  using Tap = TapInput<T, kTaps>;
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int BYTES = column_bytes<T, K, kTaps>();  // per row and channel tensor in a group
  constexpr int SPAN = BYTES / 16;                    // 16-byte vectors
  constexpr int STEPS = SPAN * VEC;                   // scan steps per group
  constexpr int TAP_BYTES = STEPS * int(sizeof(Tap));  // per row and tap input
  constexpr int NX = channel_tensors(K), NW = tap_tensors(kTaps);
  using Vec = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* stages = smem_raw + (1024 - smem_address(smem_raw) % 1024) % 1024;  // TMA destinations
  const ColumnSplit split(s.H);
  // One stage: NX channel tensors of rows x BYTES, then NW tap inputs of rows x TAP_BYTES, swizzled.
  const size_t tensor_bytes = column_tensor_bytes<T, K, kTaps>(split, false);
  const size_t tap_bytes = column_tensor_bytes<T, K, kTaps>(split, true);
  const size_t stage_bytes = column_stage_bytes<T, K, kTaps>(split);
  float* lanes = reinterpret_cast<float*>(stages + 2 * stage_bytes);  // the warps' edge rows
  float* inbox = lanes + 4 * split.warps * kLaneHalo * K;
  uint64_t* landed = reinterpret_cast<uint64_t*>(inbox + 4 * K * kHalo);  // one mbarrier per stage
  uint64_t* halo_landed = landed + 2;                                       // one per inbox

  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank());
  const PlaneId id(blockIdx.x / split.cluster, s.C, K, 0, 2);
  const ScanPlanes<T, kAdjoint> io(id, x, gates, taps, lam, u, y, state, s);
  const Lines& ln = io.ln;
  const T* planes[NX];
  channel_planes<K>(io, planes);
  const Tap* tap_plane[NW];
  tap_planes<kTaps>(io, tap_plane);
  const CUtensorMap* map[NX];  // and where each channel tensor's plane sits in its map
  int map_plane[NX];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int dense = id.d * s.C + id.c + k;  // (d, c + k) inside a (4, C) batch item
    map[staged_x(k)] = &maps.a0, map_plane[staged_x(k)] = kAdjoint ? dense : id.c + k;
    map[staged_x(k) + 1] = &maps.a1, map_plane[staged_x(k) + 1] = dense;
    map[staged_x(k) + 2] = &maps.u, map_plane[staged_x(k) + 2] = dense;
  }
  const int first = rank * split.band, last = min(ln.L, first + split.band);  // the band this block owns
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  // Warps 0 .. split.warps - 1 scan; the last one, the TMA warp, only issues the copies (its lane 0), so
  // that no scanning warp waits for the TMA and holds the others back at the next lane refresh.
  const bool tma_warp = warp == split.warps;
  const int scanners = 32 * split.warps, everyone = scanners + 32;
  // Named barriers 2 and 3: every warp of the block is done with stage 0 or 1 (the TMA warp waits).
  auto stage_free = [&](int grp, bool wait) {
    if (grp & 1) wait ? barrier_sync<3>(everyone) : barrier_arrive<3>(everyone);
    else wait ? barrier_sync<2>(everyone) : barrier_arrive<2>(everyone);
  };
  const int r = warp * kLaneRows + lane - kLaneHalo;  // this lane's row among the block's staged rows
  const int i = first - split.halo + r;               // and in the plane
  const bool scanned = i >= 0 && i < ln.L && r >= 0 && i < last + split.halo;
  const bool inner = lane >= kLaneHalo && lane < 32 - kLaneHalo;  // the warp owns the row
  const bool owned = inner && i >= first && i < last;
  const int staged_row = min(max(r, 0), split.rows - 1);  // a halo lane outside the block reads a neighbour
  if (threadIdx.x == 0) {
    for (int k = 0; k < 4; ++k) mbarrier_init(landed + k, 1);  // the stages', then the inboxes'
    mbarrier_init_fence();
  }
  cluster.sync();  // every block of the cluster runs (its shared memory exists) and its barriers are set

  // Run by the last step of each vector: every kHalo steps (a multiple of VEC), the halo takes the
  // neighbouring blocks' fresh edge rows. They arrive as asynchronous remote stores that count their
  // bytes on this block's mbarrier of the exchange (two, alternating), so no cluster-wide barrier or
  // memory fence is needed; two inboxes suffice, since a block can send exchange e + 2 only after its
  // neighbour has sent e + 1, which it does after reading e.
  int since = 0, exchange = 0;
  const unsigned halo_bytes = unsigned(((rank > 0) + (rank + 1 < split.cluster)) * K * kHalo * sizeof(float));
  auto refresh_halo = [&](float (&h)[K][1]) {
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
  // Run every kLaneHalo steps, after refresh_halo where both run: the warps' outer lanes take their rows
  // from the warps that own them (the two buffers alternate, so one barrier serves).
  int swaps = 0;
  auto refresh_lanes = [&](float (&h)[K][1]) {
    float* box = lanes + (swaps & 1) * 2 * split.warps * kLaneHalo * K;  // [warps][top, bottom][kLaneHalo][K]
    auto at = [&](int w, int side, int l, int k) -> float& { return box[((w * 2 + side) * kLaneHalo + l) * K + k]; };
    const int top = lane - kLaneHalo, bottom = lane - (32 - 2 * kLaneHalo);  // inner lanes the others read
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (top >= 0 && top < kLaneHalo) at(warp, 0, top, k) = h[k][0];
      if (bottom >= 0 && bottom < kLaneHalo) at(warp, 1, bottom, k) = h[k][0];
    }
    barrier_sync<1>(scanners);  // named barrier 1: the scanning warps
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (lane < kLaneHalo && warp > 0) h[k][0] = at(warp - 1, 1, lane, k);
      if (lane >= 32 - kLaneHalo && warp + 1 < split.warps) h[k][0] = at(warp + 1, 0, lane - (32 - kLaneHalo), k);
    }
    ++swaps;
  };
  static_assert(kHalo % VEC == 0, "the halo is refreshed at the end of a vector");
  static_assert(VEC % kLaneHalo == 0, "the lanes are refreshed inside a vector");
  static_assert(VEC % 4 == 0, "the state goes out in whole tiles of 4 columns");

  // Where the TMA puts row r (a box's first) of channel tensor k in stage `stage`: BYTES, w ascending; of
  // tap input k: TAP_BYTES. The 16-byte chunk c of a staged row is at chunk_of / tap_chunk_of (swizzled).
  auto row_of = [&](int stage, int k, int r) {
    return stages + stage * stage_bytes + k * tensor_bytes + r * BYTES;
  };
  auto tap_row_of = [&](int stage, int k, int r) {
    return stages + stage * stage_bytes + NX * tensor_bytes + k * tap_bytes + r * TAP_BYTES;
  };
  auto chunk_of = [&](int stage, int k, int r, int c) { return row_of(stage, k, 0) + swizzled(BYTES, r, c); };
  auto tap_chunk_of = [&](int stage, int k, int r, int c) {
    return tap_row_of(stage, k, 0) + swizzled(TAP_BYTES, r, c);
  };
  auto vectors_in = [&](int grp) { return min(SPAN, (ln.T - grp * STEPS) / VEC); };  // W % VEC == 0
  // Memory offset of the lowest w of steps t0 .. t0+VEC-1 on row i.
  auto first_of = [&](int t0, int i) { return ln.reversed ? ln.offset(t0 + VEC - 1, i) : ln.offset(t0, i); };
  // Whether group grp's y goes out as TMA boxes: only boxes inside the plane (the block's whole band, all
  // the group's columns); the owners store the others themselves. (A store box reaching past the plane's
  // ends in w stopped the kernel with an illegal instruction on the H100; loads are clipped.)
  const bool whole_band = last - first == split.band;
  auto boxed = [&](int grp) { return whole_band && vectors_in(grp) == SPAN; };
  // The TMA warp asks the TMA for a group: per tensor, the boxes of columns w0 .. w0+STEPS-1 of the block's
  // rows (zeros outside the plane, also past its ends in w). In two calls, so that the forward's x slots,
  // which still hold the last group's y until the TMA has read it, can come last: first the other
  // tensors (with the byte count of the whole group), then (x_slots) the x slots.
  unsigned group_bytes = unsigned(NW * split.staged * TAP_BYTES);  // what the boxes bring (not the padding)
#pragma unroll
  for (int k = 0; k < NX; ++k) group_bytes += planes[k] ? unsigned(split.staged * BYTES) : 0u;
  const int tap_map_plane = (id.d * NW * s.G) + id.c / (s.C / s.G);  // tap input k's plane: + k * G
  auto first_column = [&](int grp) { return ln.reversed ? ln.T - grp * STEPS - STEPS : grp * STEPS; };
  auto stage = [&](int grp, bool x_slots) {
    uint64_t* bar = landed + (grp & 1);
    if (!x_slots) mbarrier_expect(bar, group_bytes);
    const int w0 = first_column(grp);
    for (int row = 0; row < split.rows; row += split.box_rows) {
      const int h0 = first - split.halo + row;
#pragma unroll
      for (int k = 0; k < NX; ++k)
        if (planes[k] && (staged_x(k / 3) == k) == x_slots)
          tma_load(row_of(grp & 1, k, row), map[k], w0, h0, map_plane[k], id.b, bar);
      if (x_slots) continue;
#pragma unroll
      for (int k = 0; k < NW; ++k)
        tma_load(tap_row_of(grp & 1, k, row), &maps.taps, w0, h0, tap_map_plane + k * s.G, id.b, bar);
    }
  };
  // This thread's steps grp * STEPS + j * VEC .. +VEC-1 of tensor k as float32, in memory order (rows
  // outside the plane arrived as zeros; a null tensor reads as whatever its slot holds, which its users
  // select away).
  auto take = [&](int grp, int k, int j, float (&out)[VEC]) {
    const int vector = ln.reversed ? SPAN - 1 - j : j;  // the box holds w ascending
    const Vec v = *reinterpret_cast<const Vec*>(chunk_of(grp & 1, k, staged_row, vector));
#pragma unroll
    for (int m = 0; m < VEC; ++m) out[m] = to_acc(v.v[m]);
  };
  auto take_tap = [&](int grp, int k, int j, float (&out)[VEC]) {
    constexpr int PER_CHUNK = 16 / int(sizeof(Tap)), CHUNKS = VEC / PER_CHUNK;  // a vector's chunks
    const int vector = ln.reversed ? SPAN - 1 - j : j;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const Pack<Tap, PER_CHUNK> v =
          *reinterpret_cast<const Pack<Tap, PER_CHUNK>*>(tap_chunk_of(grp & 1, k, staged_row, vector * CHUNKS + c));
#pragma unroll
      for (int m = 0; m < PER_CHUNK; ++m) out[c * PER_CHUNK + m] = to_acc(v.v[m]);
    }
  };

  // Forward: the TMA warp sends group grp's y, which the band's owners wrote over their x in the stage, as one
  // TMA box per channel (the band's rows x the group's columns, when boxed); tma_store_wait_read() before
  // the x slots are filled again. (Each owner storing its own 16 bytes per row and vector, the warps waited
  // on those uncoalesced stores for their registers: 10% of the stall samples, ncu, SDXL 16K level 1.)
  auto store_y = [&](int grp) {
    if (!boxed(grp)) return;
    const int w0 = first_column(grp);
#pragma unroll
    for (int k = 0; k < K; ++k)
      tma_store(&maps.y, row_of(grp & 1, staged_x(k), split.halo), w0, first, id.d * s.C + id.c + k, id.b);
    tma_store_commit();
  };
  const int groups = (ln.T + STEPS - 1) / STEPS;
  if (tma_warp) {
    if (lane == 0) stage(0, false), stage(0, true);
    for (int grp = 0; grp < groups; ++grp) {
      // Group grp + 1 goes into the stage of grp - 1 once every scanning warp is done with that group.
      if (grp > 0) stage_free(grp - 1, true);
      if (lane == 0) {
        if constexpr (!kAdjoint)
          if (grp > 0) store_y(grp - 1);  // before the stage is filled again
        if (grp + 1 < groups) {
          stage(grp + 1, false);
          if constexpr (!kAdjoint) tma_store_wait_read();  // the x slots (y) read: they may be filled again
          stage(grp + 1, true);
        }
      }
      __syncwarp();
    }
    stage_free(groups - 1, true);
    if constexpr (!kAdjoint)
      if (lane == 0) store_y(groups - 1), tma_store_wait();
    return;
  }
  LaneStepper<K, kAdjoint> stepper(ln, s.chunk);
  // Reversed lines walk each vector from its end: the body is compiled once per order so that every
  // register index stays a compile-time constant.
  auto scan = [&](auto reversed_flag) {
    constexpr bool kReversed = decltype(reversed_flag)::value;
    auto mem = [](int st) { return kReversed ? VEC - 1 - st : st; };  // step st's place inside a vector
    for (int grp = 0; grp < groups; ++grp) {
      mbarrier_wait(landed + (grp & 1), (grp >> 1) & 1);
      const int n = vectors_in(grp);
#pragma unroll
      for (int j = 0; j < SPAN; ++j) {
        if (j >= n) continue;
        // The weights and inputs of the vector's VEC steps first (independent of the state), then
        // the steps, then y = u h.
        Weights<1> wt[VEC];
        float a[VEC][K][1];
        {
          float g[NW][VEC];
#pragma unroll
          for (int k = 0; k < NW; ++k) take_tap(grp, k, j, g[k]);
#pragma unroll
          for (int st = 0; st < VEC; ++st) {
            float tin[NW][1];
#pragma unroll
            for (int k = 0; k < NW; ++k) tin[k][0] = g[k][mem(st)];
            wt[st] = weights_from<kTaps>(tin, i, ln.L);
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
          stepper.step(a[st], wt[st], scanned, [&](float (&line)[K][1]) {
            if (st + 1 == VEC) refresh_halo(line);
            if ((st + 1) % kLaneHalo == 0) refresh_lanes(line);
          });
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
              store_streaming<float, 4>(io.state + k * io.plane + (w0 + m) * ln.L + 4 * i, v);  // = state_offset
            }
        }
        if constexpr (!kAdjoint) {  // y = u h, in place of the vector's x (store_y sends it)
#pragma unroll
          for (int k = 0; k < K; ++k) {
            float uv[VEC];
            take(grp, staged_x(k) + 2, j, uv);
            Vec out;
#pragma unroll
            for (int st = 0; st < VEC; ++st)
              out.v[mem(st)] = from_acc<T>(planes[staged_x(k) + 2] ? uv[mem(st)] * h[k][st] : h[k][st]);
            if (owned && boxed(grp))
              *reinterpret_cast<Vec*>(chunk_of(grp & 1, staged_x(k), staged_row, ln.reversed ? SPAN - 1 - j : j)) = out;
            else if (owned)
              *reinterpret_cast<Vec*>(io.y + k * io.plane + first_of(grp * STEPS + j * VEC, i)) = out;
          }
        }
      }
      if constexpr (!kAdjoint) fence_shared_for_tma();  // this thread's y, for the TMA warp's store
      stage_free(grp, false);
    }
  };
  if (ln.reversed) scan(Flag<true>{});
  else scan(Flag<false>{});
#endif
}

}  // namespace gspn
