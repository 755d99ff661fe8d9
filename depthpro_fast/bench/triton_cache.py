"""A Triton cache compiled offline for sm_90, carried to the GPU machine, and its hit count.

Triton (3.6) looks a compiled kernel up on disk under ``sha256(key)``, where ``key`` is
``triton_key()`` (Triton's version and the sha256 of its compiler / backend / language Python
files and of ``libtriton.so``, which is built per Python version), the kernel's source hash
(its source, line number, global constexprs, specialisation, constants), the backend's hash
(the bundled ``ptxas --version`` and the arch, 90), the options (libdevice hashed by content,
not by path) and the cache-invalidating environment variables that are set (``TRITON_CACHE_*``
and ``TRITON_STORE_BINARY_ONLY`` are not among them). Nothing in it names the machine or the
driver, so a cache compiled without a GPU (``python -m depthpro_fast.triton.aot``, which
compiles every launch through Triton's own ``JITFunction.run(warmup=True)`` for
``GPUTarget("cuda", 90, 32)``) hits on an H100 when the Triton install is byte-identical, which
means the same wheel **for the same Python version**: Triton 3.6.0's cp311 and cp312
``libtriton.so`` differ, so a cache made under Python 3.11 misses under the GPU's 3.12.

Two more things stop a copied cache from hitting: each group file (``__grp__<name>.json``)
lists its files by **absolute** path, and Triton drops the paths that do not exist; ``install``
rewrites them for the new folder. ``export`` keeps what a launch loads (the ``.cubin`` and the
metadata ``.json``, what ``TRITON_STORE_BINARY_ONLY=1`` keeps; the IRs are 5/6 of the bytes)
and writes ``manifest.json`` with the key parts of the Triton that compiled it, which
``install`` compares with the Triton where it runs, saying which part differs.

    python -m depthpro_fast.bench.triton_cache export CACHE_DIR OUT_DIR   # after the AOT step
    python -m depthpro_fast.bench.triton_cache install CARRIED TRITON_CACHE_DIR
    python -m depthpro_fast.bench.triton_cache count LOG       # hits / misses of a run

``count`` reads the log that ``depthpro_fast.bench.triton_cache_counter.CountingCacheManager``
(``TRITON_CACHE_MANAGER``) writes: one line per kernel compile lookup, ``hit`` or ``miss``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What a launch needs from a cache entry (the rest are IRs, for debugging and dumps).
KEPT_SUFFIXES = (".cubin", ".hsaco", ".json")
MANIFEST = "manifest.json"
#: The target the AOT step compiles for (an H100 / H200).
TARGET_ARCH = 90
#: Where the counting cache manager writes its lines (set by bench/gpu_check.sh).
LOG_ENV = "DEPTHPRO_FAST_TRITON_CACHE_LOG"


def key_parts(arch: int = TARGET_ARCH) -> dict[str, Any]:
    """The parts of Triton's cache key that do not depend on the kernel, here (hashed)."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    backend = make_backend(GPUTarget("cuda", arch, 32)).hash()
    return {"triton": triton.__version__, "python": platform.python_version(),
            "triton_key": sha(triton_key()), "backend": sha(backend),
            "ptxas": next((line.strip()[:120] for line in backend.splitlines()
                           if "release" in line), backend.strip()[-120:]),
            "arch": arch, "env": dict(sorted(get_cache_invalidating_env_vars().items()))}


def _groups(cache: Path) -> list[tuple[Path, Path]]:
    """(entry folder, its group file) of every compiled kernel in a Triton cache folder."""
    return [(g.parent, g) for g in sorted(cache.glob("*/__grp__*.json"))]


