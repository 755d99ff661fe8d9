"""The ViT GEMMs on a CPU: PyTorch's default (MKL for fp32) or oneDNN, chosen by measurement.

Which library is faster depends on the CPU, so the fast engine times both
(``FastOptions(cpu_gemm="auto")``, about a second) and keeps the faster. The two run a GEMM in
different orders, so they round differently: a choice that flipped between runs would change
the depth maps' bits and the speed (a suspect for a bench row that measured 14.4 s in one run
and 21-22 s in others; on the 2-core EPYC the two once measured 91 against 91 GFLOP/s). So the
choice is made once, as every timed choice (``fast/timed_choice.py``): measured once per
process, dtype and shape, stored per device (``DeviceCache("cpu_gemm", "cpu")``: the CPU model
and thread count, the versions), and oneDNN must beat ``aten`` by more than the CPU's near-tie
margin (10 %), else ``aten``, first in the fixed order, is kept:

- ``aten``: ``F.linear`` (fp32 through MKL's sgemm; bf16 through oneDNN already). Measured on a
  2-core AVX2 AMD EPYC, fp32, (20195 x 1024) @ (1024 x 4096): 89-105 GFLOP/s.
- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on the plain fp32 weight (no packed copy:
  the ViT weights stay the model's own tensors), with fc1's bias and exact (erf) GELU as oneDNN
  post-ops, so the bias + GELU pass disappears. Same shape and machine: 73-79 GFLOP/s, so
  ``auto`` keeps ``aten`` there; reported 335 against MKL's 176 GFLOP/s on an AVX-512 EPYC
  where ``auto`` picks it.

Both compute the same function up to rounding (fp32 accumulation in either).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from . import timed_choice
from .epilogue_backends import EpilogueBackends, op_backend

CPU_GEMMS = ("auto", "aten", "onednn")
#: the fixed order that breaks near-ties: PyTorch's default first
PREFERENCE = ("aten", "onednn")
#: the timer of the measurement (read at each call: tests inject a noisy one)
CLOCK: Callable[[], float] = time.perf_counter


@functools.cache
def onednn_linear_available(dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether oneDNN's fused linear runs here in ``dtype`` (a tiny call decides), and why not."""
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN (mkldnn)"
    try:
        g = torch.Generator().manual_seed(0)  # the caller's global RNG is left alone
        x = torch.randn(3, 8, generator=g).to(dtype)
        w = torch.randn(5, 8, generator=g).to(dtype)
        b = torch.randn(5, generator=g).to(dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        want = F.gelu(F.linear(x.float(), w.float(), b.float()))
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        if not torch.allclose(out.float(), want, rtol=tol, atol=tol):
            return False, "oneDNN's linear + GELU disagrees with F.linear + F.gelu"
    except Exception as e:  # noqa: BLE001  (op missing in this build, dtype unsupported)
        return False, f"torch.ops.mkldnn._linear_pointwise failed: {str(e).splitlines()[0]}"
    return True, None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            attr: str, approximate: str = "none") -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # "gelu" with algorithm "none" is the exact erf GELU, "tanh" the approximation
    out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, attr, [],
                                             approximate if attr == "gelu" else "")
    return out.view(*lead, weight.shape[0])


GELUS = ("none", "tanh")


@functools.cache
def addmm_fp32_out_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``torch.addmm(h, a, b, out_dtype=torch.float32, out=h)`` adds a 16-bit product
    into an fp32 ``h`` in place on ``device`` (a tiny call decides), and the words for the
    engine's status. CUDA only: torch 2.13 has no CPU kernel for the ``dtype`` overloads, and
    some CUDA versions require ``self`` in the operands' dtype."""
    if device.type != "cuda":
        return False, (f"{device.type}: no addmm out_dtype kernel; the GEMM in the model dtype "
                       "then an in-place fp32 add")
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(32, 64, device=device, generator=g).to(torch.bfloat16)
        b = torch.randn(64, 48, device=device, generator=g).to(torch.bfloat16)
        h = torch.randn(32, 48, device=device, generator=g)
        want = h + a.float() @ b.float()
        torch.addmm(h, a, b, out_dtype=torch.float32, out=h)
        if not torch.allclose(h, want, rtol=1e-4, atol=1e-4):
            return False, ("cuda: addmm out_dtype disagrees with the fp32 reference; the GEMM "
                           "in the model dtype then an in-place fp32 add")
    except Exception as e:  # noqa: BLE001  (overload missing, or self must be 16-bit)
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return False, (f"cuda: addmm out_dtype refused ({why}); the GEMM in the model dtype "
                       "then an in-place fp32 add")
    return True, "cuda: addmm(out_dtype=float32) into the fp32 stream (fp32 accumulation)"


