"""Atomic export files: written in a hidden folder beside the destination, renamed when done."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class Staging:
    """A hidden temporary folder in the destination's folder (same file system, so the final
    renames are atomic). ``path(name)`` is where to write a file; ``commit(names)`` renames them
    into place in the order given (the main file last, so that it appears only complete)."""

    def __init__(self, destination: Path):
        self.destination = destination
        self.folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-",
                                            dir=destination.parent))

    def path(self, name: str) -> Path:
        return self.folder / name

    def commit(self, names: list[str]) -> list[Path]:
        final = []
        for name in names:
            target = self.destination.parent / name
            os.replace(self.folder / name, target)
            final.append(target)
        return final


@contextlib.contextmanager
def staged(destination: Path) -> Iterator[Staging]:
    """The staging folder is removed on exit, with whatever was not committed (on an error or
    Ctrl-C nothing reaches ``destination``)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    stage = Staging(destination)
    try:
        yield stage
    finally:
        shutil.rmtree(stage.folder, ignore_errors=True)
