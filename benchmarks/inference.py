"""Inference benchmark: batch-1 decode ms/token vs context (InfiniteVL vs the same code in Qwen2.5-VL-3B teacher
mode), batched decode tokens/s at one context (``--batch``), prefill tokens/s vs context (both models), streaming
frames/s (one frame per program and ``--frames-per-step`` frames per program, every step's time kept for a
frames/s-vs-frame-index plot). Full-size random bf16 weights (``--tiny`` for a CPU smoke run).

Every timed program runs on the inference path (``engine.prepare``: per-block decoder weights) and is called until a
call compiles nothing before the clock starts. Decode at context C uses a cache filled to C tokens (slot positions set,
values zero: the step's cost does not depend on the values), so no C-token prefill is needed. Byte floor of a decode
step: parameters read once (language stack + tied head) plus the cache, at the read rate a probe measures first in
the same process (a float32 sum over a 4 GiB bf16 array: one streaming read). Writes ``$OUT/inference.json`` and
prints a table.

    PYTHONPATH=. python3 benchmarks/inference.py --frames-per-step 1,4,8
    PYTHONPATH=. python3 benchmarks/inference.py --parts stream --frames 96 --frames-per-step 1,4,8
    PYTHONPATH=. python3 benchmarks/inference.py --parts batch,prefill,teacher_batch,teacher_prefill \
        --batch 32 --batch-context 32768 --prefill-contexts 8192,32768,131072 --teacher-prefill-contexts 32768,131072
    PYTHONPATH=. python3 benchmarks/inference.py --tiny --contexts 64 --teacher-contexts 64 --prefill 256 --chunk 64 \\
        --frames 12 --frames-per-step 1,4
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


class _Compiles:
    """Backend compilations so far (a process-wide listener)."""

    n = 0

    @classmethod
    def install(cls):
        if not getattr(cls, "_installed", False):
            jax.monitoring.register_event_duration_secs_listener(cls._on)
            cls._installed = True

    @classmethod
    def _on(cls, name, *a, **k):
        if name == "/jax/core/compile/backend_compile_duration":
            cls.n += 1


def warm(fn, max_calls: int = 6):
    """Calls ``fn()`` (returns something to block on) until a call compiles nothing; returns the calls made."""
    _Compiles.install()
    for i in range(1, max_calls + 1):
        n = _Compiles.n
        jax.block_until_ready(fn())
        if _Compiles.n == n and i >= 2:
            return i
    raise RuntimeError(f"still compiling after {max_calls} calls")


def build(config, dtype):
    return nnx.jit(lambda: InfiniteVLForConditionalGeneration(config, dtype=dtype, param_dtype=dtype,
                                                               rngs=nnx.Rngs(0)))()


def prepared(config, dtype) -> engine.InferenceModel:
    """A random model on the inference path (its stacked blocks converted and freed)."""
    return engine.prepare(build(config, dtype), consume=True)


def filled_cache(config, context, dtype, max_length=None, batch=1):
    """An empty cache of ``batch`` rows whose attention slots claim the last ``context`` positions (placed like
    ``init_cache``'s arrays, so the first step compiles the program every later step runs)."""
    cache = init_cache(config, batch, max_length=max_length, dtype=dtype)
    put = lambda x, like: jax.device_put(jnp.asarray(x, like.dtype), like.sharding)
    layers = []
    for c in cache.layers:
        if isinstance(c, AttentionCache):
            L = c.positions.shape[-1]
            s = np.arange(L)
            pos = np.where(s < context, s, -1) if L >= context else context - L + (s - (context - L)) % L
            c = c._replace(positions=put(np.broadcast_to(pos, c.positions.shape), c.positions))
        layers.append(c)
    return cache.replace(layers=tuple(layers), length=put(np.full((batch,), context), cache.length),
                         next_position=put(np.full((batch,), context), cache.next_position))


def decode_loop(m: engine.InferenceModel, cache):
    """A closure running one greedy decode step on a held cache (donated and replaced every call)."""
    B = cache.length.shape[0]
    holder = {"cache": cache, "tok": jax.device_put(jnp.zeros((B,), jnp.int32), cache.length.sharding)}
    key = jax.random.key(0)

    def step():
        holder["tok"], _, holder["cache"] = engine.decode_step(m.graphdef, m.state, holder["cache"], holder["tok"],
                                                               key, 0.0, 1.0, top_k=0, greedy=True)
        return holder["tok"]

    return step, holder


def time_decode(m: engine.InferenceModel, cache, steps):
    step, holder = decode_loop(m, cache)
    warm(step)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step()
    tok.block_until_ready()
    return (time.perf_counter() - t0) / steps * 1e3, holder["cache"]


def stream_loop(m: engine.InferenceModel, config, dtype, frame_px: int, k: int, vision_attention: str = "grid"):
    """A closure prefilling ``k`` frames of ``frame_px`` pixels per call (``embed_prefill_step`` for k = 1, as a
    session does, else ``frames_prefill_step``) into a held cache. Returns ``(step, tokens per frame, holder)``."""
    vc = config.vision
    g = frame_px // vc.patch_size
    grid = (1, g, g)
    n_patch = g * g
    pix = jnp.asarray(np.random.RandomState(0).randn(k, n_patch, vc.patch_dim), dtype)
    layout = vision_layout(np.asarray([grid]), vc, attention=vision_attention)
    ntok = n_patch // vc.merge_unit
    ids = jnp.full((1, ntok), config.image_token_id, jnp.int32)
    seg = jnp.ones((1, ntok), jnp.int32)
    holder = {"cache": engine.new_cache(m, 1), "i": 0}

    def step():
        i = holder["i"]
        pos = np.concatenate([frame_position_ids(grid, 10, i + j, vc.spatial_merge_size) for j in range(k)], axis=1)
        holder["i"] += k
        if k == 1:
            lg, holder["cache"] = engine.embed_prefill_step(
                m.graphdef, m.state, holder["cache"], ids, {"pixel_values": pix[0], "image_layout": layout},
                jnp.asarray(pos[:, None]), seg)
        else:
            lg, holder["cache"] = engine.frames_prefill_step(m.graphdef, m.state, holder["cache"], pix, layout,
                                                             jnp.asarray(pos[:, None]))
        return lg

    return step, ntok, holder


def param_bytes(m: engine.InferenceModel, language_only=True):
    model = nnx.merge(m.graphdef.graphdef, jax.tree.unflatten(m.graphdef.treedef, m.state))
    total = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if language_only and path[0] == "visual":
            continue
        total += v[...].nbytes
    return total


def time_prefill(m: engine.InferenceModel, config, T: int, chunk: int, dtype, max_length=None):
    """Seconds for a chunked prefill of ``T`` tokens (zero embeddings) into a fresh cache, after a warm-up call."""
    embeds = jnp.zeros((1, T, config.text.hidden_size), dtype)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, None], (3, 1, T))
    seg = jnp.ones((1, T), jnp.int32)
    run = lambda: engine.prefill(m.graphdef, m.state, engine.new_cache(m, 1, max_length=max_length), embeds, pos, seg,
                                 chunk=chunk)[0]
    warm(run)
    t0 = time.perf_counter()
    run().block_until_ready()
    return time.perf_counter() - t0


