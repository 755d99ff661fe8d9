// attention_fwd: softmax(scale * Q K^T) V for q, k, v of shape (B, H, N, D), fp16 or bf16,
// flash-attention-2 style (one pass over K/V with an online softmax; fp32 statistics and
// accumulators). Device code only (no torch headers); the torch glue is csrc/attention.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace depthpro_fast {
namespace attention {

// Tile sizes of the kernel (kernels/attention_fwd.cu): a CTA of 4 warps owns 64 query rows
// (16 per warp) and walks over the keys 64 at a time.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
// The kernel works in the log2 domain: exp(x) = 2^(x log2 e), so Q K^T is scaled by
// scale * kLog2e (the launcher folds the two into Params::qk_scale).
constexpr float kLog2e = 1.4426950408889634f;

// True when the kernel's 16-byte cp.async loads / vector stores are legal for a tensor: base
// pointer 16-byte aligned, last-dim stride 1 and every other stride a multiple of 16 bytes
// (for 2-byte elements: of 8 elements). D in {32, 64, 128} makes a row a multiple of 16 bytes.
inline bool aligned_for_kernel(const void* ptr, const int64_t* strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  if (strides[3] != 1) return false;
  for (int i = 0; i < 3; ++i)
    if (strides[i] % 8 != 0) return false;
  return true;
}

}  // namespace attention
}  // namespace depthpro_fast

// Enqueues the forward kernel on `stream`.
//   q, k, v: (B, H, N, D) with element strides q_strides[0..3] etc. (order B, H, N, D); the
//            last-dim stride must be 1 and the data 16-byte aligned (see aligned_for_kernel;
//            the glue makes contiguous copies otherwise).
//   out:     (B, N, H, D) contiguous, 16-byte aligned, same dtype.
//   dtype:   0 = fp16, 1 = bf16.   D: 32, 64 or 128.   scale: multiplies Q K^T.
// Returns cudaErrorInvalidValue for an unsupported D / dtype / shape / alignment,
// cudaErrorNotSupported when the current device is older than sm_80, else the launch's
// cudaGetLastError(). N == 0 or B * H == 0 launches nothing and returns cudaSuccess.
cudaError_t launch_attention_fwd(const void* q, const void* k, const void* v, void* out,
                                 int dtype, int B, int H, int N, int D, const int64_t* q_strides,
                                 const int64_t* k_strides, const int64_t* v_strides, float scale,
                                 cudaStream_t stream);
