"""``torch.compile(fullgraph=True)`` traces through the ops' dispatch and custom ops.

Dynamo must see each op as one custom op, with no graph break in the dispatch around it. Newer
Dynamo refuses things older ones traced (torch 2.11 refuses ``importlib.util.find_spec``), so CI
runs this file twice: with the development torch, and in the venv that mirrors the GPU machine
(torch 2.11, ``.ci/gpu_build_check.sh``). The graphs are only traced, not run (the backend
below hands back empty outputs): the Triton 3.6 interpreter of that venv cannot run kernels
with numpy 2, and running them is the other tests' job.
"""

from __future__ import annotations

import pytest
import torch

from depthpro_fast import backends, ops
from tests.conftest import TINY_DIR, requires_triton

pytestmark = requires_triton

CPU = torch.device("cpu")


class TraceOnly:
    """A Dynamo backend that keeps the FX graphs and returns empty outputs of the right kind."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]

        def empty(node: object) -> object:
            if not isinstance(node, torch.fx.Node):
                return node
            val = node.meta["example_value"]
            return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype)

        def run(*args: object) -> object:
            return type(outs)(empty(o) for o in outs) if isinstance(outs, (tuple, list)) \
                else empty(outs)

        return run

    def custom_ops(self) -> set[str]:
        names = set()
        for gm in self.graphs:
            for n in gm.graph.nodes:
                if n.op == "call_function" and "depthpro_fast" in str(n.target):
                    names.add(str(n.target).split(".")[1])
        return names


def _trace(fn, *args) -> TraceOnly:
    torch._dynamo.reset()
    backend = TraceOnly()
    torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert len(backend.graphs) == 1, "fullgraph compile produced more than one graph"
    return backend


def test_op_dispatch_traces_in_one_graph():
    backends.preload("triton", CPU)  # resolve (import) outside the trace, as set_backend does
    qkv = torch.randn(2, 17, 3, 2, 32)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    x = torch.randn(2, 9, 64)
    w, b = torch.randn(64), torch.randn(64)

    def epilogues(q, k, v, x, w, b):
        a = ops.attention(q, k, v, backend="triton")
        y = ops.bias_gelu(x, b, backend="triton")
        z = ops.residual_layerscale(x, y, b, w, backend="triton")
        return a, ops.add_layer_norm(x, z, w, b, 1e-6, backend="triton")

    traced = _trace(epilogues, q, k, v, x, w, b)
    assert {"attention_triton", "bias_gelu_triton", "residual_layerscale_triton",
            "add_layer_norm_triton"} <= traced.custom_ops()


def test_patch_ops_trace_in_one_graph():
    backends.preload("triton", CPU)
    image = torch.rand(1, 3, 1536, 1536) * 2 - 1
    tokens = torch.randn(25, 1 + 4 * 4, 8)

    def patches(image, tokens):
        windows = ops.split_patches(image, prenormalized=True, backend="triton")
        merged = ops.merge_patches(tokens, batch_size=1, grid=5, padding=1, backend="triton")
        return windows, merged

    traced = _trace(patches, image, tokens)
    assert {"split_patches_triton", "merge_patches_triton"} <= traced.custom_ops()


@pytest.mark.parametrize("fast", [False, True], ids=["reference-modules", "fast-engine"])
def test_tiny_model_traces_in_one_graph(fast):
    import depthpro_fast

    model, _ = depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt",
                                  config=TINY_DIR / "config.json", device="cpu",
                                  backend="triton", fast=fast)
    x = torch.rand(1, 3, 1536, 1536) * 2 - 1
    with torch.no_grad():
        traced = _trace(model, x)
    expected = {"attention_triton", "split_patches_triton", "merge_patches_triton"}
    if fast:
        expected |= {"bias_gelu_triton", "add_layer_norm_triton"}
    assert expected <= traced.custom_ops(), traced.custom_ops()
