"""Repository-wide pytest set-up (tests/ and bench/).

Without a CUDA device the Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1 must
be set before any ``@triton.jit`` function is created, i.e. before depthpro_fast's Triton modules
are imported, so it is set here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
