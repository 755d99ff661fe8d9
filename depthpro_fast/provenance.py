"""Where an output came from: the record every ``predict`` output carries, and the resume rule.

A **recipe** says how a run makes its outputs: the weights (a checkpoint's identity, or random
weights and their seed), the network config, the precision, the path (fast or reference), the
focal-length request (given value, EXIF-or-estimate, estimate only; camera intrinsics have a
field of their own) and, for information, the backend, device and package version. Each output
file stores the recipe together with what belongs to its image (the input file's identity, the
focal length used and its source) and to its format (the PLY stride): the **record**, a JSON
object (see ``docs/cli.md``).

A rerun skips an image only when every requested output exists and its record matches what the
run would make (:func:`mismatch`); otherwise the image is computed again and the reason counted
(``"3 images were made with random weights: recomputed"``). Compared: ``COMPARED`` plus the
input image and the per-format options. Not compared (recorded for the reader): the backend,
the device, the batch size and the package version (they change results only by float
rounding; ``--overwrite`` recomputes after an upgrade). A record of another ``FORMAT``, or a
file without one (written by an older version or another program), never counts as a match.

Checkpoint identity (:func:`file_fingerprint`): the size and a SHA-256 over the size, the
first and last 4 MiB and 32 blocks of 64 KiB spread evenly over the rest (10 MiB read, about
10 ms, whatever the file's size; files up to 16 MiB are hashed whole). No cache and no mtime: a
copied or moved checkpoint keeps its identity, and a 1.9 GB file costs the same as a small one.
In PyTorch's zip format the last chunk holds the archive's central directory with a CRC-32 of
every tensor record, so any change of any tensor changes the fingerprint; a safetensors file
keeps names, shapes and offsets in its first chunk, and a fine-tune changes nearly every tensor,
which the spread blocks see. It is written ``sha256s`` (sampled) so that it is never mistaken
for the SHA-256 of the whole file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: layout version of the record; a record of another version never matches
FORMAT = 1
#: the fields of a recipe that a rerun compares, in the order the reasons are looked for
COMPARED = ("weights", "checkpoint_id", "seed", "config_id", "dtype", "path", "focal", "f_px",
            "intrinsics")

_HEAD_TAIL = 4 << 20
_BLOCK = 64 << 10
_BLOCKS = 32
_WHOLE_LIMIT = 16 << 20


def _hash_file(path: Path, sampled: bool) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if not sampled:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(_HEAD_TAIL))
        span = size - 2 * _HEAD_TAIL - _BLOCK
        for i in range(_BLOCKS):  # evenly spread over the middle
            f.seek(_HEAD_TAIL + span * i // max(_BLOCKS - 1, 1))
            h.update(f.read(_BLOCK))
        f.seek(size - _HEAD_TAIL)
        h.update(f.read(_HEAD_TAIL))
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """``"<size> bytes sha256:<16 hex>"`` (whole file up to 16 MiB) or ``"<size> bytes
    sha256s:<16 hex>"`` (sampled, see the module docstring); for a folder (a Hugging Face
    DepthPro-hf checkpoint) the fingerprint of its weight and index files together."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix in (".safetensors", ".json", ".pt", ".bin"))
        if not files:
            raise FileNotFoundError(f"checkpoint folder {path} holds no weight files")
        parts = [f"{p.name}={file_fingerprint(p)}" for p in files]
        size = sum(p.stat().st_size for p in files)
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        return f"{size} bytes folder-sha256:{digest}"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    sampled = size > _WHOLE_LIMIT
    return f"{size} bytes {'sha256s' if sampled else 'sha256'}:{_hash_file(path, sampled)[:16]}"


