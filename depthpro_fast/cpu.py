"""What this CPU can do fast: bf16 / fp16 arithmetic, and the dtype a CPU forward should use.

PyTorch runs bf16 matmuls and convolutions on a CPU through oneDNN. They are fast only where
the CPU has bf16 instructions: AVX512_BF16 or AMX-BF16 on x86, the BF16 extension on Arm.
Elsewhere oneDNN (or PyTorch's own loops) converts every element to fp32 and back, and bf16
runs much slower than fp32. Measured on a 2-core AMD EPYC with AVX2 only and torch 2.13: a
(2308 x 1024) @ (1024 x 1024) matmul ran at 7 GFLOP/s in bf16 against 70 in fp32. fp16 needs
AVX512_FP16 or AMX-FP16 and is about 7x slower than fp32 without them.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's vector capability and half-precision arithmetic (``info()`` reports it)."""

    capability: str  # what PyTorch dispatches to: "AVX512", "AVX2", "DEFAULT", ... or "NEON"
    bf16: bool  # native bf16 dot products (AVX512_BF16, AMX-BF16, Arm BF16)
    fp16: bool  # native fp16 arithmetic (AVX512_FP16, AMX-FP16, Arm FP16)
    bf16_why_not: str | None
    fp16_why_not: str | None

    def as_dict(self) -> dict:
        return asdict(self)


# CPU feature flags (/proc/cpuinfo: x86 "flags", Arm "Features") that give native arithmetic
NATIVE_FLAGS = {torch.float16: ("avx512_fp16", "amx_fp16", "fphp", "asimdhp"),
                torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16", "svebf16")}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (read once), or None where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def proc_kib_field(path: str, key: str) -> int | None:
    """A ``Key:  N kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in
    bytes, or None where the file or the key is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def native_from_flags(dtype: torch.dtype, flags: frozenset[str]) -> bool:
    """Whether ``flags`` include arithmetic for ``dtype`` (fp16 / bf16)."""
    return any(f in flags for f in NATIVE_FLAGS.get(dtype, ()))


def _torch_probe(name: str) -> bool | None:
    fn = getattr(torch.cpu, name, None)  # private probes of torch.cpu (present in torch >= 2.3)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001  (a probe that fails says nothing)
        return None


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """Probe once: PyTorch's own CPU checks, else /proc/cpuinfo's flags."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001
        capability = "unknown"
    flags = cpu_flags() or frozenset()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    bf16 = native_from_flags(torch.bfloat16, flags)
    fp16 = native_from_flags(torch.float16, flags)
    if arm:
        bf16_missing, fp16_missing = "the Arm BF16 extension", "the Arm FP16 extension"
    else:
        # PyTorch's own probes (cpuinfo) work where /proc/cpuinfo does not exist
        probes = [_torch_probe("_is_avx512_bf16_supported"), _torch_probe("_is_amx_tile_supported")]
        bf16 = bf16 or any(bool(p) for p in probes)
        fp16 = fp16 or bool(_torch_probe("_is_amx_fp16_supported"))
        bf16_missing, fp16_missing = "AVX512_BF16 or AMX-BF16", "AVX512_FP16 or AMX-FP16"
    name = f"this CPU ({capability})"
    return CpuFeatures(
        capability=capability, bf16=bf16, fp16=fp16,
        bf16_why_not=None if bf16 else (
            f"{name} has no {bf16_missing}: bf16 is converted to fp32 and back for every "
            "operation and runs several times slower than fp32"),
        fp16_why_not=None if fp16 else (
            f"{name} has no {fp16_missing}: fp16 runs about 7x slower than fp32"))


def half_precision_warning(dtype: torch.dtype) -> str | None:
    """Why ``dtype`` is a slow choice on this CPU (None when it is not, or for fp32)."""
    f = cpu_features()
    if dtype == torch.bfloat16 and not f.bf16:
        return f"{f.bf16_why_not}; use float32 on this machine"
    if dtype == torch.float16 and not f.fp16:
        return (f"{f.fp16_why_not}; use float32"
                + (" or bfloat16 (this CPU has bf16 arithmetic)" if f.bf16 else ""))
    return None


def cpu_default_precision(fast: bool = True) -> str:
    """``dtype="auto"`` on this CPU: ``"bf16-mixed"`` where it has bf16 arithmetic and the fast
    path runs (an fp32 model whose GEMMs and convolutions take bf16 inputs: the bf16 speed of
    the arithmetic at fp32-level accuracy, MARE about 1e-5), ``"bfloat16"`` there on the
    reference path (which has no mixed mode), else ``"float32"``."""
    if not cpu_features().bf16:
        return "float32"
    return "bf16-mixed" if fast else "bfloat16"


def fastest_cpu_dtype() -> torch.dtype:
    """The dtype a CPU forward should use by default: bf16 where the CPU has bf16 arithmetic
    (within the bf16 accuracy budget of ``depthpro_fast.accuracy``), else fp32."""
    return torch.bfloat16 if cpu_features().bf16 else torch.float32