def tracing() -> bool:
    """Inside a ``torch.compile`` or ``torch.export`` trace. There the fp32-output addmm is not
    used: torch 2.11's decomposition of ``addmm.dtype_out`` mis-binds its arguments (the
    traced program fails or computes another function), so the GEMM runs in the model dtype
    and the product is added in fp32, as on devices without the kernel."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or bool(exporting is not None and exporting())


class CpuGemm:
    """The linear layers of the fused ViT forward, in one library (``aten`` or ``onednn``),
    and the LayerNorm passes that feed them (``feeds_gemm``: the output is a GEMM's input; the
    fp8 mode, ``fast/fp8.py``, quantises it there)."""

    #: the options of ``FastOptions.residual_in_gemm`` / ``fc1_gelu="tanh"`` (not the fp8 mode)
    supports_vit_epilogues = True

    def __init__(self, name: str, epilogue_backend: str | None | EpilogueBackends = None):
        if name not in ("aten", "onednn"):
            raise ValueError(f"cpu_gemm must be 'aten' or 'onednn' here, got {name!r}")
        self.name = name
        self.epilogue_backend = epilogue_backend

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "onednn" and x.device.type == "cpu":
            return _onednn(x, weight, bias, "none")
        return F.linear(x, weight, bias)

    def linear_bias_gelu(self, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
        """``gelu(x @ weight^T + bias)`` (exact GELU): one oneDNN call, or a GEMM + the op.

        ``approximate="tanh"``: the tanh GELU, in the GEMM's epilogue on CUDA
        (``torch._addmm_activation(use_gelu=True)``: cuBLASLt's GELU_BIAS epilogue, whose GELU
        is the tanh form, as is PyTorch's fallback for shapes cuBLASLt does not take). On a CPU
        ``_addmm_activation`` computes the *exact* GELU (measured, torch 2.13), so there the
        tanh form is the GEMM with its bias then ``gelu_(approximate="tanh")`` in place (or
        oneDNN's tanh post-op): the GPU's function, not its speed."""
        if approximate not in GELUS:
            raise ValueError(f"approximate must be one of {GELUS}, got {approximate!r}")
        if approximate == "tanh":
            return self._linear_bias_gelu_tanh(x, weight, bias)
        backend = op_backend(self.epilogue_backend, "bias_gelu")
        if x.device.type != "cpu" or backend in ("triton", "cuda"):
            # a GPU, or kernels asked for by name (Triton's interpreter on a CPU): the op
            return ops.bias_gelu(F.linear(x, weight), bias, backend=backend)
        if self.name == "onednn":
            return _onednn(x, weight, bias, "gelu")
        # the bias in the GEMM (addmm writes it, then accumulates onto it) and GELU in place:
        # two passes over the (tokens, 4C) activation and no temporary, where the bias_gelu op
        # (whose contract keeps its input) reads and writes it twice and allocates once more
        u = F.linear(x, weight, bias)
        return torch.ops.aten.gelu_(u)

    def _linear_bias_gelu_tanh(self, x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type == "cuda" and bias is not None:
            x2 = x.reshape(-1, x.shape[-1])
            u = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
            return u.view(*x.shape[:-1], weight.shape[0])
        if self.name == "onednn" and x.device.type == "cpu":
            return _onednn(x, weight, bias, "gelu", "tanh")
        return torch.ops.aten.gelu_(F.linear(x, weight, bias), approximate="tanh")

    def residual_addmm(self, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
        """``h += x @ weight^T`` in place (``h``: the residual stream, contiguous).

        Same dtype: one ``addmm_`` (beta = 1) on 2-D views, the residual read and written by
        the GEMM's epilogue (any library: ``aten``'s, also for ``onednn``). An fp32 ``h`` with
        16-bit operands (``residual_fp32``): ``addmm(out_dtype=float32, out=h)`` where this
        device has it (``addmm_fp32_out_available``) and no trace is being made (``tracing``),
        else the product in the operands' dtype then an fp32 ``add_`` (one rounding of the
        product more)."""
        if not h.is_contiguous():
            raise ValueError("residual_addmm: the residual stream must be contiguous")
        h2 = h.view(-1, h.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if h.dtype == x.dtype:
            h2.addmm_(x2, weight.t())
        elif not tracing() and addmm_fp32_out_available(h.device)[0]:
            torch.addmm(h2, x2, weight.t(), out_dtype=h.dtype, out=h2)
        else:
            h2.add_(x2 @ weight.t())


    def layer_norm(self, h: torch.Tensor, norm: torch.nn.LayerNorm, *,
                   feeds_gemm: bool, shift: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.layer_norm(h, norm.weight, norm.bias, norm.eps, shift=shift,
                              out_dtype=out_dtype,
                              backend=op_backend(self.epilogue_backend, "layer_norm"))

    def add_layer_norm(self, h: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
                       gamma: torch.Tensor | None, norm: torch.nn.LayerNorm, *,
                       feeds_gemm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps, delta_bias=bias,
                                  gamma=gamma,
                                  backend=op_backend(self.epilogue_backend, "add_layer_norm"))


def _seconds(fn: Callable[[], object]) -> float:
    clock = CLOCK
    t0 = clock()
    fn()
    return clock() - t0


def measure_cpu_gemm(dtype: torch.dtype, rows: int, k: int, n: int) -> dict[str, Any]:
    """Time fc1 (a ``rows x k @ k x n`` GEMM with its bias + exact GELU) in both libraries now
    (oneDNN must be available); the record ``{"choice", "timings_ms", "gflops", "shape",
    "dtype", "threads", "margin", "order"}``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    # what the fused ViT runs: fc1 with its bias and GELU
    cands = {name: functools.partial(CpuGemm(name).linear_bias_gelu, x, w, b)
             for name in PREFERENCE}
    for fn in cands.values():  # warm-up (oneDNN builds its kernel on the first call)
        fn()
    best = {name: float("inf") for name in cands}
    for _ in range(2):  # interleaved, best of each: robust to a neighbour's load
        for name, fn in cands.items():
            best[name] = min(best[name], _seconds(fn))
    timings = {name: s * 1e3 for name, s in best.items()}
    margin = timed_choice.near_tie_margin("cpu")
    flop = 2 * rows * k * n
    return {"choice": timed_choice.pick(timings, PREFERENCE, margin), "timings_ms": timings,
            "gflops": {name: round(flop / max(s, 1e-12) / 1e9, 1) for name, s in best.items()},
            "shape": [rows, k, n], "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "margin": margin, "order": list(PREFERENCE)}


def describe(record: dict[str, Any]) -> str:
    """The engine's ``status()["cpu_gemm"]`` words for a choice record."""
    rows, k, n = record["shape"]
    rates = ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in record["gflops"].items())
    return (f"{record['choice']}: measured {rates} ({rows}x{k} @ {k}x{n}, {record['dtype']}, "
            f"{record['threads']} threads; ties within {record['margin']:.0%} go to aten); "
            f"{timed_choice.source_words(record)}")


