"""Running one child of the CPU race: a fresh Python process per job, with a time limit, its
own peak resident memory, and its output kept in a log file.

The child is started in a session of its own (``start_new_session``), so that a time limit
ends it *and* whatever it started (Inductor's compile workers) by its process group. Its
resource usage comes from ``os.wait4`` on its pid: ``ru_maxrss`` is that child's peak
resident memory alone (``getrusage(RUSAGE_CHILDREN)`` would give the largest of all children
so far).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: how often the race looks whether its child has ended (its own CPU use stays negligible)
POLL_S = 0.05


@dataclasses.dataclass
class ChildOutcome:
    """How a child ended: exit code, its result (None when it wrote none), wall time, peak
    resident memory, whether the time limit ended it, and the tail of its output."""

    exit_code: int | None
    result: dict[str, Any] | None
    wall_s: float
    peak_rss_bytes: int | None
    timed_out: bool
    output_tail: str

    @property
    def failure(self) -> str | None:
        """Why the job failed (None: it ran and wrote its result)."""
        if self.timed_out:
            return f"no result within the time limit ({self.wall_s:.0f} s): killed"
        if self.result is None:
            how = (f"killed by signal {-self.exit_code}" if self.exit_code is not None
                   and self.exit_code < 0 else f"exit code {self.exit_code}")
            return f"crashed ({how}) without a result"
        if self.result.get("status") == "failed":
            return self.result.get("error") or f"failed (exit code {self.exit_code})"
        return None


def tail(path: Path, lines: int = 12, chars: int = 2000) -> str:
    """The last ``lines`` lines of a log file (at most ``chars`` characters)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child's own session: it and what it started
    except (ProcessLookupError, PermissionError):
        pass


def launch(spec: dict[str, Any], *, timeout_s: float, log_path: Path,
           env: dict[str, str] | None = None) -> ChildOutcome:
    """Run ``python -m depthpro_fast.bench.race_child`` on ``spec`` (its ``out`` is where the
    result appears) and wait for it, at most ``timeout_s`` seconds."""
    out = Path(spec["out"])
    if out.exists():
        out.unlink()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "depthpro_fast.bench.race_child", json.dumps(spec)]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    timed_out = False
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout_s:
                timed_out = True
                _kill_group(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(POLL_S)
    except BaseException:  # Ctrl-C in the race: the child does not outlive it
        _kill_group(proc.pid)
        try:
            os.wait4(proc.pid, 0)
        except ChildProcessError:
            pass
        raise
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # (reaped here: Popen must not wait for it again)
    result = None
    if out.exists() and not timed_out:
        try:
            result = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = None
    return ChildOutcome(exit_code=code, result=result, wall_s=wall,
                        peak_rss_bytes=int(usage.ru_maxrss) * 1024, timed_out=timed_out,
                        output_tail=tail(log_path))


Launcher = Callable[..., ChildOutcome]
