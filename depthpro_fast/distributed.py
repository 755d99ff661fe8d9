"""Running ``predict`` on many processes (``torchrun``, several GPUs or nodes).

Each process takes a deterministic share of the input list: the list is sorted and process
``rank`` keeps items ``rank, rank + world, rank + 2 * world, ...`` (round-robin, so that a
folder whose files differ in size per sub-folder still balances). Nothing else is exchanged
during the run: outputs are written independently and atomically, and outputs that already
exist are skipped, so a job that was cut short resumes where it stopped with the same command,
whatever the number of processes of the new run. At the end the counts are summed over the
processes (a ``gloo`` all-reduce) for one summary.

Rank and world size come from an initialised ``torch.distributed`` process group, else from
the ``RANK`` / ``WORLD_SIZE`` environment variables that ``torchrun`` sets, else (0, 1).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed, else RANK/WORLD_SIZE, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world is None:
        if rank not in (None, 0):
            raise ValueError(f"RANK={rank} is set but WORLD_SIZE is not")
        return 0, 1
    rank = 0 if rank is None else rank
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world


def shard(items: Sequence[T], rank: int, world: int,
          key: Callable[[T], Any] | None = None) -> list[T]:
    """This rank's share of ``items``: sorted (by ``key``), then every ``world``-th from
    ``rank``. Every item lands in exactly one share; the shares differ in size by at most 1."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive integer, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an integer in 0..{world - 1}, got {rank!r}")
    return sorted(items, key=key)[rank::world]


def local_device(device: str | None) -> str | None:
    """The device of this process: under torchrun, ``cuda`` (or auto) means ``cuda:LOCAL_RANK``
    so that the processes of one node use one GPU each; explicit indices are kept.

    Under torchrun a CUDA device is also made this process's current device
    (``torch.cuda.set_device``): work that runs on the current device rather than on its
    tensors' (Triton launches, events and synchronisations without a device, the CUDA caching
    allocator's context) then lands on this rank's GPU, not on every rank's GPU 0."""
    local = _env_int("LOCAL_RANK")
    if local is None:
        return device
    if device in (None, "auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
        else:
            return "cpu" if device in (None, "auto") else device
    _set_current_cuda_device(device)
    return device


def _set_current_cuda_device(device: str | None) -> None:
    """``torch.cuda.set_device`` for an indexed CUDA device string (nothing otherwise)."""
    if device is None or not device.startswith("cuda:"):
        return
    import torch

    index = torch.device(device).index
    if torch.cuda.is_available() and index is not None and index < torch.cuda.device_count():
        torch.cuda.set_device(index)


def init_process_group(timeout_s: float = 7 * 24 * 3600.0) -> bool:
    """Join the torchrun job's process group (gloo: it only carries the final counts) when
    running under torchrun with more than one process. Returns True if this call created it.

    The timeout is long because the final all-reduce waits for the slowest rank's whole share;
    a rank that dies makes torchrun stop the others anyway."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    world = _env_int("WORLD_SIZE")
    if world is None or world < 2 or os.environ.get("MASTER_ADDR") is None:
        return False
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def sum_counts(counts: Sequence[float]) -> list[float]:
    """Element-wise sum of ``counts`` over all processes (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [float(c) for c in counts]
    t = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
