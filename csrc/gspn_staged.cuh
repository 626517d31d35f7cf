// Staged GSPN-2 backward: the fast path of the backward for grids whose rows are 16-byte aligned (W a
// multiple of 16 / sizeof(T)). Same block structure and arithmetic as gspn_backward.cuh, but the inputs
// of each group of VEC scan steps travel global -> shared memory with cp.async, one group ahead of the
// compute, so DRAM latency overlaps the scan:
//   columns (d = 0, 1): each thread copies the VEC steps of its own positions (contiguous along w) and
//                       reads them back as one vector; the scan walks across rows without a strided
//                       access per step;
//   rows (d = 2, 3):    the block copies VEC whole rows in 16-byte chunks; threads read their position.
// Every thread holds 8 / P bytes per position and tensor per group (P positions per thread), so the
// staging area is 2 x tensors x 8 B x threads whatever the dtype and line length.
#pragma once

#include "gspn_common.cuh"

namespace gspn {

constexpr int kStagedThreads = 1024;
constexpr size_t kSharedLimit = 227 * 1024;

template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem_ptr, const void* gmem_ptr) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_ptr));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem_ptr), "n"(BYTES));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_previous() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// The staging area of one group: NT tensors, each `cap` positions x VEC steps of T.
//   columns: [tensor][position][step]      rows: [tensor][step][position]
template <typename T, int VEC>
struct Stage {
  T* base;
  int cap;
  __device__ __forceinline__ T* tensor(int k) const { return base + size_t(k) * cap * VEC; }
};

// Issue the copies of group `grp` (steps grp*VEC ..) of NT planes into `stage`.
template <typename T, int VEC, int P, int NT>
__device__ __forceinline__ void stage_group(const T* const (&planes)[NT], const Lines& ln, bool columns, int grp,
                                            const Stage<T, VEC>& stage) {
  constexpr int VB = VEC * int(sizeof(T));
  const int t0 = grp * VEC;
  if (columns) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
      const int first = ln.reversed ? ln.offset(t0 + VEC - 1, i) : ln.offset(t0, i);
#pragma unroll
      for (int k = 0; k < NT; ++k)
        if (planes[k]) cp_async<VB>(stage.tensor(k) + size_t(i) * VEC, planes[k] + first);
    }
  } else {
    constexpr int per_chunk = 16 / int(sizeof(T));
    const int chunks_per_row = ln.L / per_chunk;
    for (int c = threadIdx.x; c < chunks_per_row * VEC; c += blockDim.x) {
      const int st = c / chunks_per_row;
      const int e = (c - st * chunks_per_row) * per_chunk;
      if (t0 + st >= ln.T) continue;
      const int off = ln.offset(t0 + st, e);
#pragma unroll
      for (int k = 0; k < NT; ++k)
        if (planes[k]) cp_async<16>(stage.tensor(k) + size_t(st) * stage.cap + e, planes[k] + off);
    }
  }
}

// Register arrays must be indexed with compile-time constants (else they go to local memory): step st of
// a column vector sits at slot st, or VEC-1-st where the scan runs against memory order.
template <int VEC, typename V>
__device__ __forceinline__ V slot_get(const V (&arr)[VEC], bool reversed, int st) {
  return reversed ? arr[VEC - 1 - st] : arr[st];
}
template <int VEC, typename V>
__device__ __forceinline__ void slot_set(V (&arr)[VEC], bool reversed, int st, V value) {
#pragma unroll
  for (int q = 0; q < VEC; ++q)
    if (q == (reversed ? VEC - 1 - st : st)) arr[q] = value;
}

// Value of tensor k at step st of the group for position i: from the thread's column vector
// (already in registers) or from the staged rows.
template <typename T, int VEC>
__device__ __forceinline__ float staged_value(const Pack<T, VEC>& column, const Stage<T, VEC>& stage, bool columns,
                                              bool reversed, int k, int st, int i) {
  if (columns) return to_acc(slot_get<VEC>(column.v, reversed, st));
  return to_acc(stage.tensor(k)[size_t(st) * stage.cap + i]);
}

}  // namespace gspn

