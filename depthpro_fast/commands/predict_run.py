"""``predict``'s run: decode, batch through the model, write, with Ctrl-C handled.

Images are decoded and outputs written by background (daemon) threads while the model runs;
the network call and post-processing are ``predict_post``'s. Which images run at all is
``predict_resume``'s rule: an image is skipped only when its requested outputs all exist and
were made the same way (``overwrite`` recomputes it); every file is written atomically and
carries its provenance record. A file that cannot be read or processed is reported and
skipped. The bar (``predict_progress``) counts an image when its outputs are written.
Ctrl-C stops taking images and finishes the outputs already computed (a second Ctrl-C
abandons them, removing their temporaries); the returned ``Summary`` says it was interrupted.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_files import remove_temp_files
from ..interrupts import TwoStageStop, abort_hint
from ..provenance import Recipe, input_identity
from ..words import plural
from ..workers import DaemonPool
from .predict_inputs import Source, output_paths
from .predict_post import BANDED_ABOVE_PIXELS, infer_batch  # noqa: F401 (infer_batch: public)
from .predict_progress import Progress
from .predict_resume import Plan, PlyOptions, format_options, plan_work

# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What a run did. ``total`` counts images found; arguments that matched no image are in
    ``missing``, not in ``total`` or ``failed``."""

    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    missing: list[tuple[str, str]] = field(default_factory=list)  # (argument, why)
    left_out: dict[str, int] = field(default_factory=dict)  # folder -> sub-folders not searched
    interrupted: bool = False  # Ctrl-C: the run stopped early
    abandoned: int = 0  # images whose outputs a second Ctrl-C gave up on
    recomputed: Counter = field(default_factory=Counter)  # reason -> images made another way
    ply_strides: Counter = field(default_factory=Counter)  # stride chosen (auto, > 1) -> images
    big_images: list[int] = field(default_factory=list)  # pixels of images resized in bands

    @property
    def not_done(self) -> int:
        return self.total - self.written - self.skipped - len(self.failed)


@dataclass
class _Job:
    source: Path
    outputs: dict[str, Path]
    rgb: Any = None
    f_px: float | None = None
    f_source: str = "estimated"
    input_id: dict[str, Any] | None = None
    ply_stride: int = 1
    intrinsics: tuple[float, float, float, float] | None = None  # given: (fx, fy, cx, cy)


def read_input(path: Path) -> tuple[Any, float | None, dict[str, Any]]:
    """``(rgb, EXIF focal length or None, the file's identity for the record)``."""
    from ..io import load_image

    identity = input_identity(path)  # first: the bytes decoded are the bytes recorded
    rgb, f_exif = load_image(path)
    return rgb, f_exif, identity


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Aborted(Exception):
    """The run was aborted (a second Ctrl-C) before this output was started."""


def output_record(job: _Job, result: dict[str, Any], recipe: Recipe | None, fmt: str,
                  ply: PlyOptions) -> dict[str, Any] | None:
    """The provenance record of one output file (None without a recipe)."""
    if recipe is None:
        return None
    record = recipe.as_dict()
    record.update({"random_weights": recipe.weights == "random", "output": fmt,
                   "input": job.input_id, "focallength_px": float(result["focallength_px"]),
                   "focallength_source": job.f_source, "fov_deg": float(result["fov_deg"]),
                   "image_size": list(job.rgb.shape[:2]) if job.rgb is not None else None})
    record.update(format_options(fmt, ply))
    if fmt == "ply":
        record["ply_stride"] = job.ply_stride
    return record


def write_outputs(job: _Job, result: dict[str, Any], *, recipe: Recipe | None = None,
                  ply: PlyOptions | None = None, npz_compress: bool = False,
                  random_weights: bool = False, abort: threading.Event | None = None) -> None:
    """Every requested output of one image (each file atomically, each with its provenance
    record); when ``abort`` is set, the files not yet started are not started."""
    from .. import outputs

    ply = ply or PlyOptions()
    depth = outputs.as_depth_array(result["depth"])
    f_px = float(result["focallength_px"])
    fov = float(result["fov_deg"])
    fov_estimated = result.get("fov_deg_estimated")
    for fmt, path in job.outputs.items():
        if abort is not None and abort.is_set():
            raise Aborted(f"{path} not written: aborted")
        record = output_record(job, result, recipe, fmt, ply)
        if fmt == "npz":
            outputs.write_npz(path, depth, f_px, fov, focallength_source=job.f_source,
                              fov_deg_estimated=fov_estimated, random_weights=random_weights,
                              provenance=record, compress=npz_compress,
                              intrinsics=job.intrinsics)
        elif fmt == "png16":
            outputs.write_png16(path, depth, provenance=record)
        elif fmt == "color":
            outputs.write_color(path, depth, provenance=record)
        elif fmt == "ply":
            outputs.write_ply(path, depth, job.rgb, f_px, stride=job.ply_stride,
                              binary=ply.binary, fov_deg=fov, provenance=record,
                              intrinsics=job.intrinsics)
        else:  # parse_save only lets known formats through
            raise ValueError(f"unknown output format {fmt!r}")


