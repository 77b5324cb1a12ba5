"""Constant memory while streaming: device bytes flat and no compilation after the first frame."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax.config import tiny_infinitevl
from infinitevl_jax.inference import engine, init_cache
from infinitevl_jax.inference.streaming import StreamingSession
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration, prepare_inputs
from infinitevl_jax.processing import Processor
from infinitevl_jax.processing.testing import write_tiny_processor_dir


def _frame(i):
    return Image.fromarray(np.random.RandomState(i).randint(0, 255, (28, 28, 3), np.uint8))


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


@pytest.mark.parametrize("num_frames", [300, pytest.param(10_000, marks=pytest.mark.slow)])
def test_stream_memory_and_compilations_are_flat(tmp_path, num_frames):
    model = InfiniteVLForConditionalGeneration(tiny_infinitevl(), rngs=nnx.Rngs(0))
    processor = Processor.from_pretrained(write_tiny_processor_dir(tmp_path, model.config, min_pixels=28 * 28))
    session = StreamingSession(model, processor, prefill_chunk=16)
    first = processor.process_image(_frame(0))
    assert first["image_grid_thw"].tolist() == [[1, 2, 2]]  # one token per frame
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    logits = session.add_frames([_frame(0)])  # held, as in the loop
    n_compiles, base_bytes = len(compiles), live_bytes()
    t0 = time.time()
    for i in range(1, num_frames):
        logits = session.add_frames([_frame(i)])
        if i % 1000 == 0 or i == num_frames - 1:
            assert live_bytes() <= base_bytes, (i, live_bytes(), base_bytes)
    rate = (num_frames - 1) / (time.time() - t0)
    assert len(compiles) == n_compiles, compiles[n_compiles:]
    assert session.cache.length[0] == session.cache.length[0]  # materialised
    print(f"{num_frames} frames at {rate:.0f} frames/s on CPU, {base_bytes} live device bytes")

    # The same stream as one prompt, embedded in batches of frames and prefilled 64 tokens at a time.
    graphdef, state = nnx.split(model)
    header = np.asarray(processor.tokenizer.encode(
        f"<|im_start|>system\n{processor.default_system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"), np.int32)
    parts = [engine.embed(graphdef, state, jnp.asarray(header[None]), {})]
    for s in range(0, num_frames, 500):
        n = min(500, num_frames - s)
        media = processor.process_media([_frame(i) for i in range(s, s + n)])
        prep = prepare_inputs(model.config, np.full((1, n), model.config.image_token_id, np.int32),
                              pixel_values=media["pixel_values"], image_grid_thw=media["image_grid_thw"],
                              position_ids=np.zeros((3, 1, n), np.int32))
        parts.append(engine.embed(graphdef, state, prep["input_ids"], {"pixel_values": prep["pixel_values"],
                                                                       "image_layout": prep["image_layout"]}))
    embeds = jnp.concatenate(parts, axis=1)
    t = np.arange(num_frames) // 1 + len(header)  # 2 fps, 2 temporal positions per second: +1 per frame
    pos = np.concatenate([np.broadcast_to(np.arange(len(header)), (3, len(header))),
                          np.stack([t, np.full(num_frames, len(header)), np.full(num_frames, len(header))])], axis=1)
    T = embeds.shape[1]
    ref, _ = engine.prefill(graphdef, state, init_cache(model.config, 1), embeds, pos[:, None].astype(np.int32),
                            np.ones((1, T), np.int32), chunk=64)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4)
