"""The commands shown in README.md and docs/*.md, read and checked without running them.

``tests/test_docs_commands.py`` runs the ones that can run here; this module finds them and
checks every one statically, so that a renamed subcommand or option fails the tests even where
a command cannot run (a download, a GPU, Apple's checkpoint, minutes of work).

Markers (the convention is documented in docs/development.md, "Documentation whose commands
are tested"): an HTML comment on the line before a fence, ``<!-- doc-test: MODE (why) -->``,
sets the mode of the whole block; a trailing ``# doc-test: MODE`` sets one line's. Modes:
``run`` (the default for bash lines; for python blocks only when marked), ``help-only`` and
``no-run`` (checked, never run; a block marker must say why).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("run", "help-only", "no-run")
SEPARATORS = {"&&", "||", ";", "|"}
_BLOCK_MARK = re.compile(r"<!--\s*doc-test:\s*(?P<mode>[\w-]+)\s*(?P<why>.*?)\s*-->")
_LINE_MARK = re.compile(r"#\s*doc-test:\s*(?P<mode>[\w-]+)\s*(?P<why>.*)$")
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")


@dataclasses.dataclass(frozen=True)
class Command:
    """One shell command line of a ```bash block."""

    file: str  # relative to the repository root
    line: int  # 1-based
    text: str  # the command, comments and marker removed
    mode: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced block: its language, first line, text and mode (None: no marker)."""

    file: str
    line: int
    lang: str
    text: str
    mode: str | None


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def read_blocks(text: str, file: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown text, and the problems met (bad markers, open fences)."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            problems.append(f"{file}:{start + 1}: a ``` fence is never closed")
        i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mode = None
        mark = _BLOCK_MARK.search(prev)
        if mark:
            mode = mark["mode"]
            if mode not in MODES:
                problems.append(f"{file}:{start}: unknown doc-test mode {mode!r}; accepted: "
                                + ", ".join(MODES))
            elif mode != "run" and not mark["why"]:
                problems.append(f"{file}:{start}: the marker <!-- doc-test: {mode} --> must "
                                "say why, e.g. <!-- doc-test: help-only (needs a GPU) -->")
        elif "doc-test" in prev:
            problems.append(f"{file}:{start}: malformed doc-test marker {prev.strip()!r}")
        blocks.append(Block(file, start + 1, m["lang"].lower(), "\n".join(body), mode))
    return blocks, problems


def commands_of(block: Block) -> tuple[list[Command], list[str]]:
    """The command lines of a bash block (continuations joined) and the problems met."""
    commands, problems = [], []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        first = i
        text = lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        mode = block.mode or "run"
        mark = _LINE_MARK.search(text)
        if mark:
            text = text[:mark.start()]
            mode = mark["mode"]
            if mode not in MODES:
                problems.append(f"{block.file}:{block.line + 1 + first}: unknown doc-test mode "
                                f"{mode!r}; accepted: {', '.join(MODES)}")
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as e:
            problems.append(f"{block.file}:{block.line + 1 + first}: cannot split {text!r}: {e}")
            continue
        if tokens:  # the text as written (bash drops its comments), less the marker
            commands.append(Command(block.file, block.line + 1 + first, text.strip(), mode))
    return commands, problems


def all_blocks(root: Path = ROOT) -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in doc_files(root):
        b, p = read_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
        blocks += b
        problems += p
    return blocks, problems


def all_commands(root: Path = ROOT) -> tuple[list[Command], list[str]]:
    blocks, problems = all_blocks(root)
    commands = []
    for block in blocks:
        if block.lang == "bash":
            c, p = commands_of(block)
            commands += c
            problems += p
    return commands, problems


# ------------------------------------------------------------------------------------------
# the static check of one command line
# ------------------------------------------------------------------------------------------


