"""Finding and reading checkpoints, and strict key checks with readable errors.

Apple's ``depth_pro.pt`` is a pickled dict of fp16 tensors. It is read with
``torch.load(weights_only=True)`` (never executes code) and memory-mapped where possible.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ._spelling import in_cli, option
from .config import DepthProConfig

CHECKPOINT_NAME = "depth_pro.pt"
CHECKPOINT_URL = "https://ml-site.cdn-apple.com/models/depth-pro/depth_pro.pt"
ENV_VAR = "DEPTHPRO_CHECKPOINT"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not a state dict, or wrong keys."""


def cache_dir() -> Path:
    """The user cache folder (``$XDG_CACHE_HOME/depthpro_fast`` or ``~/.cache/depthpro_fast``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "depthpro_fast"


def search_paths() -> list[tuple[str, Path | None]]:
    """Where ``checkpoint="auto"`` looks, in order, as (what, path)."""
    env = os.environ.get(ENV_VAR)
    return [(f"${ENV_VAR}", Path(env) if env else None),
            ("official default place", Path("checkpoints") / CHECKPOINT_NAME),
            ("user cache", cache_dir() / CHECKPOINT_NAME)]


def find_checkpoint() -> Path:
    """The first existing checkpoint of :func:`search_paths`, or a clear error."""
    env = os.environ.get(ENV_VAR)
    if env and not Path(env).is_file():  # an explicit choice that is wrong: say so, don't guess
        raise FileNotFoundError(f"${ENV_VAR} is set to {env!r}, which is not a file")
    looked = []
    for what, path in search_paths():
        if path is None:
            looked.append(f"  {what}: not set")
            continue
        if path.is_file():
            return path
        looked.append(f"  {what}: {path.resolve()} (not found)")
    if in_cli():
        choices = ("pass --checkpoint PATH; to try the command without them, "
                   "--random-weights --config tiny (meaningless depth, no download)")
    else:
        choices = "pass checkpoint=PATH; checkpoint=None builds random weights"
    raise FileNotFoundError(
        "no DepthPro checkpoint found. Looked at:\n" + "\n".join(looked) + "\n"
        f"Get Apple's weights ({CHECKPOINT_NAME}, 1.9 GB) with `depthpro-fast download` (or "
        f"from {CHECKPOINT_URL}) and put the file in one of those places (or set ${ENV_VAR}), "
        f"or {choices}.")


HF_WEIGHTS_NAME = "model.safetensors"  # the Hugging Face (DepthPro-hf) weights file
HF_INDEX_NAME = "model.safetensors.index.json"  # its sharded variant


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pt`` (torch.save) or ``.safetensors`` file, safely.

    A Hugging Face ``DepthPro-hf`` folder (``model.safetensors``, or sharded with its index)
    is accepted too; state dicts in the HF key layout are converted to Apple's keys."""
    return to_apple_keys(_read_any(Path(path)), str(path))


def to_apple_keys(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face layout state dict to Apple's keys; others pass unchanged."""
    from . import hf

    if not hf.is_hf_state_dict(state_dict):
        return state_dict
    try:
        return hf.hf_to_apple(state_dict)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {source} looks like Hugging Face DepthPro-hf weights "
                              f"but cannot be mapped to DepthPro's keys: {e}") from None


