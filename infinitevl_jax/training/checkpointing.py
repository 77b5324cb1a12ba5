"""Orbax checkpoints of a training run: params, optimizer state, step, RNG and the data iterator state.

Flat parameter names are stored as nested dicts (split on ``/``). ``load_params(dir)`` reads the params of the latest
step of a run directory, which is how a stage initialises from the previous one.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


def nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        name = f"{prefix}/{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def manager(directory: str, *, keep: int, use_async: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, *, force: bool = False) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
              force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                     data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def load_params(directory: str, *, with_count: bool = False):
    """The flat params (numpy) of the latest checkpoint in a run directory, LoRA adapters (stage III) folded in; with
    ``with_count`` also the number of adapters merged. Checkpoints written on any mesh are read."""
    mngr = ocp.CheckpointManager(os.path.abspath(directory), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    # Host (numpy) targets: read whatever mesh or device count the run that wrote it had.
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), mngr.item_metadata(step)["state"])
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    state = out["state"]
    params = flatten(state["params"])
    n = 0
    if "lora" in state and state["lora"]:
        from infinitevl_jax.training import lora
        meta = state["lora_meta"]
        adapters = _adapters(state["lora"])
        n = len(adapters)
        params = lora.merge(params, adapters, int(meta["rank"]), float(meta["alpha"]))
    params = {k: np.asarray(v) for k, v in params.items()}
    return (params, n) if with_count else params


def _adapters(nested) -> dict:
    flat = flatten(nested)
    out: dict = {}
    for name, v in flat.items():
        base, ab = name.rsplit("/", 1)
        out.setdefault(base, {})[ab] = v
    return out
