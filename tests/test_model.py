"""Model-level behaviour: padding and packing, parameter counts, host-side validation, checkpoint key errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax import config as C
from infinitevl_jax.checkpoint import CheckpointMismatchError, load_hf_state_dict
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration, prepare_inputs
from model_inputs import IMAGE_GRID, multimodal_batch, span


@nnx.jit
def _forward(model, inputs):
    return model.forward(**inputs)


def _logits(model, **kw):
    return np.asarray(_forward(model, prepare_inputs(model.config, **kw)))


@pytest.fixture(scope="module")
def hybrid():
    return InfiniteVLForConditionalGeneration(C.tiny_infinitevl(num_hidden_layers=4, sliding_window=8), rngs=nnx.Rngs(0))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_left_and_right_padding_match_unpadded(hybrid):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 900, 23), rng.integers(0, 900, 17)
    alone_a = _logits(hybrid, input_ids=a[None])[0]
    alone_b = _logits(hybrid, input_ids=b[None])[0]
    pad = hybrid.config.pad_token_id
    for side in ("left", "right"):
        n = len(a) - len(b)
        row_b = np.concatenate([[pad] * n, b]) if side == "left" else np.concatenate([b, [pad] * n])
        mask_b = (np.arange(len(a)) >= n) if side == "left" else (np.arange(len(a)) < len(b))
        out = _logits(hybrid, input_ids=np.stack([a, row_b]), attention_mask=np.stack([np.ones(len(a)), mask_b]))
        assert _rel(out[0], alone_a) < 1e-5
        assert _rel(out[1][mask_b.astype(bool)], alone_b) < 1e-5, side


def test_packed_documents_match_separate_runs(hybrid):
    cfg = hybrid.config
    rng = np.random.default_rng(1)
    doc1 = np.concatenate([rng.integers(0, 900, 5), span(cfg, cfg.image_token_id, IMAGE_GRID), rng.integers(0, 900, 4)])
    doc2 = rng.integers(0, 900, 19)
    pixels = rng.standard_normal((int(np.prod(IMAGE_GRID)), cfg.vision.patch_dim)).astype(np.float32)
    grid = np.array([IMAGE_GRID])
    alone1 = _logits(hybrid, input_ids=doc1[None], pixel_values=pixels, image_grid_thw=grid)[0]
    alone2 = _logits(hybrid, input_ids=doc2[None])[0]
    packed = np.concatenate([doc1, doc2, [cfg.pad_token_id] * 3])[None]
    seg = np.concatenate([np.ones(len(doc1)), np.full(len(doc2), 2), np.zeros(3)])[None].astype(np.int32)
    out = _logits(hybrid, input_ids=packed, segment_ids=seg, pixel_values=pixels, image_grid_thw=grid,
                  pad_patches_to=2 * pixels.shape[0])[0]  # bucket-padded patch list, as the data pipeline packs it
    assert _rel(out[: len(doc1)], alone1) < 1e-5
    assert _rel(out[len(doc1) : len(doc1) + len(doc2)], alone2) < 1e-5


@pytest.mark.parametrize("name,expected", [("infinitevl_4b", 4_408_381_536), ("qwen2_5_vl_3b", 3_754_622_976)])
def test_full_size_parameter_count(name, expected):
    model = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(C.preset(name), rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == expected


def test_layer_pattern_is_scanned_by_period():
    cfg = C.infinitevl_4b()
    model = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    stack = model.language_model.layers
    assert (stack.period, stack.num_blocks) == (4, 9)
    assert stack.blocks.layers[0].self_attn.q_proj.kernel.shape == (9, 2048, 2048)
    assert stack.blocks.layers[1].self_attn.v_conv1d.shape == (9, 4, 4096)
    teacher = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(C.qwen2_5_vl_3b(), rngs=nnx.Rngs(0)))
    assert (teacher.language_model.layers.period, teacher.language_model.layers.num_blocks) == (1, 36)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("mutate,message", [
    (lambda b, c: b["input_ids"].__setitem__((1, -1), c.text.vocab_size + 5), "outside the vocabulary"),
    (lambda b, c: b["input_ids"].__setitem__((0, 5), c.image_token_id), "image pad token"),
    (lambda b, c: b.update(image_grid_thw=np.array([[1, 12, 12]])), "rows"),
    (lambda b, c: b.update(video_grid_thw=np.array([[2, 3, 8]]),
                           pixel_values_videos=np.zeros((48, c.vision.patch_dim), np.float32)), "merge"),
    (lambda b, c: b.update(pixel_values_videos=None, video_grid_thw=None), "no video pixels"),
])
def test_validation_errors_name_the_problem(mutate, message):
    cfg = C.tiny_infinitevl()
    batch = multimodal_batch(cfg)
    mutate(batch, cfg)
    with pytest.raises(ValueError, match=message):
        prepare_inputs(cfg, **batch)


def test_checkpoint_key_errors_are_reported_together():
    cfg = C.tiny_infinitevl(num_hidden_layers=4)
    model = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    from infinitevl_jax import hf_names

    sd = {hf_names.hf_name(e.hf): np.zeros(e.hf_shape, np.float32) for e in hf_names.entries(cfg)}
    del sd["model.language_model.layers.1.self_attn.A_log"]
    sd["model.language_model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    sd["model.language_model.layers.0.self_attn.rotary.inv_freq"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf_state_dict(model, sd)
    text = str(err.value)
    assert "1 missing: layers.1.self_attn.A_log" in text
    assert "1 unexpected: model.language_model.layers.0.self_attn.rotary.inv_freq" in text
    assert "layers.0.self_attn.q_proj.weight: checkpoint (3, 3)" in text


def test_legacy_and_current_layouts_load_the_same():
    from infinitevl_jax import hf_names

    cfg = C.tiny_infinitevl(num_hidden_layers=4)
    rng = np.random.default_rng(0)
    tensors = {e.hf: rng.standard_normal(e.hf_shape).astype(np.float32) for e in hf_names.entries(cfg)}
    states = []
    for layout in ("current", "legacy"):
        model = InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        load_hf_state_dict(model, {hf_names.hf_name(k, layout): v for k, v in tensors.items()})
        states.append(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *states)
    gdn = states[0]["language_model"]["layers"]["blocks"]["layers"][1]["self_attn"]
    np.testing.assert_array_equal(np.asarray(gdn["A_log"][...])[0], tensors["text:layers.1.self_attn.A_log"])


def test_traced_program_does_not_grow_with_depth():
    """The stack is one scanned block: 4 and 12 hybrid layers trace to programs of the same size."""
    sizes = []
    for layers in (4, 12):
        cfg = C.tiny_infinitevl(num_hidden_layers=layers)
        model = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((1, 32), np.int32)
        pos = jax.ShapeDtypeStruct((3, 1, 32), np.int32)
        fwd = lambda s, i, p: nnx.merge(graphdef, s).forward(i, position_ids=p)
        sizes.append(len(jax.make_jaxpr(fwd)(state, ids, pos).jaxpr.eqns))
    assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 48), (2, 1, 48), (3, 5, 48)])
def test_single_row_products_run_as_two_row_gemms(shape, monkeypatch):
    import jax.numpy as jnp

    from infinitevl_jax.modeling import layers

    monkeypatch.setattr(layers, "SINGLE_ROW_AS_TWO", True)
    lin = layers.linear(48, 40, ("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), shape)
    want = x @ lin.kernel[...] + lin.bias[...]
    np.testing.assert_allclose(lin(x), want, rtol=1e-6, atol=1e-6)
    dots = [e for e in jax.make_jaxpr(lin)(x).jaxpr.eqns if e.primitive.name == "dot_general"]
    rows = int(np.prod(shape[:-1]))
    assert [tuple(e.invars[0].aval.shape) for e in dots] == [(2, 48) if rows == 1 else shape]
    monkeypatch.setattr(layers, "SINGLE_ROW_AS_TWO", False)
    dots = [e for e in jax.make_jaxpr(lambda x: lin(x))(x).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [tuple(e.invars[0].aval.shape) for e in dots] == [shape]
