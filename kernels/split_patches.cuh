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

// Fills the fields derived from the others (src_dtype, height, width must be set): the resize
// scales, PyTorch's float32 in / out for align_corners=False with the output size given, and
// the normalisation (spec §8: uint8 / 255, then 2x - 1; float in [0, 1]: 2x - 1; an input
// already normalised: unchanged). Shared by the torch glue and the CPU replay of the kernel.
inline void set_derived(Params& p, bool prenormalized) {
  p.scale_h = static_cast<float>(p.height) / static_cast<float>(kImage);
  p.scale_w = static_cast<float>(p.width) / static_cast<float>(kImage);
  if (p.src_dtype == Dtype::kUInt8) {
    p.norm_mul = 2.0f / 255.0f;
    p.norm_add = -1.0f;
  } else if (prenormalized) {
    p.norm_mul = 1.0f;
    p.norm_add = 0.0f;
  } else {
    p.norm_mul = 2.0f;
    p.norm_add = -1.0f;
  }
}

// Enqueues the kernel on `stream`. Returns cudaErrorInvalidValue for a dtype combination or a
// shape it does not handle, else the launch status.
cudaError_t launch(const Params& params, cudaStream_t stream);

}  // namespace split_patches
}  // namespace depthpro_fast
