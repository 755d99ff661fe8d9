"""The Ray path's inputs: local paths and filesystem URIs -> rows of (source, output name).

Local files, folders and globs are expanded exactly as ``depthpro-fast predict`` expands them
(``commands.predict_inputs.collect_sources``), and every input gets the same output name, so
``predict --ray`` and ``predict`` write the same files. A URI (``s3://bucket/photos``,
``gs://...``, ``file:///...``, or any protocol an installed fsspec package knows) names a file
or a folder on a filesystem that pyarrow (or fsspec) opens; its images are listed the same way
(hidden files and this package's own outputs left out, sub-folders with ``recursive``), named
relative to the folder given, and read by the actor that processes them (``fetch``), so only
names travel through Ray's object store, never image data.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .commands.predict_inputs import IMAGE_SUFFIXES, Source, assign_names, collect_sources
from .outputs import FORMATS

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str) -> bool:
    """``scheme://...`` (a Windows drive ``C:\\`` is not one)."""
    return bool(_URI.match(str(path)))


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path inside it)`` for a URI: pyarrow's own filesystems (local
    ``file://``, ``s3://``, ``gs://``, ``hdfs://``) first, then any protocol fsspec knows,
    wrapped for pyarrow."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_error:
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{uri}: pyarrow cannot open this filesystem ({arrow_error}) and "
                             "fsspec is not installed (pip install fsspec and the package of "
                             "the protocol, e.g. s3fs, gcsfs)") from None
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _is_own_output(name: str) -> bool:
    return name.endswith((FORMATS["color"], FORMATS["png16"]))


def _is_image(name: str) -> bool:
    return (not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
            and not _is_own_output(name))


def list_uri(uri: str, recursive: bool = False,
             ) -> tuple[list[tuple[str, Source]], str | None]:
    """The images a URI names: ``([(URI of the image, source)], problem)``. The ``Source``
    serves for naming only (``Path`` would fold the URI's ``//``)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return [], "no such file or folder"
    if info.type == pafs.FileType.File:
        name = PurePosixPath(root).name
        if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            return [], "not an image file (its suffix is not one of an image)"
        return [(uri, Source(Path(uri), PurePosixPath(name)))], None
    base = uri.rstrip("/")
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=recursive)):
        if entry.type != pafs.FileType.File:
            continue
        rel = PurePosixPath(entry.path).relative_to(PurePosixPath(root))
        if any(part.startswith(".") for part in rel.parts) or not _is_image(rel.name):
            continue
        text = f"{base}/{rel.as_posix()}"
        found.append((text, Source(Path(text), rel)))
    if not found:
        return [], "no image in this folder" + ("" if recursive else " (-r searches sub-folders)")
    return sorted(found, key=lambda pair: str(pair[1].rel)), None


def rows(paths: Sequence[str], recursive: bool = False, outdir: str | os.PathLike | None = None,
         ) -> tuple[list[dict[str, str]], list[tuple[str, str]], dict[str, int]]:
    """Files, folders, globs and URIs -> ``([{"source", "name"}], [(argument, problem)],
    {folder: sub-folders not searched})``, in ``predict``'s order and with its output names."""
    local = [p for p in paths if not is_uri(p)]
    sources, problems, left_out = collect_sources(local, recursive, outdir) if local else \
        ([], [], {})
    text = {id(s): str(s.path) for s in sources}
    for uri in (p for p in paths if is_uri(p)):
        found, problem = list_uri(uri, recursive)
        if problem:
            problems.append((uri, problem))
        for image, s in found:
            text[id(s)] = image
            sources.append(s)
    ordered = sorted(sources, key=lambda s: (str(s.rel), str(s.path)))
    return ([{"source": text[id(s)], "name": name} for s, name in assign_names(ordered)],
            problems, left_out)


def fetch(source: str, folder: str | os.PathLike) -> Path:
    """A local path for one input: a local path as it is; a URI's bytes copied into ``folder``
    (keeping the file's suffix, which the decoder looks at for HEIC), so that the package's own
    loader (``io.load_image``: EXIF orientation and focal length) reads every input."""
    if not is_uri(source):
        return Path(source)
    fs, path = filesystem(source)
    # the file's own name, in a folder of its own: the outputs' provenance records the input's
    # name (and bytes), as predict records a local file's
    local = Path(tempfile.mkdtemp(dir=folder)) / (PurePosixPath(path).name or "input")
    with open(local, "wb") as out, fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    return local
