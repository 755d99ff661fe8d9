"""The ``attention`` op: reference and Triton (CPU interpreter), Triton and CUDA on a GPU.

Error budget (DESIGN.md §4): an implementation's max abs error against an fp64 reference must be
at most 2x that of PyTorch's naive same-dtype attention (``softmax(q @ k^T * scale) @ v`` with
every op in the input dtype, the flash-attention test convention), with a tiny absolute floor
for the cases where both are exact (N = 1).

Inputs are strided views of a packed qkv tensor (B, N, 3, H, D), as the model produces them,
with fresh random values per case (seeded from the case). Outputs are poisoned with NaN: the
allocation helper is patched to return a NaN-filled tensor, so unwritten elements show up.

Under the interpreter the Triton kernel runs one small block config (32 x 16) and costs a few
seconds per 577-token head, so the grid is: every D x dtype x small N, and N = 577 for a few
cases only.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
import zlib

import pytest
import torch

import depthpro_fast
from depthpro_fast import backends
from depthpro_fast.ops import attention
from depthpro_fast.tolerances import ATTENTION_FLOOR
from tests.conftest import TINY_DIR, poison_, requires_cuda, requires_triton

attention_module = importlib.import_module("depthpro_fast.ops.attention")

# Absolute floor of the budget per dtype (a fraction of an ulp at 1: only matters when the
# PyTorch baseline is exact, e.g. N = 1 where the output is v itself).
FLOOR = ATTENTION_FLOOR  # shared with kernel qualification (depthpro_fast/tolerances.py)


# ------------------------------------------------------------------------------------------------
# helpers


def case_seed(*parts: object) -> int:
    """A per-case seed: fresh inputs for every case, reproducible run to run."""
    return zlib.crc32(repr(parts).encode())


def packed_qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int,
               device: str | torch.device = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv, q, k, v): q, k, v are (B, H, N, D) strided views into qkv (B, N, 3, H, D)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return qkv, q, k, v


def fp64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def same_dtype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """PyTorch's naive attention with every op in the input dtype (the baseline of the budget)."""
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def max_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((out.double() - ref64).abs().max())


