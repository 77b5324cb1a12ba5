"""Checkpoint I/O: Hugging Face state dicts and files (read lazily, written streaming) and our Orbax checkpoints.

Our checkpoint directory::

    DIR/infinitevl_config.json   our config (``InfiniteVLConfig.to_dict()``)
    DIR/params/                  Orbax PyTree checkpoint of the model's ``nnx.Param`` state, nested dicts keyed by
                                 the NNX path (list indices as strings), one dtype for every leaf
    DIR/config.json, tokenizer*, chat template, preprocessor files   (when converted from a Hugging Face directory)

``save(path, model)`` / ``load(path, mesh=None)`` are the public entry points; ``ParamWriter`` writes the same layout
one array at a time (the converter streams through it so it never holds the whole model).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from infinitevl_jax import hf_names
from infinitevl_jax.config import InfiniteVLConfig

CONFIG_FILE = "infinitevl_config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model; the message names the file or key."""


class CheckpointMismatchError(CheckpointError):
    """Missing, unexpected or mis-shaped tensors; the message lists every one of them."""


# -------------------------------------------------------------------------------------------------------------------
# Hugging Face names -> our parameters
# -------------------------------------------------------------------------------------------------------------------


def match_hf_names(config: InfiniteVLConfig, shapes: Mapping[str, tuple]) -> dict[str, str]:
    """Checks checkpoint keys (either layout) and their shapes against the config: ``{canonical: checkpoint key}``.

    ``lm_head.weight`` may be absent when the embeddings are tied (and is ignored if present and tied). Every
    missing, unexpected or mis-shaped key is reported in one ``CheckpointMismatchError``.
    """
    original = {}
    for name in shapes:
        canon = hf_names.canonical_name(name) or name
        if canon == "lm_head.weight" and config.text.tie_word_embeddings:
            continue  # tied head stored explicitly
        original[canon] = name
    return _match(hf_names.entries(config), original, shapes)


def _match(entries, original: Mapping[str, str], shapes: Mapping[str, tuple], *, strict: bool = True
           ) -> dict[str, str]:
    """``original``: canonical name -> the key as the checkpoint spells it; ``shapes``: key -> shape."""
    table = {e.hf: e for e in entries}
    found = {k: name for k, name in original.items() if k in table}
    unexpected = sorted(name for k, name in original.items() if k not in table)
    missing = sorted(set(table) - set(found))
    misshaped = [f"{name}: checkpoint {tuple(shapes[name])}, model expects {table[k].hf_shape}"
                 for k, name in found.items() if tuple(shapes[name]) != table[k].hf_shape]
    if strict and (missing or unexpected or misshaped):
        def listing(items, sep=", "):
            return sep.join(items[:20]) + (" ..." if len(items) > 20 else "")

        lines = []
        if missing:
            lines.append(f"{len(missing)} missing: " + listing([m.split(":", 1)[-1] for m in missing]))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected: " + listing(unexpected))
        if misshaped:
            lines.append(f"{len(misshaped)} mis-shaped: " + listing(misshaped, "; "))
        raise CheckpointMismatchError("checkpoint does not match the model config:\n  " + "\n  ".join(lines))
    return {k: v for k, v in found.items() if tuple(shapes[v]) == table[k].hf_shape}


def load_hf_state_dict(model, state_dict: Mapping[str, object], *, strict: bool = True) -> None:
    """Fills ``model`` (an ``InfiniteVLForConditionalGeneration``) from HF names -> arrays (numpy, torch or jax).

    Accepts the current (``model.language_model.*``, ``model.visual.*``) and legacy (``model.layers.*``,
    ``visual.*``) layouts. ``lm_head.weight`` may be absent when the embeddings are tied (and is ignored if present
    and tied). Every missing, unexpected or mis-shaped key is reported in one ``CheckpointMismatchError``.
    """
    original = {}
    for name in state_dict:
        canon = hf_names.canonical_name(name) or name
        if canon == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue  # tied head stored explicitly
        original[canon] = name
    _load(model, hf_names.entries(model.config), original, state_dict, strict=strict)


