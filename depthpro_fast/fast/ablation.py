"""Measure what each fast-path step buys: ``python -m depthpro_fast.fast.ablation``.

To measure each step and keep what pays. On one GPU, in one process, with
random weights (latency does not depend on weight values; accuracy is measured against the fp32
reference on the same weights and inputs), it times:

- the reference modules, eager (``reference``), in the run dtype;
- the fast path with its defaults (``fast``);
- the fast path with one option flipped at a time (``fast-<option>=<value>``);
- the FOV skip (``fast,need_fov=False``: what ``infer(..., f_px=...)`` runs).

Timing: ``depthpro_fast.bench.timing.time_callable`` (CUDA events around ``model(x)``, each run
from an idle device; graph input copy and output clone included), warm-up runs first (graph
capture, cuDNN autotuning, Triton compilation), then ``--repeats`` timed runs over ``--inputs``
rotating random inputs; median and the 10-90 % spread. Accuracy: canonical inverse depth mean
absolute relative error (MARE) and FOV error vs the fp32 reference (cuDNN TF32 off), from the
first input. Prints a table; ``--json PATH`` writes every number with the device, versions and
commit, rewritten after every variant (a run cut short keeps what it measured).
``--no-compile`` leaves out the variants that run ``torch.compile`` (minutes of compilation).
A CPU run (``--allow-cpu``, e.g. ``--config tiny``) only checks that the harness works.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..accuracy import max_abs_error, mean_abs_rel_error
from ..bench.timing import random_inputs, synchronize, time_callable

SCHEMA = "depthpro_fast.ablation/1"

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
    "fast-decoder_epilogues=True": {"decoder_epilogues": True},
    "fast-head_tail=True": {"head_tail": True},
    "fast-decoder_epilogues+head_tail": {"decoder_epilogues": True, "head_tail": True},
    "fast-channels_last=False": {"channels_last": False},
    "fast-cudnn_benchmark=False": {"cudnn_benchmark": False},
    "fast-attention_choice=backend": {"attention_choice": "backend"},
    # the ViT epilogues inside the GEMMs (each step, then together)
    "fast-fold_layerscale=True": {"fold_layerscale": True},
    "fast-fold_layerscale+residual_in_gemm": {"fold_layerscale": True, "residual_in_gemm": True},
    "fast-fc1_gelu=tanh": {"fc1_gelu": "tanh"},
    "fast-residual_in_gemm+fc1_gelu=tanh": {"fold_layerscale": True, "residual_in_gemm": True,
                                            "fc1_gelu": "tanh"},
    "fast-residual_in_gemm+residual_fp32": {"fold_layerscale": True, "residual_in_gemm": True,
                                            "residual_fp32": True},
    # the three ViTs in lock-step instead of the side stream
    "fast-vit_lockstep=True": {"vit_lockstep": True},
    # the fp8 mode (bf16 runs only): per-token scales, and one scale per tensor to measure them
    "fast-fp8=True": {"fp8": True},
    "fast-fp8=True,fp8_scaling=tensor": {"fp8": True, "fp8_scaling": "tensor"},
}
#: Variants that need a bf16 model (left out of fp16 / fp32 runs).
BF16_ONLY = ("fast-fp8=True", "fast-fp8=True,fp8_scaling=tensor")
#: The variants that compile (torch.compile): left out by ``--no-compile``.
COMPILING = ("fast-epilogues=compile",)
FOV_SKIP = "fast,need_fov=False"


def run(*, dtype: torch.dtype = torch.bfloat16, batch: int = 1, variants: list[str] | None = None,
        warmup: int = 3, repeats: int = 20, inputs: int = 3, config: Any = None,
        backend: str = "auto", device: torch.device | str | None = None,
        allow_cpu: bool = False, compile: bool = True,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Time the variants (all by default, plus the FOV skip); one dict per variant.

    ``on_row(rows)`` is called after every variant with the rows so far (e.g. to save them).
    A variant that fails gets an ``error`` and the others still run.
    """
    import depthpro_fast

    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not allow_cpu:
        raise RuntimeError("the ablation needs a CUDA device (allow_cpu=True / --allow-cpu "
                           "only checks the harness)")
    if repeats < 1 or warmup < 0 or inputs < 1 or batch < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, inputs >= 1, batch >= 1; got "
                         f"{repeats}, {warmup}, {inputs}, {batch}")
    names = variants or [n for n in VARIANTS if (compile or n not in COMPILING)
                         and (dtype == torch.bfloat16 or n not in BF16_ONLY)]
    unknown = [n for n in names if n not in VARIANTS and n != FOV_SKIP]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {[*VARIANTS, FOV_SKIP]}")
    torch.manual_seed(0)
    ref_model, _ = depthpro_fast.load(None, config=config, device=dev, backend="reference")
    xs = random_inputs((batch, 3, 1536, 1536), count=inputs, device=dev, dtype=torch.float32,
                       seed=1)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref_cid, ref_fov = ref_model(xs[0])
    torch.backends.cudnn.allow_tf32 = tf32
    base = copy.deepcopy(ref_model).to(dtype).set_backend(backend)
    del ref_model
    xs = [x.to(dtype) for x in xs]
    rows: list[dict[str, Any]] = []
    plan = [(n, VARIANTS.get(n, {}), n == FOV_SKIP) for n in names]
    if variants is None:
        plan.append((FOV_SKIP, {}, True))
    cuda = dev.type == "cuda"
    for name, options, skip_fov in plan:
        model = copy.deepcopy(base)
        if options is not None:
            model.prepare_fast(options)
        row: dict[str, Any] = {"variant": name}
        try:
            with torch.no_grad():
                def fn(x, model=model, skip_fov=skip_fov):
                    return model(x, need_fov=not skip_fov)

                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                cid, fov = fn(xs[0])  # (first call: capture, autotuning, compilation)
                synchronize(dev)
                stats, _ = time_callable(fn, xs, warmup=warmup, runs=repeats, device=dev)
            times = stats.times_ms
            q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
            row.update(ms=stats.median, p10=q[0], p90=q[-1], times_ms=times,
                       images_per_s=1000 * batch / stats.median,
                       mare=mean_abs_rel_error(cid, ref_cid),
                       fov_err_deg=None if fov is None else max_abs_error(fov, ref_fov),
                       peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None)
            if model.fast_engine is not None:
                row["engine"] = model.fast_engine.status()
        except Exception as e:  # report and go on with the other variants
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        del model
        if cuda:
            torch.cuda.empty_cache()
        _relative(rows)
        if on_row is not None:
            on_row(rows)
    return rows


