"""Typed configuration of InfiniteVL and of its Qwen2.5-VL teacher.

One config class serves both models: they differ only in ``TextConfig.layer_types`` (the layer pattern is data).
``InfiniteVLConfig.from_hf`` reads a Hugging Face ``config.json`` of ``model_type`` ``"infinite_vl"`` (the release) or
``"qwen2_5_vl"`` (the teacher), in the flat layout older transformers write and the nested ``text_config`` layout of
transformers 5, with ``rope_scaling`` or ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

logger = logging.getLogger(__name__)

# Canonical layer kinds.
SWA = "sliding_attention"
FULL = "full_attention"
GDN = "linear_attention"
LAYER_KINDS = (SWA, FULL, GDN)

# Spellings of layer kinds found in configs, mapped to the canonical names.
_LAYER_ALIASES = {
    "sliding_attention": SWA,
    "sliding_window_attention": SWA,
    "swa": SWA,
    "full_attention": FULL,
    "linear_attention": GDN,
    "gated_deltanet": GDN,
    "gated_delta_net": GDN,
    "gdn": GDN,
}


class ConfigError(ValueError):
    """A config value is unknown, unsupported or contradicts another one."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower (identical in teacher and student)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row of ``pixel_values``: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision_config.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim={self.head_dim} must be divisible by 4 (2D rotary over h and w)")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ConfigError(f"vision_config.window_size={self.window_size} is not a multiple of patch_size*merge={unit}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision_config.fullatt_block_indexes {bad} outside [0, depth={self.depth})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language stack. ``layer_types[i]`` is one of ``LAYER_KINDS``."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    layer_types: tuple[str, ...] = ()
    # Softmax attention (SWA and full layers).
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    sliding_window: int | None = 8192
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # Gated DeltaNet layers (class defaults of the release; absent from its config.json).
    num_linear_heads: int = 16
    linear_head_dim: int = 128
    expand_v: int = 2
    conv_size: int = 4
    use_gate: bool = True
    use_short_conv: bool = True
    linear_norm_eps: float = 1e-5

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", infinitevl_layer_types(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))

    @property
    def linear_value_dim(self) -> int:
        return self.linear_head_dim * self.expand_v

    @property
    def is_hybrid(self) -> bool:
        return GDN in self.layer_types

    def validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        unknown = sorted({t for t in self.layer_types if t not in LAYER_KINDS})
        if unknown:
            raise ConfigError(f"layer_types contains unsupported kinds {unknown}; supported: {list(LAYER_KINDS)}")
        if SWA in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types uses sliding_attention but sliding_window is not set")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)}, "
                f"but must be head_dim/2 = {self.head_dim // 2}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (rotary embedding)")
        if self.conv_size < 1:
            raise ConfigError(f"conv_size={self.conv_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class InfiniteVLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    model_type: str = "infinite_vl"
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    image_token_id: int = 151655
    video_token_id: int = 151656

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.text.validate()
        self.vision.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size={self.vision.out_hidden_size} != hidden_size={self.text.hidden_size}"
            )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary (vocab_size={self.text.vocab_size})")

    # ------------------------------------------------------------------ construction
    def replace(self, **changes) -> "InfiniteVLConfig":
        return dataclasses.replace(self, **changes)

    def with_layer_types(self, layer_types) -> "InfiniteVLConfig":
        """The same model with another layer pattern (e.g. the teacher's all-full-attention stack)."""
        return self.replace(text=dataclasses.replace(self.text, layer_types=tuple(layer_types)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InfiniteVLConfig":
        """Inverse of ``to_dict`` (our own serialisation): unknown keys are errors."""
        d = dict(d)
        text = _strict_dataclass(TextConfig, d.pop("text", {}), "text")
        vision = _strict_dataclass(VisionConfig, d.pop("vision", {}), "vision")
        top = _strict_dataclass(cls, {**d, "text": text, "vision": vision}, "config")
        return top

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "InfiniteVLConfig":
        """Reads a Hugging Face config (a directory, a ``config.json`` path or the parsed dict)."""
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no Hugging Face config at {path}")
            with open(path) as f:
                raw = json.load(f)
        return _from_hf_dict(raw)


def infinitevl_layer_types(num_layers: int, period: int = 4) -> tuple[str, ...]:
    """The release's default pattern: layer i is SWA if i % period == 0, else Gated DeltaNet."""
    return tuple(SWA if i % period == 0 else GDN for i in range(num_layers))


def _strict_dataclass(klass, values: Mapping[str, Any], where: str):
    if isinstance(values, klass):
        return values
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    out = {}
    for f in dataclasses.fields(klass):
        if f.name in values:
            v = values[f.name]
            if isinstance(v, list):
                v = tuple(v)
            out[f.name] = v
    return klass(**out)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config.json
# ---------------------------------------------------------------------------------------------------------------

# Keys this reader interprets; every other key (auto_map, torch_dtype, use_cache, ...) carries no model information
# and is ignored with one warning listing them.
_TEXT_KEYS = {
    "model_type", "text_config", "vision_config", "hidden_act", "rope_scaling", "rope_parameters", "rope_theta",
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "vocab_size", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "tie_word_embeddings", "num_linear_heads", "num_linear_key_value_heads", "linear_head_dim", "expand_v",
    "conv_size", "use_gate", "use_short_conv", "norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "image_token_id", "video_token_id",
}
_VISION_KEYS = {
    "hidden_act", "depth", "num_hidden_layers", "hidden_size", "embed_dim", "intermediate_size", "num_heads",
    "num_attention_heads", "in_channels", "in_chans", "patch_size", "spatial_patch_size", "temporal_patch_size",
    "spatial_merge_size", "window_size", "out_hidden_size", "fullatt_block_indexes", "tokens_per_second",
}


def _from_hf_dict(raw: Mapping[str, Any]) -> InfiniteVLConfig:
    model_type = raw.get("model_type")
    if model_type not in ("infinite_vl", "qwen2_5_vl"):
        raise ConfigError(f"model_type={model_type!r} is not supported; expected 'infinite_vl' or 'qwen2_5_vl'")
    # transformers 5 nests the text fields under text_config; older files keep them flat at the top.
    text_raw = dict(raw)
    if isinstance(raw.get("text_config"), Mapping):
        text_raw = {**{k: v for k, v in raw.items() if k != "text_config"}, **raw["text_config"]}
    vision_raw = dict(raw.get("vision_config") or {})

    ignored = sorted(set(text_raw) - _TEXT_KEYS) + [f"vision_config.{k}" for k in sorted(set(vision_raw) - _VISION_KEYS)]
    if ignored:
        logger.warning("config.json keys that do not affect the model are ignored: %s", ", ".join(ignored))

    act = text_raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    vact = vision_raw.get("hidden_act", "silu")
    if vact != "silu":
        raise ConfigError(f"vision_config.hidden_act={vact!r} is not supported (only 'silu')")

    rope = dict(text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"rope_scaling/rope_parameters type={rope_type!r} is not supported ('default'/'mrope' only)")
    rope_theta = rope.get("rope_theta", text_raw.get("rope_theta", 1_000_000.0))
    mrope_section = tuple(rope.get("mrope_section", (16, 24, 24)))

    num_layers = int(text_raw.get("num_hidden_layers", 36))
    hidden = int(text_raw.get("hidden_size", 2048))
    heads = int(text_raw.get("num_attention_heads", 16))
    head_dim = int(text_raw.get("head_dim") or hidden // heads)
    if hidden // heads != head_dim:
        raise ConfigError(f"head_dim={head_dim} contradicts hidden_size/num_attention_heads={hidden // heads}")

    sliding_window = text_raw.get("sliding_window")
    layer_types = text_raw.get("layer_types")
    if model_type == "infinite_vl":
        if layer_types is None:
            layer_types = infinitevl_layer_types(num_layers)
        # The release windows every softmax-attention layer (FlashAttention-2 with sliding_window).
        layer_types = [_canonical_layer(t, "attention", SWA) for t in layer_types]
        if sliding_window is None:
            sliding_window = 8192
    else:
        use_sw = bool(text_raw.get("use_sliding_window", False))
        if layer_types is None:
            max_window_layers = int(text_raw.get("max_window_layers", num_layers))
            layer_types = [SWA if use_sw and i >= max_window_layers else FULL for i in range(num_layers)]
        layer_types = [_canonical_layer(t, "attention", FULL) for t in layer_types]
        if SWA not in layer_types:
            sliding_window = None
        if GDN in layer_types:
            raise ConfigError("layer_types of a qwen2_5_vl config contains linear_attention layers")

    lin_heads = int(text_raw.get("num_linear_heads", 16))
    lin_kv_heads = text_raw.get("num_linear_key_value_heads")
    if lin_kv_heads is not None and int(lin_kv_heads) != lin_heads:
        raise ConfigError(
            f"num_linear_key_value_heads={lin_kv_heads} != num_linear_heads={lin_heads}: GQA in Gated DeltaNet "
            "is not supported"
        )
    for flag in ("use_gate", "use_short_conv"):
        if flag in text_raw and not text_raw[flag]:
            raise ConfigError(f"{flag}=False is not supported (the release uses True)")

    tie = text_raw.get("tie_word_embeddings", raw.get("tie_word_embeddings", True))
    text = TextConfig(
        vocab_size=int(text_raw.get("vocab_size", 151936)),
        hidden_size=hidden,
        intermediate_size=int(text_raw.get("intermediate_size", 11008)),
        num_hidden_layers=num_layers,
        layer_types=tuple(layer_types),
        num_attention_heads=heads,
        num_key_value_heads=int(text_raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        sliding_window=int(sliding_window) if sliding_window else None,
        rope_theta=float(rope_theta),
        mrope_section=mrope_section,
        rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(tie),
        num_linear_heads=lin_heads,
        linear_head_dim=int(text_raw.get("linear_head_dim", 128)),
        expand_v=int(text_raw.get("expand_v", 2)),
        conv_size=int(text_raw.get("conv_size", 4)),
        linear_norm_eps=float(text_raw.get("norm_eps", 1e-5)),
    )
    v = vision_raw
    vision = VisionConfig(
        depth=int(v.get("depth", v.get("num_hidden_layers", 32))),
        hidden_size=int(v.get("hidden_size", v.get("embed_dim", 1280))),
        intermediate_size=int(v.get("intermediate_size", 3420)),
        num_heads=int(v.get("num_heads", v.get("num_attention_heads", 16))),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", v.get("spatial_patch_size", 14))),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        window_size=int(v.get("window_size", 112)),
        out_hidden_size=int(v.get("out_hidden_size", hidden)),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=float(v.get("tokens_per_second", 2)),
    )
    ids = {}
    for name, default in (
        ("bos_token_id", 151643), ("eos_token_id", 151645), ("vision_start_token_id", 151652),
        ("vision_end_token_id", 151653), ("vision_token_id", 151654), ("image_token_id", 151655),
        ("video_token_id", 151656),
    ):
        value = raw.get(name, text_raw.get(name, default))
        if isinstance(value, (list, tuple)):  # eos may be a list; the first is the chat stop word
            value = value[0]
        ids[name] = int(value if value is not None else default)
    pad = raw.get("pad_token_id", text_raw.get("pad_token_id"))
    ids["pad_token_id"] = int(pad) if pad is not None else ids["bos_token_id"]
    return InfiniteVLConfig(text=text, vision=vision, model_type=model_type, **ids)


def _canonical_layer(kind: str, bare_attention: str, bare_kind: str) -> str:
    if kind == bare_attention:
        return bare_kind
    try:
        return _LAYER_ALIASES[kind]
    except KeyError:
        raise ConfigError(f"layer_types entry {kind!r} is not supported; known: {sorted(_LAYER_ALIASES)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def infinitevl_4b() -> InfiniteVLConfig:
    """The released InfiniteVL (4,408,381,536 parameters)."""
    return InfiniteVLConfig()


def qwen2_5_vl_3b() -> InfiniteVLConfig:
    """The Qwen2.5-VL-3B teacher (3,754,622,976 parameters): the same model, every layer full attention."""
    return InfiniteVLConfig(model_type="qwen2_5_vl", text=TextConfig(layer_types=(FULL,) * 36, sliding_window=None))


def tiny_vision(**overrides) -> VisionConfig:
    """A small tower with full- and window-attention blocks, windows of 2x2 merged tokens (56 px)."""
    base = dict(
        depth=4, hidden_size=32, intermediate_size=48, num_heads=2, window_size=56, out_hidden_size=64,
        fullatt_block_indexes=(1, 3),
    )
    base.update(overrides)
    return VisionConfig(**base)


def tiny_text(layer_types=None, **overrides) -> TextConfig:
    base = dict(
        vocab_size=151936 if overrides.pop("full_vocab", False) else 1024,
        hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=16, mrope_section=(2, 3, 3), num_linear_heads=2, linear_head_dim=16, expand_v=2,
    )
    base.update(overrides)
    if layer_types is not None:
        base["layer_types"] = tuple(layer_types)
    return TextConfig(**base)


def _tiny_token_ids(vocab: int) -> dict[str, int]:
    # Special ids at the top of a small vocabulary, in the release's order.
    return dict(
        bos_token_id=vocab - 13, eos_token_id=vocab - 11, pad_token_id=vocab - 13, vision_start_token_id=vocab - 6,
        vision_end_token_id=vocab - 5, vision_token_id=vocab - 4, image_token_id=vocab - 3, video_token_id=vocab - 2,
    )


def tiny_infinitevl(**text_overrides) -> InfiniteVLConfig:
    text = tiny_text(**text_overrides)
    return InfiniteVLConfig(text=text, vision=tiny_vision(out_hidden_size=text.hidden_size),
                            **_tiny_token_ids(text.vocab_size))


def tiny_qwen2_5_vl(**text_overrides) -> InfiniteVLConfig:
    text_overrides.setdefault("sliding_window", None)
    n = text_overrides.get("num_hidden_layers", 8)
    text = tiny_text(layer_types=(FULL,) * n, **text_overrides)
    return InfiniteVLConfig(text=text, vision=tiny_vision(out_hidden_size=text.hidden_size), model_type="qwen2_5_vl",
                            **_tiny_token_ids(text.vocab_size))


PRESETS = {
    "infinitevl_4b": infinitevl_4b,
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "tiny_infinitevl": tiny_infinitevl,
    "tiny_qwen2_5_vl": tiny_qwen2_5_vl,
}


def preset(name: str) -> InfiniteVLConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