def config_identity(config: Any) -> tuple[str, str]:
    """``(name, id)`` of a config (anything ``resolve_config`` accepts): the preset name, the
    JSON file's name or ``"custom"``, and a hash of the resolved knobs (what is compared)."""
    from .config import PRESETS, resolve_config

    cfg = resolve_config(config)
    knobs = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    ident = hashlib.sha256(knobs.encode()).hexdigest()[:12]
    name = next((n for n, p in PRESETS.items() if p == cfg), None)
    if name is None:
        name = Path(config).name if isinstance(config, (str, os.PathLike)) else "custom"
    return name, ident


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a run makes its outputs (see the module docstring)."""

    weights: str  # "checkpoint" or "random"
    checkpoint: str | None  # the file read (informational: the identity is compared)
    checkpoint_id: str | None  # file_fingerprint of it
    seed: int | None  # random weights: the seed (None: unseeded, never matches)
    config: str  # preset or file name
    config_id: str  # hash of the resolved knobs
    dtype: str  # float32, float16, bfloat16 or fp8
    path: str  # "fast" or "reference"
    focal: str  # "given", "exif-or-estimated" or "estimated"
    f_px: float | None = None  # the given focal length (focal == "given")
    intrinsics: list[float] | None = None  # fx, fy, cx, cy when given (K in the outputs)
    backend: str = "auto"  # informational
    device: str = "cpu"  # informational
    package: str = ""  # informational

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}


def make_recipe(checkpoint: str | os.PathLike | None, *, config: Any, dtype: str, fast: bool,
                f_px: float | None = None, ignore_exif: bool = False, seed: int | None = 0,
                backend: str = "auto", device: Any = "cpu",
                intrinsics: list[float] | None = None) -> Recipe:
    """The recipe of a run; ``checkpoint`` is a resolved path (never "auto") or None."""
    from . import __version__
    from .api import DTYPES, is_bf16_mixed, is_fp8

    name, ident = config_identity(config)
    dt = ("fp8" if is_fp8(dtype) else "bf16-mixed" if is_bf16_mixed(dtype)
          else str(DTYPES.get(dtype, dtype)).removeprefix("torch."))
    if intrinsics is not None:
        focal = "given"
    elif f_px is not None:
        focal = "given"
    else:
        focal = "estimated" if ignore_exif else "exif-or-estimated"
    return Recipe(
        weights="random" if checkpoint is None else "checkpoint",
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
        checkpoint_id=None if checkpoint is None else file_fingerprint(checkpoint),
        seed=seed if checkpoint is None else None, config=name, config_id=ident, dtype=dt,
        path="fast" if fast else "reference", focal=focal,
        f_px=None if f_px is None else float(f_px),
        intrinsics=None if intrinsics is None else [float(v) for v in intrinsics],
        backend=str(backend), device=str(device), package=__version__)


# ----------------------------------------------------------------------------------------------
# the input image
# ----------------------------------------------------------------------------------------------


def input_identity(path: str | os.PathLike) -> dict[str, Any]:
    """The input file as recorded: name, size, mtime (ns) and the SHA-256 of its bytes."""
    path = Path(path)
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": _hash_file(path, sampled=False)}


def same_input(recorded: Mapping[str, Any] | None, path: str | os.PathLike) -> bool:
    """Whether ``path`` still holds the recorded bytes: same size, and same mtime or (when
    touched or copied) the same SHA-256. The hash is read only when the mtime differs."""
    if not isinstance(recorded, Mapping):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_size != recorded.get("size"):
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    return _hash_file(Path(path), sampled=False) == recorded.get("sha256")


# ----------------------------------------------------------------------------------------------
# the resume rule
# ----------------------------------------------------------------------------------------------


def _focal_words(record: Mapping[str, Any]) -> str:
    if record.get("intrinsics") is not None:
        return "intrinsics " + ",".join(f"{v:g}" for v in record["intrinsics"])
    if record.get("focal") == "given":
        return f"--f-px {record.get('f_px'):g}"
    return {"estimated": "the estimated focal length (--ignore-exif)",
            "exif-or-estimated": "the EXIF focal length or the estimate"}.get(
                str(record.get("focal")), str(record.get("focal")))


def mismatch(record: Mapping[str, Any] | None, recipe: Recipe,
             extra: Mapping[str, Any] | None = None) -> str | None:
    """None when an output with ``record`` is what ``recipe`` (and the format options
    ``extra``) would make; otherwise the reason, worded to follow "made with"."""
    if not isinstance(record, Mapping):
        return "no record of what made its outputs (an older version or another program)"
    if record.get("format") != FORMAT:
        return f"record format {record.get('format')!r} (now {FORMAT})"
    want = recipe.as_dict()
    for key in COMPARED:
        old, new = record.get(key), want[key]
        if old == new and not (key == "seed" and new is None and want["weights"] == "random"):
            continue
        if key == "weights":
            return ("random weights" if old == "random"
                    else f"{old or 'unknown'} weights (now {new} weights)")
        if key == "checkpoint_id":
            return f"another checkpoint ({record.get('checkpoint')}, {old})"
        if key == "seed":
            return (f"random weights of seed {old} (now "
                    f"{'unseeded' if new is None else new})")
        if key == "config_id":
            return (f"config {record.get('config')} (now {recipe.config})"
                    if record.get("config") != recipe.config
                    else f"another version of config {recipe.config}")
        if key == "dtype":
            return f"dtype {old} (now {new})"
        if key == "path":
            return f"the {old} path (now the {new} path)"
        # focal, f_px, intrinsics: one request
        return f"{_focal_words(record)} (now {_focal_words(want)})"
    for key, new in (extra or {}).items():
        if record.get(key) != new:
            return f"{key.replace('_', ' ')} {record.get(key)} (now {new})"
    return None
