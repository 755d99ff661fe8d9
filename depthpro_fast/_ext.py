"""Loads the optional CUDA extension ``depthpro_fast._C`` and remembers why it is missing.

``import depthpro_fast`` never fails because of the extension: the fast CUDA kernels are an
optional backend, and every op has a pure-PyTorch reference.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_module: ModuleType | None = None
_reason: str | None = None
_tried = False


def load() -> ModuleType | None:
    """Import ``depthpro_fast._C`` once; return it, or None (see :func:`unavailable_reason`)."""
    global _module, _reason, _tried
    if not _tried:
        _tried = True
        try:
            import torch  # noqa: F401  (the extension links against torch's libraries)

            _module = importlib.import_module("depthpro_fast._C")
        except ImportError as e:
            _module = None
            if "No module named" in str(e) and "_C" in str(e):
                import torch

                if torch.version.cuda is None:
                    _reason = (f"torch {torch.__version__} is a CPU build; the CUDA extension "
                               "depthpro_fast._C needs a CUDA torch and nvcc")
                else:
                    _reason = ("the CUDA extension depthpro_fast._C was not built (reinstall "
                               "with DEPTHPRO_FAST_BUILD_CUDA=1 pip install --no-build-isolation"
                               " -e . on a machine with nvcc)")
            else:
                _reason = f"depthpro_fast._C failed to import: {e}"
        except OSError as e:  # a shared library it links against is missing
            _module = None
            _reason = f"depthpro_fast._C failed to load: {e}"
    return _module


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it loaded."""
    load()
    return _reason


def has_op(name: str) -> bool:
    """True when the extension is loaded and registers ``torch.ops.depthpro_fast.<name>``."""
    if load() is None:
        return False
    import torch

    return hasattr(torch.ops.depthpro_fast, name)
