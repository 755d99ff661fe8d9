"""The rows of ``depthpro-fast bench``: what each one runs, and which rows a device gets.

A row is a :class:`Variant` (path, dtype, backend, mode). Adding a row means adding it to
:func:`default_variants` here, and, for a new path or mode, teaching ``Runner._callable``
(``runner.py``) how to build the function it times.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import backends
from ..config import OFFICIAL, DepthProConfig
from .environment import dist_version
from .timing import dtype_name

#: The ops whose implementation each row reports (``ops`` column / JSON field).
OPS = ("attention", "split_patches", "merge_patches")


class SkipRow(Exception):
    """A row that cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the side-by-side table.

    ``path``: ``reference`` (our model, all ops pure PyTorch), ``fast`` (our model with
    ``backend``: the ops' kernels only), ``engine`` (the whole fast path: ``prepare_fast()``'s
    fused ViT epilogues, conv folds, channels_last, side stream; its own CUDA graphs in mode
    ``cudagraph``), ``hf`` (transformers' ``DepthProForDepthEstimation``), ``onnxruntime``
    (our ONNX export in ONNX Runtime, ``bench/onnxruntime_row.py``), ``openvino`` (our
    OpenVINO export on its CPU plugin, ``bench/openvino_row.py``). ``mode``: ``eager``,
    ``compile`` (``torch.compile`` of the module) or ``cudagraph`` (one captured CUDA graph,
    replayed). ``fp8``: an ``engine`` row in the fp8 precision mode (``dtype`` is then the bf16
    of the model around the e4m3 ViT GEMMs; the table says ``fp8``). ``options``: an ``engine``
    row's further ``FastOptions`` fields as canonical JSON (``fast_options_key``; "" none),
    e.g. ``{"gemm_dtype": "bf16"}``: the fp32 model with bf16 GEMM inputs.
    """

    path: str
    dtype: torch.dtype
    backend: str = "reference"
    mode: str = "eager"
    fp8: bool = False
    options: str = ""

    @property
    def fast_options(self) -> dict[str, Any]:
        """The ``FastOptions`` fields of ``options`` (empty: the engine's defaults)."""
        return json.loads(self.options) if self.options else {}

    @property
    def gemm_dtype(self) -> str | None:
        """``FastOptions.gemm_dtype`` of an ``engine`` row (None: off)."""
        return self.fast_options.get("gemm_dtype")

    @property
    def dtype_label(self) -> str:
        """The dtype column: ``fp32`` / ``bf16`` / ``fp16``, ``fp8``, or ``bf16-mixed`` (the
        fp32 model whose GEMMs and convolutions take bf16 inputs, ``gemm_dtype="bf16"``)."""
        if self.gemm_dtype is not None and self.dtype == torch.float32:
            return f"{self.gemm_dtype}-mixed"
        return "fp8" if self.fp8 else dtype_name(self.dtype)

    @property
    def name(self) -> str:
        if self.path == "hf":
            base = "transformers DepthPro"
        elif self.path in ("onnxruntime", "openvino"):
            base = self.path
        elif self.path == "reference":
            base = "reference"
        elif self.path == "engine":
            base = "fast engine" if self.backend == "auto" else f"fast engine {self.backend}"
        else:
            base = f"fast {self.backend}"
        mode = {"eager": " eager" if self.path == "reference" else "",
                "compile": " torch.compile", "cudagraph": " + CUDA graph"}[self.mode]
        # (gemm_dtype of an fp32 row is said by the dtype column: bf16-mixed)
        extra = ", ".join(f"{k}={v}" for k, v in self.fast_options.items()
                          if not (k == "gemm_dtype" and self.dtype_label.endswith("-mixed")))
        return base + mode + (f" ({extra})" if extra else "")

    @property
    def is_fp32_reference(self) -> bool:
        """The row every other row's accuracy is measured against."""
        return self.path == "reference" and self.mode == "eager" and self.dtype == torch.float32

    @property
    def tf32_off(self) -> bool:
        """The fp32 reference rows (eager and compiled) run with TF32 off (cuBLAS and cuDNN):
        the accuracy reference is then true fp32, not TF32 (torch's cuDNN default is TF32)."""
        return self.path == "reference" and self.dtype == torch.float32


def fast_options_key(options: Mapping[str, Any]) -> str:
    """``options`` as ``Variant.options``: checked against ``FastOptions`` (an unknown field or
    a bad value is refused here, with the engine's message), canonical JSON ("" when empty)."""
    from ..fast.engine import FastOptions

    if not isinstance(options, Mapping):
        raise ValueError(f"fast options must be a JSON object of FastOptions fields, got "
                         f"{options!r}")
    try:
        FastOptions(**options)
    except TypeError as e:
        raise ValueError(f"fast options {dict(options)!r}: {e} (fields: "
                         f"{', '.join(f.name for f in dataclasses.fields(FastOptions))})"
                         ) from None
    return json.dumps(dict(options), sort_keys=True) if options else ""


def default_variants(device: torch.device, *, dtypes: Sequence[torch.dtype] | None = None,
                     fast_backends: Sequence[str] = ("auto", "triton", "cuda"),
                     compile: bool | None = None, cuda_graph: bool | None = None,
                     hf: bool | None = None, fp8: bool | None = None,
                     onnxruntime: bool | None = None,
                     openvino: bool | None = None,
                     fast_options: Sequence[Mapping[str, Any]] | None = None,
                     bf16_mixed: bool | None = None) -> list[Variant]:
    """The rows of ``depthpro-fast bench``.

    GPU: the reference eager in fp32, bf16 and fp16; ``torch.compile`` of the reference, the
    fast backends, a CUDA graph of ``auto``, the fast engine (eager and with its CUDA graphs)
    and transformers in bf16, and the fast engine (eager and CUDA graphs) in fp16 too. CPU:
    the same rows in fp32 and the fast engine in bf16 (the runner skips, with the reason, what
    cannot or need not run on a CPU).
    The ``onnxruntime`` row (our ONNX export in ONNX Runtime) in each fast dtype that ONNX
    takes (fp32, fp16; fp16 on a GPU by default). The ``openvino`` rows (our OpenVINO export,
    CPU only) in fp32 and bf16 on a CPU; on a GPU only when ``openvino`` is True (skipped there,
    saying why).
    ``compile``, ``cuda_graph``, ``hf``, ``onnxruntime``, ``openvino`` = False leave those rows
    out;
    ``dtypes`` puts every row in each of the given dtypes instead. ``fp8``: the fast engine in
    the fp8 mode (eager and with its CUDA graphs; default: on, unless ``dtypes`` are given; the
    runner skips them, saying why, below compute capability 8.9 and on a CPU).
    ``fast_options``: each fast engine row once per mapping of ``FastOptions`` fields (``{}``:
    the defaults), e.g. ``[{}, {"gemm_dtype": "bf16"}]``; None: once, with the defaults.
    ``bf16_mixed``: the fast engine in the bf16-mixed mode (an fp32 model, bf16 GEMM and conv
    inputs; default: on a CPU unless ``dtypes`` are given; CPU only, skipped where bf16 would
    be emulated).
    """
    keys = [fast_options_key(o) for o in fast_options] if fast_options else [""]
    keys = list(dict.fromkeys(keys))
    gpu = device.type == "cuda"
    if dtypes is not None:  # (an empty list with fp8: only the fp8 rows)
        ref_dtypes = fast_dtypes = list(dtypes)
    elif gpu:
        ref_dtypes, fast_dtypes = [torch.float32, torch.bfloat16, torch.float16], [torch.bfloat16]
    else:
        ref_dtypes = fast_dtypes = [torch.float32]
    # the fast engine's rows run on "auto" when it is timed, else on the first backend named
    engine_backend = ("auto" if "auto" in fast_backends else fast_backends[0]
                      if fast_backends else None)

    def engine_rows(dt: torch.dtype, *, in_fp8: bool = False) -> list[Variant]:
        """The fast engine eager, and with its CUDA graphs unless those rows are off (once
        per ``fast_options`` entry)."""
        out = []
        for key in keys:
            out.append(Variant("engine", dt, backend=engine_backend, fp8=in_fp8, options=key))
            if cuda_graph is not False:
                out.append(Variant("engine", dt, backend=engine_backend, mode="cudagraph",
                                   fp8=in_fp8, options=key))
        return out

    rows = [Variant("reference", dt) for dt in ref_dtypes]
    for dt in fast_dtypes:
        if compile is not False:
            rows.append(Variant("reference", dt, mode="compile"))
        rows += [Variant("fast", dt, backend=b) for b in fast_backends]
        if cuda_graph is not False and "auto" in fast_backends:
            rows.append(Variant("fast", dt, backend="auto", mode="cudagraph"))
        if fast_backends:
            rows += engine_rows(dt)
        if hf is not False:
            rows.append(Variant("hf", dt, backend="-"))
    if gpu and dtypes is None and fast_backends:
        # the fast engine in fp16 beside bf16: the official command line runs
        # fp16, and fp16's 10-bit mantissa against bf16's 7 is the other accuracy/speed choice;
        # the engine rows only, to keep the GPU check's time budget
        rows += engine_rows(torch.float16)
    if onnxruntime is not False:
        # ONNX takes fp32 and fp16 (no bf16): on a GPU, whose fast rows are bf16, it runs fp16
        onnx_dtypes = [dt for dt in fast_dtypes if dt in (torch.float32, torch.float16)]
        if not onnx_dtypes and dtypes is None:
            onnx_dtypes = [torch.float16]
        rows += [Variant("onnxruntime", dt, backend="-") for dt in onnx_dtypes]
    if openvino or (openvino is None and not gpu):
        # OpenVINO computes in f32 or bf16 (its CPU's choice: bf16 where it has bf16 arithmetic)
        ov_dtypes = ([torch.float32, torch.bfloat16] if dtypes is None else
                     [dt for dt in dtypes if dt in (torch.float32, torch.bfloat16)])
        if gpu and dtypes is None:
            ov_dtypes = [torch.float32]  # one row, skipped there with the reason
        rows += [Variant("openvino", dt, backend="-") for dt in ov_dtypes]
    if (fp8 if fp8 is not None else dtypes is None) and fast_backends:
        rows += engine_rows(torch.bfloat16, in_fp8=True)
    if not gpu and dtypes is None and fast_backends:
        # the fast engine in bf16 too: the fastest CPU path where the CPU has bf16 arithmetic
        # (the runner skips it, saying why, where it has not)
        rows += [Variant("engine", torch.bfloat16, backend=engine_backend, options=key)
                 for key in keys]
    if (bf16_mixed if bf16_mixed is not None else not gpu and dtypes is None) and fast_backends:
        # the CPU's default low precision: bf16 arithmetic at fp32-level accuracy
        rows.append(Variant("engine", torch.float32, backend=engine_backend,
                            options=fast_options_key({"gemm_dtype": "bf16"})))
    return rows


def resolved_ops(backend: str, device: torch.device) -> dict[str, str]:
    """For each op, the backend whose implementation ``backend`` runs on ``device``.

    Raises ``SkipRow`` (with the reason) when an explicit backend cannot run an op here.
    """
    chosen = {}
    for op in OPS:
        try:
            impl = backends.implementation(op, backend, device)
        except Exception as e:  # unavailable backend, missing module, broken import
            raise SkipRow(f"{op}: {e}") from None
        name = backend
        if backend == "auto":
            name = "?"
            for candidate in backends.AUTO_ORDER_CUDA:
                try:
                    if backends.implementation(op, candidate, device) is impl:
                        name = candidate
                        break
                except Exception:
                    continue
        chosen[op] = name
    return chosen


def hf_unavailable(config: DepthProConfig) -> str | None:
    """Why transformers' DepthPro cannot be timed for ``config`` (None: it can)."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    if config != OFFICIAL:
        return "transformers' model is built for the official config only"
    version = dist_version("transformers") or "0"
    try:
        too_old = tuple(int(p) for p in version.split(".")[:2]) < (4, 49)
    except ValueError:
        too_old = False
    if too_old:
        return f"transformers {version} has no DepthPro (needs >= 4.49)"
    return None


def build_hf_model(config: DepthProConfig, device: torch.device,
                   dtype: torch.dtype) -> torch.nn.Module:
    """transformers' ``DepthProForDepthEstimation`` with random weights, the official shapes.

    Checked on the meta device: 951,991,330 parameters and 19,247.4 GFLOP, as our model.
    """
    why = hf_unavailable(config)
    if why:
        raise SkipRow(why)
    import transformers

    vit = {"model_type": "dinov2", "hidden_size": config.embed_dim,
           "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
           "mlp_ratio": int(config.mlp_ratio), "image_size": 384, "patch_size": 16,
           "use_mask_token": False, "layer_norm_eps": 1e-6}
    hf_config = transformers.DepthProConfig(
        fusion_hidden_size=config.decoder_features, patch_model_config=dict(vit),
        image_model_config=dict(vit), fov_model_config=dict(vit), use_fov_model=True)
    with torch.device(device):
        model = transformers.DepthProForDepthEstimation(hf_config)
    return model.to(dtype=dtype).eval()
