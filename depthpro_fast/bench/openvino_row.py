"""The ``openvino`` rows of the bench: our OpenVINO export (``depthpro_fast.export``, IR with fp32
weights) run by OpenVINO's CPU plugin, side by side with the PyTorch rows, on the same weights
and inputs, so that a CPU user sees which engine is faster on their machine.

The row's dtype is the arithmetic asked of OpenVINO when it compiles the model
(``INFERENCE_PRECISION_HINT``): fp32 -> ``f32`` (against our fp32 rows), bf16 -> ``bf16``
(OpenVINO's own default on a CPU with bf16 arithmetic; against our bf16 fast engine). Both are
exported from the fp32 model. What OpenVINO actually compiled for goes in the row's JSON
(``openvino_precision``). CPU only: on a GPU machine the row is skipped (OpenVINO's GPU plugin
is for Intel GPUs). Inputs and outputs go through numpy; those copies count in the latency.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..install_hints import OPENVINO_HINT

#: the row's dtype -> OpenVINO's INFERENCE_PRECISION_HINT
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def openvino_unavailable(device: torch.device) -> str | None:
    """Why the row cannot run on ``device`` (None: it can)."""
    if importlib.util.find_spec("openvino") is None:
        return f"openvino not installed ({OPENVINO_HINT})"
    if device.type != "cpu":
        return ("OpenVINO's rows run on a CPU (its GPU plugin is for Intel GPUs); not timed on "
                "a GPU machine (bench --device cpu times them)")
    return None


def openvino_callable(model: Any, dtype: torch.dtype,
                      ) -> tuple[Callable[[torch.Tensor], Any], Callable[[], None], str, str]:
    """Export ``model`` (fp32) to a temporary .xml and compile it on the CPU with the precision
    of ``dtype``; returns (the function to time, the clean-up, the precision OpenVINO compiled
    for, the export's summary)."""
    from ..exporters import export

    folder = Path(tempfile.mkdtemp(prefix="depthpro-bench-openvino-"))
    try:
        result = export(model, folder / "depth_pro.xml")
        run, precision = openvino_run(result.path, PRECISIONS[dtype])
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    def cleanup() -> None:
        nonlocal run
        run = None  # (the compiled model and its request go with the function)
        shutil.rmtree(folder, ignore_errors=True)

    return (lambda x: run(x)), cleanup, precision, result.summary()


def openvino_run(path: str | Path, precision: str | None, threads: int | None = None,
                 ) -> tuple[Callable[[torch.Tensor], Any], str]:
    """Compile an exported IR (``path``, .xml) on the CPU with ``precision`` (OpenVINO's
    ``INFERENCE_PRECISION_HINT``; None: no hint, OpenVINO's own choice) and ``threads``
    (``INFERENCE_NUM_THREADS``; None: OpenVINO's default); returns (the function, ``x`` ->
    (canonical inverse depth, FOV or None), and the precision OpenVINO compiled for)."""
    from ..exporters import load_exported

    options = {} if threads is None else {"INFERENCE_NUM_THREADS": int(threads)}
    runner: Any = load_exported(path, "CPU", precision=precision, options=options)

    def run(x: torch.Tensor) -> Any:
        out = runner(x)
        return out[0], (out[1] if len(out) > 1 else None)

    return run, runner.precision
