// split_patches: image (B, 3, H, W) of any size -> the (35B, 3, 384, 384) normalised windows of
// DepthPro's 3-level pyramid (spec §2.1-2.2), fused: normalise -> bilinear resize to 1536
// (PyTorch's align_corners=False arithmetic, no antialias) -> levels 1536 / 768 / 384 -> windows.
// Device code only (no torch headers); the torch glue is csrc/split_patches.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace depthpro_fast {
namespace split_patches {

// Pyramid geometry (spec §2.2): window 384, network input 1536; level 0: 5x5 windows every
// 288 px, level 1 (768 px): 3x3 windows every 192 px, level 2 (384 px): the image itself.
constexpr int kWindow = 384;
constexpr int kImage = 1536;
constexpr int kGrid0 = 5;
constexpr int kStride0 = 288;
constexpr int kGrid1 = 3;
constexpr int kStride1 = 192;
constexpr int kWindowsPerImage = kGrid0 * kGrid0 + kGrid1 * kGrid1 + 1;  // 35

enum class Dtype : int { kUInt8 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Params {
  const void* src;  // (batch, 3, height, width), any strides (in elements)
  Dtype src_dtype;
  int64_t batch, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
  void* dst;  // (kWindowsPerImage * batch, 3, kWindow, kWindow), contiguous
  Dtype dst_dtype;  // kFloat32, kFloat16 or kBFloat16
  float scale_h, scale_w;  // float(height) / 1536, float(width) / 1536 (PyTorch's float math)
  float norm_mul, norm_add;  // normalised = raw * norm_mul + norm_add
};

// Enqueues the kernel on `stream`. Returns cudaErrorInvalidValue for a dtype combination or a
// shape it does not handle, else the launch status.
cudaError_t launch(const Params& params, cudaStream_t stream);

}  // namespace split_patches
}  // namespace depthpro_fast