def export(cache: Path, out: Path, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the loadable part of every compiled kernel of ``cache`` to ``out`` (the group
    files list their files by name only) and write the manifest; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    kernels, size = 0, 0
    for entry, grp in _groups(cache):
        children = json.loads(grp.read_text()).get("child_paths") or {}
        kept = {name: name for name in children if name.endswith(KEPT_SUFFIXES)}
        if not any(n.endswith((".cubin", ".hsaco")) for n in kept):
            continue  # no binary: not a kernel a launch can load (an autotune result, say)
        dst = out / entry.name
        dst.mkdir(exist_ok=True)
        for name in kept:
            shutil.copyfile(entry / name, dst / name)
            size += (dst / name).stat().st_size
        (dst / grp.name).write_text(json.dumps({"child_paths": kept}))
        kernels += 1
    manifest = {**(parts or key_parts()), "kernels": kernels, "bytes": size,
                "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "from": str(cache)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def install(carried: Path, cache: Path, parts: dict[str, Any] | None = None) -> list[str]:
    """Copy a carried cache into ``cache`` (TRITON_CACHE_DIR) with its group files pointing at
    the copies; returns the lines that say what was installed and whether it can hit here."""
    manifest_path = carried / MANIFEST
    if not manifest_path.is_file():
        return [f"carried Triton cache {carried}: no {MANIFEST} (not made by `triton_cache "
                "export`): not used"]
    made = json.loads(manifest_path.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    copied = 0
    for entry, grp in _groups(carried):
        dst = cache / entry.name
        if (dst / grp.name).exists():
            continue  # already there (compiled here, or installed before)
        dst.mkdir(exist_ok=True)
        children = json.loads(grp.read_text()).get("child_paths") or {}
        for name in children:
            shutil.copyfile(entry / name, dst / name)
        paths = {name: str((dst / name).resolve()) for name in children}
        tmp = dst / f"{grp.name}.tmp"
        tmp.write_text(json.dumps({"child_paths": paths}))
        os.replace(tmp, dst / grp.name)  # the group last: a half copy is never a hit
        copied += 1
    lines = [f"carried Triton cache: {copied} of {made.get('kernels', '?')} kernels installed "
             f"in {cache} (compiled {made.get('made', '?')} by Triton {made.get('triton')} "
             f"under Python {made.get('python')} for sm_{made.get('arch')})"]
    try:
        here = parts or key_parts(int(made.get("arch", TARGET_ARCH)))
    except Exception as e:  # noqa: BLE001  (no Triton, or another layout: say so)
        return lines + [f"  key check: could not read this Triton's key ({type(e).__name__}: "
                        f"{e}): hits unknown"]
    lines += check_lines(made, here)
    return lines


def check_lines(made: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Which key part differs between the carried cache and this Triton, and what follows."""
    why = {"triton_key": "Triton's files or libtriton differ (another Triton version, build "
                         f"or Python: carried {made.get('triton')} / Python "
                         f"{made.get('python')}, here {here.get('triton')} / Python "
                         f"{here.get('python')})",
           "backend": f"ptxas or arch differ (carried {made.get('ptxas')!r}, here "
                      f"{here.get('ptxas')!r}; TRITON_PTXAS_PATH?)",
           "env": f"cache-invalidating variables differ (carried {made.get('env')}, here "
                  f"{here.get('env')})"}
    differ = [k for k in why if made.get(k) != here.get(k)]
    if not differ:
        return ["  key check: triton_key, ptxas + arch and environment match: expect hits "
                "(kernels the AOT step did not see still compile here)"]
    return [f"  key check: {k} DIFFERENT: {why[k]}" for k in differ] + [
        "  -> expect misses: every kernel compiles here as without the carried cache"]


def count(log: Path) -> tuple[int, int]:
    """(hits, misses) in a counting cache manager's log (missing log: nothing compiled)."""
    if not log.is_file():
        return 0, 0
    words = [line.split(" ", 1)[0] for line in log.read_text().splitlines()]
    return words.count("hit"), words.count("miss")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m depthpro_fast.bench.triton_cache",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="a Triton cache -> a carried folder (binaries only)")
    e.add_argument("cache", type=Path)
    e.add_argument("out", type=Path)
    i = sub.add_parser("install", help="a carried folder -> TRITON_CACHE_DIR (paths rewritten)")
    i.add_argument("carried", type=Path)
    i.add_argument("cache", type=Path)
    c = sub.add_parser("count", help="hits and misses of a counting cache manager's log")
    c.add_argument("log", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "export":
        if not args.cache.is_dir():
            print(f"triton_cache export: {args.cache} is not a folder", file=sys.stderr)
            return 2
        m = export(args.cache, args.out)
        print(f"exported {m['kernels']} kernels ({m['bytes'] / 2**20:.1f} MiB) to {args.out}: "
              f"Triton {m['triton']}, Python {m['python']}, sm_{m['arch']}")
        return 0 if m["kernels"] else 1
    if args.cmd == "install":
        if not args.carried.is_dir():
            print(f"carried Triton cache {args.carried}: not found (none carried): kernels "
                  "compile here")
            return 1
        print("\n".join(install(args.carried, args.cache)))
        return 0
    hits, misses = count(args.log)
    print(f"Triton cache: {hits} hits, {misses} misses (compiled in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
