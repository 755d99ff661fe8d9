"""Fetching Apple's ``depth_pro.pt``: resumable, size- and checksum-verified, atomic.

``download()`` streams the URL into ``<dest>/<name>.part``. An interrupted download keeps the
partial file and the next call resumes it with an HTTP ``Range`` request (a server that ignores
ranges makes it start over). The total size announced by the server (``Content-Length``,
``Content-Range``) is always checked against the bytes received; ``expected_size`` and
``expected_sha256`` are checked when given. Only a complete, verified file is renamed to its
final name, so ``load("auto")`` never sees a partial checkpoint.

The official release's size and SHA-256 are not recorded here yet (``OFFICIAL_SIZE`` and
``OFFICIAL_SHA256`` are None): fill them in from a trusted copy of ``depth_pro.pt`` when known;
until then only the server's own size announcement is verified.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ._spelling import option
from .checkpoint import CHECKPOINT_NAME, CHECKPOINT_URL, cache_dir

OFFICIAL_URL = CHECKPOINT_URL
OFFICIAL_SIZE: int | None = None  # bytes of the official depth_pro.pt: fill in when known
OFFICIAL_SHA256: str | None = None  # its SHA-256 (64 hex digits): fill in when known
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The transfer failed (network, HTTP error, truncated or oversized body)."""


class ChecksumError(ValueError):
    """The downloaded file does not have the expected size or SHA-256."""


def _check_expectations(expected_size: int | None, expected_sha256: str | None) -> str | None:
    if expected_size is not None and (isinstance(expected_size, bool)
                                      or not isinstance(expected_size, int)
                                      or expected_size < 0):
        raise ValueError(f"{option('expected_size', '--size')} must be a non-negative integer "
                         f"(bytes), got {expected_size!r}")
    if expected_sha256 is not None:
        if not isinstance(expected_sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}",
                                                                    expected_sha256):
            raise ValueError(f"{option('expected_sha256', '--sha256')} must be 64 hex digits, "
                             f"got {expected_sha256!r}")
        return expected_sha256.lower()
    return None


def sha256_of(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected_size: int | None, expected_sha256: str | None) -> None:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"{path} has {size} bytes, expected {expected_size}")
    if expected_sha256 is not None:
        digest = sha256_of(path)
        if digest != expected_sha256:
            raise ChecksumError(f"{path} has SHA-256 {digest}, expected {expected_sha256}")


def _total_from_headers(response, offset: int) -> tuple[int | None, bool]:
    """(total size of the file or None if unknown, whether the server honoured the Range)."""
    status = getattr(response, "status", 200)
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None and length.isdigit() else None
    if status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)",
                         (response.headers.get("Content-Range") or "").strip())
        if m is None or int(m.group(1)) != offset:
            raise DownloadError("server answered the resume request with a wrong Content-Range "
                                f"{response.headers.get('Content-Range')!r} (asked from byte "
                                f"{offset})")
        if m.group(3) != "*":
            return int(m.group(3)), True
        return (offset + length if length is not None else None), True
    return length, False


def download(url: str = OFFICIAL_URL, dest: str | os.PathLike | None = None, *,
             filename: str | None = None, expected_size: int | None = None,
             expected_sha256: str | None = None, progress: bool = True, force: bool = False,
             timeout: float = 60.0) -> Path:
    """Download ``url`` into ``dest`` (default: the user cache, where ``load("auto")`` looks).

    Returns the final path. An existing final file is verified (when expectations are given)
    and returned without downloading, unless ``force``. Raises ``DownloadError`` (a
    ``RuntimeError``) when the transfer fails (the ``.part`` file is kept for resuming) and
    ``ChecksumError`` (a ``ValueError``) on a size or SHA-256 mismatch (the bad ``.part`` is
    deleted, so that the next attempt starts over).
    """
    if not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"{option('url', '--url')} must be an http(s) URL, got {url!r}")
    expected_sha256 = _check_expectations(expected_size, expected_sha256)
    dest = cache_dir() if dest is None else Path(dest)
    if filename is None:
        filename = os.path.basename(urllib.parse.urlparse(url).path) or CHECKPOINT_NAME
    if filename in (".", "..") or "/" in filename or os.sep in filename:
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    created = make_folders(dest)
    final = dest / filename
    part = dest / (filename + ".part")

    if final.exists() and not force:
        _verify(final, expected_size, expected_sha256)
        return final

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    try:
        _fetch(url, part, offset, expected_size, progress, timeout)
        try:
            _verify(part, expected_size, expected_sha256)
        except ChecksumError as e:
            part.unlink()
            raise ChecksumError(f"{e}; the download was deleted, run again to start "
                                "over") from None
    except BaseException:
        # nothing arrived (no network, HTTP error): leave no empty folder behind; a .part
        # with data stays, with its folder, for the next run to resume
        remove_empty_folders(created)
        raise
    os.replace(part, final)
    return final


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are still empty."""
    for p in folders:
        try:
            p.rmdir()  # fails, and keeps it, when anything is inside
        except OSError:
            return


def _fetch(url: str, part: Path, offset: int, expected_size: int | None, progress: bool,
           timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (from ``offset``); check the announced size."""
    from tqdm import tqdm

    headers = {"User-Agent": "depthpro_fast"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the .part may be complete
            m = re.search(r"/(\d+)", e.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == offset:
                return
            part.unlink()  # not a prefix of the current file: start over next time
            raise DownloadError(f"{url}: the partial download does not fit the file on the "
                                "server (HTTP 416); it was deleted, run again") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url}: {reason}") from None

    with response:
        total, resumed = _total_from_headers(response, offset)
        if offset and not resumed:
            offset = 0  # the server sent the whole file: start the .part over
        if expected_size is not None and total is not None and total != expected_size:
            raise ChecksumError(f"{url} is {total} bytes according to the server, expected "
                                f"{expected_size}")
        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=part.name[:-len(".part")], disable=not progress)
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, short
                        raise DownloadError(f"{url}: transfer interrupted at byte {received} "
                                            f"({e}); run again to resume") from None
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
                    if total is not None and received > total:
                        f.close()
                        part.unlink()  # cannot be the announced file: start over next time
                        raise DownloadError(f"{url}: the server sent more than the announced "
                                            f"{total} bytes")
        finally:
            bar.close()
    if total is not None and received != total:
        raise DownloadError(f"{url}: transfer ended at byte {received} of {total}; run again "
                            "to resume")