def segments(text: str) -> list[list[str]]:
    """The simple commands of a line (split at && || ; |), leading VAR=value words dropped."""
    out: list[list[str]] = [[]]
    for token in shlex.split(text, comments=True):
        if token in SEPARATORS:
            out.append([])
        else:
            out[-1].append(token)
    result = []
    for seg in out:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):
            seg = seg[1:]
        if seg:
            result.append(seg)
    return result


def _options(tokens: list[str]) -> list[str]:
    """The option names among ``tokens`` (``--x=1`` gives ``--x``; negative numbers are not)."""
    return [t.split("=", 1)[0] for t in tokens
            if t.startswith("-") and t != "-" and not re.fullmatch(r"-[\d.]+", t)]


@cache
def _cli_parser():
    from depthpro_fast import cli

    return cli.build_parser()


def _subparsers(parser) -> dict:
    import argparse

    for action in parser._actions:  # argparse keeps no public list of subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_depthpro_fast(argv: list[str]) -> list[str]:
    """A ``depthpro-fast`` command: the subcommand exists, every option is spelled as one of
    its options (argparse would accept abbreviations), and the whole line parses."""
    parser = _cli_parser()
    subs = _subparsers(parser)
    if not argv:
        return ["`depthpro-fast` without a subcommand"]
    if argv[0] in ("-h", "--help", "--version"):
        return []
    sub = subs.get(argv[0])
    if sub is None:
        return [f"depthpro-fast has no subcommand {argv[0]!r}; it has: {', '.join(subs)}"]
    known = set(sub._option_string_actions)
    bad = [o for o in _options(argv[1:]) if o not in known]
    if bad:
        return [f"`depthpro-fast {argv[0]}` has no option(s) {', '.join(bad)}"]
    if "-h" in argv or "--help" in argv:
        return []
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            if e.code:
                return [f"`depthpro-fast {shlex.join(argv)}` does not parse: "
                        + err.getvalue().strip().splitlines()[-1]]
    return []


