"""merge_patches: the crop (bit-exact gather) and the overlap-blend, reference and Triton kernel
(interpreter on CPU), the CUDA kernel's arithmetic on the host (when nvcc is installed) and, on a
GPU, the Triton and CUDA kernels vs the reference.

Blend tolerances: the kernels interpolate (``nb + w * (own - nb)``) in float32 and round once;
the reference sums weighted windows in float32: 1e-6 of max |x| for float32; for reduced
precision one ulp of the output plus that float32 term (results near 0 come from cancellation).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from depthpro_fast import ops
from depthpro_fast.ops.merge_patches import (
    blend_weights,
    max_blend,
    merge_patches_reference,
    merged_size,
    tokens_to_maps,
)
from tests.conftest import HAS_CUDA, poison_, requires_triton

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# (grid, padding, window side): the encoder's level 0 and level 1, and an odd small geometry
LEVEL0 = (5, 3, 24)
LEVEL1 = (3, 6, 24)
ODD = (4, 2, 7)


def random_tokens(geometry, batch: int, channels: int, dtype: torch.dtype, *, seed: int,
                  maps: bool = False, device: str = "cpu") -> torch.Tensor:
    grid, _, side = geometry
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(grid * grid * batch, 1 + side * side, channels, generator=g).to(dtype)
    t = t.to(device)
    return tokens_to_maps(t) if maps else t  # maps: a non-contiguous (n, C, h, w) view


def assert_blend_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any()
    o, r = out.float(), ref.float().to(out.device)
    if out.dtype == torch.float32:
        tol = 1e-6 * r.abs().max().item()
    else:
        info = torch.finfo(out.dtype)
        _, exp = torch.frexp(r.abs())
        tol = torch.ldexp(torch.full_like(r, info.eps), exp - 1).clamp_min(info.tiny * info.eps)
        tol = tol + 1e-6 * r.abs().max().item()  # float32 cancellation where the result is ~0
    assert ((o - r).abs() <= tol).all(), (o - r).abs().max().item()


@pytest.fixture
def poisoned_triton_output(monkeypatch):
    """The Triton op's output buffer starts NaN-filled, so unwritten elements fail the test."""
    import depthpro_fast.triton.merge_patches as mod

    monkeypatch.setattr(mod, "_alloc", lambda *a, **k: poison_(torch.empty(*a, **k)))


# --------------------------------------------------------------------------------------------
# The definition (reference)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", [LEVEL0, LEVEL1, ODD, (2, 0, 5)], ids=str)
def test_blend_weights_sum_to_one(geometry):
    grid, padding, side = geometry
    for blend in range(0, max(max_blend(side, side, grid, padding), 1) + 1):
        w = blend_weights(side, grid, padding, blend)
        total = torch.zeros(merged_size(side, grid, padding), dtype=torch.float64)
        stride = side - 2 * padding
        for j in range(grid):
            total[j * stride:j * stride + side] += w[j]
        assert torch.equal(total, torch.ones_like(total)), (blend, total)
        assert ((w >= 0) & (w <= 1)).all()
        if grid > 1 and blend > 0:  # symmetric ramps
            torch.testing.assert_close(w[0], w[-1].flip(0), rtol=0, atol=1e-15)


def test_blend_weights_are_the_documented_ramp():
    # level 0, k = 6: window 0's last 6 tokens ramp 11/12, 9/12, ..., 1/12 across the boundary
    w = blend_weights(24, 5, 3, 6)
    torch.testing.assert_close(w[0, 18:], torch.tensor([11, 9, 7, 5, 3, 1.0],
                                                       dtype=torch.float64) / 12,
                               rtol=0, atol=1e-15)
    assert (w[0, :18] == 1).all() and (w[1, 6:18] == 1).all()
    # k = 0 and k = 1 are the crop's 0/1 mask
    for k in (0, 1):
        assert torch.equal(blend_weights(24, 5, 3, k)[1],
                           torch.tensor([0.0] * 3 + [1.0] * 18 + [0.0] * 3, dtype=torch.float64))


