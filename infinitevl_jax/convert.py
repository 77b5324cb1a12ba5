"""Weight conversion between Hugging Face PyTorch checkpoints and our Orbax checkpoints (``infinitevl convert``).

    infinitevl convert --hf-dir HF_DIR --out OUT [--dtype bfloat16|float32] [--allow-pickle] [--verify]
    infinitevl convert --to-hf --ckpt OUT --out HF_DIR [--layout current|legacy] [--max-shard-size 5GB]

HF -> Orbax streams: the reader opens every file's header (validating names, shapes and dtypes against the config
before anything is written), then assembles one of our parameters at a time from its checkpoint tensors (a stacked
layer parameter gathers one slice per layer) and hands it to an Orbax partial save. Orbax -> HF restores one
parameter at a time and streams each tensor into its safetensors shard. Both write into a temporary directory that is
renamed on success, so a failure leaves no output behind. The name map and per-tensor layout transforms are
``infinitevl_jax.hf_names``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import threading
import time

import ml_dtypes
import numpy as np

from infinitevl_jax import checkpoint as ckpt
from infinitevl_jax import hf_names
from infinitevl_jax.config import FULL, GDN, SWA, ConfigError, InfiniteVLConfig

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", ".gitattributes", ckpt.CONFIG_FILE}


class ConversionError(ValueError):
    """A user-facing conversion failure: the CLI prints it as one line and exits non-zero."""


@dataclasses.dataclass
class Summary:
    params: int
    dtype: str
    seconds: float
    peak_rss_anon: int  # bytes, sampled
    out: str

    def __str__(self) -> str:
        return (f"wrote {self.out}: {self.params:,} parameters, {self.dtype}, {self.seconds:.1f} s, "
                f"peak RssAnon {self.peak_rss_anon / 2**30:.2f} GiB")


class RssSampler:
    """Samples this process's anonymous resident memory (``RssAnon``) in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int | str = "self", interval: float = 0.02):
        self.file, self.interval, self.peak = f"/proc/{pid}/status", interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        try:
            with open(self.file) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        value = int(line.split()[1]) * 1024
                        self.peak = max(self.peak, value)
                        return value
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet, file=sys.stderr)


# -------------------------------------------------------------------------------------------------------------------
# Hugging Face -> Orbax
# -------------------------------------------------------------------------------------------------------------------


def hf_to_orbax(hf_dir: str, out: str, *, dtype: str = "auto", allow_pickle: bool = False,
                quiet: bool = False) -> Summary:
    """Converts a Hugging Face directory (``infinite_vl`` or ``qwen2_5_vl``) into our checkpoint at ``out``.

    ``dtype``: ``bfloat16``, ``float32`` or ``auto`` (float32 if the checkpoint is float32, else bfloat16).
    """
    start = time.time()
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype} is not supported (choose from auto, {', '.join(DTYPES)})")
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: no such directory")
    if not os.path.exists(config_file):
        raise ConversionError(f"{config_file}: not found")
    try:
        config = InfiniteVLConfig.from_hf(config_file)
    except (ConfigError, ValueError) as e:
        raise ConversionError(f"{config_file}: {e}") from None
    with RssSampler() as rss, ckpt.HFCheckpointReader(hf_dir, allow_pickle=allow_pickle) as reader:
        try:
            found = ckpt.match_hf_names(config, reader.shapes)
        except ckpt.CheckpointMismatchError as e:
            raise ConversionError(f"{hf_dir}: {e}") from None
        if dtype == "auto":
            dtype = "float32" if all(reader.dtypes[k] == "F32" for k in found.values()) else "bfloat16"
        target = DTYPES[dtype]
        abstract = ckpt.abstract_model(config, param_dtype=target)
        from flax import nnx

        leaves = {p: (v.shape, target) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
        n_params = sum(int(np.prod(s)) for s, _ in leaves.values())
        with ckpt.atomic_directory(out) as tmp:
            writer = ckpt.ParamWriter(tmp, config)
            with _progress(sum(reader.nbytes(k) for k in found.values()), "convert", quiet) as bar:
                def read(key):
                    array = reader.read(key)
                    bar.update(array.nbytes)
                    return array

                for path, array in ckpt.iter_params(hf_names.entries(config), found, read, leaves):
                    writer.add(path, array)
                    del array
                    rss.sample()
            writer.finish()
            copy_side_files(hf_dir, tmp)
    return Summary(n_params, dtype, time.time() - start, rss.peak, os.path.abspath(out))


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copies everything but weights (config.json, tokenizer, chat template, preprocessor configs, remote code)."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name in _SKIP_FILES or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if os.path.exists(os.path.join(dst, name)):
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied


# -------------------------------------------------------------------------------------------------------------------
# Orbax -> Hugging Face
# -------------------------------------------------------------------------------------------------------------------


def hf_config_dict(config: InfiniteVLConfig, torch_dtype: str = "bfloat16") -> dict:
    """A Hugging Face ``config.json`` in the hub's flat layout (as the release and Qwen2.5-VL-3B-Instruct ship it)."""
    t, v = config.text, config.vision
    qwen = config.model_type == "qwen2_5_vl"
    d = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration" if qwen else "InfiniteVLForConditionalGeneration"],
        "model_type": config.model_type,
        "torch_dtype": torch_dtype,
        "hidden_act": "silu",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_dropout": 0.0,
        "max_position_embeddings": 128000,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
                 "vision_token_id", "image_token_id", "video_token_id"):
        d[name] = getattr(config, name)
    if qwen:
        windowed = [i for i, k in enumerate(t.layer_types) if k == SWA]
        d.update(use_sliding_window=bool(windowed), sliding_window=t.sliding_window or 32768,
                 max_window_layers=windowed[0] if windowed else t.num_hidden_layers,
                 layer_types=[k for k in t.layer_types])
    else:
        d.update(sliding_window=t.sliding_window, layer_types=list(t.layer_types),
                 num_linear_heads=t.num_linear_heads, linear_head_dim=t.linear_head_dim, expand_v=t.expand_v,
                 conv_size=t.conv_size, norm_eps=t.linear_norm_eps)
    d["vision_config"] = {
        "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads, "in_chans": v.in_channels, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer() else v.tokens_per_second,
        "hidden_act": "silu",
    }
    return d


