"""Weight conversion: HF directories -> our Orbax checkpoints -> HF again, against transformers / PyTorch oracles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from infinitevl_jax import checkpoint as ckpt  # noqa: E402
from infinitevl_jax import config as C  # noqa: E402
from infinitevl_jax import convert  # noqa: E402
from infinitevl_jax import hf_names  # noqa: E402
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration, prepare_inputs  # noqa: E402
from model_inputs import multimodal_batch  # noqa: E402
from torch_oracles import tiny_hf_model, to_torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HYBRID_TYPES = ["sliding_attention", "linear_attention", "linear_attention", "linear_attention"]


# ------------------------------------------------------------------------------------------------------ fixtures
def _configs(kind: str, tie: bool) -> tuple[C.InfiniteVLConfig, torch.nn.Module]:
    if kind == "infinite_vl":
        cfg = C.tiny_infinitevl(num_hidden_layers=4, tie_word_embeddings=tie)
        hf = tiny_hf_model(cfg, tie=tie, layer_types=["sliding_attention"] + ["full_attention"] * 3,
                           gdn_layers=[1, 2, 3])
    else:
        cfg = C.tiny_qwen2_5_vl(num_hidden_layers=2, tie_word_embeddings=tie)
        hf = tiny_hf_model(cfg, tie=tie)
    return cfg, hf


_MODELS: dict = {}


def hf_model(kind: str, tie: bool):
    if (kind, tie) not in _MODELS:
        _MODELS[kind, tie] = _configs(kind, tie)
    return _MODELS[kind, tie]


def write_hf_dir(path, kind="infinite_vl", *, tie=True, layout="current", shards=1, dtype=np.float32,
                 keep_head=False, fmt="safetensors"):
    """A Hugging Face directory written with the safetensors library (independent of our writer)."""
    cfg, hf = hf_model(kind, tie)
    os.makedirs(path)
    tensors = {}
    for name, value in hf.state_dict().items():
        canon = hf_names.canonical_name(name)
        if canon == "lm_head.weight" and tie and not keep_head:
            continue  # the hub omits a tied head
        key = hf_names.hf_name(canon, layout)
        tensors[key] = value.detach().float().numpy().astype(dtype)
    if kind == "qwen2_5_vl":
        raw = hf.config.to_dict()  # transformers' own (nested) config.json
    else:
        raw = convert.hf_config_dict(cfg, "float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    for side in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        with open(os.path.join(path, side), "w") as f:
            f.write("{}")
    if fmt == "bin":
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(path, "pytorch_model.bin"))
        return cfg, hf, tensors
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::shards]}
            save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return cfg, hf, tensors


def text_inputs(cfg, seed=0):
    ids = np.random.default_rng(seed).integers(0, 900, (2, 12)).astype(np.int32)
    return prepare_inputs(cfg, ids)


def logits(model, inputs):
    return np.asarray(jax.jit(lambda s, i: nnx.merge(nnx.graphdef(model), s).forward(**i))(
        nnx.state(model), inputs))


def params(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def direct_model(cfg, tensors):
    model = InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    ckpt.load_hf_state_dict(model, tensors)
    return model


# ------------------------------------------------------------------------------------------------------ 1. convert
@pytest.mark.parametrize("kind,tie,layout,shards", [
    ("infinite_vl", True, "current", 1),
    ("infinite_vl", False, "legacy", 3),
    ("qwen2_5_vl", True, "legacy", 2),
    ("qwen2_5_vl", False, "current", 1),
])
def test_convert_and_load_match_direct_state_dict(tmp_path, kind, tie, layout, shards):
    cfg, _, tensors = write_hf_dir(tmp_path / "hf", kind, tie=tie, layout=layout, shards=shards)
    assert convert.main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    for side in ("config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / side).exists(), side
    assert ckpt.read_config(out) == C.InfiniteVLConfig.from_hf(tmp_path / "hf")
    model = ckpt.load(out)
    direct = direct_model(model.config, tensors)
    ours, ref = params(model), params(direct)
    assert ours.keys() == ref.keys()
    for p in ours:
        assert ours[p].dtype == np.float32
        np.testing.assert_array_equal(ours[p], ref[p], err_msg=str(p))
    inputs = text_inputs(model.config)
    np.testing.assert_array_equal(logits(model, inputs), logits(direct, inputs))


def test_bfloat16_and_pickle_input(tmp_path):
    cfg, _, tensors = write_hf_dir(tmp_path / "hf", fmt="bin", keep_head=True)
    args = ["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--dtype", "bfloat16", "--quiet"]
    assert convert.main(args + ["--allow-pickle"]) == 0
    model = ckpt.load(tmp_path / "out")
    ref = params(direct_model(cfg, tensors))
    for p, value in params(model).items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, ref[p].astype(jnp.bfloat16), err_msg=str(p))


# ------------------------------------------------------------------------------------------------------ 2. round trip
@pytest.mark.parametrize("kind,layout", [("infinite_vl", "current"), ("qwen2_5_vl", "legacy")])
def test_round_trip_changed_params_back_to_pytorch(tmp_path, kind, layout):
    """Convert, change every parameter, save, export: PyTorch loads the export and agrees with our model."""
    cfg, hf, _ = write_hf_dir(tmp_path / "hf", kind, tie=kind == "qwen2_5_vl", shards=2)
    assert convert.main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "conv"), "--quiet"]) == 0
    model = ckpt.load(tmp_path / "conv")
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.01 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    ckpt.save(tmp_path / "trained", model)
    for side in ("config.json", "tokenizer.json"):  # a trained checkpoint dir has no side files: export without them
        assert not (tmp_path / "trained" / side).exists()
    assert convert.main(["--to-hf", "--ckpt", str(tmp_path / "trained"), "--out", str(tmp_path / "export"),
                         "--layout", layout, "--max-shard-size", "300KB", "--quiet"]) == 0
    export = tmp_path / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    if kind == "qwen2_5_vl":  # transformers reads our config.json and shards on its own
        from transformers import Qwen2_5_VLForConditionalGeneration

        torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            export, dtype=torch.float32, attn_implementation="eager").eval()
    else:  # no transformers class: the PyTorch oracle with the release's names, strict load
        torch_model = tiny_hf_model(cfg, tie=cfg.text.tie_word_embeddings, gdn_layers=[1, 2, 3], seed=3,
                                    layer_types=["sliding_attention"] + ["full_attention"] * 3)
        sd = {}
        for fname in sorted(set(index["weight_map"].values())):
            sd.update(load_file(export / fname))
        assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in sd)
        torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    # every PyTorch tensor equals ours exactly
    back = direct_model(model.config, torch_model.state_dict())
    ours, theirs = params(model), params(back)
    for p in ours:
        np.testing.assert_array_equal(ours[p], theirs[p], err_msg=str(p))
    # logits of the PyTorch model equal ours (multimodal batch: the vision tower is exercised too)
    batch = multimodal_batch(model.config, pad_left=0)
    inputs = prepare_inputs(model.config, **batch)
    with torch.no_grad():
        ref = torch_model(
            input_ids=to_torch(batch["input_ids"], torch.long), pixel_values=to_torch(batch["pixel_values"]),
            image_grid_thw=to_torch(batch["image_grid_thw"], torch.long),
            pixel_values_videos=to_torch(batch["pixel_values_videos"]),
            video_grid_thw=to_torch(batch["video_grid_thw"], torch.long),
            second_per_grid_ts=to_torch(batch["second_per_grid_ts"], torch.float32),
            position_ids=to_torch(np.asarray(inputs["position_ids"]), torch.long),
        ).logits.float().numpy()
    np.testing.assert_allclose(logits(model, inputs), ref, atol=1e-4, rtol=0)
    assert C.InfiniteVLConfig.from_hf(export) == model.config


def test_verify_prints_max_logit_difference(tmp_path, capsys):
    write_hf_dir(tmp_path / "hf", "qwen2_5_vl", tie=True)
    os.remove(tmp_path / "hf" / "tokenizer.json")  # no tokenizer: fixed token ids
    assert convert.main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--verify",
                         "--quiet"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("verify:")][0]
    assert float(line.rsplit("=", 1)[1]) < 1e-4


# ------------------------------------------------------------------------------------------------------ 3. errors
def _fails(capsys, tmp_path, args, *needles, code=1):
    out = tmp_path / "out"
    assert convert.main(args + ["--out", str(out), "--quiet"]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]
    return err


def test_error_missing_files(tmp_path, capsys):
    hf = tmp_path / "hf"
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], f"{hf}: no such directory")
    write_hf_dir(hf, shards=2)
    shard = hf / "model-00002-of-00002.safetensors"
    os.remove(shard)
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], f"{shard}: file not found")
    os.remove(hf / "model.safetensors.index.json")
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], "no model.safetensors")
    os.remove(hf / "config.json")
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], f"{hf / 'config.json'}: not found")
    _fails(capsys, tmp_path, ["--to-hf", "--ckpt", str(hf)], f"{hf / ckpt.CONFIG_FILE}: not found")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_error_damaged_safetensors(tmp_path, capsys, damage):
    hf = tmp_path / "hf"
    write_hf_dir(hf)
    file = hf / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000] if damage == "truncated" else data[:8] + b"\x00garbage" + data[16:])
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], f"{file}: not a readable safetensors file")


def test_error_config_does_not_match_tensors(tmp_path, capsys):
    hf = tmp_path / "hf"
    write_hf_dir(hf)
    raw = json.loads((hf / "config.json").read_text())
    raw["intermediate_size"] = 128
    (hf / "config.json").write_text(json.dumps(raw))
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], "mis-shaped", "model.language_model.layers.0.mlp.up_proj.weight")


def test_error_missing_and_unexpected_keys(tmp_path, capsys):
    hf = tmp_path / "hf"
    _, _, tensors = write_hf_dir(hf)
    del tensors["model.language_model.layers.2.self_attn.A_log"]
    tensors["model.language_model.layers.2.self_attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, hf / "model.safetensors")
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], "1 missing: layers.2.self_attn.A_log",
           "1 unexpected: model.language_model.layers.2.self_attn.extra.weight")


def test_error_unsupported_dtypes(tmp_path, capsys):
    hf = tmp_path / "hf"
    _, _, tensors = write_hf_dir(hf)
    _fails(capsys, tmp_path, ["--hf-dir", str(hf), "--dtype", "float16"], "--dtype float16 is not supported")
    tensors["model.language_model.norm.weight"] = tensors["model.language_model.norm.weight"].astype(np.int8)
    save_file(tensors, hf / "model.safetensors")
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], "model.language_model.norm.weight has unsupported dtype I8")


def test_error_pickle_refused_and_existing_output_kept(tmp_path, capsys):
    hf = tmp_path / "hf"
    write_hf_dir(hf, fmt="bin")
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], f"{hf / 'pytorch_model.bin'} is a pickle checkpoint",
           "--allow-pickle")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep").write_text("x")
    assert convert.main(["--hf-dir", str(hf), "--allow-pickle", "--out", str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err and (out / "keep").read_text() == "x"


def test_error_while_writing_removes_partial_output(tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hf"
    write_hf_dir(hf)
    real, calls = ckpt.HFCheckpointReader.read, []

    def failing(self, key):
        calls.append(key)
        if len(calls) == 20:
            raise ckpt.CheckpointError(f"{self.file_of[key]}: cannot read tensor {key} (disk error)")
        return real(self, key)

    monkeypatch.setattr(ckpt.HFCheckpointReader, "read", failing)
    _fails(capsys, tmp_path, ["--hf-dir", str(hf)], "cannot read tensor", "(disk error)")
    assert len(calls) == 20


def test_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), "--hf-dir",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such directory"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ 5. mesh
_SHARDED = textwrap.dedent("""
    import sys, numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    from infinitevl_jax import checkpoint as ckpt
    from infinitevl_jax.modeling.model import prepare_inputs
    assert jax.device_count() == 8
    path = sys.argv[1]
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

    def fsdp(abstract, mesh):  # shard each parameter's largest axis divisible by 8 (FSDP), replicate the rest
        out = {}
        for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
            axes = [i for i in np.argsort(v.shape)[::-1] if v.shape[i] % 8 == 0]
            spec = [None] * len(v.shape)
            if axes:
                spec[axes[0]] = "fsdp"
            out[p] = NamedSharding(mesh, P(*spec))
        return out

    try:  # the project's logical-axis rules when present, else the plain FSDP rule above
        from infinitevl_jax import sharding
        mesh = sharding.make_mesh((1, 8, 1))
        sharded = ckpt.load(path, mesh)
    except ImportError:
        sharded = ckpt.load(path, mesh, shardings=fsdp)
    flat = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
    emb = flat[("language_model", "embed_tokens", "embedding")][...]
    assert "fsdp" in emb.sharding.spec and len(emb.addressable_shards) == 8, emb.sharding
    assert emb.addressable_shards[0].data.size == emb.size // 8
    plain = ckpt.load(path)
    ids = np.random.default_rng(0).integers(0, 900, (2, 12)).astype(np.int32)
    inputs = prepare_inputs(plain.config, ids)
    run = lambda m: np.asarray(jax.jit(lambda s, i: nnx.merge(nnx.graphdef(m), s).forward(**i))(nnx.state(m), inputs))
    b = run(plain)
    with jax.set_mesh(mesh):
        a = run(sharded)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    print("OK", np.abs(a - b).max())
""")


def test_restore_into_fsdp_sharding_on_8_devices(tmp_path):
    write_hf_dir(tmp_path / "hf")
    assert convert.main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
