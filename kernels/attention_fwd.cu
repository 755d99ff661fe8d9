// attention_fwd kernel (see attention_fwd.cuh; the reference is depthpro_fast/ops/attention.py
// and the Triton twin depthpro_fast/triton/attention.py).
//
// Algorithm (flash-attention-2 forward, written from the paper's description):
//   grid (ceil(N / 64), B * H), 128 threads = 4 warps; warp w owns query rows 16w..16w+15 of
//   the CTA's 64-row tile. For every 64-key tile j:
//     S = Q K_j^T                         (tensor cores, fp32 accumulators, registers)
//     S = S * scale * log2(e); keys >= N -> -inf
//     m_new = max(m, rowmax(S)); alpha = 2^(m - m_new); P = 2^(S - m_new)
//     l = l * alpha + rowsum(P);  O = O * alpha + P V_j   (P rounded to fp16/bf16 for the mma)
//   and finally out = O / l. The 64x64 S tile never leaves registers: the accumulator fragment
//   of S is, element for element, the A operand fragment of the P V product (see below).
//
// Memory: Q tile (64 x D) is loaded once to shared memory, then to registers (A fragments).
// K and V tiles (64 x D each) are double-buffered in shared memory: the cp.async loads of tile
// j + 1 are in flight while tile j is computed. Rows past N are zero-filled by cp.async
// (src-size 0), so padding rows never read out of bounds. Shared rows are padded by 8 elements
// (16 bytes): a row is then D/2 + 4 banks (4-byte words) long, and the 8 row addresses of one
// ldmatrix 8x8 matrix (16 bytes each) fall in 8 disjoint groups of 4 banks -> no conflicts.
// The output tile is staged through the (no longer needed) Q shared memory so that global
// stores are 16-byte vectors along (B, N, H, D)-contiguous rows.
//
// ---------------------------------------------------------------------------------------
// PTX fragment layouts relied on (PTX ISA, "Matrix fragments for mma.m16n8k16 with
// floating point type" and "ldmatrix"). lane = thread index in the warp,
// g = lane >> 2 ("groupID"), t = lane & 3 ("threadID_in_group").
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32  D = A (16x16) * B (16x8) + C
//   A (row-major, 4 x .b32 regs, each holding 2 consecutive-column elements, lower column in
//     the low 16 bits):
//       a0: (row g,     cols 2t, 2t+1)      a1: (row g + 8, cols 2t, 2t+1)
//       a2: (row g,     cols 2t+8, 2t+9)    a3: (row g + 8, cols 2t+8, 2t+9)
//   B (16 x 8, "col": 2 x .b32 regs, each 2 consecutive-k elements, lower k low):
//       b0: (k 2t, 2t+1; col n = g)         b1: (k 2t+8, 2t+9; col n = g)
//   C / D (16 x 8, fp32, 4 regs):
//       c0, c1: (row g, cols 2t, 2t+1)      c2, c3: (row g + 8, cols 2t, 2t+1)
//
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: loads four 8x8 matrices of 16-bit elements.
//   Lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 contiguous bytes each).
//   Destination reg r_i (matrix i) of lane l holds row l >> 2, elements (cols) 2(l & 3) and
//   2(l & 3) + 1 of matrix i -- the same "row g, cols 2t, 2t+1" pattern as a0 / c0 above.
//   With .trans, r_i holds matrix i's transpose: elements (row 2(l & 3), col l >> 2) and
//   (row 2(l & 3) + 1, col l >> 2).
//
// Consequences used here:
//   * Q A-fragment of a 16x16 slice (rows r0.., cols k0..): matrices
//       0 = rows 0-7 / cols 0-7 (a0), 1 = rows 8-15 / cols 0-7 (a1),
//       2 = rows 0-7 / cols 8-15 (a2), 3 = rows 8-15 / cols 8-15 (a3);
//     lane l points at row (l & 7) + 8 * ((l >> 3) & 1), col 8 * (l >> 4)   [ldsm_a_row/col].
//   * K as the B operand of S = Q K^T: B[k = d][n = key] = K[key][d], so b0 of lane l must be
//     K[key g][d 2t, 2t+1] -- exactly a non-transposed ldmatrix of an 8x8 block of K stored
//     row-major [key][d]. x4 matrices: 0 = keys 0-7 / d 0-7 (b0 of key tile n0),
//     1 = keys 0-7 / d 8-15 (b1 of n0), 2 = keys 8-15 / d 0-7 (b0 of n0 + 8),
//     3 = keys 8-15 / d 8-15 (b1 of n0 + 8); lane l points at key (l & 7) + 8 * (l >> 4),
//     d 8 * ((l >> 3) & 1)   [ldsm_k_row/col].
//   * V as the B operand of O = P V: B[k = key][n = d] = V[key][d], so b0 of lane l must be
//     V[key 2t, 2t+1][d g] -- the .trans ldmatrix of an 8x8 block of V stored row-major
//     [key][d]. x4 matrices: 0 = keys 0-7 / d 0-7 (b0 of d tile n0), 1 = keys 8-15 / d 0-7
//     (b1 of n0), 2 = keys 0-7 / d 8-15 (b0 of n0 + 8), 3 = keys 8-15 / d 8-15 (b1 of n0 + 8);
//     lane l points at key (l & 7) + 8 * ((l >> 3) & 1), d 8 * (l >> 4) -- the same addressing
//     as the Q A-fragment   [ldsm_a_row/col].
//   * P as the A operand: S tiles 2kk and 2kk + 1 (keys 16kk..16kk+7 and 16kk+8..16kk+15) in
//     C layout give, per lane, (row g, keys 2t, 2t+1), (row g+8, same), (row g, keys 2t+8,
//     2t+9), (row g+8, same) -- the A fragment (a0, a1, a2, a3) of key slice kk:
//       a0 = pack(S[2kk][0], S[2kk][1]),   a1 = pack(S[2kk][2], S[2kk][3]),
//       a2 = pack(S[2kk+1][0], S[2kk+1][1]), a3 = pack(S[2kk+1][2], S[2kk+1][3]).
//   * Row statistics: the 4 lanes of a quad (same g) hold all 64 keys of rows g and g + 8,
//     so row max / sum need only __shfl_xor_sync with masks 1 and 2.
// ---------------------------------------------------------------------------------------
//
// Alignment: 16-byte cp.async needs 16-byte aligned global addresses, so the launcher refuses
// (cudaErrorInvalidValue) tensors whose base or (B, H, N) strides are not multiples of 16 bytes
// or whose last-dim stride is not 1; csrc/attention.cpp makes a contiguous copy in that case.
#include "attention_fwd.cuh"

