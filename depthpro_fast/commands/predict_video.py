"""``predict`` on video clips: which inputs are clips, their output folders, the run over
them (``depthpro_fast.video.predict_video`` per clip) and the summary lines.

A clip named ``NAME`` (``predict_inputs.assign_names``: ``holiday`` for ``holiday.mp4``,
sub-folders kept) gets the folder ``OUTDIR/NAME/`` (see ``depthpro_fast.video``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..video import ClipSummary, VideoOptions, clip_complete, predict_video
from ..video_io import is_video
from .predict_inputs import Source


def split_clips(named: Sequence[tuple[Source, str]],
                ) -> tuple[list[tuple[Source, str]], list[tuple[Source, str]]]:
    """(images, clips), each in the given order."""
    clips = [n for n in named if is_video(n[0].path)]
    return [n for n in named if not is_video(n[0].path)], clips


def clip_dir(outdir: str | os.PathLike, name: str) -> Path:
    return Path(outdir).joinpath(*name.split("/"))


def clips_to_do(clips: Sequence[tuple[Source, str]], outdir: str | os.PathLike,
                overwrite: bool, recipe: Any = None) -> list[tuple[Source, str]]:
    """The clips whose outputs are not complete, or were made another way than ``recipe``."""
    return [c for c in clips
            if overwrite or not clip_complete(clip_dir(outdir, c[1]), recipe)]


def video_options(args: argparse.Namespace, *, progress: bool, label: str,
                  random_weights: bool, recipe: Any = None) -> VideoOptions:
    return VideoOptions(batch_size=args.batch_size, f_px=args.f_px,
                        per_frame_focal=args.per_frame_focal, overwrite=args.overwrite,
                        workers=args.workers, progress=progress, label=label,
                        random_weights=random_weights, recipe=recipe)


def predict_clips(clips: Sequence[tuple[Source, str]], model: Any, transform: Any,
                  outdir: str | os.PathLike, options: VideoOptions) -> list[ClipSummary]:
    """``predict_video`` for each clip not complete (or all with ``overwrite``); a Ctrl-C
    stops after the clip it interrupted. Complete clips get a summary with ``complete``."""
    summaries = []
    for source, name in clips:
        out = clip_dir(outdir, name)
        if not options.overwrite and clip_complete(out, options.recipe):
            summaries.append(_done_summary(source, out))
            continue
        summary = predict_video(model, source.path, out, options, transform=transform)
        summaries.append(summary)
        if summary.interrupted:
            break
    return summaries


def _done_summary(source: Source, out: Path) -> ClipSummary:
    from ..video import read_clip_record

    record = read_clip_record(out) or {}
    focal = record.get("focal", {})
    return ClipSummary(source=str(source.path), out_dir=str(out), frames=record["frames"],
                       skipped=record["frames"], complete=True,
                       focallength_px=focal.get("focallength_px")
                       if focal.get("mode") == "constant" else None,
                       focal_source=focal.get("source", ""))


def _focal_words(s: ClipSummary) -> str:
    if s.focallength_px is None:
        return "focal length per frame" if s.focal_source else ""
    return f"focal length {s.focallength_px:.1f} px ({s.focal_source})"


def format_clip_summary(s: ClipSummary) -> str:
    """One line per clip: frames written / skipped, frames/s, the focal length, where."""
    if s.error and not (s.written or s.skipped):  # nothing done: the reason is the news
        return f"failed: {s.source}: {s.error}"
    rate = (f" ({s.written / s.seconds:.2f} frames/s)" if s.written and s.seconds > 0 else "")
    head = "interrupted: " if s.interrupted else ("failed: " if s.error else "")
    parts = [f"{head}{s.source}: {s.frames} frames: {s.written} written"
             + (f" (recomputed: the frames on disk were made with {s.recomputed_why})"
                if s.recomputed_why else "") + f", {s.skipped} "
             "skipped (done before)" + (f", in {s.seconds:.1f} s{rate}" if s.seconds else "")]
    if _focal_words(s):
        parts.append(_focal_words(s))
    if s.abandoned:
        parts.append(f"{s.abandoned} computed frames abandoned")
    parts.append(f"outputs in {s.out_dir}" + ("" if s.complete or s.error or s.interrupted
                                               else " (incomplete)"))
    text = "; ".join(parts)
    if s.error:
        text += f"\n  {s.error}"
    if s.interrupted:
        text += "\na rerun with the same arguments continues from the frames written"
    return text
