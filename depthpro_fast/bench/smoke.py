"""A quick correctness check on the device: ``python -m depthpro_fast.bench.smoke``.

- ``--ops BACKEND...``: every op (attention, split_patches, merge_patches, layer_norm,
  add_layer_norm, bias_gelu, residual_layerscale) through ``BACKEND`` (triton, cuda) against its
  reference, on one random input of the size the model gives it, in each dtype: the largest
  error relative to the reference's largest value must be within the dtype's tolerance, and
  the first call's time (compilation, autotuning) is recorded. An op the backend does not have
  is skipped; a backend that cannot run here is skipped with the reason.
- ``--engine``: the whole fast path (``prepare_fast()``, backend ``auto``, and ``triton`` too
  when the CUDA extension is there) against the fp32 reference on the same plausible random
  weights and one photo-like input: MARE of the canonical inverse depth, its largest error, the
  FOV error, within ``depthpro_fast.accuracy``'s budget.

Without ``--ops`` / ``--engine`` it runs both. Sizes: ``official`` (the default on a GPU) or
``tiny`` (the default on a CPU: small ops, the tiny config). Dtypes: bf16 and fp16 on a GPU;
fp32 and fp16 on a CPU (Triton's interpreter has no bf16). fp32 Triton attention is left out on
a GPU unless ``--dtype fp32`` is given: its autotune sweep costs compile time, and fp32 decides
nothing there.
``bench/gpu_check.sh`` runs each backend's ops and the engine in processes of their own (see
``journal.py``), so a GPU fault costs only its own cases.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import backends, ops
from ..accuracy import FOV_BUDGET_DEG, MARE_BUDGET, max_abs_error, mean_abs_rel_error
from .journal import Case, CaseFailed, Journal, SkipCase, run_cases, show_results
from .results import json_safe
from .timing import dtype_name, random_inputs, synchronize

SCHEMA = "depthpro_fast.smoke/1"
OPS = ("attention", "split_patches", "merge_patches", "layer_norm", "add_layer_norm",
       "bias_gelu", "residual_layerscale", "grouped_add_layer_norm")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Largest error over the reference's largest magnitude: about 4 roundings of the dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
#: (rows of tokens, width, MLP width, attention (B, H, N, D), merge channels)
SIZES = {"official": (35 * 577, 1024, 4096, (35, 16, 577, 64), 1024),
         "tiny": (577, 128, 512, (2, 2, 65, 64), 8)}


def _op_call(op: str, size: str, dtype: torch.dtype,
             device: torch.device) -> tuple[Callable[[str], Any], str]:
    """(a function calling ``op`` with a given backend on fixed random inputs, a shape label)."""
    rows, width, mlp, (b, h, n, d), channels = SIZES[size]

    def rand(*shape: int, seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return random_inputs(shape, count=1, device=device, dtype=dtype, seed=seed, low=low,
                             high=high)[0]

    if op == "attention":
        qkv = rand(b, n, 3, h, d, seed=1)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return (lambda be: ops.attention(q, k, v, scale=d ** -0.5, backend=be),
                f"{b}x{h}x{n}x{d}")
    if op == "split_patches":
        image = rand(1, 3, 1536, 1536, seed=2)
        return (lambda be: ops.split_patches(image, prenormalized=True, out_dtype=dtype,
                                             backend=be), "1x3x1536x1536")
    if op == "merge_patches":
        tokens = rand(25, 577, channels, seed=3)
        return (lambda be: ops.merge_patches(tokens, batch_size=1, grid=5, padding=3,
                                             channels_last=True, backend=be),
                f"25x577x{channels} channels_last")
    x = rand(rows, mlp if op == "bias_gelu" else width, seed=4, low=-3.0, high=3.0)
    c = x.shape[-1]
    delta, bias = rand(rows, c, seed=5, low=-3.0, high=3.0), rand(c, seed=6)
    weight, gamma = rand(c, seed=7, low=0.5, high=1.5), rand(c, seed=8, low=0.05, high=0.2)
    # the lock-stepped ViTs' pass: three row groups (as the patch, image and FOV encoders)
    ends = torch.tensor([rows - 2 * (rows // 37), rows - rows // 37, rows], dtype=torch.int32,
                        device=device)
    stacked = [torch.stack([v, v.flip(0), v.roll(1)]) for v in (weight, bias, gamma)]
    calls = {
        "grouped_add_layer_norm": lambda be: ops.grouped_add_layer_norm(
            x, delta, stacked[0], stacked[1], 1e-6, ends, delta_bias=stacked[1],
            gamma=stacked[2], out_width=c + 8, backend=be),
        "layer_norm": lambda be: ops.layer_norm(x, weight, bias, 1e-6, backend=be),
        "add_layer_norm": lambda be: ops.add_layer_norm(x, delta, weight, bias, 1e-6,
                                                        delta_bias=bias, gamma=gamma,
                                                        backend=be),
        "bias_gelu": lambda be: ops.bias_gelu(x, bias, backend=be),
        "residual_layerscale": lambda be: ops.residual_layerscale(x, delta, bias, gamma,
                                                                  backend=be),
    }
    return calls[op], f"{rows}x{c}"


def _op_case(op: str, backend: str, size: str, dtype: torch.dtype,
             device: torch.device) -> dict[str, Any]:
    if backend not in backends.registered_ops().get(op, ()):
        raise SkipCase(f"{op} has no {backend} implementation (auto uses another backend)")
    ok, why = backends.backend_status(backend, device)
    if not ok:
        raise SkipCase(f"backend {backend} unavailable: {why}")
    if device.type == "cpu" and backend == "triton" and op == "split_patches":
        raise SkipCase("35 x 3 x 384^2 outputs are too large for the Triton interpreter")
    call, shape = _op_call(op, size, dtype, device)
    synchronize(device)
    t0 = time.perf_counter()
    out = call(backend)
    synchronize(device)
    first_s = time.perf_counter() - t0
    ref = call("reference")
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs, strict=True):  # callers rely on the layout, e.g. (B, N, H, D)
        if o.shape != r.shape or o.stride() != r.stride() or o.dtype != r.dtype:
            raise CaseFailed(f"wrong layout: {tuple(o.shape)} {o.stride()} {o.dtype}, the "
                             f"reference gives {tuple(r.shape)} {r.stride()} {r.dtype}",
                             {"shape": shape})
    err = max(max_abs_error(o.float(), r.float()) for o, r in zip(outs, refs, strict=True))
    scale = max(float(r.float().abs().max()) for r in refs) or 1.0
    tol = 0.0 if op == "merge_patches" else TOLERANCE[dtype]  # a crop is exact
    row = {"shape": shape, "max_abs_err": err, "max_rel_err": err / scale, "tolerance": tol,
           "first_call_s": round(first_s, 3)}
    if not err / scale <= tol:  # (NaN fails too)
        raise CaseFailed(f"wrong output: max error {err:.2e} is {err / scale:.1e} of the "
                         f"reference's largest value, over the tolerance {tol:g}", row)
    return row


_REFERENCE: dict[tuple[str, str], tuple[Any, ...]] = {}  # (config, device) -> model, x, cid, fov


def _reference(config: str, device: torch.device) -> tuple[Any, ...]:
    """The fp32 reference model (plausible random weights), a photo-like input, its outputs."""
    key = (config, str(device))
    if key not in _REFERENCE:
        from ..api import load

        torch.manual_seed(0)
        model, _ = load(None, config=config, device=device, backend="reference")
        g = torch.Generator().manual_seed(1)
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 24, generator=g),
                                                 size=(1536, 1536), mode="bilinear")
        x = ((smooth + 0.05 * torch.randn(1, 3, 1536, 1536, generator=g)).clamp(0, 1) * 2
             - 1).to(device)
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
        try:
            with torch.no_grad():
                cid, fov = model(x)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        _REFERENCE[key] = (model, x, cid, fov)
    return _REFERENCE[key]


def _engine_case(backend: str, config: str, dtype: torch.dtype,
                 device: torch.device) -> dict[str, Any]:
    model, x, cid, fov = _reference(config, device)
    fast = copy.deepcopy(model).to(dtype).set_backend(backend).prepare_fast(True)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out_cid, out_fov = fast(x.to(dtype))
    synchronize(device)
    row = {"shape": f"config {config}, batch 1", "first_call_s": round(time.perf_counter() - t0, 3),
           "mare": mean_abs_rel_error(out_cid, cid), "max_abs_err": max_abs_error(out_cid, cid),
           "fov_err_deg": max_abs_error(out_fov, fov), "mare_budget": MARE_BUDGET.get(dtype),
           "fov_budget_deg": FOV_BUDGET_DEG, "engine": json_safe(fast.fast_engine.status())}
    del fast
    budget = MARE_BUDGET.get(dtype)
    if budget is not None and not row["mare"] <= budget:
        raise CaseFailed(f"over budget: MARE {row['mare']:.2e} > {budget:g}", row)
    if not row["fov_err_deg"] <= FOV_BUDGET_DEG:
        raise CaseFailed(f"over budget: FOV error {row['fov_err_deg']:.3f} deg > "
                         f"{FOV_BUDGET_DEG:g}", row)
    return row


def build_cases(op_backends: Sequence[str], engine: bool, size: str,
                dtypes: Sequence[torch.dtype], device: torch.device,
                config: str | None = None) -> list[Case]:
    """The cases asked for, nothing built yet; ``config``: the engine's (default: ``size``)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")

    def gen() -> Iterator[Case]:
        for backend in op_backends:
            for op in OPS:
                for dt in dtypes:
                    info = {"group": f"ops {backend}", "case": op, "dtype": dtype_name(dt)}
                    yield Case(f"ops/{backend}/{op}/{dtype_name(dt)}", info,
                               lambda o=op, b=backend, d=dt: _op_case(o, b, size, d, device))
        if engine:
            engine_backends = ["auto"]
            if device.type == "cuda" and backends.backend_status("cuda", device)[0]:
                engine_backends.append("triton")  # auto runs the CUDA kernels: Triton too
            for backend in engine_backends:
                for dt in dtypes:
                    info = {"group": "engine", "case": f"fast engine {backend}",
                            "dtype": dtype_name(dt)}
                    yield Case(f"engine/{backend}/{dtype_name(dt)}", info,
                               lambda b=backend, d=dt: _engine_case(b, config or size, d,
                                                                    device))

    return list(gen())


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("group", "case", "dtype", "status", "error", "first call", "note")
    lines = []
    for r in rows:
        if r.get("mare") is not None:
            err = f"MARE {r['mare']:.1e}, FOV {r['fov_err_deg']:.3f} deg"
        elif r.get("max_rel_err") is not None:
            err = f"{r['max_rel_err']:.1e} of max (tol {r['tolerance']:g})"
        else:
            err = "-"
        first = "-" if r.get("first_call_s") is None else f"{r['first_call_s']:.2f} s"
        note = (r.get("reason") or ("the process was stopped in this case (time limit, hang "
                                    "or crash)" if r["status"] == "running" else ""))
        note = note.replace("\n", " ")[:100]
        if not note and r.get("engine"):
            graphs = (r["engine"].get("graphs") or {})
            note = f"graphs: {graphs.get('captures', '?')} captured"
            if graphs.get("failures"):
                note += f", failures: {graphs['failures']}"
        lines.append((r["group"], r["case"], r["dtype"], r["status"], err, first, note))
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 (every case passed or was skipped), 1 (a case failed), 3 / 130 (stopped)."""
    parser = argparse.ArgumentParser(prog="python -m depthpro_fast.bench.smoke",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=("triton", "cuda"), default=None,
                        metavar="BACKEND", help="check every op through these backends")
    parser.add_argument("--engine", action="store_true", help="check the whole fast path")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="op sizes (default: official on a GPU, tiny on a CPU)")
    parser.add_argument("--config", default=None,
                        help="the engine's model: preset or JSON file of knobs (default: the "
                             "size's preset)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="results file, rewritten after every case (other rows kept)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already finished in --json (after a crash)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S")
    parser.add_argument("--show", default=None, metavar="PATH",
                        help="only print the table of a results file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.show:
        return show_results(args.show, SCHEMA, "smoke-test", format_table)
    from ..api import resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    size = args.size or ("official" if gpu else "tiny")
    dtypes = tuple(_DTYPES[d] for d in dict.fromkeys(args.dtype or (
        ["bf16", "fp16"] if gpu else ["fp32", "fp16"])))
    op_backends = args.ops if args.ops is not None else ([] if args.engine else ["triton",
                                                                                 "cuda"])
    engine = args.engine or args.ops is None
    cases = build_cases(op_backends, engine, size, dtypes, device, args.config)

    def header() -> dict[str, Any]:
        from .environment import environment

        return {"environment": environment(device),
                "settings": {"size": size, "config": args.config or size,
                             "dtypes": [dtype_name(d) for d in dtypes]}}

    journal = Journal(args.json, schema=SCHEMA, header=header)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                   flush=True))
    rc = run_cases(cases, journal, device=device, resume=args.resume,
                   time_limit_s=args.time_limit, log=log)
    mine = [journal.get(c.key) for c in cases if journal.get(c.key) is not None]
    print(f"smoke test on {device}, size {size}:")
    print(format_table(mine))
    if rc == 0 and any(r["status"] == "failed" for r in mine):
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