#include <cmath>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace depthpro_fast {
namespace attention {

#define DPF_HD __host__ __device__ __forceinline__

// ---- Pure index helpers (host + device, so a host program can check the lane mappings) ----

// Row / column inside a 16x16 tile that lane `lane` addresses for an ldmatrix.x4 producing an
// mma A fragment (also used for the V .trans load, whose matrix order is the same).
DPF_HD int ldsm_a_row(int lane) { return (lane & 7) + 8 * ((lane >> 3) & 1); }
DPF_HD int ldsm_a_col(int lane) { return 8 * (lane >> 4); }
// Key row / d column that lane `lane` addresses for the non-transposed K ldmatrix.x4 (two
// adjacent 8-key B fragments of one 16-wide d slice).
DPF_HD int ldsm_k_row(int lane) { return (lane & 7) + 8 * (lane >> 4); }
DPF_HD int ldsm_k_col(int lane) { return 8 * ((lane >> 3) & 1); }
// Row / column of accumulator element i (0..3) of lane `lane` in a 16x8 C fragment.
DPF_HD int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
DPF_HD int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }
// Element offset of out[b, row, h, 0] in the (B, N, H, D)-contiguous output.
DPF_HD int64_t out_offset(int64_t b, int64_t row, int64_t h, int N, int H, int D) {
  return ((b * N + row) * H + h) * D;
}

// ---- Element type traits ----
template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static constexpr int kDtype = 0;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // lo -> low 16 bits
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kDtype = 1;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // lo -> low 16 bits
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ---- PTX wrappers (sm_80+) ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid, nothing is read and the 16 bytes are zeroed
// (src-size operand 0). `src` must still be a valid, aligned address.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += A * B, one m16n8k16 tensor-core product with fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int H, N;
  int64_t qs[4], ks[4], vs[4];  // element strides (B, H, N, D); D stride is 1
  float qk_scale;               // scale * log2(e)
};

template <int D>
struct Smem {
  static constexpr int kStride = D + 8;  // elements per shared row (+16 bytes: no conflicts)
  static constexpr int kTile = kBlockM * kStride;  // elements of one 64-row tile
  static_assert(kBlockM == kBlockN, "one tile size for Q, K and V rows");
  // Q, K[2], V[2]
  static constexpr size_t kBytes = 5 * kTile * sizeof(uint16_t);
};

