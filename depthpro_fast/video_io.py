"""Video decoding and encoding for ``predict`` on clips (PyAV), and the depth frame files.

PyAV (``./install.sh video``, or ``pip install av``) is optional: nothing here imports it before a
clip is opened, and a missing PyAV is one clear error (``VideoError``) naming the install.

* ``probe(path)``: frame count, frame rate and stored size of the first video stream.
* ``iter_frames(path)``: (index, HWC uint8 RGB) in presentation order, upright (the container's
  rotation applied, as players show it). Frame ``i`` is the ``i``-th frame the decoder returns,
  counting from 0; the same file gives the same numbering on every run.
* ``write_depth_frame`` / ``read_depth_frame``: one frame's depth as a 16-bit PNG of
  millimetres (``outputs.depth_to_millimetres``: 0 = invalid, 65535 = 65.535 m or more),
  written atomically, carrying its focal length and frame index as PNG text chunks.
* ``PreviewWriter``: the colour preview video (H.264 in MP4 where FFmpeg has an H.264 encoder,
  else MPEG-4 Part 2), at the source frame rate, written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .install_hints import VIDEO_HINT

# what `predict` takes as a video in folders and globs (a file named on the command line is
# taken whatever its suffix); FFmpeg reads many more, these are the usual camera / web ones
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg",
                            ".ts", ".mts", ".m2ts", ".wmv", ".flv", ".3gp", ".ogv"})
PREVIEW_FILE = "depth_preview.mp4"  # a clip's colour preview, in its output folder
PREVIEW_CODECS = ("libx264", "h264", "libopenh264", "mpeg4")  # first one FFmpeg can encode
INSTALL_HINT = f"{VIDEO_HINT}, or pip install av"


class VideoError(ValueError):
    """A clip that cannot be decoded (or PyAV is missing); the message says which and why."""


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def import_av() -> Any:
    """PyAV, or a ``VideoError`` saying how to install it."""
    try:
        import av
    except ImportError as e:
        raise VideoError(f"video input needs PyAV, which is not installed ({e}): "
                         f"{INSTALL_HINT}") from None
    return av


@dataclass(frozen=True)
class ClipInfo:
    """What the container says about a clip's first video stream."""

    frames: int  # from the header, else counted from the packets (no decoding)
    fps: Fraction  # average frame rate (the preview's rate)
    width: int  # as stored (a rotated clip's frames come out turned: see ``upright``)
    height: int
    codec: str


def _open(path: str | os.PathLike) -> tuple[Any, Any]:
    av = import_av()
    try:
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot read {os.fspath(path)} as a video: {_reason(e)} (accepted: "
                         "files FFmpeg decodes, e.g. .mp4, .mov, .mkv, .webm)") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{os.fspath(path)} has no video stream (streams: "
                         f"{', '.join(s.type for s in container.streams) or 'none'})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's frame/slice threads: decoding keeps up
    return container, stream


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.splitlines()[0] if text else type(e).__name__


def probe(path: str | os.PathLike) -> ClipInfo:
    """Frame count, rate and size, without decoding the clip."""
    container, stream = _open(path)
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise VideoError(f"{os.fspath(path)}: the video stream has no frame rate")
        frames = int(stream.frames or 0)
        if frames <= 0:  # Matroska / WebM headers do not say: count the packets
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        return ClipInfo(frames, Fraction(rate), int(stream.codec_context.width),
                        int(stream.codec_context.height), stream.codec_context.name)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"cannot read {os.fspath(path)} as a video: {_reason(e)}") from None
    finally:
        container.close()


def upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
    """Apply a display matrix rotation (degrees counter-clockwise, as PyAV's
    ``VideoFrame.rotation``): the frame as a player shows it. FFmpeg's own autorotate turns
    the frame clockwise by minus that angle, i.e. counter-clockwise by it: ``np.rot90`` with
    k = rotation / 90."""
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def iter_frames(path: str | os.PathLike, *, want: Any = None) -> Iterator[tuple[int, Any]]:
    """(index, RGB uint8 HWC array) for every frame; for an index not in ``want`` (a container,
    or None for all) the array is None and the frame is not converted, which saves the colour
    conversion of frames a resumed run already has."""
    av = import_av()
    container, stream = _open(path)
    index = -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            if want is not None and index not in want:
                yield index, None
                continue
            rgb = frame.to_ndarray(format="rgb24")
            yield index, upright(rgb, getattr(frame, "rotation", 0) or 0)
    except av.error.FFmpegError as e:
        where = f"after frame {index}" if index >= 0 else "at the first frame"
        raise VideoError(f"{os.fspath(path)}: decoding failed {where}: {_reason(e)}") from None
    finally:
        container.close()


