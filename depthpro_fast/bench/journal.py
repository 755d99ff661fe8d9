"""A results file of independent cases (smoke checks, micro-benchmarks), rewritten after each.

Why: on a GPU one faulty kernel (an illegal address, say) leaves the CUDA context unusable, so
every later case of the same process would fail too; a crash (segfault, abort) loses the
process and whatever it had not written. So :func:`run_cases` writes each case's row before it
runs (status ``running``) and after (``ok`` / ``skipped`` / ``failed``). When a failure leaves the
context unusable it stops with exit code :data:`POISONED`; the next process, started with
``resume=True``, skips the cases already done and reports a case still ``running`` as the one
that killed its process. ``bench/gpu_check.sh`` restarts a group until it ends.

Rows are plain dicts with at least ``key`` (unique in the file), ``status`` and ``reason``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .results import write_json

#: Exit code of a process that stopped because the CUDA context became unusable.
POISONED = 3
#: Exit code of a process stopped by an interrupt (``timeout --signal=INT``, Ctrl-C).
INTERRUPTED = 130


class SkipCase(Exception):
    """A case that cannot run here; the message says why."""


class CaseFailed(Exception):
    """A case that ran and failed its check: the message says why; ``fields`` (what it
    measured, e.g. the error) go into its row."""

    def __init__(self, reason: str, fields: dict[str, Any]) -> None:
        super().__init__(reason)
        self.fields = fields


@dataclasses.dataclass
class Case:
    """One independent check or measurement.

    ``info``: the row's fields known before running (group, problem, implementation, dtype).
    ``run``: does the work and returns the row's other fields; raises :class:`SkipCase` when
    the case cannot run here, anything else when it fails.
    """

    key: str
    info: dict[str, Any]
    run: Callable[[], dict[str, Any]]


class Journal:
    """The JSON file ``{"schema", <header fields>, "commands", "rows"}``, rewritten atomically
    after every change so that a killed process leaves every row it finished."""

    def __init__(self, path: str | Path | None, *, schema: str,
                 header: Callable[[], dict[str, Any]]) -> None:
        self.path = Path(path) if path else None  # None: rows kept in memory only
        data: dict[str, Any] | None = None
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                data = None  # a torn or foreign file: start again
            if data is not None and data.get("schema") != schema:
                raise ValueError(f"{self.path} holds {data.get('schema')!r} results, not "
                                 f"{schema!r}: name another file")
        if data is None:  # the header (environment probe) only for a new file
            data = {"schema": schema, **header(), "rows": []}
        data.setdefault("commands", []).append(" ".join(sys.argv))
        self.data = data
        self._rows: dict[str, dict[str, Any]] = {r["key"]: r for r in data["rows"]}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._rows.get(key)

    def put(self, row: dict[str, Any]) -> None:
        self._rows[row["key"]] = row
        self.save()

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._rows.pop(key, None)
        self.save()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

    def save(self) -> None:
        self.data["rows"] = self.rows
        if self.path is not None:
            write_json(self.path, self.data)


def show_results(path: str, schema: str, what: str,
                 format_table: Callable[[list[dict[str, Any]]], str]) -> int:
    """Print the table of a results file (``--show``); 2 when it is not a ``schema`` file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("schema") != schema:
        print(f"{path} is not a {what} results file", file=sys.stderr)
        return 2
    print(format_table(data["rows"]))
    return 0


def cuda_context_usable(device: torch.device) -> bool:
    """False when the CUDA context is poisoned (a sticky error such as an illegal address)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return float(torch.ones(1, device=device).add_(1).item()) == 2.0
    except Exception:  # noqa: BLE001  (any error here means the context is gone)
        return False


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]


def run_cases(cases: Sequence[Case], journal: Journal, *, device: torch.device,
              resume: bool = False, time_limit_s: float | None = None,
              log: Callable[[str], None] = lambda msg: None) -> int:
    """Run ``cases`` in order, recording each in ``journal``; returns the process exit code.

    ``resume=False`` forgets earlier rows of these cases first; ``resume=True`` keeps finished
    ones. ``time_limit_s``: cases not started by then are recorded as skipped. Returns 0 when
    every case has a final row, :data:`POISONED` when the CUDA context became unusable (later
    cases are left for the next process), :data:`INTERRUPTED` on an interrupt.
    """
    if not resume:
        journal.forget(c.key for c in cases)
    start = time.perf_counter()
    for i, case in enumerate(cases):
        done = journal.get(case.key)
        if done is not None:
            if done["status"] == "running":  # the process that ran it died in it
                journal.put({**done, "status": "failed",
                             "reason": "the process died while running this case (a crash or a "
                                       "GPU fault); a new process went on with the next cases"})
            continue
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            journal.put({"key": case.key, **case.info, "status": "skipped",
                         "reason": f"not run: the time limit of {time_limit_s:.0f} s was spent"})
            continue
        log(f"[{i + 1}/{len(cases)}] {case.key}")
        journal.put({"key": case.key, **case.info, "status": "running", "reason": None})
        try:
            row = {"key": case.key, **case.info, "status": "ok", "reason": None, **case.run()}
        except SkipCase as e:
            row = {"key": case.key, **case.info, "status": "skipped", "reason": str(e)}
        except CaseFailed as e:
            row = {"key": case.key, **case.info, "status": "failed", "reason": str(e),
                   **e.fields}
        except KeyboardInterrupt:
            for later in cases[i:]:
                journal.put({"key": later.key, **later.info, "status": "skipped",
                             "reason": "not run: interrupted (time limit or Ctrl-C)"})
            log("interrupted: the cases not run are recorded as skipped")
            return INTERRUPTED
        except Exception as e:  # noqa: BLE001  (a broken case must not stop the others)
            row = {"key": case.key, **case.info, "status": "failed", "reason": _reason(e)}
            if not cuda_context_usable(device):
                row["reason"] += " (the CUDA context was unusable after it)"
                journal.put(row)
                log(f"    failed and poisoned the CUDA context: {row['reason']}")
                return POISONED
        journal.put(row)
        if row["status"] != "ok":
            log(f"    {row['status']}: {row['reason']}")
    return 0