@cache
def _help_text(*program: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, *program, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _options_in_text(options: list[str], text: str) -> list[str]:
    return [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]


def check_python(argv: list[str]) -> list[str]:
    """``python -m MODULE ...`` or ``python SCRIPT ...``: the module or script exists and its
    ``--help`` names every option given (pytest: the test paths exist)."""
    if argv[:1] == ["-m"] and len(argv) > 1:
        module, rest = argv[1], argv[2:]
        if module == "pytest":
            return [f"pytest path {t} does not exist" for t in rest
                    if not t.startswith("-") and ("/" in t or t.endswith(".py"))
                    and not (ROOT / t.split("::")[0]).exists()]
        if importlib.util.find_spec(module.split(".")[0]) is None or \
                importlib.util.find_spec(module) is None:
            return [f"no Python module {module}"]
        program: tuple[str, ...] = ("-m", module)
    elif argv and not argv[0].startswith("-"):
        if not (ROOT / argv[0]).is_file():
            return [f"no script {argv[0]} in the repository"]
        program, rest = (argv[0],), argv[1:]
    else:
        return [f"cannot check `python {shlex.join(argv)}`"]
    rc, text = _help_text(*program)
    if rc != 0:
        return [f"`python {' '.join(program)} --help` failed (exit {rc}): {text[-300:]}"]
    missing = _options_in_text(_options(rest), text)
    return [f"`python {' '.join(program)}` has no option(s) {', '.join(missing)}"] if missing \
        else []


def install_sh_arguments() -> list[str]:
    """The arguments ``./install.sh --help`` lists (``./install.sh WORD`` lines)."""
    proc = subprocess.run([str(ROOT / "install.sh"), "--help"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"./install.sh --help failed: {proc.stderr}")
    return re.findall(r"\./install\.sh ([\w-]+)", proc.stdout)


def check_script(argv: list[str]) -> list[str]:
    """A repository script named by path: it exists, and it knows the options given
    (install.sh: the argument is one its --help lists)."""
    path = ROOT / argv[0]
    if not path.is_file():
        return [f"no script {argv[0]} in the repository"]
    if path.name == "install.sh":
        accepted = install_sh_arguments()
        return [f"./install.sh does not take {a!r}; it takes: {', '.join(accepted)}"
                for a in argv[1:] if a not in accepted]
    missing = _options_in_text(_options(argv[1:]), path.read_text(encoding="utf-8"))
    return [f"{argv[0]} has no option(s) {', '.join(missing)}"] if missing else []


def pyproject_extras() -> set[str]:
    """The extras ``[project.optional-dependencies]`` of pyproject.toml declares."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # 3.10: the table's keys, read line by line
        section = text.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
        return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))
    return set(tomllib.loads(text)["project"].get("optional-dependencies", {}))


def check_pip(argv: list[str]) -> list[str]:
    """``pip install`` from the checkout: only ``.`` with extras the package declares."""
    if argv[:1] != ["install"]:
        return [f"only `pip install` is checked, not `pip {shlex.join(argv)}`"]
    problems = []
    for t in argv[1:]:
        if t.startswith("-"):
            continue
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", t)
        if not m:
            problems.append(f"`pip install {t}`: this package is installed from the checkout "
                            "(`.` or `.[extra]`), it is not on a package index")
        elif m[1]:
            problems += [f"pyproject.toml has no extra {e!r}" for e in m[1].split(",")
                         if e not in pyproject_extras()]
    return problems


RAY_SUBCOMMANDS = ("start", "stop", "status")  # the ones docs/ray.md shows


def check_ray(argv: list[str]) -> list[str]:
    """``ray start|stop|status ...`` (Ray's own CLI, for a cluster): the subcommand, and, where
    Ray is installed, every option against its ``--help``."""
    if not argv or argv[0] not in RAY_SUBCOMMANDS:
        return [f"`ray {shlex.join(argv)}`: only ray {', '.join(RAY_SUBCOMMANDS)} are checked"]
    if importlib.util.find_spec("ray") is None:
        return []  # Ray is an optional extra: the subcommand is what can be checked here
    rc, text = _help_text("-m", "ray.scripts.scripts", argv[0])
    if rc != 0:
        return [f"`ray {argv[0]} --help` failed (exit {rc}): {text[-300:]}"]
    missing = _options_in_text([o.split("=")[0] for o in _options(argv[1:])], text)
    return [f"`ray {argv[0]}` has no option(s) {', '.join(missing)}"] if missing else []


def check_command(text: str) -> list[str]:
    """Everything wrong with one command line, without running it (empty: nothing)."""
    problems = []
    for seg in segments(text):
        program, args = seg[0], seg[1:]
        if program == "bash" and args:
            program, args = args[0], args[1:]
        if program == "depthpro-fast":
            problems += check_depthpro_fast(args)
        elif program in ("python", "python3"):
            problems += check_python(args)
        elif program == "pip":
            problems += check_pip(args)
        elif program == "ray":
            problems += check_ray(args)
        elif "/" in program or program.endswith(".sh"):
            problems += check_script([program.removeprefix("./"), *args])
        else:
            problems.append(f"tests/doc_commands.py does not know how to check {program!r}: "
                            "add a rule for it there")
    return problems


# ------------------------------------------------------------------------------------------
# python blocks
# ------------------------------------------------------------------------------------------


def check_python_block(code: str) -> list[str]:
    """A python block compiles and its ``depthpro_fast.NAME(...)`` uses name real functions
    and keyword arguments."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return [f"does not compile: {e}"]
    import depthpro_fast

    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "depthpro_fast" and not hasattr(depthpro_fast, node.attr):
            problems.append(f"depthpro_fast has no attribute {node.attr!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "depthpro_fast":
            fn = getattr(depthpro_fast, node.func.attr, None)
            if fn is None:
                continue
            params = inspect.signature(fn).parameters
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            problems += [f"depthpro_fast.{node.func.attr}() has no keyword {k.arg!r}"
                         for k in node.keywords if k.arg is not None and k.arg not in params]
    return problems
