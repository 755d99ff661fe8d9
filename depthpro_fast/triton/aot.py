"""Ahead-of-time compile check of every Triton kernel for Hopper (sm_90), without a GPU.

The interpreter (``TRITON_INTERPRET=1``, the CPU tests) runs a kernel's Python body; it accepts
code that the GPU compiler refuses (a plain Python global read inside ``@triton.jit``, for one)
and says nothing about registers, spills or shared memory. This check compiles, for an H100/H200
(``GPUTarget("cuda", 90, 32)``), exactly the kernels the model launches:

1. **Capture.** The official model is built on the ``meta`` device (no memory, no arithmetic)
   with the ``triton`` backend, and run forward in bf16, fp16 and fp32 at batch 1 and 8: the
   reference modules, the fast engine, and each fast-engine variant of the ablation; then each
   public op once more over the input options the model does not use (blend ramps, NCHW output,
   uint8 images). Triton's launch entry points (``JITFunction.run``, ``Autotuner.run``) are
   replaced by recorders, and the custom ops run their real Python bodies on the meta tensors
   (their fake kernels would skip the launches), so every launch is recorded with the very
   arguments, constexprs and launch options the op code computes. Meta tensors carry their
   storage offsets, so Triton's 16-byte alignment specialisation is the one a GPU run sees.
2. **Compile.** Each recorded launch goes through Triton's own ``JITFunction.run(warmup=True)``
   (the same binder, specialisation and cache as a GPU launch) under a driver that reports an
   sm_90 device; an autotuned kernel is compiled for **every** config it declares, each marked
   with whether its ``early_config_prune`` keeps it for that launch.
3. **Report.** One table: kernel, config, registers, spill bytes, shared memory, wgmma used, and
   the launches that reach it. Registers and spills come from ``ptxas -v`` (Triton's bundled
   ptxas) on the kernel's PTX; the result is cached by kernel hash next to Triton's cache.

It fails (exit 1) on any compile error, and on a spilling config that autotuning may pick for a
hot kernel (attention and the ViT epilogues: ``HOT_KERNELS``). Run it with the Triton the GPU
machine has (``.ci/triton_aot_check.sh`` makes that venv):

    python -m depthpro_fast.triton.aot [--batches 1 8] [--dtypes bf16 fp16 fp32] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The interpreter turns @triton.jit functions into Python: nothing would be compiled.
    sys.exit("depthpro_fast.triton.aot: unset TRITON_INTERPRET (this check compiles for a GPU)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

#: Compute capability, warp size: an H100 / H200.
TARGET = GPUTarget("cuda", 90, 32)
#: Kernels on the hot path of every ViT block: a config of theirs that may be picked must not
#: spill (local-memory traffic in the innermost loop of the forward).
HOT_KERNELS = ("_attention_fwd_kernel", "_layer_norm_kernel", "_bias_gelu_kernel",
               "_residual_layerscale_kernel", "_bias_gelu_fp8_kernel", "_quantize_rows_kernel",
               "_grouped_layer_norm_kernel")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# capture: run the model on meta tensors and record every Triton launch
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, the arguments it was called with, where it came from."""

    fn: JITFunction
    autotuner: Autotuner | None
    args: tuple
    kwargs: dict
    case: str


class _Recorder:
    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.case = "?"


@contextlib.contextmanager
def recording() -> Iterator[_Recorder]:
    """Inside: Triton launches are recorded instead of run, custom ops run their Python bodies
    on meta tensors, and the ``triton`` backend is accepted for meta tensors."""
    from .. import backends

    rec = _Recorder()
    jit_run, tuner_run = JITFunction.run, Autotuner.run
    triton_status = backends.triton_status

    def record_jit(self, *args, grid, warmup, **kwargs):
        if warmup:  # compiling (our own compile step): the real thing
            return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        rec.launches.append(Launch(self, None, args, dict(kwargs), rec.case))
        return None

    def record_tuner(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        rec.launches.append(Launch(self.fn, self, args, kwargs, rec.case))
        return None

    def status(device: torch.device | None = None) -> tuple[bool, str | None]:
        if device is not None and device.type == "meta":
            return True, None
        return triton_status(device)

    restore = _custom_ops_run_bodies()
    JITFunction.run, Autotuner.run = record_jit, record_tuner
    backends.triton_status = status
    try:
        yield rec
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        backends.triton_status = triton_status
        restore()


def _custom_ops_run_bodies() -> Callable[[], None]:
    """Point each Triton module's custom op at the Python function it wraps (undone by the
    returned callable): on meta tensors a custom op would run its fake kernel, not the launch."""
    from torch._library.custom_ops import CustomOpDef

    swapped: list[tuple[Any, str, Any]] = []
    for module in _kernel_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, CustomOpDef):
                body = getattr(value, "_init_fn", None)
                if body is None:
                    raise RuntimeError(f"this torch ({torch.__version__}) keeps no Python body "
                                       f"on custom op {value._qualname}; update aot.py")
                swapped.append((module, name, value))
                setattr(module, name, body)

    def restore() -> None:
        for module, name, value in swapped:
            setattr(module, name, value)

    return restore


