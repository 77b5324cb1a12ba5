"""What one more kernel costs a decode step: chains of 50, 200 and 400 dependent one-program Pallas kernels (each
reads the previous one's [2, 2048] output), one jitted program per chain, timed on a GPU. The slope between chain
lengths is the fixed cost of a dependent kernel (launch and wait), which a decode step of ~446 kernels pays on top
of its bytes. Writes $OUT/kernel_chain.json.

    PYTHONPATH=. python3 benchmarks/kernel_chain.py
"""
import json, os, sys
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from pallas_kernels import _compat

sys.path.insert(0, os.path.dirname(__file__))
from timing import pipelined_seconds  # noqa: E402  (benchmarks/timing.py)

def k(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 1.0001 + 1.0

def tiny(x):
    return pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                          in_specs=[pl.BlockSpec(x.shape, lambda i: (0, 0))],
                          out_specs=pl.BlockSpec(x.shape, lambda i: (0, 0)),
                          compiler_params=_compat.triton_params(num_warps=4, num_stages=1),
                          interpret=_compat.gpu_interpret())(x)

def chain(n):
    def f(x):
        for _ in range(n):
            x = tiny(x)
        return x
    return jax.jit(f)

res = {"device": jax.devices()[0].device_kind}
x = jnp.ones((2, 2048), jnp.float32)
chain_s = {}
for n in (50, 200, 400):
    t = pipelined_seconds(chain(n), x, warmup=3)
    res[n] = t * 1e6 / n
    chain_s[n] = t
    print(f"{n} dependent tiny kernels: {t*1e3:.3f} ms per chain = {t*1e6/n:.2f} us per kernel", flush=True)
for a, b in ((50, 200), (200, 400)):
    res[f"slope_us_{a}_{b}"] = (chain_s[b] - chain_s[a]) / (b - a) * 1e6
    print(f"{a} -> {b} kernels: {res[f'slope_us_{a}_{b}']:.2f} us per added kernel", flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "kernel_chain.json"), "w"), indent=1)