def check_budget(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> None:
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "NaN in the output: unwritten (poisoned) elements"
    ref = fp64_attention(q, k, v, scale)
    err = max_err(out, ref)
    err_torch = max_err(same_dtype_attention(q, k, v, scale), ref)
    budget = max(2 * err_torch, FLOOR[q.dtype])
    assert err <= budget, (f"max abs error {err:.3g} > budget {budget:.3g} "
                           f"(PyTorch same-dtype attention: {err_torch:.3g})")


def check_output_layout(out: torch.Tensor) -> None:
    """(B, H, N, D) values in (B, N, H, D)-contiguous memory."""
    b, h, n, d = out.shape
    assert out.transpose(1, 2).is_contiguous()
    assert out.stride() == (n * h * d, d, h * d, 1)


@pytest.fixture
def poisoned(monkeypatch):
    """Make every allocation of an attention output NaN-filled (reference and Triton)."""
    real = attention_module.empty_output_like

    def nan_output_like(q: torch.Tensor) -> torch.Tensor:
        return poison_(real(q))

    monkeypatch.setattr(attention_module, "empty_output_like", nan_output_like)
    try:
        tri = importlib.import_module("depthpro_fast.triton.attention")
    except ImportError:  # no Triton installed: only the reference runs
        return
    monkeypatch.setattr(tri, "empty_output_like", nan_output_like)


@pytest.fixture
def tri():
    """The Triton module (imported lazily: importing it imports Triton)."""
    return importlib.import_module("depthpro_fast.triton.attention")


# ------------------------------------------------------------------------------------------------
# CPU: the test grid (under the interpreter for Triton)

_BH = ((1, 1), (3, 2), (1, 2), (3, 1))
# Every head dim x dtype at the small N (B, H cycling through 1/3 x 1/2) ...
SMALL_CASES = [
    (*_BH[i % len(_BH)], n, d, dtype)
    for i, (n, d, dtype) in enumerate(
        (n, d, dtype)
        for d in (32, 64, 128)
        for dtype in (torch.float32, torch.float16)
        for n in (1, 17, 64))
]
# ... and DepthPro's 577 tokens (ragged last tile) for a few: about 2.5 s per head here.
LARGE_CASES = [
    (1, 1, 577, 64, torch.float32),
    (1, 2, 577, 64, torch.float16),
]


def _case_id(case: tuple) -> str:
    b, h, n, d, dtype = case
    return f"B{b}-H{h}-N{n}-D{d}-{str(dtype).removeprefix('torch.')}"


def check_case(backend: str, case: tuple) -> tuple[torch.Tensor, ...]:
    """Run ``backend`` on a fresh packed-qkv case at the default scale; check its layout and
    budget. Returns (out, q, k, v, scale) for further checks."""
    b, h, n, d, dtype = case
    _, q, k, v = packed_qkv(b, h, n, d, dtype, case_seed(backend, case))
    scale = d ** -0.5
    out = attention(q, k, v, scale=scale, backend=backend)
    check_output_layout(out)
    check_budget(out, q, k, v, scale)
    return out, q, k, v, scale


@pytest.mark.parametrize("case", SMALL_CASES + LARGE_CASES, ids=_case_id)
def test_reference_matches_fp64(case, poisoned):
    check_case("reference", case)


# The ``torch`` backend (PyTorch's scaled_dot_product_attention): CPU cases of every head dim and
# dtype, DepthPro's 577 tokens with batch 1 and 35 windows and several head counts, and bf16.
SDPA_CASES = SMALL_CASES + LARGE_CASES + [
    (35, 2, 577, 64, torch.float32), (1, 16, 577, 64, torch.float32),
    (2, 3, 577, 64, torch.float16), (1, 4, 577, 64, torch.bfloat16),
    (3, 2, 17, 64, torch.bfloat16)]


@pytest.mark.parametrize("case", SDPA_CASES, ids=_case_id)
def test_torch_sdpa_matches_fp64(case):
    out, q, k, v, scale = check_case("torch", case)
    if q.dtype == torch.float32:  # exact up to rounding against the reference
        ref = attention(q, k, v, scale=scale, backend="reference")
        assert torch.allclose(out, ref, rtol=0, atol=1e-5)


def test_torch_sdpa_copies_other_layouts(monkeypatch, poisoned):
    """An SDPA that returns another memory layout is copied into the (B, N, H, D) layout."""
    _, q, k, v = packed_qkv(2, 3, 17, 32, torch.float32, case_seed("layout"))
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: real(*a, **kw).contiguous())
    out = attention(q, k, v, backend="torch")
    check_output_layout(out)
    check_budget(out, q, k, v, 32 ** -0.5)


def test_auto_on_cpu_runs_sdpa_and_reference_stays_plain():
    cpu = torch.device("cpu")
    assert backends.implementation("attention", "auto", cpu) is attention_module.attention_sdpa
    assert backends.implementation("attention", "reference", cpu) is \
        attention_module.attention_reference
    # ops without a PyTorch kernel of their own run their (plain PyTorch) reference
    assert backends.implementation("split_patches", "torch", cpu) is \
        backends.implementation("split_patches", "reference", cpu)


@requires_triton
@pytest.mark.parametrize("case", SMALL_CASES + LARGE_CASES, ids=_case_id)
def test_triton_matches_fp64(case, poisoned):
    check_case("triton", case)


@requires_triton
@pytest.mark.parametrize("blocks", [(16, 16), (128, 64)])
def test_triton_other_block_sizes(blocks, tri, poisoned, monkeypatch):
    """GPU-sized tiles (and the smallest tl.dot tile) at 577 tokens, several batches and heads."""
    if not tri._INTERPRETED:
        pytest.skip("block sizes are autotuned on a GPU")
    monkeypatch.setattr(tri, "INTERPRETER_BLOCKS", blocks)
    b, h, n, d = (3, 2, 577, 32) if blocks == (128, 64) else (1, 1, 100, 64)
    _, q, k, v = packed_qkv(b, h, n, d, torch.float16, case_seed("blocks", blocks))
    out = attention(q, k, v, scale=0.3, backend="triton")
    check_budget(out, q, k, v, 0.3)


