"""``predict --ray`` on a local cluster against single-process ``predict``, same images.

    python bench/ray_vs_predict.py --images 52 [--actors 2] [--config tiny]

Makes N small synthetic photos, then runs each command (random weights) in a fresh process
and samples, every 0.25 s, the proportional memory (PSS, so pages shared between Ray's
processes count once) of the command's whole process tree (Ray's GCS, raylet and workers are
its descendants) and the number of depth files written. Reports: wall time, start-up (until
the first output exists: interpreter, Ray start, actor start, model load, first image),
images/s after that, and the peak memory. Prints a markdown table (docs/ray.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def measure(cmd: list[str], outdir: Path, n: int) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, first, last = 0, None, None
    while proc.poll() is None:
        peak = max(peak, pss_bytes(tree(proc.pid)))
        done = sum(1 for _ in outdir.rglob("*.npz")) if outdir.exists() else 0
        now = time.perf_counter() - start
        if done and first is None:
            first = now
        if done >= n and last is None:
            last = now
        time.sleep(0.25)
    wall = time.perf_counter() - start
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log}")
    last = last or wall
    first = first or wall
    return {"wall_s": wall, "startup_s": first,
            "steady_img_s": (n - 1) / (last - first) if last > first else float("nan"),
            "overall_img_s": n / wall, "peak_pss_gib": peak / 2**30, "log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=52)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--size", default="64x48", help="WxH of the synthetic photos")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    w, h = map(int, args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "in" / f"{i:04d}.jpg")
    base = [sys.executable, "-m", "depthpro_fast.cli", "predict", str(root / "in"),
            "--random-weights", "--config", args.config, "--save", "npz"]
    rows = {
        "predict (1 process)": measure(base + ["-o", str(root / "single"), "--quiet"],
                                       root / "single", args.images),
        f"predict --ray ({args.actors} CPU actors)": measure(
            base + ["-o", str(root / "ray"), "--ray", "--ray-actors", str(args.actors)],
            root / "ray", args.images),
    }
    print(f"{args.images} images {args.size}, config {args.config}\n")
    print("| run | wall s | start-up s (to first output) | images/s after it | "
          "images/s overall | peak memory (PSS, GiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['steady_img_s']:.3f} | "
              f"{r['overall_img_s']:.3f} | {r['peak_pss_gib']:.2f} |")
    for name, r in rows.items():
        print(f"\n--- {name}: last lines of its output\n" + "\n".join(
            r["log"].strip().splitlines()[-4:]))


if __name__ == "__main__":
    main()
