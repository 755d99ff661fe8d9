"""No module takes another module's private (``_underscore``) names: a helper two modules need
is public, in a module of its own (the package's rule, and the tests' too: shared test helpers
live in ``tests/*_helpers.py`` / ``*_fakes.py`` under public names, not in another test file).

Read from the source with ``ast``: ``from M import _x`` and ``M._x`` after ``import M`` or
``from P import M``, absolute and relative, at module level and inside functions. A private
*module* (``from . import _ext``) is not a private name: it is the module's own face.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PACKAGE = ROOT / "depthpro_fast"

#: Known exceptions, each with why it is not fixed yet. A test below fails once one is gone.
KNOWN: set[str] = set()  # exceptions still to fix (none now)


def module_name(path: Path, root: Path) -> str:
    """``depthpro_fast.fast.engine`` for ``<root>/depthpro_fast/fast/engine.py``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(path: Path, root: Path, local: set[str],
                    aliases: dict[str, str] | None = None) -> list[str]:
    """``"<file>: <module>.<name>"`` for every private name ``path`` takes from a module of
    ``local`` (absolute dotted names) other than itself. ``aliases``: bare names that stand
    for local modules (the tests folder is on ``sys.path``: ``doc_commands`` is
    ``tests.doc_commands``)."""
    aliases = aliases or {}
    me = module_name(path, root)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    bound: dict[str, str] = {}  # local name -> the local module it is bound to
    found = []

    def resolve(node: ast.ImportFrom) -> str:
        if node.level:
            base = package[:len(package) - node.level + 1]
            return ".".join(base + ([node.module] if node.module else []))
        return aliases.get(node.module or "", node.module or "")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                name = aliases.get(a.name, a.name)
                if name in local and a.asname:
                    bound[a.asname] = name
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node)
            for a in node.names:
                full = f"{mod}.{a.name}"
                if full in local:  # a module: ``from P import M``
                    bound[a.asname or a.name] = full
                elif (mod in local and mod != me and a.name.startswith("_")
                      and not a.name.startswith("__")):
                    found.append(f"{path.relative_to(root)}: {full}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and node.attr.startswith("_")
                and not node.attr.startswith("__") and bound[node.value.id] != me):
            full = f"{bound[node.value.id]}.{node.attr}"
            if full not in local:
                found.append(f"{path.relative_to(root)}: {full}")
    return sorted(set(found))


def package_violations() -> list[str]:
    files = sorted(PACKAGE.rglob("*.py"))
    local = {module_name(p, ROOT) for p in files}
    return [v for p in files for v in private_imports(p, ROOT, local)]


def test_tests_take_no_private_name_from_another_test_module():
    files = sorted(TESTS.glob("*.py"))
    local = {module_name(p, ROOT) for p in files}
    aliases = {name.removeprefix("tests."): name for name in local}
    found = [v for p in files for v in private_imports(p, ROOT, local, aliases)]
    assert found == [], ("move the shared helper to a helpers module under a public name "
                         f"(tests/model_helpers.py): {found}")


def test_package_modules_take_no_private_name_from_another_module():
    assert sorted(set(package_violations()) - KNOWN) == []


def test_each_known_exception_still_exists():
    """Once fixed, an exception must leave ``KNOWN`` (so the list cannot hide a new one)."""
    assert sorted(KNOWN - set(package_violations())) == []


def test_the_checker_sees_each_form(tmp_path):
    """The checker itself: every way of taking a private name is caught, and the allowed
    forms (a private module, a module's own names, a public name) are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "_priv.py", "sub/__init__.py"):
        (pkg / name).write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from ..a import _helper, public\n"
        "from pkg.a import _other\n"
        "from .. import a, _priv\n"
        "import pkg.a as alias\n"
        "def f():\n    return a._hidden, alias._also, a.public, _priv.x\n"
        "def _mine():\n    pass\n")
    (pkg / "a.py").write_text("from .sub import b\nfrom . import a\n"
                              "def g():\n    return a._self_is_fine\n")
    local = {module_name(p, tmp_path) for p in pkg.rglob("*.py")}
    assert private_imports(pkg / "sub" / "b.py", tmp_path, local) == [
        "pkg/sub/b.py: pkg.a._also", "pkg/sub/b.py: pkg.a._helper",
        "pkg/sub/b.py: pkg.a._hidden", "pkg/sub/b.py: pkg.a._other"]
    assert private_imports(pkg / "a.py", tmp_path, local) == []
    # a bare name for a module on sys.path (the tests folder)
    (tmp_path / "t.py").write_text("from helpers import _x\nimport helpers as h\ny = h._z\n")
    assert private_imports(tmp_path / "t.py", tmp_path, {"tests.helpers", "t"},
                           {"helpers": "tests.helpers"}) == [
        "t.py: tests.helpers._x", "t.py: tests.helpers._z"]
