"""Build script: the pure-Python package, plus the optional CUDA extension ``depthpro_fast._C``.

DEPTHPRO_FAST_BUILD_CUDA=auto (default) builds the extension from csrc/*.cpp + kernels/*.cu when
torch has CUDA and nvcc is found; 0 never builds it; 1 requires it (fails with the reason).
TORCH_CUDA_ARCH_LIST is honoured (default here: 8.0;9.0). torch must be importable during the
build for the extension: use ``pip install --no-build-isolation -e .`` on a CUDA machine.
The CUDA toolkit is the one that really has the runtime headers (depthpro_fast/_cuda_toolkit.py:
torch's own guess from a wrapper ``nvcc`` on PATH can be wrong); setup prints which it used.
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("DEPTHPRO_FAST_BUILD_CUDA", "auto").strip().lower()


def _say(message: str) -> None:
    print(f"depthpro_fast setup: {message}", file=sys.stderr, flush=True)


def _find_toolkit(torch_cuda: str | None):
    """depthpro_fast/_cuda_toolkit.py, loaded by path (the package itself needs its deps)."""
    path = os.path.join(ROOT, "depthpro_fast", "_cuda_toolkit.py")
    spec = importlib.util.spec_from_file_location("_depthpro_fast_cuda_toolkit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclass looks itself up there)
    spec.loader.exec_module(module)
    return module.find_toolkit(torch_cuda)


def cuda_extension():
    """(ext_modules, cmdclass, reason-if-skipped)."""
    if MODE in ("0", "off", "false", "no"):
        return [], {}, "DEPTHPRO_FAST_BUILD_CUDA=0"
    if MODE not in ("auto", "1", "on", "true", "yes"):
        sys.exit(f"DEPTHPRO_FAST_BUILD_CUDA must be auto, 0 or 1, got {MODE!r}")
    try:
        import torch
    except ImportError:
        return [], {}, ("torch is not importable in the build environment "
                        "(pip install --no-build-isolation -e . builds against the installed "
                        "torch)")
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    toolkit = _find_toolkit(torch.version.cuda)
    if toolkit.home is None:
        return [], {}, toolkit.describe()
    for note in toolkit.rejected:
        _say(f"not using {note}")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = toolkit.home
    _say(f"using the {toolkit.describe()}")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))
                     + glob.glob(os.path.join("kernels", "*.cu")))
    if not sources:
        return [], {}, "no sources in csrc/ and kernels/"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="depthpro_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    _say(f"building the CUDA extension depthpro_fast._C from {len(sources)} sources for "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (torch {torch.__version__}, "
         f"CUDA {torch.version.cuda})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    if MODE in ("1", "on", "true", "yes"):
        sys.exit(f"DEPTHPRO_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {skipped}")
    _say(f"pure-Python install, no CUDA extension ({skipped})")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
