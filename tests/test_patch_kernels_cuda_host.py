"""CPU replay of the split_patches / merge_patches CUDA kernels vs the PyTorch references.

Compiles tests/cuda_host/patch_kernels_check.cu with nvcc (it includes kernels/split_patches.cu
and kernels/merge_patches.cu) and runs it on the CPU: it replays every (blockIdx, threadIdx) of
the launch grid the kernels' launchers use through the kernels' own per-thread bodies
(split_thread / merge_thread), the threads of a merge block as fibers that meet at the kernel's
__syncthreads, with poisoned shared memory, red zones around every buffer and a second replay in
reverse thread order (see the header comment of that file). The inputs and the Params are those
the torch glue (csrc/*.cpp) would pass; the outputs are compared here with the references
(depthpro_fast.ops.*, backend "reference"):

* split: crops (level-0 windows of a 1536x1536 image) bit-exact; float32 outputs within
  ``SPLIT_F32_ATOL`` of the float32 reference; float16 / bfloat16 outputs one rounding of the
  float32 reference (half an ulp, plus float32-level noise);
* merge: the crop (blend 0 / 1) bit-exact; the blend one rounding (float16 / bfloat16; none for
  float32) plus float32 evaluation noise (``MERGE_F32_EPS_MULT`` eps * max |input|) from the
  exact float64 blend of the same inputs, and twice that from the reference.

Needs nvcc only (no GPU, no CUDA torch); skipped when nvcc is not installed. Run with ``-s`` to
see the measured error of every case.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from depthpro_fast.ops.merge_patches import (
    blend_weights,
    merge_patches,
    merged_size,
    tokens_to_maps,
)
from depthpro_fast.ops.split_patches import split_patches
from tests.conftest import find_nvcc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cuda_host" / "patch_kernels_check.cu"

SPLIT_F32_ATOL = 2e-6
MERGE_F32_EPS_MULT = 8  # float32 blend error <= 8 eps * max |input|

DTYPE_CODE = {torch.uint8: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found ($NVCC, PATH, "
                                "/usr/local/cuda/bin)")


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitCase:
    label: str
    batch: int
    height: int
    width: int
    dtype: torch.dtype
    prenormalized: bool = False
    out_dtype: torch.dtype | None = None  # None: the glue's default
    channels_last: bool = False  # a strided (HWC-stored) image


SPLIT_CASES = [
    SplitCase("split-u8-1x301x457-f32", 1, 301, 457, torch.uint8),
    SplitCase("split-f32-1x301x457-f32", 1, 301, 457, torch.float32),
    SplitCase("split-u8-2x64x80-f16-hwc", 2, 64, 80, torch.uint8, out_dtype=torch.float16,
              channels_last=True),
    SplitCase("split-f32-2x64x80-f16", 2, 64, 80, torch.float32, out_dtype=torch.float16),
    SplitCase("split-f16-1x97x131-f32", 1, 97, 131, torch.float16, out_dtype=torch.float32),
    SplitCase("split-u8-1x1601x1700-bf16", 1, 1601, 1700, torch.uint8,
              out_dtype=torch.bfloat16),
    # the model's input: already normalised, 1536x1536 (the kernel's crop-only path)
    SplitCase("split-f32n-1x1536-f32", 1, 1536, 1536, torch.float32, prenormalized=True),
    SplitCase("split-f16n-1x1536-f16", 1, 1536, 1536, torch.float16, prenormalized=True),
]

# (grid, padding, side) as DepthProEncoder merges them: level 0 (5x5 windows, padding 3), level 1
# (3x3, padding 6), level 2 (one window); 24x24 tokens per 384 px window. ODD: a small odd one.
LEVEL0, LEVEL1, LEVEL2, ODD = (5, 3, 24), (3, 6, 24), (1, 0, 24), (4, 2, 7)


@dataclass(frozen=True)
class MergeCase:
    label: str
    geometry: tuple[int, int, int]
    batch: int
    channels: int
    dtype: torch.dtype
    blend: int
    channels_last: bool
    layout: str = "tokens"  # "tokens" (n, 1 + h*w, C), "maps" (n, C, h, w), "view" (maps view)


MERGE_CASES = [
    MergeCase("merge-L0-b2-c130-f32-crop", LEVEL0, 2, 130, torch.float32, 0, False),
    MergeCase("merge-L0-b1-c16-f16-crop-cl", LEVEL0, 1, 16, torch.float16, 0, True),
    MergeCase("merge-L0-b2-c16-f32-blend6", LEVEL0, 2, 16, torch.float32, 6, False),
    MergeCase("merge-L0-b1-c130-bf16-blend3-cl", LEVEL0, 1, 130, torch.bfloat16, 3, True),
    MergeCase("merge-L0-b2-c1-f32-blend2-cl", LEVEL0, 2, 1, torch.float32, 2, True),
    MergeCase("merge-L0-b1-c1-f16-crop", LEVEL0, 1, 1, torch.float16, 0, False),
    MergeCase("merge-L1-b2-c130-f16-crop-cl-maps", LEVEL1, 2, 130, torch.float16, 0, True,
              "maps"),
    MergeCase("merge-L1-b1-c16-f32-blend12", LEVEL1, 1, 16, torch.float32, 12, False),
    MergeCase("merge-L1-b2-c16-f16-blend5-cl-view", LEVEL1, 2, 16, torch.float16, 5, True,
              "view"),
    MergeCase("merge-L1-b2-c1-f32-blend1-maps", LEVEL1, 2, 1, torch.float32, 1, False, "maps"),
    MergeCase("merge-L2-b2-c16-f32-crop", LEVEL2, 2, 16, torch.float32, 0, False),
    MergeCase("merge-L2-b1-c130-bf16-crop-cl", LEVEL2, 1, 130, torch.bfloat16, 0, True),
    MergeCase("merge-odd-b2-c130-f32-blend3", ODD, 2, 130, torch.float32, 3, False),
    MergeCase("merge-odd-b2-c16-f16-blend2-cl", ODD, 2, 16, torch.float16, 2, True),
    MergeCase("merge-odd-b1-c16-f32-crop-view", ODD, 1, 16, torch.float32, 0, False, "view"),
]


def split_input(case: SplitCase) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.height * 7919 + case.width)
    shape = (case.batch, 3, case.height, case.width)
    if case.dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        x = torch.rand(shape, generator=g)
        x = (x * 2 - 1 if case.prenormalized else x).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def merge_input(case: MergeCase) -> torch.Tensor:
    grid, _, side = case.geometry
    g = torch.Generator().manual_seed(1000 * case.channels + 10 * case.blend + case.batch)
    n = grid * grid * case.batch
    if case.layout == "maps":
        return torch.randn(n, case.channels, side, side, generator=g).to(case.dtype)
    tokens = torch.randn(n, 1 + side * side, case.channels, generator=g).to(case.dtype)
    if case.layout == "view":  # (n, C, h, w) strided view of the tokens, storage offset C
        return tokens[:, 1:].reshape(n, side, side, case.channels).permute(0, 3, 1, 2)
    return tokens


# --------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------

def storage_span(x: torch.Tensor) -> torch.Tensor:
    """The elements from x's first element to its last one in memory, as a flat tensor (what
    the kernel sees from data_ptr() with x's strides)."""
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride(), strict=True))
    return torch.as_strided(x, (span,), (1,), x.storage_offset()).clone()


