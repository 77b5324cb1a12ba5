"""The prepared (per-block) weights of the cached steps, the cache's placement (no recompilation), and streaming in
groups of frames, on tiny float32 models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax.config import tiny_infinitevl, tiny_qwen2_5_vl
from infinitevl_jax.inference import engine, generate, init_cache
from infinitevl_jax.inference.api import InfiniteVL
from infinitevl_jax.inference.generate import cache_max_length
from infinitevl_jax.inference.streaming import StreamingSession
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration
from infinitevl_jax.processing import Processor
from infinitevl_jax.processing.testing import write_tiny_processor_dir

CHUNK = 16


@pytest.fixture(scope="module")
def hybrid():
    return InfiniteVLForConditionalGeneration(tiny_infinitevl(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def processor(tmp_path_factory, hybrid):
    path = write_tiny_processor_dir(tmp_path_factory.mktemp("proc"), hybrid.config, min_pixels=28 * 28,
                                    max_pixels=56 * 56)
    return Processor.from_pretrained(path)


class Compiles:
    """Counts backend compilations (the listener stays registered; only differences are read)."""

    def __init__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, name, *a, **k):
        if name == "/jax/core/compile/backend_compile_duration":
            self.n += 1


COMPILES = Compiles()


def run_steps(graphdef, state, cfg, ids, P):
    """Prefill ``P`` tokens (chunks of 16) then decode the rest; logits of every position from P - 1 on."""
    T = ids.shape[1]
    cache = init_cache(cfg, 1, max_length=cache_max_length(cfg, T, 0))
    pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, 1, T))
    embeds = engine.embed(graphdef, state, jnp.asarray(ids[:, :P]), {})
    logits, cache = engine.prefill(graphdef, state, cache, embeds, pos[:, :, :P], np.ones((1, P), np.int32),
                                   chunk=CHUNK)
    out = [np.asarray(logits)]
    for t in range(P, T):
        _, logits, cache = engine.decode_step(graphdef, state, cache, jnp.asarray(ids[:, t]), jax.random.key(0),
                                              0.0, 1.0, top_k=0, greedy=True)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), cache


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("which", ["hybrid", "teacher"])
def test_per_block_weights_equal_stacked_weights(hybrid, which, fuse):
    """``engine.split`` (per-block weights, a loop over separate arrays; with ``fuse``, projections reading the same
    input as one product) gives what the stacked weights (sliced inside the program) give; ``test_inference`` holds
    the stacked path to the full forward."""
    model = hybrid if which == "hybrid" else InfiniteVLForConditionalGeneration(
        tiny_qwen2_5_vl(num_hidden_layers=2), rngs=nnx.Rngs(1))
    cfg = model.config
    T, P = 24, 20
    ids = np.random.RandomState(3).randint(0, cfg.text.vocab_size - 20, (1, T)).astype(np.int32)
    stacked, c1 = run_steps(*nnx.split(model), cfg, ids, P)
    graphdef, state = engine.split(model, fuse=fuse)
    layer = graphdef.merge(state).language_model.layers.blocks[0].layers[-1]
    assert (layer.mlp.gate_up_proj is not None) == fuse and (layer.mlp.gate_proj is None) == fuse
    per_block, c2 = run_steps(graphdef, state, cfg, ids, P)
    np.testing.assert_allclose(per_block, stacked, atol=1e-6, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), c1, c2)


def _count(jaxpr, name):
    """Equations of primitive ``name`` in ``jaxpr``, nested jaxprs (jit, custom calls) included."""
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == name
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    n += _count(inner, name)
    return n


@pytest.mark.parametrize("which", ["hybrid", "teacher"])
def test_padded_decode_rows_equal_single_rows(which, monkeypatch):
    """Batch-1 decode with single-row products run as padded two-row ones (what GPUs run): the stack carries the
    padding row from its input to its output (the concatenations that padding adds to a step do not grow with depth)
    and every logit and cache entry equals the unpadded run's."""
    from infinitevl_jax.modeling import layers

    make = tiny_infinitevl if which == "hybrid" else tiny_qwen2_5_vl
    T, P = 14, 4
    runs, concats = {}, {}
    for two_rows in (False, True):
        monkeypatch.setattr(layers, "SINGLE_ROW_AS_TWO", two_rows)
        jax.clear_caches()
        for n in (4, 8):
            cfg = make(num_hidden_layers=n)
            graphdef, state = engine.split(InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(2)), fuse=True)
            cache = init_cache(cfg, 1, max_length=cache_max_length(cfg, T, 0))
            jaxpr = jax.make_jaxpr(lambda s, c, t: engine.decode_step(graphdef, s, c, t, jax.random.key(0), 0.0, 1.0,
                                                                      top_k=0, greedy=True))(state, cache, jnp.zeros((1,), jnp.int32))
            concats[two_rows, n] = _count(jaxpr.jaxpr, "concatenate")
            if n == 4:
                ids = np.random.RandomState(5).randint(0, cfg.text.vocab_size - 20, (1, T)).astype(np.int32)
                runs[two_rows] = run_steps(graphdef, state, cfg, ids, P)
    jax.clear_caches()
    assert concats[True, 4] - concats[False, 4] == concats[True, 8] - concats[False, 8], concats
    np.testing.assert_allclose(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
                 runs[True][1], runs[False][1])


