"""Depth for a video clip: ``predict_video(model, path, out_dir, options) -> ClipSummary``.

Outputs, all under ``out_dir`` (``predict`` passes ``<outdir>/<clip name>/``):

* ``depth_mm/000000.png``, ``000001.png``, ...: the metric depth of every frame (frame ``i`` =
  the ``i``-th decoded frame, from 0), 16-bit PNG of millimetres (0 = invalid, 65535 = 65.535 m
  or farther), each with PNG text ``focallength_px``, ``focallength_source``, ``frame``.
* ``depth_preview.mp4``: the inverse depth through the turbo colour map (near red, far blue)
  at the source frame rate, one frame per depth frame, on one colour scale for the whole clip
  (the 1st..99th percentile of the inverse depth of up to 64 frames), so it does not flicker.
* ``clip.json``: the source, frame count, frame rate, size, the focal length used and where it
  came from (with the sampled frames and their estimates), the depth encoding, the preview's
  colour scale, and ``complete`` (true once every frame and the preview are written).

Focal length: one camera films a clip, but the network estimates the field of view per frame,
so a per-frame focal length makes the metric scale flicker. By default the FOV network runs on
``FOCAL_SAMPLES`` frames spread evenly over the clip (the middles of equal segments), the
median of their focal lengths is fixed for every frame and recorded (``focallength_source``
``"clip median"``). ``per_frame_focal`` keeps the per-frame estimate; ``f_px`` gives one.

Resume: every frame file is written atomically, so a frame whose file exists is complete; a
rerun (not ``overwrite``) skips those frames and keeps the recorded focal length. Ctrl-C: as in
``predict`` (the frames already computed are finished; a second Ctrl-C abandons them).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .video_io import PREVIEW_FILE, VideoError, iter_frames, probe, read_frame_text
from .words import plural

FOCAL_SAMPLES = 8  # frames whose focal estimates make the clip's median
PREVIEW_RANGE_FRAMES = 64  # frames whose inverse depth sets the preview's colour scale
FRAMES_DIR = "depth_mm"
CLIP_FILE = "clip.json"


@dataclass
class VideoOptions:
    batch_size: int = 1  # frames per network call
    f_px: float | None = None  # one focal length (pixels) for every frame
    per_frame_focal: bool = False  # the network's estimate per frame instead of the median
    focal_samples: int = FOCAL_SAMPLES
    overwrite: bool = False  # recompute every frame (and the focal length)
    workers: int = 2  # threads writing frames
    progress: bool = True
    label: str = ""  # progress bar / message prefix
    random_weights: bool = False  # recorded in clip.json and every frame
    # what makes the outputs (``provenance.make_recipe``): recorded in clip.json and every
    # frame; frames on disk made another way (other weights, config, dtype, path) are recomputed
    recipe: Any = None

    def check(self) -> None:
        for name in ("batch_size", "workers", "focal_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.f_px is not None and not (np.isfinite(self.f_px) and self.f_px > 0):
            raise ValueError(f"f_px must be a positive number of pixels, got {self.f_px}")
        if self.f_px is not None and self.per_frame_focal:
            raise ValueError("a given focal length (f_px, --f-px) and per_frame_focal "
                             "(--per-frame-focal) exclude each other; drop one")


@dataclass
class ClipSummary:
    """What ``predict_video`` did with one clip (``as_dict()`` for logs and other processes)."""

    source: str
    out_dir: str
    frames: int = 0  # in the clip (decoded; the header's count until the decode ends)
    written: int = 0  # frames computed and written by this run
    skipped: int = 0  # frames found complete
    seconds: float = 0.0
    focallength_px: float | None = None  # None: per frame
    focal_source: str = ""
    complete: bool = False  # every frame, the preview and clip.json are written
    error: str | None = None
    interrupted: bool = False
    abandoned: int = 0  # frames a second Ctrl-C gave up on
    recomputed_why: str | None = None  # the frames on disk were made another way: why
    per_frame_focallength_px: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def frame_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / FRAMES_DIR / f"{index:06d}.png"


def read_clip_record(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        with open(Path(out_dir) / CLIP_FILE, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def made_otherwise(record: dict[str, Any] | None, recipe: Any) -> str | None:
    """Why the outputs that ``clip.json``'s ``record`` describes were not made by ``recipe``
    (other weights, checkpoint, seed, config, dtype or path), or None when they were (or
    when there is no recipe to compare with). The focal length is compared by the clip's own
    rule (``_focal_mode``)."""
    if recipe is None or record is None:
        return None
    from .provenance import mismatch

    old = record.get("provenance")
    if isinstance(old, dict):  # the focal request is the clip's own rule, compared apart
        old = {**old, **{k: v for k, v in recipe.as_dict().items()
                         if k in ("focal", "f_px", "intrinsics")}}
    return mismatch(old, recipe)


def clip_complete(out_dir: str | os.PathLike, recipe: Any = None) -> bool:
    """Whether a clip's outputs are all there (``clip.json`` says so and the files exist) and,
    given a ``recipe``, were made by it."""
    record = read_clip_record(out_dir)
    if not record or record.get("complete") is not True:
        return False
    if made_otherwise(record, recipe) is not None:
        return False
    n = record.get("frames")
    return (isinstance(n, int) and (Path(out_dir) / PREVIEW_FILE).is_file()
            and all(frame_path(out_dir, i).is_file() for i in range(n)))


def sample_indices(frames: int, k: int) -> list[int]:
    """``k`` frame indices spread evenly over ``frames`` (the middles of k equal segments);
    every frame when there are no more than ``k``."""
    if frames <= k:
        return list(range(frames))
    return sorted({min(frames - 1, int((i + 0.5) * frames / k)) for i in range(k)})


def _write_record(out_dir: Path, record: dict[str, Any]) -> None:
    from .outputs import atomic_write

    with atomic_write(out_dir / CLIP_FILE) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode("utf-8"))


def _results(model: Any, transform: Callable, rgbs: Sequence[np.ndarray],
             f_px: float | None) -> list[tuple[np.ndarray, float]]:
    """(depth as float32 numpy, focal length used) per frame, one network call."""
    from .commands.predict_run import infer_batch

    results = infer_batch(model, [transform(rgb) for rgb in rgbs], [f_px] * len(rgbs))
    return [(r["depth"].detach().float().cpu().numpy(), float(r["focallength_px"]))
            for r in results]


def estimate_clip_focal(model: Any, transform: Callable, path: str | os.PathLike, frames: int,
                        samples: int = FOCAL_SAMPLES, batch_size: int = 1,
                        ) -> tuple[float, list[int], list[float]]:
    """(median focal length in pixels, the sampled frame indices, their estimates)."""
    want = sample_indices(frames, samples)
    last = want[-1] if want else -1
    got: list[int] = []
    values: list[float] = []
    batch: list[tuple[int, np.ndarray]] = []

    def run() -> None:
        for (i, _), (_, f) in zip(batch, _results(model, transform, [b[1] for b in batch], None),
                                  strict=True):
            got.append(i)
            values.append(f)
        batch.clear()

    for index, rgb in iter_frames(path, want=set(want)):
        if rgb is not None:
            batch.append((index, rgb))
            if len(batch) == batch_size:
                run()
        if index >= last:  # the rest of the clip is not needed
            break
    if batch:
        run()
    if not values:
        raise VideoError(f"{os.fspath(path)}: no frame could be decoded")
    # rounded to float32, as infer applies it: the recorded value is the one every frame used
    return float(np.float32(statistics.median(values))), got, values


def _focal_mode(opts: VideoOptions) -> dict[str, Any]:
    if opts.f_px is not None:
        return {"mode": "constant", "source": "given", "focallength_px": float(opts.f_px)}
    if opts.per_frame_focal:
        return {"mode": "per-frame", "source": "estimated per frame"}
    return {"mode": "constant", "source": "clip median"}


def _describe_mode(m: dict[str, Any]) -> str:
    if m.get("mode") == "per-frame":
        return "a focal length estimated per frame (--per-frame-focal)"
    if m.get("source") == "given":
        return f"the given focal length {m.get('focallength_px')} px (--f-px)"
    return "one focal length per clip (the median of sampled frames' estimates)"


def predict_video(model: Any, path: str | os.PathLike, out_dir: str | os.PathLike,
                  options: VideoOptions | None = None, *, transform: Callable | None = None,
                  ) -> ClipSummary:
    """Depth of every frame of the clip at ``path`` into ``out_dir`` (see the module text).

    Problems with the clip (unreadable, outputs from other options) are returned in
    ``ClipSummary.error``, not raised, and a Ctrl-C returns the summary with ``interrupted``;
    wrong ``options`` raise ``ValueError``."""
    from .inference import Transform, model_device_dtype

    opts = options or VideoOptions()
    opts.check()
    if transform is None:
        transform = Transform(*model_device_dtype(model))
    out = Path(out_dir)
    summary = ClipSummary(source=os.fspath(path), out_dir=os.fspath(out))
    start = time.perf_counter()
    try:
        _run_clip(model, transform, Path(path), out, opts, summary)
    except KeyboardInterrupt:  # outside the frame loop (which handles its own): nothing pending
        summary.interrupted = True
    except (VideoError, OSError, RuntimeError, ValueError) as e:
        summary.error = f"{type(e).__name__}: {e}" if not isinstance(e, VideoError) else str(e)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_clip(model: Any, transform: Callable, path: Path, out: Path, opts: VideoOptions,
              summary: ClipSummary) -> None:
    from .atomic_files import remove_temp_files
    from .commands.predict_run import announce
    from .interrupts import TwoStageStop, abort_hint
    from .workers import DaemonPool

    info = probe(path)
    summary.frames = info.frames
    mode = _focal_mode(opts)
    record = None if opts.overwrite else read_clip_record(out)
    frames_dir = out / FRAMES_DIR
    why_other = made_otherwise(record, opts.recipe) if not opts.overwrite else None
    if why_other is not None:  # never keep frames of other weights (e.g. random ones)
        summary.recomputed_why = why_other
        record = None
    done = set() if opts.overwrite or record is None else _frames_on_disk(frames_dir)
    if done:  # the frames on disk must have been made as this run would make them
        old = record.get("focal", {}) if record else {}
        same = (old.get("mode") == mode["mode"] and old.get("source") == mode["source"]
                and (mode["source"] != "given"
                     or old.get("focallength_px") == mode["focallength_px"]))
        size = [record.get("width"), record.get("height")]
        if not same:
            why = f"made with {_describe_mode(old)}; this run asks for {_describe_mode(mode)}"
        elif size != [info.width, info.height]:
            why = (f"of a {size[0]}x{size[1]} clip; {path.name} is now "
                   f"{info.width}x{info.height}")
        if not same or size != [info.width, info.height]:
            raise VideoError(f"{out} holds {len(done)} frames {why}: pass --overwrite to "
                             "recompute the clip, or another -o")
    if frames_dir.is_dir():  # hidden temporaries of a killed run (never a complete frame)
        for p in frames_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=info.frames, initial=len(done), unit="frame", dynamic_ncols=True,
               desc=opts.label or path.name, disable=not opts.progress)
    focal = record.get("focal") if done and record else None
    if focal is None:
        focal = dict(mode)
        if mode["source"] == "clip median":
            if opts.progress:
                announce(bar, f"{path.name}: estimating the focal length from "
                         f"{min(opts.focal_samples, info.frames)} frames")
            f, idx, values = estimate_clip_focal(model, transform, path, info.frames,
                                                 opts.focal_samples, opts.batch_size)
            focal.update(focallength_px=f, samples={"frames": idx, "focallength_px": values})
        record = {"source": os.fspath(path), "frames": info.frames,
                  "fps": f"{info.fps.numerator}/{info.fps.denominator}",
                  "fps_float": float(info.fps), "width": info.width, "height": info.height,
                  "codec": info.codec, "focal": focal,
                  "depth": {"files": f"{FRAMES_DIR}/{{frame:06d}}.png", "format": "png16",
                            "unit": "millimetre", "metres_per_unit": 0.001,
                            "invalid": 0, "saturated": 65535},
                  "random_weights": opts.random_weights, "complete": False}
        if opts.recipe is not None:
            record["provenance"] = opts.recipe.as_dict()
        out.mkdir(parents=True, exist_ok=True)
        _write_record(out, record)
    assert record is not None
    f_fixed = focal.get("focallength_px") if focal["mode"] == "constant" else None
    summary.focallength_px, summary.focal_source = f_fixed, focal["source"]
    summary.skipped = len(done)

    writers = DaemonPool(opts.workers, "depthpro-video-write")
    writes: deque[tuple[int, Future]] = deque()
    stop = TwoStageStop(writers)
    abort = stop.abort  # set by a second Ctrl-C: writers start no further frame
    text = {"focallength_source": focal["source"], "depth_unit": "millimetre"}
    if opts.random_weights:
        text["random_weights"] = "true"
    if opts.recipe is not None:  # as predict's PNGs: the record in a text chunk
        text["depthpro_fast"] = json.dumps(opts.recipe.as_dict(), sort_keys=True)

    def write(index: int, depth: np.ndarray, f: float) -> None:
        from .video_io import write_depth_frame

        if abort.is_set():
            return
        write_depth_frame(frame_path(out, index), depth,
                          text={**text, "frame": str(index), "focallength_px": repr(f)})

    def collect(limit: int) -> None:  # finished writes; block while more than `limit` pending
        while writes and (writes[0][1].done() or len(writes) > limit):
            error = writes[0][1].exception()
            writes.popleft()
            if error is not None:
                raise error
            summary.written += 1
            bar.update(1)

    decoded = -1
    try:
        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            for (i, _), (depth, f) in zip(batch, _results(model, transform,
                                                          [b[1] for b in batch], f_fixed),
                                          strict=True):
                writes.append((i, writers.submit(write, i, depth, f)))
            batch.clear()
            collect(limit=2 * opts.batch_size)

        for index, rgb in iter_frames(path, want=_NotIn(done)):
            decoded = index
            if rgb is not None:
                batch.append((index, rgb))
                if len(batch) == opts.batch_size:
                    flush()
        if batch:
            flush()
        collect(limit=0)
    except KeyboardInterrupt:
        summary.interrupted = True

        def wait() -> None:
            if writes:
                announce(bar, f"{path.name}: interrupted: finishing the "
                         f"{plural(len(writes), 'frame')} already computed ({abort_hint()})")
            collect(limit=0)

        def abandon() -> None:
            summary.abandoned = len(writes)
            remove_temp_files([frame_path(out, i) for i, _ in writes])
            announce(bar, f"{path.name}: aborted: {plural(len(writes), 'computed frame')} "
                     "not written (a rerun computes them)")

        stop.finish(wait, abandon)
    except BaseException:
        collect(limit=0)  # keep the frames already computed, then report the failure
        raise
    finally:
        stop.close()
        bar.close()
    if summary.interrupted:
        return
    frames = decoded + 1
    summary.frames = frames
    missing = [i for i in range(frames) if not frame_path(out, i).is_file()]
    if missing:  # cannot happen unless files are removed meanwhile; say so rather than lie
        raise VideoError(f"{out}: {len(missing)} frames missing after the run (first: frame "
                         f"{missing[0]})")
    if focal["mode"] == "per-frame":
        summary.per_frame_focallength_px = [
            float(read_frame_text(frame_path(out, i))["focallength_px"]) for i in range(frames)]
        focal["per_frame_focallength_px"] = summary.per_frame_focallength_px
        focal["median_focallength_px"] = float(statistics.median(
            summary.per_frame_focallength_px))
    from .video_preview import write_preview

    scale = write_preview(out / PREVIEW_FILE, [frame_path(out, i) for i in range(frames)],
                          info.fps, PREVIEW_RANGE_FRAMES)
    record.update(frames=frames, focal=focal, complete=True,
                  preview={"file": PREVIEW_FILE, "colour_map": "turbo, of inverse depth",
                           "depth_range_m": scale})
    _write_record(out, record)
    summary.complete = True



def _frames_on_disk(frames_dir: Path) -> set[int]:
    """Indices of the frame files in ``frames_dir`` (one listing, not one look-up per frame)."""
    if not frames_dir.is_dir():
        return set()
    return {int(p.name[:-4]) for p in frames_dir.iterdir()
            if p.name.endswith(".png") and p.name[:-4].isdigit()}


class _NotIn:
    """``i in _NotIn(done)`` is True for the frames not yet done (what to convert)."""

    def __init__(self, done: set[int]):
        self.done = done

    def __contains__(self, index: object) -> bool:
        return index not in self.done
