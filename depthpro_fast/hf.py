"""Hugging Face ``DepthPro-hf`` weights <-> Apple's key layout (spec: hf-mapping.md).

The transformers port (``DepthProForDepthEstimation``) stores the same tensors under other
names. Every tensor is a plain rename except the ViT attention's fused ``qkv`` (Apple), which
HF keeps as three row blocks q, k, v. No transposes. Two HF naming generations exist and both
are read:

* transformers 4.x and the hub's ``model.safetensors``: ``attention.attention.{query,key,value}``
  and ``attention.output.dense``;
* transformers 5.x (in memory): ``attention.{q,k,v}_proj`` and ``attention.o_proj``.

``hf_to_apple`` accepts either (even mixed); ``apple_to_hf`` writes the hub names by default.
Each rule below is written once, as a pair of templates, and used in both directions; the index
changes between the two layouts (``1 - n``, ``2 - n``, ``4 - n``) are their own inverses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

HF_PREFIXES = ("depth_pro.", "fusion_stage.", "fov_model.", "head.layers.")
NAMINGS = ("4.x", "5.x")  # "4.x" = the hub files' names

# Apple ViT prefix -> HF ViT prefix (the three backbones share the inner rules)
_VIT_PREFIXES = {
    "encoder.patch_encoder.": "depth_pro.encoder.patch_encoder.model.",
    "encoder.image_encoder.": "depth_pro.encoder.image_encoder.model.",
    "fov.encoder.0.": "fov_model.fov_encoder.model.",
}
_QKV_NAMES = {"4.x": ("query", "key", "value"), "5.x": ("q", "k", "v")}


@dataclass(frozen=True)
class _Rule:
    """``apple`` and ``hf`` (one template per naming generation) with ``{name}`` fields: digits,
    or ``{p}`` = weight|bias. ``flip`` maps a field's Apple value to its HF value (an
    involution). ``qkv`` rules split one Apple tensor into the ``{part}`` fields of HF."""

    apple: str
    hf: tuple[str, str]
    flip: dict[str, Callable[[int], int]] = field(default_factory=dict)
    qkv: bool = False


def _rule(apple: str, hf: str | tuple[str, str], qkv: bool = False,
          **flip: Callable[[int], int]) -> _Rule:
    return _Rule(apple, (hf, hf) if isinstance(hf, str) else hf, flip, qkv)


_VIT_RULES = [
    _rule("cls_token", "embeddings.cls_token"),
    _rule("pos_embed", "embeddings.position_embeddings"),
    _rule("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    _rule("blocks.{i}.norm{a}.{p}", "encoder.layer.{i}.norm{a}.{p}"),
    _rule("blocks.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.attention.{part}.{p}",
                                      "encoder.layer.{i}.attention.{part}_proj.{p}"), qkv=True),
    _rule("blocks.{i}.attn.proj.{p}", ("encoder.layer.{i}.attention.output.dense.{p}",
                                       "encoder.layer.{i}.attention.o_proj.{p}")),
    _rule("blocks.{i}.ls{a}.gamma", "encoder.layer.{i}.layer_scale{a}.lambda1"),
    _rule("blocks.{i}.mlp.fc{a}.{p}", "encoder.layer.{i}.mlp.fc{a}.{p}"),
    _rule("norm.{p}", "layernorm.{p}"),
]

_NECK = "depth_pro.neck."
_OTHER_RULES = [
    _rule("encoder.upsample_latent{n}.{j}.weight",
          _NECK + "feature_upsample.intermediate.{n}.layers.{j}.weight", n=lambda v: 1 - v),
    _rule("encoder.upsample{n}.{j}.weight",
          _NECK + "feature_upsample.scaled_images.{n}.layers.{j}.weight", n=lambda v: 2 - v),
    _rule("encoder.upsample_lowres.{p}", _NECK + "feature_upsample.image_block.layers.0.{p}"),
    _rule("encoder.fuse_lowres.{p}", _NECK + "fuse_image_with_low_res.{p}"),
    _rule("decoder.convs.{n}.weight", _NECK + "feature_projection.projections.{n}.weight",
          n=lambda v: 4 - v),
    # decoder fusion 0 is HF's "final" block; fusions 1..4 are "intermediate.{4 - n}"
    _rule("decoder.fusions.0.resnet{r}.residual.1.{p}",
          "fusion_stage.final.residual_layer{r}.convolution1.{p}"),
    _rule("decoder.fusions.0.resnet{r}.residual.3.{p}",
          "fusion_stage.final.residual_layer{r}.convolution2.{p}"),
    _rule("decoder.fusions.0.out_conv.{p}", "fusion_stage.final.projection.{p}"),
    _rule("decoder.fusions.{n}.resnet{r}.residual.1.{p}",
          "fusion_stage.intermediate.{n}.residual_layer{r}.convolution1.{p}", n=lambda v: 4 - v),
    _rule("decoder.fusions.{n}.resnet{r}.residual.3.{p}",
          "fusion_stage.intermediate.{n}.residual_layer{r}.convolution2.{p}", n=lambda v: 4 - v),
    _rule("decoder.fusions.{n}.deconv.weight", "fusion_stage.intermediate.{n}.deconv.weight",
          n=lambda v: 4 - v),
    _rule("decoder.fusions.{n}.out_conv.{p}", "fusion_stage.intermediate.{n}.projection.{p}",
          n=lambda v: 4 - v),
    _rule("head.{k}.{p}", "head.layers.{k}.{p}"),
    _rule("fov.encoder.1.{p}", "fov_model.fov_encoder.neck.{p}"),
    _rule("fov.downsample.0.{p}", "fov_model.conv.{p}"),
    _rule("fov.head.{k}.{p}", "fov_model.head.layers.{k}.{p}"),
]

RULES: list[_Rule] = [
    _Rule(a_prefix + r.apple, (h_prefix + r.hf[0], h_prefix + r.hf[1]), r.flip, r.qkv)
    for a_prefix, h_prefix in _VIT_PREFIXES.items() for r in _VIT_RULES
] + _OTHER_RULES


def _compile(template: str) -> re.Pattern[str]:
    """``a.{i}.{p}`` -> a regex with named groups (digits; weight|bias; q/k/v names)."""
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{p\}", r"(?P<p>weight|bias)")
    pattern = pattern.replace(r"\{part\}", r"(?P<part>query|key|value|q|k|v)")
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pattern)
    return re.compile(pattern + r"\Z")


_APPLE_RE = [(_compile(r.apple), r) for r in RULES]
_HF_RE = [(_compile(t), r) for r in RULES for t in dict.fromkeys(r.hf)]


def _flip(fields: dict[str, str], rule: _Rule) -> dict[str, str] | None:
    """Apply the rule's index changes; None if an index leaves the valid range."""
    out = dict(fields)
    for name, fn in rule.flip.items():
        value = fn(int(fields[name]))
        if value < 0:
            return None
        out[name] = str(value)
    return out


