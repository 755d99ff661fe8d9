"""``depthpro-fast predict PATH... [-o OUTDIR]``: depth maps for photos, folders and globs.

Inputs: image files (any format Pillow reads, HEIC with pillow-heif), folders (their images;
``--recursive`` for sub-folders) and glob patterns (quote them; ``**`` spans sub-folders).
Folder walks skip hidden files, the output folder and this command's own ``.color.png`` /
``.depth_mm.png`` outputs.

Output names: ``OUTDIR/<relative path without extension><suffix>``, the relative path taken
from the folder argument (or from the fixed leading part of a glob), so sub-folders are kept;
a file given by itself lands at the top of OUTDIR. Inputs that would share a name (``a.jpg`` and
``a.png``, or the same relative path under two folders) keep their extension (``a.jpg.npz``)
and, if still equal, get ``~2``, ``~3``... in sorted order. Suffixes: ``outputs.FORMATS``.

An image whose requested outputs all exist is skipped (``--overwrite`` recomputes it); every
file is written atomically. A file that cannot be read or processed is reported and skipped;
the exit code is 1 if any failed. Under ``torchrun`` the sorted input list is sharded by rank
(see ``depthpro_fast.distributed``).

Images are decoded and outputs written by background threads while the model runs. With
``--batch-size N`` the images, each resized to 1536 x 1536 as in ``infer``, go through the
network N at a time; the post-processing (focal length, resize back, reciprocal) is done per
image at its original size with ``infer``'s arithmetic, so results equal ``model.infer`` per
image up to float rounding of the batched network.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..workers import DaemonPool

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".webp",
                            ".bmp", ".heic", ".heif", ".hif", ".avif"})
DEFAULT_SAVE = "npz,color"
DTYPE_CHOICES = ["auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..outputs import FORMATS

    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files, folders or quoted glob patterns")
    parser.add_argument("-o", "--outdir", default="depthpro_out",
                        help="output folder (default: ./depthpro_out)")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="also take images from sub-folders of folder arguments")
    parser.add_argument("--save", default=DEFAULT_SAVE,
                        help="comma list of outputs: " + ", ".join(
                            f"{k} ({v})" for k, v in FORMATS.items())
                        + f", or all (default: {DEFAULT_SAVE})")
    parser.add_argument("--checkpoint", default=None,
                        help="depth_pro.pt, a .safetensors, a Hugging Face DepthPro-hf folder, "
                             "or auto (default: auto = search, see `depthpro-fast info`)")
    parser.add_argument("--random-weights", action="store_true",
                        help="no checkpoint: random weights, to try the command without "
                             "downloading anything (with --config, e.g. --config tiny); the "
                             "depth maps are meaningless")
    parser.add_argument("--config", default=None,
                        help="preset (official, tiny) or JSON file of knobs (default: official)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 (default: cuda if available; under torchrun "
                             "cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto = float16 on CUDA (as the official CLI), float32 on CPU")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "reference", "triton", "cuda"])
    parser.add_argument("--fast", action="store_true",
                        help="run the fast path (fused ViT epilogues, exact conv folds, "
                             "channels_last; on CUDA a side stream and CUDA graphs), see "
                             "docs/fast_path.md; the FOV network is skipped for images whose "
                             "focal length is known")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per network call (default: 1)")
    parser.add_argument("--f-px", type=float, default=None,
                        help="focal length in pixels for every image (overrides EXIF and the "
                             "estimate)")
    parser.add_argument("--ignore-exif", action="store_true",
                        help="do not use the EXIF focal length (orientation is still applied)")
    parser.add_argument("--ply-stride", type=int, default=1,
                        help="keep every N-th row and column in the point cloud (default: 1)")
    parser.add_argument("--ply-ascii", action="store_true", help="ASCII PLY instead of binary")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose outputs already exist")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads for decoding and for writing, each (default: 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.epilog = (
        "Outputs: npz = depth (float32 metres), focallength_px, fov_deg (the FOV of "
        "focallength_px), fov_deg_estimated (the network's estimate, when the FOV network "
        "ran), image_size, focallength_source (estimated, exif, given); png16 = "
        "uint16 depth in millimetres (depths beyond 65.535 m are stored as 65535, i.e. "
        "clipped; 0 = invalid); color = turbo-style preview of the inverse depth (near red, far "
        "blue), same size as the image; ply = coloured point cloud, pinhole with the principal "
        "point at the image centre, metres, OpenCV axes. Exit code 1 if any image failed.")


# ----------------------------------------------------------------------------------------------
# inputs and output names
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """An input image and its path relative to the folder (or glob base) it was found in."""

    path: Path
    rel: PurePosixPath


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_base(pattern: str) -> Path:
    """The fixed leading folders of a glob pattern (``photos/2024/*.jpg`` -> ``photos/2024``)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_own_output(name: str) -> bool:
    from ..outputs import FORMATS

    return name.endswith((FORMATS["color"], FORMATS["png16"]))


def _walk(root: Path, recursive: bool, exclude: Path | None) -> tuple[list[Path], int]:
    """(image files under ``root``, number of sub-folders left out because not ``recursive``)."""
    found, left_out = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve() == exclude and here.resolve() != root.resolve():
            dirnames[:] = []
            continue
        visible = sorted(d for d in dirnames if not d.startswith("."))
        if not recursive:  # the output folder is not an input folder: not counted
            left_out += sum(1 for d in visible if (here / d).resolve() != exclude)
        dirnames[:] = visible if recursive else []
        for name in sorted(filenames):
            if (name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES
                    or _is_own_output(name)):
                continue
            found.append(here / name)
    return found, left_out


def collect_sources(paths: Sequence[str], recursive: bool = False,
                    outdir: str | os.PathLike | None = None,
                    ) -> tuple[list[Source], list[tuple[str, str]], dict[str, int]]:
    """Expand files, folders and globs -> (sorted unique sources, [(argument, problem)],
    {folder argument: sub-folders not searched because not ``recursive``})."""
    exclude = Path(outdir).resolve() if outdir is not None else None
    sources: list[Source] = []
    problems: list[tuple[str, str]] = []
    left_out: dict[str, int] = {}

    def walk(folder: Path, arg: str) -> list[Path]:
        files, n = _walk(folder, recursive, exclude)
        if n:
            left_out[arg] = left_out.get(arg, 0) + n
        return files

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            sources += [Source(f, PurePosixPath(f.relative_to(p).as_posix()))
                        for f in walk(p, arg)]
        elif p.is_file():
            sources.append(Source(p, PurePosixPath(p.name)))
        elif _has_magic(arg):
            base = _glob_base(arg)
            matched = []
            for m in sorted(glob.glob(arg, recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    matched += [Source(f, PurePosixPath(f.relative_to(base).as_posix()))
                                for f in walk(mp, arg)]
                elif (mp.is_file() and mp.suffix.lower() in IMAGE_SUFFIXES
                      and not mp.name.startswith(".") and not _is_own_output(mp.name)):
                    matched.append(Source(mp, PurePosixPath(mp.relative_to(base).as_posix())))
            if not matched:
                problems.append((arg, "no image matches this pattern"))
            sources += matched
        else:
            problems.append((arg, "no such file or folder"))
    unique, seen = [], set()
    for s in sorted(sources, key=lambda s: (str(s.rel), str(s.path))):
        real = os.path.realpath(s.path)
        if real not in seen:  # the same file reached twice (two arguments, a link)
            seen.add(real)
            unique.append(s)
    return unique, problems, left_out


def assign_names(sources: Sequence[Source]) -> list[tuple[Source, str]]:
    """A unique output name (relative, posix, no suffix) per source; deterministic."""
    by_stem: dict[str, list[Source]] = defaultdict(list)
    for s in sources:
        by_stem[str(s.rel.with_suffix("")).casefold()].append(s)
    names = {}
    for group in by_stem.values():
        for s in group:  # colliding stems keep their extension
            names[s] = str(s.rel.with_suffix("")) if len(group) == 1 else str(s.rel)
    taken: dict[str, int] = defaultdict(int)
    result = []
    for s in sources:
        name = names[s]
        taken[name.casefold()] += 1
        if taken[name.casefold()] > 1:  # still equal: same relative path under two roots
            name = f"{name}~{taken[name.casefold()]}"
        result.append((s, name))
    return result


def output_paths(outdir: str | os.PathLike, name: str, formats: Sequence[str]) -> dict[str, Path]:
    from ..outputs import FORMATS

    base = Path(outdir).joinpath(*name.split("/"))
    return {fmt: base.with_name(base.name + FORMATS[fmt]) for fmt in formats}


def parse_save(text: str) -> list[str]:
    from ..outputs import FORMATS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"--save: unknown output {', '.join(unknown) or '(empty)'}; choose "
                         f"from {', '.join(FORMATS)} (comma separated) or all")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# batched inference
# ----------------------------------------------------------------------------------------------


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
                              fov_deg_estimated=fov_estimated, random_weights=random_weights)
        elif fmt == "png16":
            outputs.write_png16(path, depth)
        elif fmt == "color":
            outputs.write_color(path, depth)
        elif fmt == "ply":
            outputs.write_ply(path, depth, job.rgb, f_px, stride=ply_stride, binary=ply_binary,
                              fov_deg=fov)
        else:  # parse_save only lets known formats through
            raise ValueError(f"unknown output format {fmt!r}")


def predict_sources(named: Sequence[tuple[Source, str]], model: Any, transform: Callable,
                    outdir: str | os.PathLike, *, formats: Sequence[str],
                    batch_size: int = 1, f_px: float | None = None, ignore_exif: bool = False,
                    overwrite: bool = False, ply_stride: int = 1, ply_binary: bool = True,
                    workers: int = 2, progress: bool = True, label: str = "",
                    random_weights: bool = False) -> Summary:
    """Run the model over ``named`` (from ``assign_names``) and write the outputs."""
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
                    if f_px is not None:
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


def format_summary(s: Summary, outdir: str | os.PathLike) -> str:
    """One line (then the failures, one per line). The rate counts only images the model
    processed and written, so that a missing file or a skipped image does not show up as
    thousands of images per second."""
    rate = f" ({s.written / s.seconds:.2f} images/s)" if s.written and s.seconds > 0 else ""
    not_done = f", {s.not_done} not done" if s.interrupted else ""
    text = (f"{'interrupted: ' if s.interrupted else ''}{_plural(s.total, 'image')}: "
            f"{s.written} written, {s.skipped} skipped (outputs exist), {len(s.failed)} failed"
            f"{not_done}" + (f", in {s.seconds:.1f} s{rate}" if s.seconds > 0 else ""))
    if s.missing:
        text += f"; {_plural(len(s.missing), 'argument')} matched no image"
    if s.left_out:
        text += f"; {left_out_note(s.left_out)}"
    text += f"; outputs in {outdir}"
    if s.failed:
        text += "\nfailed:\n" + "\n".join(f"  {path}: {why}" for path, why in s.failed)
    if s.missing:
        text += "\nno image:\n" + "\n".join(f"  {arg}: {why}" for arg, why in s.missing)
    if s.interrupted:
        text += "\na rerun with the same arguments continues where this one stopped"
    return text


def left_out_note(left_out: dict[str, int]) -> str:
    n = sum(left_out.values())
    where = ", ".join(left_out)
    return (f"{_plural(n, 'sub-folder')} of {where} not searched (-r / --recursive takes "
            f"{'it' if n == 1 else 'them'})")


# what users type when they mean "no checkpoint" (Python's checkpoint=None)
_NO_CHECKPOINT_WORDS = frozenset({"none", "null", "random", "no", "false", "-"})
RANDOM_WEIGHTS_NOTE = ("NOTE: --random-weights: the network has random weights, so the depth "
                       "maps and focal lengths are MEANINGLESS (this only shows that the "
                       "command works). For real depth: `depthpro-fast download`, then run "
                       "without --random-weights.")


def checkpoint_choice(args: argparse.Namespace) -> str | None:
    """What to pass to ``load``: a checkpoint path, ``"auto"``, or None for random weights."""
    if args.random_weights:
        if args.checkpoint is not None:
            raise ValueError(f"--random-weights and --checkpoint {args.checkpoint} exclude each "
                             "other (random weights replace the checkpoint); drop one")
        if args.config is None:
            raise ValueError("--random-weights needs --config: tiny (a small network, seconds "
                             "per image on a CPU) or official (the full-size network: minutes "
                             "per image on a CPU)")
        return None
    if args.checkpoint is None:
        return "auto"
    if (args.checkpoint.strip().lower() in _NO_CHECKPOINT_WORDS
            and not os.path.exists(args.checkpoint)):
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file. To run without Apple's "
                         "weights pass --random-weights --config tiny instead (the depth is "
                         "then meaningless)")
    return args.checkpoint


def _resolve_dtype(dtype: str, device: Any) -> str:
    if dtype != "auto":
        return dtype
    return "float16" if device.type == "cuda" else "float32"


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..api import load, resolve_device
    from ..backends import require_backend
    from ..outputs import check_output_folder

    # every check that needs no image and no model comes first, each once
    formats = parse_save(args.save)
    checkpoint = checkpoint_choice(args)
    if args.f_px is not None and not (math.isfinite(args.f_px) and args.f_px > 0):
        raise ValueError(f"--f-px must be a positive number of pixels, got {args.f_px}")
    if args.ply_stride < 1:
        raise ValueError(f"--ply-stride must be >= 1, got {args.ply_stride}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")

    rank, world = distributed.rank_world()
    label = f"rank {rank}/{world}" if world > 1 else ""
    prefix = f"[{label}] " if label else ""
    own_group = distributed.init_process_group() if world > 1 else False
    try:
        device = resolve_device(distributed.local_device(args.device))
        require_backend(args.backend, device)  # not once per image, after loading
        sources, problems, left_out = collect_sources(args.paths, args.recursive, args.outdir)
        if rank == 0:  # reported once
            for arg, why in problems:
                print(f"depthpro-fast predict: {arg}: {why}", file=sys.stderr)
            if left_out:
                print(f"depthpro-fast predict: note: {left_out_note(left_out)}",
                      file=sys.stderr)
        if not sources:
            if len(problems) == len(args.paths):  # each argument already said why, above
                which = ("the path given is no image and matches none" if len(problems) == 1
                         else f"none of the {len(problems)} paths given is or matches an image")
                raise FileNotFoundError(f"no images found: {which} (see above); nothing to do")
            looked = f"looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
            if left_out:
                looked += f"; {left_out_note(left_out)}"
            raise FileNotFoundError(f"no images found in {' '.join(args.paths)} ({looked}); "
                                    "nothing to do")
        named = distributed.shard(assign_names(sources), rank, world,
                                  key=lambda pair: (str(pair[0].rel), str(pair[0].path)))
        todo = [n for n in named if args.overwrite or not all(
            p.exists() for p in output_paths(args.outdir, n[1], formats).values())]

        if todo:
            check_output_folder(args.outdir, "output folder (-o)")  # before the model loads
            if checkpoint is None and rank == 0:
                print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
            t0 = time.perf_counter()
            model, transform = load(checkpoint, config=args.config, device=device,
                                    dtype=_resolve_dtype(args.dtype, device),
                                    backend=args.backend, fast=args.fast)
            load_s = time.perf_counter() - t0
            summary = predict_sources(
                named, model, transform, args.outdir, formats=formats,
                batch_size=args.batch_size, f_px=args.f_px, ignore_exif=args.ignore_exif,
                overwrite=args.overwrite, ply_stride=args.ply_stride,
                ply_binary=not args.ply_ascii, workers=args.workers,
                progress=not args.quiet and rank == 0, label=label,
                random_weights=checkpoint is None)
            weights = "random weights, " if checkpoint is None else ""
            head = (f"model loaded in {load_s:.1f} s on {device} ({weights}{model.backend} "
                    "backend); ")
        else:  # every output exists: no model to load
            summary = Summary(total=len(named), skipped=len(named))
            head = "nothing left to do (--overwrite recomputes), model not loaded; "
        if rank == 0:
            summary.missing = list(problems)
            summary.left_out = dict(left_out)

        print(prefix + head + format_summary(summary, args.outdir),
              file=sys.stderr if world > 1 else sys.stdout)
        if checkpoint is None and rank == 0 and todo:  # again at the end, where the eye lands
            print(RANDOM_WEIGHTS_NOTE, file=sys.stdout)
        if summary.interrupted:  # Ctrl-C: the partial summary above, no collective (may hang)
            return 130
        failed = len(summary.failed) + len(summary.missing)
        if world > 1:
            total, written, skipped, failed, seconds = distributed.sum_counts(
                [summary.total, summary.written, summary.skipped, failed, summary.seconds])
            if rank == 0:
                print(f"all {world} ranks: {_plural(int(total), 'image')}: {int(written)} "
                      f"written, {int(skipped)} skipped, {int(failed)} failed")
        return 1 if failed else 0
    finally:
        if own_group:
            distributed.destroy_process_group()