@requires_triton
def test_poison_reaches_the_triton_output(tri, poisoned, monkeypatch):
    """Guard of the poisoning itself: a kernel that writes nothing leaves NaN everywhere."""
    monkeypatch.setattr(tri, "launch", lambda q, k, v, out, scale: out)
    _, q, k, v = packed_qkv(1, 2, 17, 32, torch.float32, 0)
    assert torch.isnan(attention(q, k, v, backend="triton")).all()


@requires_triton
def test_triton_reads_strided_views_in_place(tri, monkeypatch):
    """The packed-qkv views reach the kernel as they are: same memory, same strides, no copy."""
    seen: dict[str, tuple[int, tuple[int, ...]]] = {}
    real_launch = tri.launch

    def spy(q, k, v, out, scale):
        for name, t in (("q", q), ("k", k), ("v", v)):
            seen[name] = (t.data_ptr(), t.stride())
        return real_launch(q, k, v, out, scale)

    monkeypatch.setattr(tri, "launch", spy)
    qkv, q, k, v = packed_qkv(2, 2, 17, 32, torch.float32, case_seed("views"))
    attention(q, k, v, backend="triton")
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert seen[name] == (t.data_ptr(), t.stride()), name
    assert seen["q"][0] == qkv.data_ptr()


@requires_triton
def test_triton_mixed_layouts(poisoned):
    """q, k, v each in its own layout: contiguous, transposed storage, a sliced view."""
    b, h, n, d = 2, 2, 33, 64
    g = torch.Generator().manual_seed(case_seed("layouts"))
    q = torch.randn(b, h, n, d, generator=g)                                 # contiguous
    k = torch.randn(b, h, d, n, generator=g).transpose(2, 3)                 # D-major
    v = torch.randn(n, b, h, 2 * d, generator=g).permute(1, 2, 0, 3)[..., ::2]  # strided D
    out = attention(q, k, v, scale=0.2, backend="triton")
    check_output_layout(out)
    check_budget(out, q, k, v, 0.2)


@requires_triton
def test_triton_scale_and_large_scores(poisoned):
    """Large logits (scale 1, scaled-up q): the online softmax must not overflow."""
    _, q, k, v = packed_qkv(1, 2, 40, 32, torch.float32, case_seed("large"))
    q = q * 8
    out = attention(q, k, v, scale=1.0, backend="triton")
    check_budget(out, q, k, v, 1.0)


@requires_triton
def test_triton_empty_batch(tri):
    q = torch.empty(0, 2, 17, 32)
    out = tri.attention_triton(q, q, q, 0.5)
    assert out.shape == (0, 2, 17, 32)


@requires_triton
def test_triton_custom_op_fake_layout():
    """The fake (meta) implementation promises the real output layout."""
    from depthpro_fast.triton import attention as tri_mod  # noqa: F401  (registers the op)

    _, q, k, v = packed_qkv(2, 3, 17, 32, torch.float32, 0, device="meta")
    out = torch.ops.depthpro_fast.attention_triton(q, k, v, 0.5)
    assert out.device.type == "meta"
    check_output_layout(out)


