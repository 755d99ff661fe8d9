"""Choices made on one device, remembered on disk for that device and version set.

Some decisions can only be made by running code on the user's machine: which attention kernel
is fastest for a shape (``fast/attention_choice.py``), whether a custom kernel computes the
right thing on this GPU at all (kernel qualification). Each is made once, stored here, and
reused by every later process on the same device with the same software, so that

- a second process pays nothing for the decision, and
- two models built from the same weights make the same choice, so give bitwise the same output.

A cache file is keyed by a **fingerprint** of everything that can change the decision: the
device (GPU name, compute capability, driver; or the CPU model and its thread count), the
versions of torch, CUDA, cuDNN, Triton and this package, and a hash of the kernel sources
(``depthpro_fast/triton``, ``kernels/``, ``csrc/``): an edited kernel is qualified again.
Entries inside a file are keyed by the caller (e.g. ``"attention 35x16x577x64 bfloat16"``).

Where: ``$DEPTHPRO_FAST_DEVICE_CACHE`` if set (``off`` turns the disk cache off: every process
decides afresh, still once per process), else ``<user cache>/device/`` (next to the checkpoint
cache, ``~/.cache/depthpro_fast/device``). Files are JSON, written atomically (a temporary file
renamed over the old one, under an ``fcntl`` lock where the platform has it), so concurrent
processes never read half a file; a damaged file is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ENV_VAR = "DEPTHPRO_FAST_DEVICE_CACHE"
#: bumped when the layout of the entries changes (old files are then ignored)
FORMAT = 1

_PACKAGE = Path(__file__).resolve().parent
#: the sources whose edit invalidates every stored kernel decision
KERNEL_SOURCE_DIRS = (_PACKAGE / "triton", _PACKAGE / "cuda", _PACKAGE.parent / "kernels",
                      _PACKAGE.parent / "csrc")

_MEMORY: dict[tuple[str, str], dict[str, Any]] = {}  # (file name, entry) -> value, per process
_LOCK = threading.Lock()


def cache_root() -> Path | None:
    """The folder of the device cache files, or None when the disk cache is off."""
    value = os.environ.get(ENV_VAR)
    if value is not None and value.strip().lower() in ("off", "0", "none", "false", ""):
        return None
    if value:
        return Path(value).expanduser()
    from .checkpoint import cache_dir

    return cache_dir() / "device"


@functools.cache
def kernel_sources_hash() -> str:
    """A short hash of every kernel source file (Triton, CUDA, C++ glue) of this checkout."""
    h = hashlib.sha256()
    for folder in KERNEL_SOURCE_DIRS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".cu", ".cuh", ".cpp", ".h") and path.is_file():
                h.update(str(path.relative_to(folder.parent)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def _driver_version() -> str:
    """The NVIDIA driver version (pynvml, else nvidia-smi), or "unknown"."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001  (optional: nvidia-smi below)
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def dist_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device: torch.device | str) -> dict[str, Any]:
    """Everything about ``device`` and the software that a stored decision depends on."""
    from . import __version__

    device = torch.device(device)
    fp: dict[str, Any] = {
        "format": FORMAT,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": dist_version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "depthpro_fast": __version__,
        "kernel_sources": kernel_sources_hash(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        fp.update(device=p.name, capability=f"{p.major}.{p.minor}", driver=_driver_version())
    else:
        fp.update(device=cpu_name(), threads=torch.get_num_threads())
    return fp


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short, file-name-safe id of a fingerprint."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps readers safe
        yield
        return
    with open(path.with_suffix(".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class DeviceCache:
    """The stored decisions of one kind (``name``) for one device and version set.

    ``get(key)`` returns the stored value (a JSON-able dict) or None; ``put(key, value)``
    stores it in this process at once and on disk (atomically; a disk that cannot be written
    is reported by ``disk_error`` and otherwise ignored: the decision is still kept in memory).
    """

    def __init__(self, name: str, device: torch.device | str):
        if not name.replace("_", "").isalnum():
            raise ValueError(f"a device cache name is letters, digits and '_', got {name!r}")
        self.name = name
        self.fingerprint = device_fingerprint(device)
        self.id = fingerprint_id(self.fingerprint)
        self.file_name = f"{name}-{self.id}.json"
        root = cache_root()
        self.path: Path | None = None if root is None else root / self.file_name
        self.disk_error: str | None = None

    def _read_disk(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # damaged or half-written by a crashed writer: rewritten by the next put
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        with _LOCK:
            hit = _MEMORY.get((self.file_name, key))
        if hit is not None:
            return hit
        value = self._read_disk().get(key)
        if isinstance(value, dict):
            with _LOCK:
                _MEMORY[(self.file_name, key)] = value
            return value
        return None

    def entries(self) -> dict[str, Any]:
        """Every stored entry (disk and this process)."""
        out = dict(self._read_disk())
        with _LOCK:
            out.update({k: v for (f, k), v in _MEMORY.items() if f == self.file_name})
        return out

    def put(self, key: str, value: dict[str, Any]) -> None:
        json.dumps(value)  # refuse what cannot be stored before anything is kept
        with _LOCK:
            _MEMORY[(self.file_name, key)] = value
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path):
                entries = self._read_disk()
                entries[key] = value
                data = {"fingerprint": self.fingerprint, "entries": entries}
                fd, tmp = tempfile.mkstemp(prefix=f".{self.file_name}.", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self.disk_error = None
        except OSError as e:
            self.disk_error = f"{type(e).__name__}: {e}"

    def forget(self, key: str | None = None) -> None:
        """Drop one entry (or all of this cache) from memory and disk."""
        with _LOCK:
            for k in [k for k in _MEMORY if k[0] == self.file_name and key in (None, k[1])]:
                del _MEMORY[k]
        if self.path is None or not self.path.is_file():
            return
        if key is None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        with contextlib.suppress(OSError), _file_lock(self.path):
            entries = self._read_disk()
            if entries.pop(key, None) is not None:
                data = {"fingerprint": self.fingerprint, "entries": entries}
                fd, tmp = tempfile.mkstemp(prefix=f".{self.file_name}.", dir=self.path.parent)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)


def clear_memory() -> None:
    """Forget every decision held in this process (tests; the disk files stay)."""
    with _LOCK:
        _MEMORY.clear()