def _kernel_modules() -> list[Any]:
    """Every op module of this package (one fused op per file), so a new op is never missed."""
    import importlib
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if not m.name.startswith("_") and m.name != "aot"]
    return [importlib.import_module(f"{__package__}.{n}") for n in sorted(names)]


def model_cases(batches: Sequence[int], dtypes: Sequence[str]) -> Iterator[tuple[str, Callable]]:
    """(case name, callable) pairs: each callable runs one meta-device forward."""
    from ..api import build_model
    from ..config import DepthProConfig
    from ..fast.ablation import BF16_ONLY, VARIANTS

    fast_variants = {"fast": {}}
    for name, opts in VARIANTS.items():
        if name.startswith("fast-") and opts.get("epilogues") != "compile":
            fast_variants[name] = opts
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        # the fp8 mode is a bf16 model's
        variants_here = {k: v for k, v in fast_variants.items()
                         if dtype == torch.bfloat16 or k not in BF16_ONLY}
        model = build_model(DepthProConfig(), device="meta").to(dtype).eval()
        model.set_backend("triton")
        for batch in batches:
            x = torch.empty(batch, 3, 1536, 1536, device="meta", dtype=dtype)

            def reference(model=model, x=x) -> None:
                model.prepare_fast(False)
                model(x)

            yield f"official b{batch} {dtype_name} reference", reference
            for vname, opts in variants_here.items():
                def fast(model=model, x=x, opts=opts) -> None:
                    model.prepare_fast(opts or True)
                    model(x)
                    model(x, need_fov=False)  # the FOV branch skipped: other launches

                yield f"official b{batch} {dtype_name} {vname}", fast
        model.prepare_fast(False)


def op_cases(dtypes: Sequence[str]) -> Iterator[tuple[str, Callable]]:
    """The public ops over input options the model itself does not use."""
    from .. import ops

    meta = dict(device="meta")
    from .probe import launch_probe_kernel

    def probe() -> None:  # the launch that decides whether Triton is trusted at all
        launch_probe_kernel(torch.empty(16, dtype=torch.float32, **meta))

    yield "launch probe", probe
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for channels_last in (False, True):
            for blend in (0, 2):
                tokens = torch.empty(35, 577, 1024, dtype=dtype, **meta)[:25]

                def merge(tokens=tokens, blend=blend, channels_last=channels_last) -> None:
                    ops.merge_patches(tokens, batch_size=1, grid=5, padding=3, blend=blend,
                                      channels_last=channels_last, backend="triton")

                yield f"merge_patches {dtype_name} blend={blend} cl={channels_last}", merge
        for in_dtype in (torch.uint8, torch.float32, dtype):
            image = torch.empty(1, 3, 1536, 1536, dtype=in_dtype, **meta)

            def split(image=image, dtype=dtype) -> None:
                ops.split_patches(image, prenormalized=False, out_dtype=dtype, backend="triton")

            yield f"split_patches {str(in_dtype)[6:]}->{dtype_name}", split
        # the decoder / head epilogues over the layouts and options the engine may not use
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            fmap = torch.empty(1, 256, 96, 96, dtype=dtype, **meta).contiguous(
                memory_format=fmt)
            bias = torch.empty(256, dtype=dtype, **meta)

            def epilogues(fmap=fmap, bias=bias) -> None:
                ops.bias_relu(fmap, bias, keep_sum=True, backend="triton")
                ops.bias_relu(fmap, None, backend="triton")
                ops.bias_residual(fmap, bias, fmap, fmap, with_relu=True, backend="triton")
                ops.bias_residual(fmap, None, fmap, backend="triton")

            yield f"bias_relu / bias_residual {dtype_name} cl={cl}", epilogues
            z = torch.empty(1, 128, 768, 768, dtype=dtype, **meta).contiguous(memory_format=fmt)
            vec = torch.empty(128, dtype=dtype, **meta)

            def tail(z=z, vec=vec) -> None:
                ops.subpixel_tail(z, vec, vec[:4], backend="triton")

            yield f"subpixel_tail {dtype_name} cl={cl} no bias", tail


