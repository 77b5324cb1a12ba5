"""The loss of each training stage, on a model built from (trainable + frozen) parameters.

Every function returns ``(loss_sum, target_count, aux)``; the step divides by the count summed over the global batch.

- ``layerwise`` (I-1): one teacher pass yields each layer's input and output; each student Gated DeltaNet layer runs on
  the teacher's input to that layer; loss = mean over those layers of MSE(student out, teacher out) x 1000.
- ``e2e`` (I-2): KL(teacher || student) at temperature T, times T^2, over real (non-padding) tokens.
- ``sft`` / ``lora`` (II / III): cross-entropy on answer tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.config import GDN
from infinitevl_jax.modeling.rope import mrope_cos_sin
from infinitevl_jax.training import losses

VISION_KEYS = ("pixel_values", "image_layout", "pixel_values_videos", "video_layout")


def _vision(batch):
    return {k: batch[k] for k in VISION_KEYS if k in batch}


def hidden(model, batch):
    return model.hidden_states(batch["input_ids"], position_ids=batch["position_ids"],
                               segment_ids=batch["segment_ids"], **_vision(batch))


def answer_ce(model, batch, chunk_size: int):
    """``(sum, count, correct [B,T])`` of next-token cross-entropy on the answer tokens."""
    labels = losses.shift_labels(batch["labels"], batch["segment_ids"])
    return losses.chunked_cross_entropy(hidden(model, batch), labels, model.logits, chunk_size=chunk_size)


def sft_loss(student, teacher, batch, cfg):
    total, count, _ = answer_ce(student, batch, cfg.loss.chunk_size)
    return total, count, {}


def e2e_loss(student, teacher, batch, cfg):
    hs = hidden(student, batch)
    ht = jax.lax.stop_gradient(hidden(teacher, batch))
    total, count = losses.chunked_kl(hs, ht, batch["segment_ids"] > 0, student.logits, teacher.logits,
                                     temperature=cfg.loss.temperature, chunk_size=cfg.loss.chunk_size)
    return total, count, {}


def teacher_layer_io(teacher, batch):
    """``(inputs [L,B,T,E], final [B,T,E])``: the input of every decoder layer of the teacher (layer i's output is
    ``inputs[i+1]``, the last one's is ``final``), before the final norm."""
    lm = teacher.language_model
    c = lm.config
    h = teacher.embed(batch["input_ids"], **_vision(batch))
    cos, sin = mrope_cos_sin(batch["position_ids"], c.head_dim, c.rope_theta, c.mrope_section)
    seg = batch["segment_ids"]

    def body(block, x):
        ins = []
        for layer in block.layers:
            ins.append(x)
            x = layer(x, cos=cos, sin=sin, segment_ids=seg)
        return x, jnp.stack(ins)

    final, ins = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(lm.layers.blocks, h)
    return ins.reshape(-1, *ins.shape[2:]), final


def layerwise_loss(student, teacher, batch, cfg):
    ins, final = teacher_layer_io(teacher, batch)
    ins, final = jax.lax.stop_gradient(ins), jax.lax.stop_gradient(final)
    outs = jnp.concatenate([ins[1:], final[None]])
    stack = student.language_model.layers
    kinds = student.config.text.layer_types
    period = stack.period
    seg = batch["segment_ids"]
    mask = (seg > 0)[..., None]
    total = jnp.zeros((), jnp.float32)
    n_layers = 0
    for slot in range(period):
        if kinds[slot] != GDN:
            continue
        n_layers += stack.num_blocks

        graph, state = nnx.split(stack.blocks.layers[slot])  # leaves [num_blocks, ...]

        def body(acc, xs, graph=graph):
            layer_state, x_in, x_out = xs
            y = nnx.merge(graph, layer_state)(x_in, cos=None, sin=None, segment_ids=seg)
            d = jnp.square(y.astype(jnp.float32) - x_out.astype(jnp.float32))
            return acc + jnp.sum(jnp.where(mask, d, 0.0)), None

        if stack.remat_policy != "none":
            body = jax.checkpoint(body)
        total, _ = jax.lax.scan(body, total, (state, ins[slot::period], outs[slot::period]))
    if n_layers == 0:
        raise ValueError("stage layerwise needs Gated DeltaNet layers in the student")
    # mean over layers, tokens and channels, x scale: the count is tokens; the constant factors go in the sum.
    E = ins.shape[-1]
    total = total * cfg.loss.layerwise_scale / (n_layers * E)
    return total, jnp.sum(seg > 0), {}


STAGE_LOSSES = {"layerwise": layerwise_loss, "e2e": e2e_loss, "sft": sft_loss, "lora": sft_loss}
