"""The built CUDA extension, checked on a machine without a GPU.

CI builds ``depthpro_fast._C`` against the GPU machine's torch (2.11, CUDA 13.0) in a venv of its
own (``.ci/gpu_build_check.sh``) and runs this file there with
``DEPTHPRO_FAST_REQUIRE_EXTENSION=1``, so that a missing or broken build fails instead of
skipping. Without a GPU nothing can launch, but a lot can be proven:

- the shared library loads and links (every symbol it needs resolves against this torch);
- its ops are registered under ``torch.ops.depthpro_fast`` with the schemas the Python faces
  call;
- the Python fake of each op (``depthpro_fast/cuda/<op>.py``, what ``torch.compile``, CUDA-graph
  capture and ``torch.export`` see) agrees, in shape, dtype and strides, with the tensor the C++
  glue allocates for the kernel (``<op>_output``, the same C++ function, registered for CPU and
  Meta tensors), over odd shapes and layouts;
- the C++ checks refuse bad input with the op's name in the message;
- ``torch.export`` traces through the ops on (fake) CUDA tensors, and the exported graph holds
  them as single nodes.
"""

from __future__ import annotations

import os

import pytest
import torch

from depthpro_fast import _ext

REQUIRED = os.environ.get("DEPTHPRO_FAST_REQUIRE_EXTENSION", "0") == "1"

if _ext.load() is None:
    if REQUIRED:
        raise RuntimeError(f"DEPTHPRO_FAST_REQUIRE_EXTENSION=1 but depthpro_fast._C does not "
                           f"load: {_ext.unavailable_reason()}")
    pytest.skip(f"the CUDA extension is not built here ({_ext.unavailable_reason()}); CI builds "
                "and checks it in the GPU-mirror venv", allow_module_level=True)

# The Python faces: importing them registers the fakes.
from depthpro_fast.cuda import attention as _attention_face  # noqa: E402,F401
from depthpro_fast.cuda import merge_patches as _merge_face  # noqa: E402,F401
from depthpro_fast.cuda import split_patches as _split_face  # noqa: E402,F401

OPS = torch.ops.depthpro_fast
SCHEMAS = {
    "attention": "attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor",
    "split_patches": "split_patches(Tensor image, bool prenormalized=False, "
                     "ScalarType? out_dtype=None) -> Tensor",
    "merge_patches": "merge_patches(Tensor tokens, int batch_size, int grid, int padding, "
                     "int blend=0, bool channels_last=False) -> Tensor",
}


def test_extension_loads_with_its_ops():
    assert _ext.unavailable_reason() is None
    for name, schema in SCHEMAS.items():
        assert _ext.has_op(name), name
        assert str(getattr(OPS, name).default._schema) == f"depthpro_fast::{schema}"
        assert _ext.has_op(f"{name}_output"), f"{name}_output"


def _same_layout(fake: torch.Tensor, real: torch.Tensor) -> None:
    assert fake.shape == real.shape
    assert fake.dtype == real.dtype
    assert fake.stride() == real.stride(), (fake.stride(), real.stride())


def _packed_qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype):
    qkv = torch.empty(b, n, 3, h, d, dtype=dtype, device="meta")
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,n,d", [(1, 16, 577, 64), (35, 16, 577, 64), (3, 1, 17, 32),
                                     (2, 3, 1, 128), (0, 2, 5, 64)])
def test_attention_fake_matches_cpp(b, h, n, d, dtype):
    q, k, v = _packed_qkv(b, h, n, d, dtype)
    _same_layout(OPS.attention(q, k, v, 0.125), OPS.attention_output(q, k, v, 0.125))
    # contiguous (B, H, N, D) inputs give the same output layout
    qc = torch.empty(b, h, n, d, dtype=dtype, device="meta")
    _same_layout(OPS.attention(qc, qc, qc, 0.125), OPS.attention_output(qc, qc, qc, 0.125))