def test_reference_crop_is_the_spec_geometry():
    """Spec §2.4: level-0 window (j, i) provides token rows [18j + (3 if j > 0), 18j + (21 if
    j < 4 else 24)): mark every window's tokens with its index and check the tiling."""
    grid, padding, side = LEVEL0
    ids = torch.arange(grid * grid, dtype=torch.float32)
    maps = ids.view(-1, 1, 1, 1).expand(-1, 1, side, side)
    out = merge_patches_reference(maps, batch_size=1, grid=grid, padding=padding)[0, 0]
    assert out.shape == (96, 96)
    bounds = [0, 21, 39, 57, 75, 96]
    for j in range(grid):
        for i in range(grid):
            block = out[bounds[j]:bounds[j + 1], bounds[i]:bounds[i + 1]]
            assert (block == j * grid + i).all()


# --------------------------------------------------------------------------------------------
# Triton vs the reference
# --------------------------------------------------------------------------------------------

# (geometry, batch, channels, dtype, maps input, channels_last)
CROP_CASES = [
    (LEVEL0, 1, 16, torch.float32, False, False),
    (LEVEL0, 2, 130, torch.float16, False, True),
    (LEVEL1, 2, 1, torch.float32, False, False),
    (LEVEL1, 1, 130, torch.float32, True, False),
    (ODD, 2, 16, torch.float16, True, True),
    (ODD, 1, 1, torch.float16, False, True),
]


def _case_id(case) -> str:
    geometry, b, c, dtype, maps, cl = case
    return (f"g{geometry[0]}p{geometry[1]}h{geometry[2]}-B{b}-C{c}-{str(dtype)[6:]}"
            f"{'-maps' if maps else ''}{'-nhwc' if cl else ''}")


@requires_triton
@pytest.mark.parametrize("case", CROP_CASES, ids=_case_id)
def test_triton_crop_is_bit_exact(case, poisoned_triton_output):
    geometry, b, c, dtype, maps, cl = case
    grid, padding, _ = geometry
    tokens = random_tokens(geometry, b, c, dtype, seed=b * 1000 + c, maps=maps)
    kw = dict(batch_size=b, grid=grid, padding=padding, channels_last=cl)
    out = ops.merge_patches(tokens, backend="triton", **kw)
    ref = merge_patches_reference(tokens, **kw)
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last if cl else
                             torch.contiguous_format)


@requires_triton
@pytest.mark.parametrize("case", CROP_CASES, ids=_case_id)
def test_triton_blend_matches_reference(case, poisoned_triton_output):
    geometry, b, c, dtype, maps, cl = case
    grid, padding, side = geometry
    tokens = random_tokens(geometry, b, c, dtype, seed=b * 1000 + c + 1, maps=maps)
    for blend in sorted({2, 3, max_blend(side, side, grid, padding)}):
        kw = dict(batch_size=b, grid=grid, padding=padding, blend=blend, channels_last=cl)
        out = ops.merge_patches(tokens, backend="triton", **kw)
        assert_blend_close(out, merge_patches_reference(tokens, **kw))
        assert out.is_contiguous(memory_format=torch.channels_last if cl else
                                 torch.contiguous_format)


@requires_triton
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_blend_of_one_is_the_crop(backend):
    tokens = random_tokens(LEVEL1, 2, 16, torch.float32, seed=5)
    kw = dict(batch_size=2, grid=3, padding=6)
    crop = merge_patches_reference(tokens, **kw)
    assert torch.equal(ops.merge_patches(tokens, blend=1, backend=backend, **kw), crop)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blend_of_constant_windows_is_the_constant(dtype):
    """The weights sum to one: merging any windows that are all the same constant gives it."""
    value = 0.7
    tokens = torch.full((25, 577, 3), value, dtype=dtype)
    for blend in (2, 5, 6):
        out = ops.merge_patches(tokens, batch_size=1, grid=5, padding=3, blend=blend,
                                backend="triton")
        assert (out == torch.tensor(value, dtype=dtype)).all()  # the kernel: exactly
        ref = merge_patches_reference(tokens, batch_size=1, grid=5, padding=3, blend=blend)
        assert_blend_close(ref, out)  # the weighted sum: to an ulp


