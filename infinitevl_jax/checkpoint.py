"""Loading Hugging Face state dicts into the NNX model (both key layouts, both model types, tied head or not)."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax import hf_names


class CheckpointMismatchError(ValueError):
    """Missing, unexpected or mis-shaped tensors; the message lists every one of them."""


def load_hf_state_dict(model, state_dict: Mapping[str, object], *, strict: bool = True) -> None:
    """Fills ``model`` (an ``InfiniteVLForConditionalGeneration``) from HF names -> arrays (numpy, torch or jax).

    Accepts the current (``model.language_model.*``, ``model.visual.*``) and legacy (``model.layers.*``,
    ``visual.*``) layouts. ``lm_head.weight`` may be absent when the embeddings are tied (and is ignored if present
    and tied). Every missing, unexpected or mis-shaped key is reported in one ``CheckpointMismatchError``.
    """
    config = model.config
    table = {e.hf: e for e in hf_names.entries(config)}
    found: dict[str, object] = {}
    unexpected = []
    for name, value in state_dict.items():
        canon = hf_names.canonical_name(name)
        if canon is None or canon not in table:
            if canon == "lm_head.weight" and config.text.tie_word_embeddings:
                continue  # tied head stored explicitly
            unexpected.append(name)
        else:
            found[canon] = value
    missing = sorted(set(table) - set(found))
    misshaped = []
    for canon, value in found.items():
        shape = tuple(value.shape)
        if shape != table[canon].hf_shape:
            misshaped.append(f"{canon.split(':', 1)[-1]}: checkpoint {shape}, model expects {table[canon].hf_shape}")
    if strict and (missing or unexpected or misshaped):
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing: " + ", ".join(m.split(":", 1)[-1] for m in missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected: " + ", ".join(sorted(unexpected)[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        if misshaped:
            lines.append(f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped[:20]))
        raise CheckpointMismatchError("checkpoint does not match the model config:\n  " + "\n  ".join(lines))

    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    values: dict[tuple, np.ndarray] = {}
    for canon, value in found.items():
        entry = table[canon]
        array = hf_names.TRANSFORMS[entry.kind][0](to_numpy(value))
        if entry.index is None:
            values[entry.path] = array
        else:
            if entry.path not in values:  # stacked over layers: fill one slice per checkpoint tensor
                values[entry.path] = np.array(flat[entry.path][...], dtype=np.float32)
            values[entry.path][entry.index] = array
    nnx.update(model, nnx.from_flat_state(
        [(path, var.replace(jnp.asarray(values[path], var.dtype))) for path, var in flat.items() if path in values]
    ))


def to_numpy(value) -> np.ndarray:
    """numpy / jax / torch (any dtype, bf16 included) -> float32 numpy (or the integer dtype as is)."""
    if hasattr(value, "detach"):  # torch
        import torch

        t = value.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    a = np.asarray(value)
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
        a = a.astype(np.float32)
    return a