@requires_triton
def test_triton_opcheck():
    """torch.library's own consistency checks of the custom op (schema, fake, autograd)."""
    from depthpro_fast.triton import attention as tri_mod  # noqa: F401

    _, q, k, v = packed_qkv(1, 2, 17, 32, torch.float32, case_seed("opcheck"))
    torch.library.opcheck(torch.ops.depthpro_fast.attention_triton.default, (q, k, v, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@requires_triton
def test_triton_compiles_fullgraph_on_cpu():
    """Dynamo sees the dispatch plus the custom op as one graph (aot_eager: no C++ compiler)."""
    from depthpro_fast.triton import attention as tri_mod  # noqa: F401

    def fn(q, k, v):
        return torch.ops.depthpro_fast.attention_triton(q, k, v, 0.125) * 2

    _, q, k, v = packed_qkv(1, 2, 17, 64, torch.float32, case_seed("compile"))
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    check_budget(out / 2, q, k, v, 0.125)

    # Through the op's dispatch too. The eager call first loads the implementation: the first
    # load (an import under a lock in backends._load) cannot be traced by Dynamo.
    def dispatched(q, k, v):
        return attention(q, k, v, scale=0.125, backend="triton") * 2

    dispatched(q, k, v)
    out = torch.compile(dispatched, fullgraph=True, backend="aot_eager")(q, k, v)
    check_budget(out / 2, q, k, v, 0.125)


# ------------------------------------------------------------------------------------------------
# bad input


def _qkv(shape=(1, 2, 17, 32), dtype=torch.float32):
    return tuple(torch.randn(shape).to(dtype) for _ in range(3))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_bad_inputs(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0], backend=backend)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.half(), v, backend=backend)
    with pytest.raises(TypeError, match="accepted: float32"):
        attention(q.int(), k.int(), v.int(), backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attention(q, k.numpy(), v, backend=backend)
    with pytest.raises(ValueError, match="same"):
        attention(q, k[:, :, :5], v, backend=backend)
    with pytest.raises(ValueError, match="finite"):
        attention(q, k, v, scale=float("nan"), backend=backend)


@requires_triton
@pytest.mark.parametrize("d", [16, 48, 256])
def test_triton_rejects_unsupported_head_dim(d, tri):
    q, k, v = _qkv((1, 2, 17, d))
    with pytest.raises(ValueError, match=r"head dim D=\d+ is not supported; accepted: 32, 64"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="not supported"):
        tri.attention_triton(q, k, v, 0.5)
    # the reference takes any head dim
    out = attention(q, k, v, backend="reference")
    check_budget(out, q, k, v, d ** -0.5)


@requires_triton
def test_triton_direct_call_checks(tri):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="4-D"):
        tri.attention_triton(q[0], k[0], v[0], 0.5)
    with pytest.raises(TypeError, match="share a dtype"):
        tri.attention_triton(q, k.half(), v, 0.5)
    with pytest.raises(TypeError, match="scale must be a float"):
        tri.attention_triton(q, k, v, "0.5")
    with pytest.raises(ValueError, match="finite"):
        tri.attention_triton(q, k, v, math.inf)


# ------------------------------------------------------------------------------------------------
# the tiny golden model with Triton attention (interpreter)


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.double(), e.double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-12))


@requires_triton
def test_triton_attention_in_vit_block(tiny_model, tri, monkeypatch):
    """One ViT attention module with the real fixture weights: Triton vs reference, fp32."""
    if tri._INTERPRETED:
        monkeypatch.setattr(tri, "INTERPRETER_BLOCKS", (128, 128))  # few, GPU-sized tiles
    model, _ = tiny_model
    attn = copy.deepcopy(model.encoder.patch_encoder.blocks[0].attn)
    g = torch.Generator().manual_seed(case_seed("vit-block"))
    x = torch.randn(3, 577, attn.qkv.in_features, generator=g)
    with torch.no_grad():
        attn.backend = "reference"
        ref = attn(x)
        attn.backend = "triton"
        out = attn(x)
    assert _rel(out, ref) < 1e-5


@requires_triton
@pytest.mark.slow
def test_triton_attention_golden_parity(tiny_image, expected_estimated, tri, monkeypatch):
    """Tiny golden fixture with every attention on Triton (37 x 577-token sequences x 4 blocks).

    Only the attention modules switch backend: split/merge keep their reference (their Triton
    kernels are tested in their own files).
    """
    if tri._INTERPRETED:
        monkeypatch.setattr(tri, "INTERPRETER_BLOCKS", (128, 128))  # ~0.2 s per head
    model, transform = depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt",
                                          config=TINY_DIR / "config.json", device="cpu",
                                          backend="reference")
    n_attn = 0
    for m in model.modules():
        if isinstance(m, depthpro_fast.model.Attention):
            m.backend = "triton"
            n_attn += 1
    assert n_attn > 0
    calls = []
    real_launch = tri.launch
    monkeypatch.setattr(tri, "launch", lambda *a: calls.append(1) or real_launch(*a))
    t0 = time.perf_counter()
    out = model.infer(transform(tiny_image))
    depth_err = _rel(out["depth"], expected_estimated["depth"])
    f_err = abs(float(out["focallength_px"]) / float(expected_estimated["focallength_px"]) - 1)
    print(f"golden parity with Triton attention: {time.perf_counter() - t0:.1f} s, "
          f"depth rel err {depth_err:.2g}, focal length rel err {f_err:.2g}")
    assert len(calls) == n_attn
    assert depth_err < 1e-4
    assert f_err < 1e-4