def decide_cpu_gemm(dtype: torch.dtype, rows: int, k: int, n: int) -> dict[str, Any]:
    """The library for this dtype and GEMM shape: measured once per process, stored per device
    (``fast/timed_choice.py``); oneDNN must be available (:func:`onednn_linear_available`)."""

    def usable(stored: dict[str, Any]) -> str | None:
        if stored["choice"] not in PREFERENCE:
            return "not a CPU GEMM library of this version"
        if stored["choice"] == "onednn" and not onednn_linear_available(dtype)[0]:
            return f"oneDNN unavailable ({onednn_linear_available(dtype)[1]})"
        return None

    key = f"{rows}x{k}x{n} {str(dtype).removeprefix('torch.')}"
    return timed_choice.decide("cpu_gemm", "cpu", key, key,
                               lambda: measure_cpu_gemm(dtype, rows, k, n), usable)


def choose_cpu_gemm(option: str, dtype: torch.dtype, *, k: int = 1024, n: int = 4096,
                    rows: int = 4 * 577) -> tuple[str, str]:
    """``(library, why)`` for ``FastOptions.cpu_gemm`` = ``option`` on a CPU in ``dtype``.

    ``auto`` times one fc1-shaped GEMM with its bias + GELU in both libraries (once per
    process, dtype and shape, stored per device and thread count: :func:`decide_cpu_gemm`;
    about a second for the official ViT-L on 2 cores).
    """
    if option not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {option!r}")
    if option == "aten":
        return "aten", "aten: chosen by the option"
    if option == "onednn":
        ok, why = onednn_linear_available(dtype)
        if not ok:
            raise RuntimeError(f"cpu_gemm='onednn' cannot run in {dtype}: {why}")
        return "onednn", "onednn: chosen by the option"
    ok, why = onednn_linear_available(dtype)
    if not ok:
        return "aten", f"aten: oneDNN unavailable ({why})"
    record = decide_cpu_gemm(dtype, rows, k, n)
    return record["choice"], describe(record)
