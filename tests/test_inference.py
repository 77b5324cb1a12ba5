"""Inference on tiny float32 models: cached prefill/decode against the full forward, batching, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax.config import tiny_infinitevl, tiny_qwen2_5_vl
from infinitevl_jax.inference import engine, generate, init_cache
from infinitevl_jax.inference.generate import cache_max_length
from infinitevl_jax.inference.streaming import StreamingSession
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration
from infinitevl_jax.processing import Processor
from infinitevl_jax.processing.testing import write_tiny_processor_dir

CHUNK = 16  # one prefill program for every test


@pytest.fixture(scope="module")
def hybrid():
    return InfiniteVLForConditionalGeneration(tiny_infinitevl(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def teacher():
    return InfiniteVLForConditionalGeneration(tiny_qwen2_5_vl(num_hidden_layers=2), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def processor(tmp_path_factory, hybrid):
    path = write_tiny_processor_dir(tmp_path_factory.mktemp("proc"), hybrid.config, min_pixels=28 * 28,
                                    max_pixels=56 * 56)
    return Processor.from_pretrained(path)


def full_logits(model, ids):
    graphdef, state = nnx.split(model)
    T = ids.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, None], (3, 1, T))
    fwd = jax.jit(lambda s, i, p: nnx.merge(graphdef, s).forward(i, position_ids=p))
    return np.asarray(fwd(state, jnp.asarray(ids), pos))


@pytest.mark.parametrize("which", ["hybrid", "teacher"])
def test_prefill_then_decode_matches_full_forward(request, which):
    """Chunked prefill of P tokens then one decode step per token; the window (16, ring of 15) wraps 3 times."""
    model = request.getfixturevalue(which)
    cfg = model.config
    T, P = 64, 20  # P > CHUNK: two prefill chunks, the first left-padded
    ids = np.random.RandomState(0).randint(0, cfg.text.vocab_size - 20, (1, T)).astype(np.int32)
    full = full_logits(model, ids)
    graphdef, state = nnx.split(model)
    cache = init_cache(cfg, 1, max_length=cache_max_length(cfg, T, 0))
    pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, 1, T))
    embeds = engine.embed(graphdef, state, jnp.asarray(ids[:, :P]), {})
    logits, cache = engine.prefill(graphdef, state, cache, embeds, pos[:, :, :P], np.ones((1, P), np.int32),
                                   chunk=CHUNK)
    errs = [np.abs(np.asarray(logits) - full[:, P - 1]).max()]
    for t in range(P, T):
        _, logits, cache = engine.decode_step(graphdef, state, cache, jnp.asarray(ids[:, t]), jax.random.key(0),
                                              0.0, 1.0, top_k=0, greedy=True)
        errs.append(np.abs(np.asarray(logits) - full[:, t]).max())
    assert max(errs) < 1e-4, max(errs)
    assert int(cache.length[0]) == T
    assert engine.decode_step._cache_size() >= 1


def test_decode_step_compiler_options_per_platform(hybrid, monkeypatch):
    """The decode step compiles with its platform's entry of ``DECODE_COMPILER_OPTIONS`` (a GEMM-autotuning option,
    which the CPU compiler accepts and ignores) and gives the same tokens as without options."""
    kw = dict(max_new_tokens=6, prefill_chunk=CHUNK, stop_tokens=())
    ids = np.random.RandomState(3).randint(0, 900, 9).astype(np.int32)
    monkeypatch.setitem(engine.DECODE_COMPILER_OPTIONS, jax.default_backend(), {})
    plain = generate(hybrid, {"input_ids": ids}, **kw)[0]
    before = dict(engine.decode_step._jits)
    monkeypatch.setitem(engine.DECODE_COMPILER_OPTIONS, jax.default_backend(), engine.EXHAUSTIVE_GEMM_TILING)
    tuned = generate(hybrid, {"input_ids": ids}, **kw)[0]
    new = set(engine.decode_step._jits) - set(before)
    assert new == {(("xla_gpu_exhaustive_tiling_search", True),)}
    assert engine.decode_step._jits[new.pop()]._cache_size() == 1
    np.testing.assert_array_equal(tuned, plain)


def test_left_padded_batch_equals_one_by_one(hybrid):
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 900, n).astype(np.int32) for n in (5, 19, 12)]
    kw = dict(max_new_tokens=12, prefill_chunk=CHUNK, stop_tokens=())
    single = [generate(hybrid, {"input_ids": p}, **kw)[0] for p in prompts]
    T = max(len(p) for p in prompts)
    ids = np.stack([np.pad(p, (T - len(p), 0)) for p in prompts])
    mask = np.stack([np.pad(np.ones(len(p), np.int32), (T - len(p), 0)) for p in prompts])
    batch = generate(hybrid, {"input_ids": ids, "attention_mask": mask}, **kw)
    for a, b in zip(single, batch):
        np.testing.assert_array_equal(a, b)


def test_sampling_and_stop_tokens(hybrid):
    prompt = {"input_ids": np.arange(7, dtype=np.int32)}
    greedy = generate(hybrid, prompt, max_new_tokens=6, prefill_chunk=CHUNK, stop_tokens=())[0]
    top1 = generate(hybrid, prompt, max_new_tokens=6, prefill_chunk=CHUNK, stop_tokens=(), temperature=0.7,
                    top_k=1, seed=3)[0]
    np.testing.assert_array_equal(greedy, top1)
    a = generate(hybrid, prompt, max_new_tokens=6, prefill_chunk=CHUNK, temperature=1.0, top_p=0.9, seed=5,
                 stop_tokens=())[0]
    b = generate(hybrid, prompt, max_new_tokens=6, prefill_chunk=CHUNK, temperature=1.0, top_p=0.9, seed=5,
                 stop_tokens=())[0]
    np.testing.assert_array_equal(a, b)
    stop = int(greedy[-1])
    stopped = generate(hybrid, prompt, max_new_tokens=6, prefill_chunk=CHUNK, stop_tokens=(stop,))[0]
    np.testing.assert_array_equal(stopped, greedy[: int(np.argmax(greedy == stop)) + 1])


def frames(n, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (28, 28, 3), np.uint8)) for _ in range(n)]


def test_streaming_equals_one_prefill_and_ask_is_pure(hybrid, processor):
    session = StreamingSession(hybrid, processor, prefill_chunk=CHUNK, record=True)
    stream = frames(40)  # 40 one-token frames: past two wraps of the ring buffer
    for f in stream:
        last = session.add_frames([f])
    inputs = session.recorded_inputs()
    graphdef, state = nnx.split(hybrid)
    from infinitevl_jax.modeling.model import prepare_inputs

    prep = prepare_inputs(hybrid.config, inputs["input_ids"][None], pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"], position_ids=inputs["position_ids"][:, None])
    embeds = engine.embed(graphdef, state, prep["input_ids"], {"pixel_values": prep["pixel_values"],
                                                               "image_layout": prep["image_layout"]})
    T = embeds.shape[1]
    cache = init_cache(hybrid.config, 1)
    ref, _ = engine.prefill(graphdef, state, cache, embeds, prep["position_ids"], np.ones((1, T), np.int32),
                            chunk=CHUNK)
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref), atol=1e-4)

    before = jax.tree.map(np.asarray, session.cache)
    answer = session.ask("what?", max_new_tokens=8, return_ids=True)
    after = jax.tree.map(np.asarray, session.cache)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    want = generate(hybrid, session.recorded_inputs("what?"), max_new_tokens=8, prefill_chunk=CHUNK,
                    stop_tokens=processor.stop_token_ids)[0]
    np.testing.assert_array_equal(answer, want)
    assert isinstance(session.ask("what?", max_new_tokens=3), str)
