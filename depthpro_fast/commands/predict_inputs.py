"""``predict``'s inputs and output names: files, folders and globs -> sources -> names.

Inputs: image files (any format Pillow reads, HEIC with pillow-heif) and video clips
(``video_io.VIDEO_SUFFIXES``, decoded with PyAV), folders (their images and clips;
``--recursive`` for sub-folders) and glob patterns (quote them; ``**`` spans sub-folders).
Folder walks skip hidden files, the output folder and this command's own ``.color.png`` /
``.depth_mm.png`` outputs; a folder walked without ``--recursive`` counts the sub-folders it
leaves out, so that the command can say so.

Output names: ``OUTDIR/<relative path without extension><suffix>``, the relative path taken
from the folder argument (or from the fixed leading part of a glob), so sub-folders are kept;
a file given by itself lands at the top of OUTDIR. Inputs that would share a name (``a.jpg`` and
``a.png``, or the same relative path under two folders) keep their extension (``a.jpg.npz``)
and, if still equal, get ``~2``, ``~3``... in sorted order. Suffixes: ``outputs.FORMATS``.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..video_io import PREVIEW_FILE, VIDEO_SUFFIXES

# every format load_image reads (a GIF gives its first frame), so that a folder yields what the
# same files named one by one would
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".webp",
                            ".gif", ".bmp", ".heic", ".heif", ".hif", ".avif"})
INPUT_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES  # videos: depthpro_fast.video


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

    return name.endswith((FORMATS["color"], FORMATS["png16"])) or name == PREVIEW_FILE


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
            if (name.startswith(".") or Path(name).suffix.lower() not in INPUT_SUFFIXES
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
                elif (mp.is_file() and mp.suffix.lower() in INPUT_SUFFIXES
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
