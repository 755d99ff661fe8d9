"""What the Ray tests' actors run (imported by name in Ray's worker processes, so it lives in a
module of its own): a stand-in loader and predictors that die the way a killed worker does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from depthpro_fast.commands.predict_inputs import output_paths
from depthpro_fast.ray_data import DepthProPredictor


def fake_load(checkpoint, **kwargs):
    """``depthpro_fast.load``'s stand-in: the cheap content-dependent network of the predict
    tests, with the real ``infer`` post-processing."""
    import torch

    from depthpro_fast.inference import Transform
    from tests.test_predict_cli import FakeDepthPro

    return FakeDepthPro(), Transform("cpu", torch.float32)


def _claim(marker: Path) -> bool:
    """True for exactly one caller across processes (the first to create ``marker``)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class DiesOnce(DepthProPredictor):
    """Its first batch (over all actors) is cut off as a SIGKILL would cut it: the first image's
    outputs written, a half-written temporary file of the second's, then the process exits."""

    marker = "died-once"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not _claim(Path(self.options.outdir).parent / self.marker):
            return super().__call__(batch)
        first = {k: v[:1] for k, v in batch.items()}
        super().__call__(first)
        name = str(batch["name"][-1])
        for path in output_paths(self.options.outdir, name, self.options.formats).values():
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.dead0attempt.tmp").write_bytes(b"half a file")
            break
        os._exit(1)


class DiesOn(DepthProPredictor):
    """Kills its process whenever a batch holds an image whose name contains ``poison``: a task
    that never succeeds, however often Ray retries it."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any("poison" in str(n) for n in batch["name"]):
            os._exit(1)
        return super().__call__(batch)
