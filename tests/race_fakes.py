"""Fakes for the CPU race's tests: contestants built by a factory in the child process (quick,
failing, crashing, hanging), and a /proc whose counters advance as a test says."""

from __future__ import annotations

import os
import time

import torch

from depthpro_fast.bench import machine_load as ml
from depthpro_fast.bench.race_contestants import Built, Contestant, Context

HZ = 100.0


def quick(c: Contestant, ctx: Context) -> Built:
    """A contestant that answers at once: a small map made from the input, and an FOV."""
    def run(x: torch.Tensor):
        return x[:, :1, :8, :8].abs() + 1.0, torch.full((x.shape[0], 1, 1, 1), 60.0)

    return Built(run, torch.float32, {"fake": "quick"})


def raises(c: Contestant, ctx: Context) -> Built:
    raise RuntimeError("deliberate failure while building")


def aborts(c: Contestant, ctx: Context) -> Built:
    print("about to abort", flush=True)
    os.abort()  # a crash: no result file, killed by SIGABRT


def hangs(c: Contestant, ctx: Context) -> Built:
    time.sleep(3600)
    raise AssertionError("unreachable")


def fake(name: str, function: str, *, reference: bool = False) -> Contestant:
    return Contestant(name, "factory", f"fake {function}", factory=f"tests.race_fakes:{function}",
                      reference=reference)


class FakeProc:
    """/proc/stat, /proc/self/stat and /proc/loadavg of a machine whose counters advance by
    ``advance(seconds, own=..., others=...)`` (cores' worth of CPU)."""

    def __init__(self, cores: int = 2, load: float = 0.2):
        self.cores, self.now, self.load = cores, 100.0, load
        self.busy = self.idle = self.own = 0

    def advance(self, seconds: float, *, own: float = 0.0, others: float = 0.0) -> None:
        self.now += seconds
        total = round(seconds * HZ * self.cores)
        own_j, others_j = round(own * seconds * HZ), round(others * seconds * HZ)
        self.own += own_j
        self.busy += own_j + others_j
        self.idle += total - own_j - others_j

    def read(self, path: str) -> str | None:
        if path == "/proc/stat":
            per = [f"cpu{i} 1 0 1 1 0 0 0 0" for i in range(self.cores)]
            return "\n".join([f"cpu  {self.busy} 0 0 {self.idle} 0 0 0 0", *per]) + "\n"
        if path == "/proc/self/stat":
            fields = ["S"] + ["0"] * 10 + [str(self.own), "0", "0", "0", "20"]
            return f"4242 (python3) {' '.join(fields)}\n"
        if path == "/proc/loadavg":
            return f"{self.load:.2f} {self.load:.2f} {self.load:.2f} 3/700 4242\n"
        return None

    def reader(self) -> ml.ProcReader:
        return ml.ProcReader(read=self.read, clock=lambda: self.now, ticks_per_s=HZ)

    def span(self, seconds: float, **usage: float) -> ml.Load:
        with ml.Span(self.reader(), threads=2) as s:
            self.advance(seconds, **usage)
        return s.load
