"""How much of the machine a benchmark got: load average, steal, other processes' CPU use.

A timing taken while other processes share the cores is not comparable with one taken on an
idle machine (on a busy 2-core machine the same forward took 1.5-7x longer). So the bench takes
a :class:`Snapshot` before and after each row and the whole run, and :func:`measure` turns two
of them into a :class:`Load`:

- ``cpu_got``: this process's CPU time (all its threads, and its waited-for children) over the
  wall time x the threads it runs (``torch.get_num_threads()``, at most the cores): about 100 %
  when every thread ran the whole time, lower when the threads waited for a core (or for the
  serial parts of the work).
- ``others_cores``: the cores' worth of CPU that other processes used during the span: the
  system's busy jiffies (``/proc/stat``: user, nice, system, irq, softirq) minus this
  process's (``/proc/self/stat``: utime, stime, cutime, cstime), over the span's jiffies per core.
- ``steal_pct``: the share of the span's CPU time the hypervisor gave to other guests
  (``/proc/stat`` steal).
- the 1-minute load average before and after (``/proc/loadavg``; includes this process's own
  threads once it runs).

``/proc/stat`` counts every core the kernel shows (in a container, possibly the host's, of
which the container may use only some), and the busy time of this process's children that it
has not yet waited for counts as "others".

The machine counts as **shared** during a span when other processes used more than
``OTHERS_SHARE`` (10 %) of the cores or steal exceeded ``STEAL_PCT`` (2 %); spans shorter than
``MIN_SPAN_S`` are not judged (the jiffy counters tick every 10 ms). Everything is read through a
:class:`ProcReader` whose file reader and clock can be replaced (tests inject ``/proc``
contents); where ``/proc`` cannot be read (not Linux) the numbers are None and the state
"unknown".
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# The judgement's thresholds (also written into the results file).
OTHERS_SHARE = 0.10  # other processes used more than this share of the cores: shared
STEAL_PCT = 2.0  # the hypervisor took more than this % of the CPU time: shared
MIN_SPAN_S = 0.5  # shorter spans are not judged (jiffies tick every 10 ms)


def read_proc_file(path: str) -> str | None:
    """The text of a /proc file, or None where it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class SystemTimes:
    """The ``cpu`` line of /proc/stat (jiffies summed over every core) and the core count."""

    total: int  # user + nice + system + idle + iowait + irq + softirq + steal
    busy: int  # user + nice + system + irq + softirq (guest time is inside user)
    steal: int
    cores: int

    @classmethod
    def parse(cls, text: str) -> SystemTimes | None:
        """From /proc/stat's text; None where its ``cpu`` line is missing or malformed."""
        fields: list[int] | None = None
        cores = 0
        for line in text.splitlines():
            name = line.split(" ", 1)[0]
            if name == "cpu":
                try:
                    fields = [int(v) for v in line.split()[1:]]
                except ValueError:
                    return None
            elif name.startswith("cpu") and name[3:].isdigit():
                cores += 1
        if fields is None or len(fields) < 4:
            return None
        fields = (fields + [0] * 8)[:8]  # (old kernels stop before iowait / irq / steal)
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        return cls(total=sum(fields), busy=user + nice + system + irq + softirq, steal=steal,
                   cores=cores or (os.cpu_count() or 1))


def parse_own_ticks(text: str) -> int | None:
    """utime + stime + cutime + cstime (jiffies) from /proc/self/stat's text, or None."""
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 15:
        return None
    try:
        # fields 14-17 of the file (utime, stime, cutime, cstime) are 11-14 after the ")"
        return sum(int(v) for v in fields[11:15])
    except ValueError:
        return None