def write_raw(x: torch.Tensor, path: Path) -> int:
    flat = storage_span(x)
    flat.view(torch.uint8).numpy().tofile(path)
    return flat.numel()


def read_raw(path: Path, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` (float16 / bfloat16) numbers at |x| (float32 x)."""
    mant, min_exp = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}[dtype]
    _, e = torch.frexp(x.abs())
    return torch.pow(2.0, (e - 1).clamp(min=min_exp).float() - mant)


@dataclass
class Replay:
    outputs: dict[str, torch.Tensor]
    stdout: str
    seconds: float


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Replay:
    d = tmp_path_factory.mktemp("patch_kernels")
    exe = d / "patch_kernels_check"
    build = subprocess.run(
        [NVCC, "-std=c++17", "-O2", "-arch=sm_80", str(SOURCE), "-o", str(exe)],
        capture_output=True, text=True, timeout=600, cwd=d,
    )
    assert build.returncode == 0, f"nvcc failed:\n{build.stdout}\n{build.stderr}"

    lines, readers = [], {}
    for c in SPLIT_CASES:
        image = split_input(c)
        out_dtype = c.out_dtype or (image.dtype if image.dtype.is_floating_point
                                    else torch.float32)
        src_elems = write_raw(image, d / f"{c.label}.in")
        sb, sc, sh, sw = image.stride()
        lines.append(f"split {c.label} {DTYPE_CODE[image.dtype]} {DTYPE_CODE[out_dtype]} "
                     f"{int(c.prenormalized)} {c.batch} {c.height} {c.width} {sb} {sc} {sh} {sw} "
                     f"{src_elems} {d / f'{c.label}.in'} {d / f'{c.label}.out'}")
        shape = (35 * c.batch, 3, 384, 384)
        readers[c.label] = (out_dtype, lambda flat, shape=shape: flat.view(shape))
    for c in MERGE_CASES:
        tokens = merge_input(c)
        grid, padding, side = c.geometry
        size = merged_size(side, grid, padding)
        # the output tensor the glue allocates (its strides are passed to the kernel)
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        out = torch.empty(c.batch, c.channels, size, size, memory_format=fmt)
        src_elems = write_raw(tokens, d / f"{c.label}.in")
        dims = list(tokens.shape[1:]) + [0] * (4 - tokens.dim())
        strides = list(tokens.stride()) + [0] * (4 - tokens.dim())
        lines.append(
            f"merge {c.label} {DTYPE_CODE[c.dtype]} {tokens.dim()} {tokens.shape[0]} "
            f"{' '.join(map(str, dims[:3]))} {' '.join(map(str, strides[:4]))} {src_elems} "
            f"{c.batch} {grid} {padding} {c.blend} {int(c.channels_last)} "
            f"{' '.join(map(str, out.stride()))} {out.numel()} "
            f"{d / f'{c.label}.in'} {d / f'{c.label}.out'}")
        readers[c.label] = (c.dtype, lambda flat, o=out: torch.as_strided(flat, o.shape,
                                                                            o.stride()))
    manifest = d / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")

    t0 = time.perf_counter()
    run = subprocess.run([str(exe), str(manifest)], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, (
        f"replay failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}")
    outputs = {}
    for label, (dtype, shape_it) in readers.items():
        outputs[label] = shape_it(read_raw(d / f"{label}.out", dtype))
        (d / f"{label}.out").unlink()
        (d / f"{label}.in").unlink()
    print(f"\nhost replay of {len(lines)} cases: {seconds:.1f} s\n{run.stdout}")
    return Replay(outputs, run.stdout, seconds)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.label)
def test_split_kernel_replay_matches_reference(replay: Replay, case: SplitCase) -> None:
    out = replay.outputs[case.label]
    image = split_input(case)
    assert not out.isnan().any(), "unwritten (NaN-poisoned) outputs"
    ref32 = split_patches(image, prenormalized=case.prenormalized, out_dtype=torch.float32,
                          backend="reference")
    o = out.float()
    err = (o - ref32).abs()
    msg = f"{case.label}: max |out - ref_f32| = {err.max().item():.3e}"
    if image.shape[-2:] == (1536, 1536) and case.prenormalized:
        # the 25 level-0 windows are crops of the image: bit-exact, in any dtype
        n0 = 25 * case.batch
        ref_same = split_patches(image, prenormalized=True, out_dtype=out.dtype,
                                 backend="reference")
        assert torch.equal(out[:n0], ref_same[:n0]), msg + " (level-0 crops not bit-exact)"
        msg += ", level-0 crops bit-exact"
    if out.dtype == torch.float32:
        print(msg)
        assert err.max().item() <= SPLIT_F32_ATOL, msg
        return
    # one rounding of the float32 value: half an ulp, plus float32-level noise
    excess = err - 0.5 * ulp(ref32, out.dtype) - 1e-6
    ref_same = split_patches(image, prenormalized=case.prenormalized, out_dtype=out.dtype,
                             backend="reference").float()
    msg += (f", max excess over half an ulp {excess.max().item():.3e}, max |out - ref_"
            f"{str(out.dtype)[6:]}| = {(o - ref_same).abs().max().item():.3e}")
    print(msg)
    assert excess.max().item() <= 0, msg


def exact_blend(maps: torch.Tensor, case: MergeCase) -> torch.Tensor:
    """The blend in float64 from the same inputs: sum over windows of window * weight."""
    grid, padding, side = case.geometry
    stride, size = side - 2 * padding, merged_size(side, grid, padding)
    w = blend_weights(side, grid, padding, case.blend)  # float64, the reference's definition
    out = torch.zeros(case.batch, case.channels, size, size, dtype=torch.float64)
    for j in range(grid):
        for i in range(grid):
            e = (j * grid + i) * case.batch
            out[..., j * stride:j * stride + side, i * stride:i * stride + side] += (
                maps[e:e + case.batch].double() * (w[j][:, None] * w[i][None, :]))
    return out


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c.label)
def test_merge_kernel_replay_matches_reference(replay: Replay, case: MergeCase) -> None:
    out = replay.outputs[case.label]
    grid, padding, _ = case.geometry
    tokens = merge_input(case)
    ref = merge_patches(tokens, batch_size=case.batch, grid=grid, padding=padding,
                        blend=case.blend, channels_last=case.channels_last, backend="reference")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "unwritten (NaN-poisoned) outputs"
    assert out.is_contiguous(memory_format=torch.channels_last if case.channels_last
                             else torch.contiguous_format)
    o, r = out.double(), ref.double()
    msg = f"{case.label}: max |out - ref| = {(o - r).abs().max().item():.3e}"
    if case.blend <= 1 or grid == 1:
        print(msg + " (bit-exact required)")
        assert torch.equal(out, ref), msg
        return
    # Both sides evaluate a convex combination of <= 4 inputs in float32 (differently), then
    # round once to the output dtype. `noise` bounds the float32 evaluation error.
    maps = tokens_to_maps(tokens) if tokens.dim() == 3 else tokens
    exact = exact_blend(maps, case)
    noise = MERGE_F32_EPS_MULT * 2.0**-24 * maps.abs().max().item()
    half_ulp = 0 if out.dtype == torch.float32 else 0.5 * ulp(exact.float(), out.dtype).double()
    excess_out = ((o - exact).abs() - half_ulp - noise).max().item()
    excess_ref = ((o - r).abs() - 2 * half_ulp - 2 * noise).max().item()
    msg += (f", max |out - exact_f64| = {(o - exact).abs().max().item():.3e}; excess over "
            f"(one rounding + float32 noise {noise:.1e}): vs exact {excess_out:.2e}, vs ref "
            f"{excess_ref:.2e}")
    print(msg)
    assert excess_out <= 0 and excess_ref <= 0, msg


def test_replay_report(replay: Replay) -> None:
    """Every case was replayed (the emulation's own checks passed) and how long it took."""
    assert f"replayed {len(SPLIT_CASES) + len(MERGE_CASES)} cases" in replay.stdout
    print(f"host replay: {replay.seconds:.1f} s")