def test_step_rejects_rows_that_are_neither_the_batch_nor_its_padding():
    from infinitevl_jax.inference.cache import GDNCache
    from infinitevl_jax.modeling.gated_deltanet import GatedDeltaNet

    c = tiny_infinitevl().text
    layer = GatedDeltaNet(c, rngs=nnx.Rngs(0))
    H, K, V, W = c.num_linear_heads, c.linear_head_dim, c.linear_value_dim, c.conv_size
    cache = GDNCache(jnp.zeros((1, W - 1, H * K)), jnp.zeros((1, W - 1, H * K)), jnp.zeros((1, W - 1, H * V)),
                     jnp.zeros((1, H, K, V)))
    with pytest.raises(ValueError, match="step input has 3 rows for a cache of batch 1"):
        layer.step(jnp.zeros((3, 1, c.hidden_size)), segment_ids=jnp.ones((1, 1), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match=r"step input has 2 rows .*\(4 tokens per row\)"):
        layer.step(jnp.zeros((2, 4, c.hidden_size)), segment_ids=jnp.ones((1, 4), jnp.int32), cache=cache)


@pytest.mark.parametrize("which", ["hybrid", "teacher"])
def test_decode_add_norm_kernel_equals_xla(which, monkeypatch):
    """Decode steps with every residual add + RMSNorm through the kernel (interpret mode; padded two-row products as
    on a GPU) give the XLA steps' logits and caches."""
    from infinitevl_jax import ops
    from infinitevl_jax.modeling import layers

    monkeypatch.setattr(layers, "SINGLE_ROW_AS_TWO", True)
    cfg = (tiny_infinitevl if which == "hybrid" else tiny_qwen2_5_vl)(num_hidden_layers=4)
    graphdef, state = engine.split(InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(4)), fuse=True)
    T, P = 12, 4
    ids = np.random.RandomState(6).randint(0, cfg.text.vocab_size - 20, (1, T)).astype(np.int32)
    runs, kernels = {}, {}
    for norm in ("xla", "pallas_gpu"):
        jax.clear_caches()
        with ops.use_backends(norm=norm):
            cache = init_cache(cfg, 1, max_length=cache_max_length(cfg, T, 0))
            jaxpr = jax.make_jaxpr(lambda s, c, t: engine.decode_step(graphdef, s, c, t, jax.random.key(0), 0.0, 1.0,
                                                                      top_k=0, greedy=True))(state, cache, jnp.zeros((1,), jnp.int32))
            kernels[norm] = _count(jaxpr.jaxpr, "pallas_call")
            runs[norm] = run_steps(graphdef, state, cfg, ids, P)
    jax.clear_caches()
    assert kernels["pallas_gpu"] - kernels["xla"] == 2 * cfg.text.num_hidden_layers - 1, kernels  # the first norm has no add
    np.testing.assert_allclose(runs["pallas_gpu"][0], runs["xla"][0], atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
                 runs["pallas_gpu"][1], runs["xla"][1])


