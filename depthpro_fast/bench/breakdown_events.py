"""The profiler events ``bench --breakdown`` reads, and what they compute: FLOPs from the
recorded input shapes, estimated bytes moved.

FLOPs follow the convention of ``depthpro_fast.flops`` (an FMA is 2 FLOPs; attention's two
matmuls; a transposed convolution per input pixel), so they can be checked against
``count_flops``. Bytes are an estimate for the memory floor: each data-moving leaf op reads its
tensor inputs and writes an output of their broadcast shape (in place: the first input again).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

#: ops that move no data (views, metadata, allocations): their time is dispatch overhead
VIEWS = frozenset({"aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::transpose",
                   "aten::t", "aten::permute", "aten::select", "aten::slice", "aten::expand",
                   "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::detach",
                   "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided",
                   "aten::resize_", "aten::resolve_conj", "aten::resolve_neg", "aten::split",
                   "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::narrow",
                   "aten::_reshape_alias", "aten::view_as", "aten::unflatten", "aten::lift_fresh",
                   "aten::_nnpack_available", "aten::result_type", "aten::is_nonzero",
                   "aten::movedim", "aten::moveaxis", "aten::swapaxes", "aten::numpy_T",
                   "aten::mT", "aten::unsafe_split", "aten::diagonal", "aten::set_",
                   "aten::detach_", "aten::new_empty",
                   "aten::new_empty_strided", "aten::_has_compatible_shallow_copy_type",
                   "aten::_unsafe_split", "aten::_local_scalar_dense", "aten::item"})

#: the fused attention ops (SDPA and the kernels it dispatches to)
ATTENTION_PREFIXES = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product",
                      "aten::_flash_attention", "aten::_efficient_attention")
#: composite ops that return their input (or a view of it) when nothing needs converting:
#: without children below them they moved no data
NOOP_WHEN_LEAF = frozenset({"aten::to", "aten::contiguous", "aten::reshape", "aten::flatten",
                            "aten::type_as"})


class Event:
    """What the classification reads of one profiler event (``FunctionEvent``'s fields), so
    that tests and other profilers can build them directly."""

    __slots__ = ("name", "shapes", "dtypes", "concrete", "children", "total_us", "self_us")

    def __init__(self, name: str, shapes: Sequence[Any] = (), dtypes: Sequence[str] = (),
                 concrete: Sequence[Any] = (), children: Sequence[Event] = (),
                 total_us: float = 0.0, self_us: float | None = None):
        self.name = name
        self.shapes = list(shapes)
        self.dtypes = list(dtypes)
        self.concrete = list(concrete)
        self.children = list(children)
        #: time from its start to its end (children included), and without its children's
        self.total_us = total_us
        self.self_us = (total_us - sum(c.total_us for c in self.children)
                        if self_us is None else self_us)

    @classmethod
    def from_profiler(cls, e: Any) -> Event:
        """From a ``torch.autograd.profiler_util.FunctionEvent`` (with its children)."""
        shapes = getattr(e, "structured_input_shapes", None) or e.input_shapes or []
        return cls(e.name, shapes, getattr(e, "input_dtypes", None) or [],
                   getattr(e, "concrete_inputs", None) or [],
                   [cls.from_profiler(c) for c in e.cpu_children],
                   total_us=float(e.cpu_time_total), self_us=float(e.self_cpu_time_total))

    def is_op(self) -> bool:
        """An operator (``aten::mm``, ``mkldnn::...``), not a ``record_function`` label."""
        return "::" in self.name and " " not in self.name


def transposed(e: Event) -> bool:
    """Whether an ``aten::convolution`` / ``_convolution`` event is a transposed one."""
    # aten::convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
    return len(e.concrete) > 6 and e.concrete[6] is True


# -- FLOPs ------------------------------------------------------------------------------------

def _prod(xs: Sequence[int]) -> int:
    return math.prod(int(x) for x in xs)


def _shape(e: Event, i: int) -> list[int] | None:
    s = e.shapes[i] if i < len(e.shapes) else None
    return s if isinstance(s, list) and all(isinstance(x, int) for x in s) else None


def _concrete(e: Event, i: int, default: Any = None) -> Any:
    v = e.concrete[i] if i < len(e.concrete) else None
    return default if v is None else v


def _pair(v: Any, n: int) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v] * (n if len(v) == 1 else 1)
    return [int(v)] * n


def _matmul_flops(a: list[int], b: list[int]) -> int:
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    m, k, n = a[-2], a[-1], b[-1]
    batch = 1
    for x, y in zip(reversed(a[:-2]), reversed(b[:-2]), strict=False):
        batch *= max(x, y)
    longer = a[:-2] if len(a) > len(b) else b[:-2]
    batch *= _prod(longer[:abs(len(a) - len(b))])
    return 2 * batch * m * k * n


def _conv_flops(e: Event, is_transposed: bool, stride_i: int, pad_i: int,
                dil_i: int) -> int | None:
    """FLOPs of a convolution event, or None when its arguments were not all recorded (the
    ``padding="same"`` overload records no padding: the ``convolution`` below it counts)."""
    x, w = _shape(e, 0), _shape(e, 1)
    if not x or not w:
        return None
    if is_transposed:  # weight (Cin, Cout/g, k...): every input pixel scatters through the kernel
        return 2 * _prod(x) * _prod(w[1:])
    spatial = len(w) - 2
    raw = [e.concrete[i] if i < len(e.concrete) else None for i in (stride_i, pad_i, dil_i)]
    if any(v is None for v in raw):
        return None
    stride, pad, dilation = (_pair(v, spatial) for v in raw)
    out = [(x[2 + i] + 2 * pad[i] - dilation[i] * (w[2 + i] - 1) - 1) // stride[i] + 1
           for i in range(spatial)]
    # weight (Cout, Cin/g, k...): 2 x batch x Cout x out pixels x Cin/g x kernel
    return 2 * x[0] * _prod(w) * _prod(out)


def op_flops(e: Event) -> int | None:
    """FLOPs of ``e`` from its recorded shapes, or None when ``e`` has no formula here (its
    children then count)."""
    name, s = e.name, e.shapes
    if name in ("aten::mm", "aten::bmm", "aten::matmul", "aten::_scaled_mm"):
        a, b = _shape(e, 0), _shape(e, 1)
        return _matmul_flops(a, b) if a and b else 0
    if name in ("aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::_addmm_activation"):
        a, b = _shape(e, 1), _shape(e, 2)
        return _matmul_flops(a, b) if a and b else 0
    if name in ("aten::linear", "aten::mkldnn_linear") or name.startswith(
            "mkldnn::_linear_pointwise"):
        x, w = _shape(e, 0), _shape(e, 1)
        return 2 * _prod(x[:-1]) * x[-1] * w[0] if x and w else 0
    if name.startswith(ATTENTION_PREFIXES) and len(s) >= 3:
        q, k, v = _shape(e, 0), _shape(e, 1), _shape(e, 2)
        if q and k and v and len(q) >= 3:
            batch = _prod(q[:-2])
            return 2 * batch * q[-2] * k[-2] * (q[-1] + v[-1])
        return 0
    if name in ("aten::conv1d", "aten::conv2d", "aten::conv3d"):
        return _conv_flops(e, False, 3, 4, 5)
    if name in ("aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d"):
        return _conv_flops(e, True, 3, 4, 7)
    if name in ("aten::convolution", "aten::_convolution"):
        return _conv_flops(e, transposed(e), 3, 4, 5)
    return None


def flops(e: Event) -> int:
    """FLOPs of ``e`` and its subtree (the outermost op with a formula counts, once)."""
    own = op_flops(e)
    if own is not None:
        return own
    return sum(flops(c) for c in e.children)


def flops_by_dtype(e: Event) -> dict[str, int]:
    """:func:`flops` of ``e`` split by the dtype each counted op ran in (its first input's)."""
    own = op_flops(e)
    if own is not None:
        return {compute_dtype(e) or "float": own} if own else {}
    out: dict[str, int] = {}
    for c in e.children:
        for dt, n in flops_by_dtype(c).items():
            out[dt] = out.get(dt, 0) + n
    return out


# -- bytes ------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
                "int": 4, "short int": 2, "bool": 1, "unsigned char": 1, "signed char": 1,
                "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1, "c10::complex<float>": 8}


def dtype_bytes(name: str) -> int | None:
    """Bytes per element of a profiler dtype name (``float``, ``c10::BFloat16``, ...)."""
    return _DTYPE_BYTES.get(name)


def _tensor_inputs(e: Event, list_elem: int = 4) -> list[tuple[list[int], int]]:
    """(shape, bytes per element) of each tensor input (tensor lists flattened; the profiler
    records no dtype for a tensor list: ``list_elem`` bytes per element)."""
    out = []
    for i, shape in enumerate(e.shapes):
        dt = e.dtypes[i] if i < len(e.dtypes) else ""
        if dt == "TensorList" and isinstance(shape, list):
            out += [(s, list_elem) for s in shape if isinstance(s, list) and s]
            continue
        size = dtype_bytes(dt)
        if size is not None and isinstance(shape, list):
            out.append((shape, size))
    return out


def _leaf_bytes(e: Event, list_elem: int) -> int:
    if e.name in VIEWS or e.name in NOOP_WHEN_LEAF:
        return 0
    inputs = _tensor_inputs(e, list_elem)
    if not inputs:
        return 0
    read = sum(_prod(s) * size for s, size in inputs)
    first_shape, first_size = inputs[0]
    if e.name in ("aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_",
                  "aten::uniform_"):
        return read  # copy_: destination written, source read; fill: written once
    if e.name.endswith("_"):  # in place: the first input is read and written
        return read + _prod(first_shape) * first_size
    if e.name in ("aten::cat", "aten::stack", "aten::_cat"):
        return 2 * read
    if e.name.startswith(("aten::upsample_", "aten::_upsample_")):
        return read + _resize_out(e, first_shape) * first_size
    try:
        out = _prod(torch.broadcast_shapes(*[tuple(s) for s, _ in inputs]))
    except (RuntimeError, ValueError):
        out = _prod(first_shape)
    return read + out * first_size


def _resize_out(e: Event, x: list[int]) -> int:
    size = _concrete(e, 1)
    scales = e.concrete[-1] if e.concrete else None
    if isinstance(size, list) and size:
        return _prod(x[:2]) * _prod(size)
    if isinstance(scales, list) and scales:
        return _prod(x[:2]) * _prod(int(math.floor(d * f)) for d, f in zip(x[2:], scales,
                                                                             strict=False))
    return _prod(x)


def moves_data(e: Event) -> bool:
    """Whether ``e`` moved data: not a view or allocation, and not a composite op (``to``,
    ``contiguous``, ``reshape``) that found nothing to convert (no data-moving op below)."""
    if e.name in VIEWS:
        return False
    if e.name in NOOP_WHEN_LEAF:
        return any(moves_data(c) for c in e.children)
    return True


def bytes_moved(e: Event, list_elem: int = 4) -> int:
    """Estimated bytes ``e`` reads and writes: an op whose children move no data is the kernel
    (its inputs and output count); otherwise the sum over its data-moving children
    (``list_elem``: bytes per element of tensor-list inputs, whose dtype is not recorded)."""
    inner = [c for c in e.children if moves_data(c)]
    if inner:
        return sum(bytes_moved(c, list_elem) for c in inner)
    return _leaf_bytes(e, list_elem)


def compute_dtype(e: Event) -> str | None:
    """The dtype of ``e``'s first tensor input (the precision its GEMM / conv ran in)."""
    for dt in e.dtypes:
        if dtype_bytes(dt) is not None:
            return dt
    return None


@dataclasses.dataclass
class Tally:
    """Everything one category (or stage) accumulated."""

    time_us: float = 0.0
    bytes: int = 0
    ops: int = 0
    #: FLOPs by the dtype they ran in (for the floor: each at its own peak rate)
    flops_by_dtype: dict[str, int] = dataclasses.field(default_factory=dict)
    #: op name -> [time in us, calls]: which ops the time went to
    by_op: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(self.flops_by_dtype.values())

    def add(self, time_us: float, flops_by_dtype: dict[str, int] | None = None,
            n_bytes: int = 0, ops: int = 0) -> None:
        self.time_us += time_us
        self.bytes += n_bytes
        self.ops += ops
        for dt, n in (flops_by_dtype or {}).items():
            self.flops_by_dtype[dt] = self.flops_by_dtype.get(dt, 0) + n

    def add_op(self, name: str, time_us: float, calls: int = 1) -> None:
        entry = self.by_op.setdefault(name, [0.0, 0])
        entry[0] += time_us
        entry[1] += calls

    def top_ops(self, n: int = 5) -> list[dict[str, float | int | str]]:
        """The ``n`` ops that took the most time: ``{"op", "time_ms", "calls"}``."""
        ranked = sorted(self.by_op.items(), key=lambda kv: -kv[1][0])[:n]
        return [{"op": op, "time_ms": t / 1e3, "calls": int(c)} for op, (t, c) in ranked]
