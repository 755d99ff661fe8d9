"""depthpro_fast: a fast, faithful DepthPro (metric monocular depth, Apple 2024).

    model, transform = depthpro_fast.load("checkpoints/depth_pro.pt")
    prediction = model.infer(transform(image), f_px=None)
    depth = prediction["depth"]            # metres, (H, W)
    f_px = prediction["focallength_px"]    # pixels
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import load
from .config import OFFICIAL, TINY, DepthProConfig
from .exporters import export, load_exported
from .inference import Transform
from .io import load_image
from .model import DepthPro
from .report import info

__all__ = ["DepthPro", "DepthProConfig", "OFFICIAL", "TINY", "Transform", "__version__", "export",
           "info", "load", "load_exported", "load_image"]
