"""``residual_fp32`` inside ``torch.compile`` / ``torch.export``: the fp32-output addmm is not
traced (torch 2.11's decomposition of ``addmm.dtype_out`` mis-binds its arguments); the GEMM in
the model dtype and an fp32 add are, as on devices without the kernel.

A CPU has no ``addmm(out_dtype=...)`` kernel at all, so here the device is told it has one:
a trace that still took that path fails, the fallback gives the reference's numbers.
"""

from __future__ import annotations

import pytest
import torch

from depthpro_fast.fast import cpu_gemm
from depthpro_fast.fast.cpu_gemm import CpuGemm


def _operands():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=g)
    x = torch.randn(6, 24, generator=g).to(torch.bfloat16)
    w = torch.randn(16, 24, generator=g).to(torch.bfloat16)
    want = h + (x @ w.t()).float()  # the fallback's numbers: bf16 product, fp32 add
    return h, x, w, want


@pytest.fixture
def kernel_claimed(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "addmm_fp32_out_available",
                        lambda device: (True, "test: claimed"))


def test_eager_takes_the_fp32_output_addmm_where_claimed(kernel_claimed):
    """The claim is taken eagerly (so the tests below can fail): this CPU has no such kernel."""
    h, x, w, _ = _operands()
    with pytest.raises((RuntimeError, NotImplementedError)):
        CpuGemm("aten").residual_addmm(h, x, w)


@pytest.mark.parametrize("flag", ["is_compiling", "is_exporting"])
def test_while_tracing_the_fallback_is_taken(kernel_claimed, monkeypatch, flag):
    monkeypatch.setattr(torch.compiler, flag, lambda: True)
    h, x, w, want = _operands()
    CpuGemm("aten").residual_addmm(h, x, w)
    torch.testing.assert_close(h, want)


def test_under_torch_compile(kernel_claimed):
    def step(h, x, w):
        CpuGemm("aten").residual_addmm(h, x, w)
        return h

    h, x, w, want = _operands()
    out = torch.compile(step, backend="eager", fullgraph=True)(h, x, w)
    torch.testing.assert_close(out, want)
