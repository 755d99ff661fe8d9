"""Every Triton launch runs on the device of its tensors (``depthpro_fast/device_guard.py``).

Triton launches on ``torch.cuda.current_device()``. On a CPU these tests stand in for a
second GPU: ``torch.cuda.current_device`` / ``torch.cuda.device`` are replaced by a fake that
tracks a current index, the guard is told that every tensor lives on ``cuda:1``, and Triton's
launch entry points (the interpreter's, the JIT's and the autotuner's, as ``triton/aot.py``
patches them) record the current device at each launch, then run the kernel.
"""

from __future__ import annotations

import ast
import contextlib
import types
from pathlib import Path

import pytest
import torch

import depthpro_fast
from depthpro_fast import backends, device_guard, ops
from depthpro_fast.device_guard import on_device
from tests.conftest import requires_triton

TRITON_DIR = Path(device_guard.__file__).parent / "triton"


class FakeCuda:
    """``torch.cuda.current_device`` / ``torch.cuda.device`` over a plain integer."""

    def __init__(self, current: int = 0):
        self.current = current
        self.switches: list[int] = []

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device(self, index: int):
        before, self.current = self.current, index
        self.switches.append(index)
        try:
            yield
        finally:
            self.current = before


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


def _on(device: str) -> types.SimpleNamespace:
    """A stand-in for a tensor on ``device`` (the guard reads ``.device`` only)."""
    return types.SimpleNamespace(device=torch.device(device))


# ----------------------------------------------------------------------------------------------
# the guard itself


def test_guard_switches_only_to_another_gpu(fake_cuda):
    with on_device(_on("cuda:1")):
        assert fake_cuda.current == 1
        with on_device(_on("cuda:1")):  # already there: no second switch
            assert fake_cuda.current == 1
        with on_device(torch.device("cuda", 0)):  # a device works as well as a tensor
            assert fake_cuda.current == 0
        assert fake_cuda.current == 1
    assert fake_cuda.current == 0  # restored
    assert fake_cuda.switches == [1, 0]
    for where in (torch.empty(2), torch.empty(2, device="meta"), _on("cuda:0"),
                  torch.device("cuda")):  # CPU, meta, the current GPU, no index
        with on_device(where):
            assert fake_cuda.current == 0
    assert fake_cuda.switches == [1, 0]


def test_guard_on_a_cpu_never_asks_cuda(monkeypatch):
    def refuse() -> int:
        raise AssertionError("torch.cuda.current_device() called for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "current_device", refuse)
    with on_device(torch.ones(1)):
        pass


def test_guard_restores_the_device_after_an_error(fake_cuda):
    with pytest.raises(ValueError), on_device(_on("cuda:2")):
        raise ValueError("kernel failed")
    assert fake_cuda.current == 0


# ----------------------------------------------------------------------------------------------
# the source: every kernel[grid](...) launch sits inside `with on_device(...)`


def _launches_outside_guard(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
            continue
        up, guarded = node, False
        while up in parents and not guarded:
            up = parents[up]
            if isinstance(up, ast.With):
                guarded = any(isinstance(i.context_expr, ast.Call)
                              and getattr(i.context_expr.func, "id", None) == "on_device"
                              for i in up.items)
            if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)) and not guarded:
                break  # a guard in a caller does not count: each launch site guards itself
        if not guarded:
            bad.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    return bad


def test_every_triton_launch_in_the_source_is_guarded():
    files = [p for p in sorted(TRITON_DIR.glob("*.py")) if p.name != "aot.py"]
    launches = sum(1 for p in files for n in ast.walk(ast.parse(p.read_text()))
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript))
    assert launches >= 12  # the checker sees the launches (one per kernel file, and more)
    assert [b for p in files for b in _launches_outside_guard(p)] == []


def test_the_source_checker_finds_an_unguarded_launch(tmp_path):
    path = tmp_path / "k.py"
    path.write_text("def f(x):\n    with on_device(x):\n        k[g](x)\n"
                    "    k2[g](x)\n    with other(x):\n        k3[g](x)\n")
    assert _launches_outside_guard(path) == ["k.py:4 k2[g]", "k.py:6 k3[g]"]


# ----------------------------------------------------------------------------------------------
# the launches: each op's Triton implementation, its tensors "on cuda:1", current device 0


