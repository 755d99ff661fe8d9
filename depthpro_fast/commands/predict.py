"""``depthpro-fast predict PATH... [-o OUTDIR]``: depth maps for photos, folders and globs.

The command: its options, the checks made before any work (options, backend, inputs, output
folder; each once), the model load (skipped when nothing is left to do) and the summary.
Inputs and output names: ``predict_inputs``; the batched run: ``predict_run``.

An image is skipped only when its requested outputs all exist and were made the same way
(weights, config, precision, path, focal-length request, input bytes, PLY options: each file
records what made it, see ``depthpro_fast.provenance`` and docs/cli.md); the others are
computed again and the summary says why. ``--overwrite`` recomputes everything; every file is
written atomically. A file that cannot be read or processed is reported and skipped;
the exit code is 1 if any failed or an argument matched no image, 130 after Ctrl-C. Under
``torchrun`` the sorted input list is sharded by rank (see ``depthpro_fast.distributed``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

from ..words import plural
from .predict_inputs import (  # noqa: F401 (the command's public names, kept here)
    IMAGE_SUFFIXES,
    Source,
    assign_names,
    collect_sources,
    output_paths,
    parse_save,
)
from .predict_post import BANDED_ABOVE_PIXELS
from .predict_progress import Progress
from .predict_resume import PlyOptions, plan_work, recomputed_lines
from .predict_run import (  # noqa: F401
    Summary,
    announce,
    infer_batch,
    predict_sources,
    write_outputs,
)
from .predict_video import (
    clips_to_do,
    format_clip_summary,
    predict_clips,
    split_clips,
    video_options,
)

DEFAULT_SAVE = "npz,color"
DTYPE_CHOICES = ["auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16",
                 "bf16-mixed", "fp8"]


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
    parser.add_argument("--seed", type=int, default=None,
                        help="with --random-weights: the seed of the weights (default: 0, so "
                             "that reruns use the same network; recorded in the outputs)")
    parser.add_argument("--config", default=None,
                        help="preset (official, tiny) or JSON file of knobs (default: official)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 (default: cuda if available; under torchrun "
                             "cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto = float16 on CUDA (as the official CLI); on a CPU "
                             "bf16-mixed where it has bf16 arithmetic (AVX512_BF16 / AMX; "
                             "bfloat16 with --no-fast), else float32 (`depthpro-fast info` says "
                             "which); bf16-mixed = an fp32 model whose GEMMs and convolutions "
                             "take bf16 inputs (CPU fast path; about 1e-5 from fp32, bf16 about "
                             "1e-3); fp8 = the fast path's fp8 mode "
                             "(e4m3 ViT GEMMs, bf16 elsewhere; CUDA compute capability >= 8.9, "
                             "an emulation for tests on a CPU; implies --fast)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "reference", "torch", "triton", "cuda"])
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="the fast path (fused ViT epilogues, exact conv folds, "
                             "channels_last; on a CPU PyTorch's flash attention and the faster "
                             "GEMM library; on CUDA a side stream and CUDA graphs), see "
                             "docs/fast_path.md; the FOV network is skipped for images whose "
                             "focal length is known. Default: on for a CPU (the same function "
                             "as the reference up to float32 rounding, and faster), off on "
                             "CUDA; --no-fast runs the reference path")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per network call (default: 1)")
    parser.add_argument("--f-px", type=float, default=None,
                        help="focal length in pixels for every image (overrides EXIF and the "
                             "estimate)")
    parser.add_argument("--intrinsics", default=None, metavar="FX,FY,CX,CY",
                        help="the camera of every image, in pixels of the image as read: the "
                             "depth uses FX, the point cloud all four, every output stores K "
                             "(instead of --f-px; overrides EXIF and the estimate; "
                             "docs/intrinsics.md)")
    parser.add_argument("--per-frame-focal", action="store_true",
                        help="videos: the focal length estimated for every frame (default: "
                             "one per clip, the median of 8 sampled frames; see docs/video.md)")
    parser.add_argument("--ignore-exif", action="store_true",
                        help="do not use the EXIF focal length (orientation is still applied)")
    parser.add_argument("--ply-stride", default="auto",
                        help="keep every N-th row and column in the point cloud; auto (the "
                             "default): the smallest stride that keeps at most "
                             "--ply-max-points points (every pixel up to 4 MP)")
    parser.add_argument("--ply-max-points", type=int, default=PlyOptions.max_points,
                        help="the cap of --ply-stride auto (default: %(default)s; the network "
                             "predicts at 1536x1536 = 2.4 M samples)")
    parser.add_argument("--ply-ascii", action="store_true", help="ASCII PLY instead of binary")
    parser.add_argument("--npz-compress", action="store_true",
                        help="deflate the npz (smaller, slower to write; np.load reads it the "
                             "same way)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose outputs already exist")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads for decoding and for writing, each (default: 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from . import predict_ray  # --ray [ADDRESS]: the same work on a Ray cluster

    predict_ray.add_arguments(parser)
    parser.epilog = (
        "Outputs: npz = depth (float32 metres), focallength_px, fov_deg (the FOV of "
        "focallength_px), fov_deg_estimated (the network's estimate, when the FOV network "
        "ran), image_size, focallength_source (estimated, exif, given); png16 = "
        "uint16 depth in millimetres (depths beyond 65.535 m are stored as 65535, i.e. "
        "clipped; 0 = invalid); color = turbo-style preview of the inverse depth (near red, far "
        "blue), same size as the image; ply = coloured point cloud, pinhole with K (--intrinsics, "
        "else the focal length and the image centre), metres, OpenCV axes. Every output "
        "records what made it (weights, config, dtype, path, focal length, input, options; "
        "docs/cli.md): a rerun skips only outputs made the same way. Exit code 1 if any image "
        "failed.")


def format_summary(s: Summary, outdir: str | os.PathLike, *,
                   ply_max_points: int = PlyOptions.max_points, npz_compress: bool = False,
                   ) -> str:
    """One line (then the failures, one per line). The rate counts only images the model
    processed and written, so that a missing file or a skipped image does not show up as
    thousands of images per second."""
    rate = f" ({s.written / s.seconds:.2f} images/s)" if s.written and s.seconds > 0 else ""
    not_done = f", {s.not_done} not done" if s.interrupted else ""
    text = (f"{'interrupted: ' if s.interrupted else ''}{plural(s.total, 'image')}: "
            f"{s.written} written, {s.skipped} skipped (made the same way), {len(s.failed)} "
            "failed"
            f"{not_done}" + (f", in {s.seconds:.1f} s{rate}" if s.seconds > 0 else ""))
    if s.missing:
        text += f"; {plural(len(s.missing), 'argument')} matched no image"
    if s.left_out:
        text += f"; {left_out_note(s.left_out)}"
    text += f"; outputs in {outdir}"
    for line in recomputed_lines(s.recomputed):
        text += "\n" + line
    for line in size_notes(s, ply_max_points, npz_compress):
        text += "\n" + line
    if s.failed:
        text += "\nfailed:\n" + "\n".join(f"  {path}: {why}" for path, why in s.failed)
    if s.missing:
        text += "\nno image:\n" + "\n".join(f"  {arg}: {why}" for arg, why in s.missing)
    if s.interrupted:
        text += "\na rerun with the same arguments continues where this one stopped"
    return text


def size_notes(s: Summary, ply_max_points: int = PlyOptions.max_points,
               npz_compress: bool = False) -> list[str]:
    """What was chosen for big images: the PLY stride (auto) and the banded resize."""
    notes = []
    for stride, n in sorted(s.ply_strides.items()):
        notes.append(f"PLY: stride {stride} for {plural(n, 'image')} (at most "
                     f"{ply_max_points} points; --ply-stride 1 keeps every pixel)")
    if s.big_images:
        mp = max(s.big_images) / 1e6
        npz = ("" if npz_compress else f"; npz {max(s.big_images) * 4 / 1e6:.0f} MB "
               "uncompressed (--npz-compress deflates it)")
        notes.append(f"{plural(len(s.big_images), 'image')} above "
                     f"{BANDED_ABOVE_PIXELS / 1e6:.1f} MP (largest {mp:.1f} MP): depth "
                     f"resized back in bands of rows{npz}")
    return notes


def left_out_note(left_out: dict[str, int]) -> str:
    n = sum(left_out.values())
    where = ", ".join(left_out)
    return (f"{plural(n, 'sub-folder')} of {where} not searched (-r / --recursive takes "
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


def parse_ply_stride(text: str) -> int | None:
    """``--ply-stride``: ``auto`` (None) or a positive integer."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        stride = int(text)
    except ValueError:
        stride = 0
    if stride < 1:
        raise ValueError(f"--ply-stride must be auto or an integer >= 1, got {text}")
    return stride