def read_rate(nbytes: int, reps: int = 20) -> float:
    """Bytes per second of one streaming read of ``nbytes`` (a float32 sum over a bf16 array), best of two passes."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(reps):
            r = f(x)
        r.block_until_ready()
        best = max(best, nbytes * reps / (time.perf_counter() - t0))
    del x
    return best


def run_model(name, m, config, dtype, args, parts, res, over, max_length_for=None):
    """The decode / batch / prefill parts of one model; ``max_length_for(C)`` sizes a full-attention KV cache."""
    ml = max_length_for or (lambda C: None)
    contexts = args.contexts if name == "infinitevl" else args.teacher_contexts
    key = "decode" if name == "infinitevl" else "teacher_decode"
    pbytes = param_bytes(m)
    res.setdefault("param_bytes", {})[name] = pbytes
    for C in [int(c) for c in contexts.split(",")] if ("decode" if name == "infinitevl" else "teacher") in parts else []:
        if over():
            break
        cache = filled_cache(config, C, dtype, max_length=ml(C))
        ms, cache = time_decode(m, cache, args.steps)
        rate = res["read_bytes_per_s"]
        floor_ms = (pbytes + cache.nbytes()) / rate * 1e3
        res[key][C] = {"ms": ms, "cache_bytes": cache.nbytes(), "floor_ms": floor_ms,
                       "floor_ms_at_4tbs": (pbytes + cache.nbytes()) / 4.0e12 * 1e3}
        print(f"{name} decode ctx={C}: {ms:.2f} ms/token (byte floor {floor_ms:.2f} at the measured "
              f"{rate / 1e12:.2f} TB/s: {ms / floor_ms:.2f}x), cache {cache.nbytes()/1e6:.0f} MB", flush=True)
        del cache
    prefix = "" if name == "infinitevl" else "teacher_"
    if prefix + "batch" in parts and not over():
        B, C = args.batch, args.batch_context
        try:
            cache = filled_cache(config, C, dtype, max_length=ml(C), batch=B)
            ms, cache = time_decode(m, cache, args.steps)
            row = {"batch": B, "context": C, "ms_per_step": ms, "tokens_per_s": B / ms * 1e3,
                   "cache_bytes": cache.nbytes()}
            print(f"{name} decode batch={B} ctx={C}: {ms:.2f} ms/step = {B / ms * 1e3:.0f} tokens/s, cache "
                  f"{cache.nbytes()/1e9:.2f} GB", flush=True)
            del cache
        except Exception as e:  # the teacher's KV cache may not fit: that is a result
            row = {"batch": B, "context": C, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{name} decode batch={B} ctx={C}: {row['error']}", flush=True)
        res.setdefault("batch", {})[name] = row
    if prefix + "prefill" in parts:
        for T in [int(c) for c in (args.prefill_contexts if name == "infinitevl" else
                                   args.teacher_prefill_contexts).split(",")]:
            if over():
                break
            try:
                dt = time_prefill(m, config, T, args.chunk, dtype, max_length=ml(T))
                row = {"tokens": T, "chunk": args.chunk, "s": dt, "tokens_per_s": T / dt}
                print(f"{name} prefill {T} tokens (chunk {args.chunk}): {dt:.2f} s = {T/dt:.0f} tok/s", flush=True)
            except Exception as e:
                row = {"tokens": T, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                print(f"{name} prefill {T}: {row['error']}", flush=True)
            res.setdefault(prefix + "prefill", {})[T] = row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--contexts", default="4096,32768,131072,524288")
    ap.add_argument("--teacher-contexts", default="4096,32768,131072")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="batch of the batched-decode part")
    ap.add_argument("--batch-context", type=int, default=32768, help="context of the batched-decode part")
    ap.add_argument("--prefill-contexts", default="32768", help="InfiniteVL prefill lengths")
    ap.add_argument("--teacher-prefill-contexts", default="32768,131072", help="teacher-mode prefill lengths")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=200, help="frames timed per group size")
    ap.add_argument("--frame-px", type=int, default=448)
    ap.add_argument("--frames-per-step", default="1,4,8", help="group sizes of the streaming runs")
    ap.add_argument("--vision-attention", default="grid", choices=("grid", "dense"),
                    help="vision-tower attention of the streaming runs: blocks fitted to the frame grid, or dense")
    ap.add_argument("--parts", default="decode,prefill,stream,teacher",
                    help="what to run (comma-separated): decode, batch, prefill, stream, teacher (decode), "
                         "teacher_batch, teacher_prefill")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--xla-exhaustive-tiling", action="store_true",
                    help="let XLA's GEMM autotuner search every tiling (XLA_FLAGS=--xla_gpu_exhaustive_tiling_search="
                         "true): a longer first compile, faster skinny decode products")
    ap.add_argument("--tune-decode", action="store_true",
                    help="compile the decode step (only) with engine.EXHAUSTIVE_GEMM_TILING "
                         "(engine.DECODE_COMPILER_OPTIONS['gpu'])")
    args = ap.parse_args()
    if args.tune_decode:
        engine.DECODE_COMPILER_OPTIONS["gpu"] = engine.EXHAUSTIVE_GEMM_TILING
    if args.xla_exhaustive_tiling:  # read when the backend starts, i.e. before the first device query below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_exhaustive_tiling_search=true").strip()
    parts = set(args.parts.split(","))
    _Compiles.install()
    t_start = time.time()
    over = lambda: time.time() - t_start > args.budget_s
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cfgs = (tiny_infinitevl(), tiny_qwen2_5_vl()) if args.tiny else (infinitevl_4b(), qwen2_5_vl_3b())
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "decode": {}, "teacher_decode": {},
           "stream": {}, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "decode_compiler_options": engine.DECODE_COMPILER_OPTIONS.get(jax.default_backend(), {})}
    print(res["device"], flush=True)
    res["read_bytes_per_s"] = read_rate(1 << 20 if args.tiny else 1 << 32)
    print(f"read bandwidth probe: {res['read_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    out = os.environ.get("OUT") or "/tmp"
    os.makedirs(out, exist_ok=True)

    def save():
        with open(os.path.join(out, "inference.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)

    m = prepared(cfgs[0], dtype)
    res["language_param_bytes"] = param_bytes(m)
    run_model("infinitevl", m, cfgs[0], dtype, args, parts, res, over)
    save()

    # Streaming frames (each as an image), k frames per program.
    for k in [int(x) for x in args.frames_per_step.split(",")] if "stream" in parts else []:
        if over():
            break
        step, ntok, holder = stream_loop(m, cfgs[0], dtype, args.frame_px, k, args.vision_attention)
        warm(step)
        times, mem = [], []
        for i in range(max(1, args.frames // k)):
            t0 = time.perf_counter()
            jax.block_until_ready(step())
            times.append(time.perf_counter() - t0)
            if i % max(1, 50 // k) == 0:
                mem.append(sum(x.nbytes for x in jax.live_arrays()))
            if over():
                break
        fps = k / float(np.median(times))
        res["stream"][k] = {"frames": len(times) * k, "frames_per_step": k, "tokens_per_frame": ntok, "fps": fps,
                            "ms_per_frame": 1e3 / fps, "live_bytes": mem, "step_s": times,
                            "vision_attention": args.vision_attention}
        print(f"streaming {len(times) * k} frames of {args.frame_px}px ({ntok} tokens), {k} per program: "
              f"{fps:.1f} FPS ({1e3 / fps:.2f} ms/frame; slowest step {max(times) * 1e3 / k:.2f} ms/frame), "
              f"live bytes {mem[0]/1e9:.2f} -> {mem[-1]/1e9:.2f} GB", flush=True)
        del holder, step
        save()
    del m

    if parts & {"teacher", "teacher_batch", "teacher_prefill"}:
        teacher = prepared(cfgs[1], dtype)
        run_model("teacher", teacher, cfgs[1], dtype, args, parts, res, over,
                  max_length_for=lambda C: -(-(C + args.steps + 8) // 256) * 256)
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "stream"}, default=str))


if __name__ == "__main__":
    main()
