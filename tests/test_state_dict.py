"""State-dict layout (Apple's keys) and checkpoint loading with clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch

import depthpro_fast
from depthpro_fast.api import build_model
from depthpro_fast.checkpoint import CheckpointError
from depthpro_fast.config import OFFICIAL, TINY
from tests.conftest import FIXTURES, TINY_DIR


def read_key_list(name: str) -> list[tuple[str, list[int]]]:
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, [int(v) for v in shape.strip("[]").split(",") if v.strip()]))
    return rows


@pytest.mark.parametrize("config, key_file, n_keys, n_params", [
    (OFFICIAL, "state_dict_keys.txt", 1119, 951_991_330),
    (TINY, "state_dict_keys_tiny.txt", 279, 3_424_350),
])
def test_keys_match_official_list_on_meta(config, key_file, n_keys, n_params):
    model = build_model(config, device="meta")
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    expected = read_key_list(key_file)
    assert len(ours) == n_keys
    assert ours == expected  # key for key, shape for shape, in state_dict() order
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(p.is_meta for p in model.parameters())


def test_saved_state_dict_loads_back_strictly(tmp_path):
    torch.manual_seed(1)
    model, _ = depthpro_fast.load(None, config="tiny", device="cpu")
    path = tmp_path / "ours.pt"
    torch.save(model.state_dict(), path)
    again, _ = depthpro_fast.load(path, config="tiny", device="cpu")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                    strict=True):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:dtype=torch.float16 on this CPU")  # expected
def test_fixture_loads_fp16_into_fp32(tiny_state_dict):
    model, _ = depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt", config=TINY, device="cpu")
    w = model.encoder.patch_encoder.blocks[0].attn.qkv.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, tiny_state_dict["encoder.patch_encoder.blocks.0.attn.qkv.weight"].float())
    half, _ = depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt", config=TINY, device="cpu",
                                 dtype=torch.float16)
    assert half.head[0].weight.dtype == torch.float16


def test_in_memory_state_dict_and_no_fov(tiny_state_dict):
    model, _ = depthpro_fast.load(tiny_state_dict, config=TINY, device="cpu", use_fov=False)
    assert model.fov is None  # the fov.* keys of the checkpoint are accepted and unused


def test_wrong_config_names_the_preset_the_shapes_match(tiny_state_dict):
    with pytest.raises(CheckpointError) as err:
        depthpro_fast.load(tiny_state_dict, config=TINY.__class__(
            **{**TINY.to_dict(), "depth": 3}), device="cpu")
    msg = str(err.value)
    assert "unexpected keys" in msg and "blocks.3" in msg and "'depth': 3" in msg
    assert "these are the weights of the preset 'tiny'" in msg and "config='tiny'" in msg
    with pytest.raises(CheckpointError) as err:
        depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt", device="cpu")  # official config
    msg = str(err.value)
    assert "wrong shapes" in msg and "more)" in msg
    assert "preset 'tiny'" in msg and "pass config='tiny'" in msg
    assert "does not look like" not in msg


def test_wrong_config_names_the_preset_on_the_command_line(tiny_state_dict):
    from depthpro_fast._spelling import cli_spelling

    sd = {k: v for k, v in tiny_state_dict.items() if not k.startswith("fov.")}
    with cli_spelling(), pytest.raises(CheckpointError) as err:
        depthpro_fast.load(sd, device="cpu")  # official config, with a FOV network
    msg = str(err.value)
    assert "preset 'tiny', without a FOV network" in msg and "pass --config tiny" in msg
    assert '"use_fov": false' in msg and "config=" not in msg


def test_incomplete_file_names_its_missing_key_not_the_config(tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["encoder.patch_encoder.cls_token"]  # a key the guess of the knobs used to need
    with pytest.raises(CheckpointError) as err:
        depthpro_fast.load(sd, config=TINY, device="cpu")
    msg = str(err.value)
    assert "is incomplete: it lacks 1 of the 279 keys" in msg
    assert "encoder.patch_encoder.cls_token" in msg and "the config is right" in msg
    assert "does not look like" not in msg and "pass the matching" not in msg
    # a tiny file lacking a key, under the official config: the preset and the lack, both
    with pytest.raises(CheckpointError) as err:
        depthpro_fast.load(sd, device="cpu")
    msg = str(err.value)
    assert "preset 'tiny'" in msg and "lacks 1 of them (encoder.patch_encoder.cls_token)" in msg


def test_checkpoint_without_fov_network_says_how_to_load_it(tiny_state_dict):
    sd = {k: v for k, v in tiny_state_dict.items() if not k.startswith("fov.")}
    with pytest.raises(CheckpointError, match="has no FOV network .*use_fov=False"):
        depthpro_fast.load(sd, config=TINY, device="cpu")
    model, _ = depthpro_fast.load(sd, config={**TINY.to_dict(), "use_fov": False}, device="cpu",
                                  fast=False)  # the config's use_fov is load's default
    assert model.fov is None


def test_unknown_knobs_are_guessed_key_by_key(tiny_state_dict):
    from depthpro_fast.checkpoint import guess_config
    from tests.model_helpers import MICRO

    micro = build_model(MICRO, device="meta").state_dict()
    with pytest.raises(CheckpointError) as err:
        depthpro_fast.load({k: torch.zeros(v.shape) for k, v in micro.items()}, config=TINY,
                           device="cpu")
    msg = str(err.value)
    assert "preset" not in msg and "embed_dim=64, depth=2" in msg and "pass the matching" in msg
    sd = dict(tiny_state_dict)
    del sd["encoder.patch_encoder.cls_token"], sd["decoder.convs.1.weight"]
    guess = guess_config(sd)
    assert "embed_dim" not in guess and "depth=4" in guess and "encoder_feature_dims" in guess
    assert guess_config({"x": torch.zeros(1)}) == "it does not look like a DepthPro state dict"


def test_missing_and_wrongly_shaped_keys(tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["head.0.weight"]
    sd["head.2.bias"] = torch.zeros(5)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        depthpro_fast.load(sd, config=TINY, device="cpu")
    msg = str(err.value)
    assert "1 missing keys: head.0.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "head.2.bias [5] (expected [32])" in msg


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"this is not a checkpoint", "is not a checkpoint: it is a text file"),
    (None, "not a DepthPro checkpoint"),
    ("evil", "not loaded for safety"),
    ("evil-zip", "not loaded for safety"),
])
def test_not_a_checkpoint(tmp_path, monkeypatch, content, match):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "file.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    elif content == "evil":  # a plain (legacy-format) pickle
        with open(path, "wb") as f:
            pickle.dump({"w": _Evil()}, f)
    elif content == "evil-zip":  # torch.save's zip format around the same payload
        torch.save({"w": _Evil()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        depthpro_fast.load(path, config=TINY, device="cpu")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint(tmp_path):
    full = (TINY_DIR / "state_dict_fp16.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="not a readable") as err:
        depthpro_fast.load(path, config=TINY, device="cpu")
    assert "damaged or truncated" in str(err.value) and "miniz" not in str(err.value)


class WholeModel(torch.nn.Module):  # torch.save(model) instead of its state_dict
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def _random_bytes() -> bytes:
    import random

    data = bytearray(random.Random(3).randbytes(4096))
    data[0] = 0x42  # neither a pickle's 0x80 nor a zip's "PK"
    return bytes(data)


@pytest.mark.parametrize("make, wanted", [
    (lambda p: p.write_bytes(_random_bytes()),
     "is not a checkpoint: it is neither a PyTorch file (a zip archive or a pickle) nor "
     "safetensors: 4096 bytes starting with 42"),
    (lambda p: p.write_text("<!DOCTYPE html><html><body>404</body></html>"),
     "is not a checkpoint: it is an HTML / XML page"),
    (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
     "is not a checkpoint: it is a Git LFS pointer"),
    (lambda p: p.write_bytes(__import__("gzip").compress(
        (TINY_DIR / "state_dict_fp16.pt").read_bytes()[:1000])),
     "is not a checkpoint: it is a gzip file"),
    (lambda p: __import__("zipfile").ZipFile(p, "w").writestr("notes.txt", "hi"),
     "it is a zip archive, but not one written by torch.save"),
    (lambda p: torch.save(WholeModel(), p),
     f"it contains Python objects other than tensors ({WholeModel.__module__}.WholeModel)"),
    (lambda p: p.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4)),
     "it is a Python pickle that torch.save did not write"),
])
def test_what_a_bad_checkpoint_is_is_said(tmp_path, make, wanted):
    import warnings

    path = tmp_path / "depth_pro.pt"
    make(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as err:
            depthpro_fast.load(path, config=TINY, device="cpu")
    assert wanted in str(err.value), str(err.value)
    assert str(path) in str(err.value)
    assert "miniz" not in str(err.value) and "Weights only load failed" not in str(err.value)
    assert not [w for w in caught if "pickle protocol" in str(w.message)]  # torch's noise


def test_legacy_and_misnamed_safetensors_checkpoints_load(tmp_path, tiny_state_dict):
    from safetensors.torch import save_file

    legacy = tmp_path / "legacy.pt"
    torch.save(tiny_state_dict, legacy, _use_new_zipfile_serialization=False)
    depthpro_fast.load(legacy, config=TINY, device="cpu")
    misnamed = tmp_path / "weights.pt"  # safetensors content under a .pt name
    save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, misnamed)
    depthpro_fast.load(misnamed, config=TINY, device="cpu")


def test_auto_checkpoint_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEPTHPRO_CHECKPOINT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        depthpro_fast.load("auto", config=TINY, device="cpu")
    msg = str(err.value)
    assert "ml-site.cdn-apple.com" in msg and "checkpoints/depth_pro.pt" in msg
    # the user cache is found ...
    cache = tmp_path / "cache" / "depthpro_fast"
    cache.mkdir(parents=True)
    (cache / "depth_pro.pt").write_bytes((TINY_DIR / "state_dict_fp16.pt").read_bytes())
    model, _ = depthpro_fast.load("auto", config=TINY, device="cpu")
    # ... and $DEPTHPRO_CHECKPOINT takes precedence
    monkeypatch.setenv("DEPTHPRO_CHECKPOINT", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        depthpro_fast.load("auto", config=TINY, device="cpu")


def test_bad_load_arguments():
    with pytest.raises(ValueError, match="dtype"):
        depthpro_fast.load(None, config=TINY, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="backend"):
        depthpro_fast.load(None, config=TINY, device="cpu", backend="fast")
    with pytest.raises(TypeError, match="checkpoint"):
        depthpro_fast.load(123, config=TINY, device="cpu")