def capture(batches: Sequence[int], dtypes: Sequence[str], *,
            log: Callable[[str], None] = print) -> list[Launch]:
    cases = list(model_cases(batches, dtypes)) + list(op_cases(dtypes))
    with recording() as rec, torch.no_grad():
        for name, run in cases:
            rec.case = name
            t0 = time.perf_counter()
            before = len(rec.launches)
            run()
            log(f"  captured {name}: {len(rec.launches) - before} launches "
                f"({time.perf_counter() - t0:.1f}s)")
    return rec.launches


# ----------------------------------------------------------------------------------------------
# compile: Triton's own launch path, warm-up only, for an sm_90 target
# ----------------------------------------------------------------------------------------------


class _Sm90Driver:
    """What ``JITFunction.run(warmup=True)`` asks of the active driver, for a GPU not here."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the AOT check's offline driver has no {name!r}: a compile step "
                           "asked for a GPU")


@contextlib.contextmanager
def offline_sm90() -> Iterator[None]:
    from triton.runtime import driver

    before = driver._active  # None until something asked (reset_active would probe a GPU)
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = before


def _config_label(config: triton.Config | None, kwargs: dict) -> str:
    if config is None:
        consts = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("BLOCK")}
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        return " ".join(f"{k}={v}" for k, v in {**consts, **opts}.items())
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]  # block sizes, then launch options
    parts += [f"warps={config.num_warps}", f"stages={config.num_stages}"]
    return " ".join(parts)


@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    dtypes: str
    cases: set[str] = dataclasses.field(default_factory=set)
    pickable: bool = True  # autotuning may choose it for at least one launch
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    wgmma: bool | None = None
    hash: str | None = None
    signature: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def hot(self) -> bool:
        return self.kernel in HOT_KERNELS


def _dtype_sig(args: tuple) -> str:
    seen = []
    for a in args:
        if isinstance(a, torch.Tensor):
            name = str(a.dtype).replace("torch.", "")
            if name not in seen:
                seen.append(name)
    return ",".join(seen)


def compile_launches(launches: Sequence[Launch], *,
                     log: Callable[[str], None] = print) -> list[Row]:
    """Compile every launch (an autotuned one for each config its pruning keeps; a declared
    config that no launch keeps is compiled once anyway, for the first launch, marked pruned)."""
    rows: dict[tuple, Row] = {}
    kept_somewhere: dict[int, set[int]] = {}  # id(autotuner) -> indices of kept configs
    first_launch: dict[int, Launch] = {}
    with offline_sm90():
        for launch in launches:
            if launch.autotuner is None:
                _compile_one(rows, launch, None, dict(launch.kwargs), True, log)
                continue
            tuner = launch.autotuner
            first_launch.setdefault(id(tuner), launch)
            tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))
            try:
                kept = tuner.prune_configs(dict(launch.kwargs))
            finally:
                tuner.nargs = None
            for i, config in enumerate(tuner.configs):
                if config in kept:
                    kept_somewhere.setdefault(id(tuner), set()).add(i)
                    _compile_one(rows, launch, config, {**launch.kwargs, **config.all_kwargs()},
                                 True, log)
        for key, launch in first_launch.items():
            tuner = launch.autotuner
            for i, config in enumerate(tuner.configs):
                if i not in kept_somewhere.get(key, set()):
                    _compile_one(rows, launch, config, {**launch.kwargs, **config.all_kwargs()},
                                 False, log)
    return list(rows.values())


def _specialization(fn: JITFunction, args: tuple, kwargs: dict) -> dict[str, str]:
    """Parameter -> Triton's specialisation of it (type, and /16 where it is known divisible)."""
    binder = fn.device_caches[0][-1]
    _, spec, _ = binder(*args, **kwargs)
    out = {}
    for param, (ty, attr) in zip(fn.params, spec, strict=False):
        if ty != "constexpr":
            out[param.name] = ty + ("/16" if attr == "D" else "")
    return out


def _compile_one(rows: dict[tuple, Row], launch: Launch, config: triton.Config | None,
                 kwargs: dict, pickable: bool, log: Callable[[str], None]) -> None:
    fn = launch.fn
    kname = fn.fn.__name__
    label = _config_label(config, kwargs)
    try:
        kernel = fn.run(*launch.args, grid=None, warmup=True, **kwargs)
        key: tuple = (kname, kernel.hash)
        error = None
    except Exception as e:  # noqa: BLE001  (reported as a failed row)
        kernel = None
        error = f"{type(e).__name__}: {_first_line(e)}"
        key = (kname, label, _dtype_sig(launch.args), error)
    row = rows.get(key)
    if row is None:
        row = rows[key] = Row(kname, label, _dtype_sig(launch.args), error=error,
                              pickable=pickable)
        if kernel is not None:
            row.hash = kernel.hash
            row.signature = _specialization(fn, launch.args, kwargs)
            row.shared_bytes = int(kernel.metadata.shared)
            ptx = kernel.asm.get("ptx", "")
            row.wgmma = "wgmma" in ptx
            row.registers, row.spill_bytes = ptx_resources(ptx, kernel.hash)
        if error:
            log(f"  FAILED {kname} [{label}] ({launch.case}): {error}")
    else:
        row.pickable = row.pickable or pickable
    row.cases.add(launch.case)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # Triton's compile errors put the message on the last line, after the source excerpt.
    for line in reversed(text):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:300]
    return (text[-1] if text else repr(e))[:300]


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


