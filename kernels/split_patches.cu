// split_patches kernel (see split_patches.cuh and depthpro_fast/triton/split_patches.py, which
// computes the same thing; the reference is depthpro_fast/ops/split_patches.py).
//
// Every output element is computed straight from the source image, without materialising the
// 1536 image or the pyramid levels:
//   level 0 (25 windows): R(Y, X), one pixel of the bilinearly resized image;
//   level 1 (9 windows):  mean of R over the 2x2 block at (2Y, 2X)   (= interpolate(x, 0.5));
//   level 2 (1 window):   mean of R over rows/cols 4y+1, 4y+2        (= interpolate(x, 0.25)).
// R is a bilinear sample with PyTorch's source index s = (d + 0.5) * scale - 0.5 evaluated as
// one fused multiply-add in float32 (as PyTorch's kernels do), clamped at 0. Arithmetic is
// float32; the value is rounded to the output dtype once.
//
// One thread per output pixel of a window, all three channels (they share indices and
// weights); a block covers 128 columns x 4 rows of one window of one image; consecutive threads
// write consecutive addresses.
#include "split_patches.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace depthpro_fast {
namespace split_patches {
namespace {

constexpr int kBlockX = 128;
constexpr int kBlockY = 4;
static_assert(kWindow % kBlockX == 0 && kWindow % kBlockY == 0, "tiles must cover a window");

// Everything per pixel is __host__ __device__ so that the arithmetic can also be checked on a
// machine without a GPU (a host loop over the pixels, see tests/test_split_patches.py).
#define DPF_HD __host__ __device__ __forceinline__

DPF_HD float to_float(uint8_t v) { return static_cast<float>(v); }
DPF_HD float to_float(float v) { return v; }
DPF_HD float to_float(__half v) { return __half2float(v); }
DPF_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

DPF_HD void store(float* p, float v) { *p = v; }
DPF_HD void store(__half* p, float v) { *p = __float2half_rn(v); }
DPF_HD void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

DPF_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// One axis of the resize: resized coordinate r -> source indices i0, i1 and their weights.
struct Taps {
  int64_t i0, i1;  // already multiplied by the axis stride
  float w0, w1;
};

DPF_HD Taps axis_taps(int r, int64_t n, float scale, int64_t stride) {
  // fmaf: one rounding, as PyTorch's (contracted) scale * (d + 0.5) - 0.5
  float s = fmaxf(fmaf(static_cast<float>(r) + 0.5f, scale, -0.5f), 0.0f);
  int64_t i0 = min64(static_cast<int64_t>(s), n - 1);  // s >= 0: truncation is floor
  int64_t i1 = min64(i0 + 1, n - 1);
  float lam = fminf(fmaxf(s - static_cast<float>(i0), 0.0f), 1.0f);
  return {i0 * stride, i1 * stride, 1.0f - lam, lam};
}

template <typename Tin>
DPF_HD float bilinear(const Tin* p, const Taps& ty, const Taps& tx) {
  float top = tx.w0 * to_float(p[ty.i0 + tx.i0]) + tx.w1 * to_float(p[ty.i0 + tx.i1]);
  float bot = tx.w0 * to_float(p[ty.i1 + tx.i0]) + tx.w1 * to_float(p[ty.i1 + tx.i1]);
  return ty.w0 * top + ty.w1 * bot;
}

// Output pixel (y, x) of window `win` of image `b`, all three channels.
template <typename Tin, typename Tout, bool kIdentity>
DPF_HD void split_pixel(const Tin* src, Tout* dst, const Params& p, int win, int64_t b, int y,
                        int x) {
  constexpr int64_t plane = static_cast<int64_t>(kWindow) * kWindow;
  const Tin* img = src + b * p.stride_b;
  Tout* out = dst + (static_cast<int64_t>(win) * p.batch + b) * 3 * plane +
              static_cast<int64_t>(y) * kWindow + x;

  constexpr int n0 = kGrid0 * kGrid0;
  if (win < n0) {  // level 0: the resized image itself
    const int ry = (win / kGrid0) * kStride0 + y;
    const int rx = (win % kGrid0) * kStride0 + x;
    if (kIdentity) {
      const int64_t off = ry * p.stride_h + rx * p.stride_w;
      for (int c = 0; c < 3; ++c)
        store(out + c * plane, to_float(img[c * p.stride_c + off]) * p.norm_mul + p.norm_add);
    } else {
      const Taps ty = axis_taps(ry, p.height, p.scale_h, p.stride_h);
      const Taps tx = axis_taps(rx, p.width, p.scale_w, p.stride_w);
      for (int c = 0; c < 3; ++c)
        store(out + c * plane, bilinear(img + c * p.stride_c, ty, tx) * p.norm_mul + p.norm_add);
    }
    return;
  }
  // levels 1 and 2: the mean of R over rows {ry, ry + 1} x columns {rx, rx + 1}
  int ry, rx;
  if (win < n0 + kGrid1 * kGrid1) {
    const int w1 = win - n0;
    ry = 2 * ((w1 / kGrid1) * kStride1 + y);
    rx = 2 * ((w1 % kGrid1) * kStride1 + x);
  } else {
    ry = 4 * y + 1;
    rx = 4 * x + 1;
  }
  const float mul = 0.25f * p.norm_mul;
  if (kIdentity) {
    const int64_t r0 = ry * p.stride_h, r1 = r0 + p.stride_h;
    const int64_t c0 = rx * p.stride_w, c1 = c0 + p.stride_w;
    for (int c = 0; c < 3; ++c) {
      const Tin* q = img + c * p.stride_c;
      float v = to_float(q[r0 + c0]) + to_float(q[r0 + c1]) + to_float(q[r1 + c0]) +
                to_float(q[r1 + c1]);
      store(out + c * plane, v * mul + p.norm_add);
    }
  } else {
    const Taps ya = axis_taps(ry, p.height, p.scale_h, p.stride_h);
    const Taps yb = axis_taps(ry + 1, p.height, p.scale_h, p.stride_h);
    const Taps xa = axis_taps(rx, p.width, p.scale_w, p.stride_w);
    const Taps xb = axis_taps(rx + 1, p.width, p.scale_w, p.stride_w);
    for (int c = 0; c < 3; ++c) {
      const Tin* q = img + c * p.stride_c;
      float v = bilinear(q, ya, xa) + bilinear(q, ya, xb) + bilinear(q, yb, xa) +
                bilinear(q, yb, xb);
      store(out + c * plane, v * mul + p.norm_add);
    }
  }
}

// The work of thread `thread_idx` of block `block_idx` (the kernel passes blockIdx / threadIdx;
// tests/cuda_host/patch_kernels_check.cu replays the launch grid on the host through it).
template <typename Tin, typename Tout, bool kIdentity>
DPF_HD void split_thread(const Tin* __restrict__ src, Tout* __restrict__ dst, const Params& p,
                         const uint3& block_idx, const uint3& thread_idx) {
  constexpr int tiles_x = kWindow / kBlockX;
  const int x = (block_idx.x % tiles_x) * kBlockX + thread_idx.x;
  const int y = (block_idx.x / tiles_x) * kBlockY + thread_idx.y;
  split_pixel<Tin, Tout, kIdentity>(src, dst, p, block_idx.y, block_idx.z, y, x);
}

template <typename Tin, typename Tout, bool kIdentity>
__global__ void __launch_bounds__(kBlockX* kBlockY)
    split_patches_kernel(const Tin* __restrict__ src, Tout* __restrict__ dst, Params p) {
  split_thread<Tin, Tout, kIdentity>(src, dst, p, blockIdx, threadIdx);
}

template <typename Tin, typename Tout>
cudaError_t launch_typed(const Params& p, cudaStream_t stream) {
  const dim3 block(kBlockX, kBlockY);
  const dim3 grid((kWindow / kBlockX) * (kWindow / kBlockY), kWindowsPerImage,
                  static_cast<unsigned>(p.batch));
  const Tin* src = static_cast<const Tin*>(p.src);
  Tout* dst = static_cast<Tout*>(p.dst);
  if (p.height == kImage && p.width == kImage)
    split_patches_kernel<Tin, Tout, true><<<grid, block, 0, stream>>>(src, dst, p);
  else
    split_patches_kernel<Tin, Tout, false><<<grid, block, 0, stream>>>(src, dst, p);
  return cudaGetLastError();
}

template <typename Tin>
cudaError_t launch_out(const Params& p, cudaStream_t stream) {
  switch (p.dst_dtype) {
    case Dtype::kFloat32: return launch_typed<Tin, float>(p, stream);
    case Dtype::kFloat16: return launch_typed<Tin, __half>(p, stream);
    case Dtype::kBFloat16: return launch_typed<Tin, __nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch(const Params& p, cudaStream_t stream) {
  if (p.batch < 1 || p.batch > 65535 || p.height < 1 || p.width < 1) return cudaErrorInvalidValue;
  switch (p.src_dtype) {
    case Dtype::kUInt8: return launch_out<uint8_t>(p, stream);
    case Dtype::kFloat32: return launch_out<float>(p, stream);
    case Dtype::kFloat16: return launch_out<__half>(p, stream);
    case Dtype::kBFloat16: return launch_out<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace split_patches
}  // namespace depthpro_fast
