"""One job of the CPU race, in a process of its own:
``python -m depthpro_fast.bench.race_child SPEC`` (SPEC: the job as JSON text, or ``-`` to read
it from stdin). The result is written as JSON to the spec's ``out`` path (atomically); a crash
writes nothing, and the race records the process's exit status and stderr tail instead.

Jobs (``spec["job"]``):

- ``contestant``: build the contestant (``race_contestants.build``), ``warmup`` untimed calls
  (the first call, compile included, is timed on its own), ``runs`` timed calls, each inside a
  machine-load span (``machine_load.py``: other processes' CPU use during the run). The first
  call's output is the accuracy check: the reference contestant writes it to the race's
  ``reference`` file when none is there yet; every comparable contestant (the reference of later
  rounds too) gets its MARE and FOV error against that file.
- ``export``: our fp32 reference model of the race's seed exported (OpenVINO IR or ONNX) to the
  race's folder, once per race; its wall time is the export time.
- ``gemm_floor``: ``race_floor.measure`` (the achieved GEMM rate at the model's ViT shapes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .race_contestants import Contestant, Context, Skip, build


def seeded_input(seed: int) -> torch.Tensor:
    """The race's input: one (1, 3, 1536, 1536) image, normalised (uniform in [-1, 1)), drawn
    from ``seed`` alike in every process."""
    from ..config import IMG_SIZE
    from .timing import random_inputs

    return random_inputs((1, 3, IMG_SIZE, IMG_SIZE), count=1, device=torch.device("cpu"),
                         dtype=torch.float32, seed=seed)[0]


def _outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    cid, fov = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    return (cid.detach().float().clone(),
            None if fov is None else fov.detach().float().reshape(-1).clone())


def save_reference(path: Path, cid: torch.Tensor, fov: torch.Tensor | None) -> None:
    """Write the reference output atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"cid": cid, "fov": fov}, tmp)
    os.replace(tmp, path)


def compare(cid: torch.Tensor, fov: torch.Tensor | None, reference: Path) -> dict[str, Any]:
    """MARE of the canonical inverse depth and |FOV error| in degrees against the file."""
    from ..accuracy import max_abs_error, mean_abs_rel_error

    ref = torch.load(reference, weights_only=True)
    out: dict[str, Any] = {"mare": mean_abs_rel_error(cid, ref["cid"]), "fov_err_deg": None}
    if fov is not None and ref["fov"] is not None:
        out["fov_err_deg"] = max_abs_error(fov, ref["fov"])
    return out


def run_contestant(spec: dict[str, Any]) -> dict[str, Any]:
    from . import machine_load

    c = Contestant.from_dict(spec["contestant"])
    ctx = Context(config=spec["config"], seed=int(spec["seed"]), threads=int(spec["threads"]),
                  exports=spec.get("exports", {}))
    reference = Path(spec["reference"])
    t0 = time.perf_counter()
    try:
        built = build(c, ctx)
    except Skip as e:
        return {"status": "skipped", "reason": str(e)}
    load_s = time.perf_counter() - t0
    x = seeded_input(ctx.seed).to(built.input_dtype)
    reader = machine_load.ProcReader()
    result: dict[str, Any] = {"status": "ok", "load_s": load_s, "warmup_s": [], "runs_s": [],
                              "loads": [], "info": built.info, "mare": None,
                              "fov_err_deg": None, "wrote_reference": False}
    calls = max(int(spec["warmup"]), 0) + int(spec["runs"])
    for i in range(calls):
        timed = i >= int(spec["warmup"])
        span = machine_load.Span(reader, threads=ctx.threads)
        with span:
            t = time.perf_counter()
            out = built.run(x)
            seconds = time.perf_counter() - t
        (result["runs_s"] if timed else result["warmup_s"]).append(seconds)
        if timed:
            result["loads"].append(dataclasses.asdict(span.load))
        if i == 0:
            result["first_call_s"] = seconds
            result["first_output_s"] = load_s + seconds
            if built.after_first is not None:
                result["info"].update(built.after_first())
            cid, fov = _outputs(out)
            if c.reference and not reference.exists():
                save_reference(reference, cid, fov)
                result["wrote_reference"] = True
            if c.comparable and reference.exists():
                result.update(compare(cid, fov, reference))
            del cid, fov
        del out
    return result


def run_export(spec: dict[str, Any]) -> dict[str, Any]:
    from ..api import load
    from ..exporters import export
    from .race_contestants import EXPORT_FILE

    fmt = spec["format"]
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, _ = load(None, config=spec["config"], device="cpu", dtype="float32", fast=False,
                    seed=int(spec["seed"]))
    model.set_backend("reference")
    build_s = time.perf_counter() - t0
    result = export(model, folder / EXPORT_FILE[fmt])
    return {"status": "ok", "path": str(result.path), "seconds": result.seconds,
            "build_s": build_s, "bytes": result.bytes, "summary": result.summary()}


def run_gemm_floor(spec: dict[str, Any]) -> dict[str, Any]:
    from .race_floor import measure

    return {"status": "ok", **measure(spec["config"], rows=spec.get("rows"),
                                      runs=int(spec.get("runs", 3)))}


JOBS = {"contestant": run_contestant, "export": run_export, "gemm_floor": run_gemm_floor}


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def main(argv: list[str] | None = None) -> int:
    from .results import json_safe, write_json

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m depthpro_fast.bench.race_child SPEC  (SPEC: the job as JSON, "
              "or - to read it from stdin)", file=sys.stderr)
        return 2
    spec = json.loads(sys.stdin.read() if argv[0] == "-" else argv[0])
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    job = spec.get("job")
    if job not in JOBS:
        print(f"race_child: unknown job {job!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    try:
        result = JOBS[job](spec)
        rc = 0
    except Exception as e:  # noqa: BLE001  (recorded in the result; the race goes on)
        traceback.print_exc()
        text = str(e).strip()
        result = {"status": "failed",
                  "error": f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"}
        rc = 1
    result["child_peak_rss_bytes"] = _peak_rss_bytes()
    result["torch_threads"] = torch.get_num_threads()
    write_json(spec["out"], json_safe(result))
    return rc


if __name__ == "__main__":
    sys.exit(main())
