// merge_patches kernel (see merge_patches.cuh; the Triton twin is
// depthpro_fast/triton/merge_patches.py, the reference depthpro_fast/ops/merge_patches.py).
//
// Output token (Y, X): on each axis, the window j whose crop covers the token (the crop is a
// gather from it) and, for the blend, the neighbour across the nearest boundary when the token
// lies within k/2 of it, with the weight w of window j = (k + t) / 2k, t = 2 * distance - 1.
// The two axes mix by linear interpolation, neighbour + w * (own - neighbour); neighbours of
// weight 0 are not read, so tokens away from the ramps are copied exactly.
//
// A block handles 32 output pixels (row-major over the (H, W) plane) x 32 channels of one image:
// the 32 pixels' window offsets and weights are computed once into shared memory; values are
// read along the channels (contiguous in the ViT's tokens) and, for an NCHW output, transposed
// through shared memory so that the stores run along the pixels.
#include "merge_patches.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace depthpro_fast {
namespace merge_patches {
namespace {

// __host__ __device__ so that the arithmetic can also be checked on a machine without a GPU.
#define DPF_HD __host__ __device__ __forceinline__

constexpr int kTile = 32;  // pixels x channels per block
constexpr int kRows = 8;   // threadIdx.y extent; each thread handles kTile / kRows elements

DPF_HD float to_float(float v) { return v; }
DPF_HD float to_float(__half v) { return __half2float(v); }
DPF_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

DPF_HD void store(float* p, float v) { *p = v; }
DPF_HD void store(__half* p, float v) { *p = __float2half_rn(v); }
DPF_HD void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Where output token `pos` of one axis comes from: element offsets (window index and local token)
// of the crop's window and of the blend neighbour, and the crop window's weight (1: no blend).
struct AxisTap {
  int64_t own, nb;
  float w;
};

// `window_step`: elements between windows j and j + 1 on this axis (rows: grid * batch * s_n,
// columns: batch * s_n); `token_step`: elements between neighbouring tokens (s_y or s_x).
DPF_HD AxisTap axis_tap(int64_t pos, int grid, int padding, int win, int blend,
                        int64_t window_step, int64_t token_step) {
  const int64_t stride = win - 2 * padding;
  int64_t j = (pos > padding ? pos - padding : 0) / stride;
  if (j > grid - 1) j = grid - 1;
  const int64_t local = pos - j * stride;
  AxisTap tap{j * window_step + local * token_step, 0, 1.0f};
  tap.nb = tap.own;
  if (blend > 1) {
    const int64_t t_lo = 2 * (local - padding) + 1;      // towards window j - 1
    const int64_t t_hi = 2 * (win - padding - local) - 1;  // towards window j + 1
    int64_t jn = j, t = 0;
    if (j > 0 && t_lo < blend) {
      jn = j - 1;
      t = t_lo;
    } else if (j < grid - 1 && t_hi < blend) {
      jn = j + 1;
      t = t_hi;
    }
    if (jn != j) {
      // exact small integers, one correctly rounded division
      tap.w = static_cast<float>(blend + t) / static_cast<float>(2 * blend);
      tap.nb = jn * window_step + (pos - jn * stride) * token_step;
    }
  }
  return tap;
}

struct PixelTaps {
  AxisTap y, x;
  int64_t out;  // y * o_y + x * o_x
};

DPF_HD PixelTaps pixel_taps(const Params& p, int64_t pixel) {
  const int64_t y = pixel / p.out_w, x = pixel % p.out_w;
  PixelTaps t;
  t.y = axis_tap(y, p.grid, p.padding, p.win_h, p.blend, p.grid * p.batch * p.s_n, p.s_y);
  t.x = axis_tap(x, p.grid, p.padding, p.win_w, p.blend, p.batch * p.s_n, p.s_x);
  t.out = y * p.o_y + x * p.o_x;
  return t;
}

// `base`: src + src_offset + b * s_n + c * s_c.
template <typename T>
DPF_HD float merged_value(const T* base, const PixelTaps& t) {
  float v = to_float(base[t.y.own + t.x.own]);
  if (t.x.w < 1.0f || t.y.w < 1.0f) {
    const bool bx = t.x.w < 1.0f, by = t.y.w < 1.0f;
    const float v01 = bx ? to_float(base[t.y.own + t.x.nb]) : 0.0f;
    const float v10 = by ? to_float(base[t.y.nb + t.x.own]) : 0.0f;
    const float v11 = bx && by ? to_float(base[t.y.nb + t.x.nb]) : 0.0f;
    const float top = v01 + t.x.w * (v - v01);
    const float bottom = v11 + t.x.w * (v10 - v11);
    v = bottom + t.y.w * (top - bottom);
  }
  return v;
}

// __syncthreads() as a functor, for merge_thread.
struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// The work of thread `thread_idx` of block `block_idx`: `taps` and `tile` are the block's shared
// memory, `sync()` its barrier. The kernel passes blockIdx / threadIdx, its __shared__ arrays and
// __syncthreads; tests/cuda_host/patch_kernels_check.cu replays the launch grid on the host.
template <typename T, typename Sync>
DPF_HD void merge_thread(const T* __restrict__ src, T* __restrict__ dst, const Params& p,
                         const uint3& block_idx, const uint3& thread_idx,
                         PixelTaps (&taps)[kTile], float (&tile)[kTile][kTile + 1],
                         const Sync& sync) {
  const int64_t npix = p.out_h * p.out_w;
  const int64_t p0 = static_cast<int64_t>(block_idx.x) * kTile;
  const int64_t c0 = static_cast<int64_t>(block_idx.y) * kTile;
  const int64_t b = block_idx.z;
  const int tx = thread_idx.x, ty = thread_idx.y;
  if (ty == 0 && p0 + tx < npix) taps[tx] = pixel_taps(p, p0 + tx);
  sync();

  // Read: threads along the channels.
  const int64_t c = c0 + tx;
  const T* base = src + p.src_offset + b * p.s_n + c * p.s_c;
  T* out_b = dst + b * p.o_b;
#pragma unroll
  for (int k = 0; k < kTile / kRows; ++k) {
    const int pl = ty + k * kRows;
    if (p0 + pl < npix && c < p.channels) {
      const float v = merged_value(base, taps[pl]);
      if (p.channels_last)
        store(out_b + taps[pl].out + c * p.o_c, v);
      else
        tile[pl][tx] = v;
    }
  }
  if (p.channels_last) return;
  sync();
  // Write (NCHW): threads along the pixels.
  if (p0 + tx >= npix) return;
  const int64_t out_pix = taps[tx].out;
#pragma unroll
  for (int k = 0; k < kTile / kRows; ++k) {
    const int cl = ty + k * kRows;
    if (c0 + cl < p.channels) store(out_b + out_pix + (c0 + cl) * p.o_c, tile[tx][cl]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTile* kRows)
    merge_patches_kernel(const T* __restrict__ src, T* __restrict__ dst, Params p) {
  __shared__ PixelTaps taps[kTile];
  __shared__ float tile[kTile][kTile + 1];  // [pixel][channel], +1 against bank conflicts
  merge_thread(src, dst, p, blockIdx, threadIdx, taps, tile, BlockSync{});
}

template <typename T>
cudaError_t launch_typed(const Params& p, cudaStream_t stream) {
  const dim3 block(kTile, kRows);
  const int64_t npix = p.out_h * p.out_w;
  const dim3 grid(static_cast<unsigned>((npix + kTile - 1) / kTile),
                  static_cast<unsigned>((p.channels + kTile - 1) / kTile),
                  static_cast<unsigned>(p.batch));
  merge_patches_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(p.src),
                                                      static_cast<T*>(p.dst), p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch(const Params& p, cudaStream_t stream) {
  if (p.batch < 1 || p.batch > 65535 || p.channels < 1 || (p.channels + kTile - 1) / kTile > 65535 ||
      p.out_h < 1 || p.out_w < 1 || p.out_h * p.out_w >= (int64_t{1} << 31) * kTile ||
      p.grid < 1 || p.padding < 0 || p.win_h - 2 * p.padding < 1 || p.win_w - 2 * p.padding < 1 ||
      p.blend < 0)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case Dtype::kFloat32: return launch_typed<float>(p, stream);
    case Dtype::kFloat16: return launch_typed<__half>(p, stream);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace merge_patches
}  // namespace depthpro_fast
