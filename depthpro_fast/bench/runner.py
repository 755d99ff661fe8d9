"""The side-by-side runner: every row built, timed and checked against the fp32 reference.

:class:`Runner` runs :class:`~depthpro_fast.bench.variants.Variant` rows for one config and
device, one model per dtype at a time, and returns a :class:`RowResult` per row and batch; a
row that cannot run is skipped with its reason, a row that fails is reported and the run goes on.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .. import backends
from ..accuracy import max_abs_error, mean_abs_rel_error
from ..config import IMG_SIZE, DepthProConfig
from ..cpu import half_precision_warning
from .journal import cuda_context_usable
from .machine_load import ProcReader, Span, format_pct
from .results import json_safe
from .rows import RowResult
from .stages import time_stages
from .timing import (
    CpuPeakRss,
    dtype_name,
    random_inputs,
    synchronize,
    tf32_disabled,
    tf32_state,
    time_callable,
)
from .variants import OPS, SkipRow, Variant, build_hf_model, hf_unavailable, resolved_ops


class Runner:
    """Runs variants side by side for one config and device, and collects ``RowResult``s."""

    def __init__(self, config: DepthProConfig, device: torch.device, *, batches: Sequence[int],
                 runs: int, warmup: int, stages: bool = False, n_inputs: int | None = None,
                 seed: int = 0, log: Callable[[str], None] | None = None,
                 skip_same_as_reference: bool = True, allow_interpreter: bool = False,
                 cpu_opt_in: Iterable[str] = (), accuracy: bool = True,
                 cpu_engine_rows_only: bool = False, engine_first: bool = False,
                 machine: ProcReader | None = None):
        self.config = config
        self.device = device
        self.batches = list(batches)
        self.runs = runs
        self.warmup = warmup
        self.stages = stages
        self.n_inputs = n_inputs or (2 if device.type == "cuda" or runs > 1 else 1)
        self.seed = seed
        self.log = log or (lambda msg: None)
        self.skip_same_as_reference = skip_same_as_reference
        self.allow_interpreter = allow_interpreter
        # rows that run on a CPU only when asked for: "compile", "hf", "onnxruntime",
        # "openvino" (minutes
        # each there),
        # "bf16" (a bf16 row on a CPU without bf16 arithmetic)
        self.cpu_opt_in = set(cpu_opt_in)
        # a big model on a CPU: the kernels-only "fast <backend>" rows are left to --backends
        # (the fast engine row runs the same kernels; each row costs two forwards of minutes)
        self.cpu_engine_rows_only = cpu_engine_rows_only
        # accuracy columns: taken from the first call's output; when a row makes no first call
        # (eager, no warm-up), ``accuracy`` allows one more, untimed, forward for them
        self.accuracy = accuracy
        # the fast engine's rows before the others (a run cut by a time limit keeps them)
        self.engine_first = engine_first
        # reads /proc around each row's timed runs (replaceable: tests inject its contents)
        self.machine = machine or ProcReader()
        self.interrupted = False
        # the failed row after which the CUDA context was unusable (the rest were not run)
        self.poisoned_by: RowResult | None = None
        self._reference_out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._model: tuple[torch.dtype, torch.nn.Module] | None = None
        self._inputs: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self.ort_providers = ""  # the execution providers of the last onnxruntime row
        self.ov_precision = ""  # the precision OpenVINO compiled the last openvino row for

    # -- resources ---------------------------------------------------------------------------
    def _free(self) -> None:
        self._model = None
        self._inputs.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def model(self, dtype: torch.dtype) -> torch.nn.Module:
        if self._model is None or self._model[0] != dtype:
            from ..api import load

            self._free()
            t0 = time.perf_counter()
            # the same seed for every dtype: the rows' models share their weights (up to
            # rounding), so their outputs can be compared with the fp32 reference's
            torch.manual_seed(self.seed)
            model, _ = load(None, config=self.config, device=self.device, dtype=dtype,
                            backend="reference")
            self.log(f"built the {dtype_name(dtype)} model with random weights in "
                     f"{time.perf_counter() - t0:.1f} s")
            self._model = (dtype, model)
        return self._model[1]

    def inputs(self, dtype: torch.dtype, batch: int) -> list[torch.Tensor]:
        key = (dtype, batch)
        if key not in self._inputs:
            self._inputs[key] = random_inputs((batch, 3, IMG_SIZE, IMG_SIZE),
                                              count=self.n_inputs, device=self.device,
                                              dtype=dtype, seed=self.seed + batch)
        return self._inputs[key]

    def free(self) -> None:
        """Drop the model and the inputs (the next row or call builds a fresh model)."""
        self._free()

    def row_callable(self, v: Variant, batch: int) -> tuple[Callable[[torch.Tensor], Any],
                                                            torch.nn.Module, Callable[[], None]]:
        """(the function a row times, the module it runs, its clean-up): the row's preparation
        (backend, ``prepare_fast``, CUDA graph capture, ``torch.compile`` wrapping) on the
        current model (``model(v.dtype)``)."""
        return self._callable(v, batch)

    # -- one row -----------------------------------------------------------------------------
    def _callable(self, v: Variant, batch: int) -> tuple[Callable[[torch.Tensor], Any],
                                                         torch.nn.Module, Callable[[], None]]:
        """(the function to time, the module it runs, a clean-up function)."""
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
        if v.path == "hf":
            hf_model = build_hf_model(self.config, self.device, v.dtype)

            def run_hf(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return hf_model(pixel_values=x)

            return run_hf, hf_model, cleanup
        # (the openvino rows export the fp32 model; their dtype is OpenVINO's arithmetic)
        model = self.model(torch.float32 if v.path == "openvino" else v.dtype)
        if v.path == "openvino":
            from .openvino_row import openvino_callable

            model.set_backend("reference")
            run_ov, cleanup, self.ov_precision, summary = openvino_callable(model, v.dtype)
            self.log(f"openvino: exported {summary}; compiled for {self.ov_precision}")
            return run_ov, model, cleanup
        if v.path == "onnxruntime":
            from .onnxruntime_row import onnxruntime_callable

            model.set_backend("reference")
            run_ort, cleanup, used, summary = onnxruntime_callable(model, self.device)
            self.log(f"onnxruntime: exported {summary}; providers {used}")
            self.ort_providers = used
            return run_ort, model, cleanup
        model.set_backend(v.backend if v.path in ("fast", "engine") else "reference")
        if v.path == "engine":
            # the engine captures and replays its own CUDA graphs in mode "cudagraph"
            model.prepare_fast({**v.fast_options, "cuda_graphs": v.mode == "cudagraph",
                                "fp8": v.fp8})

            def run_engine(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return model(x)

            def detach() -> None:
                model.prepare_fast(False)

            return run_engine, model, detach
        if v.mode == "eager":
            def run_eager(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return model(x)

            return run_eager, model, cleanup
        if v.mode == "compile":
            compiled = torch.compile(model)

            def run_compiled(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return compiled(x)

            def reset() -> None:
                torch._dynamo.reset()

            return run_compiled, model, reset
        if v.mode == "cudagraph":
            if self.device.type != "cuda":
                raise SkipRow("CUDA graphs need a CUDA device")
            static_x = self.inputs(v.dtype, batch)[0].clone()
            with torch.no_grad():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm up outside the capture (lazy inits)
                    for _ in range(2):
                        model(static_x)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = model(static_x)

            def replay(x: torch.Tensor) -> Any:
                static_x.copy_(x)  # the copy is part of the timed latency
                graph.replay()
                return static_out

            def release() -> None:
                nonlocal graph
                graph.reset()

            return replay, model, release
        raise ValueError(f"unknown mode {v.mode!r}")

    def run_row(self, v: Variant, batch: int) -> RowResult:
        """One row, timed; the fp32 reference rows with TF32 off (see ``Variant.tf32_off``)."""
        if not v.tf32_off:
            return self._run_row(v, batch)
        with tf32_disabled():
            return self._run_row(v, batch)

    def _run_row(self, v: Variant, batch: int) -> RowResult:
        row = RowResult(v, batch, tf32=tf32_state())
        cuda = self.device.type == "cuda"
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
        try:
            row.ops = self.admit(v, row)
            if v.path == "hf":
                self._free()  # make room: transformers' model is built in _callable
            else:  # built before the memory baseline: weights added below
                self.model(torch.float32 if v.path == "openvino" else v.dtype)
            inputs = self.inputs(v.dtype, batch)
            # the ONNX export is made before the memory baseline (its tracing is not the row's
            # memory; the session's weights, resident by then, are)
            prebuilt = (self._callable(v, batch) if v.path in ("onnxruntime", "openvino")
                        else None)
            if prebuilt is not None:  # (the JSON's per-row details: what the runtime used)
                row.engine = ({"onnxruntime_providers": self.ort_providers}
                              if v.path == "onnxruntime"
                              else {"openvino_precision": self.ov_precision})
            rss = CpuPeakRss()
            if cuda:
                synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                gc.collect()
                rss.reset()  # the process's peak resident memory from here (weights included)
            fn, module, cleanup = prebuilt or self._callable(v, batch)
            warmup = self.warmup
            if v.mode != "eager" or warmup > 0:
                # the first call on its own (compilation, autotuning, lazy initialisation): it
                # counts as one warm-up run
                synchronize(self.device)
                t0 = time.perf_counter()
                first_out = fn(inputs[0])
                synchronize(self.device)
                row.first_call_ms = (time.perf_counter() - t0) * 1e3
                if v.path != "hf":  # (no extra forward: the first call's output is checked)
                    self._check_accuracy(row, first_out)
                del first_out
                warmup = max(warmup - 1, 0)
            # on a CPU "CPU got" is judged against the threads torch computes with; on a GPU
            # the host mostly waits, so only other processes' use and steal are judged
            threads = torch.get_num_threads() if not cuda else None
            with Span(self.machine, threads) as span:
                row.device, row.host = time_callable(fn, inputs, warmup=warmup,
                                                     runs=self.runs, device=self.device)
            row.load = span.load
            if row.first_call_ms is None and self.accuracy and v.path != "hf":
                self._check_accuracy(row, fn(inputs[0]))
            if cuda:
                # weights + one input + everything allocated on top (activations, workspaces,
                # a CUDA graph's pool, compilation buffers)
                peak = torch.cuda.max_memory_allocated(self.device) - base
                peak += inputs[0].numel() * inputs[0].element_size()
                if v.path != "hf":  # transformers' weights were allocated after the baseline
                    peak += sum(p.numel() * p.element_size() for p in module.parameters())
                row.peak_mem_bytes = peak
            else:
                row.peak_mem_bytes = rss.read()
            if v.path == "engine" and getattr(module, "fast_engine", None) is not None:
                row.engine = json_safe(module.fast_engine.status())
            if self.stages and v.mode == "eager" and v.path in ("reference", "fast"):
                row.stages = time_stages(module, inputs, warmup=min(self.warmup, 2),
                                         runs=self.runs, device=self.device)
        except SkipRow as e:
            row.status, row.reason = "skipped", str(e)
        except Exception as e:  # a broken backend must not stop the other rows
            row.status, row.reason = "failed", f"{type(e).__name__}: {e}".strip()
            if cuda and not cuda_context_usable(self.device):
                # an illegal address or the like: every later row of this process would fail
                # too, so run() stops here (bench/gpu_check.sh reruns without this backend)
                row.reason += " (the CUDA context was unusable after it)"
                self.poisoned_by = row
        finally:
            try:
                cleanup()
                if v.path == "hf" or row.status == "failed":
                    self._free()
            except Exception:  # noqa: BLE001  (a poisoned context fails here too)
                pass
        return row

    def admit(self, v: Variant, row: RowResult | None = None) -> dict[str, str] | None:
        """Whether row ``v`` runs here: raises ``SkipRow`` with the reason when it cannot (or,
        on a CPU, runs only when asked for); else returns the implementation of each op it
        reports (None for rows of other runtimes). ``row.ops`` is set as soon as they are
        known (a row skipped after that still reports them)."""
        cuda = self.device.type == "cuda"
        ops = None
        if v.path in ("fast", "engine"):
            ok, why = backends.backend_status(v.backend, self.device)
            if not ok:
                raise SkipRow(f"backend {v.backend!r} unavailable: {why}")
            if (v.backend == "triton" and self.device.type == "cpu"
                    and not self.allow_interpreter):
                raise SkipRow("on a CPU Triton runs in its interpreter, which is a "
                              "correctness tool, not a performance path")
            ops = resolved_ops(v.backend, self.device)
            if row is not None:
                row.ops = ops
            if (self.skip_same_as_reference and v.mode == "eager" and v.path == "fast"
                    and all(b == "reference" for b in ops.values())):
                raise SkipRow(f"{v.backend} runs the reference for every op on "
                              f"{self.device.type} (timed in the reference row)")
        elif v.path == "reference":
            ops = {op: "reference" for op in OPS}
            if row is not None:
                row.ops = ops
        if not cuda and v.path == "fast" and self.cpu_engine_rows_only:
            raise SkipRow("on a CPU at this size only with --backends (the fast engine row "
                          "runs the same kernels)")
        gemm_dtype = v.fast_options.get("gemm_dtype")
        if gemm_dtype is not None and v.dtype != torch.float32:
            raise SkipRow(f"gemm_dtype={gemm_dtype!r} rounds an fp32 model's GEMM inputs (the "
                          "fp32 rows only)")
        if v.fp8:
            self._check_fp8_row()
        elif gemm_dtype is not None:
            if cuda:
                raise SkipRow("bf16-mixed (gemm_dtype) is a CPU mode (oneDNN's bf16 GEMMs and "
                              "convolutions); on a GPU the bf16 / fp16 rows are its match")
            slow = half_precision_warning(torch.bfloat16)
            if slow and "bf16-mixed" not in self.cpu_opt_in:
                raise SkipRow(f"{slow} (--dtype bf16-mixed times it anyway)")
        elif (not cuda and v.path in ("fast", "engine") and v.dtype != torch.float32
                and dtype_name(v.dtype) not in self.cpu_opt_in):
            slow = half_precision_warning(v.dtype)
            if slow:
                raise SkipRow(f"{slow} (--dtype {dtype_name(v.dtype)} times it anyway)")
        if v.mode == "cudagraph" and not cuda:
            raise SkipRow("CUDA graphs need a CUDA device")
        if v.path == "hf" and hf_unavailable(self.config):
            raise SkipRow(hf_unavailable(self.config))
        if not cuda and v.mode == "compile" and "compile" not in self.cpu_opt_in:
            raise SkipRow("on a CPU only with --compile (compilation takes minutes)")
        if not cuda and v.path == "hf" and "hf" not in self.cpu_opt_in:
            raise SkipRow("on a CPU only with --hf (one more full forward)")
        if v.path == "onnxruntime":
            from .onnxruntime_row import onnxruntime_unavailable

            why = onnxruntime_unavailable(self.device)
            if why:
                raise SkipRow(why)
            if not cuda and "onnxruntime" not in self.cpu_opt_in:
                raise SkipRow("on a CPU only with --onnxruntime (an ONNX export, then "
                              "its forwards)")
        if v.path == "openvino":
            from .openvino_row import openvino_unavailable

            why = openvino_unavailable(self.device)
            if why:
                raise SkipRow(why)
            if "openvino" not in self.cpu_opt_in:
                raise SkipRow("on a CPU only with --openvino (an OpenVINO export, then "
                              "its forwards)")
            slow = half_precision_warning(v.dtype)
            if slow:
                raise SkipRow(f"{slow} (OpenVINO would compute in f32)")
        return ops

    def _check_fp8_row(self) -> None:
        """An fp8 row runs where FP8 GEMMs do (compute capability >= 8.9); on a CPU, where it
        is an emulation, only when asked for (``--dtype fp8``)."""
        from ..fp8_format import fp8_problem

        problem = fp8_problem(self.device)
        if problem:
            raise SkipRow(f"fp8: {problem}")
        if self.device.type == "cpu" and "fp8" not in self.cpu_opt_in:
            raise SkipRow("fp8 on a CPU is an emulation for accuracy tests (no FP8 arithmetic; "
                          "the rest in emulated bf16 where the CPU has none), not a performance "
                          "path (--dtype fp8 times it anyway)")

    def _check_accuracy(self, row: RowResult, out: Any) -> None:
        """Compare a row's output on its first input with the fp32 reference's (same batch).

        The fp32 reference eager row records the reference; rows run after it (the plan runs
        fp32 first) get their mean absolute relative error of the canonical inverse depth and
        their FOV error. Without an fp32 reference row in the run, the columns stay empty.
        """
        cid, fov = out
        v = row.variant
        if v.is_fp32_reference:
            if row.batch not in self._reference_out:
                self._reference_out[row.batch] = (
                    cid.detach().float().clone(),
                    None if fov is None else fov.detach().float().clone())
        ref = self._reference_out.get(row.batch)
        if ref is None:
            return
        row.mare = mean_abs_rel_error(cid, ref[0])
        if fov is not None and ref[1] is not None:
            row.fov_err_deg = max_abs_error(fov, ref[1])

    def run(self, variants: Iterable[Variant],
            on_row: Callable[[list[RowResult]], None] | None = None) -> list[RowResult]:
        """Time every variant at every batch size; rows come back in the given order.

        ``on_row(rows)`` is called after each row with every row so far (in table order), e.g.
        to save partial results. An interrupt (Ctrl-C, or ``timeout --signal=INT``) stops the
        run: the rows not yet timed come back as skipped ("interrupted") and ``interrupted``
        is set, so a run cut short by a time limit still reports what it measured.
        """
        variants = list(variants)
        order = {dt: i for i, dt in enumerate(dict.fromkeys(v.dtype for v in variants))}
        # one model per dtype at a time: run grouped by dtype, torch.compile (slow to compile)
        # last in its group, transformers last of all; with engine_first the fast engine's rows
        # come before every other row (one more model build per dtype switch)
        plan = sorted(((v, b) for v in variants for b in self.batches),
                      key=lambda vb: (vb[0].path == "hf",
                                      self.engine_first and vb[0].path != "engine",
                                      order[vb[0].dtype], vb[0].mode == "compile"))
        results: dict[tuple[Variant, int], RowResult] = {}

        def in_order() -> list[RowResult]:
            return [results[(v, b)] for b in self.batches for v in variants
                    if (v, b) in results]

        self.interrupted = False
        self.poisoned_by = None
        try:
            for i, (v, b) in enumerate(plan, 1):
                self.log(f"[{i}/{len(plan)}] {v.name} {v.dtype_label} batch {b}")
                culprit = self.poisoned_by
                if culprit is not None:
                    row = RowResult(v, b, "skipped", "not run: the CUDA context was unusable "
                                    f"after {culprit.variant.name} "
                                    f"{culprit.variant.dtype_label} failed")
                else:
                    row = self.run_row(v, b)
                if row.status != "ok":
                    self.log(f"    {row.status}: {row.reason}")
                else:
                    line = f"    median {row.device.median:.1f} ms"
                    if row.load is not None and row.load.cpu_got is not None:
                        line += f", CPU got {format_pct(row.load.cpu_got)}"
                    if row.load is not None and row.load.state == "shared":
                        line += f" (machine shared: {'; '.join(row.load.reasons)})"
                    self.log(line)
                results[(v, b)] = row
                if on_row is not None:
                    on_row(in_order())
        except KeyboardInterrupt:
            self.interrupted = True
            self.log("interrupted: the rows not timed yet are reported as skipped")
            for v, b in plan:
                results.setdefault((v, b), RowResult(v, b, "skipped",
                                                     "interrupted (time limit or Ctrl-C)"))
        try:
            self._free()
        except Exception:  # noqa: BLE001  (a poisoned context)
            pass
        return in_order()
