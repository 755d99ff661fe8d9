"""The ``onnxruntime`` row of the bench: our ONNX export (``depthpro_fast.export``) run in ONNX
Runtime, side by side with the PyTorch rows, on the same weights and inputs.

Execution providers: on a CPU the CPU provider; on a GPU TensorRT or CUDA when this ONNX
Runtime has them (the row is skipped, saying so, when it has neither: its CPU provider at 1536²
would take minutes per image there). Inputs and outputs go through host memory (numpy), and
those copies count in the row's latency (about 28 MB in and 9 MB out per fp32 image).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..install_hints import EXPORT_HINT

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def onnxruntime_unavailable(device: torch.device) -> str | None:
    """Why the row cannot run on ``device`` (None: it can)."""
    missing = [p for p in ("onnxruntime", "onnx", "onnxscript")
               if importlib.util.find_spec(p) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({EXPORT_HINT})"
    if device.type == "cuda" and not providers(device)[:-1]:
        return ("this onnxruntime has no CUDA or TensorRT execution provider (pip install "
                "onnxruntime-gpu); its CPU provider is not timed on a GPU machine")
    return None


def providers(device: torch.device) -> list[Any]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen: list[Any] = []
    if device.type == "cuda":
        chosen = [(p, {"device_id": device.index or 0}) for p in GPU_PROVIDERS if p in have]
    return chosen + ["CPUExecutionProvider"]


def onnxruntime_callable(model: Any, device: torch.device,
                         ) -> tuple[Callable[[torch.Tensor], Any], Callable[[], None], str, str]:
    """Export ``model`` (its dtype) to a temporary .onnx, open an ONNX Runtime session;
    returns (the function to time, the clean-up, the providers used, the export's summary)."""
    from ..exporters import export

    folder = Path(tempfile.mkdtemp(prefix="depthpro-bench-onnx-"))
    try:
        result = export(model, folder / "depth_pro.onnx")
        run, used = onnxruntime_run(result.path, device)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    def cleanup() -> None:
        nonlocal run
        run = None  # (the session goes with the function)
        shutil.rmtree(folder, ignore_errors=True)

    return (lambda x: run(x)), cleanup, used, result.summary()


def onnxruntime_run(path: str | Path, device: torch.device, threads: int | None = None,
                    ) -> tuple[Callable[[torch.Tensor], Any], str]:
    """An ONNX Runtime session on an exported ``.onnx`` (``threads``: its intra-op threads;
    None: ONNX Runtime's default); returns (the function, ``x`` -> (canonical inverse depth,
    FOV or None), and the execution providers used)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if device.type == "cpu":
        # ONNX Runtime's CPU arena keeps every intermediate it ever allocated: at 1536² in
        # fp32 the process (with the torch model beside it) passed 18 GB and was killed on a
        # 24 GB machine (2026-12-02); without the arena buffers are freed as they die
        options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=providers(device))
    names = [o.name for o in session.get_outputs()]

    def run(x: torch.Tensor) -> Any:
        out = session.run(names, {"image": x.detach().cpu().numpy()})
        cid = torch.from_numpy(out[0]).to(x.device)
        fov = torch.from_numpy(out[1]).to(x.device) if len(out) > 1 else None
        return cid, fov

    return run, ",".join(session.get_providers())
