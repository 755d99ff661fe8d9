"""Property tests (hypothesis): random shapes, strides and dtypes, every op against its
reference. The Triton implementations run under TRITON_INTERPRET=1 on CPU, so the example
counts are small; each run draws fresh examples."""

from __future__ import annotations

import math

import pytest
import torch

# hypothesis is a dev extra: without it this module is skipped, not an error at collection
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from depthpro_fast import ops  # noqa: E402
from depthpro_fast.ops.merge_patches import max_blend  # noqa: E402
from tests.conftest import requires_triton  # noqa: E402

SETTINGS = dict(deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attention_fp64(q, k, v, scale):
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(s, -1), v.double())


def _qkv(b, h, n, d, dtype, layout, seed):
    g = _seeded(seed)
    if layout == "packed":  # views into the qkv GEMM output (B, N, 3, H, D)
        packed = torch.randn(b, n, 3, h, d, generator=g).to(dtype)
        return tuple(packed[:, :, i].transpose(1, 2) for i in range(3))
    if layout == "bnhd":  # (B, N, H, D) tensors seen as (B, H, N, D)
        return tuple(torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
                     for _ in range(3))
    # sliced head dim: the last-dim stride is 1 but rows are padded
    return tuple(torch.randn(b, h, n, d + 8, generator=g).to(dtype)[..., :d] for _ in range(3))


@requires_triton
@settings(max_examples=12, **SETTINGS)
@given(b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 70),
       d=st.sampled_from([32, 64]), dtype=st.sampled_from(sorted(DTYPES)),
       layout=st.sampled_from(["packed", "bnhd", "padded"]),
       scale=st.one_of(st.none(), st.floats(0.01, 2.0)), seed=st.integers(0, 2**31 - 1))
def test_attention_triton_matches_reference(b, h, n, d, dtype, layout, scale, seed):
    q, k, v = _qkv(b, h, n, d, DTYPES[dtype], layout, seed)
    s = d ** -0.5 if scale is None else scale
    exact = _attention_fp64(q, k, v, s)
    out = ops.attention(q, k, v, scale=scale, backend="triton")
    ref = ops.attention(q, k, v, scale=scale, backend="reference")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory
    tol = 1e-5 if dtype == "float32" else 2e-3
    err = float((out.double() - exact).abs().max())
    ref_err = float((ref.double() - exact).abs().max())
    assert err <= max(2 * ref_err, tol), (err, ref_err)


@st.composite
def merge_cases(draw):
    side = draw(st.integers(2, 10))
    grid = draw(st.integers(1, 4))
    padding = draw(st.integers(0, (side - 1) // 2)) if grid > 1 else 0
    limit = max_blend(side, side, grid, padding) if grid > 1 else 0
    blend = draw(st.integers(0, limit)) if limit > 0 else 0
    return dict(side=side, grid=grid, padding=padding, blend=blend,
                batch=draw(st.integers(1, 2)), channels=draw(st.integers(1, 20)),
                form=draw(st.sampled_from(["tokens", "maps", "maps-strided"])),
                channels_last=draw(st.booleans()), dtype=draw(st.sampled_from(sorted(DTYPES))),
                seed=draw(st.integers(0, 2**31 - 1)))


@requires_triton
@settings(max_examples=20, **SETTINGS)
@given(case=merge_cases())
def test_merge_triton_matches_reference(case):
    n = case["grid"] ** 2 * case["batch"]
    side, c = case["side"], case["channels"]
    g = _seeded(case["seed"])
    dtype = DTYPES[case["dtype"]]
    if case["form"] == "tokens":
        x = torch.randn(n, 1 + side * side, c, generator=g).to(dtype)
    elif case["form"] == "maps":
        x = torch.randn(n, c, side, side, generator=g).to(dtype)
    else:  # a permuted (n, h, w, C) buffer: channels-last strides
        x = torch.randn(n, side, side, c, generator=g).to(dtype).permute(0, 3, 1, 2)
    kwargs = dict(batch_size=case["batch"], grid=case["grid"], padding=case["padding"],
                  blend=case["blend"], channels_last=case["channels_last"])
    out = ops.merge_patches(x, backend="triton", **kwargs)
    ref = ops.merge_patches(x, backend="reference", **kwargs)
    assert out.shape == ref.shape
    if case["channels_last"]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    if case["blend"] == 0:
        assert torch.equal(out, ref)  # a pure gather: bit-exact
    else:
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@requires_triton
@settings(max_examples=4, **SETTINGS)
@given(h=st.integers(1, 700), w=st.integers(1, 700),
       dtype=st.sampled_from(["uint8", "float32", "float16"]),
       layout=st.sampled_from(["contiguous", "channels_last", "hwc-view"]),
       seed=st.integers(0, 2**31 - 1))
def test_split_triton_matches_reference(h, w, dtype, layout, seed):
    g = _seeded(seed)
    if dtype == "uint8":
        hwc = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=g)
    else:
        hwc = torch.rand(1, h, w, 3, generator=g).to(DTYPES[dtype])
    image = hwc.permute(0, 3, 1, 2)  # an HWC buffer seen as (B, 3, H, W)
    if layout == "contiguous":
        image = image.contiguous()
    elif layout == "channels_last":
        image = image.contiguous(memory_format=torch.channels_last)
    out = ops.split_patches(image, backend="triton")
    ref = ops.split_patches(image, backend="reference")
    assert out.shape == (35, 3, 384, 384) and out.dtype == ref.dtype
    # the kernel rounds once from fp32; the fp16 reference rounds after each step
    tol = 2e-6 if ref.dtype == torch.float32 else 2 * 2.0 ** -10
    err = float((out.float() - ref.float()).abs().max())
    assert math.isfinite(err) and err <= tol, err


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_attention_any_last_dim_stride(backend):
    # a head dim whose elements are not adjacent (last-dim stride 2)
    g = _seeded(7)
    q, k, v = (torch.randn(1, 2, 5, 32, 2, generator=g)[..., 0] for _ in range(3))
    assert q.stride(-1) == 2
    out = ops.attention(q, k, v, backend=backend)
    torch.testing.assert_close(out.double(), _attention_fp64(q, k, v, 32 ** -0.5),
                               rtol=1e-5, atol=1e-6)
