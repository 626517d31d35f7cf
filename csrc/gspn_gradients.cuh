// The backward's second pass: every input's gradient from the adjoint state gh (gspn_step.cuh) and the
// forward's state h, pointwise but for a 3-tap stencil over h_{t-1} (inside the 3 x 3 neighbourhood of
// each position):
//   glam = gh x,   gu = gy h,   gx = sum over d of gh lam,
//   gw_k[t, i] = m_t sum over the group's channels of gh_t[i] h_{t-1}[i+k-1],
//   g logit_k = s_k (1 - s_k) / S (gw_k - sum_j w_j gw_j)     (d w_j / d s_k = (delta_jk - w_j) / S)
// The logit gradient is linear in gw, so partial sums over slices of a group's channels add up.
//
// A block takes kGradRows rows x 32 P columns, a warp one row of 32 P consecutive positions of each
// plane, P per lane, as vectors; a stencil's neighbours one column away come from the next lanes. With
// P = 4 the states go through shared memory (StateStage below), with P = 1 (any width) straight from
// global memory.
#pragma once

#include <type_traits>

#include "gspn_common.cuh"

namespace gspn {

// Tiles of kGradRows rows x 32 P columns that cover a plane.
__host__ __device__ inline int gradient_tiles_w(const Shape& s, int P) { return (s.W + 32 * P - 1) / (32 * P); }
__host__ __device__ inline int gradient_tiles(const Shape& s, int P) {
  return (s.H + kGradRows - 1) / kGradRows * gradient_tiles_w(s, P);
}

// out[0 .. P + 1]: the value left of this lane's P values `mid`, those, and the value right of them. The
// neighbours come from the next lanes by shuffle; the warp's end lanes take theirs from edge(-1) (lane 0)
// and edge(P) (lane 31), called by that lane only. Every lane of the warp calls it.
template <int P, typename Edge>
__device__ __forceinline__ void with_neighbours(const float (&mid)[P], Edge edge, float (&out)[P + 2]) {
  const int lane = threadIdx.x % 32;
  float left = __shfl_up_sync(0xffffffffu, mid[P - 1], 1);
  float right = __shfl_down_sync(0xffffffffu, mid[0], 1);
  if (lane == 0) left = edge(-1);
  if (lane == 31) right = edge(P);
  out[0] = left;
#pragma unroll
  for (int p = 0; p < P; ++p) out[p + 1] = mid[p];
  out[P + 1] = right;
}

// Row r of a float32 state plane at columns w0 - 1 .. w0 + P into out[0 .. P + 1], zero outside the
// plane; `tiled`: a column direction's layout (column_state_offset), else the plane's own. Lane k holds
// w0 = first + k P, and W % P == 0, so that the P columns are contiguous in either layout.
template <int P>
__device__ __forceinline__ void load_row(const float* plane, bool tiled, int r, int w0, const Shape& s,
                                         float (&out)[P + 2]) {
  const bool row_inside = r >= 0 && r < s.H;
  auto at = [&](int w) { return tiled ? column_state_offset(r, w, s.H, s.W) : int64_t(r) * s.W + w; };
  float mid[P] = {};
  if (row_inside && w0 < s.W) load_pack<float, P>(plane + at(w0), mid);
  auto edge = [&](int k) { return row_inside && (k < 0 ? w0 > 0 : w0 + k < s.W) ? plane[at(w0 + k)] : 0.f; };
  with_neighbours<P>(mid, edge, out);
}

// out[0 .. P) += v, atomically (one vector reduction on sm_90 and later when P = 4).
template <int P>
__device__ __forceinline__ void atomic_add(float* out, const float (&v)[P]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (P == 4) {
    atomicAdd(reinterpret_cast<float4*>(out), make_float4(v[0], v[1], v[2], v[3]));
  } else
#endif
  {
#pragma unroll
    for (int p = 0; p < P; ++p) atomicAdd(out + p, v[p]);
  }
}

// With four positions per lane, the float32 states pass through shared memory, copied asynchronously
// one channel ahead (cp.async needs no registers, so a block keeps a whole channel's states in flight;
// loaded straight into registers, two blocks of 8 warps per multiprocessor stalled on them):
// h on rows hh0 - 1 .. hh0 + kGradRows and 4-column chunks of the block's columns and one chunk on
// either side; gh on the block's own positions. A row direction's rows are contiguous. A column
// direction's tiles of 4 columns (column_state_offset) hold a row as a 16-byte vector 4 H apart, so
// they are copied chunk by chunk, down the contiguous rows of each, and padded to an odd number of
// 16-byte rows, so that the lanes of a quarter-warp read distinct banks.
constexpr int kChunks = 34;                          // 4-column chunks of a staged row of h
constexpr int kColumnPitch = (kGradRows + 3) * 4;    // floats per staged chunk of a column direction's h
constexpr int kColumnGhPitch = (kGradRows + 1) * 4;  // and of its gh
constexpr int kRowPitch = kChunks * 4;               // floats per staged row of a row direction's h
struct StateStage {  // one channel's, [direction pair]
  float h_columns[2][kChunks * kColumnPitch];  // chunk-major
  float gh_columns[2][32 * kColumnGhPitch];
  float h_rows[2][(kGradRows + 2) * kRowPitch];  // row-major
  float gh_rows[2][kGradRows * 32 * 4];
};

// Starts copying the states of channel plane `channel0` (direction d at d * direction_stride) around
// the tile at (hh0, ww0) into `stage`; outside the plane: zeros. W % 4 == 0.
__device__ __forceinline__ void stage_states(StateStage& stage, const float* h, const float* gh, int64_t channel0,
                                             int64_t direction_stride, int hh0, int ww0, const Shape& s) {
  const int chunk0 = ww0 / 4 - 1;  // of h; gh starts one chunk later
  // The 16 bytes at row r, columns 4 c4 .. 4 c4 + 3 of `state` in directions `first` and `first` + 1, to
  // dst[d] + at.
  auto piece = [&](float* const (&dst)[2], int at, const float* state, int first, int r, int c4) {
    const bool ok = r >= 0 && r < s.H && c4 >= 0 && 4 * c4 < s.W;
    const int64_t from = !ok ? 0 : first < 2 ? column_state_offset(r, 4 * c4, s.H, s.W) : int64_t(r) * s.W + 4 * c4;
#pragma unroll
    for (int d = 0; d < 2; ++d)
      cp_async16(dst[d] + at, state + channel0 + (first + d) * direction_stride + from, ok);
  };
  float* const h_columns[2] = {stage.h_columns[0], stage.h_columns[1]};
  float* const h_rows[2] = {stage.h_rows[0], stage.h_rows[1]};
  float* const gh_columns[2] = {stage.gh_columns[0], stage.gh_columns[1]};
  float* const gh_rows[2] = {stage.gh_rows[0], stage.gh_rows[1]};
  for (int k = threadIdx.x; k < kChunks * (kGradRows + 2); k += blockDim.x) {
    // columns: consecutive threads copy consecutive rows of one chunk; rows: consecutive chunks of one row
    const int chunk = k / (kGradRows + 2), row = k % (kGradRows + 2);
    piece(h_columns, chunk * kColumnPitch + row * 4, h, 0, hh0 - 1 + row, chunk0 + chunk);
    piece(h_rows, k / kChunks * kRowPitch + k % kChunks * 4, h, 2, hh0 - 1 + k / kChunks, chunk0 + k % kChunks);
  }
  for (int k = threadIdx.x; k < 32 * kGradRows; k += blockDim.x) {
    const int chunk = k / kGradRows, row = k % kGradRows;
    piece(gh_columns, chunk * kColumnGhPitch + row * 4, gh, 0, hh0 + row, chunk0 + 1 + chunk);
    piece(gh_rows, k / 32 * 32 * 4 + k % 32 * 4, gh, 2, hh0 + k / 32, chunk0 + 1 + k % 32);
  }
}

// A staged row of h as load_row<4> gives it (columns w0 - 1 .. w0 + 4 of lane k's w0): `first` is the
// row's element in chunk 0, chunks are `pitch` floats apart.
__device__ __forceinline__ void staged_row(const float* first, int pitch, float (&out)[6]) {
  float mid[4];
  load_pack<float, 4>(first + (threadIdx.x % 32 + 1) * pitch, mid);
  with_neighbours<4>(mid, [&](int k) { return k < 0 ? first[3] : first[(kChunks - 1) * pitch]; }, out);
}

// With four positions per lane and 16-bit inputs, lam and grad_y of a channel (every direction) pass
// through shared memory as well, one channel ahead with its states, each lane copying its own 4 positions
// (8 bytes) of each. Loaded straight into registers they left the warps waiting on global memory (ncu,
// SDXL 16K level 1: 71% of the stalls); staged, the pass took 5.27 -> 4.46 ms (H100). Two blocks still
// fit a multiprocessor (2 x 113 KB); float32 inputs would need twice that, so they are loaded directly.
template <typename T> constexpr bool kStagesInputs = sizeof(T) == 2;
template <typename T> struct InputStage {  // one channel's, [direction][thread]
  Pack<T, 4> lam[4][32 * kGradRows];
  Pack<T, 4> gy[4][32 * kGradRows];
};

// Starts copying this lane's 4 positions at `pos` of lam and (with u) grad_y of a channel, every
// direction (`lam`, `gy`: the channel's direction-0 plane); zeros outside the plane.
template <typename T>
__device__ __forceinline__ void stage_inputs(InputStage<T>& stage, const T* lam, const T* gy, int64_t pos,
                                             int64_t direction_stride, bool inside) {
#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const int64_t at = inside ? d * direction_stride + pos : 0;
    cp_async8(&stage.lam[d][threadIdx.x], lam + at, inside);
    if (gy) cp_async8(&stage.gy[d][threadIdx.x], gy + at, inside);
  }
}