def resolve_checkpoint(choice: str | None) -> str | None:
    """``checkpoint_choice``'s answer with ``auto`` resolved to the file it finds, so that the
    file fingerprinted for the records is the file loaded."""
    if choice != "auto":
        return choice
    from ..checkpoint import find_checkpoint

    return os.fspath(find_checkpoint())


def _resolve_dtype(dtype: str, device: Any, fast: bool | None = None) -> str:
    """``--dtype`` with ``auto`` resolved by ``depthpro_fast.api.auto_precision``, as a name."""
    if dtype != "auto":
        return dtype
    from ..api import auto_precision

    chosen = auto_precision(device, fast=fast)
    return chosen if isinstance(chosen, str) else str(chosen).removeprefix("torch.")


def _resolve_fast(fast: bool | None, device: Any, dtype: str = "") -> bool | None:
    """``--fast`` / ``--no-fast``, or by default: on for a CPU, off on CUDA; for fp8 (the fast
    path's mode) the default is None, which load() turns on (and --no-fast it refuses)."""
    if dtype in ("fp8", "bf16-mixed") and fast is None:
        return None
    return device.type == "cpu" if fast is None else fast


def run(args: argparse.Namespace) -> int:
    from ..qualification import default_mode

    with default_mode("subprocess"):  # kernels qualify in a child: a crash cannot end the run
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..api import load, resolve_device
    from ..backends import require_backend
    from ..config import resolve_config
    from ..outputs import check_output_folder
    from ..provenance import make_recipe
    from ..video_io import import_av

    # every check that needs no image and no model comes first, each once
    formats = parse_save(args.save)
    checkpoint = checkpoint_choice(args)
    resolve_config(args.config)  # a wrong --config is said before any checkpoint search
    if args.seed is not None and checkpoint is not None:
        raise ValueError(f"--seed {args.seed} applies to --random-weights only (a checkpoint's "
                         "weights have no seed); drop it")
    seed = (0 if args.seed is None else args.seed) if checkpoint is None else None
    if args.f_px is not None and not (math.isfinite(args.f_px) and args.f_px > 0):
        raise ValueError(f"--f-px must be a positive number of pixels, got {args.f_px}")
    from ..intrinsics import parse as parse_intrinsics

    intrinsics = None if args.intrinsics is None else parse_intrinsics(args.intrinsics)
    if intrinsics is not None and args.f_px is not None:
        raise ValueError("--f-px and --intrinsics both give the focal length: pass one "
                         "(--intrinsics' FX is the focal length of the depth)")
    if args.ply_max_points < 1:
        raise ValueError(f"--ply-max-points must be >= 1, got {args.ply_max_points}")
    ply = PlyOptions(parse_ply_stride(args.ply_stride), args.ply_max_points,
                     binary=not args.ply_ascii)
    if args.f_px is not None and args.per_frame_focal:
        raise ValueError("--f-px and --per-frame-focal exclude each other (a given focal "
                         "length is used for every frame); drop one")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if getattr(args, "ray", None) is not None:  # the same work on a Ray cluster
        from . import predict_ray

        return predict_ray.run(args, formats, checkpoint, ply=ply, seed=seed,
                               intrinsics=intrinsics)

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
        named, clips = split_clips(named)  # videos: depthpro_fast.video, one folder each
        # what this run would make, known before the model loads: the resume rule needs it
        checkpoint = resolve_checkpoint(checkpoint)
        dtype = _resolve_dtype(args.dtype, device, args.fast)
        fast = _resolve_fast(args.fast, device, args.dtype)
        recipe = make_recipe(checkpoint, config=args.config, dtype=dtype,
                             fast=fast is not False, f_px=args.f_px,
                             ignore_exif=args.ignore_exif, seed=seed, backend=args.backend,
                             device=device, intrinsics=intrinsics)
        plan = plan_work(named, args.outdir, formats, recipe, ply=ply, overwrite=args.overwrite)
        if rank == 0:
            for line in recomputed_lines(plan.recomputed):  # why work that looked done is redone
                print(f"depthpro-fast predict: {line}", file=sys.stderr)

        clips_todo = clips_to_do(clips, args.outdir, args.overwrite, recipe)
        if clips_todo:
            import_av()  # before the model loads: a clear error if PyAV is missing
        clip_summaries = []

        if plan.todo or clips_todo:
            check_output_folder(args.outdir, "output folder (-o)")  # before the model loads
            if checkpoint is None and rank == 0:
                print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
            progress = Progress(len(plan.todo), label=label,
                                enabled=not args.quiet and rank == 0)
            what = (f"random weights (seed {seed})" if checkpoint is None
                    else os.path.basename(checkpoint))
            try:
                with progress.step(f"loading the model ({what}, config {recipe.config}, "
                                   f"{recipe.dtype}, {recipe.path} path)"):
                    t0 = time.perf_counter()
                    model, transform = load(checkpoint, config=args.config, device=device,
                                            dtype=dtype, backend=args.backend, fast=fast,
                                            **({"seed": seed} if checkpoint is None else {}))
                    load_s = time.perf_counter() - t0
            except BaseException:
                progress.close()
                raise
            summary = predict_sources(
                named, model, transform, args.outdir, formats=formats, recipe=recipe,
                plan=plan, batch_size=args.batch_size, f_px=args.f_px,
                ignore_exif=args.ignore_exif, intrinsics=intrinsics, overwrite=args.overwrite,
                ply=ply, npz_compress=args.npz_compress, workers=args.workers,
                progress=progress, label=label, random_weights=checkpoint is None)
            if clips and not summary.interrupted:
                clip_summaries = predict_clips(
                    clips, model, transform, args.outdir,
                    video_options(args, progress=not args.quiet and rank == 0, label=label,
                                  random_weights=checkpoint is None, recipe=recipe))
            weights = f"random weights of seed {seed}, " if checkpoint is None else ""
            path = ("fast path" if getattr(model, "fast_engine", None) is not None
                    else "reference path")
            dtype_used = str(transform.dtype).removeprefix("torch.")
            engine = getattr(model, "fast_engine", None)
            if engine is not None and engine.options.fp8:
                dtype_used = "fp8 (e4m3 ViT GEMMs, bfloat16 elsewhere)"
            elif engine is not None and engine.options.gemm_dtype == "bf16":
                dtype_used = "bf16-mixed (bf16 GEMM and conv inputs, float32 elsewhere)"
            head = (f"model loaded in {load_s:.1f} s on {device} ({weights}{path}, "
                    f"{dtype_used}, {model.backend} backend); ")
        else:  # every output exists and was made the same way: no model to load
            summary = Summary(total=len(named), skipped=len(named))
            clip_summaries = predict_clips(clips, None, None, args.outdir, video_options(
                args, progress=False, label=label, random_weights=False, recipe=recipe))
            head = "nothing left to do (--overwrite recomputes), model not loaded; "
        if rank == 0:
            summary.missing = list(problems)
            summary.left_out = dict(left_out)

        image_line = (format_summary(summary, args.outdir, ply_max_points=ply.max_points,
                                     npz_compress=args.npz_compress)
                      if named or not clips else "")
        print(prefix + head + "\n".join(filter(None, [image_line] + [
            format_clip_summary(c) for c in clip_summaries])),
              file=sys.stderr if world > 1 else sys.stdout)
        if checkpoint is None and rank == 0 and plan.todo:  # again at the end, where it's seen
            print(RANDOM_WEIGHTS_NOTE, file=sys.stdout)
        # Ctrl-C: the partial summary above, no collective (may hang)
        if summary.interrupted or any(c.interrupted for c in clip_summaries):
            return 130
        failed = (len(summary.failed) + len(summary.missing)
                  + sum(c.error is not None for c in clip_summaries))
        if world > 1:
            total, written, skipped, failed, seconds = distributed.sum_counts(
                [summary.total, summary.written, summary.skipped, failed, summary.seconds])
            if rank == 0:
                print(f"all {world} ranks: {plural(int(total), 'image')}: {int(written)} "
                      f"written, {int(skipped)} skipped, {int(failed)} failed")
        return 1 if failed else 0
    finally:
        if own_group:
            distributed.destroy_process_group()


# public names for the Ray path (depthpro_fast.ray_data resolves them in each actor)
resolve_dtype_choice = _resolve_dtype
resolve_fast_choice = _resolve_fast
