"""Repository-wide pytest set-up (tests/ and bench/).

Without a CUDA device the Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1 must
be set before any ``@triton.jit`` function is created, i.e. before depthpro_fast's Triton modules
are imported, so it is set here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Decisions stored per device (depthpro_fast/device_cache.py) go to a folder of this test run,
# never to the user's cache: a test must neither read a stale choice nor leave one behind.
if "DEPTHPRO_FAST_DEVICE_CACHE" not in os.environ:
    import tempfile

    os.environ["DEPTHPRO_FAST_DEVICE_CACHE"] = tempfile.mkdtemp(prefix="depthpro_fast-device-")