@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 1536, 1536), (2, 3, 240, 320), (1, 3, 1, 1)])
def test_split_patches_fake_matches_cpp(shape, in_dtype, out_dtype):
    image = torch.empty(shape, dtype=in_dtype, device="meta")
    pre = in_dtype != torch.uint8
    _same_layout(OPS.split_patches(image, pre, out_dtype),
                 OPS.split_patches_output(image, pre, out_dtype))
    if shape[0] == 1:  # a channels_last (strided) input
        image = image.to(memory_format=torch.channels_last)
        _same_layout(OPS.split_patches(image, pre, out_dtype),
                     OPS.split_patches_output(image, pre, out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", [
    # (windows shape, batch, grid, padding, blend): the official levels, odd ones, maps input
    ((25, 577, 1024), 1, 5, 3, 0), ((9 * 8, 577, 1024), 8, 3, 6, 0), ((1, 577, 256), 1, 1, 0, 0),
    ((25, 1 + 7 * 7, 24), 1, 5, 1, 2), ((4, 3, 11, 13), 1, 2, 2, 1),
])
def test_merge_patches_fake_matches_cpp(case, channels_last, dtype):
    shape, batch, grid, padding, blend = case
    tokens = torch.empty(shape, dtype=dtype, device="meta")
    args = (tokens, batch, grid, padding, blend, channels_last)
    _same_layout(OPS.merge_patches(*args), OPS.merge_patches_output(*args))


def test_cpp_checks_name_the_op_and_the_problem():
    q, k, v = _packed_qkv(1, 2, 17, 48, torch.float16)
    with pytest.raises(ValueError, match="attention: head dim must be 32, 64 or 128"):
        OPS.attention_output(q, k, v, 0.1)
    q, k, v = _packed_qkv(1, 2, 17, 64, torch.float32)
    with pytest.raises(TypeError, match="accepts float16 or bfloat16"):
        OPS.attention_output(q, k, v, 0.1)
    image = torch.empty(1, 4, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"split_patches: image must be \(B, 3, H, W\)"):
        OPS.split_patches_output(image, True, None)
    with pytest.raises(ValueError, match="prenormalized=True needs a float image"):
        OPS.split_patches_output(image[:, :3].to(torch.uint8), True, None)
    tokens = torch.empty(25, 577, 8, device="meta")
    with pytest.raises(ValueError, match="expected grid\\^2 \\* batch_size = 50"):
        OPS.merge_patches_output(tokens, 2, 5, 3, 0, False)
    with pytest.raises(ValueError, match="blend 40 too wide"):
        OPS.merge_patches_output(tokens, 1, 5, 3, 40, False)
    # the kernels themselves refuse tensors that are not on a GPU, in their own words
    qkv = torch.zeros(1, 17, 3, 2, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="attention: q, k and v must be CUDA tensors"):
        OPS.attention(*(t.transpose(1, 2) for t in qkv.unbind(2)), 0.1)
    with pytest.raises(RuntimeError, match="split_patches: image must be a CUDA tensor"):
        OPS.split_patches(torch.zeros(1, 3, 8, 8), True, None)
    with pytest.raises(RuntimeError, match="merge_patches: tokens must be a CUDA tensor"):
        OPS.merge_patches(torch.zeros(1, 5, 8), 1, 1, 0, 0, False)


class _PatchPipeline(torch.nn.Module):
    """split -> (stand-in encoder) -> attention -> merge, all through the CUDA ops."""

    def forward(self, image: torch.Tensor, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        windows = OPS.split_patches(image, True, torch.bfloat16)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        att = OPS.attention(q, k, v, 0.125)
        tokens = att.transpose(1, 2).reshape(att.shape[0], att.shape[2], -1)
        return windows, OPS.merge_patches(tokens, 1, 5, 3, 0, True)


def test_torch_export_traces_through_the_ops_on_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        image = torch.empty(1, 3, 1536, 1536, dtype=torch.bfloat16, device="cuda")
        qkv = torch.empty(35, 577, 3, 16, 64, dtype=torch.bfloat16, device="cuda")
        exported = torch.export.export(_PatchPipeline(), (image, qkv))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    for name in ("split_patches", "attention", "merge_patches"):
        assert f"depthpro_fast.{name}.default" in targets, targets
    outs = [n for n in exported.graph.nodes if n.op == "output"][0].args[0]
    windows, merged = (o.meta["val"] for o in outs)
    assert windows.shape == (35, 3, 384, 384) and windows.device.type == "cuda"
    assert merged.shape == (1, 1024, 96, 96)
    assert merged.is_contiguous(memory_format=torch.channels_last)