// Shared memory of gradients_kernel<T, GG, P>.
template <typename T>
size_t gradients_smem(int P) {
  return P != 4 ? 0 : 2 * sizeof(StateStage) + (kStagesInputs<T> ? 2 * sizeof(InputStage<T>) : 0);
}

// gy, glam, gu: (B, 4, C, H, W), dense; h, gh: the float32 states (Lines::state_offset); gx like x; ggates:
// (B, 4, 3, G, H, W), dense, of type GG: float32 when a group has several slices. P = 4 needs W % 4 == 0
// and every plane aligned to 4 elements (16 bytes for the states).
// Block (tile, slice, g, b) takes a tile of kGradRows x 32 P positions (a warp a row) of the channels of
// one slice of gate group g (gspn_api.h), in all four directions; with several slices a group's blocks
// add their gate gradients atomically into a zero-filled ggates.
template <typename T, typename GG, int P>
__global__ void __launch_bounds__(32 * kGradRows, 2)
    gradients_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ gates,
                     const T* __restrict__ lam, const T* __restrict__ u, const float* __restrict__ h,
                     const float* __restrict__ gh, T* __restrict__ gx, GG* __restrict__ ggates,
                     T* __restrict__ glam, T* __restrict__ gu, Shape s) {
  const int per_group = s.C / s.G;
  const int slices = gradient_slices(s);
  const int tiles = gradient_tiles(s, P), tiles_w = gradient_tiles_w(s, P);
  int blk = blockIdx.x;
  const int tile = blk % tiles;
  blk /= tiles;
  const int slice = blk % slices;
  blk /= slices;
  const int g = blk % s.G;
  const int b = blk / s.G;
  constexpr bool kStaged = P == 4;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  StateStage* stages = reinterpret_cast<StateStage*>(smem_raw);  // two, alternating over channels
  const int hh0 = tile / tiles_w * kGradRows, ww0 = tile % tiles_w * 32 * P;
  const int hh = hh0 + int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (!kStaged && hh >= s.H) return;  // the whole warp: no barrier follows
  const int w0 = ww0 + lane * P;
  const bool inside = hh < s.H && w0 < s.W;  // all P positions, as W % P == 0
  const int64_t plane = int64_t(s.H) * s.W;
  const int64_t pos = int64_t(hh) * s.W + w0;
  const int slice_channels = gradient_slice_channels(s);
  const int c_begin = g * per_group + slice * slice_channels;
  const int c_end = min(c_begin + slice_channels, (g + 1) * per_group);
  auto channel_plane = [&](int c) { return (int64_t(b) * 4 * s.C + c) * plane; };  // dense (b, 0, c)
  constexpr bool kInputs = kStaged && kStagesInputs<T>;
  InputStage<T>* inputs = reinterpret_cast<InputStage<T>*>(smem_raw + 2 * sizeof(StateStage));  // kInputs
  auto stage_channel = [&](int c) {
    stage_states(stages[c & 1], h, gh, channel_plane(c), s.C * plane, hh0, ww0, s);
    if constexpr (kInputs)
      stage_inputs<T>(inputs[c & 1], lam + b * s.lam_batch_stride + int64_t(c) * plane,
                      u ? gy + channel_plane(c) : nullptr, pos, s.C * plane, inside);
  };
  if constexpr (kStaged) {
    stage_channel(c_begin);
    cp_async_commit();
  }

  float gw[4][3][P] = {};  // per direction and tap, summed over the slice's channels
  for (int c = c_begin; c < c_end; ++c) {
    const int64_t channel0 = channel_plane(c);
    const StateStage& stage = stages[c & 1];
    if constexpr (kStaged) {
      // into the stage the last channel used (released by the barrier at the end of the loop)
      if (c + 1 < c_end) stage_channel(c + 1);
      cp_async_commit();
      cp_async_wait_previous();  // this channel's stage has landed
      __syncthreads();
    }
    float xv[P] = {}, gx_sum[P] = {};
    if (inside) load_pack<T, P>(x + (int64_t(b) * s.C + c) * plane + pos, xv);
#pragma unroll
    for (int d = 0; d < 4; ++d) {
      const int64_t base = channel0 + d * int64_t(s.C) * plane;
      const int r = hh - hh0;  // the staged row of h above this one
      // h_{t-1}[i + k - 1] (tap k) and h_t[i] of each position: columns (d = 0, 1) step along w, so
      // the taps are the rows above, at and below, one column back; rows step along h, so the taps are
      // three columns of the row before.
      float prev[3][P], now[P] = {}, ghv[P] = {};
      if (d < 2) {
        float rows[3][P + 2];
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          if constexpr (kStaged) staged_row(stage.h_columns[d] + (r + k) * 4, kColumnPitch, rows[k]);
          else load_row<P>(h + base, true, hh - 1 + k, w0, s, rows[k]);
        }
#pragma unroll
        for (int p = 0; p < P; ++p) {
#pragma unroll
          for (int k = 0; k < 3; ++k) prev[k][p] = rows[k][d == 0 ? p : p + 2];
          now[p] = rows[1][p + 1];
        }
        if constexpr (kStaged) load_pack<float, P>(stage.gh_columns[d] + lane * kColumnGhPitch + r * 4, ghv);
        else if (inside) load_pack<float, P>(gh + base + column_state_offset(hh, w0, s.H, s.W), ghv);
      } else {
        float row[P + 2];
        const int before = d == 2 ? hh - 1 : hh + 1;  // the line before, in scan order
        if constexpr (kStaged) {
          staged_row(stage.h_rows[d - 2] + (before - hh0 + 1) * kRowPitch, 4, row);
          load_pack<float, P>(stage.h_rows[d - 2] + (r + 1) * kRowPitch + (lane + 1) * 4, now);
          load_pack<float, P>(stage.gh_rows[d - 2] + r * 32 * 4 + lane * 4, ghv);
        } else {
          load_row<P>(h + base, false, before, w0, s, row);
          if (inside) {
            load_pack<float, P>(gh + base + pos, ghv);
            if (u) load_pack<float, P>(h + base + pos, now);
          }
        }
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
          for (int k = 0; k < 3; ++k) prev[k][p] = row[p + k];
      }
      if (!inside) continue;
      float lv[P], out[P];
      if constexpr (kInputs) load_pack<T, P>(inputs[c & 1].lam[d][threadIdx.x].v, lv);
      else load_pack<T, P>(lam + b * s.lam_batch_stride + (int64_t(d) * s.C + c) * plane + pos, lv);
#pragma unroll
      for (int p = 0; p < P; ++p) {
        out[p] = ghv[p] * xv[p];
        gx_sum[p] += ghv[p] * lv[p];
#pragma unroll
        for (int k = 0; k < 3; ++k) gw[d][k][p] += ghv[p] * prev[k][p];
      }
      store_pack<T, P>(glam + base + pos, out);
      if (u) {
        float gyv[P];
        if constexpr (kInputs) load_pack<T, P>(inputs[c & 1].gy[d][threadIdx.x].v, gyv);
        else load_pack<T, P>(gy + base + pos, gyv);
#pragma unroll
        for (int p = 0; p < P; ++p) out[p] = gyv[p] * now[p];
        store_pack<T, P>(gu + base + pos, out);
      }
    }
    if (inside) store_pack<T, P>(gx + (int64_t(b) * s.C + c) * plane + pos, gx_sum);
    if constexpr (kStaged) __syncthreads();  // stage c & 1 is consumed: channel c + 2 may overwrite it
  }
  if (!inside) return;

  const int64_t tap_stride = int64_t(s.G) * plane;
