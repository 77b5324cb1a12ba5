"""Multi-host set-up: ``jax.distributed.initialize`` from the environment, per-process data, process-0 logging.

Call ``initialize()`` first thing in a training or evaluation program, before anything touches a device:

- explicit coordinator: ``INFINITEVL_COORDINATOR=host:port``, ``INFINITEVL_NUM_PROCESSES``, ``INFINITEVL_PROCESS_ID``
  (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are read too; optional
  ``INFINITEVL_LOCAL_DEVICE_IDS=0,1,..`` for one process per GPU);
- SLURM (``srun``, one task per host or per GPU) and Cloud TPU pods / GKE TPU: JAX's own cluster detection;
- anything else: a single process, nothing to do.

Data: each process loads only the rows of the global batch that live on its devices (``process_batch_rows``) and
``global_batch`` assembles the process-local arrays into global ``jax.Array``s sharded over the batch mesh axes.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from infinitevl_jax import sharding

logger = logging.getLogger(__name__)

_ENV_ALIASES = {
    "coordinator_address": ("INFINITEVL_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("INFINITEVL_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("INFINITEVL_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("INFINITEVL_LOCAL_DEVICE_IDS",),
}


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    return next((environ[k] for k in _ENV_ALIASES[name] if environ.get(k)), None)


def detect_cluster(environ: Mapping[str, str] | None = None) -> str:
    """``"explicit"``, ``"slurm"``, ``"tpu"`` or ``"single"``: how ``initialize`` will start this process."""
    env = os.environ if environ is None else environ
    if _env("coordinator_address", env):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if env.get("TPU_WORKER_HOSTNAMES") and "," in env["TPU_WORKER_HOSTNAMES"] or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "single"


def initialize(environ: Mapping[str, str] | None = None, **overrides: Any) -> str:
    """Starts the multi-process runtime when the environment asks for it; returns the kind (see ``detect_cluster``).

    ``overrides`` (``coordinator_address``, ``num_processes``, ``process_id``, ``local_device_ids``) win over the
    environment. Idempotent: a second call does nothing.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return "initialized"
    kind = "explicit" if overrides.get("coordinator_address") else detect_cluster(env)
    if kind == "single":
        return kind
    kwargs: dict[str, Any] = {}
    if kind == "explicit":
        kwargs["coordinator_address"] = overrides.get("coordinator_address") or _env("coordinator_address", env)
        for name in ("num_processes", "process_id"):
            value = overrides.get(name, _env(name, env))
            if value is None:
                raise ValueError(f"explicit coordinator set but {_ENV_ALIASES[name][0]} is missing")
            kwargs[name] = int(value)
        ids = overrides.get("local_device_ids", _env("local_device_ids", env))
        if ids is not None:
            kwargs["local_device_ids"] = [int(i) for i in str(ids).split(",")] if isinstance(ids, str) else list(ids)
    jax.distributed.initialize(**kwargs)  # slurm / tpu: JAX reads the cluster's own variables
    log("distributed: %s, process %d of %d, %d local / %d global devices", kind, jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count())
    return kind


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str, *args, level: int = logging.INFO) -> None:
    """Logs on process 0 only."""
    if is_main_process():
        logger.log(level, msg, *args)


def setup_logging(level: int = logging.INFO) -> None:
    """Process 0 logs at ``level``; the other processes only log warnings and errors."""
    logging.basicConfig(level=level if is_main_process() else logging.WARNING,
                        format=f"[%(asctime)s p{jax.process_index()}] %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------------------------
# Per-process data
# ---------------------------------------------------------------------------------------------------------------

# Logical axes of the arrays of a text batch, by key; any other key is taken as [batch, ...].
BATCH_LAYOUTS: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "seq"),
    "labels": ("batch", "seq"),
    "segment_ids": ("batch", "seq"),
    "loss_mask": ("batch", "seq"),
    "position_ids": (None, "batch", "seq"),
}


def batch_sharding(mesh: Mesh, key: str, global_shape: Sequence[int]) -> NamedSharding:
    axes = BATCH_LAYOUTS.get(key, ("batch",) + (None,) * (len(global_shape) - 1))
    return NamedSharding(mesh, sharding.logical_to_spec(axes, global_shape, mesh))


def process_batch_rows(global_batch: int, mesh: Mesh) -> tuple[int, int]:
    """``[start, stop)`` rows of the global batch held by this process's devices (contiguous on our meshes)."""
    s = batch_sharding(mesh, "input_ids", (global_batch, 1))
    rows = sorted({idx[0].indices(global_batch)[:2] for d, idx in s.devices_indices_map((global_batch, 1)).items()
                   if d.process_index == jax.process_index()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's batch rows {rows} are not contiguous")
    return start, stop


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process's rows (``local[k]`` holds rows ``process_batch_rows``) into global arrays.

    In a single process ``local`` is simply the whole batch.
    """
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        batch_dim = 1 if key == "position_ids" else 0
        shape = list(value.shape)
        shape[batch_dim] = global_batch_size
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, key, shape), value, tuple(shape))
    return out
