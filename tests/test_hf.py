"""Hugging Face DepthPro-hf weights: key mapping (both naming generations) and loading."""

from __future__ import annotations

import json

import pytest
import torch

import depthpro_fast
from depthpro_fast import hf
from depthpro_fast.api import build_model
from depthpro_fast.checkpoint import CheckpointError
from depthpro_fast.config import OFFICIAL, TINY
from tests.conftest import TINY_DIR

safetensors_torch = pytest.importorskip("safetensors.torch")


def official_meta_state_dict() -> dict[str, torch.Tensor]:
    return build_model(OFFICIAL, device="meta").state_dict()


@pytest.mark.parametrize("naming", ["4.x", "5.x"])
def test_official_counts_and_bijection(naming):
    """1119 Apple keys <-> 1407 HF keys (72 qkv become 216), shapes preserved (spec)."""
    apple = official_meta_state_dict()
    # meta tensors cannot be chunked into real data, but chunk/clone work on meta
    converted = hf.apple_to_hf(apple, naming)
    assert len(apple) == 1119 and len(converted) == 1407
    assert len(set(converted)) == 1407
    assert hf.is_hf_state_dict(converted) and not hf.is_hf_state_dict(apple)
    back = hf.hf_to_apple(converted)
    assert set(back) == set(apple)
    assert all(back[k].shape == apple[k].shape for k in apple)


def test_spot_checks_from_the_spec_tables():
    to_hf = hf.apple_key_to_hf
    assert to_hf("encoder.patch_encoder.pos_embed") == [
        "depth_pro.encoder.patch_encoder.model.embeddings.position_embeddings"]
    assert to_hf("fov.encoder.0.blocks.7.ls2.gamma") == [
        "fov_model.fov_encoder.model.encoder.layer.7.layer_scale2.lambda1"]
    assert to_hf("encoder.image_encoder.blocks.3.attn.qkv.weight") == [
        f"depth_pro.encoder.image_encoder.model.encoder.layer.3.attention.attention.{p}.weight"
        for p in ("query", "key", "value")]
    assert to_hf("encoder.image_encoder.blocks.3.attn.qkv.weight", "5.x") == [
        f"depth_pro.encoder.image_encoder.model.encoder.layer.3.attention.{p}_proj.weight"
        for p in ("q", "k", "v")]
    assert to_hf("encoder.patch_encoder.blocks.0.attn.proj.bias") == [
        "depth_pro.encoder.patch_encoder.model.encoder.layer.0.attention.output.dense.bias"]
    assert to_hf("encoder.patch_encoder.blocks.0.attn.proj.bias", "5.x") == [
        "depth_pro.encoder.patch_encoder.model.encoder.layer.0.attention.o_proj.bias"]
    assert to_hf("encoder.patch_encoder.norm.weight") == [
        "depth_pro.encoder.patch_encoder.model.layernorm.weight"]
    # index flips of the neck
    assert to_hf("encoder.upsample_latent0.3.weight") == [
        "depth_pro.neck.feature_upsample.intermediate.1.layers.3.weight"]
    assert to_hf("encoder.upsample0.1.weight") == [
        "depth_pro.neck.feature_upsample.scaled_images.2.layers.1.weight"]
    assert to_hf("encoder.upsample_lowres.bias") == [
        "depth_pro.neck.feature_upsample.image_block.layers.0.bias"]
    assert to_hf("encoder.fuse_lowres.weight") == ["depth_pro.neck.fuse_image_with_low_res.weight"]
    assert to_hf("decoder.convs.1.weight") == [
        "depth_pro.neck.feature_projection.projections.3.weight"]
    # fusion blocks: Apple 4..1 = HF intermediate 0..3, Apple 0 = HF final
    assert to_hf("decoder.fusions.4.resnet1.residual.1.weight") == [
        "fusion_stage.intermediate.0.residual_layer1.convolution1.weight"]
    assert to_hf("decoder.fusions.1.deconv.weight") == ["fusion_stage.intermediate.3.deconv.weight"]
    assert to_hf("decoder.fusions.0.resnet2.residual.3.bias") == [
        "fusion_stage.final.residual_layer2.convolution2.bias"]
    assert to_hf("decoder.fusions.0.out_conv.weight") == ["fusion_stage.final.projection.weight"]
    assert to_hf("head.4.bias") == ["head.layers.4.bias"]
    assert to_hf("fov.encoder.1.weight") == ["fov_model.fov_encoder.neck.weight"]
    assert to_hf("fov.downsample.0.bias") == ["fov_model.conv.bias"]
    assert to_hf("fov.head.4.weight") == ["fov_model.head.layers.4.weight"]
    assert to_hf("not.a.key") is None