#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const Lines ln(d, s.H, s.W);
    const T* logits = gates + b * s.gates_batch_stride + (int64_t(d) * 3 * s.G + g) * plane + pos;
    float g0[P], g1[P], g2[P], v[3][P];
    load_pack<T, P>(logits, g0);
    load_pack<T, P>(logits + tap_stride, g1);
    load_pack<T, P>(logits + 2 * tap_stride, g2);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      int t, i;
      ln.locate(hh, w0 + p, t, i);
      const Taps taps(g0[p], g1[p], g2[p], i > 0, i < ln.L - 1);
      const float mean = taps.w[0] * gw[d][0][p] + taps.w[1] * gw[d][1][p] + taps.w[2] * gw[d][2][p];
      const bool restart = t % s.chunk == 0;  // nothing propagates into a chunk's first line
#pragma unroll
      for (int k = 0; k < 3; ++k)
        v[k][p] = restart ? 0.f : taps.rest[k] * taps.w[k] * (gw[d][k][p] - mean);
    }
    GG* out = ggates + ((int64_t(b) * 4 + d) * 3 * s.G + g) * plane + pos;  // tap k at k * G * plane
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (slices == 1) {
        store_pack<GG, P>(out + k * tap_stride, v[k]);
      } else if constexpr (std::is_same_v<GG, float>) {
        atomic_add<P>(out + k * tap_stride, v[k]);
      }
    }
  }
}

}  // namespace gspn
