// torch glue of depthpro_fast::merge_patches (device code: kernels/merge_patches.cu).
// Python face and fake: depthpro_fast/cuda/merge_patches.py; reference and the definition of the
// blend: depthpro_fast/ops/merge_patches.py.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "merge_patches.cuh"

namespace {

namespace mp = depthpro_fast::merge_patches;

mp::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return mp::Dtype::kFloat32;
    case at::kHalf: return mp::Dtype::kFloat16;
    case at::kBFloat16: return mp::Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "depthpro_fast::merge_patches: tokens dtype ", t,
                       " not accepted; float32, float16 or bfloat16");
  }
  return mp::Dtype::kFloat32;  // unreachable
}

// The checks every device shares, the output the kernel writes and the kernel's parameters
// (all but the two pointers). merge_patches_output (registered for CPU and Meta) returns just
// the output, so that tests without a GPU can hold the Python fake
// (depthpro_fast/cuda/merge_patches.py) against what this file allocates.
at::Tensor merge_patches_prepare(const at::Tensor& tokens, int64_t batch_size, int64_t grid,
                                 int64_t padding, int64_t blend, bool channels_last,
                                 mp::Params& p) {
  const mp::Dtype dtype = kernel_dtype(tokens.scalar_type());
  TORCH_CHECK_VALUE(batch_size >= 1 && batch_size <= 65535,
                    "depthpro_fast::merge_patches: batch_size must be in [1, 65535], got ",
                    batch_size);
  TORCH_CHECK_VALUE(grid >= 1 && padding >= 0 && blend >= 0,
                    "depthpro_fast::merge_patches: need grid >= 1, padding >= 0, blend >= 0, got ",
                    grid, ", ", padding, ", ", blend);
  p = mp::Params{};
  int64_t channels = 0, h = 0, w = 0;
  if (tokens.dim() == 3) {  // (n, 1 + h*w, C), class token first
    const int64_t t = tokens.size(1);
    const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(t - 1))));
    TORCH_CHECK_VALUE(t >= 2 && side * side == t - 1,
                      "depthpro_fast::merge_patches: (n, T, C) tokens need T = 1 + h*w with a "
                      "square grid (class token first), got T = ", t);
    channels = tokens.size(2);
    h = w = side;
    p.s_n = tokens.stride(0);
    p.s_c = tokens.stride(2);
    p.s_x = tokens.stride(1);
    p.s_y = side * tokens.stride(1);
    p.src_offset = tokens.stride(1);
  } else if (tokens.dim() == 4) {  // (n, C, h, w) maps
    channels = tokens.size(1);
    h = tokens.size(2);
    w = tokens.size(3);
    p.s_n = tokens.stride(0);
    p.s_c = tokens.stride(1);
    p.s_y = tokens.stride(2);
    p.s_x = tokens.stride(3);
    p.src_offset = 0;
  } else {
    TORCH_CHECK_VALUE(false, "depthpro_fast::merge_patches: tokens must be (n, 1 + h*w, C) or "
                      "(n, C, h, w), got shape ", tokens.sizes());
  }
  TORCH_CHECK_VALUE(tokens.size(0) == grid * grid * batch_size,
                    "depthpro_fast::merge_patches: expected grid^2 * batch_size = ",
                    grid * grid * batch_size, " windows, got ", tokens.size(0));
  TORCH_CHECK_VALUE(channels >= 1 && h >= 1 && w >= 1,
                    "depthpro_fast::merge_patches: empty windows, shape ", tokens.sizes());
  TORCH_CHECK_VALUE(grid == 1 || 2 * padding < std::min(h, w), "depthpro_fast::merge_patches: "
                    "padding ", padding, " leaves nothing of a ", h, "x", w, " window");
  const int64_t max_blend =
      grid == 1 ? 1 : std::max<int64_t>(1, std::min({2 * padding, h - 2 * padding,
                                                      w - 2 * padding}));
  TORCH_CHECK_VALUE(blend <= max_blend, "depthpro_fast::merge_patches: blend ", blend,
                    " too wide; accepted: 0 to ", max_blend);
  for (int d = 0; d < tokens.dim(); ++d)
    TORCH_CHECK_VALUE(tokens.stride(d) >= 0,
                      "depthpro_fast::merge_patches: negative strides are not supported");

  const int64_t out_h = grid * h - 2 * padding * (grid - 1);
  const int64_t out_w = grid * w - 2 * padding * (grid - 1);
  at::Tensor out = at::empty({batch_size, channels, out_h, out_w},
                             tokens.options().memory_format(channels_last
                                                                ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous));
  p.o_b = out.stride(0);
  p.o_c = out.stride(1);
  p.o_y = out.stride(2);
  p.o_x = out.stride(3);
  p.dtype = dtype;
  p.batch = batch_size;
  p.channels = channels;
  p.out_h = out_h;
  p.out_w = out_w;
  p.grid = static_cast<int>(grid);
  p.padding = static_cast<int>(padding);
  p.win_h = static_cast<int>(h);
  p.win_w = static_cast<int>(w);
  mp::set_mode(p, static_cast<int>(blend), channels_last);  // after grid and channels
  return out;
}

at::Tensor merge_patches_output(const at::Tensor& tokens, int64_t batch_size, int64_t grid,
                                int64_t padding, int64_t blend, bool channels_last) {
  mp::Params p;
  return merge_patches_prepare(tokens, batch_size, grid, padding, blend, channels_last, p);
}

at::Tensor merge_patches_cuda(const at::Tensor& tokens, int64_t batch_size, int64_t grid,
                              int64_t padding, int64_t blend, bool channels_last) {
  TORCH_CHECK(tokens.is_cuda(), "depthpro_fast::merge_patches: tokens must be a CUDA tensor, "
              "got ", tokens.device());
  const c10::cuda::CUDAGuard guard(tokens.device());
  mp::Params p;
  at::Tensor out =
      merge_patches_prepare(tokens, batch_size, grid, padding, blend, channels_last, p);
  p.src = tokens.data_ptr();
  p.dst = out.data_ptr();
  const cudaError_t err = mp::launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "depthpro_fast::merge_patches: kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(depthpro_fast, m) {
  m.def("merge_patches(Tensor tokens, int batch_size, int grid, int padding, int blend=0, "
        "bool channels_last=False) -> Tensor");
  m.def("merge_patches_output(Tensor tokens, int batch_size, int grid, int padding, "
        "int blend=0, bool channels_last=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(depthpro_fast, CUDA, m) { m.impl("merge_patches", &merge_patches_cuda); }
// CPU tensors reach the CUDA function only to be refused with its message (not the
// dispatcher's "could not run ... with arguments from the 'CPU' backend").
TORCH_LIBRARY_IMPL(depthpro_fast, CPU, m) {
  m.impl("merge_patches", &merge_patches_cuda);
  m.impl("merge_patches_output", &merge_patches_output);
}
TORCH_LIBRARY_IMPL(depthpro_fast, Meta, m) {
  m.impl("merge_patches_output", &merge_patches_output);
}