@requires_triton
def test_blend_equals_crop_away_from_the_ramps():
    grid, padding, side = LEVEL0
    tokens = random_tokens(LEVEL0, 1, 8, torch.float32, seed=9)
    crop = merge_patches_reference(tokens, batch_size=1, grid=grid, padding=padding)
    for blend in (2, 4, 6):
        out = ops.merge_patches(tokens, batch_size=1, grid=grid, padding=padding, blend=blend,
                                backend="triton")
        # tokens whose centres are at least k/2 from every boundary 18j + 21
        pos = torch.arange(96) + 0.5
        boundaries = torch.tensor([21.0, 39.0, 57.0, 75.0])
        far = ((pos[:, None] - boundaries[None, :]).abs() >= blend / 2).all(1)
        assert torch.equal(out[..., far, :][..., far], crop[..., far, :][..., far])
        assert not torch.equal(out, crop)


@requires_triton
def test_blend_is_continuous_across_window_borders():
    """Windows of different constants: the crop jumps by the full difference at a boundary, the
    blend of width k changes by at most that difference / k between neighbouring tokens."""
    grid, padding, side = LEVEL1
    values = torch.tensor([[0.0, 3.0, -2.0], [5.0, 1.0, -4.0], [2.0, 6.0, -1.0]])
    maps = values.view(-1, 1, 1, 1).expand(-1, 2, side, side).contiguous()
    # largest difference between neighbouring windows' values
    jump = max(values.diff(dim=0).abs().max(), values.diff(dim=1).abs().max()).item()
    crop = ops.merge_patches(maps, batch_size=1, grid=grid, padding=padding, backend="triton")
    assert max(crop.diff(dim=-1).abs().max(), crop.diff(dim=-2).abs().max()) == jump
    for blend in (2, 6, 12):
        out = ops.merge_patches(maps, batch_size=1, grid=grid, padding=padding, blend=blend,
                                backend="triton")
        for dim in (-1, -2):
            assert out.diff(dim=dim).abs().max().item() <= jump / blend + 1e-5


@requires_triton
def test_merge_of_split_round_trips():
    """merge(encoder(split(x))) with an identity-like encoder (16x16 average pooling, a linear
    patch embedding) gives the pooled pyramid level back, for the crop and for any blend: the
    windows agree wherever they overlap."""
    g = torch.Generator().manual_seed(21)
    x = torch.rand(1, 3, 1536, 1536, generator=g) * 2 - 1
    patches = ops.split_patches(x, prenormalized=True, backend="triton")

    def encoder(windows: torch.Tensor) -> torch.Tensor:  # (n, 3, 384, 384) -> (n, 577, 3)
        tokens = F.avg_pool2d(windows, 16).flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)

    level0 = F.avg_pool2d(x, 16)
    level1 = F.avg_pool2d(F.interpolate(x, scale_factor=0.5, mode="bilinear",
                                        align_corners=False), 16)
    tokens0, tokens1 = encoder(patches[:25]), encoder(patches[25:34])
    for blend in (0, 3, 6):
        out0 = ops.merge_patches(tokens0, batch_size=1, grid=5, padding=3, blend=blend,
                                 backend="triton")
        assert torch.equal(out0, level0)  # level-0 windows are exact copies
    for blend in (0, 5, 12):
        out1 = ops.merge_patches(tokens1, batch_size=1, grid=3, padding=6, blend=blend,
                                 backend="triton")
        torch.testing.assert_close(out1, level1, rtol=0, atol=1e-6)


@requires_triton
def test_tiny_model_with_triton_split_and_merge_matches_golden(tiny_model, tiny_image,
                                                               expected_estimated, monkeypatch):
    """The golden parity (official outputs, 1e-5 relative) with the encoder's split and merge
    routed to the Triton kernels and every other op left on the reference."""
    from depthpro_fast import backends

    model, transform = tiny_model
    with torch.no_grad():
        reference = model.infer(transform(tiny_image))["depth"].double()
    original = backends.implementation

    def triton_split_merge(op, backend, device):
        if op in ("split_patches", "merge_patches"):
            return original(op, "triton", device)
        return original(op, backend, device)

    monkeypatch.setattr(backends, "implementation", triton_split_merge)
    with torch.no_grad():
        depth = model.infer(transform(tiny_image))["depth"].double()
    golden = expected_estimated["depth"].double()
    scale = golden.abs().max()
    assert (depth - golden).abs().max() / scale < 1e-5
    assert (depth - reference).abs().max() / scale < 1e-5


