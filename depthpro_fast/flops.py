"""FLOP and byte accounting of a DepthPro forward, on the meta device (no memory, no weights).

``count_flops(config)`` runs one forward of the reference path under
``torch.utils.flop_counter.FlopCounterMode`` on the meta device: exact FLOPs of every matmul and
convolution (1 FLOP = one multiply or one add, an FMA is 2), split per module and per op. For the
official model at 1536x1536 it gives 19,247.4 GFLOP per image (anchors.md §2). Attention appears as
``aten.bmm`` (our reference attention is two batched matmuls); softmax, LayerNorm, GELU, resizes
and elementwise ops are not counted (they are memory-bound, a few percent of the time at most).

``count_bytes(config)`` is a rough memory-traffic estimate: the floor (weights once, the input
and the outputs) and the traffic of the unfused eager reference path (every non-view aten op
reads its tensor inputs and writes its outputs once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from .config import IMG_SIZE, DepthProConfig, resolve_config

#: The stages of a forward, as timed by ``depthpro_fast.bench.stages.time_stages``, and the module
#: prefixes (relative to ``DepthPro``) whose FLOPs belong to each. "split" and "merge" have no
#: FLOPs of their own (resizes, crops); the merge stage also runs the upsampling convolutions.
STAGES: dict[str, tuple[str, ...]] = {
    "split": (),
    "patch encoder": ("encoder.patch_encoder",),
    "image encoder": ("encoder.image_encoder",),
    "FOV encoder": ("fov.encoder",),
    "merge + upsample": ("encoder.upsample", "encoder.fuse_lowres"),
    "decoder": ("decoder",),
    "head": ("head", "fov.downsample", "fov.head"),
}


@dataclasses.dataclass
class FlopReport:
    """FLOPs of one forward of ``batch`` images."""

    config: DepthProConfig
    batch: int
    total: int
    by_op: dict[str, int]
    #: fully qualified module name (without the root ``DepthPro.``) -> FLOPs of that module and
    #: its children; "" is the whole model.
    by_module: dict[str, int]

    @property
    def per_image(self) -> float:
        return self.total / self.batch

    def module(self, prefix: str) -> int:
        """FLOPs of every top-most module whose name starts with ``prefix``."""
        names = [n for n in self.by_module if n.startswith(prefix) and n]
        # keep only the top-most names, so that children are not counted twice
        tops = [n for n in names if not any(n != p and n.startswith(p + ".") for p in names)]
        return sum(self.by_module[n] for n in tops)

    def by_stage(self) -> dict[str, int]:
        """FLOPs of each benchmark stage (see ``STAGES``)."""
        return {stage: sum(self.module(p) for p in prefixes)
                for stage, prefixes in STAGES.items()}

    def table(self, depth: int = 2) -> str:
        """A text table of GFLOP per module down to ``depth`` levels, and per op."""
        lines = [f"{'module':<44} {'GFLOP':>12} {'share':>7}"]
        for name, flops in self.by_module.items():
            level = 0 if not name else name.count(".") + 1
            if level > depth:
                continue
            label = ("  " * level) + (name.rsplit(".", 1)[-1] if name else "DepthPro")
            lines.append(f"{label:<44} {flops / 1e9:>12,.1f} {100 * flops / self.total:>6.1f}%")
        lines.append("")
        for op, flops in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            lines.append(f"{op:<44} {flops / 1e9:>12,.1f} {100 * flops / self.total:>6.1f}%")
        lines.append(f"{'total':<44} {self.total / 1e9:>12,.1f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "total": self.total, "per_image": self.per_image,
                "by_op": dict(self.by_op), "by_stage": self.by_stage()}


def _check_args(batch: int, image_size: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if image_size != IMG_SIZE:
        raise ValueError(f"image_size must be {IMG_SIZE}: the network's input size is fixed "
                         f"(other image sizes are resized to it by infer()), got {image_size!r}")


def _meta_model(config: DepthProConfig, dtype: torch.dtype = torch.float32):
    from .api import build_model

    model = build_model(config, device="meta").to(dtype).eval()
    model.set_backend("reference")  # count the reference path: plain matmuls and convolutions
    return model


def count_flops(config: DepthProConfig | Mapping[str, Any] | str | None = None, batch: int = 1,
                image_size: int = IMG_SIZE) -> FlopReport:
    """FLOPs of one forward of ``batch`` images of the model ``config`` (default: official).

    Runs on the meta device: takes a few seconds and no memory.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = resolve_config(config)
    _check_args(batch, image_size)
    model = _meta_model(cfg)
    x = torch.empty(batch, 3, image_size, image_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()
    by_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    by_module: dict[str, int] = {}
    root = type(model).__name__
    for name, ops in counts.items():
        if name == "Global" or not (name == root or name.startswith(root + ".")):
            continue
        by_module[name[len(root) + 1:]] = int(sum(ops.values()))
    report = FlopReport(config=cfg, batch=batch, total=int(counter.get_total_flops()),
                        by_op=by_op, by_module=by_module)
    # Modules entered through a method other than __call__ (the patch encoder runs
    # ``forward_with_hooks``) are not seen by the counter: add them as the sum of their children.
    complete: dict[str, int] = {}
    for name in by_module:
        parts = name.split(".") if name else []
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in complete:
                complete[prefix] = by_module.get(prefix, report.module(prefix))
    report.by_module = {"": report.total, **complete}
    return report


@dataclasses.dataclass
class ByteReport:
    """Rough memory traffic of one forward (bytes)."""

    dtype: torch.dtype
    batch: int
    weights: int
    input: int
    outputs: int
    #: every non-view aten op of the eager reference path reading its inputs and writing its
    #: outputs once (no fusion, no cache reuse)
    eager: int

    @property
    def floor(self) -> int:
        """Weights once, the input once, the outputs once: no implementation moves less."""
        return self.weights + self.input + self.outputs

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).replace("torch.", ""), "batch": self.batch,
                "weights": self.weights, "input": self.input, "outputs": self.outputs,
                "floor": self.floor, "eager": self.eager}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_bytes(config: DepthProConfig | Mapping[str, Any] | str | None = None, batch: int = 1,
                dtype: torch.dtype = torch.bfloat16, image_size: int = IMG_SIZE) -> ByteReport:
    """Memory-traffic estimate of one forward in ``dtype`` (see ``ByteReport``), on meta."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    cfg = resolve_config(config)
    _check_args(batch, image_size)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    model = _meta_model(cfg, dtype)
    weights = sum(_nbytes(p) for p in model.parameters())
    x = torch.empty(batch, 3, image_size, image_size, device="meta", dtype=dtype)

    class _Traffic(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            schema = func._schema
            # views and metadata ops move no data; creating an empty tensor writes nothing
            is_view = any(r.alias_info is not None and not r.alias_info.is_write
                          for r in schema.returns)
            if is_view or schema.name.startswith("aten::empty"):
                return out
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            type(self).total += sum(_nbytes(t) for t in inputs + outputs)
            return out

    with _Traffic(), torch.no_grad():
        depth, fov = model(x)
    outputs = _nbytes(depth) + (_nbytes(fov) if fov is not None else 0)
    return ByteReport(dtype=dtype, batch=batch, weights=weights, input=_nbytes(x),
                      outputs=outputs, eager=_Traffic.total)


def main() -> None:  # python -m depthpro_fast.flops [config]
    import sys

    cfg = sys.argv[1] if len(sys.argv) > 1 else None
    report = count_flops(cfg)
    print(report.table())
    print()
    for stage, flops in report.by_stage().items():
        print(f"{stage:<20} {flops / 1e9:>12,.1f} GFLOP")
    traffic = count_bytes(cfg)
    print(f"\nbf16 traffic: floor {traffic.floor / 1e9:.2f} GB, eager reference path "
          f"{traffic.eager / 1e9:.1f} GB (rough)")


if __name__ == "__main__":
    main()
