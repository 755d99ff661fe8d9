"""``predict``'s resume rule: which images a rerun skips, which it computes again, and why.

An image is skipped only when every requested output exists and each one's provenance record
matches what this run would make (``provenance.mismatch``) for the same input bytes
(``provenance.same_input``) and the same output options (the PLY stride request and
encoding). Any other existing output is computed again, and the reason counted, so that the
summary can say ``3 images were made with random weights: recomputed``. ``--overwrite``
recomputes everything without looking.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..provenance import Recipe, mismatch, same_input
from .predict_inputs import Source, output_paths


@dataclass(frozen=True)
class PlyOptions:
    """How the point cloud is written: ``stride`` None = choose per image to keep at most
    ``max_points`` points (``outputs.choose_ply_stride``)."""

    stride: int | None = None
    max_points: int = 1 << 22
    binary: bool = True

    @property
    def request(self) -> str:
        """The stride request as recorded and compared (``auto <= N points`` or ``N``)."""
        return f"auto <= {self.max_points} points" if self.stride is None else str(self.stride)

    def stride_for(self, height: int, width: int) -> int:
        from ..outputs import choose_ply_stride

        return self.stride or choose_ply_stride(height, width, self.max_points)


def format_options(fmt: str, ply: PlyOptions) -> dict[str, Any]:
    """The per-format options an output of ``fmt`` records and a rerun compares."""
    if fmt == "ply":
        return {"ply_stride_request": ply.request, "ply_binary": ply.binary}
    return {}


@dataclass
class Plan:
    """What a run has to do: ``todo`` (source, name) pairs, ``skipped`` images, and the reasons
    of the images computed again (reason -> images)."""

    todo: list[tuple[Source, str]] = field(default_factory=list)
    skipped: int = 0
    recomputed: Counter = field(default_factory=Counter)


def image_verdict(source: Source, paths: Mapping[str, os.PathLike], recipe: Recipe,
                  ply: PlyOptions) -> tuple[bool, str | None]:
    """``(skip, reason)``: skip when all outputs exist and match; otherwise the reason of the
    first output that exists but was made another way (None: only missing outputs)."""
    from ..outputs import read_provenance

    missing = False
    for fmt, path in paths.items():
        if not os.path.exists(path):
            missing = True
            continue
        record = read_provenance(path)
        reason = mismatch(record, recipe, format_options(fmt, ply))
        if reason is None and not same_input(record.get("input"), source.path):
            reason = "an earlier version of the input image"
        if reason is not None:
            return False, reason
    return not missing, None


def plan_work(named: Sequence[tuple[Source, str]], outdir: str | os.PathLike,
              formats: Sequence[str], recipe: Recipe, *, ply: PlyOptions | None = None,
              overwrite: bool = False) -> Plan:
    """Sort ``named`` into skipped and to-do images (see the module docstring)."""
    ply = ply or PlyOptions()
    plan = Plan()
    for source, name in named:
        if overwrite:
            plan.todo.append((source, name))
            continue
        skip, reason = image_verdict(source, output_paths(outdir, name, formats), recipe, ply)
        if skip:
            plan.skipped += 1
        else:
            plan.todo.append((source, name))
            if reason is not None:
                plan.recomputed[reason] += 1
    return plan


def recomputed_lines(recomputed: Mapping[str, int]) -> list[str]:
    """``3 images were made with random weights: recomputed``, most frequent first."""
    lines = []
    for reason, n in sorted(recomputed.items(), key=lambda kv: (-kv[1], kv[0])):
        images = f"{n} image{'' if n == 1 else 's'} {'was' if n == 1 else 'were'}"
        verb = "had" if reason.startswith("no record") else "made with"
        if verb == "had":
            images = f"{n} image{'' if n == 1 else 's'}"
        lines.append(f"{images} {verb} {reason}: recomputed")
    return lines
