"""``depthpro-fast bench``: reference vs fast paths, side by side, in one run (random weights).

Latency does not depend on weight values, so the model is built with random weights
(``load(None)``); nothing is downloaded. On a GPU each row is timed with CUDA events (5 warm-up
and 20 timed runs by default, median and min-max), next to the peak bf16 matmul rate measured in
the same run, which gives the "% floor" column: the FLOP floor (19.25 TFLOP per image for the
official model) at that rate over the measured time.

On a CPU-only machine the default is bounded: the tiny config (the fixtures' model, same structure,
~16 s in all on 2 cores), 1 warm-up + 3 runs. ``--config official`` on a CPU times the reference
and the fast engine in fp32 and the fast engine in bf16 (skipped, saying why, where the CPU has
no bf16 arithmetic), one warm-up (which gives the accuracy columns) and two timed runs per row
(their min-max is the spread), with the peak resident memory; the run prints its expected
length first. GPU numbers need a GPU.

Timings on a shared machine are not comparable (on a busy 2-core machine the same forward took
1.5-7x longer), so the run samples the machine (``depthpro_fast/bench/machine_load.py``): one
second before it starts (a warning when others are busy), and around each row's timed runs:
the "CPU got" column (this process's CPU time over the wall time x its threads), other
processes' CPU use and steal; a warning under the table when the machine was shared, and the
numbers in the JSON's ``machine_load`` (per row and for the run).

The fp32 reference rows (the accuracy reference) run with TF32 off in cuBLAS and cuDNN (torch's
cuDNN default is TF32); the table's note and the JSON's ``tf32`` field say so. The "1st call
c/w" column is the time to first depth map of a fresh model, cold (a new process) and warm (a
second fresh model in it): ``depthpro_fast/bench/first_call.py`` says exactly what is timed.

``--breakdown`` profiles one CPU forward per row instead and splits its time by category and
stage against a floor measured in the same run (``commands/bench_breakdown.py``,
``bench/breakdown.py``); ``--fast-options`` runs the fast engine rows once per set of
``FastOptions`` fields (e.g. ``gemm_dtype="bf16"``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..install_hints import EXPORT_HINT, OPENVINO_HINT

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "half": "float16", "fp8": "fp8",
           "bf16-mixed": "bf16-mixed"}
_FAST_BACKENDS = ("auto", "triton", "cuda")
# On a CPU, configs above this many FLOPs per image get 2 timed runs by default (not 3).
CPU_BIG_MODEL_FLOPS = 1e12


def default_runs_warmup(gpu: bool, big: bool) -> tuple[int, int]:
    """(timed runs, warm-up runs) per row when ``--runs`` / ``--warmup`` are not given.

    A GPU: 20 and 5. A CPU: 3 and 1; a model above 1 TFLOP per image (the official one, minutes
    per forward): 2 and 1, the warm-up being its first call (which also gives the accuracy
    columns). Two timed runs, not one, so that the min-max column shows how much a timing
    moved (one run on a machine others share can be off by several times, unseen).
    """
    if gpu:
        return 20, 5
    return (2 if big else 3), 1


def _int_at_least(minimum: int):
    """An argparse ``type`` for integers >= ``minimum``, with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _fast_options(text: str) -> dict:
    """An argparse ``type``: a JSON object of ``FastOptions`` fields."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object of FastOptions fields such "
                                         f"as '{{\"gemm_dtype\": \"bf16\"}}', got {text!r} "
                                         f"({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of FastOptions fields such as "
                                         f"'{{\"gemm_dtype\": \"bf16\"}}', got {text!r}")
    return value


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="preset (official, tiny) or JSON file of knobs (default: official "
                             "on a GPU, tiny on a CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--batch", type=_positive_int, nargs="+", default=[1], metavar="N",
                        help="batch size(s) (default: 1)")
    parser.add_argument("--runs", type=_positive_int, default=None,
                        help="timed runs per row (default: 20 on a GPU; on a CPU 3, or 2 for "
                             "models above 1 TFLOP per image such as the official one: their "
                             "min-max is the spread)")
    parser.add_argument("--warmup", type=_non_negative_int, default=None,
                        help="untimed warm-up runs per row (default: 5 on a GPU, 1 on a CPU; "
                             "the first call counts as one)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=None,
                        help="time every row in these dtypes (default: GPU reference in fp32, "
                             "bf16 and fp16, the other rows in bf16, and the fast engine in fp8 "
                             "(e4m3 ViT GEMMs; skipped below compute capability 8.9); CPU fp32, "
                             "the fast engine in bf16 and bf16-mixed; fp8 / bf16-mixed: the fast "
                             "engine's rows in that mode only)")
    parser.add_argument("--backends", nargs="+", choices=_FAST_BACKENDS, default=None,
                        help="fast-path backends to time (default: auto triton cuda; on a CPU "
                             "the Triton interpreter is timed only when named here)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of the reference path (default: on a GPU; "
                             "on a CPU the row is listed but timed only with --compile)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="time a CUDA graph of the auto fast path (GPU; default: on)")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                        help="time transformers' DepthProForDepthEstimation when installed, "
                             "official config (default: on a GPU; on a CPU only with --hf)")
    parser.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=None,
                        help=f"time our ONNX export in ONNX Runtime ({EXPORT_HINT}; on a GPU "
                             "its CUDA / TensorRT providers, fp16; default: on a GPU; on a CPU "
                             "only with --onnxruntime)")
    parser.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=None,
                        help=f"time our OpenVINO export on OpenVINO's CPU plugin, f32 and bf16 "
                             f"({OPENVINO_HINT}; listed on a CPU, timed only with --openvino; "
                             "skipped on a GPU machine)")
    parser.add_argument("--first-call", choices=("default", "engine", "all", "none"),
                        default="default",
                        help="time to first depth map (cold: a fresh model in a new process; "
                             "warm: a second fresh model there) of: default, one row (the "
                             "fast engine + CUDA graph on a GPU, the fast engine on a CPU); "
                             "engine, every fast engine row; all, every reference / fast / "
                             "engine row; none")
    parser.add_argument("--first-call-empty-caches", action="store_true",
                        help="the cold first call with empty Triton and device caches (a first "
                             "run on a new machine: every kernel compiled and autotuned); "
                             "default: the disk caches as found")
    parser.add_argument("--engine-first", action="store_true",
                        help="time the fast engine's rows before the others (a run cut short "
                             "by a time limit keeps them)")
    parser.add_argument("--stages", action="store_true",
                        help="add the per-stage breakdown of the eager rows")
    parser.add_argument("--breakdown", nargs="*", choices=("reference", "fast", "engine"),
                        default=None, metavar="PATH",
                        help="instead of the table: where one forward's time goes (CPU), per "
                             "category (ViT GEMMs, attention, LayerNorm/GELU passes, convs, "
                             "casts, copies, ...) and stage, against a floor measured now "
                             "(GEMM / conv rate, copy bandwidth), sorted by the gap; one "
                             "profiled forward per row after --warmup; optionally only the "
                             "rows of these paths (reference fast engine)")
    parser.add_argument("--fast-options", nargs="+", type=_fast_options, default=None,
                        metavar="JSON",
                        help="the fast engine rows once per JSON object of FastOptions "
                             "fields, e.g. '{}' '{\"gemm_dtype\": \"bf16\"}' (the fp32 "
                             "model with bf16 GEMM inputs); default: the engine's defaults")
    parser.add_argument("--flops", action="store_true", help="print the FLOP count per module")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results as JSON (a directory: <date>-<device>.json in it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a note to print under the table and keep in the JSON "
                             "(repeatable)")
    parser.add_argument("--micro", action="store_true",
                        help="run the decision micro-benchmarks instead (attention vs SDPA, "
                             "the ViT GEMMs, the decoder conv, split / merge vs a copy); "
                             "--device, --dtype, --runs, --warmup, --json, --quiet apply; "
                             "more options: python -m depthpro_fast.bench.micro --help")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    from . import bench_peers

    bench_peers.add_arguments(parser)


def _run_micro(args: argparse.Namespace) -> int:
    from ..bench import micro

    argv = ["--device", args.device] if args.device else []
    if args.dtype:
        names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
        modes = sorted({d for d in args.dtype if _DTYPES[d] not in names})
        if modes:
            raise SystemExit(f"bench --micro: --dtype {' '.join(modes)} is a precision mode of "
                             "the whole model, not a dtype of the micro-benchmarks; accepted "
                             "there: fp32, bf16, fp16")
        argv += ["--dtype", *dict.fromkeys(names[_DTYPES[d]] for d in args.dtype)]
    for flag, value in (("--runs", args.runs), ("--warmup", args.warmup),
                        ("--json", args.json)):
        if value is not None:
            argv += [flag, str(value)]
    return micro.main(argv + (["--quiet"] if args.quiet else []))


def run(args: argparse.Namespace) -> int:
    from ..qualification import default_mode

    with default_mode("subprocess"):  # kernels qualify in a child: a crash cannot end the run
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.micro:
        return _run_micro(args)
    if args.breakdown is not None:
        from . import bench_breakdown

        return bench_breakdown.run(args, dtypes_arg=_DTYPES,
                                   fast_backends=tuple(args.backends or _FAST_BACKENDS),
                                   big_flops=CPU_BIG_MODEL_FLOPS)
    if args.peers or args.list:
        from . import bench_peers

        return bench_peers.run(args)
    import torch

    from ..accuracy import FOV_BUDGET_DEG, FP8_FOV_BUDGET_DEG, FP8_MARE_BUDGET, MARE_BUDGET
    from ..api import resolve_device, resolve_dtype
    from ..bench import first_call, machine_load
    from ..bench.environment import default_results_name, environment
    from ..bench.results import results_dict, write_json
    from ..bench.runner import Runner
    from ..bench.tables import fill_relative, format_stages, format_table
    from ..bench.timing import dtype_name, floor_peak
    from ..bench.variants import default_variants
    from ..config import PRESETS, resolve_config
    from ..flops import count_flops
    from ..model import count_parameters

    t_start = time.perf_counter()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                   flush=True))
    # how busy the machine is before anything runs (one second of this process sleeping)
    reader = machine_load.ProcReader()
    before = machine_load.probe(reader)
    if before.state == "shared":
        log(f"WARNING: the machine is busy ({'; '.join(before.reasons)} over the last second, "
            f"load average {before.load_after or 0:.1f}): the timings will not be comparable "
            "with an idle machine's; the table says how much CPU each row got")
    run_start = reader.snapshot()

    def machine_report(rows: list) -> dict:
        run_load = machine_load.measure(run_start, reader.snapshot(),
                                        threads=torch.get_num_threads(),
                                        ticks_per_s=reader.ticks_per_s)
        return machine_load.report([r.load for r in rows], run_load, before)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    config_arg = args.config or ("official" if gpu else "tiny")
    cfg = resolve_config(config_arg)
    config_name = config_arg if config_arg in PRESETS else os.path.basename(config_arg)
    dtypes = None
    fp8 = bf16_mixed = None
    if args.dtype:
        fp8 = any(_DTYPES[d] == "fp8" for d in args.dtype)
        bf16_mixed = any(_DTYPES[d] == "bf16-mixed" for d in args.dtype)
        dtypes = list(dict.fromkeys(resolve_dtype(_DTYPES[d]) for d in args.dtype
                                    if _DTYPES[d] not in ("fp8", "bf16-mixed")))

    flop_report = count_flops(cfg)
    flops_per_image = flop_report.per_image
    big = flops_per_image > CPU_BIG_MODEL_FLOPS
    default_runs, default_warmup = default_runs_warmup(gpu, big)
    runs = args.runs or default_runs
    warmup = args.warmup if args.warmup is not None else default_warmup

    variants = default_variants(device, dtypes=dtypes,
                                   fast_backends=tuple(args.backends or _FAST_BACKENDS),
                                   compile=args.compile, cuda_graph=args.cuda_graph, hf=args.hf,
                                   fp8=fp8, onnxruntime=args.onnxruntime,
                                   openvino=args.openvino, fast_options=args.fast_options,
                                   bf16_mixed=bf16_mixed)
    env = environment(device)
    params = count_parameters(_meta_model(cfg))

    if gpu and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events record on the current device
    log(f"measuring the peak matmul rate on {device} ...")
    peak, fp32_peak = floor_peak(device)
    runner = Runner(cfg, device, batches=args.batch, runs=runs, warmup=warmup,
                       stages=args.stages, seed=args.seed, log=log,
                       # backends named on the command line are timed even where they only
                       # repeat the reference (auto on a CPU) or run in the Triton interpreter
                       skip_same_as_reference=args.backends is None,
                       allow_interpreter=args.backends is not None,
                       cpu_opt_in=[k for k in ("compile", "hf", "onnxruntime", "openvino")
                                   if getattr(args, k)]
                       + [dtype_name(dt) for dt in dtypes or []] + (["fp8"] if fp8 else [])
                       + (["bf16-mixed"] if bf16_mixed else []),
                       # no extra untimed forward for the accuracy columns where one takes
                       # minutes (the official model on a CPU without warm-up)
                       accuracy=gpu or not big,
                       cpu_engine_rows_only=not gpu and big and args.backends is None,
                       engine_first=args.engine_first, machine=reader)
    if not gpu and big:
        per_forward = flops_per_image / (fp32_peak["tflops"] * 1e12) / 0.7 * max(args.batch)
        log(f"a CPU at this size: each row that runs takes {warmup + runs} forwards "
            f"of about {per_forward:.0f} s (estimated from the matmul rate just measured; "
            f"{warmup} warm-up + {runs} timed, whose min-max is the spread; --runs 1 for "
            "fewer); by default the reference and the fast engine in fp32, and the fast "
            "engine in bf16 where the CPU has bf16 arithmetic; the other rows are skipped at "
            "once")
    timer = "CUDA events, each run from an idle device" if gpu else "perf_counter"
    json_path = None
    if args.json:
        json_path = args.json
        if os.path.isdir(json_path) or json_path.endswith(os.sep):
            json_path = os.path.join(json_path, default_results_name(env))

    def save(rows: list, notes: list[str], partial: bool) -> None:
        settings = {"batches": args.batch, "runs": runs, "warmup": warmup,
                    "n_inputs": runner.n_inputs, "timer": timer, "seed": args.seed,
                    "stages": args.stages, "wall_s": round(time.perf_counter() - t_start, 1),
                    "partial": partial, "engine_first": args.engine_first,
                    "fp32_reference": "TF32 off (cuBLAS and cuDNN) in the fp32 reference rows",
                    "first_call": {"rows": args.first_call,
                                   "disk_caches": "empty" if args.first_call_empty_caches
                                   else "as found",
                                   "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"),
                                   "device_cache": os.environ.get("DEPTHPRO_FAST_DEVICE_CACHE"),
                                   "meaning": first_call.legend(args.first_call_empty_caches)}}
        culprit = runner.poisoned_by
        if culprit is not None:
            settings["poisoned_by"] = {"name": culprit.variant.name,
                                       "backend": culprit.variant.backend,
                                       "dtype": culprit.variant.dtype_label,
                                       "ops": culprit.ops, "reason": culprit.reason}
        data = results_dict(env=env, config_name=config_name, config=cfg, params=params,
                               flops_per_image=flops_per_image,
                               flops_by_stage=flop_report.by_stage(), peak=peak,
                               settings=settings, rows=rows, notes=notes)
        data["auto_fallbacks"] = _auto_fallbacks()
        data["machine_load"] = machine_report(rows)
        write_json(json_path, data)

    def save_partial(rows: list) -> None:
        # after every row: a run cut short (a time limit) still leaves what it measured
        fill_relative(rows, flops_per_image, peak["tflops"])
        save(rows, ["partial results: the run had not finished when this was written"], True)

    rows = runner.run(variants, on_row=save_partial if json_path else None)
    if not runner.interrupted and runner.poisoned_by is None and args.first_call != "none":
        if json_path:
            save_partial(rows)
        if not first_call.fill(rows, args.first_call, config=config_arg, device=device,
                               seed=args.seed, empty_disk_caches=args.first_call_empty_caches,
                               log=log):
            runner.interrupted = True
    baseline = fill_relative(rows, flops_per_image, peak["tflops"])

    notes = list(args.note)
    if runner.poisoned_by is not None:
        culprit = runner.poisoned_by
        notes.append(f"Stopped early: after {culprit.variant.name} "
                     f"{culprit.variant.dtype_label} failed the CUDA context was unusable, "
                     "so the rows after it were not run (rerun without its backend).")
    if not gpu:
        notes.append("No CUDA device: these are CPU timings (host clock); peak mem is the "
                     "process's peak resident memory during the row (weights included). "
                     "GPU numbers (bf16/fp16, the fast kernels, torch.compile, CUDA graphs, % of "
                     "the bf16 FLOP floor) need a GPU: run `depthpro-fast bench` on a CUDA "
                     "machine, or bench/gpu_check.sh.")
        if args.config is None:
            notes.append("CPU default: the tiny config (the official model takes minutes per "
                         "forward on a CPU; `--config official` times it: one warm-up and two "
                         "timed runs per row).")
        if big and args.runs is None:
            notes.append(f"CPU default for this config: {runs} timed runs, {warmup} warm-up "
                         "(one forward takes minutes here; the min-max column is the spread "
                         "of the timed runs); --config tiny is quick, --runs N for more.")
    if runner.interrupted:
        notes.append("Interrupted: the rows marked 'interrupted' were not timed.")
    print(f"depthpro-fast bench: config {config_name} ({params:,} parameters, "
          f"{flops_per_image / 1e9:,.1f} GFLOP per image), random weights")
    print(f"device: {_device_line(env)}")
    print(f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}), triton "
          f"{env['triton'] or 'not installed'}, commit {(env['commit'] or 'unknown')[:12]}"
          f"{' (modified)' if env.get('dirty') else ''}")
    floor_ms = flops_per_image / (peak["tflops"] * 1e12) * 1e3
    print(f"peak {peak['dtype']} matmul ({peak['n']}^3, measured now): {peak['tflops']:.1f} "
          f"TFLOP/s -> FLOP floor {floor_ms:.2f} ms per image")
    print(f"timing: {timer}; {warmup} warm-up + {runs} timed run(s) per row, median; "
          f"{runner.n_inputs} rotating random input(s)")
    print()
    print(format_table(rows))
    # the machine's state during the timed runs: a warning when others shared it
    load_report = machine_report(rows)
    rows_load = machine_load.combine([r.load for r in rows if r.load is not None])
    print(load_report["warning"] or f"machine: {machine_load.summary(rows_load)} during the "
          "timed runs")
    if any(r.load is not None and r.load.cpu_got is not None for r in rows):
        print("CPU got: this process's CPU time over the wall time x its "
              f"{torch.get_num_threads()} threads during the row's timed runs (about 100 % "
              "when no other process competes for the cores)")
    if baseline is not None:
        print(f"speed-up: per batch, over {baseline.variant.name} "
              f"{dtype_name(baseline.variant.dtype)}; % floor: the FLOP floor at the "
              f"measured {peak['dtype']} peak over the median")
    if any(r.mare is not None for r in rows):
        budget = ", ".join([f"{v:g} {dtype_name(dt)}" for dt, v in MARE_BUDGET.items()]
                           + [f"{FP8_MARE_BUDGET:g} fp8"])
        print("MARE: mean absolute relative error of the canonical inverse depth, FOV err: |FOV "
              "- reference FOV| in degrees, both on the first input vs the fp32 reference eager "
              f"row, TF32 off (same weights); budget (fast path): MARE <= {budget}, FOV <= "
              f"{FOV_BUDGET_DEG:g} deg ({FP8_FOV_BUDGET_DEG:g} deg in fp8)")
    if any(r.first_call_cold_ms is not None or r.first_call_error for r in rows):
        print(first_call.legend(args.first_call_empty_caches))
    for r in rows:
        if r.first_call_error:
            print(f"  first call of {r.variant.name} {r.variant.dtype_label} failed: "
                  f"{r.first_call_error}")
    long_reasons = [r for r in rows if r.status != "ok" and r.reason and len(r.reason) > 60]
    for r in long_reasons:
        print(f"  {r.variant.name} {r.variant.dtype_label}: {r.status}: {r.reason}")
    fallbacks = _auto_fallbacks()
    if fallbacks and any(r.variant.backend == "auto" for r in rows):
        print("auto fell back: " + "; ".join(f"{k}: {v}" for k, v in fallbacks.items()))
    if args.stages:
        text = format_stages(rows, flop_report.by_stage(), peak["tflops"])
        if text:
            print()
            print(text)
    if args.flops:
        print()
        print(flop_report.table())
    for note in notes:
        print()
        print(note)
    elapsed = time.perf_counter() - t_start
    if json_path:
        save(rows, notes, runner.interrupted)
        print(f"\nwrote {json_path}")
    print(f"\n(bench took {elapsed:.0f} s)")
    if runner.interrupted:
        return 130
    if runner.poisoned_by is not None:
        return 3
    ok = any(r.status == "ok" for r in rows)
    return 0 if ok else 1


def _meta_model(cfg):
    """The model on the meta device (for the parameter count: no memory)."""
    from ..api import build_model

    return build_model(cfg, device="meta")


def _device_line(env: dict) -> str:
    if env.get("device_type") == "cuda":
        extra = ", ".join(f"{k} {env[k]}" for k in ("driver", "clock_sm", "power_limit")
                          if env.get(k))
        return (f"{env['device']} (sm_{env['capability'].replace('.', '')}, "
                f"{env['sm_count']} SMs, {env['memory_gib']} GiB{', ' + extra if extra else ''})")
    return f"CPU: {env['cpu']} ({env['cpu_threads']} threads)"


def _auto_fallbacks() -> dict:
    from .. import backends

    return backends.fallback_log()