# ----------------------------------------------------------------------------------------------
# depth frames: 16-bit PNG, millimetres
# ----------------------------------------------------------------------------------------------


def write_depth_frame(path: str | os.PathLike, depth: Any, *, text: dict[str, str]) -> None:
    """Depth (H, W) metres -> 16-bit PNG of millimetres, atomically, with PNG text chunks
    (written before the image data, so readers get them without decoding it)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .outputs import atomic_write, depth_to_millimetres

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    image = Image.fromarray(depth_to_millimetres(depth))
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=info, compress_level=3)


def read_depth_frame(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """A depth frame -> (depth in metres, float32, 0 where invalid; its PNG text)."""
    from PIL import Image

    with Image.open(path) as im:
        mm = np.asarray(im)
        text = {k: str(v) for k, v in im.info.items() if isinstance(v, str)}
    return mm.astype(np.float32) / 1000.0, text


def read_frame_text(path: str | os.PathLike) -> dict[str, str]:
    """The PNG text of a depth frame, without decoding its pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return {k: str(v) for k, v in im.info.items() if isinstance(v, str)}


# ----------------------------------------------------------------------------------------------
# the preview video
# ----------------------------------------------------------------------------------------------


def preview_codec() -> str:
    """The first of ``PREVIEW_CODECS`` this FFmpeg build can encode."""
    av = import_av()
    for name in PREVIEW_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 (PyAV raises different types for unknown codecs)
            continue
        return name
    raise VideoError(f"this FFmpeg build (PyAV {av.__version__}) has none of the encoders "
                     f"{', '.join(PREVIEW_CODECS)} for the preview video")


class PreviewWriter:
    """Encodes RGB frames into an MP4 at ``fps``; the file appears only on ``close()``
    (atomic: a hidden temporary until then, removed by ``abort()``). Odd sizes are padded by
    one pixel (edge copy) to the even size that 4:2:0 chroma needs."""

    def __init__(self, path: str | os.PathLike, fps: Fraction, width: int, height: int):
        from .outputs import atomic_write

        av = import_av()
        self.codec = preview_codec()
        self._cm = atomic_write(path)
        self._file = self._cm.__enter__()
        self._pad = (height % 2, width % 2)
        self.frames = 0
        self._finished = False  # the temporary was put in place or removed
        try:
            self._out = av.open(self._file, mode="w", format="mp4")
            self._stream = self._out.add_stream(self.codec, rate=Fraction(fps))
            self._stream.width, self._stream.height = width + width % 2, height + height % 2
            self._stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":  # near-transparent quality, quick to encode
                self._stream.options = {"crf": "18", "preset": "veryfast"}
            elif self.codec == "mpeg4":
                self._stream.options = {"qscale": "3"}
        except BaseException as e:
            self._finished = True
            self._cm.__exit__(type(e), e, e.__traceback__)
            raise

    def write(self, rgb: np.ndarray) -> None:
        av = import_av()
        if any(self._pad):
            rgb = np.pad(rgb, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._out.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder, finish the MP4 and put it in place."""
        self._finished = True
        try:
            for packet in self._stream.encode():
                self._out.mux(packet)
            self._out.close()
        except BaseException as e:
            self._cm.__exit__(type(e), e, e.__traceback__)
            raise
        self._cm.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the half-written video (no file is left)."""
        import contextlib

        if self._finished:
            return
        self._finished = True
        with contextlib.suppress(Exception):
            self._out.close()
        err = RuntimeError("preview aborted")
        with contextlib.suppress(RuntimeError):
            self._cm.__exit__(RuntimeError, err, None)
