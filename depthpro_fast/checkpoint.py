"""Finding and reading checkpoints, and strict key checks with readable errors.

Apple's ``depth_pro.pt`` is a pickled dict of fp16 tensors. It is read with
``torch.load(weights_only=True)`` (never executes code) and memory-mapped where possible.
"""

from __future__ import annotations

import dataclasses
import functools
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


def no_fov_advice() -> str:
    """How to load a checkpoint without the FOV network (the focal length is then needed)."""
    return (option("use_fov=False", 'a JSON --config of its knobs with "use_fov": false')
            + " and give the focal length (" + option("f_px", "--f-px") + ")")


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
    """A human-readable guess of the knobs a state dict was made with (for error messages).

    Each knob is read from its own keys, so a file that lacks a few keys still gets a guess of
    the others; only a dict with none of them is said not to look like DepthPro's."""
    prefix = "encoder.patch_encoder."
    found: list[str] = []

    def shape(key: str, dim: int) -> int | None:
        t = state_dict.get(key)
        return int(t.shape[dim]) if isinstance(t, torch.Tensor) and t.dim() > dim else None

    e = shape(prefix + "cls_token", -1)
    if e is not None:
        found.append(f"embed_dim={e}")
    depth = len({k.split(".")[3] for k in state_dict
                 if k.startswith(prefix + "blocks.") and len(k.split(".")) > 3})
    if depth:
        found.append(f"depth={depth}")
    hidden = shape(prefix + "blocks.0.mlp.fc1.weight", 0)
    if hidden is not None and e:
        found.append(f"mlp_ratio={hidden / e:g}")
    dims = [shape(k, 0) for k in ("encoder.upsample_latent1.0.weight",
                                  *(f"encoder.upsample{i}.0.weight" for i in (0, 1, 2)))]
    if all(d is not None for d in dims):
        found.append(f"encoder_feature_dims={dims}")
    d = shape("decoder.convs.1.weight", 0)
    if d is not None:
        found.append(f"decoder_features={d}")
    if not found:
        return "it does not look like a DepthPro state dict"
    has_fov = any(k.startswith("fov.") for k in state_dict)
    return (f"its shapes suggest {', '.join(found)}, "
            f"FOV network {'present' if has_fov else 'absent'}")


@dataclasses.dataclass(frozen=True)
class KeyDiff:
    """How a state dict differs from a model's: keys missing, unexpected, wrongly shaped,
    not floating point (each a list of readable entries)."""

    missing: list[str]
    unexpected: list[str]
    wrong: list[str]
    not_float: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong or self.not_float)

    @property
    def only_missing(self) -> bool:
        """Every key the file has is right: it is the model's state dict, less some keys."""
        return bool(self.missing) and not (self.unexpected or self.wrong or self.not_float)


def diff_keys(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
              use_fov: bool = True) -> KeyDiff:
    """Compare a state dict with a model's, key by key and shape by shape."""
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    if not use_fov:  # a checkpoint with an FOV branch loads into a model without one
        unexpected = [k for k in unexpected if not k.startswith("fov.")]
    wrong = [f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})"
             for k, v in model_state.items() if k in state_dict and state_dict[k].shape != v.shape]
    not_float = [f"{k} ({state_dict[k].dtype})" for k in model_state
                 if k in state_dict and not state_dict[k].is_floating_point()]
    return KeyDiff(missing, unexpected, wrong, not_float)


@functools.cache
def _preset_shapes(name: str) -> dict[str, torch.Size]:
    """Key -> shape of a preset's model with its FOV network (built on meta: no memory)."""
    from .config import PRESETS
    from .model import DepthPro

    with torch.device("meta"):
        model = DepthPro(PRESETS[name], use_fov=True)
    return {k: v.shape for k, v in model.state_dict().items()}


