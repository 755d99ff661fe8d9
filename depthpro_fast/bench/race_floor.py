"""The GEMM floor of the CPU race: the GEMM rate this machine achieves at the model's own ViT
shapes, and the seconds per image that rate gives for the model's FLOPs.

A ViT block's four linears over the patch encoder's token rows (35 windows x 577 tokens; a
fifth of them by default, :data:`DEFAULT_ROWS`, which keeps the measurement to seconds at
full size): qkv (E -> 3E), proj (E -> E), fc1 (E -> mlp), fc2 (mlp -> E), each with its bias.
Two implementations per shape, the faster kept: ``F.linear`` (MKL's sgemm in fp32, oneDNN in
bf16) and oneDNN's ``mkldnn._linear_pointwise`` on a weight prepacked for it by
``mkldnn._reorder_linear_weight`` (what Inductor's freezing does). The block's rate is its
FLOPs over the sum of the best times; fp32, and bf16 where the CPU has bf16 arithmetic (without
it bf16 is emulated and is no floor of anything).

"floor seconds per image" = the model's FLOPs (``flops.count_flops``, convolutions and
attention included) / that rate: what the forward would take if every FLOP ran at the speed of
the ViT's GEMMs. No contestant can be expected below it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config import resolve_config

#: token rows per GEMM by default: 7 of the 35 windows of 577 tokens (a fifth)
DEFAULT_ROWS = 7 * 577


def vit_shapes(config: Any, rows: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, K, N) of a ViT block's linears for ``config``."""
    e = config.embed_dim
    hidden = int(e * config.mlp_ratio)
    return [("qkv", rows, e, 3 * e), ("proj", rows, e, e), ("fc1", rows, e, hidden),
            ("fc2", rows, hidden, e)]


def _time(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, first-touch of the output)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _impls(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
           ) -> dict[str, Callable[[], Any] | str]:
    """The implementations of one linear (a callable, or why it cannot run)."""
    out: dict[str, Callable[[], Any] | str] = {"F.linear": lambda: F.linear(x, w, b)}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        torch.ops.mkldnn._linear_pointwise(x[:2], packed, b, "none", [], "")
        out["onednn-prepacked"] = (
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
    except Exception as e:  # noqa: BLE001  (no oneDNN in this build, dtype not supported)
        out["onednn-prepacked"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
    return out


def measure_dtype(shapes: list[tuple[str, int, int, int]], dtype: torch.dtype,
                  runs: int = 3) -> dict[str, Any]:
    """Each shape's rate per implementation (GFLOP/s), the best, and the block's rate."""
    g = torch.Generator().manual_seed(0)
    per_shape = []
    flops_sum = best_s_sum = 0.0
    for name, m, k, n in shapes:
        x = torch.randn(m, k, generator=g).to(dtype)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        flops = 2.0 * m * k * n
        row: dict[str, Any] = {"name": name, "rows": m, "k": k, "n": n, "gflops_by_impl": {},
                               "errors": {}}
        best = None
        for impl, fn in _impls(x, w, b).items():
            if isinstance(fn, str):
                row["errors"][impl] = fn
                continue
            seconds = _time(fn, runs)
            row["gflops_by_impl"][impl] = flops / seconds / 1e9
            if best is None or seconds < best[1]:
                best = (impl, seconds)
        row["best"] = best[0]
        row["best_gflops"] = flops / best[1] / 1e9
        per_shape.append(row)
        flops_sum += flops
        best_s_sum += best[1]
        del x, w, b
    return {"shapes": per_shape, "block_gflops": flops_sum / best_s_sum / 1e9}


def measure(config: str, rows: int | None = None, runs: int = 3) -> dict[str, Any]:
    """The floor for ``config`` (a preset or JSON path): rates and floor seconds per image, in
    fp32 and (where the CPU has bf16 arithmetic) bf16; ``bf16_why_not`` otherwise."""
    from ..cpu import cpu_features
    from ..flops import count_flops

    cfg = resolve_config(config)
    rows = rows or DEFAULT_ROWS
    flops = count_flops(cfg).per_image
    shapes = vit_shapes(cfg, rows)
    out: dict[str, Any] = {"rows": rows, "flops_per_image": flops, "rates": {},
                           "floor_s": {}, "bf16_why_not": None, "threads": torch.get_num_threads()}
    dtypes = {"fp32": torch.float32}
    if cpu_features().bf16:
        dtypes["bf16"] = torch.bfloat16
    else:
        out["bf16_why_not"] = cpu_features().bf16_why_not
    for label, dtype in dtypes.items():
        rate = measure_dtype(shapes, dtype, runs)
        out["rates"][label] = rate
        out["floor_s"][label] = flops / (rate["block_gflops"] * 1e9)
    return out
