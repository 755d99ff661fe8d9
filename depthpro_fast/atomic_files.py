"""Atomic files: an output appears complete under its final name, or not at all.

``atomic_write`` writes to a hidden temporary file in the destination folder
(``.<name>.<random>.tmp``), flushes and fsyncs it, and only then renames it over the final name
with ``os.replace``. An interrupted or failing write therefore never leaves a half-written
output under the final name (an older complete file stays as it was), and the temporary file
is removed on any error. (A process killed with SIGKILL may leave a hidden ``.tmp`` file, never
a broken output: ``remove_temp_files`` clears those of given outputs.)
``check_output_folder`` fails early, with one message, where no output could be written.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file next to ``path`` for binary writing; rename it to ``path`` when the
    block succeeds, delete it when the block raises (including KeyboardInterrupt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # "xb": never clobber; the file gets the usual permissions (umask), unlike mkstemp's 0600
    f = open(tmp, "xb")  # noqa: SIM115 (closed below on every path)
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        finally:
            f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class OutputFolderError(OSError):
    """The output folder cannot be used: it is a file, cannot be created, or is not writable."""


_ERRNO_WORDS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left",
                errno.EDQUOT: "disk quota exceeded",
                # an existing folder that answers "no such file" to a new entry: /proc and alike
                errno.ENOENT: "that file system does not accept new folders"}


def check_output_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail fast, with one message naming the folder and the reason, if outputs cannot be
    written under ``folder``: it is a file, lies under a file, or it (or, when it does not
    exist yet, the folder it would be created in) does not accept new entries.

    Nothing is left behind: the probe is a hidden folder created and removed at once, and a
    missing ``folder`` is not created here (the first output creates it). Returns the path."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"cannot use {what} {os.fspath(folder)}: it is a file, not a "
                                "folder; pick another one")
    target = path.absolute()
    while not target.exists() and not target.is_symlink():  # the nearest existing ancestor
        target = target.parent
    if target.is_symlink() and not target.exists():
        raise OutputFolderError(f"cannot create {what} {os.fspath(folder)}: {target} is a "
                                "broken symbolic link")
    if not target.is_dir():
        raise OutputFolderError(f"cannot create {what} {os.fspath(folder)}: {target} is a "
                                "file, not a folder")
    try:  # the only reliable test (permissions, ACLs, read-only mounts, root): try it
        os.rmdir(tempfile.mkdtemp(prefix=".depthpro-write-test-", dir=target))
    except OSError as e:
        reason = _ERRNO_WORDS.get(e.errno, e.strerror or type(e).__name__)
        if target == path.absolute():
            raise OutputFolderError(f"cannot write to {what} {os.fspath(folder)}: "
                                    f"{reason}") from None
        raise OutputFolderError(f"cannot create {what} {os.fspath(folder)}: creating a folder "
                                f"in {target} fails: {reason}") from None
    return path


def remove_temp_files(paths: Sequence[Path]) -> None:
    """Delete the hidden temporary files that abandoned atomic writes of ``paths`` left."""
    for path in paths:
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