namespace gspn {

// Gate gradients: a store when the block holds every channel of its group, else an atomic sum over the
// blocks (channel slices) of the group.
__device__ __forceinline__ void put_gate_grad(float* dst, float v, bool sum_over_slices) {
  if (sum_over_slices) atomicAdd(dst, v);
  else *dst = v;
}

template <typename T, int CB, int P>
__global__ void __launch_bounds__(kStagedThreads)
    staged_backward_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ gates,
                           const T* __restrict__ lam, const T* __restrict__ u, const float* __restrict__ h,
                           float* __restrict__ gx_dir, float* __restrict__ ggates, T* __restrict__ glam,
                           T* __restrict__ gu, Shape s) {
  constexpr int VEC = 8 / P / int(sizeof(T));
  constexpr int NT = 3 + 4 * CB;  // gate taps 0..2, then gy, x, lam, u of each channel
  enum { GY = 0, X = 1, LAM = 2, U = 3 };
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cap = P * blockDim.x;
  const int row = max(s.H, s.W) + 2;
  T* staging = reinterpret_cast<T*>(smem_raw);  // 2 stages of NT tensors
  float* state_staging = reinterpret_cast<float*>(smem_raw + size_t(2) * NT * cap * VEC * sizeof(T));  // 2 x CB
  float* gh_lines = state_staging + size_t(2) * CB * cap * VEC;  // [2][CB][row]
  float* w_lines = gh_lines + 2 * CB * row;                                                        // [2][3][row]
  float* h_prev = w_lines + 2 * 3 * row;                                                           // [CB][row]

  int blk = blockIdx.x;
  const int slices = s.C / CB;
  const int c0 = (blk % slices) * CB;
  blk /= slices;
  const int d = blk % 4;
  const int b = blk / 4;
  const int g = c0 / (s.C / s.G);
  const bool sum_over_slices = (s.C / s.G) > CB;
  const Lines ln(d, s.H, s.W);
  const int64_t plane = int64_t(s.H) * s.W;
  const bool columns = d < 2;

  const T* planes[NT];
  const float* states[CB];
  float* gxp[CB];
  T *glp[CB], *gup[CB];
  float* ggp[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    planes[k] = gates + b * s.gates_batch_stride + ((int64_t(d) * 3 + k) * s.G + g) * plane;
    ggp[k] = ggates + (((int64_t(b) * 4 + d) * 3 + k) * s.G + g) * plane;
  }
#pragma unroll
  for (int j = 0; j < CB; ++j) {
    const int64_t in_batch = int64_t(d) * s.C + c0 + j;
    const int64_t dense = (int64_t(b) * 4 * s.C + in_batch) * plane;
    planes[3 + 4 * j + GY] = gy + dense;
    planes[3 + 4 * j + X] = x + (int64_t(b) * s.C + c0 + j) * plane;
    planes[3 + 4 * j + LAM] = lam + b * s.lam_batch_stride + in_batch * plane;
    planes[3 + 4 * j + U] = u ? u + b * s.u_batch_stride + in_batch * plane : nullptr;
    states[j] = h + dense;
    gxp[j] = gx_dir + dense;
    glp[j] = glam + dense;
    gup[j] = u ? gu + dense : nullptr;
  }

  for (int k = threadIdx.x; k < (2 * CB + 6 + CB) * row; k += blockDim.x) gh_lines[k] = 0.f;

  const int groups = (ln.T + VEC - 1) / VEC;
  auto stage_of = [&](int grp) { return Stage<T, VEC>{staging + size_t(grp & 1) * NT * cap * VEC, cap}; };
  auto state_stage_of = [&](int grp) {
    return Stage<float, VEC>{state_staging + size_t(grp & 1) * CB * cap * VEC, cap};
  };
  auto stage_both = [&](int grp) {
    stage_group<T, VEC, P, NT>(planes, ln, columns, grp, stage_of(grp));
    stage_group<float, VEC, P, CB>(states, ln, columns, grp, state_stage_of(grp));
  };
  stage_both(groups - 1);
  cp_async_commit();

  int parity = 0;
  ChunkPhase phase(groups * VEC - 1, s.chunk);  // phase of the step being processed
  for (int grp = groups - 1; grp >= 0; --grp) {
    if (grp > 0) stage_both(grp - 1);
    cp_async_commit();
    cp_async_wait_previous();
    __syncthreads();
    const Stage<T, VEC> stage = stage_of(grp);
    const Stage<float, VEC> state_stage = state_stage_of(grp);
    const int t0 = grp * VEC;

    Pack<T, VEC> col[P][NT];
    Pack<float, VEC> state_col[P][CB];
    float h_before[P][CB];  // h at line t0 - 1
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = threadIdx.x + p * blockDim.x;
      if (i >= ln.L) continue;
      if (columns) {
#pragma unroll
        for (int k = 0; k < NT; ++k)
          if (planes[k]) col[p][k] = reinterpret_cast<const Pack<T, VEC>*>(stage.tensor(k))[i];
#pragma unroll
        for (int j = 0; j < CB; ++j)
          state_col[p][j] = reinterpret_cast<const Pack<float, VEC>*>(state_stage.tensor(j))[i];
      }
#pragma unroll
      for (int j = 0; j < CB; ++j) h_before[p][j] = t0 > 0 ? states[j][ln.offset(t0 - 1, i)] : 0.f;
    }
    Pack<T, VEC> glam_col[P][CB], gu_col[P][CB];
    float gx_col[P][CB][VEC], gg_col[P][3][VEC];

#pragma unroll
    for (int st = VEC - 1; st >= 0; --st) {
      const int t = t0 + st;
      const bool carried = t + 1 < ln.T && phase.phase + 1 != s.chunk;  // line t+1 continues the chunk
      const bool restart = phase.starts();
      phase.backward();
      if (t >= ln.T) continue;  // uniform across the block

      // Phase A: publish h_{t-1}[i] for the neighbours' gate gradients.
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int i = threadIdx.x + p * blockDim.x;
        if (restart || i >= ln.L) continue;
#pragma unroll
        for (int j = 0; j < CB; ++j)
          h_prev[j * row + i + 1] =
              st > 0 ? staged_value<float, VEC>(state_col[p][j], state_stage, columns, ln.reversed, j, st - 1, i)
                     : h_before[p][j];
      }
      __syncthreads();

      // Phase B: gh_t from line t+1, every gradient at line t, then publish gh_t and m_t w[t].
      const float* gh_next = gh_lines + (parity ^ 1) * CB * row;
      const float* w_next = w_lines + (parity ^ 1) * 3 * row;
      float* gh_here = gh_lines + parity * CB * row;
      float* w_here = w_lines + parity * 3 * row;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= ln.L) continue;
        auto value = [&](int k) { return staged_value<T, VEC>(col[p][k], stage, columns, ln.reversed, k, st, i); };
        const Taps<float> taps(value(0), value(1), value(2), i > 0, i < ln.L - 1);
        float gw[3] = {0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < CB; ++j) {
          const int base = 3 + 4 * j;
          const float g_y = value(base + GY);
          float gh = u ? g_y * value(base + U) : g_y;
          if (carried) {
            const float* gn = gh_next + j * row + i;  // gn[k] = gh_{t+1}[i + k - 1]
            gh += w_next[0 * row + i + 2] * gn[2] + w_next[1 * row + i + 1] * gn[1] + w_next[2 * row + i] * gn[0];
          }
          const float g_lam = gh * value(base + X);
          const float g_x = gh * value(base + LAM);
          const float g_u = g_y * staged_value<float, VEC>(state_col[p][j], state_stage, columns, ln.reversed, j, st, i);
          if (!restart) {
            const float* hn = h_prev + j * row + i;  // hn[k] = h_{t-1}[i + k - 1]
            gw[0] += gh * hn[0];
            gw[1] += gh * hn[1];
            gw[2] += gh * hn[2];
          }
          gh_here[j * row + i + 1] = gh;
          if (columns) {
            slot_set<VEC>(glam_col[p][j].v, ln.reversed, st, from_acc<T>(g_lam));
            slot_set<VEC>(gu_col[p][j].v, ln.reversed, st, from_acc<T>(g_u));
            slot_set<VEC>(gx_col[p][j], ln.reversed, st, g_x);
          } else {
            const int off = ln.offset(t, i);
            glp[j][off] = from_acc<T>(g_lam);
            gxp[j][off] = g_x;
            if (u) gup[j][off] = from_acc<T>(g_u);
          }
        }
        float gg[3] = {0.f, 0.f, 0.f};
        if (restart) {
          w_here[0 * row + i + 1] = w_here[1 * row + i + 1] = w_here[2 * row + i + 1] = 0.f;
        } else {
          // d/ds_k of w_m = s_m / S is (delta_km - w_m) / S; d s_k / d logit_k = s_k (1 - s_k).
          const float mean = taps.w(0) * gw[0] + taps.w(1) * gw[1] + taps.w(2) * gw[2];
#pragma unroll
          for (int k = 0; k < 3; ++k) {
            gg[k] = taps.s[k] * (1.f - taps.s[k]) * taps.inv_sum * (gw[k] - mean);
            w_here[k * row + i + 1] = taps.w(k);
          }
        }
        if (columns) {
#pragma unroll
          for (int k = 0; k < 3; ++k) slot_set<VEC>(gg_col[p][k], ln.reversed, st, gg[k]);
        } else {
          const int off = ln.offset(t, i);
#pragma unroll
          for (int k = 0; k < 3; ++k) put_gate_grad(ggp[k] + off, gg[k], sum_over_slices);
        }
      }
      __syncthreads();
      parity ^= 1;
    }

    if (columns) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= ln.L) continue;
        const int first = ln.reversed ? ln.offset(t0 + VEC - 1, i) : ln.offset(t0, i);
#pragma unroll
        for (int j = 0; j < CB; ++j) {
          *reinterpret_cast<Pack<T, VEC>*>(glp[j] + first) = glam_col[p][j];
          if (u) *reinterpret_cast<Pack<T, VEC>*>(gup[j] + first) = gu_col[p][j];
          Pack<float, VEC> gxv;
#pragma unroll
          for (int q = 0; q < VEC; ++q) gxv.v[q] = gx_col[p][j][q];
          *reinterpret_cast<Pack<float, VEC>*>(gxp[j] + first) = gxv;
        }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          if (sum_over_slices) {
#pragma unroll
            for (int q = 0; q < VEC; ++q) atomicAdd(ggp[k] + first + q, gg_col[p][k][q]);
          } else {
            Pack<float, VEC> ggv;
#pragma unroll
            for (int q = 0; q < VEC; ++q) ggv.v[q] = gg_col[p][k][q];
            *reinterpret_cast<Pack<float, VEC>*>(ggp[k] + first) = ggv;
          }
        }
      }
    }
  }
}

}  // namespace gspn