def orbax_to_hf(ckpt_dir: str, out: str, *, layout: str = "current", max_shard_bytes: int = 5 * 10**9,
                dtype: str | None = None, quiet: bool = False) -> Summary:
    """Writes our checkpoint at ``ckpt_dir`` as Hugging Face sharded safetensors + ``config.json`` at ``out``.

    Any of our checkpoints works (converted, trained, LoRA-merged): only ``infinitevl_config.json`` and the Orbax
    parameters are read. Tensors keep the stored dtype unless ``dtype`` is given. Side files (tokenizer, chat
    template, preprocessor) found next to the checkpoint are copied.
    """
    start = time.time()
    if layout not in ("current", "legacy"):
        raise ConversionError(f"--layout {layout} is not supported (current or legacy)")
    if not os.path.isdir(ckpt_dir):
        raise ConversionError(f"{ckpt_dir}: no such directory")
    try:
        config = ckpt.read_config(ckpt_dir)
        stored = ckpt.stored_param_dtype(ckpt_dir)
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    except Exception as e:
        raise ConversionError(f"{ckpt_dir}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    out_dtype = DTYPES[dtype] if dtype else np.dtype(stored)
    torch_dtype = "float32" if out_dtype == np.float32 else "bfloat16"
    entries = hf_names.entries(config)
    with RssSampler() as rss, ckpt.atomic_directory(out) as tmp:
        # One parameter in memory at a time: entries are grouped by parameter, in our parameter order.
        params = ckpt.iter_saved_params(ckpt_dir)
        by_path: dict[tuple, list] = {}
        for e in entries:
            by_path.setdefault(e.path, []).append(e)
        order = [e for group in by_path.values() for e in group]
        state = {"path": None, "array": None}

        def produce(entry):
            def f():
                if state["path"] != entry.path:
                    state["array"] = None
                    path, array = next(params)
                    while path != entry.path:  # parameters saved but not mapped would be a bug in the name map
                        if path not in by_path:
                            raise ConversionError(f"{ckpt_dir}: parameter {'/'.join(map(str, path))} has no "
                                                  "Hugging Face name")
                        path, array = next(params)
                    state["path"], state["array"] = path, array
                value = state["array"] if entry.index is None else state["array"][entry.index]
                return hf_names.TRANSFORMS[entry.kind][1](np.asarray(value, np.float32), entry.hf_shape)
            return f

        # iter_saved_params yields in the checkpoint's (sorted) order: follow it.
        saved_order = _saved_order(ckpt_dir)
        order.sort(key=lambda e: (saved_order[e.path], e.index or 0))
        specs = [(hf_names.hf_name(e.hf, layout), e.hf_shape, out_dtype, produce(e)) for e in order]
        total = sum(int(np.prod(s)) * out_dtype.itemsize for _, s, _, _ in specs)
        with _progress(total, "export", quiet) as bar:
            ckpt.write_safetensors_shards(tmp, specs, max_shard_bytes=max_shard_bytes,
                                          on_tensor=lambda n: (bar.update(n), rss.sample()))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_export_config(ckpt_dir, config, torch_dtype), f, indent=2)
        copy_side_files(ckpt_dir, tmp)
    n_params = sum(int(np.prod(e.hf_shape)) for e in entries)
    return Summary(n_params, torch_dtype, time.time() - start, rss.peak, os.path.abspath(out))


