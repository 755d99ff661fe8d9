"""``depthpro-fast demo``: the reference model with random weights on a generated image.

Proves an installation end to end (build, transform, infer, write) without any download. The
depth values are meaningless (random weights); the timing is real.
"""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny",
                        help="preset (tiny, official) or JSON file of knobs (default: tiny)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--backend", default="reference",
                        choices=["reference", "torch", "triton", "cuda", "auto"])
    parser.add_argument("--size", default="480x640", help="HxW of the generated image")
    parser.add_argument("--out", default="depthpro_demo.npz", help="output .npz file")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights and of the generated image (default 0)")


def synthetic_image(height: int, width: int, seed: int = 0):
    """A smooth RGB gradient with a few discs: an HWC uint8 array that is not constant."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1),
                    0.5 + 0.5 * np.sin(xx / 17.0) * np.cos(yy / 23.0)], axis=-1)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.2) * min(height, width)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, size=3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 480x640 (HxW), got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"--size must be positive, got {text!r}")
    return h, w


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ..api import load
    from ..outputs import atomic_write, check_output_folder
    from ..provenance import make_recipe

    height, width = parse_size(args.size)
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder; give a file name, e.g. "
                         f"{os.path.join(args.out, 'depthpro_demo.npz')}")
    # before the model is built, not after the inference
    check_output_folder(os.path.dirname(os.path.abspath(args.out)), "folder of --out")
    t0 = time.perf_counter()
    model, transform = load(None, config=args.config, device=args.device, backend=args.backend,
                            seed=args.seed)
    t1 = time.perf_counter()
    image = synthetic_image(height, width, args.seed)
    prediction = model.infer(transform(image))
    t2 = time.perf_counter()
    depth = prediction["depth"].float().cpu().numpy()
    # what made the file, as predict records it (see depthpro_fast.provenance)
    recipe = make_recipe(None, config=args.config, dtype=str(transform.dtype),
                         fast=getattr(model, "fast_engine", None) is not None,
                         seed=args.seed, backend=args.backend, device=transform.device)
    record = {**recipe.as_dict(), "random_weights": True, "output": "demo npz",
              "input": {"name": f"synthetic {height}x{width} seed {args.seed}"}}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    # atomically (a temporary file renamed), with the usual permissions, as predict writes
    with atomic_write(args.out) as f:
        # the same keys and dtypes as predict's npz (fov_deg_estimated: the FOV network ran)
        np.savez(f, depth=depth, focallength_px=np.float32(prediction["focallength_px"]),
                 fov_deg=np.float32(prediction["fov_deg"]),
                 fov_deg_estimated=np.float32(prediction["fov_deg_estimated"]), image=image,
                 random_weights=np.array(True), provenance=np.array(json.dumps(record)))
    device = next(model.parameters()).device
    print(f"config {args.config}, device {device}, backend {args.backend}, random weights")
    print(f"built in {t1 - t0:.2f} s; infer on a {height}x{width} image in {t2 - t1:.2f} s")
    print(f"depth {depth.shape} in [{depth.min():.3g}, {depth.max():.3g}] m, focal length "
          f"{float(prediction['focallength_px']):.1f} px, "
          f"FOV {float(prediction['fov_deg']):.2f} deg")
    print(f"wrote {args.out}")
    return 0
