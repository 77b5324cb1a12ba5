"""The Hugging Face <-> infinitevl-jax name map (both directions), generated from the config.

Each ``Entry`` ties one Hugging Face tensor (canonical name, i.e. without the ``model.language_model.`` /
``model.visual.`` prefixes) to one of our parameters: its NNX path, the index along the stacked-layer axis (or None)
and a layout ``kind`` whose forward/inverse transforms live in ``TRANSFORMS``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from infinitevl_jax.config import GDN, InfiniteVLConfig, VisionConfig
from infinitevl_jax.modeling.decoder import layer_period


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # canonical HF name, e.g. "text:layers.3.self_attn.q_proj.weight" or "vision:blocks.0.attn.qkv.bias"
    path: tuple  # our NNX state path, e.g. ("language_model", "layers", "blocks", "layers", 3, "self_attn", ...)
    index: int | None  # position along the stacked leading axis, None for unstacked parameters
    kind: str  # key of TRANSFORMS
    hf_shape: tuple[int, ...]


def _t(a):
    return np.swapaxes(a, -1, -2)


# kind -> (HF -> ours, ours -> HF given the HF shape)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda a, shape: a),
    "linear": (_t, lambda a, shape: _t(a)),  # torch Linear [out, in] <-> our kernel [in, out]
    "conv1d": (lambda a: a[:, 0, :].T, lambda a, shape: a.T[:, None, :]),  # depthwise [C,1,W] <-> [W,C]
    "patch_embed": (lambda a: a.reshape(a.shape[0], -1).T, lambda a, shape: a.T.reshape(shape)),  # Conv3d as Linear
}


def text_entries(config: InfiniteVLConfig) -> Iterator[Entry]:
    t = config.text
    period = layer_period(t.layer_types)
    lm = ("language_model",)
    yield Entry("text:embed_tokens.weight", lm + ("embed_tokens", "embedding"), None, "copy", (t.vocab_size, t.hidden_size))
    yield Entry("text:norm.weight", lm + ("norm", "scale"), None, "copy", (t.hidden_size,))
    if not t.tie_word_embeddings:
        yield Entry("lm_head.weight", ("lm_head", "kernel"), None, "linear", (t.vocab_size, t.hidden_size))
    E, I = t.hidden_size, t.intermediate_size
    for i, kind in enumerate(t.layer_types):
        base = lm + ("layers", "blocks", "layers", i % period)
        blk = i // period

        def e(name, sub, k, shape):
            return Entry(f"text:layers.{i}.{name}", base + sub, blk, k, shape)

        yield e("input_layernorm.weight", ("input_layernorm", "scale"), "copy", (E,))
        yield e("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "copy", (E,))
        for proj, shape in (("gate_proj", (I, E)), ("up_proj", (I, E)), ("down_proj", (E, I))):
            yield e(f"mlp.{proj}.weight", ("mlp", proj, "kernel"), "linear", shape)
        a = ("self_attn",)
        if kind == GDN:
            H, K, V = t.num_linear_heads, t.linear_head_dim, t.linear_value_dim
            for proj, shape in (("q_proj", (H * K, E)), ("k_proj", (H * K, E)), ("v_proj", (H * V, E)),
                                ("a_proj", (H, E)), ("b_proj", (H, E)), ("g_proj", (H * V, E)),
                                ("o_proj", (E, H * V))):
                yield e(f"self_attn.{proj}.weight", a + (proj, "kernel"), "linear", shape)
            yield e("self_attn.A_log", a + ("A_log",), "copy", (H,))
            yield e("self_attn.dt_bias", a + ("dt_bias",), "copy", (H,))
            for conv, ch in (("q_conv1d", H * K), ("k_conv1d", H * K), ("v_conv1d", H * V)):
                yield e(f"self_attn.{conv}.weight", a + (conv,), "conv1d", (ch, 1, t.conv_size))
            yield e("self_attn.o_norm.weight", a + ("o_norm",), "copy", (V,))
        else:
            Hq, Hkv, D = t.num_attention_heads, t.num_key_value_heads, t.head_dim
            for proj, n in (("q_proj", Hq * D), ("k_proj", Hkv * D), ("v_proj", Hkv * D)):
                yield e(f"self_attn.{proj}.weight", a + (proj, "kernel"), "linear", (n, E))
                yield e(f"self_attn.{proj}.bias", a + (proj, "bias"), "copy", (n,))
            yield e("self_attn.o_proj.weight", a + ("o_proj", "kernel"), "linear", (E, Hq * D))


def vision_entries(v: VisionConfig, root: tuple = ("visual",)) -> Iterator[Entry]:
    """The vision tower's tensors; ``root`` is the tower's path in the model (``()`` for a bare tower)."""
    h, I, M = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    vis = root
    yield Entry("vision:patch_embed.proj.weight", vis + ("patch_embed", "kernel"), None, "patch_embed",
                (h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    for n in range(v.depth):
        def e(name, sub, kind, shape):
            return Entry(f"vision:blocks.{n}.{name}", vis + ("blocks",) + sub, n, kind, shape)

        yield e("norm1.weight", ("norm1", "scale"), "copy", (h,))
        yield e("norm2.weight", ("norm2", "scale"), "copy", (h,))
        for name, sub, out_f, in_f in (("attn.qkv", ("attn", "qkv"), 3 * h, h), ("attn.proj", ("attn", "proj"), h, h),
                                       ("mlp.gate_proj", ("mlp", "gate_proj"), I, h),
                                       ("mlp.up_proj", ("mlp", "up_proj"), I, h),
                                       ("mlp.down_proj", ("mlp", "down_proj"), h, I)):
            yield e(f"{name}.weight", sub + ("kernel",), "linear", (out_f, in_f))
            yield e(f"{name}.bias", sub + ("bias",), "copy", (out_f,))
    yield Entry("vision:merger.ln_q.weight", vis + ("merger", "ln_q", "scale"), None, "copy", (h,))
    for idx, out_f in ((0, M), (2, v.out_hidden_size)):
        yield Entry(f"vision:merger.mlp.{idx}.weight", vis + ("merger", f"mlp_{idx}", "kernel"), None, "linear", (out_f, M))
        yield Entry(f"vision:merger.mlp.{idx}.bias", vis + ("merger", f"mlp_{idx}", "bias"), None, "copy", (out_f,))


def entries(config: InfiniteVLConfig) -> list[Entry]:
    return list(text_entries(config)) + list(vision_entries(config.vision))


# ----------------------------------------------------------------------------------------------------- key layouts
_CURRENT = (("model.language_model.", "text:"), ("model.visual.", "vision:"), ("lm_head.", "lm_head."))
_LEGACY = (("model.", "text:"), ("visual.", "vision:"), ("lm_head.", "lm_head."))


def canonical_name(hf_name: str) -> str | None:
    """Maps a checkpoint key of either layout to its canonical name, None if it belongs to neither tower."""
    for prefix, tag in _CURRENT + _LEGACY:
        if hf_name.startswith(prefix):
            return tag + hf_name[len(prefix):]
    return None


def hf_name(canonical: str, layout: str = "current") -> str:
    """Canonical name -> checkpoint key in the ``"current"`` (transformers >= 4.52) or ``"legacy"`` layout."""
    table = _CURRENT if layout == "current" else _LEGACY
    for prefix, tag in table:
        if canonical.startswith(tag):
            return prefix + canonical[len(tag):]
    raise KeyError(canonical)


def detect_layout(names) -> str:
    return "current" if any(n.startswith("model.language_model.") for n in names) else "legacy"

