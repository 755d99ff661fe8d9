"""Every command shown in README.md and docs/*.md is checked, and the ones that can run here run.

A ```bash line is run in a temporary folder (with a small ``photo.jpg`` and a ``photos/`` folder)
and must exit with 0, unless it is marked ``help-only`` or ``no-run`` (the convention:
docs/development.md, "Documentation whose commands are tested"); every line, marked or not, is
checked against the real command's parser, ``--help``, script or pyproject.toml
(``doc_commands.py``), so a subcommand or option that does not exist fails here.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from doc_commands import (
    ROOT,
    Block,
    all_blocks,
    all_commands,
    check_command,
    check_python_block,
    commands_of,
    read_blocks,
)
from PIL import Image

from depthpro_fast.install_hints import EXPORT_HINT

RUN_TIMEOUT_S = 600  # per command; a tiny-config run takes ~20 s on an idle 2-core machine
COMMANDS, PARSE_PROBLEMS = all_commands()
BLOCKS, BLOCK_PROBLEMS = all_blocks()
# the distinct commands to run (the same line shown on two pages runs once)
_FIRST: dict[str, object] = {}
for _c in COMMANDS:
    if _c.mode == "run":
        _FIRST.setdefault(_c.text, _c)
TO_RUN = list(_FIRST.values())
PY_BLOCKS = [b for b in BLOCKS if b.lang == "python"]
# pages other work is writing at the same time, which the docs may already link (none now)
PENDING_PAGES: set[str] = set()


def _ids(items) -> list[str]:
    return [getattr(i, "where", None) or f"{i.file}:{i.line}" for i in items]


def test_markers_and_fences_are_well_formed():
    assert PARSE_PROBLEMS + BLOCK_PROBLEMS == []
    shells = [f"{b.file}:{b.line}" for b in BLOCKS if b.lang in ("sh", "shell", "console", "zsh")]
    assert shells == [], "use ```bash for commands (only bash blocks are checked and run)"
    unlabelled = [f"{b.file}:{b.line}" for b in BLOCKS if b.lang == "" and re.match(
        r"\s*(depthpro-fast|\./|python3? |pip )", b.text)]
    assert unlabelled == [], "commands in a fence without a language: label it ```bash"


def test_the_docs_show_commands():
    """The collection itself works: the README's set-up and photo commands are found."""
    readme = [c.text for c in COMMANDS if c.file == "README.md"]
    assert "./install.sh && depthpro-fast bench" in readme
    assert "./install.sh dev && python3 -m pytest -q" in readme
    assert any(c.startswith("depthpro-fast predict") for c in readme)
    assert len(TO_RUN) >= 3


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_command_names_real_subcommands_and_options(command):
    problems = check_command(command.text)
    assert not problems, f"{command.where}: `{command.text}`: " + "; ".join(problems)


@pytest.mark.parametrize("block", PY_BLOCKS, ids=_ids(PY_BLOCKS))
def test_python_block_compiles_and_names_real_api(block):
    problems = check_python_block(block.text)
    assert not problems, f"{block.file}:{block.line}: " + "; ".join(problems)


