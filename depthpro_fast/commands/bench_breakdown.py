"""``depthpro-fast bench --breakdown``: per-category time of one forward of each chosen row,
against a floor measured in the same process (``depthpro_fast/bench/breakdown.py``).

The rows are the bench's own (``bench/variants.py``: ``--dtype``, ``--backends``,
``--fast-options``), eager paths only (reference, fast, fast engine), on a CPU; each gets
``--warmup`` forwards (default 1), ``--runs`` unprofiled timed forwards (default 1; none on
models above 1 TFLOP per image, where a forward takes minutes: the median tells what the
profiler added) and one profiled forward. ``--breakdown engine`` (or ``reference``, ``fast``)
keeps the rows of those paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: the paths a breakdown can profile (eager forwards of our model)
PATHS = ("reference", "fast", "engine")


def run(args: argparse.Namespace, *, dtypes_arg: dict[str, str],
        fast_backends: tuple[str, ...], big_flops: float) -> int:
    """The ``--breakdown`` run of ``depthpro-fast bench`` (``args`` as parsed there)."""
    import torch

    from ..api import resolve_device, resolve_dtype
    from ..bench import machine_load
    from ..bench.breakdown import breakdown, format_breakdown, profile_forward
    from ..bench.breakdown_floor import measure_floor
    from ..bench.environment import default_results_name, environment
    from ..bench.results import json_safe, write_json
    from ..bench.runner import Runner
    from ..bench.timing import dtype_name
    from ..bench.variants import SkipRow, default_variants
    from ..config import PRESETS, resolve_config
    from ..flops import count_flops

    t_start = time.perf_counter()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                   flush=True))
    device = resolve_device(args.device)
    if device.type != "cpu":
        raise ValueError(f"--breakdown profiles the CPU path (the profiler's CPU times of "
                         f"each op); got --device {device}: use --device cpu, or --stages for "
                         "per-stage times on a GPU")
    config_arg = args.config or "tiny"
    cfg = resolve_config(config_arg)
    config_name = config_arg if config_arg in PRESETS else os.path.basename(config_arg)
    dtypes = None
    if args.dtype:
        if any(dtypes_arg[d] == "fp8" for d in args.dtype):
            raise ValueError("--breakdown: fp8 on a CPU is an emulation, not a path to "
                             "profile; use --dtype fp32 or bf16")
        dtypes = list(dict.fromkeys(resolve_dtype(dtypes_arg[d]) for d in args.dtype))
    paths = set(args.breakdown or PATHS)
    variants = [v for v in default_variants(device, dtypes=dtypes,
                                            fast_backends=fast_backends, compile=False,
                                            cuda_graph=False, hf=False, fp8=False,
                                            onnxruntime=False, openvino=False,
                                            fast_options=args.fast_options)
                if v.path in paths]
    flop_by_batch = {b: count_flops(cfg, batch=b) for b in args.batch}
    big = flop_by_batch[args.batch[0]].per_image > big_flops
    runs = args.runs if args.runs is not None else (0 if big else 1)
    warmup = max(args.warmup if args.warmup is not None else 1, 1)
    runner = Runner(cfg, device, batches=args.batch, runs=1, warmup=warmup, seed=args.seed,
                    log=log, skip_same_as_reference=args.backends is None,
                    allow_interpreter=args.backends is not None,
                    cpu_opt_in=[dtype_name(dt) for dt in dtypes or []], accuracy=False)
    admitted, results = [], []
    for v in variants:
        try:
            runner.admit(v)
            admitted.append(v)
        except SkipRow as e:
            for b in args.batch:
                results.append({"row": _row_info(v, b), "status": "skipped", "reason": str(e)})
    floor_dtypes = {v.dtype for v in admitted}
    if any(v.fast_options.get("gemm_dtype") == "bf16" for v in admitted):
        floor_dtypes.add(torch.bfloat16)
    log(f"measuring the floor (GEMM at ViT-L's fc1 shape, 3x3 conv, copy) in "
        f"{', '.join(sorted(dtype_name(d) for d in floor_dtypes)) or 'fp32'} ...")
    floor = measure_floor(sorted(floor_dtypes, key=str))
    env = environment(device)
    reader = machine_load.ProcReader()
    for i, (v, b) in enumerate(((v, b) for v in admitted for b in args.batch), 1):
        log(f"[{i}/{len(admitted) * len(args.batch)}] {v.name} {v.dtype_label} batch {b}: "
            f"{warmup} warm-up, {runs} timed, 1 profiled forward")
        cleanup = None
        try:
            fn, module, cleanup = runner.row_callable(v, b)
            # how much of the CPU this process got meanwhile (a shared machine distorts times)
            with machine_load.Span(reader, torch.get_num_threads()) as span:
                profiled = profile_forward(fn, module, runner.inputs(v.dtype, b),
                                           warmup=warmup, unprofiled=runs)
            elem = torch.empty((), dtype=v.dtype).element_size()
            data = breakdown(profiled, floor, row=_row_info(v, b),
                             expected_flops=flop_by_batch[b].by_stage(), list_elem=elem)
            if getattr(module, "fast_engine", None) is not None:
                data["engine"] = json_safe(module.fast_engine.status())
            data["status"] = "ok"
            data["machine_load"] = span.load.to_dict() if span.load else None
            data["machine"] = _machine_words(span.load)
            results.append(data)
        except Exception as e:  # noqa: BLE001  (a failing row is reported; the others run)
            results.append({"row": _row_info(v, b), "status": "failed",
                            "reason": f"{type(e).__name__}: {e}".strip()})
        finally:
            if cleanup is not None:
                cleanup()
    runner.free()

    print(f"depthpro-fast bench --breakdown: config {config_name} "
          f"({flop_by_batch[args.batch[0]].per_image / 1e9:,.1f} GFLOP per image), random "
          "weights")
    print(f"device: CPU: {env['cpu']} ({env['cpu_threads']} threads), torch {env['torch']}, "
          f"commit {(env['commit'] or 'unknown')[:12]}{' (modified)' if env.get('dirty') else ''}")
    print(_floor_line(floor))
    for data in results:
        print()
        if data["status"] != "ok":
            r = data["row"]
            print(f"{r['name']} {r['dtype']} batch {r['batch']}: {data['status']}: "
                  f"{data['reason']}")
            continue
        print(format_breakdown(data))
        print(data["machine"])
    print()
    print("Times: the profiler's CPU time of each op called from Python (what it calls "
          "included), on the forward's thread; floor: FLOPs at the rate measured above for "
          "the dtype they ran in (GEMM / conv categories), else estimated bytes at the copy "
          "bandwidth; gap = time - floor, largest first.")
    json_path = args.json
    if json_path:
        if os.path.isdir(json_path) or json_path.endswith(os.sep):
            json_path = os.path.join(json_path, default_results_name(env).replace(
                ".json", "-breakdown.json"))
        write_json(json_path, json_safe({
            "schema": "depthpro_fast.bench.breakdown/1", "environment": env,
            "config": {"name": config_name, **cfg.to_dict()},
            "settings": {"batches": args.batch, "warmup": warmup, "runs": runs,
                         "seed": args.seed, "profiler": "torch.profiler, CPU activities, "
                         "record_shapes", "wall_s": round(time.perf_counter() - t_start, 1)},
            "floor": floor.to_dict(), "rows": results, "notes": list(args.note),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}))
        print(f"\nwrote {json_path}")
    print(f"\n(bench --breakdown took {time.perf_counter() - t_start:.0f} s)")
    return 0 if any(d["status"] == "ok" for d in results) else 1


def _row_info(v, batch: int) -> dict:
    info = {"name": v.name, "path": v.path, "backend": v.backend, "dtype": v.dtype_label,
            "batch": batch}
    if v.options:
        info["fast_options"] = v.fast_options
    return info


def _machine_words(load) -> str:
    """The line under a row's breakdown: the machine's state during its forwards."""
    from ..bench import machine_load

    got = (f", CPU got {machine_load.format_pct(load.cpu_got)}"
           if load is not None and load.cpu_got is not None else "")
    if load is not None and load.state == "shared":
        return (f"WARNING: the machine was shared during this row ({'; '.join(load.reasons)})"
                f"{got}: its times are not comparable with an idle machine's")
    return f"machine during this row: {machine_load.summary(load)}{got}"


def _floor_line(floor) -> str:
    words = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16"}
    gemm = ", ".join(f"{words.get(k, k)} {v:.0f}" for k, v in floor.gemm_gflops.items())
    conv = ", ".join(f"{words.get(k, k)} {v:.0f}" for k, v in floor.conv_gflops.items())
    shape = "x".join(str(n) for n in floor.details.get("gemm_shape", []))
    bf16 = floor.details.get("gemm_bf16")
    best = f" (bf16: {bf16['best']})" if bf16 else ""
    return (f"floor, measured now (best of {floor.details.get('runs')}): GEMM ({shape}) {gemm} "
            f"GFLOP/s{best}; 3x3 conv 256->256 channels_last "
            f"{conv} GFLOP/s; copy {floor.bandwidth_gbs:.1f} GB/s")