// Issue the cp.async copies of rows row0..row0+63 of one (b, h) slice (base `g`, row stride
// `row_stride` elements) into shared tile `s`; rows >= N are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int row0,
                                          int N, int tid) {
  constexpr int kChunksPerRow = D * static_cast<int>(sizeof(T)) / 16;
  constexpr int kChunks = kBlockM * kChunksPerRow;
  static_assert(kChunks % (kWarps * 32) == 0, "whole chunks per thread");
#pragma unroll
  for (int c = tid; c < kChunks; c += kWarps * 32) {
    const int r = c / kChunksPerRow;
    const int cc = c % kChunksPerRow;
    const int row = row0 + r;
    const bool valid = row < N;
    const T* src = g + (valid ? static_cast<int64_t>(row) * row_stride : 0) + cc * 8;
    cp_async_16(s + r * Smem<D>::kStride + cc * 8, src, valid);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
    attention_fwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // cp.async, ldmatrix and bf16 mma need sm_80; the launcher refuses older devices.
  __trap();
#else
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  constexpr int kStride = Smem<D>::kStride;
  constexpr int kTile = Smem<D>::kTile;
  constexpr int kDSlices = D / 16;         // k16 slices of the head dim (QK^T)
  constexpr int kKeyTiles = kBlockN / 8;   // n8 tiles of S per warp
  constexpr int kDTiles = D / 8;           // n8 tiles of O per warp

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTile;       // two buffers
  T* sV = sK + 2 * kTile;   // two buffers

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int N = p.N;
  const int H = p.H;
  const int bh = blockIdx.y;
  const int b = bh / H;
  const int h = bh % H;
  const int q0 = blockIdx.x * kBlockM;

  const T* gq = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const T* gk = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* gv = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];

  const int num_tiles = (N + kBlockN - 1) / kBlockN;

  // Prologue: Q and the first K / V tile in one commit group.
  load_tile<T, D>(sQ, gq, p.qs[2], q0, N, tid);
  load_tile<T, D>(sK, gk, p.ks[2], 0, N, tid);
  load_tile<T, D>(sV, gv, p.vs[2], 0, N, tid);
  cp_async_commit();

  uint32_t qf[kDSlices][4];      // Q A fragments of this warp's 16 rows
  float o[kDTiles][4];           // O accumulators (C layout): rows g, g + 8
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max (log2 domain), rows g, g + 8
  float l_run[2] = {0.0f, 0.0f};  // this lane's partial row sums (quad-reduced at the end)
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  for (int j = 0; j < num_tiles; ++j) {
    const int buf = j & 1;
    // Prefetch tile j + 1 into the other buffer (freed by the __syncthreads at the end of the
    // previous iteration). Always commit a group (possibly empty) so that wait_group 1 below
    // means "everything but the newest group has landed", i.e. tile j (and Q) is ready.
    if (j + 1 < num_tiles) {
      load_tile<T, D>(sK + (buf ^ 1) * kTile, gk, p.ks[2], (j + 1) * kBlockN, N, tid);
      load_tile<T, D>(sV + (buf ^ 1) * kTile, gv, p.vs[2], (j + 1) * kBlockN, N, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < kDSlices; ++kk)
        ldsm_x4(qf[kk], sQ + (warp * 16 + ldsm_a_row(lane)) * kStride + kk * 16 +
                             ldsm_a_col(lane));
    }

    // ---- S = Q K^T (16 x 64 per warp) ----
    const T* k_s = sK + buf * kTile;
    float s[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDSlices; ++kk) {
#pragma unroll
      for (int np = 0; np < kKeyTiles / 2; ++np) {
        uint32_t kb[4];
        ldsm_x4(kb, k_s + (np * 16 + ldsm_k_row(lane)) * kStride + kk * 16 + ldsm_k_col(lane));
        mma_16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // ---- scale to the log2 domain, mask keys >= N (scale first: -inf * 0 would be NaN) ----
    const int key0 = j * kBlockN;
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] *= p.qk_scale;
    if (key0 + kBlockN > N) {
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (key0 + nt * 8 + acc_col(lane, i) >= N) s[nt][i] = -INFINITY;
    }

    // ---- online softmax, rows r = 0 (g) and 1 (g + 8): C elements 2r, 2r + 1 ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with no finite score yet (cannot happen for N >= 1, key 0 is always valid in
      // tile 0) would give -inf - -inf = NaN; subtract 0 instead.
      const float m_use = (mx == -INFINITY) ? 0.0f : mx;
      const float alpha = exp2f(m_run[r] - m_use);  // 0 on the first tile (m_run = -inf)
      m_run[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // ---- O += P V: P's C fragments reused as A fragments (see the header comment) ----
    const T* v_s = sV + buf * kTile;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, v_s + (kk * 16 + ldsm_a_row(lane)) * kStride + dp * 16 +
                              ldsm_a_col(lane));
        mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    // Everyone is done with buffer `buf` before the next iteration's prefetch (of tile j + 2)
    // overwrites it.
    __syncthreads();
  }

  // ---- epilogue: O / l -> T, staged in this warp's 16 rows of sQ (only this warp ever read
  // them, and it finished with them at j == 0), then 16-byte stores ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  const float inv_l[2] = {l_run[0] > 0.0f ? 1.0f / l_run[0] : 0.0f,
                          l_run[1] > 0.0f ? 1.0f / l_run[1] : 0.0f};
  T* s_out = sQ + warp * 16 * kStride;
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(s_out + acc_row(lane, 2 * r) * kStride + dt * 8 +
                                   acc_col(lane, 2 * r)) =
          Elem<T>::pack(o[dt][2 * r] * inv_l[r], o[dt][2 * r + 1] * inv_l[r]);
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  T* gout = static_cast<T*>(p.out);
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow;
    const int cc = c % kChunksPerRow;
    const int row = q0 + warp * 16 + r;
    if (row < N)
      *reinterpret_cast<uint4*>(gout + out_offset(b, row, h, N, H, D) + cc * 8) =
          *reinterpret_cast<const uint4*>(s_out + r * kStride + cc * 8);
  }