@pytest.mark.parametrize("naming", ["4.x", "5.x"])
def test_tiny_round_trip_is_exact(tiny_state_dict, naming):
    converted = hf.apple_to_hf(tiny_state_dict, naming)
    assert len(converted) == 279 + 2 * 24  # 3 ViTs x 4 blocks x (weight, bias) qkv split
    q = converted["depth_pro.encoder.patch_encoder.model.encoder.layer.1.attention."
                  + ("attention.query.weight" if naming == "4.x" else "q_proj.weight")]
    assert torch.equal(q, tiny_state_dict["encoder.patch_encoder.blocks.1.attn.qkv.weight"][:128])
    back = hf.hf_to_apple(converted)
    assert list(sorted(back)) == list(sorted(tiny_state_dict))
    for k, v in tiny_state_dict.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_mixed_names_mask_token_and_errors(tiny_state_dict):
    old = hf.apple_to_hf(tiny_state_dict, "4.x")
    new = hf.apple_to_hf(tiny_state_dict, "5.x")
    mixed = {k: v for k, v in old.items() if "fov_model" in k}
    mixed.update({k: v for k, v in new.items() if "fov_model" not in k})
    mixed["depth_pro.encoder.image_encoder.model.embeddings.mask_token"] = torch.zeros(1, 1, 128)
    back = hf.hf_to_apple(mixed)
    assert set(back) == set(tiny_state_dict)

    bad = dict(old)
    bad["depth_pro.something.else"] = torch.zeros(1)
    del bad["fov_model.fov_encoder.model.encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(ValueError) as err:
        hf.hf_to_apple(bad)
    msg = str(err.value)
    assert "depth_pro.something.else" in msg and "incomplete q/k/v" in msg
    assert "fov.encoder.0.blocks.0.attn.qkv.bias" in msg
    with pytest.raises(ValueError, match="naming"):
        hf.apple_to_hf(tiny_state_dict, "6.x")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tiny_state_dict):
    folder = tmp_path_factory.mktemp("DepthPro-hf")
    safetensors_torch.save_file(hf.apple_to_hf(tiny_state_dict), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "depth_pro"}))
    return folder


def assert_same_weights(model, tiny_state_dict):
    sd = model.state_dict()
    assert set(sd) == set(tiny_state_dict)
    for k, v in tiny_state_dict.items():
        assert torch.equal(sd[k], v.float()), k


def test_load_hf_folder_file_and_dict(hf_folder, tiny_state_dict):
    model, _ = depthpro_fast.load(hf_folder, config=TINY, device="cpu")
    assert_same_weights(model, tiny_state_dict)
    model, _ = depthpro_fast.load(hf_folder / "model.safetensors", config=TINY, device="cpu")
    assert_same_weights(model, tiny_state_dict)
    in_memory = hf.apple_to_hf(tiny_state_dict, "5.x")
    model, _ = depthpro_fast.load(in_memory, config=TINY, device="cpu")
    assert_same_weights(model, tiny_state_dict)


def test_load_sharded_hf_folder(tmp_path, tiny_state_dict):
    converted = hf.apple_to_hf(tiny_state_dict)
    keys = sorted(converted)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        safetensors_torch.save_file({k: converted[k] for k in part}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = depthpro_fast.load(tmp_path, config=TINY, device="cpu")
    assert_same_weights(model, tiny_state_dict)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        depthpro_fast.load(tmp_path, config=TINY, device="cpu")


def test_folder_without_weights_and_unmappable_hf(tmp_path, tiny_state_dict):
    with pytest.raises(CheckpointError, match="is a folder"):
        depthpro_fast.load(tmp_path, config=TINY, device="cpu")
    bad = hf.apple_to_hf(tiny_state_dict)
    bad["depth_pro.unknown.weight"] = torch.zeros(1)
    safetensors_torch.save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="Hugging Face.*depth_pro.unknown.weight"):
        depthpro_fast.load(tmp_path, config=TINY, device="cpu")


def test_hf_weights_give_the_official_outputs(hf_folder, tiny_image, expected_estimated):
    """The model loaded from the HF layout reproduces the official golden output."""
    from tests.test_golden import RTOL, rel_err

    model, transform = depthpro_fast.load(hf_folder, config=TINY_DIR / "config.json",
                                          device="cpu", backend="reference")
    out = model.infer(transform(tiny_image))
    assert rel_err(out["depth"], expected_estimated["depth"]) < RTOL
    assert abs(float(out["focallength_px"]) - float(expected_estimated["focallength_px"])) < (
        RTOL * float(expected_estimated["focallength_px"]))
