"""The fast forward: how a loaded DepthPro is prepared for, and run on, the fast path.

``FastEngine(model, options)`` is attached to a model by ``DepthPro.prepare_fast`` (or
``depthpro_fast.load(..., fast=True)``); ``DepthPro.forward`` then hands it every call made
without gradients and without an ``intermediates`` dict. It computes the same function as the
reference modules (same weights, same ops) through the same data flow
(``dataflow.run_network``), with the fast implementations of its stages (``fast/stages.py``):

- ViTs: GEMMs without bias + fused epilogue ops (``fast/vit.py``), or ``torch.compile`` of each
  block (``epilogues="compile"``), or the reference modules (``epilogues="torch"``).
- Convolutional parts: exact folds of linear chains (``fast/folds.py``), weights in
  channels_last, cuDNN autotuning (``torch.backends.cudnn.benchmark`` on during the forward).
- Concurrency (CUDA): the image encoder and the FOV encoder run on a second stream while the
  patch encoder (35 windows per image) runs on the caller's stream (stream discipline:
  ``fast/stages.py``); or, with ``vit_lockstep``, the three ViTs run in lock-step on one stream
  (one grouped GEMM per linear, one attention, one launch per pass: ``fast/lockstep.py``).
- The FOV branch is skipped when its result is unused (``need_fov=False``, which ``infer``
  passes when the caller gives ``f_px``); ``infer`` then reports the FOV implied by the given
  focal length, ``2 atan(W / (2 f_px))`` (the same rule as for models without an FOV network).
- CUDA graphs (CUDA): the whole fixed-shape forward is captured once per (batch, dtype, FOV
  needed, backend) and replayed (``fast/graphs.py``); the input is copied into the graph's
  static buffer; ``infer``'s resize and checks stay outside.

Weights: folded / channels_last copies (and, with ``fold_layerscale``, the LayerScale-scaled
ViT proj / fc2 copies) are made once, at preparation, in float64 and rounded once to the model
dtype. The engine notices when the model moved (device, dtype) or when the source weights of
the folds changed (in place, e.g. ``load_state_dict``) and prepares again
(dropping its graphs). Replacing the ViT parameters by new tensor objects
(``load_state_dict(assign=True)``) is not detected: call ``model.prepare_fast()`` again.

Threading: the eager engine is re-entrant; a CUDA-graph runner serves one call at a time (a
lock), see ``fast/graphs.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import backends, dataflow, qualification
from ..config import NUM_TOKENS
from ..cpu_memory import tune_cpu_allocator
from ..device_guard import on_device
from ..fp8_format import Fp8UnavailableError, fp8_problem
from . import attention_choice, folds, fp8, lockstep, mixed_gemm
from .attention_choice import Candidate
from .cpu_gemm import CPU_GEMMS, CpuGemm, addmm_fp32_out_available, choose_cpu_gemm
from .decoder import EpilogueDecoder, FusedSubpixelTail
from .epilogue_backends import EpilogueBackends
from .freshness import tensor_state
from .graphs import GraphRunner
from .stages import FastStages
from .streams import own_stream, release_stream
from .vit import (
    FC1_GELUS,
    LayerScaleFold,
    ViTEpilogues,
    compiled_forward_with_hooks,
    fold_layerscale,
    fused_forward_with_hooks,
)

if TYPE_CHECKING:
    from ..model import DepthPro, VisionTransformer

EPILOGUES = ("fused", "torch", "compile")
FP8_SCALINGS = ("row", "tensor")
ATTENTION_CHOICES = ("measure", "backend")


@dataclasses.dataclass(frozen=True)
class FastOptions:
    """Switches of the fast path (each can be turned off to measure what it buys).

    - ``epilogues``: ``"fused"`` (ViT GEMMs + the fused epilogue ops), ``"torch"`` (the
      reference ViT modules), ``"compile"`` (``torch.compile`` of each block's math).
    - ``epilogue_backend``: backend of the epilogue ops (None: the model's backend).
    - ``fuse_layer_norm``: LayerNorm fused with the residual write (else two passes).
    - ``fold_convs``: the exact folds of ``fast/folds.py`` (1, 2 where it pays, 4, 5).
    - ``head_subpixel``: fold 6 (the depth head's deconv + 3x3 as a sub-pixel conv).
    - ``fold_deconv_chains``: fold 3 (encoder deconv chains as one k4s4 / k8s8 deconv).
    - ``channels_last``: conv weights and activations in channels_last.
    - ``decoder_epilogues``: the decoder's convs without bias, each followed by one fused
      epilogue pass (``bias_relu`` / ``bias_residual``: bias, ReLU, residual adds; the tails'
      biases carried; ``fast/decoder.py``).
    - ``head_tail``: the sub-pixel head's bias, ReLUs, 32 -> 1 conv and pixel shuffle in one
      pass (``subpixel_tail``; needs ``head_subpixel``).
    - ``streams``: image / FOV encoders on a second CUDA stream.
    - ``cuda_graphs``: capture and replay the forward (CUDA).
    - ``cudnn_benchmark``: cuDNN autotuning during the forward (CUDA).
    - ``attention_choice``: ``"measure"`` (with the model's backend ``auto``: each ViT
      attention shape runs the implementation measured fastest for it at warm-up,
      ``fast/attention_choice.py``; fused / compiled ViTs) or ``"backend"`` (the model's backend).
    - ``skip_unused_fov``: skip the FOV branch when the caller does not need it.
    - ``compile_mode``: ``torch.compile`` mode for ``epilogues="compile"``.
    - ``max_graphs``: CUDA graphs kept (one per batch size / FOV need).
    - ``max_recaptures``: how often a key evicted by other keys is captured again before it
      is marked thrashing and runs eagerly (``fast/graphs.py``).
    - ``cpu_gemm``: on a CPU, the library of the fused ViT's GEMMs: ``"aten"`` (PyTorch's
      default, MKL in fp32), ``"onednn"`` (oneDNN, fc1's bias + GELU as its post-ops) or
      ``"auto"`` (the faster of the two, timed once per process and dtype; ``fast/cpu_gemm.py``).
    - ``fp8``: the fp8 precision mode (``load(dtype="fp8")`` sets it): the ViT linears in e4m3
      with per-output-channel weight scales and per-token activation scales, quantised by the
      LayerNorm and bias + GELU passes (``fast/fp8.py``); needs a bf16 model, the ``fused``
      epilogues, and a GPU of compute capability >= 8.9 (a CPU runs an emulation).
    - ``fp8_scaling``: ``"row"`` (per token) or ``"tensor"`` (one scale per activation tensor,
      reference ops: only to measure what per-token scaling buys).
    - ``vit_lockstep``: the patch, image and FOV encoders in lock-step (``fast/lockstep.py``):
      their rows concatenated, one grouped GEMM per linear (weights stacked once; one GEMM per
      ViT where the grouped GEMM cannot run, said in ``status()``), one attention launch, one
      launch per elementwise pass; replaces the side stream. Needs the ``fused`` epilogues with
      ``fuse_layer_norm``; not with ``fp8``. Off by default until measured on a GPU.
    - ``fold_layerscale``: LayerScale folded into prepared copies of the ViT
      proj / fc2 weights and biases (float64, rounded once; ``fast/vit.py``).
    - ``residual_in_gemm`` (needs ``fold_layerscale``): the residual add in the proj / fc2
      GEMMs (``addmm_``, beta = 1), their biases carried into the next LayerNorm pass, the
      hooked outputs and the final norm: no residual-update pass.
    - ``fc1_gelu``: ``"erf"`` (the model's exact GELU) or ``"tanh"`` (fc1's bias + the tanh
      GELU in the GEMM's epilogue on CUDA, ``torch._addmm_activation``; an approximation, its
      error measured in docs/fast_path.md).
    - ``residual_fp32`` (needs ``residual_in_gemm``): a 16-bit model's ViT residual
      stream kept in fp32 (``addmm(out_dtype=float32)`` on CUDA where PyTorch has it; else the
      GEMM in the model dtype and an fp32 add).
    - ``gemm_dtype``: ``"bf16"``: an fp32 model's fused-ViT linears take bf16 inputs (bf16
      weight copies prepared once, activations rounded at each GEMM's input, fp32
      accumulation); LayerNorm, GELU's input, softmax statistics and the residual stream stay
      fp32 (``fast/mixed_gemm.py``). CPU only; needs ``epilogues="fused"``, not with ``fp8``,
      ``vit_lockstep`` or the ViT epilogue switches. None (default): off.
    - ``gemm_dtype_convs`` (with ``gemm_dtype``): the convolutions and deconvolutions take
      ``gemm_dtype`` inputs too (bf16 weights, fp32 accumulation, the output widened to fp32
      before the fp32 bias; ``fast/folds.py``), except the head's last 1x1 conv, which writes
      the depth map. False: the ViT linears only.
    - ``qualify``: kernel qualification at the first forward of each input shape
      (``depthpro_fast/qualification.py``, docs/qualification.md): ``"inline"``,
      ``"subprocess"`` (a child process: a crashing kernel cannot take this one down) or
      ``"off"``; None: ``$DEPTHPRO_FAST_QUALIFY``, else ``"inline"``.
    - ``verify_model``: after qualification, compare the first fast forward with the
      reference path against the dtype's accuracy budget.

    The last four act on the fused ViT forward (``epilogues="fused"``; ignored otherwise) and
    are refused with ``fp8`` (its GEMMs are ``_scaled_mm`` on e4m3 copies of the model's own
    weights, and its LayerNorm passes write quantised rows).
    """

    epilogues: str = "fused"
    epilogue_backend: str | None = None
    fuse_layer_norm: bool = True
    fold_convs: bool = True
    head_subpixel: bool = True
    fold_deconv_chains: bool = False
    channels_last: bool = True
    decoder_epilogues: bool = False
    head_tail: bool = False
    streams: bool = True
    cuda_graphs: bool = True
    cudnn_benchmark: bool = True
    attention_choice: str = "measure"
    skip_unused_fov: bool = True
    compile_mode: str | None = None
    max_graphs: int = 4
    max_recaptures: int = 2
    cpu_gemm: str = "auto"
    fp8: bool = False
    fp8_scaling: str = "row"
    fold_layerscale: bool = False
    residual_in_gemm: bool = False
    fc1_gelu: str = "erf"
    residual_fp32: bool = False
    vit_lockstep: bool = False
    gemm_dtype: str | None = None
    gemm_dtype_convs: bool = True
    qualify: str | None = None
    verify_model: bool = False

    def __post_init__(self) -> None:
        if self.epilogues not in EPILOGUES:
            raise ValueError(f"epilogues must be one of {', '.join(EPILOGUES)}, got "
                             f"{self.epilogues!r}")
        if self.epilogue_backend is not None:
            backends.check_backend(self.epilogue_backend)
        if self.attention_choice not in ATTENTION_CHOICES:
            raise ValueError(f"attention_choice must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {self.attention_choice!r}")
        if self.cpu_gemm not in CPU_GEMMS:
            raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got "
                             f"{self.cpu_gemm!r}")
        if self.qualify is not None and self.qualify not in qualification.MODES:
            raise ValueError(f"qualify must be one of {', '.join(qualification.MODES)} or None "
                             f"(${qualification.ENV_VAR}, else inline), got {self.qualify!r}")
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"fp8_scaling must be one of {', '.join(FP8_SCALINGS)}, got "
                             f"{self.fp8_scaling!r}")
        if self.vit_lockstep is True:
            if self.epilogues != "fused" or self.fuse_layer_norm is not True:
                raise ValueError("vit_lockstep runs its own fused ViT forward (grouped GEMMs and "
                                 "the fused LayerNorm passes); it needs epilogues='fused' and "
                                 f"fuse_layer_norm=True, got epilogues={self.epilogues!r}, "
                                 f"fuse_layer_norm={self.fuse_layer_norm!r}")
            if self.fp8 is True:
                raise ValueError("vit_lockstep and fp8 cannot be combined: the lock-step's "
                                 "grouped GEMM runs in the model dtype (there is no grouped "
                                 "e4m3 GEMM with the fp8 mode's scales here); turn one off")
        if self.fp8 is True and self.epilogues != "fused":
            raise ValueError(f"fp8 runs in the fused ViT forward; epilogues={self.epilogues!r} "
                             "cannot be combined with it (use epilogues='fused')")
        if self.fc1_gelu not in FC1_GELUS:
            raise ValueError(f"fc1_gelu must be one of {', '.join(FC1_GELUS)}, got "
                             f"{self.fc1_gelu!r}")
        if self.residual_in_gemm is True and self.fold_layerscale is not True:
            raise ValueError("residual_in_gemm adds the branch inside the GEMM (addmm, beta = 1), "
                             "which has no per-channel scale for LayerScale: it needs "
                             "fold_layerscale=True")
        if self.residual_fp32 is True and self.residual_in_gemm is not True:
            raise ValueError("residual_fp32 keeps the stream that the GEMMs update in place: it "
                             "needs residual_in_gemm=True (and fold_layerscale=True)")
        vit_switches = [name for name, on in (
            ("fold_layerscale", self.fold_layerscale is True),
            ("residual_in_gemm", self.residual_in_gemm is True),
            ("fc1_gelu='tanh'", self.fc1_gelu == "tanh"),
            ("residual_fp32", self.residual_fp32 is True)) if on]
        if self.fp8 is True and vit_switches:
            raise ValueError(f"fp8 cannot be combined with {', '.join(vit_switches)}: its GEMMs "
                             "are _scaled_mm on e4m3 copies of the model's own ViT weights and "
                             "its LayerNorm passes write quantised rows (turn them off with fp8)")
        if self.vit_lockstep is True and vit_switches:
            raise ValueError(f"vit_lockstep cannot be combined with {', '.join(vit_switches)} "
                             "yet: the lock-step forward (fast/lockstep.py) has its own grouped "
                             "GEMMs and LayerNorm passes without the folded LayerScale, the "
                             "in-GEMM residual or the tanh GELU; turn one side off")
        if self.gemm_dtype is not None:
            if self.gemm_dtype not in mixed_gemm.GEMM_DTYPES:
                raise ValueError(f"gemm_dtype must be one of {mixed_gemm.GEMM_DTYPES} or None, "
                                 f"got {self.gemm_dtype!r}")
            if self.epilogues != "fused":
                raise ValueError(f"gemm_dtype={self.gemm_dtype!r} acts on the fused ViT's GEMMs; "
                                 f"it needs epilogues='fused', got {self.epilogues!r}")
            clash = vit_switches + [n for n, on in (("fp8", self.fp8 is True),
                                                     ("vit_lockstep", self.vit_lockstep is True))
                                    if on]
            if clash:
                raise ValueError(f"gemm_dtype={self.gemm_dtype!r} cannot be combined with "
                                 f"{', '.join(clash)} yet: its bf16 weight copies are of the "
                                 "model's own ViT linears (turn those off)")
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"fast option {f.name} must be True or False, got "
                                f"{getattr(self, f.name)!r}")
        if isinstance(self.max_graphs, bool) or not isinstance(self.max_graphs, int) \
                or self.max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive integer, got {self.max_graphs!r}")
        if isinstance(self.max_recaptures, bool) or not isinstance(self.max_recaptures, int) \
                or self.max_recaptures < 0:
            raise ValueError("max_recaptures must be an integer >= 0, got "
                             f"{self.max_recaptures!r}")

    @classmethod
    def resolve(cls, value: bool | Mapping[str, Any] | FastOptions | None) -> FastOptions | None:
        """``True``/``{}``: the defaults; a mapping: those fields; ``False``/``None``: off."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"unknown fast options {unknown}; accepted: {sorted(names)}")
            return cls(**value)
        raise TypeError("fast must be True, False, a dict of fast options or a FastOptions, got "
                        f"{type(value).__name__}")


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = True`` for the duration (restored afterwards)."""
    if not enabled:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# ----------------------------------------------------------------------------------------------
# prepared (folded, converted) conv weights
# ----------------------------------------------------------------------------------------------


class PreparedLayers:
    """The conv layers of the fast path, built from the model's modules."""

    def __init__(self, model: DepthPro, opts: FastOptions):
        p = next(model.parameters())
        cast = dict(dtype=p.dtype, device=p.device, channels_last=opts.channels_last,
                    gemm_dtype=mixed_gemm.conv_gemm_dtype(opts.gemm_dtype, opts.gemm_dtype_convs))
        enc, dec = model.encoder, model.decoder
        fold = opts.fold_convs
        self.folds: list[str] = []

        def conv(m):
            return folds.conv_of(m, **cast)

        def upsample(name: str) -> list:
            block = getattr(enc, name)
            if fold or opts.fold_deconv_chains:
                layers = folds.fold_project_upsample(
                    block, fold_1x1=None if fold else False, fold_chain=opts.fold_deconv_chains,
                    **cast)
                n_convs = sum(isinstance(layer, folds.Conv) for layer in layers)
                if not n_convs:
                    self.folds.append(f"encoder.{name}: 1x1 conv folded into the deconv")
                if opts.fold_deconv_chains and len(block) > 2:
                    self.folds.append(f"encoder.{name}: deconv chain as one deconv")
                return layers
            return [conv(block[0])] + [folds.Deconv(d.weight.detach(), None, **cast)
                                       for d in list(block)[1:]]

        self.upsample_latent0 = upsample("upsample_latent0")
        self.upsample_latent1 = upsample("upsample_latent1")
        self.upsample0 = upsample("upsample0")
        self.upsample1 = upsample("upsample1")
        if fold:
            self.lowres = folds.fold_lowres(enc.upsample2, enc.upsample_lowres, enc.fuse_lowres,
                                            **cast)
            self.folds.append("encoder: upsample2 + upsample_lowres + fuse_lowres as one deconv")
        else:
            self.lowres = None
            self.upsample2 = upsample("upsample2")
            self.upsample_lowres = folds.Deconv(enc.upsample_lowres.weight.detach(),
                                                enc.upsample_lowres.bias.detach(), **cast)
            self.fuse_lowres = conv(enc.fuse_lowres)

        self.dec_convs = [None if isinstance(c, torch.nn.Identity) else conv(c)
                          for c in dec.convs]
        self.fusions = []
        last = len(dec.fusions) - 1
        for i, fb in enumerate(dec.fusions):
            res1 = None if i == last else (conv(fb.resnet1.residual[1]),
                                           conv(fb.resnet1.residual[3]))
            res2 = (conv(fb.resnet2.residual[1]), conv(fb.resnet2.residual[3]))
            if fb.deconv is not None and fold:
                tail = folds.fold_deconv_1x1(fb.deconv, fb.out_conv, **cast)
                self.folds.append(f"decoder.fusions.{i}: deconv + out_conv as one deconv")
                tail_layers = [tail]
            elif fb.deconv is not None:
                tail_layers = [folds.Deconv(fb.deconv.weight.detach(), None, **cast),
                               conv(fb.out_conv)]
            elif fold:
                tail_layers = []  # out_conv goes into head[0] (fold 5)
            else:
                tail_layers = [conv(fb.out_conv)]
            self.fusions.append((res1, res2, tail_layers))

        head = model.head
        if fold:
            self.head0 = folds.fold_1x1_conv3x3(dec.fusions[0].out_conv, head[0], **cast)
            self.folds.append("decoder.fusions.0.out_conv + head.0 as one 3x3 conv")
        else:
            self.head0 = conv(head[0])
        if opts.head_subpixel:
            self.subpixel = folds.SubpixelHead(head[1], head[2], head[4], **cast)
            self.folds.append("head.1 (deconv) + head.2 (3x3) as a sub-pixel conv")
            self.head_rest = None
        else:
            self.subpixel = None
            self.head_rest = (folds.Deconv(head[1].weight.detach(), head[1].bias.detach(),
                                           **cast), conv(head[2]), conv(head[4]))
        # the decoder / head epilogue ops (fast/decoder.py)
        self.epilogue_decoder = None
        if opts.decoder_epilogues:
            self.epilogue_decoder = EpilogueDecoder(self.dec_convs, self.fusions)
            self.folds.append("decoder: convs without bias + fused epilogue passes "
                              f"({self.epilogue_decoder.carried} tail biases carried)")
        self.fused_tail = None
        if opts.head_tail and self.subpixel is not None:
            self.fused_tail = FusedSubpixelTail(self.subpixel)
            self.folds.append("head: bias, ReLUs, 32 -> 1 conv and pixel shuffle in one pass")
        if model.fov is not None:
            self.fov_down = conv(model.fov.downsample[0])
            self.fov_head = [conv(model.fov.head[i]) for i in (0, 2, 4)]

        # fp8: e4m3 copies of the three ViTs' linears, quantised once here
        self.fp8_weights: dict[int, fp8.Fp8Weight] | None = None
        self.fp8_why: str | None = None
        if opts.fp8:
            check_fp8_model(p)
            self.fp8_weights = {}
            for name, vit in fp8_vits(model):
                self.fp8_weights.update(fp8.prepare_vit_weights(vit, name))
            self.fp8_why = (f"{len(self.fp8_weights)} ViT linears in e4m3 ({opts.fp8_scaling}-wise "
                            f"activation scales): {fp8.gemm_description(p.device)}")

        # LayerScale folded into prepared copies of the ViTs' proj / fc2
        self.layerscale: dict[int, LayerScaleFold] = {}
        self.vit_why = "off"
        if opts.epilogues == "fused" and opts.fold_layerscale:
            for _, vit in fp8_vits(model):
                self.layerscale[id(vit)] = fold_layerscale(vit)
            words = ["LayerScale folded into proj / fc2 (prepared copies)"]
            if opts.residual_in_gemm:
                words.append("residual add in the proj / fc2 GEMMs (addmm_, beta = 1), biases "
                             "carried into the LayerNorm passes")
            if opts.residual_fp32:
                words.append("fp32 residual stream" if p.dtype in (torch.float16, torch.bfloat16)
                             else f"residual_fp32: no-op for a {p.dtype} model")
                if p.dtype in (torch.float16, torch.bfloat16):
                    words.append(addmm_fp32_out_available(p.device)[1])
            self.vit_why = "; ".join(words)
        elif opts.epilogues != "fused" and (opts.fold_layerscale or opts.fc1_gelu != "erf"):
            self.vit_why = f"off: epilogues={opts.epilogues!r} (these act on the fused ViT)"
        if opts.epilogues == "fused" and opts.fc1_gelu == "tanh":
            self.vit_why = ("" if self.vit_why == "off" else self.vit_why + "; ") + (
                "fc1 bias + tanh GELU " + ("in the GEMM epilogue (_addmm_activation)"
                                           if p.device.type == "cuda" else
                                           "after the GEMM (the GPU's function; off CUDA, "
                                           "_addmm_activation's GELU is the exact one)"))

        # gemm_dtype="bf16": bf16 copies of the ViT linears (fast/mixed_gemm.py)
        self.mixed: mixed_gemm.Bf16Weights | None = None
        if opts.gemm_dtype is not None:
            mixed_gemm.check_mixed_model(p, opts.gemm_dtype)
            self.mixed = mixed_gemm.prepare_bf16_weights([v for _, v in fp8_vits(model)])

        # the fused ViT's GEMM library (CPU only: on a GPU the GEMMs are cuBLAS's)
        self.gemm_name, self.gemm_why = "aten", "aten: not on a CPU"
        if self.mixed is not None:
            self.gemm_why = (f"gemm_dtype=bf16: {len(self.mixed.weights)} ViT linears with bf16 "
                             "inputs (oneDNN, fp32 accumulation), fp32 activations "
                             "(cpu_gemm not used)")
        elif opts.fp8:
            self.gemm_why = "fp8: torch._scaled_mm (see fp8)"
        elif p.device.type == "cpu" and opts.epilogues == "fused":
            vit = model.encoder.patch_encoder
            mlp = vit.blocks[0].mlp.fc1
            self.gemm_name, self.gemm_why = choose_cpu_gemm(
                opts.cpu_gemm, p.dtype, k=mlp.in_features, n=mlp.out_features)

        # the ViTs in lock-step (their weights stacked once, fast/lockstep.py)
        self.lockstep: lockstep.LockstepViTs | None = None
        self.lockstep_why = "off: vit_lockstep=False"
        if opts.vit_lockstep:
            self.lockstep, self.lockstep_why = lockstep.prepare(model)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the prepared layers own (kept alive by CUDA graphs)."""
        out: list[torch.Tensor] = []

        def walk(obj):
            if isinstance(obj, folds.FoldedLayer):
                out.extend(obj.tensors().values())
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    walk(o)

        for v in vars(self).values():
            walk(v)
        for w in (self.fp8_weights or {}).values():
            out += [w.q, w.scale]
        for fold in self.layerscale.values():
            out += fold.tensors()
        if self.lockstep is not None:
            out += self.lockstep.tensors()
        if self.mixed is not None:
            out += self.mixed.tensors()
        return out


def fp8_vits(model: DepthPro) -> list[tuple[str, VisionTransformer]]:
    """The ViTs whose linears run in fp8: patch, image and FOV encoders."""
    enc = model.encoder
    vits = [("encoder.patch_encoder", enc.patch_encoder),
            ("encoder.image_encoder", enc.image_encoder)]
    if model.fov is not None:
        vits.append(("fov.encoder.0", model.fov.encoder[0]))
    return vits


def check_fp8_model(p: torch.Tensor) -> None:
    """fp8 needs a bf16 model (the residual stream, attention, decoder stay bf16) on a device
    with FP8 tensor cores (or a CPU, emulated)."""
    if p.dtype != torch.bfloat16:
        raise ValueError(f"fp8 needs a bfloat16 model (the parts outside the ViT linears run in "
                         f"bf16), this one is {p.dtype}; load(..., dtype='fp8') makes one")
    problem = fp8_problem(p.device)
    if problem:
        raise Fp8UnavailableError(f"fp8 cannot run here: {problem}")


def fold_source_slots(model: DepthPro) -> list[tuple[torch.nn.Module, str]]:
    """(module, parameter name) of every parameter that the prepared conv layers are derived
    from (everything but the ViTs)."""
    enc = model.encoder
    mods = [enc.upsample_latent0, enc.upsample_latent1, enc.upsample0, enc.upsample1,
            enc.upsample2, enc.upsample_lowres, enc.fuse_lowres, model.decoder, model.head]
    if model.fov is not None:
        mods += [model.fov.downsample, model.fov.head]
    return [(m, n) for mod in mods for m in mod.modules()
            for n, p in m.named_parameters(recurse=False) if p is not None]


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------


class FastEngine:
    """The fast forward of one DepthPro model (a plain object: never part of the state dict)."""

    def __init__(self, model: DepthPro, options: FastOptions | None = None, *,
                 lazy: bool = False):
        self.model = model
        self.options = options or FastOptions()
        self._lock = threading.Lock()
        self._prepared: PreparedLayers | None = None
        self._fingerprint: tuple | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.graphs = GraphRunner(max_graphs=self.options.max_graphs,
                                  max_recaptures=self.options.max_recaptures)
        self.notes: dict[str, str] = {}
        self.calls = 0
        # attention per ViT batch (measured at warm-up): (batch, dtype, device) -> candidate
        self._attention: dict[tuple, Candidate] = {}
        self._attention_records: dict[str, dict[str, Any]] = {}
        self._warmed: set = set()
        # kernel qualification per input (``depthpro_fast/qualification.py``), for status()
        self.qualification: dict[str, dict[str, Any]] = {}
        # vit_lockstep: the ViT parameters its stacked copies derive from, listed once per
        # preparation (walking ~1000 parameters' modules on every call costs ~1 ms)
        self._derived: list[tuple[torch.nn.Module, str]] | None = None  # _derived_sources
        # the epilogue ops' backends, resolved per op: (asked backend, device) -> resolution
        self._epilogue_backends: dict[tuple[str, torch.device], EpilogueBackends] = {}
        if not lazy:
            self.prepare()

    # copy / pickle: a fresh (lazy) engine for the copied model; streams and graphs never copy
    def __deepcopy__(self, memo: dict) -> FastEngine:
        return FastEngine(memo.get(id(self.model), self.model), self.options, lazy=True)

    def __reduce__(self):
        return (_lazy_engine, (self.model, self.options))

    # -- preparation --------------------------------------------------------------------------

    def _derived_sources(self) -> list[torch.Tensor]:
        """The tensors that prepared layers derive from: the conv folds' sources (everything
        but the ViTs) and the ViT tensors of prepared copies (the lock-step's stacked weights,
        the fp8 mode's e4m3 copies, the folded LayerScale).

        The (module, parameter name) slots are listed once per preparation, since walking the
        72 blocks' submodules on every call cost ~0.3 ms of host time per forward; the tensors
        are read from the slots on every call, so a parameter replaced in its module
        (``load_state_dict(assign=True)``, ``blk.attn.qkv.weight = Parameter(...)``) is still
        seen. A replaced *module* needs ``prepare_fast()``, as for the other prepared layers."""
        if self._derived is None:
            # the conv folds' sources too: walking their modules on every call cost ~1 ms
            o, slots = self.options, fold_source_slots(self.model)

            def add(module: torch.nn.Module, *names: str) -> None:
                slots.extend((module, n) for n in names)

            if o.vit_lockstep:
                for vit in lockstep.model_vits(self.model):
                    for m in vit.modules():
                        add(m, *(n for n, _ in m.named_parameters(recurse=False)))
            if o.fp8:
                for _, vit in fp8_vits(self.model):
                    for blk in vit.blocks:
                        for path in fp8.VIT_LINEARS:
                            add(blk.get_submodule(path), "weight")
            if o.gemm_dtype is not None:
                slots += mixed_gemm.source_slots([v for _, v in fp8_vits(self.model)])
            if o.fold_layerscale and o.epilogues == "fused":
                for _, vit in fp8_vits(self.model):
                    slots += LayerScaleFold.source_slots(vit)
            self._derived = slots
        return [m._parameters[n] for m, n in self._derived]

    def _current_fingerprint(self) -> tuple:
        p = next(self.model.parameters())
        sources = self._derived_sources()  # the conv folds' and the ViT copies' sources
        # tensor_state: data pointer + version counter, or for inference tensors (no version
        # counter: a model loaded inside torch.inference_mode()) the tensor object itself
        return (p.device, p.dtype, tuple(tensor_state(t) for t in sources))

    def prepare(self) -> None:
        """(Re)build the folded / converted layers from the model's current weights."""
        with self._lock:
            self._prepare_locked()

    def _prepare_locked(self) -> None:
        with torch.no_grad():
            if next(self.model.parameters()).device.type == "cpu":
                # freed activations stay in the heap for the next forward (no page faults
                # per forward; cpu_memory.py), before the prepared copies are allocated
                tune_cpu_allocator()
            self._prepared = PreparedLayers(self.model, self.options)
        self._derived = None  # listed again (e.g. after load_state_dict(assign=True))
        self._fingerprint = self._current_fingerprint()
        self.graphs.reset()
        # resolved eagerly: a torch.compile trace of the forward then only reads the result
        self.epilogue_backends(next(self.model.parameters()).device)

    def _ensure_prepared(self) -> PreparedLayers:
        if torch.compiler.is_compiling():
            # Inside torch.compile the weights are the graph's constants: the freshness check
            # (data pointers) cannot be traced, and preparing inside a trace would be wrong.
            if self._prepared is None:
                raise RuntimeError("the fast engine prepares its weights eagerly: run the model "
                                   "once (or model.prepare_fast()) before torch.compile")
            return self._prepared
        fp = self._current_fingerprint()
        if self._prepared is None or fp != self._fingerprint:
            with self._lock:
                if self._prepared is None or self._current_fingerprint() != self._fingerprint:
                    self._prepare_locked()
        assert self._prepared is not None
        return self._prepared

    # -- public -------------------------------------------------------------------------------

    def uses_graphs(self, device: torch.device) -> bool:
        return self.options.cuda_graphs and device.type == "cuda"

    def __call__(self, x: torch.Tensor, *, need_fov: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, 1536, 1536) network input (checked by the caller) -> (cid, fov or None).

        Runs with ``x``'s GPU as the current device (``device_guard``): the warm-up's timings
        and synchronisations, the Triton launches and the graph capture all happen there, not
        on whatever device the process had current."""
        if torch.compiler.is_compiling():  # the compiled code guards its own launches
            return self._call_on_device(x, need_fov=need_fov)
        with on_device(x):
            return self._call_on_device(x, need_fov=need_fov)

    def epilogue_backends(self, device: torch.device) -> EpilogueBackends:
        """The backend each epilogue op runs on, on ``device``: ``epilogue_backend`` (else the
        model's backend) where it has the op, else the next that does, with the reason
        recorded (``fast/epilogue_backends.py``)."""
        asked = backends.check_backend(self.options.epilogue_backend or self.model.backend)
        found = self._epilogue_backends.get((asked, device))
        if found is None:
            found = EpilogueBackends(asked, device)
            self._epilogue_backends[(asked, device)] = found
            self.notes["epilogue_backends"] = found.describe()
        return found

    def _call_on_device(self, x: torch.Tensor, *, need_fov: bool,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prepared = self._ensure_prepared()
        model = self.model
        compute_fov = model.fov is not None and (need_fov or not self.options.skip_unused_fov)
        if not torch.compiler.is_compiling():
            self.calls += 1
        compiling = torch.compiler.is_compiling()
        key = (tuple(x.shape), x.dtype, str(x.device), compute_fov, model.backend,
               self.options.epilogue_backend)
        if not compiling:
            self._warm_up(x, prepared, compute_fov, key)
        if not self.uses_graphs(x.device) or compiling:
            if x.device.type != "cuda" and not compiling:
                self.notes.setdefault("cuda_graphs", "off: not on a CUDA device")
            return self._forward(x, prepared, compute_fov)

        def run(inp: torch.Tensor):
            return self._forward(inp, prepared, compute_fov)

        def keep_alive() -> tuple:
            return tuple(prepared.tensors()) + tuple(model.parameters())

        cid, fov = self.graphs.run(key, run, x, keep_alive=keep_alive)
        return cid, fov

    # -- warm-up: attention measured, kernels tuned, before any capture ----------------------

    def _measures_attention(self) -> tuple[bool, str]:
        o = self.options
        if o.attention_choice != "measure":
            return False, "off: attention_choice='backend'"
        if self.model.backend != "auto":
            return False, f"off: the model's backend is {self.model.backend!r} (measured: auto)"
        if o.epilogues == "torch":
            return False, "off: epilogues='torch' runs the reference modules' attention"
        return True, "measured at warm-up"

    def _warm_up(self, x: torch.Tensor, prepared: PreparedLayers, compute_fov: bool,
                 key: tuple) -> None:
        """Once per input key: time the attention implementations for this batch's shapes
        (``fast/attention_choice.py``), then on CUDA one eager forward with the side stream
        off, so that Triton's autotuning and cuDNN's benchmark run alone and before the CUDA
        graph runner captures (its own warm-up runs then hit their caches)."""
        if key in self._warmed:
            return
        with self._lock:
            if key in self._warmed:
                return
            # every custom kernel checked at this input's shapes before it is timed or captured
            self.qualification[f"{tuple(x.shape)} {x.dtype} {x.device} fov={compute_fov}"] = \
                qualification.qualify_engine(self, x, compute_fov, lambda: self._forward(
                    x, prepared, compute_fov, streams=False))
            ok, why = self._measures_attention()
            self.notes["attention_choice"] = why
            if ok:
                self._choose_attention(x, compute_fov)
            if self._tunes(x.device):
                self._forward(x, prepared, compute_fov, streams=False)
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
            self._warmed.add(key)

    @staticmethod
    def _tunes(device: torch.device) -> bool:
        """Whether a first forward autotunes (Triton, cuDNN): on CUDA devices."""
        return device.type == "cuda"

    def _choose_attention(self, x: torch.Tensor, compute_fov: bool = True) -> None:
        """The attention implementation per ViT batch of this input: measured once per process
        and stored per device (``attention_choice.decide``), so every engine on the same device
        and versions runs the same kernels; where each choice came from goes to the notes."""
        from ..op_common import windows_per_image
        from . import timed_choice

        attn = self.model.encoder.patch_encoder.blocks[0].attn
        b = x.shape[0]
        batches = [windows_per_image() * b, b]  # patch encoder, image / FOV encoders
        if self._prepared is not None and self._prepared.lockstep is not None:
            # lock-step: one attention over the sequences of all ViTs run (FOV included or not)
            batches = [windows_per_image() * b + b + (b if compute_fov else 0)]
        for batch in batches:
            k = (batch, x.dtype, x.device)
            if k in self._attention:
                continue
            record = attention_choice.decide(batch, attn.num_heads, NUM_TOKENS,
                                             attn.head_dim, x.dtype, x.device)
            self._attention[k] = attention_choice.by_name(record["choice"], x.device)
            name = attention_choice.shape_key(batch, attn.num_heads, NUM_TOKENS, attn.head_dim,
                                              x.dtype)
            self._attention_records[name] = record
        self.notes["attention_choice_source"] = "; ".join(
            f"{name}: {r['choice']} ({timed_choice.source_words(r)})"
            for name, r in self._attention_records.items())

    def status(self) -> dict[str, Any]:
        """What the engine does and does not use, and why (for reports and benchmarks)."""
        return {"options": dataclasses.asdict(self.options),
                "folds": list(self._prepared.folds) if self._prepared else [],
                "cpu_gemm": self._prepared.gemm_why if self._prepared else None,
                "fp8": self._prepared.fp8_why if self._prepared else None,
                "vit_epilogues": self._prepared.vit_why if self._prepared else None,
                "vit_lockstep": self._prepared.lockstep_why if self._prepared else None,
                "graphs": self.graphs.status(), "notes": dict(self.notes), "calls": self.calls,
                "qualification": dict(self.qualification),
                "attention": {k: {"choice": r["choice"], "timings_ms": r["timings_ms"],
                                  "errors": r["errors"], "skipped": r["skipped"],
                                  "source": r.get("source"),
                                  "why_measured": r.get("why_measured")}
                              for k, r in self._attention_records.items()}}

    # -- the forward --------------------------------------------------------------------------

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if not (self.options.streams and device.type == "cuda"):
            return None
        s = self._side_streams.get(device)
        if s is None:
            # drawn once and kept, never a CUDA stream that another engine or a graph runner
            # holds (torch's pool hands out 32 streams per device round-robin: fast/streams.py)
            s = own_stream(device, self)
            if s is None:
                self.notes["streams"] = (f"off on {device}: every stream of torch's pool is held "
                                         "by other engines or graph runners")
                return None
            kept = self._side_streams.setdefault(device, s)
            if kept is not s:  # another thread drew one first
                release_stream(s, self)
            s = kept
        return s

    def _lockstep_vits(self, inputs: list[torch.Tensor], hook_ids: list[tuple[int, ...]],
                       ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """The first ``len(inputs)`` ViTs (patch, image, FOV) in lock-step (fast/lockstep.py)."""
        prepared = self._prepared
        assert prepared is not None and prepared.lockstep is not None
        x, seqs = inputs[0], sum(t.shape[0] for t in inputs)
        # one attention over all sequences: the implementation measured for that batch
        chosen = (self._attention.get((seqs, x.dtype, x.device)) if isinstance(seqs, int)
                  else None)
        backend = chosen.backend if chosen is not None else self.model.backend
        with attention_choice.pinned(chosen):
            return lockstep.forward(prepared.lockstep, inputs, hook_ids, backend=backend,
                                    epilogue_backend=self.epilogue_backends(x.device))

    def _vit(self, vit: VisionTransformer, x: torch.Tensor, hook_ids=()):
        o = self.options
        # the attention measured fastest for this ViT batch, else the model's backend (also
        # for a symbolic batch, as torch.export traces it: the choice is per concrete batch)
        batch = x.shape[0]
        chosen = (self._attention.get((batch, x.dtype, x.device)) if isinstance(batch, int)
                  else None)
        backend = chosen.backend if chosen is not None else self.model.backend
        with attention_choice.pinned(chosen):
            if o.epilogues == "fused":
                epi = self.epilogue_backends(x.device)
                prepared = self._prepared
                if prepared is not None and prepared.fp8_weights is not None:
                    gemm = fp8.Fp8Gemm(prepared.fp8_weights, epi,
                                       per_tensor=o.fp8_scaling == "tensor")
                elif prepared is not None and prepared.mixed is not None:
                    # with the fused LayerNorm pass the residual branches stay bf16: that pass
                    # widens them while it adds them to the fp32 stream
                    gemm = mixed_gemm.MixedGemm(prepared.mixed, epi,
                                                widen_branches=not o.fuse_layer_norm)
                else:
                    gemm = CpuGemm(prepared.gemm_name if prepared is not None else "aten", epi)
                fold = prepared.layerscale.get(id(vit)) if prepared is not None else None
                if o.fold_layerscale and fold is None:
                    raise RuntimeError("fold_layerscale: this ViT has no prepared fold (its "
                                       "module was replaced); call model.prepare_fast() again")
                return fused_forward_with_hooks(
                    vit, x, hook_ids, backend=backend, epilogue_backend=epi,
                    fuse_layer_norm=o.fuse_layer_norm, gemm=gemm, fold=fold,
                    epilogues=ViTEpilogues(o.residual_in_gemm, o.fc1_gelu, o.residual_fp32))
            if o.epilogues == "compile":
                return compiled_forward_with_hooks(vit, x, hook_ids, backend=backend,
                                                   mode=o.compile_mode)
            return vit.forward_with_hooks(x, hook_ids)

    def _forward(self, x: torch.Tensor, p: PreparedLayers, compute_fov: bool, *,
                 streams: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's one data flow (``dataflow.run_network``) over the fast stages
        (``streams=False``: no side stream, as at warm-up)."""
        with cudnn_benchmark(self.options.cudnn_benchmark and x.device.type == "cuda"):
            # the lock-stepped ViTs replace the side stream
            side = self._side_stream(x.device) if streams and p.lockstep is None else None
            stages = FastStages(self, p, side)
            return dataflow.run_network(stages, x, compute_fov=compute_fov)


def _lazy_engine(model: DepthPro, options: FastOptions) -> FastEngine:
    return FastEngine(model, options, lazy=True)
