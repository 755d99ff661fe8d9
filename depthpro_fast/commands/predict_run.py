"""``predict``'s run: decode, batch through the model, write, with Ctrl-C handled.

Images are decoded and outputs written by background (daemon) threads while the model runs.
With ``batch_size`` N the images, each resized to 1536 x 1536 as in ``infer``, go through the
network N at a time; the post-processing (focal length, resize back, reciprocal) is done per
image at its original size with ``infer``'s arithmetic, so results equal ``model.infer`` per
image up to float rounding of the batched network.

An image whose requested outputs all exist is skipped (``overwrite`` recomputes it); every
file is written atomically. A file that cannot be read or processed is reported and skipped.
Ctrl-C stops taking images and finishes the outputs already computed (a second Ctrl-C
abandons them, removing their temporaries); the returned ``Summary`` says it was interrupted.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..workers import DaemonPool
from .predict_inputs import Source, output_paths


def _post_process(cid: Any, fov_deg: Any, f_px: float | None, height: int, width: int,
                  ) -> dict[str, Any]:
    """One image's network output (1, 1, 1536, 1536) -> infer's result at (height, width)."""
    from ..inference import check_output_memory, focal_length_tensor, postprocess

    check_output_memory(1, height, width, cid.device)
    f = None if f_px is None else focal_length_tensor(f_px, 1, cid.device)
    return postprocess(cid, fov_deg, f, height, width)


def infer_batch(model: Any, images: Sequence[Any], f_pxs: Sequence[float | None],
                ) -> list[dict[str, Any]]:
    """``model.infer`` for several normalised (3, H, W) images of any sizes, with one network
    call: each is resized to 1536 x 1536, the batch goes through ``model``, and each result is
    post-processed at its own size. One image: exactly ``model.infer``."""
    import torch

    from ..config import IMG_SIZE
    from ..inference import _resize, model_device_dtype

    if len(images) != len(f_pxs):
        raise ValueError(f"{len(images)} images but {len(f_pxs)} focal lengths")
    if len(images) == 1:
        return [model.infer(images[0], f_px=f_pxs[0])]
    device, dtype = model_device_dtype(model)
    net = []
    for x in images:
        x = x.to(device=device, dtype=dtype).unsqueeze(0)
        if tuple(x.shape[-2:]) != (IMG_SIZE, IMG_SIZE):
            x = _resize(x, (IMG_SIZE, IMG_SIZE), "bilinear")
        net.append(x)
    with torch.no_grad():
        # the FOV network is needed only for images without a focal length (the fast path
        # skips it otherwise, as infer does)
        cid, fov = model(torch.cat(net), need_fov=any(f is None for f in f_pxs))
        return [_post_process(cid[i:i + 1], None if fov is None else fov[i:i + 1], f,
                              int(x.shape[-2]), int(x.shape[-1]))
                for i, (x, f) in enumerate(zip(images, f_pxs, strict=True))]


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
    intrinsics: tuple[float, float, float, float] | None = None  # given: (fx, fy, cx, cy)


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Aborted(Exception):
    """The run was aborted (a second Ctrl-C) before this output was started."""


def write_outputs(job: _Job, result: dict[str, Any], *, ply_stride: int = 1,
                  ply_binary: bool = True, random_weights: bool = False,
                  abort: threading.Event | None = None) -> None:
    """Every requested output of one image (each file atomically); when ``abort`` is set, the
    files not yet started are not started."""
    from .. import outputs

    depth = outputs.as_depth_array(result["depth"])
    f_px = float(result["focallength_px"])
    fov = float(result["fov_deg"])
    fov_estimated = result.get("fov_deg_estimated")
    for fmt, path in job.outputs.items():
        if abort is not None and abort.is_set():
            raise Aborted(f"{path} not written: aborted")
        if fmt == "npz":
            outputs.write_npz(path, depth, f_px, fov, focallength_source=job.f_source,
                              fov_deg_estimated=fov_estimated, random_weights=random_weights,
                              intrinsics=job.intrinsics)
        elif fmt == "png16":
            outputs.write_png16(path, depth)
        elif fmt == "color":
            outputs.write_color(path, depth)
        elif fmt == "ply":
            outputs.write_ply(path, depth, job.rgb, f_px, stride=ply_stride, binary=ply_binary,
                              fov_deg=fov, intrinsics=job.intrinsics)
        else:  # parse_save only lets known formats through
            raise ValueError(f"unknown output format {fmt!r}")


def predict_sources(named: Sequence[tuple[Source, str]], model: Any, transform: Callable,
                    outdir: str | os.PathLike, *, formats: Sequence[str],
                    batch_size: int = 1, f_px: float | None = None, ignore_exif: bool = False,
                    overwrite: bool = False, ply_stride: int = 1, ply_binary: bool = True,
                    workers: int = 2, progress: bool = True, label: str = "",
                    random_weights: bool = False,
                    intrinsics: tuple[float, float, float, float] | None = None) -> Summary:
    """Run the model over ``named`` (from ``assign_names``) and write the outputs.

    A Ctrl-C (``KeyboardInterrupt``) does not propagate: the outputs already computed are
    finished (or, on a second Ctrl-C, abandoned) and the partial ``Summary`` is returned with
    ``interrupted`` set, for the caller to report; ``depthpro-fast predict`` exits with 130."""
    from tqdm import tqdm

    from ..io import load_image

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    summary = Summary(total=len(named))
    todo = []
    for source, name in named:
        outs = output_paths(outdir, name, formats)
        if not overwrite and all(p.exists() for p in outs.values()):
            summary.skipped += 1
        else:
            todo.append(_Job(source.path, outs))
    if todo:  # one clear error now rather than one per image after its inference
        from ..outputs import check_output_folder

        check_output_folder(outdir)

    bar = tqdm(total=len(todo), unit="img", desc=label or "predict", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)

    def fail(job: _Job, e: BaseException) -> None:
        summary.failed.append((str(job.source), _describe(e)))
        bar.write(f"{label + ': ' if label else ''}failed: {job.source}: {_describe(e)}",
                  file=sys.stderr)
        bar.update(1)

    start = time.perf_counter()
    readers = DaemonPool(workers, "depthpro-read")
    writers = DaemonPool(workers, "depthpro-write")
    reads: deque[tuple[_Job, Future]] = deque()
    writes: deque[tuple[_Job, Future]] = deque()
    queue = iter(todo)
    abort = threading.Event()  # set by a second Ctrl-C: writers start no further file

    def read_ahead() -> None:  # keep two batches decoding while the model runs
        while len(reads) < 2 * batch_size:
            job = next(queue, None)
            if job is None:
                return
            reads.append((job, readers.submit(load_image, job.source)))

    def finish_writes(limit: int) -> None:  # collect finished writes; block above `limit`
        while writes and (writes[0][1].done() or len(writes) > limit):
            job, fut = writes[0]
            error = fut.exception()  # waits; a Ctrl-C here leaves the job in `writes`
            writes.popleft()
            if error is not None:
                fail(job, error)
            else:
                summary.written += 1
                bar.update(1)

    aborted = False
    try:
        read_ahead()
        while reads:
            batch: list[_Job] = []
            while reads and len(batch) < batch_size:
                job, fut = reads.popleft()
                try:
                    job.rgb, f_exif = fut.result()
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
            for job, result in _run_batch(model, transform, batch):
                if isinstance(result, BaseException):
                    fail(job, result)
                    continue
                writes.append((job, writers.submit(write_outputs, job, result,
                                                   ply_stride=ply_stride,
                                                   ply_binary=ply_binary,
                                                   random_weights=random_weights,
                                                   abort=abort)))
            finish_writes(limit=2 * batch_size)
        finish_writes(limit=0)
    except KeyboardInterrupt:
        # Ctrl-C: no new image; the outputs already computed are finished (each file is
        # atomic, so this is only about not throwing the work away) unless Ctrl-C comes again
        summary.interrupted = True
        readers.shutdown(wait=False, cancel=True)
        reads.clear()
        try:
            if writes:
                files = sum(len(job.outputs) for job, _ in writes)
                announce(bar, f"{label + ': ' if label else ''}interrupted: finishing the "
                         f"{_plural(files, 'output')} of {_plural(len(writes), 'image')} "
                         "already computed (Ctrl-C again to abort them; no partial file is "
                         "left)")
            finish_writes(limit=0)
        except KeyboardInterrupt:
            aborted = True
            abort.set()
            writers.shutdown(wait=False, cancel=True)
            summary.abandoned = len(writes)
            remove_temp_files([p for job, _ in writes for p in job.outputs.values()])
            announce(bar, f"{label + ': ' if label else ''}aborted: the outputs of "
                     f"{_plural(len(writes), 'image')} were not written (a rerun computes "
                     f"{'it' if len(writes) == 1 else 'them'})")
    finally:
        interrupted = summary.interrupted
        readers.shutdown(wait=not interrupted, cancel=True)
        writers.shutdown(wait=not aborted, cancel=True)  # no write is cut off halfway
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def announce(bar: Any, text: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    bar.write(text, file=sys.stderr)


def remove_temp_files(paths: Sequence[Path]) -> None:
    """Delete the hidden temporary files that abandoned atomic writes of ``paths`` left."""
    import contextlib

    for path in paths:
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


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
    out = {"depth": result["depth"].detach().float().cpu().numpy(),
           "focallength_px": float(result["focallength_px"]),
           "fov_deg": float(result["fov_deg"])}
    if "fov_deg_estimated" in result:  # present exactly when the FOV network ran
        out["fov_deg_estimated"] = float(result["fov_deg_estimated"])
    return out


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
