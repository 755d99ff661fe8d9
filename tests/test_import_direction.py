"""Imports run one way (DESIGN.md §7): ``ops/<op>.py`` imports its Triton and CUDA
implementations; ``triton/`` and ``cuda/`` never import the op faces (or anything above them:
the model, the fast engine, the public API). Shared helpers live in ``depthpro_fast/op_common.py``.

Read from the source with ``ast`` (module-level and function-level imports, absolute and
relative), so an import that only runs on a GPU is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "depthpro_fast"
#: Modules an implementation must not import (the faces and the layers built on them).
FORBIDDEN = ("depthpro_fast.ops", "depthpro_fast.model", "depthpro_fast.fast",
             "depthpro_fast.api")
#: The ahead-of-time compile check drives the whole model to record its launches: a tool that
#: lives beside the kernels, not an implementation.
DRIVERS = {"triton/aot.py"}


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; ``from X import y`` gives both
    ``X`` and ``X.y`` (``y`` may be a submodule). ``root``: the package directory."""
    rel = path.relative_to(root.parent).with_suffix("")
    package = list(rel.parts[:-1])  # e.g. ["depthpro_fast", "triton"]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    return [f"{path.relative_to(root)}:{line} imports {mod}"
            for line, mod in imported_modules(path, root)
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN)]


IMPLEMENTATIONS = sorted(p for d in ("triton", "cuda") for p in (PACKAGE / d).glob("*.py")
                         if str(p.relative_to(PACKAGE)) not in DRIVERS)


def test_the_implementations_are_found():
    names = {str(p.relative_to(PACKAGE)) for p in IMPLEMENTATIONS}
    for op in ("attention", "merge_patches", "split_patches"):
        assert f"triton/{op}.py" in names and f"cuda/{op}.py" in names


@pytest.mark.parametrize("path", IMPLEMENTATIONS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_implementations_do_not_import_the_faces(path):
    assert violations(path) == []


def test_the_shared_helpers_import_no_op_module():
    found = [m for _, m in imported_modules(PACKAGE / "op_common.py")
             if m.startswith(("depthpro_fast.ops", "depthpro_fast.triton", "depthpro_fast.cuda"))]
    assert found == []


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    """The checker itself: a circle written either way is caught (so the tests above can fail)."""
    root = tmp_path / "depthpro_fast"
    (root / "triton").mkdir(parents=True)
    path = root / "triton" / "x.py"
    path.write_text("from ..ops.attention import _check\n"
                    "def f():\n    import depthpro_fast.ops.merge_patches\n"
                    "from .. import ops\nfrom ..op_common import merged_size\n")
    found = {v.split(" imports ")[1] for v in violations(path, root)}
    assert found == {"depthpro_fast.ops.attention", "depthpro_fast.ops.attention._check",
                     "depthpro_fast.ops", "depthpro_fast.ops.merge_patches"}