_PTXAS_CACHE: dict[str, list] | None = None  # kernel hash -> [registers, spills], read once


def ptx_resources(ptx: str, kernel_hash: str) -> tuple[int | None, int | None]:
    """(registers, spill store + load bytes) from ``ptxas -v`` for sm_90a; cached by hash."""
    global _PTXAS_CACHE
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    cache_file = cache / "depthpro_fast_ptxas_v.json"
    if _PTXAS_CACHE is None:
        try:
            _PTXAS_CACHE = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            _PTXAS_CACHE = {}
    known = _PTXAS_CACHE
    if kernel_hash in known:
        regs, spills = known[kernel_hash]
        return regs, spills
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--gpu-name=sm_90a", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    regs = max((int(m) for m in _REGS.findall(log)), default=None)
    spills = sum(int(a) + int(b) for a, b in _SPILL.findall(log)) if _SPILL.search(log) else None
    known[kernel_hash] = [regs, spills]
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        tmp_file = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp_file.write_text(json.dumps(known))
        tmp_file.replace(cache_file)
    return regs, spills


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def defects(rows: Sequence[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.error:
            out.append(f"{r.kernel} [{r.config}] ({r.dtypes}) does not compile: {r.error}")
        elif r.hot and r.pickable and r.spill_bytes:
            out.append(f"{r.kernel} [{r.config}] ({r.dtypes}) spills {r.spill_bytes} bytes and "
                       "autotuning may pick it (hot kernel: fix the kernel or prune the config)")
    return out


def format_table(rows: Sequence[Row]) -> str:
    head = ("kernel", "config", "dtypes", "spec", "regs", "spill B", "smem B", "wgmma",
            "pickable", "launches")
    body = []
    for r in sorted(rows, key=lambda r: (r.kernel, r.dtypes, r.config)):
        body.append((r.kernel.lstrip("_"), r.config, r.dtypes, (r.hash or "-")[:8],
                     "-" if r.registers is None else str(r.registers),
                     "-" if r.spill_bytes is None else str(r.spill_bytes),
                     "-" if r.shared_bytes is None else str(r.shared_bytes),
                     "-" if r.wgmma is None else ("yes" if r.wgmma else "no"),
                     "yes" if r.pickable else "pruned",
                     "COMPILE ERROR" if r.error else str(len(r.cases))))
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    legend = ("spec: Triton's kernel hash (one per specialisation: dtypes, pointer alignment, "
              "ints divisible by 16; --json has the signature); pickable: autotuning may choose "
              "it; launches: model / op cases that reach it")
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body), legend])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m depthpro_fast.triton.aot",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16",
                                                                            "fp32"])
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batches):
        p.error("--batches must be positive")
    t0 = time.perf_counter()
    print(f"Triton AOT check: Triton {triton.__version__}, torch {torch.__version__}, target "
          f"{TARGET.backend} sm_{TARGET.arch}; batches {args.batches}, dtypes {args.dtypes}")
    launches = capture(args.batches, args.dtypes)
    print(f"captured {len(launches)} launches in {time.perf_counter() - t0:.1f}s; compiling")
    rows = compile_launches(launches)
    print(format_table(rows))
    found = defects(rows)
    if args.json:
        args.json.write_text(json.dumps(
            {"schema": "depthpro_fast.triton_aot/1",
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "commit": _git_commit(), "triton": triton.__version__, "torch": torch.__version__,
             "target": f"{TARGET.backend}:{TARGET.arch}", "batches": args.batches,
             "dtypes": args.dtypes, "seconds": round(time.perf_counter() - t0, 1),
             "rows": [{**dataclasses.asdict(r), "cases": sorted(r.cases)} for r in rows]},
            indent=1))
    took = time.perf_counter() - t0
    if found:
        print(f"Triton AOT check FAILED ({len(rows)} kernels x configs, {took:.0f}s):")
        for d in found:
            print(f"  - {d}")
        return 1
    print(f"Triton AOT check passed: {len(rows)} kernels x configs compile for sm_90 with "
          f"Triton {triton.__version__}, no pickable hot config spills ({took:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
