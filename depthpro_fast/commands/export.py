"""``depthpro-fast export -o depth_pro.onnx``: the network as ONNX, OpenVINO IR (.xml + .bin) or
a torch.export .pt2.

Every check that needs no model (format, opset, dtype for the format, the output path, the
exporter's packages) runs before the model loads; the file is written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time

from .predict import RANDOM_WEIGHTS_NOTE, checkpoint_choice

DTYPE_CHOICES = ["float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..exporters import FORMATS, MIN_OPSET

    parser.add_argument("-o", "--output", default="depth_pro.onnx",
                        help="the file to write: .onnx (ONNX, with a .data file beside it "
                             "when the weights pass 2 GB), .xml (OpenVINO IR, with its .bin "
                             "beside it) or .pt2 (default: depth_pro.onnx)")
    parser.add_argument("--format", default=None, choices=list(FORMATS),
                        help="onnx, openvino (IR with fp32 weights; OpenVINO picks bf16 or "
                             "fp32 arithmetic when it compiles it), pt2 (torch.export of the "
                             "model as it runs, fast engine and custom ops included) or aoti "
                             "(the same, compiled by AOTInductor); default: from the file's "
                             "suffix")
    parser.add_argument("--checkpoint", default=None,
                        help="depth_pro.pt, a .safetensors, a Hugging Face DepthPro-hf folder, "
                             "or auto (default: auto)")
    parser.add_argument("--random-weights", action="store_true",
                        help="no checkpoint: random weights (with --config), to try the "
                             "export; the graph's outputs are then meaningless")
    parser.add_argument("--config", default=None,
                        help="preset (official, tiny) or JSON file of knobs (default: official)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                        help="precision of the exported graph (default: float32; ONNX: "
                             "float32 or float16; OpenVINO: float32)")
    parser.add_argument("--device", default="cpu",
                        help="device the model is loaded on for the export (default: cpu; a "
                             "pt2 / aoti program runs on the device it was made on)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "reference", "torch", "triton", "cuda"],
                        help="pt2 / aoti: the backend whose ops go into the graph (ONNX and "
                             "OpenVINO always export the reference math)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="pt2 / aoti: export the fast engine (default) or the reference "
                             "modules (--no-fast)")
    parser.add_argument("--no-fov", action="store_true",
                        help="depth only: leave out the FOV network and the fov_deg output "
                             "(the focal length must then be known)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET,
                        help=f"ONNX opset (default and minimum: {MIN_OPSET})")
    parser.add_argument("--no-optimize", action="store_true",
                        help="ONNX: skip the exporter's graph optimisation (faster export, "
                             "larger graph)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run(args: argparse.Namespace) -> int:
    from ..api import load, resolve_device, resolve_dtype
    from ..backends import require_backend
    from ..exporters import export
    from ..exporters.checks import check_request

    checkpoint = checkpoint_choice(args)
    dtype = resolve_dtype(args.dtype)
    fmt, _, _ = check_request(args.output, args.format, opset=args.opset, dtype=dtype,
                              overwrite=args.overwrite)
    device = resolve_device(args.device)
    reference_math = fmt in ("onnx", "openvino")  # exported from the reference modules
    backend = "reference" if reference_math else args.backend
    require_backend(backend, device)
    if checkpoint is None:
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    t0 = time.perf_counter()
    model, _ = load(checkpoint, config=args.config, device=device, dtype=dtype,
                    backend=backend, fast=args.fast and not reference_math,
                    use_fov=not args.no_fov)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; exporting (minutes for the "
          "official model)", file=sys.stderr)
    result = export(model, args.output, args.format, opset=args.opset,
                    optimize=not args.no_optimize, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.summary())
    return 0