@pytest.mark.parametrize("B,two_rows", [(1, True), (1, False), (3, False)])
def test_fused_gdn_decode_step_equals_unfused(B, two_rows, monkeypatch):
    """A GDN layer's one-token step with fused projections (the decode-inputs kernel, interpret mode; one row as a
    padded two-row product when ``two_rows``) equals the unfused layer's general path, padding rows included."""
    from infinitevl_jax import ops
    from infinitevl_jax.inference.cache import GDNCache
    from infinitevl_jax.modeling import layers
    from infinitevl_jax.modeling.gated_deltanet import GatedDeltaNet

    monkeypatch.setattr(layers, "SINGLE_ROW_AS_TWO", two_rows)
    c = tiny_infinitevl().text
    layer = GatedDeltaNet(c, rngs=nnx.Rngs(5))
    H, K, V, W = c.num_linear_heads, c.linear_head_dim, c.linear_value_dim, c.conv_size
    ks = jax.random.split(jax.random.key(B), 5)
    cache = GDNCache(*(jax.random.normal(ks[i], (B, W - 1, H * d)) for i, d in enumerate((K, K, V))),
                     jax.random.normal(ks[3], (B, H, K, V)))
    x = jax.random.normal(ks[4], (B, 1, c.hidden_size))
    seg = jnp.asarray([[1], [0], [1]][:B], jnp.int32)
    step = nnx.jit(lambda m, x, seg, cache: m.step(x, segment_ids=seg, cache=cache))
    with ops.use_backends(gdn="xla"):
        o_ref, c_ref = step(layer, x, seg, cache)
    layer.fuse_projections()
    assert layer.q_proj is None and layer.in_proj is not None
    with ops.use_backends(gdn="pallas_gpu"):
        o, new = step(layer, x, seg, cache)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    for a, b in zip(new, c_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,two_rows,wide", [(1, True, False), (2, False, False), (1, True, True), (2, False, True)])
def test_attention_decode_step_kernels_equal_xla(B, two_rows, wide, monkeypatch):
    """An SWA layer's one-token step through the decode kernels (split ring, then the combine kernel writing the ring
    in place; interpret mode, 4-slot key blocks so the tiny ring spans several) equals the XLA step, ring included.
    ``wide``: 16 query heads of 32 channels, where the kernels read the fused projection and rotate q and k
    themselves (``ops.attention_decode_rotary``); otherwise XLA rotates before them."""
    from infinitevl_jax import ops
    from infinitevl_jax.config import SWA
    from infinitevl_jax.inference.cache import AttentionCache
    from infinitevl_jax.modeling import layers
    from infinitevl_jax.modeling.attention import Attention
    from infinitevl_jax.modeling.rope import mrope_cos_sin
    from pallas_kernels.sliding_window_attention import cache as swa_cache

    monkeypatch.setattr(layers, "SINGLE_ROW_AS_TWO", two_rows)
    monkeypatch.setattr(swa_cache, "DECODE_BLOCK_K", 4)
    calls = []
    rotary_kernels = swa_cache.decode_attend_and_write_rotary_pallas
    monkeypatch.setattr(swa_cache, "decode_attend_and_write_rotary_pallas",
                        lambda *a, **k: calls.append(1) or rotary_kernels(*a, **k))
    heads = dict(num_attention_heads=16, num_key_value_heads=2, head_dim=32, mrope_section=(4, 6, 6)) if wide else {}
    c = tiny_infinitevl(**heads).text
    layer = Attention(c, SWA, rngs=nnx.Rngs(3))
    L, hkv, d = c.sliding_window - 1, c.num_key_value_heads, c.head_dim
    ks = jax.random.split(jax.random.key(B), 3)
    p = 3 * L + 2  # a wrapped ring: slot i holds the latest position = i mod L
    slots = np.arange(L)
    cache = AttentionCache(jax.random.normal(ks[0], (B, L, hkv, d)), jax.random.normal(ks[1], (B, L, hkv, d)),
                           jnp.asarray(np.broadcast_to(p - 1 - (p - 1 - slots) % L, (B, L)), jnp.int32))
    x = jax.random.normal(ks[2], (B, 1, c.hidden_size))
    qpos = jnp.full((B, 1), p, jnp.int32)
    cos, sin = mrope_cos_sin(jnp.broadcast_to(qpos[None], (3, B, 1)), c.head_dim, c.rope_theta, c.mrope_section)
    step = nnx.jit(lambda m, x, cache: m.step(x, cos=cos, sin=sin, q_positions=qpos, cache=cache))
    with ops.use_backends(attention="xla"):
        o_ref, c_ref = step(layer, x, cache)
    layer.fuse_projections()
    with ops.use_backends(attention="pallas_gpu"):
        o, new = step(layer, x, cache)
    assert len(calls) == int(wide)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    for a, b in zip(new, c_ref):  # the new key rotated in the kernel: float32 rounding apart from XLA's rotary
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 if wide else 0)