def _workdir(tmp: Path) -> dict[str, str]:
    """A folder like a user's (a photo, a folder of photos) and an environment whose
    ``depthpro-fast`` and ``python`` are this interpreter with this checkout's package."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    Image.fromarray(base).save(tmp / "photo.jpg", quality=95)
    (tmp / "photos").mkdir()
    for i in range(2):
        noisy = np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(tmp / "photos" / f"p{i}.png")
    bin_dir = tmp.parent / f"{tmp.name}-bin"
    bin_dir.mkdir()
    shims = {"depthpro-fast": f'exec "{sys.executable}" -m depthpro_fast.cli "$@"',
             "python": f'exec "{sys.executable}" "$@"', "python3": f'exec "{sys.executable}" "$@"'}
    for name, body in shims.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("command", TO_RUN, ids=_ids(TO_RUN))
def test_command_runs(command, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = _workdir(work)
    proc = subprocess.run(["bash", "-c", command.text], cwd=work, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, (f"{command.where}: `{command.text}` exited with "
                                  f"{proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


RUN_PY = [b for b in PY_BLOCKS if b.mode == "run"]


@pytest.mark.parametrize("block", RUN_PY, ids=_ids(RUN_PY))
def test_python_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block.text, f"{block.file}:{block.line}", "exec"), {"__name__": "__doc__"})


# ------------------------------------------------------------------------------------------
# the checker itself: it must catch what it is for
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("depthpro-fast predikt photo.jpg", "no subcommand 'predikt'"),
    ("depthpro-fast predict --random-weight photo.jpg", "no option(s) --random-weight"),
    ("depthpro-fast predict --rand photo.jpg", "no option(s) --rand"),  # argparse abbreviation
    ("depthpro-fast predict --dtype fp9 photo.jpg", "does not parse"),
    ("depthpro-fast bench --batch", "does not parse"),
    ("./install.sh && depthpro-fast bnech", "no subcommand 'bnech'"),
    ("./install.sh devel", "does not take 'devel'"),
    ("pip install 'depthpro-fast[export]'", "not on a package index"),
    ("pip install -e '.[exprot]'", "no extra 'exprot'"),
    ("python -m depthpro_fast.fast.ablation --no-such-flag", "no option(s) --no-such-flag"),
    ("python bench/make_table.py --readme2 README.md", "no option(s) --readme2"),
    ("python bench/no_such.py", "no script"),
    ("bench/gpu_check.sh out --sanitise", "no option(s) --sanitise"),
    ("python3 -m pytest tests/test_no_such.py", "does not exist"),
    ("curl https://example.com", "does not know how to check 'curl'"),
    ("ray up cluster.yaml", "only ray start, stop, status are checked"),
])
def test_checker_refuses_what_does_not_exist(line, expected):
    problems = check_command(line)
    assert any(expected in p for p in problems), problems


def test_checker_reads_ray_options_where_ray_is_installed():
    pytest.importorskip("ray", reason="Ray (the [ray] extra) is not installed: only the "
                                      "subcommand of `ray ...` lines can be checked")
    assert check_command("ray start --head --port=6379 --num-gpus=8") == []
    assert any("no option(s) --prot" in p for p in check_command("ray start --head --prot=1"))


def test_checker_accepts_real_commands():
    for line in ("depthpro-fast predict --config tiny --random-weights photo.jpg -o out",
                 "./install.sh export", "pip install -e '.[export]'", "bash .ci/run",
                 "GPU_CHECK_ALLOW_CPU=1 bench/gpu_check.sh /tmp/x --sanitize",
                 "python -m depthpro_fast.fast.ablation --dtype bf16 --json x.json"):
        assert check_command(line) == [], line


def test_markers_are_read():
    text = ("x\n<!-- doc-test: help-only (needs a GPU) -->\n```bash\ndepthpro-fast bench\n"
            "depthpro-fast info  # doc-test: run\n```\n\n```bash\ndepthpro-fast demo \\\n"
            "  --config tiny\n```\n<!-- doc-test: no-run -->\n```bash\nls\n```\n"
            "<!-- doc-test: skipme (x) -->\n```bash\nls\n```\n")
    blocks, problems = read_blocks(text, "t.md")
    assert [b.mode for b in blocks] == ["help-only", None, "no-run", "skipme"]
    assert any("must say why" in p for p in problems)
    assert any("unknown doc-test mode 'skipme'" in p for p in problems)
    first, _ = commands_of(blocks[0])
    assert [(c.text, c.mode) for c in first] == [("depthpro-fast bench", "help-only"),
                                                 ("depthpro-fast info", "run")]
    second, _ = commands_of(blocks[1])
    assert [(c.text, c.mode, c.line) for c in second] == [
        ("depthpro-fast demo  --config tiny", "run", 9)]


def test_python_block_checker():
    assert check_python_block("import depthpro_fast\ndepthpro_fast.load(None, config='tiny')") == []
    assert check_python_block("import depthpro_fast\ndepthpro_fast.lod()") != []
    assert any("keyword 'precision'" in p for p in check_python_block(
        "import depthpro_fast\ndepthpro_fast.load(None, precision='fp16')"))
    assert check_python_block("def f(:\n") != []
    assert Block("a", 1, "python", "", None).mode is None


# ------------------------------------------------------------------------------------------
# what the README promises elsewhere
# ------------------------------------------------------------------------------------------


def test_ci_runs_the_readme_test_command_verbatim():
    readme = [c.text for c in COMMANDS if c.file == "README.md" and "pytest" in c.text]
    assert readme == ["./install.sh dev && python3 -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert readme[0] in [line.strip() for line in ci]


def test_readme_keeps_the_generated_bench_table_markers():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import make_table
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(make_table.START) == 1 and text.count(make_table.END) == 1
    assert text.index(make_table.START) < text.index(make_table.END)


def test_install_hints_name_commands_that_work_from_a_checkout():
    for command in re.findall(r"\./install\.sh \w+|pip install -e '\.\[\w+\]'", EXPORT_HINT):
        assert check_command(command) == [], command
    assert "./install.sh export" in EXPORT_HINT and "pip install -e '.[export]'" in EXPORT_HINT
    stale = []
    for folder in ("depthpro_fast", "bench", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".sh") and path.is_file() and \
                    path.name != Path(__file__).name:
                if re.search(r"pip install '?depthpro-fast\[", path.read_text("utf-8", "replace")):
                    stale.append(str(path.relative_to(ROOT)))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert stale == [] and "pip install 'depthpro-fast[" not in readme, stale


def test_doc_pages_named_in_the_docs_exist():
    named = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named |= set(re.findall(r"(?<![\w/])((?:docs|bench/results)/[\w.-]+\.md)",
                                path.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not (ROOT / p).is_file() and p not in PENDING_PAGES)
    assert missing == []


def test_relative_links_in_the_docs_resolve():
    """A markdown link to a file of the checkout (``[cli](docs/cli.md)`` in the README,
    ``[video.md](video.md)`` inside docs/) names a file that exists, relative to its page."""
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:|#", target):  # a web address or an anchor of the page
                continue
            file = target.split("#", 1)[0]
            if not (path.parent / file).exists() and str(
                    (path.parent / file).resolve().relative_to(ROOT)) not in PENDING_PAGES:
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert broken == []


def test_install_sh_refuses_an_unknown_argument_before_installing():
    """`./install.sh devel` must not install the plain package silently (it used to ignore
    anything but `dev`): it stops at once, naming what it accepts."""
    proc = subprocess.run([str(ROOT / "install.sh"), "devel"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert proc.returncode == 2, proc.stderr
    assert "unknown argument 'devel'" in proc.stderr and "dev, export" in proc.stderr
