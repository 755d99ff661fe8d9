"""The fast engine's epilogue ops on a backend that lacks some of them
(``backends.implementation_with_fallback``, ``fast/epilogue_backends.py``).

The CUDA extension implements attention and the patch split / merge only; a model loaded with
``backend="cuda", fast=True`` used to stop at its first LayerNorm pass ("op 'add_layer_norm'
has no 'cuda' implementation"). Each epilogue op now runs on the next backend that has it, and
says why.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

import depthpro_fast
from depthpro_fast import backends
from depthpro_fast.fast import epilogue_backends as eb
from depthpro_fast.fast.epilogue_backends import EPILOGUE_OPS, EpilogueBackends, op_backend
from tests.model_helpers import MICRO

FAST_DIR = Path(eb.__file__).parent
#: ops the engine runs on the model's (or the measured attention's) backend, not the epilogues'
MODEL_BACKEND_OPS = {"attention", "split_patches", "merge_patches"}



@pytest.fixture
def fresh_backends(monkeypatch):
    """Empty resolution caches and fallback log for the test (the module's own restored
    afterwards, so other tests keep their resolutions)."""
    for name in ("_RESOLVED", "_LOADED", "_FALLBACKS", "_WITH_FALLBACK"):
        monkeypatch.setattr(backends, name, {})
    return monkeypatch


def _fake_gpu_without_extension_kernels(monkeypatch) -> None:
    """A "CUDA extension" that runs on this CPU: its three ops are the reference functions."""
    monkeypatch.setattr(backends, "cuda_status", lambda device=None: (True, None))
    for op in ("attention", "split_patches", "merge_patches"):
        reference = backends._REGISTRY[op]["reference"]
        monkeypatch.setitem(backends._REGISTRY[op], "cuda", reference)


# ----------------------------------------------------------------------------------------------
# every op the engine calls, for every backend load() accepts: an implementation, or the
# reason it fell back


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_every_epilogue_op_resolves_or_records_why(fresh_backends, backend, device):
    device = torch.device(device)
    if device.type == "cuda":  # decided without a GPU: the extension built, Triton usable
        fresh_backends.setattr(backends, "cuda_status", lambda device=None: (True, None))
        fresh_backends.setattr(backends, "triton_status", lambda device=None: (True, None))
    registered = backends.registered_ops()
    for op in EPILOGUE_OPS:
        assert op in registered, f"the engine calls {op!r}, which is not a registered op"
        fn, used = backends.implementation_with_fallback(op, backend, device)
        assert callable(fn)
        assert used in backends.FALLBACK_ORDER
        if backend == "auto":
            continue
        order = backends.FALLBACK_ORDER
        assert order.index(used) >= order.index(backend)  # only ever down the order
        for skipped in order[order.index(backend):order.index(used)]:
            assert backends.fallback_log().get(f"{op}/{skipped}"), (op, skipped)
    resolved = EpilogueBackends(backend, device)
    assert set(resolved.chosen) == set(EPILOGUE_OPS)


def test_cuda_backend_falls_back_to_triton_with_the_reason(fresh_backends):
    fresh_backends.setattr(backends, "cuda_status", lambda device=None: (True, None))
    fresh_backends.setattr(backends, "triton_status", lambda device=None: (True, None))
    fn, used = backends.implementation_with_fallback("add_layer_norm", "cuda",
                                                     torch.device("cuda", 0))
    assert used == "triton"
    assert "has no 'cuda' implementation" in backends.fallback_log()["add_layer_norm/cuda"]
    # the strict resolution still refuses (a caller that names one backend for one op)
    with pytest.raises(RuntimeError, match="has no 'cuda' implementation"):
        backends.implementation("add_layer_norm", "cuda", torch.device("cuda", 0))


def test_fallback_skips_an_unavailable_backend(fresh_backends):
    fresh_backends.setattr(backends, "triton_status",
                           lambda device=None: (False, "no C compiler (test)"))
    _, used = backends.implementation_with_fallback("bias_gelu", "triton", torch.device("cpu"))
    assert used == "torch"  # bias_gelu has no dedicated torch kernel: its plain-torch reference
    assert "no C compiler (test)" in backends.fallback_log()["bias_gelu/triton"]
    with pytest.raises(KeyError, match="no op named"):
        backends.implementation_with_fallback("no_such_op", "triton", torch.device("cpu"))


def test_op_backend_passes_a_plain_name_through():
    assert op_backend("reference", "layer_norm") == "reference"
    assert op_backend(None, "layer_norm") is None
    resolved = EpilogueBackends("reference", torch.device("cpu"))
    assert op_backend(resolved, "bias_relu") == "reference"
    with pytest.raises(KeyError, match="not one of the fast engine's epilogue ops"):
        resolved.of("attention")


# ----------------------------------------------------------------------------------------------
# the engine's sources: every op call of the fast path is either a model-backend op or an
# epilogue op resolved per op, with its own name


def _op_calls(path: Path) -> list[tuple[str, ast.Call, list[ast.FunctionDef]]]:
    """(op name, call, the functions around it) of every ``ops.<name>(...)`` call."""
    tree = ast.parse(path.read_text(), filename=str(path))
    around: dict[ast.Call, list[ast.FunctionDef]] = {}
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ops"):
                around.setdefault(node, []).append(fn)
    return [(call.func.attr, call, fns) for call, fns in around.items()]


def _resolved_for(expr: ast.expr, fns: list[ast.FunctionDef]) -> str | None:
    """The op name of ``op_backend(..., "name")`` that ``expr`` is (or a name assigned from it
    in a function around the call)."""
    if isinstance(expr, ast.Name):
        for node in (n for fn in fns for n in ast.walk(fn)):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == expr.id):
                expr = node.value
                break
    if (isinstance(expr, ast.Call) and getattr(expr.func, "id", None) == "op_backend"
            and len(expr.args) == 2 and isinstance(expr.args[1], ast.Constant)):
        return expr.args[1].value
    return None


def test_the_engine_resolves_each_epilogue_op_by_its_own_name():
    calls = [(p.name, *c) for p in sorted(FAST_DIR.glob("*.py")) for c in _op_calls(p)]
    assert len(calls) >= 15  # the checker sees the calls
    problems = []
    for file, op, call, fns in calls:
        if op in MODEL_BACKEND_OPS or op.endswith("_reference"):
            continue
        if op not in EPILOGUE_OPS:
            problems.append(f"{file}:{call.lineno} ops.{op} is not in EPILOGUE_OPS")
            continue
        backend = next((k.value for k in call.keywords if k.arg == "backend"), None)
        named = _resolved_for(backend, fns) if backend is not None else None
        if named != op:
            problems.append(f"{file}:{call.lineno} ops.{op}: backend is not "
                            f"op_backend(..., {op!r}) (found {named!r})")
    assert problems == []


# ----------------------------------------------------------------------------------------------
# end to end: backend="cuda" with the fast path


def test_fast_engine_runs_with_a_backend_lacking_the_epilogue_ops(fresh_backends):
    """The model on a "cuda" backend whose extension has attention and the patch split / merge
    only (here: the reference functions, on the CPU) and Triton unusable: the epilogue ops run
    on the next backend, the output is the reference's, and the reasons are recorded."""
    _fake_gpu_without_extension_kernels(fresh_backends)
    fresh_backends.setattr(backends, "triton_status",
                           lambda device=None: (False, "no C compiler (test)"))
    torch.manual_seed(3)
    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", backend="reference")
    x = torch.rand(1, 3, 1536, 1536) * 2 - 1
    with torch.no_grad():
        cid, fov = model(x)
    fast = copy.deepcopy(model).set_backend("cuda")
    fast.prepare_fast({"decoder_epilogues": True, "head_tail": True, "cpu_gemm": "aten"})
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    scale = float(cid.abs().max())
    assert float((out_cid - cid).abs().max()) <= 1e-5 * scale
    assert torch.allclose(out_fov, fov, atol=1e-4)
    log = backends.fallback_log()
    for op in ("add_layer_norm", "bias_relu", "subpixel_tail"):
        assert "has no 'cuda' implementation" in log[f"{op}/cuda"]
        assert "no C compiler (test)" in log[f"{op}/triton"]
    note = fast.fast_engine.status()["notes"]["epilogue_backends"]
    assert note.startswith("cuda asked on cpu; torch: ")