def _read_any(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / HF_WEIGHTS_NAME).is_file():
            return _read_safetensors(path / HF_WEIGHTS_NAME)
        if (path / HF_INDEX_NAME).is_file():
            return _read_hf_shards(path / HF_INDEX_NAME)
        raise CheckpointError(f"checkpoint {path} is a folder; pass the path of the "
                              f"{CHECKPOINT_NAME} file (or of a Hugging Face DepthPro-hf folder "
                              f"containing {HF_WEIGHTS_NAME})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    kind = _sniff(path)
    if kind == "safetensors" or path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            # torch's note about a pickle protocol it did not write: noise for the user, and
            # the file's real problem is reported below
            warnings.filterwarnings("ignore", message=r".*pickle protocol")
            try:
                # mmap: 952M parameters are paged in on use instead of read up front
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # legacy (pre-zipfile) serialisation cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{_explain_load_error(e, kind)}") from None
    return _as_state_dict(obj, path)


def _sniff(path: Path) -> str:
    """What the file is from its first bytes: ``"zip"`` (torch.save), ``"pickle"`` (legacy
    torch.save, or a plain pickle) or ``"safetensors"``; anything else is refused here, with
    what it looks like, instead of being fed to the unpickler (whose error reads like a
    security refusal for random bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8:
            return "safetensors"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        what = "an HTML / XML page (a failed download or an error page saved under this name?)"
    elif head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer, not the weights (`git lfs pull` fetches them)"
    elif head.startswith(b"\x1f\x8b"):
        what = "a gzip file (decompress it first)"
    elif head[257:262] == b"ustar":
        what = "a tar archive (extract it first)"
    elif head and all(32 <= c < 127 or c in b"\r\n\t" for c in head):
        first = head.decode("ascii").strip().splitlines()[0][:40] if head.strip() else ""
        what = f"a text file (it starts with {first!r})"
    else:
        what = (f"neither a PyTorch file (a zip archive or a pickle) nor safetensors: "
                f"{size} bytes starting with {head[:8].hex(' ')}")
    raise CheckpointError(f"{path} is not a checkpoint: it is {what}. DepthPro's weights are "
                          f"{CHECKPOINT_NAME} ({CHECKPOINT_URL}; `depthpro-fast download` "
                          "fetches and checks it)")


def _explain_load_error(e: BaseException, kind: str) -> str:
    """torch.load's error, in a sentence about the file (not torch's internals)."""
    text = str(e)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return (f"it contains Python objects other than tensors ({unsupported.group(1)}), which "
                "are not loaded for safety (weights_only=True: they could run code). A whole "
                "pickled model must be saved as its state_dict()")
    if "weights_only" in text or "Weights only load failed" in text:
        if kind == "pickle":  # not the protocol torch.save writes, or damaged
            return ("it is a Python pickle that torch.save did not write (or a damaged one), "
                    "which is not loaded for safety (weights_only=True: pickles can run code)")
        return ("it contains objects other than tensors, which are not loaded for safety "
                "(weights_only=True)")
    if kind == "zip" and re.search(r"data\.pkl|not in a subdirectory|archive/", text):
        return "it is a zip archive, but not one written by torch.save (no data.pkl inside)"
    if (kind == "zip" and re.search(r"central directory|miniz|truncat|corrupt", text, re.I)
            or isinstance(e, (zipfile.BadZipFile, EOFError))):
        return ("the file is damaged or truncated (an interrupted download or copy?); get it "
                "again (`depthpro-fast download` resumes and checks it)")
    first = text.split(". ")[0].splitlines()[0] if text else type(e).__name__
    return first
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading {path} needs the 'safetensors' package "
                              "(pip install safetensors)") from None
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _read_hf_shards(index: Path) -> dict[str, torch.Tensor]:
    """A sharded safetensors checkpoint: ``weight_map`` of the index names each key's file."""
    import json

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a readable safetensors index: {e}") from None
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index} names the shard {name}, which is missing")
        state_dict.update(_read_safetensors(shard))
    return state_dict


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint wrappers
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in obj.items()):
            return dict(obj)
    raise CheckpointError(f"{path} is not a DepthPro checkpoint: expected a dict of tensors "
                          f"(a state dict), got {type(obj).__name__}"
                          + (" with non-tensor values" if isinstance(obj, Mapping) else ""))


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def guess_config(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A human-readable guess of the knobs a state dict was made with (for error messages)."""
    prefix = "encoder.patch_encoder."
    try:
        e = state_dict[prefix + "cls_token"].shape[-1]
        depth = len({k.split(".")[3] for k in state_dict if k.startswith(prefix + "blocks.")})
        hidden = state_dict[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
        dims = [state_dict[f"encoder.upsample{i}.0.weight"].shape[0] for i in (0, 1, 2)]
        d = state_dict["decoder.convs.1.weight"].shape[0]
        dims = [state_dict["encoder.upsample_latent1.0.weight"].shape[0], *dims]
    except (KeyError, IndexError):
        return "it does not look like a DepthPro state dict"
    has_fov = any(k.startswith("fov.") for k in state_dict)
    return (f"its shapes suggest embed_dim={e}, depth={depth}, mlp_ratio={hidden / e:g}, "
            f"encoder_feature_dims={dims}, decoder_features={d}, "
            f"FOV network {'present' if has_fov else 'absent'}")


def check_keys(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
               config: DepthProConfig, use_fov: bool, source: str) -> None:
    """Raise one ``CheckpointError`` listing missing, unexpected and wrongly shaped keys."""
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    if not use_fov:  # a checkpoint with an FOV branch loads into a model without one
        unexpected = [k for k in unexpected if not k.startswith("fov.")]
    wrong = [f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})"
             for k, v in model_state.items() if k in state_dict and state_dict[k].shape != v.shape]
    not_float = [f"{k} ({state_dict[k].dtype})" for k in model_state
                 if k in state_dict and not state_dict[k].is_floating_point()]
    if not (missing or unexpected or wrong or not_float):
        return
    parts = [f"checkpoint {source} does not match the model config {config.to_dict()} "
             + option(f"(use_fov={use_fov}):", "(with its FOV network):" if use_fov
                      else "(without a FOV network):")]
    if missing:
        parts.append(f"  {len(missing)} missing keys: {_short(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected keys: {_short(unexpected)}")
    if wrong:
        parts.append(f"  {len(wrong)} keys with wrong shapes: {_short(wrong, 5)}")
    if not_float:
        parts.append(f"  {len(not_float)} non-float tensors: {_short(not_float, 5)}")
    parts.append(f"  ({guess_config(state_dict)}; pass the matching "
                 f"{option('config=', '--config')})")
    raise CheckpointError("\n".join(parts))