def matching_preset(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, bool, list[str]] | None:
    """The preset whose keys and shapes the state dict has: ``(name, with FOV network, missing
    keys)``; ``missing`` is empty for a complete file, else the keys an incomplete file lacks
    (every key it has being that preset's, in shape too). None when no preset fits."""
    from .config import PRESETS

    shapes = {k: v.shape for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    best = None
    for name in PRESETS:
        full = _preset_shapes(name)
        if any(k not in full or full[k] != v for k, v in shapes.items()):
            continue
        has_fov = any(k.startswith("fov.") for k in shapes)
        wanted = {k for k in full if has_fov or not k.startswith("fov.")}
        missing = [k for k in full if k in wanted and k not in shapes]
        # a file that has only some keys can fit several presets by name alone: the one it
        # fills most is meant (shapes decide almost always: embed_dim differs)
        if best is None or len(missing) < len(best[2]):
            best = (name, has_fov, missing)
    return best


def _preset_advice(found: tuple[str, bool, list[str]], config: DepthProConfig,
                   use_fov: bool) -> str | None:
    """One line naming the preset a mismatching file was made for, or None (it is this one)."""
    from .config import PRESETS

    name, has_fov, missing = found
    if dataclasses.replace(config, use_fov=True) == PRESETS[name]:
        return None  # the config is right; the caller reports what the file lacks
    fov = "" if has_fov or not use_fov else f", without a FOV network ({no_fov_advice()})"
    if missing:
        return (f"  its keys and shapes are those of the preset {name!r}{fov}, but it lacks "
                f"{len(missing)} of them ({_short(missing, 3)}): pass "
                f"{option(f'config={name!r}', f'--config {name}')} and a complete file")
    return (f"  these are the weights of the preset {name!r}{fov} (all its keys, every shape "
            f"matches): pass {option(f'config={name!r}', f'--config {name}')}")


def check_keys(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
               config: DepthProConfig, use_fov: bool, source: str) -> None:
    """Raise one ``CheckpointError`` that says what is wrong: the preset the file's shapes
    match (the config is then the mistake), the keys an incomplete file lacks (the config is
    right, the file is not), or missing, unexpected and wrongly shaped keys with a guess of
    the file's knobs."""
    diff = diff_keys(model_state, state_dict, use_fov)
    if not diff:
        return
    with_fov = option(f"(use_fov={use_fov})", "(with its FOV network)" if use_fov
                      else "(without a FOV network)")
    if diff.only_missing:
        if use_fov and all(k.startswith("fov.") for k in diff.missing) \
                and not any(k.startswith("fov.") for k in state_dict):
            raise CheckpointError(
                f"checkpoint {source} has no FOV network (no fov.* keys; the rest matches "
                f"the model config): load it with {no_fov_advice()}")
        n = len(model_state)
        raise CheckpointError(
            f"checkpoint {source} is incomplete: it lacks {len(diff.missing)} of the {n} keys "
            f"of the model config {with_fov}: {_short(diff.missing)}. Every key it has matches "
            "that config in name and shape, so the config is right and the file is cut short "
            "(an interrupted save, copy or conversion?); get the complete file "
            "(`depthpro-fast download` fetches and checks Apple's).")
    parts = [f"checkpoint {source} does not match the model config {config.to_dict()} "
             + option(f"(use_fov={use_fov}):", "(with its FOV network):" if use_fov
                      else "(without a FOV network):")]
    found = matching_preset(state_dict)
    advice = None if found is None else _preset_advice(found, config, use_fov)
    if advice:
        parts.append(advice)
    if diff.missing:
        parts.append(f"  {len(diff.missing)} missing keys: {_short(diff.missing)}")
    if diff.unexpected:
        parts.append(f"  {len(diff.unexpected)} unexpected keys: {_short(diff.unexpected)}")
    if diff.wrong:
        parts.append(f"  {len(diff.wrong)} keys with wrong shapes: {_short(diff.wrong, 5)}")
    if diff.not_float:
        parts.append(f"  {len(diff.not_float)} non-float tensors: {_short(diff.not_float, 5)}")
    if not advice:
        parts.append(f"  ({guess_config(state_dict)}; pass the matching "
                     f"{option('config=', '--config')})")
    raise CheckpointError("\n".join(parts))
