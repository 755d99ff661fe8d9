// torch glue of depthpro_fast::attention (device code: kernels/attention_fwd.cu).
// Python face and fake: depthpro_fast/cuda/attention.py; reference and argument docs:
// depthpro_fast/ops/attention.py.
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_fwd.cuh"

namespace {

namespace attn = depthpro_fast::attention;

// The kernel reads q / k / v with 16-byte cp.async copies, which need 16-byte aligned
// addresses: base pointer and every (B, H, N) stride a multiple of 16 bytes, last-dim stride 1.
// Views into a packed qkv GEMM output (B, N, 3, H, D) satisfy this and are used without a copy;
// anything else (odd strides, an odd storage offset) is copied into a fresh allocation, which
// is always aligned. (`.contiguous()` alone would return an already contiguous tensor with a
// misaligned storage offset unchanged, hence the clone.)
at::Tensor kernel_ready(const at::Tensor& t) {
  const int64_t strides[4] = {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  if (attn::aligned_for_kernel(t.data_ptr(), strides)) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

// The checks every device shares and the output the kernel writes: (B, N, H, D) memory seen
// as (B, H, N, D), so that out.transpose(1, 2).reshape(B, N, H * D) is free. Also registered
// (CPU, Meta) as depthpro_fast::attention_output, so that tests on a machine without a GPU can
// hold the Python fake (depthpro_fast/cuda/attention.py) against what this file allocates.
at::Tensor attention_output(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double /*scale*/) {
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "depthpro_fast::attention: q, k and v must be on the same device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "depthpro_fast::attention: q, k and v must have the same dtype, got ",
                   q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "depthpro_fast::attention: the CUDA kernel accepts float16 or bfloat16, got ",
                   q.scalar_type(), " (float32 is served by the triton / reference backends)");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "depthpro_fast::attention: q, k and v must be 4-D (B, H, N, D), got shapes ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                    "depthpro_fast::attention: q, k and v must have the same shape, got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D == 32 || D == 64 || D == 128,
                    "depthpro_fast::attention: head dim must be 32, 64 or 128, got ", D);
  TORCH_CHECK_VALUE(B * H <= 65535 && N <= INT32_MAX,
                    "depthpro_fast::attention: need B * H <= 65535 and N < 2^31, got shape ",
                    q.sizes());

  return at::empty({B, N, H, D}, q.options()).transpose(1, 2);
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(),
              "depthpro_fast::attention: q, k and v must be CUDA tensors, got ", q.device(),
              ", ", k.device(), ", ", v.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor out = attention_output(q, k, v, scale);  // (B, H, N, D) view
  if (out.numel() == 0) return out;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);

  const at::Tensor qc = kernel_ready(q);
  const at::Tensor kc = kernel_ready(k);
  const at::Tensor vc = kernel_ready(v);
  const int64_t qs[4] = {qc.stride(0), qc.stride(1), qc.stride(2), qc.stride(3)};
  const int64_t ks[4] = {kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3)};
  const int64_t vs[4] = {vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3)};
  const int dtype = q.scalar_type() == at::kHalf ? 0 : 1;

  const cudaError_t err = launch_attention_fwd(
      qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), dtype, static_cast<int>(B),
      static_cast<int>(H), static_cast<int>(N), static_cast<int>(D), qs, ks, vs,
      static_cast<float>(scale), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorNotSupported,
              "depthpro_fast::attention: the CUDA kernel needs an sm_80 or newer GPU");
  TORCH_CHECK(err == cudaSuccess, "depthpro_fast::attention: kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(depthpro_fast, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("attention_output(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthpro_fast, CUDA, m) { m.impl("attention", &attention_cuda); }
// CPU tensors reach the CUDA function only to be refused with its message (not the
// dispatcher's "could not run ... with arguments from the 'CPU' backend").
TORCH_LIBRARY_IMPL(depthpro_fast, CPU, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_output", &attention_output);
}
TORCH_LIBRARY_IMPL(depthpro_fast, Meta, m) { m.impl("attention_output", &attention_output); }
