"""The per-device decision cache: keyed by device and versions, atomic, per process and on disk."""

from __future__ import annotations

import json

import pytest
import torch

from depthpro_fast import device_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(device_cache.ENV_VAR, str(tmp_path))
    device_cache.clear_memory()
    yield tmp_path
    device_cache.clear_memory()


def test_put_get_round_trip_in_memory_and_on_disk(cache_dir):
    c = device_cache.DeviceCache("attention_choice", "cpu")
    assert c.get("k") is None
    c.put("k", {"choice": "torch", "timings_ms": {"torch": 1.5}})
    assert c.get("k")["choice"] == "torch"
    files = list(cache_dir.glob("attention_choice-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["fingerprint"]["device_type"] == "cpu"
    assert data["entries"]["k"]["choice"] == "torch"
    # a new process (memory cleared) reads it from disk
    device_cache.clear_memory()
    assert device_cache.DeviceCache("attention_choice", "cpu").get("k")["choice"] == "torch"


def test_other_fingerprint_does_not_see_the_entry(cache_dir, monkeypatch):
    c = device_cache.DeviceCache("qualification", "cpu")
    c.put("op", {"ok": True})
    device_cache.clear_memory()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other = device_cache.DeviceCache("qualification", "cpu")
    assert other.id != c.id and other.get("op") is None


def test_damaged_file_is_ignored_and_rewritten(cache_dir):
    c = device_cache.DeviceCache("qualification", "cpu")
    c.path.parent.mkdir(parents=True, exist_ok=True)
    c.path.write_text("{ half a fi")
    assert c.get("op") is None
    c.put("op", {"ok": False})
    device_cache.clear_memory()
    assert c.get("op") == {"ok": False}
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".qualification")]


def test_off_keeps_memory_only(monkeypatch, tmp_path):
    monkeypatch.setenv(device_cache.ENV_VAR, "off")
    device_cache.clear_memory()
    c = device_cache.DeviceCache("attention_choice", "cpu")
    assert c.path is None
    c.put("k", {"choice": "torch"})
    assert c.get("k") == {"choice": "torch"}
    device_cache.clear_memory()
    assert c.get("k") is None


def test_unwritable_disk_is_reported_not_raised(cache_dir):
    blocker = cache_dir / "file"
    blocker.write_text("x")
    c = device_cache.DeviceCache("attention_choice", "cpu")
    c.path = blocker / "sub" / c.file_name  # a folder under a file: cannot be created
    c.put("k", {"choice": "torch"})
    assert c.disk_error and c.get("k") == {"choice": "torch"}


def test_forget(cache_dir):
    c = device_cache.DeviceCache("qualification", "cpu")
    c.put("a", {"ok": True})
    c.put("b", {"ok": True})
    c.forget("a")
    device_cache.clear_memory()
    assert c.get("a") is None and c.get("b") == {"ok": True}
    c.forget()
    device_cache.clear_memory()
    assert c.get("b") is None


def test_fingerprint_names_kernel_sources_and_versions():
    fp = device_cache.device_fingerprint("cpu")
    for k in ("torch", "triton", "depthpro_fast", "kernel_sources", "device", "threads"):
        assert k in fp
    assert len(device_cache.kernel_sources_hash()) == 16


def test_bad_name_refused():
    with pytest.raises(ValueError, match="letters, digits"):
        device_cache.DeviceCache("../x", "cpu")
