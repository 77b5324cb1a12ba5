"""InfiniteVL (and, with an all-full-attention layer pattern, the Qwen2.5-VL teacher) for conditional generation.

``model(input_ids, pixel_values, image_grid_thw, ...)`` validates and prepares its inputs on the host (positions,
segment ids, vision layouts) and then runs ``model.forward``, which takes only arrays and is what training and
inference jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.config import InfiniteVLConfig, TextConfig
from infinitevl_jax.modeling.decoder import HybridStack
from infinitevl_jax.modeling.layers import linear
from infinitevl_jax.modeling.norms import RMSNorm
from infinitevl_jax.modeling.rope import mrope_cos_sin
from infinitevl_jax.modeling.vision import VisionTower, check_grids, vision_layout
from infinitevl_jax.positions import compute_positions


class LanguageModel(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype=None, param_dtype=jnp.float32, remat_policy="none",
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
        )
        self.embed_tokens.embedding.set_metadata(logical_axes=("vocab", "embed"))
        self.layers = HybridStack(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, inputs_embeds: jax.Array, *, position_ids: jax.Array, segment_ids: jax.Array | None):
        """``inputs_embeds [B,T,E]``, ``position_ids [3,B,T]`` -> final-normed hidden states ``[B,T,E]``."""
        c = self.config
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        h = self.layers(inputs_embeds, cos=cos, sin=sin, segment_ids=segment_ids)
        return self.norm(h)

    def step(self, inputs_embeds, *, position_ids, segment_ids, q_positions, caches):
        """Cached forward (inference): ``q_positions [B,T]`` sequence indices (-1 padding); ``caches`` as
        ``HybridStack.step``. Returns ``(final-normed hidden [B,T,E], new caches)``."""
        c = self.config
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        h, caches = self.layers.step(inputs_embeds, cos=cos, sin=sin, segment_ids=segment_ids,
                                     q_positions=q_positions, caches=caches)
        return self.norm(h), caches


class InfiniteVLForConditionalGeneration(nnx.Module):
    def __init__(self, config: InfiniteVLConfig, *, dtype=None, param_dtype=jnp.float32, remat_policy: str = "none",
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = LanguageModel(config.text, dtype=dtype, param_dtype=param_dtype,
                                            remat_policy=remat_policy, rngs=rngs)
        self.lm_head = nnx.data(None)
        if not config.text.tie_word_embeddings:
            self.lm_head = linear(config.text.hidden_size, config.text.vocab_size, ("embed", "vocab"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ jittable pieces
    def embed(self, input_ids, *, pixel_values=None, image_layout=None, pixel_values_videos=None, video_layout=None):
        """Token embeddings with image/video features written over their pad tokens, in order."""
        c = self.config
        h = self.language_model.embed_tokens(input_ids)
        for pixels, layout, token in ((pixel_values, image_layout, c.image_token_id),
                                      (pixel_values_videos, video_layout, c.video_token_id)):
            if pixels is None:
                continue
            feats = self.visual(pixels, layout).astype(h.dtype)  # [M, E]
            hit = input_ids == token
            idx = jnp.cumsum(hit.reshape(-1)).reshape(hit.shape) - 1
            idx = jnp.clip(idx, 0, feats.shape[0] - 1)
            h = jnp.where(hit[..., None], feats[idx], h)
        return h

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids, *, position_ids, segment_ids=None, **vision) -> jax.Array:
        h = self.embed(input_ids, **vision)
        return self.language_model(h, position_ids=position_ids, segment_ids=segment_ids)

    def forward(self, input_ids, *, position_ids, segment_ids=None, **vision) -> jax.Array:
        """Arrays only (jittable): ``input_ids [B,T]``, ``position_ids [3,B,T]``, ``segment_ids [B,T]`` (0 = padding),
        and optionally ``pixel_values``/``image_layout``, ``pixel_values_videos``/``video_layout``. -> logits ``[B,T,V]``."""
        return self.logits(self.hidden_states(input_ids, position_ids=position_ids, segment_ids=segment_ids, **vision))

    def step(self, inputs_embeds, *, position_ids, segment_ids, q_positions, caches):
        """Cached forward of embeddings (jittable; ``infinitevl_jax.inference`` drives it). -> ``(hidden, caches)``."""
        return self.language_model.step(inputs_embeds, position_ids=position_ids, segment_ids=segment_ids,
                                        q_positions=q_positions, caches=caches)

    # ------------------------------------------------------------------ host-side entry point
    def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None, second_per_grid_ts=None, attention_mask=None, position_ids=None,
                 segment_ids=None) -> jax.Array:
        inputs = prepare_inputs(
            self.config, input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask, position_ids=position_ids,
            segment_ids=segment_ids,
        )
        return self.forward(**inputs)


def prepare_inputs(config: InfiniteVLConfig, input_ids, *, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, attention_mask=None,
                   position_ids=None, segment_ids=None, pad_patches_to: int | None = None,
                   pad_video_patches_to: int | None = None) -> dict[str, Any]:
    """Validates model inputs on the host and computes what ``forward`` needs.

    Raises ``ValueError`` naming the problem: token ids outside the vocabulary, image/video pad-token counts not
    matching the grids, grids not matching the patch rows or not divisible by the merge size.
    Segment ids: given ones are kept (0 = padding); otherwise 1 on real tokens and 0 on padding.
    Positions (when not given) follow the release's M-RoPE rule, restarting at 0 in each segment.
    """
    c = config
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= c.text.vocab_size):
        bad = ids[(ids < 0) | (ids >= c.text.vocab_size)]
        raise ValueError(f"input_ids contain {bad.size} token id(s) outside the vocabulary [0, {c.text.vocab_size}), "
                         f"e.g. {int(bad[0])}")
    B, T = ids.shape
    if segment_ids is None:
        mask = np.ones((B, T), np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        seg = mask
    else:
        seg = np.asarray(segment_ids).astype(np.int32)
        if seg.shape != ids.shape:
            raise ValueError(f"segment_ids shape {seg.shape} does not match input_ids shape {ids.shape}")
        if attention_mask is not None:
            seg = seg * np.asarray(attention_mask).astype(np.int32)

    out: dict[str, Any] = {"input_ids": jnp.asarray(ids, jnp.int32), "segment_ids": jnp.asarray(seg)}
    merge = c.vision.merge_unit
    spans = []
    for name, pixels, grids, token, pad_to in (
        ("image", pixel_values, image_grid_thw, c.image_token_id, pad_patches_to),
        ("video", pixel_values_videos, video_grid_thw, c.video_token_id, pad_video_patches_to),
    ):
        n_tokens = int(np.sum((ids == token) & (seg > 0)))
        if pixels is None:
            if n_tokens:
                raise ValueError(f"input_ids contain {n_tokens} {name} pad token(s) but no {name} pixels were given")
            grids = np.zeros((0, 3), np.int64)
        else:
            if grids is None:
                raise ValueError(f"{name} pixels given without {name}_grid_thw")
            grids = np.asarray(grids)
            pixels = np.asarray(pixels)
            check_grids(grids, pixels.shape[0], c.vision)
            expected = int(np.sum(np.prod(grids, axis=1)) // merge)
            if n_tokens != expected:
                raise ValueError(f"input_ids contain {n_tokens} {name} pad token(s) but {name}_grid_thw "
                                 f"{grids.tolist()} needs {expected}")
            layout = vision_layout(grids, c.vision, pad_to=pad_to)
            if pad_to is not None:  # bucket padding: rows past the real patches are masked by the layout
                pixels = np.concatenate([pixels, np.zeros((pad_to - pixels.shape[0], pixels.shape[1]), pixels.dtype)])
            key = "pixel_values" if name == "image" else "pixel_values_videos"
            out[key] = jnp.asarray(pixels)
            out[f"{name}_layout"] = layout
        spans.append(grids)

    if position_ids is None:
        position_ids = compute_positions(c, ids, seg, spans[0], spans[1], second_per_grid_ts)
    else:
        position_ids = np.asarray(position_ids)
        if position_ids.shape != (3, B, T):
            raise ValueError(f"position_ids must be [3, batch, seq] = {(3, B, T)}, got {position_ids.shape}")
    out["position_ids"] = jnp.asarray(position_ids, jnp.int32)
    return out
