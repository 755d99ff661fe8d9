"""Depth for a whole dataset on a Ray cluster: ``predict`` as a Ray Data pipeline.

The driver lists the inputs (local paths or filesystem URIs, ``ray_inputs``) and gives each
``predict``'s output name; rows of ``{"source", "name"}`` (names only, no image data) go
through ``map_batches`` into a pool of actors, one model per actor (``DepthProPredictor``:
one GPU each on a cluster with GPUs, CPU actors otherwise). Each actor reads and decodes its
images with this package's loader (EXIF orientation and focal length kept), runs the model and
writes the outputs itself with ``predict``'s own code (``predict_run.predict_sources``), so the
files are exactly ``predict``'s, each written atomically (temporary file + rename).

Exactly once: a row's outputs depend only on the row, and every file is replaced atomically,
so a task that Ray retries after its actor died rewrites (or, when they exist, skips) the same
complete files; an actor removes the temporary files a dead attempt left for its rows before
it starts them, and the driver, at the end, removes any left and lists the inputs that lack a
complete set of outputs as failed. A bad image is caught per row inside the task (reported,
not retried); a task whose actor keeps dying is retried ``max_task_retries`` times, then its
rows are reported, and the run goes on.

Python entry: ``run(paths, PredictOptions(outdir=...))``, or your own pipeline with
``dataset.map_batches(DepthProPredictor, fn_constructor_kwargs={"options": ...})`` on rows of
``rows(...)`` (see docs/ray.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .atomic_files import remove_temp_files
from .commands.predict_inputs import Source, output_paths
from .commands.predict_resume import PlyOptions, plan_work
from .commands.predict_run import Summary, predict_sources
from .provenance import Recipe, make_recipe, mismatch
from .ray_inputs import fetch, is_uri, rows

__all__ = ["DepthProPredictor", "PredictOptions", "incomplete", "rows", "run"]


@dataclass(frozen=True)
class PredictOptions:
    """What ``predict`` takes, for the actors (picklable; the model is loaded in each actor).

    ``device`` None: ``cuda`` when the actor was given a GPU, else ``cpu``; ``dtype`` and
    ``fast`` ``"auto"`` / None as ``predict`` resolves them for that device. ``checkpoint``
    None: random weights (with ``config``, e.g. ``"tiny"``). ``load``: a picklable function
    ``(checkpoint, **kwargs) -> (model, transform)`` replacing ``depthpro_fast.load`` (None)."""

    outdir: str
    formats: tuple[str, ...] = ("npz", "color")
    checkpoint: str | None = "auto"
    config: str | None = None
    device: str | None = None
    dtype: str = "auto"
    backend: str = "auto"
    fast: bool | None = None
    batch_size: int = 1
    f_px: float | None = None
    ignore_exif: bool = False
    overwrite: bool = False
    ply_stride: int | None = None  # None: auto (at most ply_max_points points)
    ply_max_points: int = 1 << 22
    ply_binary: bool = True
    npz_compress: bool = False
    seed: int | None = 0  # random weights only: the network's seed, as predict --seed
    intrinsics: tuple[float, float, float, float] | None = None  # predict --intrinsics
    workers: int = 2
    load: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        from .outputs import FORMATS

        object.__setattr__(self, "outdir", os.fspath(self.outdir))
        object.__setattr__(self, "formats", tuple(self.formats))
        if is_uri(self.outdir):
            raise ValueError(f"outdir {self.outdir}: outputs go to a folder every node sees "
                             "at the same path (a local folder on one machine, a shared "
                             "mount on a cluster), not to a URI")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats: unknown {unknown or '(none)'}; choose from "
                             f"{', '.join(FORMATS)}")
        for name in ("batch_size", "ply_stride", "ply_max_points", "workers"):
            value = getattr(self, name)
            if name == "ply_stride" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def ply(self) -> PlyOptions:
        return PlyOptions(self.ply_stride, self.ply_max_points, binary=self.ply_binary)

    def recipe(self, device: Any) -> Recipe:
        """What the outputs made on ``device`` record, and what a rerun compares
        (``provenance.make_recipe``; ``checkpoint`` must be resolved, never "auto")."""
        from .commands.predict import resolve_dtype_choice, resolve_fast_choice

        return make_recipe(self.checkpoint, config=self.config,
                           dtype=resolve_dtype_choice(self.dtype, device, self.fast),
                           fast=resolve_fast_choice(self.fast, device, self.dtype) is not False,
                           f_px=self.f_px, ignore_exif=self.ignore_exif,
                           seed=self.seed if self.checkpoint is None else None,
                           backend=self.backend, device=device, intrinsics=self.intrinsics)


def _stamp(paths: Sequence[Path]) -> tuple:
    """What changes when a file is (re)written: inode and mtime of each (None: missing)."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class DepthProPredictor:
    """A callable class for ``ray.data.Dataset.map_batches``: one model per actor.

    Input batch: ``source`` (local path or URI) and ``name`` (``predict``'s output name) per
    row, e.g. from ``rows()``. Output batch, one row per input: ``source``, ``name``,
    ``status`` (``written``, ``skipped``: its outputs existed, or ``failed``) and ``error``
    (why it failed, else empty). The outputs are written by the actor under
    ``options.outdir``."""

    def __init__(self, options: PredictOptions) -> None:
        import torch

        from .api import load, resolve_device
        from .commands.predict import resolve_dtype_choice, resolve_fast_choice

        self.options = options
        threads = _assigned_cpus()
        if threads:  # as many threads as Ray gave the actor: no oversubscribed cores
            torch.set_num_threads(max(1, int(threads)))
        device = resolve_device(options.device or ("cuda" if _assigned_gpus() else "cpu"))
        loader = options.load or load
        self.model, self.transform = loader(
            options.checkpoint, config=options.config, device=device,
            dtype=resolve_dtype_choice(options.dtype, device, options.fast),
            backend=options.backend,
            fast=resolve_fast_choice(options.fast, device, options.dtype),
            **({"seed": options.seed} if options.checkpoint is None else {}))
        self.device = device
        # this actor's own recipe (its device decides dtype and path): predict's resume rule
        # compares it with each existing output's record, input bytes included
        if options.checkpoint == "auto":  # a ray:// client left the search to the cluster
            from dataclasses import replace

            from .checkpoint import find_checkpoint

            options = replace(options, checkpoint=os.fspath(find_checkpoint()))
        self.recipe = options.recipe(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        o = self.options
        sources = [str(s) for s in batch["source"]]
        names = [str(n) for n in batch["name"]]
        outs = [output_paths(o.outdir, name, o.formats) for name in names]
        # a dead attempt of this task may have left temporaries of these outputs: not ours
        remove_temp_files([p for out in outs for p in out.values()])
        errors = [""] * len(sources)
        before = [_stamp(list(out.values())) for out in outs]
        with tempfile.TemporaryDirectory(prefix="depthpro-ray-") as tmp:
            named, index = [], {}
            for i, (source, name) in enumerate(zip(sources, names, strict=True)):
                try:
                    local = fetch(source, tmp)
                except Exception as e:  # unreadable URI: this row fails, the others go on
                    errors[i] = f"{type(e).__name__}: {e}"
                    continue
                index[str(local)] = i
                named.append((Source(local, PurePosixPath(name)), name))
            summary = predict_sources(
                named, self.model, self.transform, o.outdir, formats=list(o.formats),
                recipe=self.recipe, batch_size=o.batch_size, f_px=o.f_px,
                ignore_exif=o.ignore_exif, intrinsics=o.intrinsics, overwrite=o.overwrite,
                ply=o.ply, npz_compress=o.npz_compress, workers=o.workers, progress=False,
                random_weights=o.checkpoint is None)
        for path, why in summary.failed:
            i = index.get(path)
            if i is not None:
                errors[i] = why.replace(path, sources[i])  # the URI, not our temporary copy
        status = ["failed" if err else
                  "written" if _stamp(list(out.values())) != old else "skipped"
                  for err, out, old in zip(errors, outs, before, strict=True)]
        return {"source": np.array(sources, dtype=object), "name": np.array(names, dtype=object),
                "status": np.array(status, dtype=object), "error": np.array(errors, dtype=object)}


def _assigned_cpus() -> float:
    with contextlib.suppress(Exception):  # not inside Ray: nothing assigned
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    return 0.0


def _assigned_gpus() -> list:
    with contextlib.suppress(Exception):
        import ray

        return list(ray.get_gpu_ids())
    return []


def incomplete(todo: Sequence[dict[str, str]], outdir: str, formats: Sequence[str],
               ) -> list[str]:
    """The sources of ``todo`` that lack one of their outputs (after removing the temporary
    files of dead writers: no partial file is left under a final or a hidden name)."""
    missing = []
    for row in todo:
        paths = list(output_paths(outdir, row["name"], formats).values())
        remove_temp_files(paths)
        if not all(p.exists() for p in paths):
            missing.append(row["source"])
    return missing


def to_do(all_rows: Sequence[dict[str, str]], options: PredictOptions,
          ) -> tuple[list[dict[str, str]], dict[str, int]]:
    """(the rows to compute, {reason: count} of those computed again), by ``predict``'s
    resume rule: skipped only when every output exists and was made as this run would make
    it. The recipe is this machine's (``device`` as asked, else CUDA where this process sees
    a GPU, else the CPU); each actor checks again with its own recipe (its device's dtype)
    and the input's bytes (a URI is compared by its outputs' records only here)."""
    if options.overwrite:
        return list(all_rows), {}
    if options.checkpoint == "auto":  # a ray:// client: the file is found on the cluster
        return [r for r in all_rows if not all(p.exists() for p in output_paths(
            options.outdir, r["name"], options.formats).values())], {}
    import torch

    from .api import resolve_device
    from .outputs import read_provenance

    device = resolve_device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = options.recipe(device)
    local = [(Source(Path(r["source"]), PurePosixPath(r["name"])), r["name"])
             for r in all_rows if not is_uri(r["source"])]
    plan = plan_work(local, options.outdir, options.formats, recipe, ply=options.ply)
    todo_local = {str(source.path) for source, _ in plan.todo}
    recomputed: dict[str, int] = dict(plan.recomputed)
    todo = []
    for r in all_rows:
        if not is_uri(r["source"]):
            if r["source"] in todo_local:
                todo.append(r)
            continue
        for path in output_paths(options.outdir, r["name"], options.formats).values():
            why = (mismatch(read_provenance(path), recipe) if path.exists()
                   else "missing")
            if why is not None:
                todo.append(r)
                if why != "missing":
                    recomputed[why] = recomputed.get(why, 0) + 1
                break
    return todo, recomputed


def _connect(address: str | None, init_kwargs: dict[str, Any]) -> bool:
    """Connect to (or start) a cluster unless Ray is already up; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "local") and not (address is None and os.environ.get("RAY_ADDRESS")):
        ray.init(address="local", **{"include_dashboard": False, **init_kwargs})
    else:
        ray.init(address=address or os.environ["RAY_ADDRESS"], **init_kwargs)
    return True


def run(paths: Sequence[str], options: PredictOptions, *, address: str | None = None,
        recursive: bool = False, concurrency: int | None = None, num_gpus: float | None = None,
        num_cpus: float | None = None, max_task_retries: int = 3,
        progress_every: int | None = None, quiet: bool = False, ray_progress_bars: bool = False,
        predictor: type = DepthProPredictor, init_kwargs: dict[str, Any] | None = None,
        ) -> Summary:
    """Depth for every image of ``paths`` on a Ray cluster; returns ``predict``'s ``Summary``.

    ``address``: None starts a local cluster (or joins ``$RAY_ADDRESS``), ``"auto"`` joins the
    cluster ``ray start`` runs on this machine, ``"HOST:PORT"`` / ``"ray://HOST:10001"`` a
    remote one; when Ray is already initialised it is used as it is. Actors: by default one GPU
    each (``num_gpus=1``) and one per GPU when the cluster has GPUs, else one CPU each and one
    per CPU (``concurrency``, ``num_cpus``, ``num_gpus`` override), never more than the images
    to do. Progress: a line every ``progress_every`` images (default: about 20 lines per run)
    with images/s, on stderr; ``ray_progress_bars`` shows Ray's own bars instead."""
    import ray
    import ray.data

    from .outputs import check_output_folder

    if isinstance(max_task_retries, bool) or not isinstance(max_task_retries, int) \
            or max_task_retries < 0:
        raise ValueError(f"max_task_retries must be an integer >= 0, got {max_task_retries!r}")
    all_rows, problems, left_out = rows(list(paths), recursive, options.outdir)
    if not all_rows:
        raise FileNotFoundError(f"no images found in {' '.join(map(str, paths))}; nothing to do")
    if options.checkpoint == "auto" and not str(address or "").startswith("ray://"):
        from dataclasses import replace

        from .checkpoint import find_checkpoint

        # here, once, with a clear error; every actor then loads the same file (and the
        # resume rule below compares that file's identity)
        options = replace(options, checkpoint=os.fspath(find_checkpoint()))
    todo, recomputed = to_do(all_rows, options)
    summary = Summary(total=len(all_rows), skipped=len(all_rows) - len(todo),
                      missing=list(problems), left_out=dict(left_out))
    summary.recomputed.update(recomputed)
    if not todo:
        return summary
    check_output_folder(options.outdir, "output folder")
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr,
                                                                flush=True))
    start = time.perf_counter()
    own = _connect(address, dict(init_kwargs or {}))
    context = ray.data.DataContext.get_current()
    saved = (context.enable_progress_bars, context.max_errored_blocks)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if num_gpus is None:
            num_gpus = 1.0 if gpus >= 1 else 0.0
        if num_cpus is None:
            num_cpus = 1.0
        if concurrency is None:
            concurrency = int(gpus // num_gpus) if num_gpus else \
                int(float(resources.get("CPU", 1)) // num_cpus)
        concurrency = max(1, min(int(concurrency), len(todo)))
        kind = f"{num_gpus:g} GPU" if num_gpus else f"{num_cpus:g} CPU"
        say(f"ray: {len(todo)} of {len(all_rows)} images to do, {concurrency} actors "
            f"({kind} each), batch size {options.batch_size}; outputs in {options.outdir}")
        context.enable_progress_bars = ray_progress_bars
        context.max_errored_blocks = -1  # a task that failed its retries: the rest goes on
        # blocks of about one batch: a dead actor costs little work, and work spreads evenly
        blocks = max(1, min(math.ceil(len(todo) / options.batch_size), 20_000))
        with warnings.catch_warnings():
            # Ray >= 2.60 calls ray_remote_args deprecated, yet names no other way to bound
            # the retries of an actor task: without a bound, an image that kills its worker
            # would be retried forever
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            dataset = ray.data.from_items(todo, override_num_blocks=blocks).map_batches(
                predictor, fn_constructor_kwargs={"options": options},
                batch_size=options.batch_size, batch_format="numpy",
                # one task at a time per actor: a task queued behind one whose image kills
                # the actor would be killed with it and spend its retries for nothing
                compute=ray.data.ActorPoolStrategy(size=concurrency,
                                                   max_tasks_in_flight_per_actor=1),
                num_cpus=num_cpus,
                num_gpus=num_gpus or None, max_restarts=-1, max_task_retries=max_task_retries)
        every = progress_every or max(1, math.ceil(len(todo) / 20))
        seen: dict[str, tuple[str, str]] = {}
        first = None
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                if first is None:
                    first = time.perf_counter() - start
                for source, status, error in zip(batch["source"], batch["status"],
                                                 batch["error"], strict=True):
                    before = len(seen)
                    seen[str(source)] = (str(status), str(error))  # a source counts once
                    if len(seen) > before and len(seen) % every == 0 and len(seen) < len(todo):
                        say(_progress_line(seen, len(todo), time.perf_counter() - start,
                                           first))
        except KeyboardInterrupt:
            summary.interrupted = True
        except ray.exceptions.RayError as e:  # e.g. actors that cannot load the model
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise RuntimeError(f"the Ray pipeline failed: {lines[-1] if lines else e!r} "
                               "(Ray's log has the details)") from e
    finally:
        context.enable_progress_bars, context.max_errored_blocks = saved
        if own:
            ray.shutdown()  # its actors with it: nothing writes after this
    summary.seconds = time.perf_counter() - start
    for source, (status, error) in seen.items():
        if status == "failed":
            summary.failed.append((source, error))
        else:  # "skipped" here: written by an attempt of this run whose actor died after it
            summary.written += 1
    if not summary.interrupted:
        say(_progress_line(seen, len(todo), summary.seconds, first))
    failed = {source for source, _ in summary.failed}
    for source in incomplete(todo, options.outdir, options.formats):
        if source not in failed and not (summary.interrupted and source not in seen):
            summary.failed.append((source, "no complete set of outputs after the run (its task"
                                           f" failed {max_task_retries + 1} times: see Ray's "
                                           "log)"))
            if source in seen:  # counted as written by a result, yet a file is gone
                summary.written -= 1
    return summary


def _progress_line(seen: dict[str, tuple[str, str]], total: int, seconds: float,
                   first: float | None) -> str:
    failed = sum(1 for status, _ in seen.values() if status == "failed")
    done = len(seen) - failed
    rate = done / seconds if seconds > 0 else 0.0
    start = f", first result after {first:.1f} s" if first is not None else ""
    return (f"ray: {len(seen)}/{total} images ({done} written, {failed} failed) in "
            f"{seconds:.1f} s, {rate:.2f} images/s{start}")