#endif
}

template <typename T, int D>
cudaError_t launch_typed(const Params& p, int B, int H, int N, cudaStream_t stream) {
  constexpr size_t kSmem = Smem<D>::kBytes;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (D = 128 needs 85 KiB).
  if (kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        attention_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((N + kBlockM - 1) / kBlockM, B * H);
  attention_fwd_kernel<T, D><<<grid, kWarps * 32, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const Params& p, int B, int H, int N, int D, cudaStream_t stream) {
  switch (D) {
    case 32: return launch_typed<T, 32>(p, B, H, N, stream);
    case 64: return launch_typed<T, 64>(p, B, H, N, stream);
    case 128: return launch_typed<T, 128>(p, B, H, N, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Explicit instantiations: {fp16, bf16} x {32, 64, 128}.
#define DPF_INSTANTIATE(T, D)                                                            \
  template __global__ void attention_fwd_kernel<T, D>(const Params);                     \
  template cudaError_t launch_typed<T, D>(const Params&, int, int, int, cudaStream_t);
DPF_INSTANTIATE(__half, 32)
DPF_INSTANTIATE(__half, 64)
DPF_INSTANTIATE(__half, 128)
DPF_INSTANTIATE(__nv_bfloat16, 32)
DPF_INSTANTIATE(__nv_bfloat16, 64)
DPF_INSTANTIATE(__nv_bfloat16, 128)
#undef DPF_INSTANTIATE

}  // namespace attention
}  // namespace depthpro_fast

cudaError_t launch_attention_fwd(const void* q, const void* k, const void* v, void* out,
                                 int dtype, int B, int H, int N, int D, const int64_t* q_strides,
                                 const int64_t* k_strides, const int64_t* v_strides, float scale,
                                 cudaStream_t stream) {
  namespace at_ = depthpro_fast::attention;
  if (dtype != 0 && dtype != 1) return cudaErrorInvalidValue;
  if (D != 32 && D != 64 && D != 128) return cudaErrorInvalidValue;
  if (B < 0 || H < 0 || N < 0) return cudaErrorInvalidValue;
  if (B == 0 || H == 0 || N == 0) return cudaSuccess;
  if (static_cast<int64_t>(B) * H > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
  if (!at_::aligned_for_kernel(q, q_strides) || !at_::aligned_for_kernel(k, k_strides) ||
      !at_::aligned_for_kernel(v, v_strides) || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    return cudaErrorInvalidValue;

  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;

  at_::Params p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.H = H;
  p.N = N;
  for (int i = 0; i < 4; ++i) {
    p.qs[i] = q_strides[i];
    p.ks[i] = k_strides[i];
    p.vs[i] = v_strides[i];
  }
  p.qk_scale = scale * at_::kLog2e;
  return dtype == 0 ? at_::launch_dim<__half>(p, B, H, N, D, stream)
                    : at_::launch_dim<__nv_bfloat16>(p, B, H, N, D, stream);
}
