"""Parameters as a flat ``{name: array}`` dict, pattern-based selection, and the student-from-teacher init.

Names are the module path joined by ``/`` with the decoder layer kind spliced into the stacked layer index, so one
regex can pick e.g. every Gated DeltaNet mixer: ``language_model/layers/blocks/layers/1:linear_attention/self_attn/q_proj/kernel``
(leading axis of such a tensor: the stacked block index, layer ``i`` = block ``i // period``, slot ``i % period``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.config import GDN, InfiniteVLConfig
from infinitevl_jax.modeling.decoder import layer_period

_SLOT = re.compile(r"^(language_model/layers/blocks/layers/)(\d+)(?::[a-z_]+)?(/.*)$")


@dataclasses.dataclass(frozen=True)
class ParamTree:
    """The static half of a model: ``nnx`` graph definition, the pytree structure of its parameters and the names."""

    graphdef: Any
    treedef: Any
    names: tuple[str, ...]
    rest: Any  # non-parameter state (none in this model)

    def merge(self, flat: Mapping[str, jax.Array]) -> nnx.Module:
        state = jax.tree_util.tree_unflatten(self.treedef, [flat[n] for n in self.names])
        return nnx.merge(self.graphdef, state, self.rest)


def _key_str(k) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name in ("value", "raw_value") else k.name
    return str(k)


def split_model(model: nnx.Module) -> tuple[ParamTree, dict[str, jax.Array]]:
    """``model`` -> (static ``ParamTree``, flat parameter dict with kind-annotated names)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    kinds = model.config.text.layer_types
    names = []
    for path, _ in leaves:
        name = "/".join(s for s in (_key_str(k) for k in path) if s is not None)
        m = _SLOT.match(name)
        if m:
            name = f"{m.group(1)}{m.group(2)}:{kinds[int(m.group(2))]}{m.group(3)}"
        names.append(name)
    tree = ParamTree(graphdef, treedef, tuple(names), rest)
    return tree, dict(zip(names, (x for _, x in leaves)))


def select(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Names fully matching any of the regex ``patterns`` (big_vision style)."""
    regs = [re.compile(p) for p in patterns]
    return [n for n in names if any(r.fullmatch(n) for r in regs)]


def check_patterns(names: Iterable[str], patterns: Iterable[str], what: str) -> None:
    names = list(names)
    for p in patterns:
        if not any(re.fullmatch(p, n) for n in names):
            raise ValueError(f"{what} pattern {p!r} matches no parameter (names look like {names[len(names) // 2]!r})")


def partition(flat: Mapping[str, Any], patterns: Iterable[str]) -> tuple[dict, dict]:
    chosen = set(select(flat, patterns))
    return ({k: v for k, v in flat.items() if k in chosen}, {k: v for k, v in flat.items() if k not in chosen})


def count(flat: Mapping[str, Any]) -> int:
    return int(sum(math.prod(v.shape) for v in flat.values()))


# ---------------------------------------------------------------------------------------------------------------
# Per-layer view (independent of the stacking period) and the student-from-teacher init
# ---------------------------------------------------------------------------------------------------------------


def per_layer(flat: Mapping[str, Any], config: InfiniteVLConfig) -> dict[str, Any]:
    """Unstacks decoder tensors to ``language_model/layers/{i}/...`` (i = absolute layer index)."""
    period = layer_period(config.text.layer_types)
    out = {}
    for name, value in flat.items():
        m = _SLOT.match(name)
        if not m:
            out[name] = value
            continue
        slot = int(m.group(2))
        sub = m.group(3)
        for j in range(value.shape[0]):
            out[f"language_model/layers/{j * period + slot}{sub}"] = value[j]
    return out


def init_student_from_teacher(student_flat: Mapping[str, jax.Array], student_cfg: InfiniteVLConfig,
                              teacher_flat: Mapping[str, jax.Array], teacher_cfg: InfiniteVLConfig
                              ) -> dict[str, jax.Array]:
    """Copies every parameter the two models share (embeddings, norms, MLPs, vision, and the mixers of layers whose
    kind is softmax attention in both), and gives the Gated DeltaNet mixers the "mimic" init (REFERENCE section 7):
    ``A_log = 0``, ``a_proj = b_proj = 0``, ``dt_bias = softplus^-1(0.001)``, short convolutions the identity (only the
    current-token tap, ``kernel[W-1]``, is 1); their q/k/v/g/o projections keep their fresh initialisation."""
    t_layers = per_layer(teacher_flat, teacher_cfg)
    period = layer_period(student_cfg.text.layer_types)
    kinds_t, kinds_s = teacher_cfg.text.layer_types, student_cfg.text.layer_types
    out = {}
    for name, value in student_flat.items():
        m = _SLOT.match(name)
        if not m:
            if name in t_layers and t_layers[name].shape == value.shape:
                out[name] = jnp.asarray(t_layers[name], value.dtype)
            else:
                out[name] = value
            continue
        slot, sub = int(m.group(2)), m.group(3)
        kind = kinds_s[slot]
        if kind == GDN and sub.startswith("/self_attn/"):
            out[name] = mimic_value(sub.split("/")[2], value)
            continue
        rows = []
        for j in range(value.shape[0]):
            i = j * period + slot
            src = t_layers.get(f"language_model/layers/{i}{sub}")
            mixer = sub.startswith("/self_attn/")
            ok = src is not None and src.shape == value.shape[1:] and (not mixer or kinds_t[i] != GDN)
            rows.append(jnp.asarray(src, value.dtype) if ok else value[j])
        out[name] = jnp.stack(rows)
    return out


def mimic_value(param: str, value: jax.Array) -> jax.Array:
    """The mimic init of one stacked GDN parameter (anything not listed keeps ``value``)."""
    if param == "A_log" or param in ("a_proj", "b_proj"):
        return jnp.zeros_like(value)
    if param == "dt_bias":
        return jnp.full_like(value, math.log(math.expm1(0.001)))
    if param.endswith("_conv1d"):
        return jnp.zeros_like(value).at[..., -1, :].set(1.0)  # [blocks, W, C]: tap W-1 = current token
    return value


def to_numpy(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat.items()}


def flatten_names(tree: Mapping[str, Any]) -> list[str]:
    """Names of a flat param dict, or of a LoRA adapter dict (its base kernel names)."""
    return list(tree)


def map_names(tree: Mapping[str, Any], fn) -> dict:
    """``{name: fn(name, leaf)}`` broadcast to every leaf under each name (for optax masks)."""
    return {n: jax.tree.map(lambda x, n=n: fn(n, x), v) for n, v in tree.items()}


def count_tree(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