def test_split_copies_only_the_blocks_and_consume_frees_them():
    model = InfiniteVLForConditionalGeneration(tiny_infinitevl(), rngs=nnx.Rngs(2))
    n = model.config.text.num_hidden_layers // 4
    stacked = nnx.state(model.language_model.layers.blocks)
    stacked_leaves = jax.tree.leaves(stacked)
    stacked_bytes = sum(x.nbytes for x in stacked_leaves)
    others = {id(x) for x in jax.tree.leaves(nnx.state(model))} - {id(x) for x in stacked_leaves}

    prepared = engine.prepare(model)
    ids = {id(x) for x in prepared.state}
    assert others <= ids  # embeddings, vision tower, norms: shared, not copied
    assert not ids & {id(x) for x in stacked_leaves}  # the stacked blocks are not held
    assert prepared.nbytes() == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    unfused = engine.prepare(model, fuse=False)
    assert len(unfused.state) == len(jax.tree.leaves(nnx.state(model))) + (n - 1) * len(stacked_leaves)
    # fused: per block, GDN's 6 projections and 3 conv kernels -> 2 arrays (x3 layers), attention's q/k/v kernels
    # and biases -> 2, each MLP's gate and up -> 1
    assert len(prepared.state) == len(unfused.state) - n * (3 * 7 + 4 + 4)
    assert unfused.nbytes() == prepared.nbytes()
    del unfused
    assert engine.prepare(prepared) is prepared
    assert engine.split(model)[0] == prepared.graphdef and hash(engine.split(model)[0]) == hash(prepared.graphdef)
    assert nnx.state(model.language_model.layers.blocks) is not None  # the model itself is untouched
    del prepared

    # consume=True: each stacked array is deleted once sliced, so the live bytes do not grow
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    before = sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())
    prepared = engine.prepare(model, consume=True)
    after = sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())
    assert all(x.is_deleted() for x in stacked_leaves)
    assert after == before, (after, before, stacked_bytes)


def signature(tree):
    return [(x.dtype, x.weak_type, x.shape, x.sharding, x.committed, x.format) for x in jax.tree.leaves(tree)]