# ------------------------------------------------------------------------------------------------
# GPU: Triton and CUDA against the reference
#
# The CUDA backend (depthpro_fast.cuda.attention, the extension's depthpro_fast::attention) is
# parametrised here too and skipped until the extension with its attention kernel is built.

GPU_BACKENDS = ["triton", "cuda"]
DEPTHPRO_SHAPES = [(35, 16, 577, 64), (1, 16, 577, 64)]  # patch encoder; image / FOV encoder
GPU_CASES = (
    [(shape, dtype) for shape in DEPTHPRO_SHAPES
     for dtype in (torch.float16, torch.bfloat16, torch.float32)]
    + [(shape, dtype)
       for shape in sorted({(b, h, n, d) for b, h, n, d, _ in SMALL_CASES + LARGE_CASES})
       for dtype in (torch.float16, torch.bfloat16)]
)


def _skip_unless_gpu_backend(backend: str) -> None:
    ok, why = backends.backend_status(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if backend == "cuda":
        from depthpro_fast import _ext

        if not _ext.has_op("attention"):
            pytest.skip("the CUDA extension has no attention kernel")


def _op_for(backend: str):
    """The registered torch.library op of a backend (one opaque node for compile/graphs)."""
    if backend == "triton":
        importlib.import_module("depthpro_fast.triton.attention")
        return torch.ops.depthpro_fast.attention_triton
    importlib.import_module("depthpro_fast.cuda.attention")
    return torch.ops.depthpro_fast.attention


def _gpu_case_id(case: tuple) -> str:
    shape, dtype = case
    return "x".join(map(str, shape)) + "-" + str(dtype).removeprefix("torch.")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_case_id)
def test_gpu_matches_fp64(backend, case, poisoned):
    """fp32 is part of the op's contract: the cuda backend must take it too (or fall back)."""
    _skip_unless_gpu_backend(backend)
    shape, dtype = case
    b, h, n, d = shape
    _, q, k, v = packed_qkv(b, h, n, d, dtype, case_seed("gpu", backend, dtype, shape), "cuda")
    scale = d ** -0.5
    out = attention(q, k, v, scale=scale, backend=backend)
    check_output_layout(out)
    check_budget(out, q, k, v, scale)
    # and agreement with the reference backend (fp32 math) within the same budget
    ref = attention(q, k, v, scale=scale, backend="reference")
    check_budget(ref, q, k, v, scale)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_torch_compile_fullgraph(backend):
    _skip_unless_gpu_backend(backend)
    op = _op_for(backend)
    scale = 0.125

    def block(qkv: torch.Tensor) -> torch.Tensor:
        b, n = qkv.shape[:2]
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        o = op(q, k, v, scale)
        return o.transpose(1, 2).reshape(b, n, -1) * 2

    qkv, q, k, v = packed_qkv(2, 16, 577, 64, torch.bfloat16, case_seed("gpu-compile"), "cuda")
    out = torch.compile(block, fullgraph=True)(qkv)
    expect = block(qkv)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    o = (out / 2).view(2, 577, 16, 64).transpose(1, 2)
    check_budget(o, q, k, v, scale)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_capture_replay(backend):
    _skip_unless_gpu_backend(backend)
    op = _op_for(backend)
    scale = 0.125
    qkv, q, k, v = packed_qkv(35, 16, 577, 64, torch.float16, case_seed("graph-a"), "cuda")
    # warm up on a side stream (Triton autotunes and compiles on its first call)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            op(q, k, v, scale)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v, scale)
    new, *_ = packed_qkv(35, 16, 577, 64, torch.float16, case_seed("graph-b"), "cuda")
    qkv.copy_(new)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_output_layout(out)
    check_budget(out, q, k, v, scale)