def _first_rule(table: list[tuple[re.Pattern[str], _Rule]], key: str,
                ) -> tuple[_Rule, dict[str, str]] | None:
    """(rule, its index fields after ``_flip``) of the first rule of ``table`` that matches
    ``key``; None when none matches, or when the first match's index leaves the valid range."""
    for regex, rule in table:
        m = regex.match(key)
        if m is not None:
            fields = _flip(m.groupdict(), rule)
            return None if fields is None else (rule, fields)
    return None


def is_hf_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True if the keys are in the Hugging Face layout (any key with an HF-only prefix)."""
    return any(isinstance(k, str) and k.startswith(HF_PREFIXES) for k in state_dict)


def apple_key_to_hf(key: str, naming: str = "4.x") -> list[str] | None:
    """The HF key(s) of one Apple key (three for a fused qkv), or None if it has no rule."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    found = _first_rule(_APPLE_RE, key)
    if found is None:
        return None
    rule, fields = found
    template = rule.hf[NAMINGS.index(naming)]
    if rule.qkv:
        return [template.format(**fields, part=part) for part in _QKV_NAMES[naming]]
    return [template.format(**fields)]


def hf_key_to_apple(key: str) -> tuple[str, int | None] | None:
    """(Apple key, qkv row block 0/1/2 or None) of one HF key, or None if it has no rule."""
    found = _first_rule(_HF_RE, key)
    if found is None:
        return None
    rule, fields = found
    part = fields.pop("part", None)
    block = None
    if part is not None:
        block = next(i for names in _QKV_NAMES.values() for i, n in enumerate(names)
                     if n == part)
    return rule.apple.format(**fields), block


def apple_to_hf(state_dict: Mapping[str, torch.Tensor], naming: str = "4.x",
                ) -> dict[str, torch.Tensor]:
    """Apple's state dict -> the HF layout (``naming`` "4.x" = the hub files, or "5.x").

    The q, k, v tensors are copies (not views of qkv), so the result can be saved with
    safetensors."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        hf_keys = apple_key_to_hf(key, naming)
        if hf_keys is None:
            unknown.append(key)
        elif len(hf_keys) == 3:
            if value.shape[0] % 3:
                raise ValueError(f"{key}: a fused qkv tensor needs a first dimension divisible "
                                 f"by 3, got shape {list(value.shape)}")
            for hf_key, block in zip(hf_keys, value.chunk(3, dim=0), strict=True):
                out[hf_key] = block.clone()
        else:
            out[hf_keys[0]] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no Hugging Face equivalent: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    return out


def hf_to_apple(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``DepthPro-hf`` state dict (transformers 4.x / hub or 5.x names) -> Apple's layout.

    q, k and v are concatenated back into qkv. ``embeddings.mask_token`` (present when the HF
    model was built with ``use_mask_token=True``; DepthPro never uses it) is dropped. Raises
    ``ValueError`` listing keys that have no Apple equivalent or incomplete q/k/v triples."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    unknown, duplicate = [], []
    for key, value in state_dict.items():
        if key.endswith("embeddings.mask_token"):
            continue
        mapped = hf_key_to_apple(key)
        if mapped is None:
            unknown.append(key)
            continue
        apple_key, block = mapped
        if block is None:
            if apple_key in out:
                duplicate.append(key)
            out[apple_key] = value
        else:
            parts = qkv.setdefault(apple_key, {})
            if block in parts:
                duplicate.append(key)
            parts[block] = value
    incomplete = [k for k, parts in qkv.items() if len(parts) != 3]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys with no DepthPro equivalent: "
                        f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    if duplicate:
        problems.append(f"keys given twice (old and new names?): {', '.join(duplicate[:8])}")
    if incomplete:
        problems.append(f"incomplete q/k/v triples for {', '.join(incomplete[:8])}")
    if problems:
        raise ValueError("not a DepthPro-hf state dict: " + "; ".join(problems))
    for apple_key, parts in qkv.items():
        out[apple_key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out
