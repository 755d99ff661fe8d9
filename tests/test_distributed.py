"""Sharding ``predict`` over processes: rank / world size, deterministic shards, torchrun."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from depthpro_fast import distributed
from tests.conftest import TINY_DIR
from tests.test_io import noisy_rgb, smooth_rgb


def test_rank_world_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.rank_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert distributed.rank_world() == (3, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK"):
        distributed.rank_world()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.rank_world()


@pytest.mark.parametrize("n, world", [(0, 3), (1, 2), (7, 3), (10, 4), (5, 8)])
def test_shards_partition_deterministically(n, world):
    items = [f"img_{i:03d}.jpg" for i in range(n)]
    shuffled = items[:]
    random.Random(n).shuffle(shuffled)  # another listing order: same shards
    shards = [distributed.shard(items, r, world) for r in range(world)]
    assert shards == [distributed.shard(shuffled, r, world) for r in range(world)]
    assert sorted(x for s in shards for x in s) == items  # each item exactly once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        distributed.shard(items, world, world)
    with pytest.raises(ValueError):
        distributed.shard(items, 0, 0)


def test_local_device(monkeypatch):
    import torch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.local_device(None) is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device("cpu") == "cpu"
    assert distributed.local_device("cuda:0") == "cuda:0"  # explicit index kept
    if not torch.cuda.is_available():
        assert distributed.local_device(None) == "cpu"
    else:
        assert distributed.local_device(None).startswith("cuda:")


def test_local_device_becomes_the_current_cuda_device(monkeypatch):
    """Under torchrun each rank makes its GPU current (Triton launches on the current device:
    without set_device every rank >= 1 would launch on GPU 0 with pointers of its own GPU)."""
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert distributed.local_device("cuda") == "cuda:1"
    assert distributed.local_device(None) == "cuda:1"
    assert distributed.local_device("cuda:2") == "cuda:2"  # explicit index: kept, made current
    assert distributed.local_device("cuda:9") == "cuda:9"  # no such GPU: left to the loader
    assert distributed.local_device("cpu") == "cpu"
    assert calls == [1, 1, 2]
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.local_device("cuda") == "cuda"  # not under torchrun: nothing changes
    assert calls == [1, 1, 2]


def test_sum_counts_without_group():
    assert distributed.sum_counts([1, 2.5]) == [1.0, 2.5]


def test_torchrun_two_processes_shard_and_resume(tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo, CPU): each rank takes its share; a file without
    a record of what made it (``c.npz``) is not trusted but recomputed; a rerun, whose outputs
    all record the same recipe, does nothing."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(smooth_rgb(20, 28)).save(photos / "a.png")
    Image.fromarray(noisy_rgb(18, 24, seed=1)).save(photos / "b.png")
    Image.fromarray(noisy_rgb(16, 16, seed=2)).save(photos / "c.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.npz").write_bytes(b"done earlier")  # by something that did not say how
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "depthpro_fast.cli", "predict", str(photos), "-o", str(out),
           "--save", "npz", "--device", "cpu", "--backend", "reference", "--quiet",
           "--checkpoint", str(TINY_DIR / "state_dict_fp16.pt"),
           "--config", str(TINY_DIR / "config.json")]

    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    elapsed = time.perf_counter() - t0
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    # sorted [a, b, c]: rank 0 takes a and c (c recomputed), rank 1 takes b
    assert "[rank 0/2]" in log and "2 images: 2 written, 0 skipped" in log, log
    assert "1 image had no record of what made its outputs" in log, log
    assert "[rank 1/2]" in log and "1 image: 1 written, 0 skipped" in log, log
    assert "all 2 ranks: 3 images: 3 written, 0 skipped, 0 failed" in log, log
    for name in ("a", "b", "c"):
        with np.load(out / f"{name}.npz") as z:
            size = list(np.asarray(Image.open(photos / f"{name}.png")).shape[:2])
            assert list(z["depth"].shape) == z["image_size"].tolist() == size
            assert np.isfinite(z["depth"]).all()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "all 2 ranks: 3 images: 0 written, 3 skipped, 0 failed" in rerun.stdout + rerun.stderr
    print(f"torchrun, 2 CPU processes, 2 tiny-model images: {elapsed:.1f} s")
