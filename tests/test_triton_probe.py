"""The Triton launch probe (``backends.triton_launch_probe``): importing Triton does not prove
that it can launch; its first launch builds a C launcher (gcc and Python.h needed). One tiny
launch per process and device decides before Triton is chosen, and ``info()`` says the result.

On a CPU the launch is injected (a failure is simulated with Triton's own message), and the
probe kernel itself runs under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import depthpro_fast
from depthpro_fast import backends
from tests.conftest import HAS_CUDA, requires_triton, triton_usable

# Imported here, under the test session's TRITON_INTERPRET: @triton.jit picks the interpreter
# or the compiler when the module is imported, and some tests below unset the variable.
probe = None
if triton_usable():
    import depthpro_fast.triton.probe as probe

NO_COMPILER = ("Failed to find C compiler. Please specify via CC environment variable or set "
               "triton.knobs.build.impl.")


@pytest.fixture
def fresh(monkeypatch):
    """No probe run yet, nothing resolved yet; a GPU process (no interpreter)."""
    for name in ("_TRITON_PROBES", "_RESOLVED", "_LOADED", "_FALLBACKS", "_WITH_FALLBACK"):
        monkeypatch.setattr(backends, name, {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


class Launcher:
    def __init__(self, error: Exception | None = None):
        self.error, self.devices = error, []

    def __call__(self, device: torch.device) -> None:
        self.devices.append(device)
        if self.error is not None:
            raise self.error


def test_a_failed_launch_is_reported_once_per_device(fresh):
    launch = Launcher(RuntimeError(NO_COMPILER))
    ok, why = backends.triton_launch_probe(torch.device("cuda", 1), launch=launch)
    assert not ok
    assert "cuda:1" in why and "Failed to find C compiler" in why and "gcc" in why
    # remembered: not launched again for this device
    assert backends.triton_launch_probe(torch.device("cuda", 1), launch=launch) == (ok, why)
    assert launch.devices == [torch.device("cuda", 1)]
    assert backends.triton_probe_log() == {"cuda:1": {"ok": False, "why_not": why}}


def test_a_working_launch_is_remembered(fresh):
    launch = Launcher()
    assert backends.triton_launch_probe(torch.device("cuda", 0), launch=launch) == (True, None)
    assert backends.triton_launch_probe(torch.device("cuda", 0), launch=launch) == (True, None)
    assert launch.devices == [torch.device("cuda", 0)]


def test_no_probe_off_cuda_or_under_the_interpreter(fresh):
    launch = Launcher(RuntimeError("must not run"))
    assert backends.triton_launch_probe(torch.device("cpu"), launch=launch) == (True, None)
    assert backends.triton_launch_probe(torch.device("meta"), launch=launch) == (True, None)
    fresh.setenv("TRITON_INTERPRET", "1")  # the interpreter compiles nothing
    assert backends.triton_launch_probe(torch.device("cuda", 0), launch=launch) == (True, None)
    assert launch.devices == [] and backends.triton_probe_log() == {}


@requires_triton
def test_auto_skips_triton_when_its_launch_fails_and_info_says_why(fresh):
    launch = Launcher(RuntimeError(NO_COMPILER))
    fresh.setattr(probe, "launch_probe", launch)
    gpu = torch.device("cuda", 0)
    ok, why = backends.triton_status(gpu)
    assert not ok and "Failed to find C compiler" in why
    # auto, on a GPU: the extension is not built here, Triton cannot launch -> the reference
    impl = backends.implementation("bias_gelu", "auto", gpu)
    assert impl is backends.implementation("bias_gelu", "reference", gpu)
    assert "Failed to find C compiler" in backends.fallback_log()["bias_gelu/triton"]
    # an explicit triton backend is refused with the same reason
    with pytest.raises(backends.BackendUnavailableError, match="Failed to find C compiler"):
        backends.require_backend("triton", gpu)
    report = depthpro_fast.info()
    assert report["triton_probes"]["cuda:0"] == {"ok": False, "why_not": why}
    text = depthpro_fast.report.format_info(report)
    assert "triton launch probe on cuda:0: failed: a first Triton launch failed" in text
    assert launch.devices == [gpu]  # one launch for all of the above


@requires_triton
def test_the_probe_kernel_computes():
    """The kernel and its check: on the GPU, or run by the interpreter on CPU tensors."""
    probe.launch_probe(torch.device("cuda" if HAS_CUDA else "cpu"))  # raises if wrong
