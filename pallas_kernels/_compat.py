"""The one place for Pallas API differences between JAX versions (0.10.2 in CI, 0.11.2 on the GPU machine).

Also decides interpret mode: kernels run compiled on their own platform and interpreted elsewhere (CPU tests),
unless `compiled()` forces compilation, e.g. to lower TPU kernels from a CPU host.
"""

from __future__ import annotations

import contextlib

import jax
from jax.experimental import pallas as pl  # noqa: F401  (re-exported for kernels)
from jax.experimental.pallas import tpu as pltpu

try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

_FORCE_COMPILED = False


@contextlib.contextmanager
def compiled():
  """Trace kernels for real compilation even where the host platform differs (for cross-platform lowering)."""
  global _FORCE_COMPILED
  old, _FORCE_COMPILED = _FORCE_COMPILED, True
  try:
    yield
  finally:
    _FORCE_COMPILED = old


def tpu_interpret():
  if _FORCE_COMPILED or jax.default_backend() == "tpu":
    return False
  params = getattr(pltpu, "InterpretParams", None)
  return params(detect_races=True) if params is not None else True


def gpu_interpret():
  return not (_FORCE_COMPILED or jax.default_backend() == "gpu")


def sm80_gpu() -> bool:
  """Whether the default device is a CUDA GPU of compute capability >= 8.0 (where the Triton kernels run)."""
  dev = jax.devices()[0]
  try:
    return dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0")) >= 8.0
  except (TypeError, ValueError):  # pragma: no cover - unknown device object
    return False


def tpu_params(dimension_semantics, vmem_limit_bytes=None):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  kw = {} if vmem_limit_bytes is None else {"vmem_limit_bytes": vmem_limit_bytes}
  return cls(dimension_semantics=tuple(dimension_semantics), **kw)


def triton_params(num_warps=4, num_stages=2):
  cls = (getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams", None)
         or getattr(pl, "GPUCompilerParams"))
  return cls(num_warps=num_warps, num_stages=num_stages)
