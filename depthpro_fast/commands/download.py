"""``depthpro-fast download``: fetch Apple's ``depth_pro.pt`` into the user cache.

Resumable (a ``.part`` file and an HTTP Range request), verified (the server's announced size
always; ``--size`` / ``--sha256`` when given) and atomic. ``load("auto")`` and ``predict`` find
the file in the default destination without further options.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..checkpoint import CHECKPOINT_URL, cache_dir

    parser.add_argument("--dest", default=None,
                        help=f"folder to put the file in (default: the user cache, {cache_dir()})")
    parser.add_argument("--url", default=CHECKPOINT_URL, help=f"(default: {CHECKPOINT_URL})")
    parser.add_argument("--sha256", default=None,
                        help="expected SHA-256 of the file (64 hex digits)")
    parser.add_argument("--size", type=int, default=None, help="expected size in bytes")
    parser.add_argument("--force", action="store_true",
                        help="download again even if the file is already there")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CHECKPOINT_NAME, CHECKPOINT_URL, ENV_VAR, cache_dir
    from ..download import OFFICIAL_SHA256, OFFICIAL_SIZE, download

    official = args.url == CHECKPOINT_URL
    sha256 = args.sha256 if args.sha256 is not None else (OFFICIAL_SHA256 if official else None)
    size = args.size if args.size is not None else (OFFICIAL_SIZE if official else None)
    path = download(args.url, args.dest, expected_size=size, expected_sha256=sha256,
                    progress=not args.quiet, force=args.force)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)"
          + ("" if sha256 else ", size checked (no SHA-256 to compare with)"))
    in_cache = path.parent.resolve() == cache_dir().resolve()
    if path.name == CHECKPOINT_NAME and not in_cache:
        print(f"load('auto') looks in the user cache; for this place set {ENV_VAR}={path}")
    return 0
