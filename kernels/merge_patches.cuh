// merge_patches: the tokens of grid x grid windows per image -> one stitched (B, C, H, W) map
// (spec §2.3-2.4): blend <= 1 is the official hard crop (a gather), blend = k > 1 the linear
// overlap-blend of depthpro_fast/ops/merge_patches.py. Device code only (no torch headers); the
// torch glue is csrc/merge_patches.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace depthpro_fast {
namespace merge_patches {

enum class Dtype : int { kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Params {
  // Window e = (j * grid + i) * batch + b; its token (y, x), channel c is at
  // src + src_offset + e * s_n + c * s_c + y * s_y + x * s_x (elements). For the ViT's
  // (n, 1 + h*w, C) tokens: s_c = 1, s_x = token stride, s_y = w * s_x, src_offset = s_x.
  const void* src;
  int64_t s_n, s_c, s_y, s_x, src_offset;
  // Output (batch, channels, out_h, out_w) with strides o_b, o_c, o_y, o_x (elements).
  void* dst;
  int64_t o_b, o_c, o_y, o_x;
  Dtype dtype;  // of both
  int64_t batch, channels, out_h, out_w;
  int grid, padding, win_h, win_w;  // windows of win_h x win_w tokens, stride win - 2 * padding
  int blend;  // 0 or 1: the crop; k > 1: ramps of k tokens (k <= min(2 padding, stride))
  bool channels_last;  // o_c == 1: write along the channels instead of along the pixels
};

// Sets the mode from the caller's request: blending needs more than one window (grid must be
// set), the NHWC write path more than one channel (channels must be set; with one channel NCHW
// and NHWC are the same memory). Shared by the torch glue and the CPU replay of the kernel.
inline void set_mode(Params& p, int blend, bool channels_last) {
  p.blend = p.grid > 1 ? blend : 0;
  p.channels_last = channels_last && p.channels > 1;
}

// Enqueues the kernel on `stream`. Returns cudaErrorInvalidValue for parameters it does not
// handle, else the launch status.
cudaError_t launch(const Params& params, cudaStream_t stream);

}  // namespace merge_patches
}  // namespace depthpro_fast
