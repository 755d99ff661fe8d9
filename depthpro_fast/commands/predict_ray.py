"""``depthpro-fast predict --ray [ADDRESS] ...``: ``predict`` on a Ray cluster.

The options are ``predict``'s (checked by it first); the work is ``depthpro_fast.ray_data``'s
pipeline (one model per actor, outputs written by the actors, atomically, under ``-o``), the
summary ``predict``'s. Needs the ``ray`` extra: ``pip install .[ray]``.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

RAY_HINT = "predict --ray needs Ray Data: pip install 'ray[data]' (or this package's [ray] extra)"
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.-]+:\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster (docs/ray.md): no ADDRESS = a new local "
                             "cluster (or $RAY_ADDRESS), auto = the cluster `ray start` runs "
                             "here, HOST:PORT or ray://HOST:10001 = a remote one; inputs may be "
                             "URIs (s3://, gs://, file://); -o must be a folder every node sees. "
                             "Put it after the paths or give the ADDRESS")
    parser.add_argument("--ray-actors", type=int, default=None, metavar="N",
                        help="with --ray: model actors (default: one per GPU, or one per CPU "
                             "without GPUs)")


def check_address(address: str) -> str | None:
    """``--ray``'s value -> ``ray_data.run``'s ``address`` (None: local or $RAY_ADDRESS)."""
    if address == "":
        return None
    if not _ADDRESS.match(address):
        raise ValueError(f"--ray {address}: not a cluster address; give auto, local, HOST:PORT "
                         "or ray://HOST:PORT, or no ADDRESS (put --ray after the paths, or "
                         "`--ray auto`, so that it does not take a path)")
    return address


def run(args: argparse.Namespace, formats: list[str], checkpoint: str | None, *,
        ply: Any, seed: int | None, intrinsics: Any = None) -> int:
    """The ``--ray`` branch of ``predict.run`` (arguments already checked there)."""
    from .predict import RANDOM_WEIGHTS_NOTE, format_summary
    from .predict_resume import recomputed_lines

    address = check_address(args.ray)
    if args.ray_actors is not None and args.ray_actors < 1:
        raise ValueError(f"--ray-actors must be >= 1, got {args.ray_actors}")
    try:
        from .. import ray_data
    except ImportError as e:  # a RuntimeError: the command reports it in one line
        raise RuntimeError(f"{RAY_HINT} ({e})") from None
    options = ray_data.PredictOptions(
        outdir=args.outdir, formats=tuple(formats), checkpoint=checkpoint, config=args.config,
        device=args.device, dtype=args.dtype, backend=args.backend, fast=args.fast,
        batch_size=args.batch_size, f_px=args.f_px, ignore_exif=args.ignore_exif,
        overwrite=args.overwrite, ply_stride=ply.stride, ply_max_points=ply.max_points,
        ply_binary=ply.binary, npz_compress=args.npz_compress, seed=seed,
        intrinsics=intrinsics, workers=args.workers)
    if checkpoint is None:
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    summary = ray_data.run(args.paths, options, address=address, recursive=args.recursive,
                           concurrency=args.ray_actors, quiet=args.quiet)
    for line in recomputed_lines(summary.recomputed):  # why work that looked done is redone
        print(f"depthpro-fast predict: {line}", file=sys.stderr)
    head = "ray: " if summary.written or summary.failed else \
        "ray: nothing left to do (--overwrite recomputes); "
    print(head + format_summary(summary, args.outdir))
    if summary.interrupted:
        return 130
    return 1 if summary.failed or summary.missing else 0