def _relative(rows: list[dict[str, Any]]) -> None:
    ref_ms = next((r.get("ms") for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        if ref_ms and r.get("ms"):
            r["speedup_vs_reference"] = ref_ms / r["ms"]


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
    p.add_argument("--variants", nargs="*", help=f"subset of {[*VARIANTS, FOV_SKIP]}")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inputs", type=int, default=3, help="rotating random inputs")
    p.add_argument("--config", default=None, help="preset name or JSON (default: official)")
    p.add_argument("--device", default=None, help="default: cuda")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run on a CPU too (a check of the harness, not a measurement)")
    p.add_argument("--no-compile", action="store_true",
                   help=f"leave out the variants that run torch.compile: {list(COMPILING)}")
    p.add_argument("--json", default=None,
                   help="write the rows here, with device, versions and commit (after every "
                        "variant)")
    args = p.parse_args(argv)
    from ..bench.environment import environment
    from ..bench.results import json_safe, write_json

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    meta = {"device": env["device"], "torch": env["torch"], "dtype": args.dtype,
            "batch": args.batch, "config": args.config or "official"}

    def save(rows: list[dict[str, Any]], partial: bool = True) -> None:
        if args.json:
            write_json(args.json, json_safe({
                "schema": SCHEMA, "environment": env, "meta": meta, "partial": partial,
                "settings": {"warmup": args.warmup, "repeats": args.repeats,
                             "inputs": args.inputs, "backend": "auto"},
                "rows": rows, "command": " ".join(sys.argv)}))

    try:
        rows = run(dtype=dtype, batch=args.batch, variants=args.variants or None,
                   warmup=args.warmup, repeats=args.repeats, inputs=args.inputs,
                   config=args.config, device=device, allow_cpu=args.allow_cpu,
                   compile=not args.no_compile, on_row=save)
    except (RuntimeError, ValueError) as e:
        print(f"ablation: {e}", file=sys.stderr)
        return 2
    save(rows, partial=False)
    print(meta)
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
