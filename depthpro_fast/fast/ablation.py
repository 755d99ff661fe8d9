"""Measure what each fast-path step buys: ``python -m depthpro_fast.fast.ablation``.

For the "measure each step; keep what pays" items of issue 6. On one GPU, in one process, with
random weights (latency does not depend on weight values; accuracy is measured against the fp32
reference on the same weights and inputs), it times:

- the reference modules, eager (``reference``), in the run dtype;
- the fast path with its defaults (``fast``);
- the fast path with one option flipped at a time (``fast-<option>=<value>``);
- the FOV skip (``fast,need_fov=False``: what ``infer(..., f_px=...)`` runs).

Timing: CUDA events around ``model(x)`` (graph input copy and output clone included), warm-up
runs first (graph capture, cuDNN autotuning, Triton compilation), then ``--repeats`` timed runs
over ``--inputs`` rotating random inputs; median and the 10-90 % spread. Accuracy: canonical
inverse depth mean absolute relative error (MARE) and FOV error vs the fp32 reference (cuDNN TF32
off), from the first input. Prints a table; ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..accuracy import max_abs_error, mean_abs_rel_error

#: Variants: name -> fast options (None: the reference modules).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "reference": None,
    "fast": {},
    "fast-cuda_graphs=False": {"cuda_graphs": False},
    "fast-streams=False": {"streams": False},
    "fast-epilogues=torch": {"epilogues": "torch"},
    "fast-epilogues=compile": {"epilogues": "compile"},
    "fast-fuse_layer_norm=False": {"fuse_layer_norm": False},
    "fast-fold_convs=False": {"fold_convs": False},
    "fast-head_subpixel=False": {"head_subpixel": False},
    "fast-fold_deconv_chains=True": {"fold_deconv_chains": True},
    "fast-channels_last=False": {"channels_last": False},
    "fast-cudnn_benchmark=False": {"cudnn_benchmark": False},
}


def _time(fn: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor], warmup: int,
          repeats: int) -> list[float]:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def run(*, dtype: torch.dtype = torch.bfloat16, batch: int = 1, variants: list[str] | None = None,
        warmup: int = 3, repeats: int = 20, inputs: int = 3, config: Any = None,
        backend: str = "auto") -> list[dict[str, Any]]:
    import depthpro_fast

    if not torch.cuda.is_available():
        raise RuntimeError("the ablation needs a CUDA device")
    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS and n != "fast,need_fov=False"]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    torch.manual_seed(0)
    ref_model, _ = depthpro_fast.load(None, config=config, device="cuda", backend="reference")
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.rand(batch, 3, 1536, 1536, device="cuda", generator=g) * 2 - 1
          for _ in range(inputs)]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref_cid, ref_fov = ref_model(xs[0])
    torch.backends.cudnn.allow_tf32 = tf32
    base = copy.deepcopy(ref_model).to(dtype).set_backend(backend)
    del ref_model
    xs = [x.to(dtype) for x in xs]
    rows = []
    plan = [(n, VARIANTS.get(n, {}), n == "fast,need_fov=False") for n in names]
    if variants is None:
        plan.append(("fast,need_fov=False", {}, True))
    for name, options, skip_fov in plan:
        model = copy.deepcopy(base)
        if options is not None:
            model.prepare_fast(options)
        row: dict[str, Any] = {"variant": name}
        try:
            with torch.no_grad():
                def fn(x, model=model, skip_fov=skip_fov):
                    return model(x, need_fov=not skip_fov)

                cid, fov = fn(xs[0])
                times = _time(fn, xs, warmup, repeats)
            q = statistics.quantiles(times, n=10)
            row.update(ms=statistics.median(times), p10=q[0], p90=q[-1],
                       images_per_s=1000 * batch / statistics.median(times),
                       mare=mean_abs_rel_error(cid, ref_cid),
                       fov_err_deg=None if fov is None else max_abs_error(fov, ref_fov),
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            if model.fast_engine is not None:
                row["engine"] = model.fast_engine.status()
        except Exception as e:  # report and go on with the other variants
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ref_ms = next((r.get("ms") for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        if ref_ms and r.get("ms"):
            r["speedup_vs_reference"] = ref_ms / r["ms"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'variant':34s} {'ms':>8s} {'p10-p90':>15s} {'img/s':>7s} {'x ref':>6s} "
             f"{'MARE':>9s} {'FOV err':>8s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:34s} ERROR {r['error'][:90]}")
            continue
        fov = "-" if r["fov_err_deg"] is None else f"{r['fov_err_deg']:.4f}"
        lines.append(f"{r['variant']:34s} {r['ms']:8.2f} {r['p10']:7.2f}-{r['p90']:<7.2f} "
                     f"{r['images_per_s']:7.2f} {r.get('speedup_vs_reference', 0):6.2f} "
                     f"{r['mare']:9.2e} {fov:>8s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", nargs="*", help=f"subset of {list(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--config", default=None, help="preset name or JSON (default: official)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = run(dtype=dtype, batch=args.batch, variants=args.variants, warmup=args.warmup,
               repeats=args.repeats, config=args.config)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "dtype": args.dtype, "batch": args.batch}
    print(meta)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
