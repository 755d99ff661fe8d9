"""What one focal length per clip buys: frame-to-frame variation of the median depth.

A static camera films a still scene; the frames differ only by a little sensor noise. With the
focal length estimated per frame the metric scale follows each frame's FOV estimate; with one
focal length per clip (``predict``'s default for videos) it does not. The script makes such a
clip with PyAV, runs ``depthpro_fast.video.predict_video`` both ways and prints, per mode:
the spread of the focal length used, the variation of the median depth (std / mean of the
ratio of consecutive frames' median depth) and frames/s (all frames over the whole run).

    python bench/video_focal.py [--config tiny] [--frames 48] [--size 320x240] [--noise 3]

The default network is the tiny config with random weights (seeded): the FOV estimate of a
random network is meaningless, so this shows the mechanism, not the size of the effect on
real footage. The depth is read back from the 16-bit PNG frames (1 mm steps).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def make_static_clip(path: Path, frames: int, width: int, height: int, noise: float,
                     seed: int = 0) -> None:
    import av

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    # a floor-like gradient, a wall, a box: a scene with depth structure
    scene = np.stack([60 + 150 * y / height, 80 + 100 * x / width,
                      200 - 120 * y / height], -1)
    scene[height // 5:height // 2, width // 3:2 * width // 3] = (220, 180, 60)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(24, 1))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": "12"}
        for _ in range(frames):
            img = np.clip(scene + rng.normal(0, noise, scene.shape), 0, 255).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def variation(folder: Path) -> dict[str, float]:
    from depthpro_fast.video_io import read_depth_frame

    files = sorted((folder / "depth_mm").glob("*.png"))
    medians, focals = [], []
    for p in files:
        depth, text = read_depth_frame(p)
        medians.append(float(np.median(depth[depth > 0])))
        focals.append(float(text["focallength_px"]))
    m, f = np.array(medians), np.array(focals)
    ratio, f_ratio = m[1:] / m[:-1], f[1:] / f[:-1]
    # depth is proportional to f for a given network output: the focal length's own share
    # of the median-depth variation, visible even below the PNG's 1 mm step
    return {"frames": len(files), "median_depth_m": float(np.median(m)),
            "median_depth_variation": float(ratio.std() / ratio.mean()),
            "focal_ratio_variation": float(f_ratio.std() / f_ratio.mean()),
            "focal_px_mean": float(f.mean()), "focal_px_rel_std": float(f.std() / f.mean())}


def main() -> None:
    import depthpro_fast
    from depthpro_fast.video import VideoOptions, predict_video

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--noise", type=float, default=3.0, help="noise std per frame (0..255)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="folder for the clip and outputs")
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    torch.manual_seed(args.seed)
    model, transform = depthpro_fast.load(None, config=args.config, device="cpu",
                                          dtype="float32")
    root = Path(args.keep or tempfile.mkdtemp(prefix="video_focal_"))
    root.mkdir(parents=True, exist_ok=True)
    clip = root / "static.mp4"
    make_static_clip(clip, args.frames, width, height, args.noise, args.seed)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    report = {"cpu": cpu, "threads": torch.get_num_threads(), "config": args.config,
              "frames": args.frames, "size": args.size, "noise": args.noise,
              "fast": getattr(model, "fast_engine", None) is not None}
    for name, per_frame in (("one focal per clip", False), ("per-frame focal", True)):
        out = root / ("per_frame" if per_frame else "constant")
        t0 = time.perf_counter()
        s = predict_video(model, clip, out, VideoOptions(per_frame_focal=per_frame,
                                                         batch_size=args.batch_size,
                                                         progress=False, overwrite=True,
                                                         random_weights=True),
                          transform=transform)
        seconds = time.perf_counter() - t0
        assert s.complete, s.error
        row = {**variation(out), "seconds": seconds, "frames_per_s": s.frames / seconds}
        report[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