def predict_sources(named: Sequence[tuple[Source, str]], model: Any, transform: Callable,
                    outdir: str | os.PathLike, *, formats: Sequence[str],
                    recipe: Recipe | None = None, plan: Plan | None = None,
                    batch_size: int = 1, f_px: float | None = None, ignore_exif: bool = False,
                    overwrite: bool = False, ply: PlyOptions | None = None,
                    npz_compress: bool = False, workers: int = 2,
                    progress: bool | Progress = True, label: str = "",
                    random_weights: bool = False,
                    intrinsics: tuple[float, float, float, float] | None = None) -> Summary:
    """Run the model over ``named`` (from ``assign_names``) and write the outputs.

    ``recipe``: how this run makes its outputs (``provenance.make_recipe``): recorded in every
    file, and the resume rule compares it (without one, nothing is recorded and an image is
    skipped when its outputs exist). ``plan``: ``plan_work``'s answer when the caller already
    has it. ``progress``: a ``Progress`` (the caller's, e.g. already showing the model load)
    or whether to show one.

    A Ctrl-C (``KeyboardInterrupt``) does not propagate: the outputs already computed are
    finished (or, on a second Ctrl-C, abandoned) and the partial ``Summary`` is returned with
    ``interrupted`` set, for the caller to report; ``depthpro-fast predict`` exits with 130."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    ply = ply or PlyOptions()
    summary = Summary(total=len(named))
    if plan is None:
        if recipe is not None:
            plan = plan_work(named, outdir, formats, recipe, ply=ply, overwrite=overwrite)
        else:
            plan = Plan()
            for source, name in named:
                if overwrite or not all(p.exists()
                                        for p in output_paths(outdir, name, formats).values()):
                    plan.todo.append((source, name))
                else:
                    plan.skipped += 1
    summary.skipped = plan.skipped
    summary.recomputed = Counter(plan.recomputed)
    todo = [_Job(source.path, output_paths(outdir, name, formats)) for source, name in plan.todo]
    if todo:  # one clear error now rather than one per image after its inference
        from ..outputs import check_output_folder

        check_output_folder(outdir)

    bar = progress if isinstance(progress, Progress) else Progress(
        len(todo), label=label, enabled=bool(progress))

    def fail(job: _Job, e: BaseException, counted: bool = False) -> None:
        summary.failed.append((str(job.source), _describe(e)))
        bar.write(f"{label + ': ' if label else ''}failed: {job.source}: {_describe(e)}")
        if not counted:
            bar.image_done()

    def write_and_count(job: _Job, result: dict[str, Any]) -> None:
        # counted here, in the writer thread, the moment the files are in place (or failed):
        # the main thread may be inside the next forward for minutes
        try:
            write_outputs(job, result, recipe=recipe, ply=ply, npz_compress=npz_compress,
                          random_weights=random_weights, abort=abort)
        finally:
            bar.image_done()

    start = time.perf_counter()
    readers = DaemonPool(workers, "depthpro-read")
    writers = DaemonPool(workers, "depthpro-write")
    reads: deque[tuple[_Job, Future]] = deque()
    writes: deque[tuple[_Job, Future]] = deque()
    queue = iter(todo)
    stop = TwoStageStop(writers)
    abort = stop.abort  # set by a second Ctrl-C: writers start no further file

    def read_ahead() -> None:  # keep two batches decoding while the model runs
        while len(reads) < 2 * batch_size:
            job = next(queue, None)
            if job is None:
                return
            reads.append((job, readers.submit(read_input, job.source)))

    def finish_writes(limit: int) -> None:  # collect finished writes; block above `limit`
        while writes and (writes[0][1].done() or len(writes) > limit):
            job, fut = writes[0]
            error = fut.exception()  # waits; a Ctrl-C here leaves the job in `writes`
            writes.popleft()
            if error is not None:
                fail(job, error, counted=True)
            else:
                summary.written += 1

    warmed = False
    try:
        read_ahead()
        while reads:
            batch: list[_Job] = []
            while reads and len(batch) < batch_size:
                job, fut = reads.popleft()
                try:
                    job.rgb, f_exif, job.input_id = fut.result()
                except Exception as e:
                    fail(job, e)
                else:
                    if intrinsics is not None:  # the depth's focal length is fx
                        job.f_px, job.f_source, job.intrinsics = intrinsics[0], "given", \
                            intrinsics
                    elif f_px is not None:
                        job.f_px, job.f_source = f_px, "given"
                    elif f_exif is not None and not ignore_exif:
                        job.f_px, job.f_source = f_exif, "exif"
                    batch.append(job)
                read_ahead()
            if not batch:
                continue
            if not warmed:  # the first forward: warm-up (plans, autotuning, graphs) included
                with bar.step(f"first forward ({plural(len(batch), 'image')}, with warm-up)"):
                    results = _run_batch(model, transform, batch)
                warmed = True
            else:
                results = _run_batch(model, transform, batch)
            for job, result in results:
                if isinstance(result, BaseException):
                    fail(job, result)
                    continue
                height, width = job.rgb.shape[:2]
                if height * width > BANDED_ABOVE_PIXELS:
                    summary.big_images.append(height * width)
                if "ply" in job.outputs:
                    job.ply_stride = ply.stride_for(height, width)
                    if ply.stride is None and job.ply_stride > 1:
                        summary.ply_strides[job.ply_stride] += 1
                writes.append((job, writers.submit(write_and_count, job, result)))
            finish_writes(limit=2 * batch_size)
        finish_writes(limit=0)
    except KeyboardInterrupt:
        # Ctrl-C: no new image; the outputs already computed are finished (each file is
        # atomic, so this is only about not throwing the work away) unless Ctrl-C comes again
        summary.interrupted = True
        readers.shutdown(wait=False, cancel=True)
        reads.clear()
        prefix = f"{label}: " if label else ""

        def wait() -> None:
            if writes:
                files = sum(len(job.outputs) for job, _ in writes)
                announce(bar.bar, f"{prefix}interrupted: finishing the "
                         f"{plural(files, 'output')} of {plural(len(writes), 'image')} "
                         f"already computed ({abort_hint('them')})")
            finish_writes(limit=0)

        def abandon() -> None:
            summary.abandoned = len(writes)
            remove_temp_files([p for job, _ in writes for p in job.outputs.values()])
            announce(bar.bar, f"{prefix}aborted: the outputs of "
                     f"{plural(len(writes), 'image')} were not written (a rerun computes "
                     f"{'it' if len(writes) == 1 else 'them'})")

        stop.finish(wait, abandon)
    finally:
        interrupted = summary.interrupted
        readers.shutdown(wait=not interrupted, cancel=True)
        stop.close()  # no write is cut off halfway, unless a second Ctrl-C abandoned them
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def announce(bar: Any, text: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    bar.write(text, file=sys.stderr)


def _run_batch(model: Any, transform: Callable, batch: list[_Job]) -> list[tuple[_Job, Any]]:
    """(job, result dict on the CPU, or the exception) per job. A failing batch is retried one
    image at a time, so one bad image (or an out-of-memory batch) does not sink the others."""
    try:
        xs = [transform(job.rgb) for job in batch]
        results = infer_batch(model, xs, [job.f_px for job in batch])
        return [(job, _to_cpu(r)) for job, r in zip(batch, results, strict=True)]
    except Exception as e:
        if len(batch) == 1:
            return [(batch[0], e)]
    _free_cuda_cache()
    return [pair for job in batch for pair in _run_batch(model, transform, [job])]


def _to_cpu(result: dict[str, Any]) -> dict[str, Any]:
    depth = result["depth"]  # a numpy array already when resized back in bands
    out = {"depth": depth if hasattr(depth, "dtype") and not hasattr(depth, "detach")
           else depth.detach().float().cpu().numpy(),
           "focallength_px": float(result["focallength_px"]),
           "fov_deg": float(result["fov_deg"])}
    if "fov_deg_estimated" in result:  # present exactly when the FOV network ran
        out["fov_deg_estimated"] = float(result["fov_deg_estimated"])
    return out


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