def _saved_order(ckpt_dir: str) -> dict[tuple, int]:
    import jax

    from infinitevl_jax.checkpoint import PARAMS_DIR, _ocp

    meta = _ocp().metadata(os.path.join(ckpt_dir, PARAMS_DIR)).metadata
    leaves = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, "dtype"))[0]
    return {tuple(int(k.key) if k.key.isdigit() else k.key for k in keys): i for i, (keys, _) in enumerate(leaves)}


def _export_config(ckpt_dir: str, config: InfiniteVLConfig, torch_dtype: str) -> dict:
    """The original ``config.json`` when it still describes the model (keeps e.g. ``auto_map``), else a fresh one."""
    original = os.path.join(ckpt_dir, "config.json")
    if os.path.exists(original):
        try:
            with open(original) as f:
                raw = json.load(f)
            logging.getLogger("infinitevl_jax.config").disabled = True  # its ignored-keys notice was shown already
            try:
                same = InfiniteVLConfig.from_hf(raw) == config
            finally:
                logging.getLogger("infinitevl_jax.config").disabled = False
            if same:
                raw["torch_dtype" if "torch_dtype" in raw or "dtype" not in raw else "dtype"] = torch_dtype
                return raw
        except (ValueError, ConfigError):
            pass
    return hf_config_dict(config, torch_dtype)


# -------------------------------------------------------------------------------------------------------------------
# Logit check against transformers
# -------------------------------------------------------------------------------------------------------------------


def verify(hf_dir: str, ckpt_dir: str, prompt: str = "The capital of France is") -> float:
    """Runs ``prompt`` through transformers (float32, CPU) and our converted model (float32 compute): max |logit diff|.

    Only ``qwen2_5_vl`` checkpoints: transformers has no InfiniteVL (the release's code is remote and needs CUDA).
    """
    import jax.numpy as jnp
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = ckpt.read_config(ckpt_dir)
    if config.model_type != "qwen2_5_vl":
        raise ConversionError("--verify supports qwen2_5_vl checkpoints only (transformers has no infinite_vl model)")
    try:
        from transformers import AutoTokenizer

        ids = [int(i) for i in AutoTokenizer.from_pretrained(hf_dir)(prompt)["input_ids"]]
    except Exception:  # no usable tokenizer files
        ids = []
    if not ids or max(ids) >= config.text.vocab_size:  # fixed ids instead
        ids = [int(i) for i in np.random.default_rng(0).integers(0, min(config.text.vocab_size, 1000), 8)]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids], dtype=torch.long)).logits.float().numpy()
    del hf
    model = ckpt.load(ckpt_dir, dtype=jnp.float32)
    ours = np.asarray(model(np.asarray([ids], np.int32)), np.float32)
    return float(np.abs(ours - ref).max())


# -------------------------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", default="auto", help="stored parameter dtype: bfloat16, float32 or auto "
                        "(HF->Orbax: float32 only for float32 checkpoints; Orbax->HF: the stored dtype)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pytorch_model*.bin with torch.load(weights_only=True)")
    parser.add_argument("--verify", action="store_true",
                        help="qwen2_5_vl only: compare logits with transformers on CPU after converting")
    parser.add_argument("--to-hf", action="store_true", help="export our checkpoint (--ckpt) to Hugging Face")
    parser.add_argument("--ckpt", help="our checkpoint directory (with --to-hf)")
    parser.add_argument("--layout", default="current", help="--to-hf key layout: current (model.language_model.*) "
                        "or legacy (model.layers.*, visual.*)")
    parser.add_argument("--max-shard-size", default="5GB", help="--to-hf shard size (e.g. 5GB, 500MB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        if args.to_hf:
            if not args.ckpt:
                raise ConversionError("--to-hf needs --ckpt ORBAX_DIR")
            dtype = None if args.dtype == "auto" else args.dtype
            if dtype is not None and dtype not in DTYPES:
                raise ConversionError(f"--dtype {dtype} is not supported (choose from auto, {', '.join(DTYPES)})")
            summary = orbax_to_hf(args.ckpt, args.out, layout=args.layout,
                                  max_shard_bytes=_parse_size(args.max_shard_size), dtype=dtype, quiet=args.quiet)
        else:
            if not args.hf_dir:
                raise ConversionError("--hf-dir is required (or --to-hf --ckpt)")
            summary = hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                  quiet=args.quiet)
        print(summary)
        if args.verify and not args.to_hf:
            diff = verify(args.hf_dir, args.out)
            print(f"verify: max |logit diff| vs transformers (float32, CPU) = {diff:.3e}")
    except (ConversionError, ckpt.CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert Hugging Face <-> Orbax checkpoints",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_torch_ckpt.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