def test_cache_matches_step_outputs_and_nothing_recompiles(hybrid):
    """``init_cache`` returns arrays placed like a step's outputs (committed, same sharding and layout), so weights
    restored onto the device (committed) do not make the second step compile again."""
    prepared = engine.prepare(hybrid)
    state = jax.device_put(prepared.state, jax.devices()[0])  # committed, as checkpoint.load restores them
    graphdef, cfg = prepared.graphdef, hybrid.config
    cache = init_cache(cfg, 1)
    first = signature(cache)
    ids = jnp.zeros((1, CHUNK), jnp.int32)
    embeds = engine.embed(graphdef, state, ids, {})
    pos = jnp.zeros((3, 1, CHUNK), jnp.int32)
    seg = jnp.ones((1, CHUNK), jnp.int32)
    logits, cache = engine.prefill_step(graphdef, state, cache, embeds, pos, seg)
    assert signature(cache) == first
    n = COMPILES.n
    logits, cache = engine.prefill_step(graphdef, state, cache, embeds, pos, seg)
    assert COMPILES.n == n
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    tok, _, cache = engine.decode_step(graphdef, state, cache, tok, jax.random.key(0), 0.0, 1.0, top_k=0, greedy=True)
    n = COMPILES.n
    for _ in range(3):
        tok, _, cache = engine.decode_step(graphdef, state, cache, tok, jax.random.key(0), 0.0, 1.0, top_k=0,
                                           greedy=True)
    assert COMPILES.n == n and signature(cache) == first

    # generate: a second call with the same shapes compiles nothing
    kw = dict(max_new_tokens=5, prefill_chunk=CHUNK, stop_tokens=())
    a = generate(prepared, {"input_ids": np.arange(9, dtype=np.int32)}, **kw)
    n = COMPILES.n
    b = generate(prepared, {"input_ids": np.arange(9, dtype=np.int32)}, **kw)
    assert COMPILES.n == n
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], generate(hybrid, {"input_ids": np.arange(9, dtype=np.int32)}, **kw)[0])


def frame(i, px):
    return Image.fromarray(np.random.RandomState(i).randint(0, 255, (px, px, 3), np.uint8))


def assert_same_stream(a: StreamingSession, b: StreamingSession, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0),
                 a.cache, b.cache)
    assert (a.num_frames, a.span_max, a.base) == (b.num_frames, b.span_max, b.base)
    for key in a.history:
        for x, y in zip(a.history[key], b.history[key], strict=True):
            np.testing.assert_array_equal(x, y)


def test_grouped_streaming_equals_frame_by_frame(hybrid, processor, k=4):
    """Groups of ``k`` frames per program (vision tower per frame, one LM chunk) give the frame-by-frame stream:
    56 px frames (4 tokens each, 4 vision windows), a 28 px frame breaking a group, leftovers one at a time."""
    sizes = [56] * 6 + [28] + [56] * 5  # 4 | 2 singly, 28 singly | 4 | 1 singly
    frames = [frame(i, px) for i, px in enumerate(sizes)]
    one = StreamingSession(hybrid, processor, prefill_chunk=CHUNK, record=True)
    grouped = StreamingSession(hybrid, processor, prefill_chunk=CHUNK, record=True, frames_per_step=k)
    for f in frames[:7]:
        last_one = one.add_frames([f])
    last_grouped = grouped.add_frames(frames[:7])
    np.testing.assert_allclose(np.asarray(last_grouped), np.asarray(last_one), atol=1e-5, rtol=0)
    ts = [3.5 + 0.5 * i for i in range(5)]
    last_one = one.add_frames(frames[7:], timestamps=ts)
    last_grouped = grouped.add_frames(frames[7:], timestamps=ts)
    np.testing.assert_allclose(np.asarray(last_grouped), np.asarray(last_one), atol=1e-5, rtol=0)
    assert_same_stream(one, grouped)


def test_grouped_streaming_is_flat(hybrid, processor):
    """Memory and compilations stay flat over groups; the session keeps no stacked weights."""
    session = StreamingSession(hybrid, processor, prefill_chunk=CHUNK, frames_per_step=4)
    stacked = {id(x) for x in jax.tree.leaves(nnx.state(hybrid.language_model.layers.blocks))}
    assert not stacked & {id(x) for x in session.state}
    frames = [frame(i, 56) for i in range(8)]
    logits = session.add_frames(frames)  # held, as in the loop
    jax.block_until_ready(logits)
    n = COMPILES.n
    base = sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())
    for r in range(6):
        logits = session.add_frames(frames)
        assert sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted()) <= base
    assert COMPILES.n == n
    assert session.num_frames == 56


def test_infinitevl_wrapper_holds_prepared_weights(hybrid, processor):
    vl = InfiniteVL(hybrid, processor)
    assert isinstance(vl.model, engine.InferenceModel) and vl.model.config is hybrid.config
    session = vl.stream(frames_per_step=4, prefill_chunk=CHUNK)
    assert session.model is vl.model
    session.add_frames([frame(i, 56) for i in range(4)])
    assert session.num_frames == 4
