"""Inference benchmark: batch-1 decode ms/token vs context (InfiniteVL vs the same code in Qwen2.5-VL-3B teacher
mode), prefill tokens/s, streaming frames/s. Full-size random bf16 weights (``--tiny`` for a CPU smoke run).

Decode at context C uses a cache filled to C tokens (slot positions set, values zero: the step's cost does not
depend on the values), so no C-token prefill is needed. Byte floor of a decode step: parameters read once
(language stack + tied head) plus the cache. Writes ``$OUT/inference.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.config import infinitevl_4b, qwen2_5_vl_3b, tiny_infinitevl, tiny_qwen2_5_vl
from infinitevl_jax.inference import engine, init_cache
from infinitevl_jax.inference.cache import AttentionCache
from infinitevl_jax.inference.streaming import frame_position_ids
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration
from infinitevl_jax.modeling.vision import vision_layout


def build(config, dtype):
    return nnx.jit(lambda: InfiniteVLForConditionalGeneration(config, dtype=dtype, param_dtype=dtype,
                                                               rngs=nnx.Rngs(0)))()


def filled_cache(config, context, dtype, max_length=None):
    cache = init_cache(config, 1, max_length=max_length, dtype=dtype)
    layers = []
    for c in cache.layers:
        if isinstance(c, AttentionCache):
            L = c.positions.shape[-1]
            s = np.arange(L)
            pos = np.where(s < context, s, -1) if L >= context else context - L + (s - (context - L)) % L
            c = c._replace(positions=jnp.broadcast_to(jnp.asarray(pos, jnp.int32), c.positions.shape))
        layers.append(c)
    return cache.replace(layers=tuple(layers), length=jnp.full((1,), context, jnp.int32),
                         next_position=jnp.full((1,), context, jnp.int32))


def time_decode(graphdef, state, cache, steps):
    tok = jnp.zeros((1,), jnp.int32)
    key = jax.random.key(0)
    tok, _, cache = engine.decode_step(graphdef, state, cache, tok, key, 0.0, 1.0, top_k=0, greedy=True)
    tok.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok, _, cache = engine.decode_step(graphdef, state, cache, tok, key, 0.0, 1.0, top_k=0, greedy=True)
    tok.block_until_ready()
    return (time.perf_counter() - t0) / steps * 1e3, cache


def param_bytes(model, language_only=True):
    state = nnx.state(model, nnx.Param)
    total = 0
    for path, v in nnx.to_flat_state(state):
        if language_only and path[0] == "visual":
            continue
        total += v[...].nbytes
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--contexts", default="4096,32768,131072,524288")
    ap.add_argument("--teacher-contexts", default="4096,32768,131072")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--frame-px", type=int, default=448)
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    t_start = time.time()
    over = lambda: time.time() - t_start > args.budget_s
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cfgs = (tiny_infinitevl(), tiny_qwen2_5_vl()) if args.tiny else (infinitevl_4b(), qwen2_5_vl_3b())
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "decode": {}, "teacher_decode": {}}
    print(res["device"], flush=True)

    model = build(cfgs[0], dtype)
    graphdef, state = nnx.split(model)
    pbytes = param_bytes(model)
    res["language_param_bytes"] = pbytes
    for C in [int(c) for c in args.contexts.split(",")]:
        if over():
            break
        cache = filled_cache(cfgs[0], C, dtype)
        ms, cache = time_decode(graphdef, state, cache, args.steps)
        floor_ms = (pbytes + cache.nbytes()) / 3.0e12 * 1e3  # H100 copy rate ~3.0 TB/s
        res["decode"][C] = {"ms": ms, "cache_bytes": cache.nbytes(), "floor_ms_h100": floor_ms}
        print(f"infinitevl decode ctx={C}: {ms:.2f} ms/token (floor {floor_ms:.2f}), cache {cache.nbytes()/1e6:.0f} MB",
              flush=True)
        del cache

    # Prefill tokens/s (chunked, through the cache).
    if not over():
        T = args.prefill
        embeds = jnp.zeros((1, T, cfgs[0].text.hidden_size), dtype)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, None], (3, 1, T))
        seg = jnp.ones((1, T), jnp.int32)
        for rep in range(2):
            t0 = time.perf_counter()
            lg, _ = engine.prefill(graphdef, state, init_cache(cfgs[0], 1, dtype=dtype), embeds, pos, seg,
                                   chunk=args.chunk)
            lg.block_until_ready()
            dt = time.perf_counter() - t0
        res["prefill"] = {"tokens": T, "chunk": args.chunk, "s": dt, "tokens_per_s": T / dt}
        print(f"infinitevl prefill {T} tokens (chunk {args.chunk}): {dt:.2f} s = {T/dt:.0f} tok/s", flush=True)

    # Streaming frames (each as an image).
    if not over():
        vc = cfgs[0].vision
        g = args.frame_px // vc.patch_size
        grid = (1, g, g)
        n_patch = g * g
        pix = jnp.asarray(np.random.RandomState(0).randn(n_patch, vc.patch_dim), dtype)
        layout = vision_layout(np.asarray([grid]), vc)
        cache = init_cache(cfgs[0], 1, dtype=dtype)
        ntok = n_patch // vc.merge_unit
        ids = jnp.full((1, ntok), cfgs[0].image_token_id, jnp.int32)
        seg = jnp.ones((1, ntok), jnp.int32)
        times, mem = [], []
        for i in range(args.frames):
            pos = jnp.asarray(frame_position_ids(grid, 10, i, vc.spatial_merge_size)[:, None])
            t0 = time.perf_counter()
            lg, cache = engine.embed_prefill_step(graphdef, state, cache, ids, {"pixel_values": pix,
                                                                                "image_layout": layout}, pos, seg)
            lg.block_until_ready()
            times.append(time.perf_counter() - t0)
            if i % 50 == 0:
                mem.append(sum(x.nbytes for x in jax.live_arrays()))
            if over():
                break
        steady = times[1:] or times
        res["stream"] = {"frames": len(times), "tokens_per_frame": ntok, "fps": 1.0 / float(np.median(steady)),
                         "live_bytes_every_50": mem}
        print(f"streaming {len(times)} frames of {args.frame_px}px ({ntok} tokens): {res['stream']['fps']:.1f} FPS, "
              f"live bytes {mem[0]/1e9:.2f} -> {mem[-1]/1e9:.2f} GB", flush=True)
    del model, state, graphdef

    teacher = build(cfgs[1], dtype)
    tg, ts = nnx.split(teacher)
    for C in [int(c) for c in args.teacher_contexts.split(",")]:
        if over():
            break
        cache = filled_cache(cfgs[1], C, dtype, max_length=-(-(C + args.steps + 8) // 256) * 256)
        ms, cache = time_decode(tg, ts, cache, args.steps)
        res["teacher_decode"][C] = {"ms": ms, "cache_bytes": cache.nbytes()}
        print(f"teacher decode ctx={C}: {ms:.2f} ms/token, cache {cache.nbytes()/1e9:.2f} GB", flush=True)
        del cache
    out = os.environ.get("OUT") or "/tmp"
    with open(os.path.join(out, "inference.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