@requires_triton
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from depthpro_fast.triton.merge_patches import merge_patches_triton

    with FakeTensorMode():
        tokens = torch.empty(50, 577, 130, dtype=torch.float16)
        out = merge_patches_triton(tokens, batch_size=2, grid=5, padding=3, channels_last=True)
        assert out.shape == (2, 130, 96, 96) and out.dtype == torch.float16
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_bad_inputs_raise_clear_errors(backend):
    tokens = torch.randn(25, 577, 4)
    kw = dict(batch_size=1, grid=5, padding=3, backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.merge_patches(tokens.numpy(), **kw)
    with pytest.raises(ValueError, match="windows"):
        ops.merge_patches(tokens[:24], **kw)
    with pytest.raises(ValueError, match="1 \\+ h\\*w"):
        ops.merge_patches(tokens[:, :500], **kw)
    with pytest.raises(ValueError, match="must be"):
        ops.merge_patches(tokens[0], **kw)
    with pytest.raises(ValueError, match="blend 7 too wide.*0 to 6"):
        ops.merge_patches(tokens, blend=7, **kw)
    with pytest.raises(ValueError, match="blend must be an integer"):
        ops.merge_patches(tokens, blend=True, **kw)
    with pytest.raises(ValueError, match="padding 12 leaves nothing"):
        ops.merge_patches(tokens, batch_size=1, grid=5, padding=12, backend=backend)
    with pytest.raises(ValueError, match="batch_size"):
        ops.merge_patches(tokens, batch_size=0, grid=5, padding=3, backend=backend)


@requires_triton
def test_triton_rejects_integer_tokens():
    with pytest.raises(TypeError, match="dtype"):
        ops.merge_patches(torch.zeros(25, 577, 4, dtype=torch.int32), batch_size=1, grid=5,
                          padding=3, backend="triton")


# --------------------------------------------------------------------------------------------
# The CUDA kernel's arithmetic, run on the host (its per-pixel code is __host__ __device__).
# --------------------------------------------------------------------------------------------

HOST_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "merge_patches.cu"
using namespace depthpro_fast::merge_patches;
template <typename T>
int run(Params p, size_t n_in, const char* in, const char* out) {
  std::vector<T> src(n_in);
  FILE* f = fopen(in, "rb");
  if (!f || fread(src.data(), sizeof(T), n_in, f) != n_in) return 3;
  fclose(f);
  std::vector<T> dst(p.batch * p.channels * p.out_h * p.out_w);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t pix = 0; pix < p.out_h * p.out_w; ++pix) {
      const PixelTaps t = pixel_taps(p, pix);
      for (int64_t c = 0; c < p.channels; ++c)
        store(dst.data() + b * p.o_b + t.out + c * p.o_c,
              merged_value(src.data() + p.src_offset + b * p.s_n + c * p.s_c, t));
    }
  f = fopen(out, "wb");
  fwrite(dst.data(), sizeof(T), dst.size(), f);
  fclose(f);
  return 0;
}
int main(int argc, char** argv) {
  // dtype (1 float32, 2 float16) n T C batch grid padding blend channels_last in out;
  // tokens (n, T, C) contiguous, T = 1 + side^2
  if (argc != 12) return 2;
  const int dtype = atoi(argv[1]);
  const int64_t n = atoll(argv[2]), ntok = atoll(argv[3]);
  Params p{};
  p.channels = atoll(argv[4]); p.batch = atoll(argv[5]); p.grid = atoi(argv[6]);
  p.padding = atoi(argv[7]); p.blend = atoi(argv[8]); p.channels_last = atoi(argv[9]);
  int side = 0;
  while ((side + 1) * (side + 1) <= ntok - 1) ++side;
  p.win_h = p.win_w = side;
  p.s_c = 1; p.s_x = p.channels; p.s_y = side * p.channels; p.s_n = ntok * p.channels;
  p.src_offset = p.channels;
  p.out_h = p.out_w = p.grid * side - 2 * p.padding * (p.grid - 1);
  if (p.channels_last) {
    p.o_c = 1; p.o_x = p.channels; p.o_y = p.out_w * p.channels; p.o_b = p.out_h * p.o_y;
  } else {
    p.o_x = 1; p.o_y = p.out_w; p.o_c = p.out_h * p.out_w; p.o_b = p.channels * p.o_c;
  }
  const size_t n_in = n * ntok * p.channels;
  if (dtype == 1) return run<float>(p, n_in, argv[10], argv[11]);
  if (dtype == 2) return run<__half>(p, n_in, argv[10], argv[11]);
  return 2;
}
"""


@pytest.fixture(scope="module")
def host_merge(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    d = tmp_path_factory.mktemp("merge_host")
    (d / "harness.cu").write_text(HOST_HARNESS)
    subprocess.run([nvcc, "-std=c++17", "-O2", "-I", str(KERNELS), str(d / "harness.cu"), "-o",
                    str(d / "harness")], check=True, capture_output=True)
    return d


@pytest.mark.parametrize("case", [(LEVEL0, 2, 130, torch.float16, 0, True),
                                  (LEVEL0, 1, 16, torch.float32, 6, False),
                                  (LEVEL1, 2, 16, torch.float32, 5, True),
                                  (ODD, 2, 3, torch.float16, 3, False)], ids=str)
def test_cuda_kernel_arithmetic_on_host(host_merge, case):
    import numpy as np

    geometry, b, c, dtype, blend, cl = case
    grid, padding, side = geometry
    tokens = random_tokens(geometry, b, c, dtype, seed=c + blend)
    tokens.numpy().tofile(host_merge / "in.bin")
    subprocess.run([str(host_merge / "harness"), "1" if dtype == torch.float32 else "2",
                    str(tokens.shape[0]), str(tokens.shape[1]), str(c), str(b), str(grid),
                    str(padding), str(blend), str(int(cl)), str(host_merge / "in.bin"),
                    str(host_merge / "out.bin")], check=True)
    kw = dict(batch_size=b, grid=grid, padding=padding, blend=blend, channels_last=cl)
    ref = merge_patches_reference(tokens, **kw)
    raw = np.fromfile(host_merge / "out.bin",
                      dtype=np.float32 if dtype == torch.float32 else np.float16)
    h = ref.shape[-1]
    out = torch.from_numpy(raw)
    out = out.view(b, h, h, c).permute(0, 3, 1, 2) if cl else out.view(b, c, h, h)
    if blend <= 1:
        assert torch.equal(out, ref)
    else:
        assert_blend_close(out, ref)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

GPU_CASES = [(LEVEL0, 2, 1024, dt, False, cl) for dt in (torch.float32, torch.float16,
                                                         torch.bfloat16) for cl in (False, True)]
GPU_CASES += [(LEVEL1, 3, 130, torch.bfloat16, True, False), (ODD, 2, 1, torch.float16, False,
                                                             True)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_matches_reference(backend, case):
    if backend == "cuda":
        from depthpro_fast import _ext

        if not _ext.has_op("merge_patches"):
            pytest.skip(f"CUDA extension without merge_patches: {_ext.unavailable_reason()}")
    geometry, b, c, dtype, maps, cl = case
    grid, padding, side = geometry
    tokens = random_tokens(geometry, b, c, dtype, seed=c, maps=maps, device="cuda")
    for blend in (0, max_blend(side, side, grid, padding)):
        kw = dict(batch_size=b, grid=grid, padding=padding, blend=blend, channels_last=cl)
        # poison the caching allocator's free memory so stale values would show
        poison_(torch.empty(b * c * 96 * 96, dtype=dtype, device="cuda"))
        out = ops.merge_patches(tokens, backend=backend, **kw)
        ref = merge_patches_reference(tokens, **kw)
        if blend == 0:
            assert torch.equal(out, ref)
        else:
            assert_blend_close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last if cl else
                                 torch.contiguous_format)