def parse_loadavg(text: str) -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages from /proc/loadavg's text, or None."""
    try:
        one, five, fifteen = (float(v) for v in text.split()[:3])
    except ValueError:
        return None
    return one, five, fifteen


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The counters at one moment (None where they could not be read)."""

    wall_s: float
    system: SystemTimes | None
    own_ticks: int | None
    loadavg: tuple[float, float, float] | None


class ProcReader:
    """Takes :class:`Snapshot` s from /proc; ``read`` and ``clock`` are replaceable (tests)."""

    def __init__(self, read: Callable[[str], str | None] = read_proc_file,
                 clock: Callable[[], float] = time.perf_counter,
                 ticks_per_s: float | None = None):
        self.read = read
        self.clock = clock
        if ticks_per_s is None:
            try:
                ticks_per_s = float(os.sysconf("SC_CLK_TCK"))
            except (ValueError, OSError, AttributeError):
                ticks_per_s = 100.0
        self.ticks_per_s = ticks_per_s

    def snapshot(self) -> Snapshot:
        stat = self.read("/proc/stat")
        own = self.read("/proc/self/stat")
        load = self.read("/proc/loadavg")
        return Snapshot(wall_s=self.clock(),
                        system=SystemTimes.parse(stat) if stat else None,
                        own_ticks=parse_own_ticks(own) if own else None,
                        loadavg=parse_loadavg(load) if load else None)


@dataclasses.dataclass
class Load:
    """What the machine gave during one span, the raw deltas kept so that spans add up."""

    wall_s: float
    threads: int | None = None  # the threads this process computes with (None: not judged)
    cores: int | None = None
    d_total: int | None = None  # jiffies, all cores
    d_busy: int | None = None
    d_steal: int | None = None
    d_own: int | None = None
    ticks_per_s: float = 100.0
    load_before: float | None = None  # 1-minute load average
    load_after: float | None = None

    @property
    def cpu_s(self) -> float | None:
        """This process's CPU time during the span (its threads and waited-for children)."""
        return None if self.d_own is None else self.d_own / self.ticks_per_s

    @property
    def cpu_got(self) -> float | None:
        """CPU time / (wall time x the threads used, at most the cores): 1.0 = all of it."""
        if self.cpu_s is None or not self.threads or self.wall_s <= 0:
            return None
        return self.cpu_s / (self.wall_s * min(self.threads, self.cores or self.threads))

    @property
    def others_cores(self) -> float | None:
        """The cores' worth of CPU other processes used during the span."""
        if None in (self.d_total, self.d_busy, self.d_own) or not self.cores or not self.d_total:
            return None
        per_core = self.d_total / self.cores
        # the two files are read a moment apart and tick separately: never below zero
        return max(self.d_busy - self.d_own, 0) / per_core

    @property
    def steal_pct(self) -> float | None:
        if self.d_steal is None or not self.d_total:
            return None
        return 100.0 * self.d_steal / self.d_total

    @property
    def state(self) -> str:
        """``shared``, ``idle``, or ``unknown`` (no /proc, or a span under ``MIN_SPAN_S``)."""
        return judge(self)[0]

    @property
    def reasons(self) -> list[str]:
        return judge(self)[1]

    def to_dict(self) -> dict[str, Any]:
        def r(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        return {"state": self.state, "reasons": self.reasons, "wall_s": r(self.wall_s, 3),
                "cpu_s": r(self.cpu_s, 3), "threads": self.threads, "cores": self.cores,
                "cpu_got": r(self.cpu_got, 4), "others_cores": r(self.others_cores, 3),
                "steal_pct": r(self.steal_pct, 2), "load_before": self.load_before,
                "load_after": self.load_after}


def judge(load: Load) -> tuple[str, list[str]]:
    """(state, why): ``shared`` when others used more than ``OTHERS_SHARE`` of the cores or
    steal exceeded ``STEAL_PCT``; ``idle`` otherwise; ``unknown`` when it cannot tell."""
    if load.wall_s < MIN_SPAN_S:
        return "unknown", [f"span of {load.wall_s:.2f} s, under {MIN_SPAN_S:g} s"]
    others, steal = load.others_cores, load.steal_pct
    if others is None and steal is None:
        return "unknown", ["/proc/stat not readable"]
    reasons = []
    if others is not None and load.cores and others > OTHERS_SHARE * load.cores:
        reasons.append(f"others used {others:.1f} of {load.cores} cores")
    if steal is not None and steal > STEAL_PCT:
        reasons.append(f"steal {steal:.1f} % of the CPU time")
    return ("shared" if reasons else "idle"), reasons


def measure(before: Snapshot, after: Snapshot, *, threads: int | None,
            ticks_per_s: float = 100.0) -> Load:
    """The :class:`Load` of the span between two snapshots."""
    load = Load(wall_s=after.wall_s - before.wall_s, threads=threads, ticks_per_s=ticks_per_s,
                load_before=before.loadavg[0] if before.loadavg else None,
                load_after=after.loadavg[0] if after.loadavg else None)
    if before.system is not None and after.system is not None:
        load.cores = after.system.cores
        load.d_total = after.system.total - before.system.total
        load.d_busy = after.system.busy - before.system.busy
        load.d_steal = after.system.steal - before.system.steal
    if before.own_ticks is not None and after.own_ticks is not None:
        load.d_own = after.own_ticks - before.own_ticks
    return load


def combine(loads: Iterable[Load]) -> Load | None:
    """One :class:`Load` for several spans (their deltas and wall times added), or None.

    The load averages are the first span's before and the last one's after; a delta missing
    in any span is missing in the sum."""
    loads = [x for x in loads if x is not None]
    if not loads:
        return None

    def total(name: str) -> int | None:
        values = [getattr(x, name) for x in loads]
        return None if any(v is None for v in values) else sum(values)

    return Load(wall_s=sum(x.wall_s for x in loads), threads=loads[0].threads,
                cores=loads[0].cores, d_total=total("d_total"), d_busy=total("d_busy"),
                d_steal=total("d_steal"), d_own=total("d_own"), ticks_per_s=loads[0].ticks_per_s,
                load_before=loads[0].load_before, load_after=loads[-1].load_after)


class Span:
    """``with Span(reader, threads) as span: ...``; then ``span.load`` is the span's Load."""

    def __init__(self, reader: ProcReader, threads: int | None):
        self.reader = reader
        self.threads = threads
        self.before: Snapshot | None = None
        self.load: Load | None = None

    def __enter__(self) -> Span:
        self.before = self.reader.snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.load = measure(self.before, self.reader.snapshot(), threads=self.threads,
                            ticks_per_s=self.reader.ticks_per_s)


def probe(reader: ProcReader, seconds: float = 1.0,
          sleep: Callable[[float], None] = time.sleep) -> Load:
    """Other processes' CPU use over ``seconds`` while this process sleeps (before a run)."""
    before = reader.snapshot()
    sleep(seconds)
    return measure(before, reader.snapshot(), threads=None, ticks_per_s=reader.ticks_per_s)


def format_pct(value: float | None) -> str:
    """The "CPU got" cell: ``98 %``, or ``-``."""
    return "-" if value is None else f"{100 * value:.0f} %"


def warning(loads: Sequence[Load | None], what: str = "these rows") -> str | None:
    """The line under the table when the machine was shared during ``loads``, else None."""
    judged = [x for x in loads if x is not None and x.state != "unknown"]
    shared = [x for x in judged if x.state == "shared"]
    if not shared:
        return None
    # the numbers of the shared rows alone when only some were shared (over all rows a short
    # burst of others' work averages out to "0.0 of 2 cores", which reads as a contradiction)
    some = len(shared) < len(judged)
    total = combine(shared if some else judged)
    if some:
        what = f"the shared rows of {what}"
    bits = []
    if total.others_cores is not None and total.cores:
        bits.append(f"others used {total.others_cores:.1f} of {total.cores} cores")
    if total.steal_pct is not None and total.steal_pct > STEAL_PCT:
        bits.append(f"the hypervisor took {total.steal_pct:.1f} % of the CPU time (steal)")
    extra = []
    if len(shared) < len(judged):
        extra.append(f"{len(shared)} of {len(judged)} shared")
    if total.load_before is not None and total.load_after is not None:
        extra.append(f"load average {total.load_before:.1f} -> {total.load_after:.1f}")
    return (f"WARNING: the machine was shared: {' and '.join(bits)} during {what}"
            f"{' (' + ', '.join(extra) + ')' if extra else ''}: "
            "timings are not comparable; rerun on an idle machine.")


def summary(load: Load | None) -> str:
    """A short phrase for a caption: ``idle (others 0.02 of 2 cores, load 0.3 -> 2.1)``."""
    if load is None:
        return "machine state not recorded"
    bits = []
    if load.others_cores is not None and load.cores:
        bits.append(f"others {load.others_cores:.2f} of {load.cores} cores")
    if load.steal_pct:
        bits.append(f"steal {load.steal_pct:.1f} %")
    if load.load_before is not None and load.load_after is not None:
        bits.append(f"load {load.load_before:.1f} -> {load.load_after:.1f}")
    return f"{load.state}{' (' + ', '.join(bits) + ')' if bits else ''}"


def thresholds() -> dict[str, float]:
    """The judgement's thresholds, for the results file."""
    return {"others_share_of_cores": OTHERS_SHARE, "steal_pct": STEAL_PCT,
            "min_span_s": MIN_SPAN_S}


def run_state(rows: Sequence[Load | None], run: Load | None) -> tuple[str, Sequence[Load], str]:
    """(state, the spans judged, what they were) for a whole bench run: its rows' spans where
    any was long enough to judge (a GPU row's timed runs may take milliseconds), else the
    whole run's span; ``shared`` when any judged span was."""
    judged = [x for x in rows if x is not None and x.state != "unknown"]
    what = "these rows"
    if not judged:
        judged = [run] if run is not None and run.state != "unknown" else []
        what = "the run"
    if not judged:
        return "unknown", [], what
    return ("shared" if any(x.state == "shared" for x in judged) else "idle"), judged, what


def report(rows: Sequence[Load | None], run: Load | None, before: Load | None) -> dict[str, Any]:
    """The results file's ``machine_load``: the state, the warning, the thresholds, and the
    numbers before the run (``probe``), over the timed rows together and over the whole run."""
    state, judged, what = run_state(rows, run)
    together = combine([x for x in rows if x is not None])
    return {"state": state, "judged_on": what, "warning": warning(judged, what),
            "thresholds": thresholds(),
            "before": before.to_dict() if before is not None else None,
            "rows": together.to_dict() if together is not None else None,
            "run": run.to_dict() if run is not None else None}