def load_hf_vision_state_dict(tower, state_dict: Mapping[str, object], *, strict: bool = True) -> None:
    """Fills a bare ``VisionTower`` from HF names relative to the tower (``patch_embed.proj.weight``, ``blocks.N...``)."""
    original = {"vision:" + name: name for name in state_dict}
    _load(tower, list(hf_names.vision_entries(tower.config, root=())), original, state_dict, strict=strict)


def _load(module, entries, original: Mapping[str, str], state_dict: Mapping[str, object], *, strict: bool) -> None:
    found = _match(entries, original, {k: tuple(v.shape) for k, v in state_dict.items()}, strict=strict)
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    touched = {e.path for e in entries if e.hf in found}
    leaves = {p: (v.shape, np.float32) for p, v in flat.items() if p in touched}
    initial = {p: np.array(flat[p][...], np.float32) for p in leaves}  # non-strict loads keep unmatched slices
    values = dict(iter_params(entries, found, lambda key: to_numpy(state_dict[key]), leaves, initial=initial))
    nnx.update(module, nnx.from_flat_state(
        [(path, var.replace(jnp.asarray(values[path], var.dtype))) for path, var in flat.items() if path in values]
    ))


def iter_params(entries, found: Mapping[str, str], read: Callable[[str], np.ndarray],
                leaves: Mapping[tuple, tuple], *, initial: Mapping[tuple, np.ndarray] | None = None
                ) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields ``(nnx path, array)`` one parameter at a time, reading only the checkpoint tensors it needs.

    ``found`` is ``match_hf_names``'s result, ``read(key)`` returns one checkpoint tensor, ``leaves`` maps each nnx
    path to ``(shape, dtype)``. Stacked parameters (layers scanned over the layer period) are filled one slice per
    checkpoint tensor.
    """
    by_path: dict[tuple, list[hf_names.Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, []).append(e)
    for path, (shape, dtype) in leaves.items():
        group = by_path.get(path)
        if group is None:
            raise CheckpointError(f"model parameter {'/'.join(map(str, path))} has no Hugging Face tensor")
        out = initial[path] if initial is not None else np.empty(shape, dtype)
        for e in group:
            if e.hf not in found:
                continue
            array = hf_names.TRANSFORMS[e.kind][0](read(found[e.hf]))
            if e.index is None:
                out[...] = array
            else:
                out[e.index] = array
            del array
        yield path, out


def to_numpy(value) -> np.ndarray:
    """numpy / jax / torch (any dtype, bf16 included) -> float32 numpy (or the integer dtype as is)."""
    if hasattr(value, "detach"):  # torch
        import torch

        t = value.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    a = np.asarray(value)
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
        a = a.astype(np.float32)
    return a


# -------------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoint files
# -------------------------------------------------------------------------------------------------------------------

# safetensors dtype tag <-> numpy dtype, for the floating dtypes a model checkpoint may hold.
SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_TAG = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class HFCheckpointReader:
    """Lazy reader of a Hugging Face weights directory: ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or (only with ``allow_pickle``) ``pytorch_model*.bin``.

    Opening reads headers only (names, shapes, dtypes, for validation before anything is written); ``read(key)``
    loads one tensor. Every problem raises ``CheckpointError`` naming the file or key.
    """

    def __init__(self, directory: str | os.PathLike, *, allow_pickle: bool = False):
        self.directory = os.fspath(directory)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        self._exit = contextlib.ExitStack()
        try:
            self._open(allow_pickle)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening
    def _open(self, allow_pickle: bool) -> None:
        d = self.directory
        if not os.path.isdir(d):
            raise CheckpointError(f"{d}: no such directory")
        for index_name, kind in (("model.safetensors.index.json", "safetensors"),
                                 ("pytorch_model.bin.index.json", "pickle")):
            index = os.path.join(d, index_name)
            if os.path.exists(index):
                if kind == "pickle" and not allow_pickle:
                    raise CheckpointError(_pickle_refused(index))
                files = self._index_files(index)
                break
        else:
            if os.path.exists(os.path.join(d, "model.safetensors")):
                files, kind = ["model.safetensors"], "safetensors"
            elif os.path.exists(os.path.join(d, "pytorch_model.bin")):
                if not allow_pickle:
                    raise CheckpointError(_pickle_refused(os.path.join(d, "pytorch_model.bin")))
                files, kind = ["pytorch_model.bin"], "pickle"
            else:
                raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
        for name in files:
            path = os.path.join(d, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: file not found (listed in the index)")
            (self._open_safetensors if kind == "safetensors" else self._open_pickle)(path)
        if hasattr(self, "_index_map"):
            for key, fname in self._index_map.items():
                if self.file_of.get(key) != os.path.join(d, fname):
                    raise CheckpointError(f"{os.path.join(d, fname)}: tensor {key} listed in the index is not in it")

    def _index_files(self, index: str) -> list[str]:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise CheckpointError(f"{index}: not a valid checkpoint index ({type(e).__name__}: {e})") from None
        self._index_map = weight_map
        return sorted(set(weight_map.values()))

    def _open_safetensors(self, path: str) -> None:
        from safetensors import safe_open

        try:
            f = self._exit.enter_context(safe_open(path, framework="np"))
            keys = list(f.keys())
            infos = [(k, f.get_slice(k)) for k in keys]
            infos = [(k, tuple(s.get_shape()), s.get_dtype()) for k, s in infos]
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        for key, shape, dtype in infos:
            self._add(key, shape, dtype, path)
        self._handles[path] = f

    def _open_pickle(self, path: str) -> None:
        import torch

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
        tags = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
        for key, t in sd.items():
            self._add(key, tuple(t.shape), tags.get(t.dtype, str(t.dtype)), path)
        self._handles[path] = sd

    def _add(self, key: str, shape, dtype: str, path: str) -> None:
        if key in self.file_of:
            raise CheckpointError(f"{path}: tensor {key} is also in {self.file_of[key]}")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {dtype} "
                                  f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        self.shapes[key], self.dtypes[key], self.file_of[key] = shape, dtype, path

    # ------------------------------------------------------------------ reading
    def read(self, key: str) -> np.ndarray:
        """One tensor as numpy in its stored dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
        path = self.file_of[key]
        handle = self._handles[path]
        try:
            if isinstance(handle, dict):  # torch state dict (memory-mapped)
                return _torch_to_numpy(handle[key])
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from None

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shapes[key], dtype=np.int64)) * SAFETENSORS_DTYPES[self.dtypes[key]].itemsize

    def close(self) -> None:
        self._handles.clear()
        self._exit.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pickle_refused(path: str) -> str:
    return (f"{path} is a pickle checkpoint; pass --allow-pickle (allow_pickle=True) to read it with "
            "torch.load(weights_only=True), or convert it to safetensors")


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_safetensors_shards(directory: str, tensors: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                             *, max_shard_bytes: int = 5 * 2**30, on_tensor: Callable[[int], None] | None = None
                             ) -> dict[str, str]:
    """Writes ``(name, shape, dtype, produce)`` tensors as Hugging Face safetensors shards, one tensor in memory at a
    time (headers are computed from shapes first, then each tensor is produced and streamed to its file).

    One shard is named ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``. Returns ``{name: file}``.
    """
    specs = list(tensors)
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, _ in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _TAG[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, dtype, produce in shard:
                array = np.ascontiguousarray(produce(), dtype=dtype)
                if array.shape != tuple(shape):
                    raise CheckpointError(f"tensor {name}: produced shape {array.shape}, declared {tuple(shape)}")
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
                if on_tensor:
                    on_tensor(array.nbytes)
                del array
        total += offset
    if n > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map


# -------------------------------------------------------------------------------------------------------------------
# Our Orbax checkpoints
# -------------------------------------------------------------------------------------------------------------------


def _ocp():
    import orbax.checkpoint as ocp

    return ocp.v1


def _nest(flat: Mapping[tuple, object]) -> dict:
    """``{(a, 0, b): x}`` -> ``{"a": {"0": {"b": x}}}`` (Orbax keys are strings)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = value
    return tree


def _get(tree: Mapping, path: tuple):
    for k in path:
        tree = tree[str(k)]
    return tree


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike):
    """Yields a temporary directory next to ``out`` that is renamed to ``out`` on success and deleted on any error,
    so a failed write never leaves ``out`` behind. ``out`` must not exist."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        raise CheckpointError(f"{out}: already exists (refusing to overwrite)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ParamWriter:
    """Writes our checkpoint layout into ``directory`` (which exists) a few arrays at a time through Orbax partial
    saves, so the converter never holds the whole model. Call ``add`` per parameter, then ``finish``."""

    def __init__(self, directory: str, config: InfiniteVLConfig, *, batch_bytes: int = 512 * 2**20):
        self.directory, self.config, self.batch_bytes = directory, config, batch_bytes
        self._pending: dict[tuple, jax.Array] = {}
        self._size = 0
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=2)

    def add(self, path: tuple, array: np.ndarray) -> None:
        self._pending[path] = jnp.asarray(array)
        self._size += array.nbytes
        if self._size >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            _ocp().partial.save(os.path.join(self.directory, PARAMS_DIR), _nest(self._pending))
        self._pending, self._size = {}, 0

    def finish(self) -> None:
        self._flush()
        _ocp().partial.finalize(os.path.join(self.directory, PARAMS_DIR))


