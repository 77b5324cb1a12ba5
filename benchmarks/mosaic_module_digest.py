"""Digests of the Mosaic GPU kernels' modules, printed without source locations: two commits whose digests agree
compile the same kernels, so a refactor can be checked on a host without a GPU.

    PYTHONPATH=. python3 benchmarks/mosaic_module_digest.py            # forward and backward at the 4B head shape
    PYTHONPATH=. python3 benchmarks/mosaic_module_digest.py --dump /tmp/mods   # also write the module texts
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.interpreters import mlir as jax_mlir  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402

from pallas_kernels.sliding_window_attention import flash_mosaic  # noqa: E402


def module_texts(lowered):
  """The location-free text of every Mosaic GPU custom call's module in a lowered computation."""
  texts = []

  def walk(op):
    for region in op.regions:
      for block in region:
        for inner in block:
          if inner.name == "stablehlo.custom_call" and "mosaic_gpu" in str(inner.attributes["call_target_name"]):
            data = bytes(ir.StringAttr(inner.attributes["mhlo.backend_config"]["module"]).value_bytes)
            with jax_mlir.make_ir_context() as ctx:
              ctx.allow_unregistered_dialects = True
              texts.append(ir.Module.parse(data).operation.get_asm(enable_debug_info=False))
          walk(inner)

  walk(lowered.compiler_ir().operation)
  return texts


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--t", type=int, default=2048)
  ap.add_argument("--window", type=int, default=512)
  ap.add_argument("--dump", default=None, help="directory for the module texts")
  args = ap.parse_args()
  t, d, scale = args.t, 128, 128 ** -0.5
  q = jax.ShapeDtypeStruct((1, t, 16, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, 16, t), jnp.float32)
  kernels = {
      "forward": (lambda q, k, v: flash_mosaic._fwd(q, k, v, scale=scale, window=args.window, block_q=64,
                                                    block_k=128, stages=2, pingpong=True), (q, kv, kv)),
      "backward": (lambda q, k, v, o, lse, do: flash_mosaic._bwd(q, k, v, o, lse, do, scale=scale, window=args.window,
                                                                 block_q=64, block_k=64, stages=2),
                   (q, kv, kv, q, lse, q)),
  }
  for name, (fn, shapes) in kernels.items():
    for i, text in enumerate(module_texts(jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)))):
      print(f"{name}[{i}] {hashlib.sha256(text.encode()).hexdigest()[:16]} ({len(text)} characters)")
      if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, f"{name}_{i}.mlir"), "w") as fh:
          fh.write(text)


if __name__ == "__main__":
  main()