def _cases() -> dict[str, callable]:
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    c = 8
    x, d, w, b = r(3, c), r(3, c), r(c), r(c)
    ends = torch.tensor([2, 4], dtype=torch.int32)
    xs, ws, bs = r(4, c), r(2, c), r(2, c)
    fmap = r(1, 4, 3, 3)
    t = dict(backend="triton")
    return {
        "attention": lambda: ops.attention(r(1, 2, 5, 32), r(1, 2, 5, 32), r(1, 2, 5, 32), **t),
        "bias_gelu": lambda: ops.bias_gelu(x, b, **t),
        "bias_gelu_fp8": lambda: ops.bias_gelu_fp8(x, b, **t),
        "bias_relu": lambda: ops.bias_relu(fmap, r(4), **t),
        "bias_residual": lambda: ops.bias_residual(fmap, r(4), r(1, 4, 3, 3), **t),
        "layer_norm": lambda: ops.layer_norm(x, w, b, 1e-6, **t),
        "add_layer_norm": lambda: ops.add_layer_norm(x, d, w, b, 1e-6, delta_bias=b, gamma=w,
                                                     **t),
        "layer_norm_fp8": lambda: ops.layer_norm_fp8(x, w, b, 1e-6, **t),
        "add_layer_norm_fp8": lambda: ops.add_layer_norm_fp8(x, d, w, b, 1e-6, **t),
        "grouped_layer_norm": lambda: ops.grouped_layer_norm(xs, ws, bs, 1e-6, ends, **t),
        "grouped_add_layer_norm": lambda: ops.grouped_add_layer_norm(xs, r(4, c), ws, bs, 1e-6,
                                                                     ends, **t),
        "quantize_rows": lambda: ops.quantize_rows(x, **t),
        "residual_layerscale": lambda: ops.residual_layerscale(x, d, b, w, **t),
        "merge_patches": lambda: ops.merge_patches(r(4, 1 + 16, c), batch_size=1, grid=2,
                                                   padding=1, **t),
        "split_patches": lambda: ops.split_patches(r(1, 3, 16, 16).clamp(0, 1), **t),
        "subpixel_tail": lambda: ops.subpixel_tail(r(1, 8, 3, 3), r(8), r(4), **t),
    }


@pytest.fixture
def launches(monkeypatch, fake_cuda) -> list[tuple[str, int]]:
    """(kernel, current device) of every Triton launch; the guard sees every tensor on cuda:1."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen: list[tuple[str, int]] = []
    for cls in (InterpretedFunction, JITFunction, Autotuner):
        run = cls.run

        def record(self, *args, _run=run, **kwargs):
            if not kwargs.get("warmup", False):
                fn = getattr(self, "fn", self)
                seen.append((getattr(fn, "__name__", "?"), fake_cuda.current))
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", record)
    monkeypatch.setattr(device_guard, "cuda_index", lambda where: 1)
    return seen


@requires_triton
def test_every_triton_op_launches_on_its_tensors_device(launches):
    cases = _cases()
    with_triton = {op for op, impls in backends.registered_ops().items() if "triton" in impls}
    assert with_triton == set(cases), "add a case for each op with a Triton implementation"
    for op, call in sorted(cases.items()):
        before = len(launches)
        call()
        mine = launches[before:]
        assert mine, f"{op}: no Triton launch recorded (is the entry point still patched?)"
        assert all(dev == 1 for _, dev in mine), f"{op} launched on the current device: {mine}"
    assert torch.cuda.current_device() == 0  # the fake's device, restored after each launch


# ----------------------------------------------------------------------------------------------
# the fast engine: warm-up and forward on the input's device


def test_engine_forward_runs_on_its_input_device(fake_cuda, monkeypatch):
    from depthpro_fast import dataflow
    from depthpro_fast.config import DepthProConfig

    micro = DepthProConfig(embed_dim=64, depth=2, num_heads=1, mlp_ratio=2.0,
                           encoder_feature_layer_ids=(0, 1),
                           encoder_feature_dims=(8, 16, 32, 64), decoder_features=16)
    torch.manual_seed(0)
    model, _ = depthpro_fast.load(None, config=micro, device="cpu", backend="reference",
                                  fast={"cpu_gemm": "aten"})
    seen: list[int] = []
    run_network = dataflow.run_network

    def record(*args, **kwargs):
        seen.append(fake_cuda.current)
        return run_network(*args, **kwargs)

    monkeypatch.setattr(dataflow, "run_network", record)
    monkeypatch.setattr(device_guard, "cuda_index", lambda where: 1)  # "x is on cuda:1"
    with torch.no_grad():
        model(torch.rand(1, 3, 1536, 1536) * 2 - 1)
    assert seen == [1]
    assert fake_cuda.current == 0
