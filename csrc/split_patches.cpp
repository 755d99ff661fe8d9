// torch glue of depthpro_fast::split_patches (device code: kernels/split_patches.cu).
// Python face and fake: depthpro_fast/cuda/split_patches.py; reference and argument docs:
// depthpro_fast/ops/split_patches.py.
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "split_patches.cuh"

namespace {

namespace sp = depthpro_fast::split_patches;

sp::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kByte: return sp::Dtype::kUInt8;
    case at::kFloat: return sp::Dtype::kFloat32;
    case at::kHalf: return sp::Dtype::kFloat16;
    case at::kBFloat16: return sp::Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "depthpro_fast::split_patches: image dtype ", t,
                       " not accepted; uint8, float32, float16 or bfloat16");
  }
  return sp::Dtype::kFloat32;  // unreachable
}

// The checks every device shares and the output the kernel writes. Also registered (CPU, Meta)
// as depthpro_fast::split_patches_output, so that tests without a GPU can hold the Python fake
// (depthpro_fast/cuda/split_patches.py) against what this file allocates.
at::Tensor split_patches_output(const at::Tensor& image, bool prenormalized,
                                std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(image.dim() == 4 && image.size(1) == 3,
                    "depthpro_fast::split_patches: image must be (B, 3, H, W), got shape ",
                    image.sizes());
  TORCH_CHECK_VALUE(image.size(0) >= 1 && image.size(0) <= 65535 && image.size(2) >= 1 &&
                        image.size(3) >= 1,
                    "depthpro_fast::split_patches: need 1 to 65535 images of at least 1x1 "
                    "pixels, got shape ",
                    image.sizes());
  kernel_dtype(image.scalar_type());  // refuses other dtypes
  TORCH_CHECK_VALUE(!(prenormalized && image.scalar_type() == at::kByte),
                    "depthpro_fast::split_patches: prenormalized=True needs a float image in "
                    "[-1, 1], got uint8");
  const at::ScalarType dst_type =
      out_dtype.value_or(image.is_floating_point() ? image.scalar_type() : at::kFloat);
  TORCH_CHECK_TYPE(dst_type == at::kFloat || dst_type == at::kHalf || dst_type == at::kBFloat16,
                   "depthpro_fast::split_patches: out_dtype ", dst_type,
                   " not accepted; float32, float16 or bfloat16");
  // Any strides are fine (the kernel gathers), but they must be non-negative.
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK_VALUE(image.stride(d) >= 0,
                      "depthpro_fast::split_patches: negative strides are not supported");

  return at::empty({sp::kWindowsPerImage * image.size(0), 3, sp::kWindow, sp::kWindow},
                   image.options().dtype(dst_type));
}

at::Tensor split_patches_cuda(const at::Tensor& image, bool prenormalized,
                              std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(image.is_cuda(), "depthpro_fast::split_patches: image must be a CUDA tensor, got ",
              image.device());
  const c10::cuda::CUDAGuard guard(image.device());
  at::Tensor out = split_patches_output(image, prenormalized, out_dtype);
  const sp::Dtype src_dtype = kernel_dtype(image.scalar_type());
  const int64_t batch = image.size(0);

  sp::Params p{};
  p.src = image.data_ptr();
  p.src_dtype = src_dtype;
  p.batch = batch;
  p.height = image.size(2);
  p.width = image.size(3);
  p.stride_b = image.stride(0);
  p.stride_c = image.stride(1);
  p.stride_h = image.stride(2);
  p.stride_w = image.stride(3);
  p.dst = out.data_ptr();
  p.dst_dtype = kernel_dtype(out.scalar_type());
  sp::set_derived(p, prenormalized);  // resize scales, normalisation
  const cudaError_t err = sp::launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "depthpro_fast::split_patches: kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(depthpro_fast, m) {
  m.def("split_patches(Tensor image, bool prenormalized=False, ScalarType? out_dtype=None) "
        "-> Tensor");
  m.def("split_patches_output(Tensor image, bool prenormalized=False, "
        "ScalarType? out_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthpro_fast, CUDA, m) { m.impl("split_patches", &split_patches_cuda); }
// CPU tensors reach the CUDA function only to be refused with its message (not the
// dispatcher's "could not run ... with arguments from the 'CPU' backend").
TORCH_LIBRARY_IMPL(depthpro_fast, CPU, m) {
  m.impl("split_patches", &split_patches_cuda);
  m.impl("split_patches_output", &split_patches_output);
}
TORCH_LIBRARY_IMPL(depthpro_fast, Meta, m) {
  m.impl("split_patches_output", &split_patches_output);
}