def save(path: str | os.PathLike, model) -> None:
    """Saves ``model``'s parameters and config as our checkpoint at ``path`` (which must not exist)."""
    flat = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with atomic_directory(path) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        _ocp().save(os.path.join(tmp, PARAMS_DIR), _nest(flat))


def read_config(path: str | os.PathLike) -> InfiniteVLConfig:
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: not found (not an infinitevl-jax checkpoint)")
    with open(file) as f:
        return InfiniteVLConfig.from_dict(json.load(f))


def stored_param_dtype(path: str | os.PathLike):
    """The dtype the checkpoint's parameters are stored in."""
    meta = _ocp().metadata(os.path.join(os.fspath(path), PARAMS_DIR)).metadata
    dtypes = {np.dtype(m.dtype) for m in jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "dtype"))}
    return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)


def abstract_model(config: InfiniteVLConfig, *, dtype=None, param_dtype=jnp.float32):
    from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration

    return nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(
        config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, *, dtype=None, param_dtype=None,
         shardings: Callable[[object], object] | None = None):
    """Restores an ``InfiniteVLForConditionalGeneration`` from our checkpoint at ``path``.

    ``dtype`` is the compute dtype (None: the parameters' dtype), ``param_dtype`` defaults to the stored one. Without
    a mesh every array lands on the default device. With ``mesh``, each parameter is restored straight into its
    sharding (each host reads only its shards): the shardings come from ``shardings(abstract_model, mesh)`` when
    given, else from ``infinitevl_jax.sharding``'s rules.
    """
    path = os.fspath(path)
    config = read_config(path)
    stored = param_dtype or stored_param_dtype(path)
    abstract = abstract_model(config, dtype=dtype, param_dtype=stored)
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target_sharding = {p: device for p, _ in flat}
    else:
        if shardings is None:
            from infinitevl_jax import sharding as sharding_lib

            shardings = sharding_lib.param_shardings
        tree = shardings(abstract, mesh)
        tree = dict(nnx.to_flat_state(tree)) if isinstance(tree, nnx.State) else dict(tree)
        target_sharding = {p: s.get_value() if isinstance(s, nnx.Variable) else s for p, s in tree.items()}
    target = _nest({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target_sharding[p]) for p, v in flat})
    try:
        restored = _ocp().load(os.path.join(path, PARAMS_DIR), target)
    except Exception as e:
        raise CheckpointError(f"{os.path.join(path, PARAMS_DIR)}: cannot restore ({type(e).__name__}: {e})") from None
    values = nnx.from_flat_state([(p, v.replace(_get(restored, p))) for p, v in flat])
    return nnx.merge(graphdef, values)



def iter_saved_params(path: str | os.PathLike) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields ``(nnx path, numpy array)`` from our checkpoint one parameter at a time (partial loads)."""
    v1 = _ocp()
    params = os.path.join(os.fspath(path), PARAMS_DIR)
    meta = v1.metadata(params).metadata
    leaves = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, "dtype"))[0]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ctx = v1.Context()
    ctx.pytree_options.loading.partial_load = True
    with ctx:
        for keys, m in leaves:
            p = tuple(int(k.key) if k.key.isdigit() else k.key for k in keys)
            target = _nest({p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)})
            yield p, np.asarray(_get(v1.load(params, target), p))
