"""Device mesh, the logical-axis rules table, sharded model creation and activation constraints.

Every parameter carries ``logical_axes`` metadata (``("embed", "mlp")``, ``("vocab", "embed")``, ...); stacked layers
(``nnx.vmap``) have one more leading dimension than their names, treated as ``"layers"``. ``LOGICAL_RULES`` maps each
logical name to mesh axes once, for parameters and activations alike. A mesh axis that does not divide a dimension
(or the number of heads behind it: 2 KV heads on ``tensor=4``) is dropped, so that dimension is replicated instead of
failing. Usage::

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    model = create_model(config, mesh, param_dtype=jnp.bfloat16)   # initialised shard by shard, under jit
    with jax.set_mesh(mesh):                                        # kernels run under shard_map, activations
        logits = jax.jit(step)(model, batch)                        # are constrained at layer boundaries

Mesh axes, outermost first: ``dcn`` (data parallelism across slices/hosts over the data-centre network), ``data``
(pure data parallelism), ``fsdp`` (data parallelism with parameters sharded over it) and ``tensor`` (heads, MLP and
vocabulary split within a layer). The batch is split over ``dcn x data x fsdp``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp")

# One table for parameters and activations: logical name -> mesh axes (tried in order; a non-dividing one is dropped).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": BATCH_AXES,
    "seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # parameters of the language stack
    "layers": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "gdn_heads": ("tensor",),
    "norm": (),
    "conv": (),
    # parameters of the vision tower
    "vision_patch": (),
    "vision_embed": ("fsdp",),
    "vision_heads": ("tensor",),
    "vision_mlp": ("tensor",),
    "vision_merge": ("fsdp",),
}


# ---------------------------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (whatever the device count leaves)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """``"data,fsdp,tensor"`` or ``"dcn,data,fsdp,tensor"``, e.g. ``"1,-1,1"``."""
        sizes = [int(s) for s in text.split(",")]
        if len(sizes) == 3:
            return cls(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
        if len(sizes) == 4:
            return cls(dcn=sizes[0], data=sizes[1], fsdp=sizes[2], tensor=sizes[3])
        raise ValueError(f"mesh {text!r}: expected 3 (data,fsdp,tensor) or 4 (dcn,data,fsdp,tensor) sizes")

    def resolve(self, num_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
            raise ValueError(f"mesh {sizes}: at most one axis may be -1 and none may be 0")
        known = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if num_devices % known:
                raise ValueError(f"mesh {sizes} cannot fill {num_devices} devices")
            sizes[fill[0]] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but {num_devices} are in use")
        return sizes


def make_mesh(config: MeshConfig | str | Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(dcn, data, fsdp, tensor)`` mesh over ``devices`` (default: all, across processes).

    With ``dcn > 1`` on multi-slice TPU (devices with ``slice_index``) slices are laid along ``dcn`` so that only the
    batch-gradient all-reduce crosses the data-centre network; elsewhere the device order is the ICI-aware one of
    ``jax.make_mesh``.
    """
    if config is None:
        config = MeshConfig()
    elif isinstance(config, str):
        config = MeshConfig.parse(config)
    elif not isinstance(config, MeshConfig):
        config = MeshConfig.parse(",".join(str(int(s)) for s in config))
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if sizes["dcn"] > 1 and hasattr(devices[0], "slice_index"):
        from jax.experimental import mesh_utils

        ici = (1,) + shape[1:]
        dcn = (sizes["dcn"],) + (1,) * (len(MESH_AXES) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        return Mesh(grid, MESH_AXES, axis_types=types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)


def single_device_mesh(device=None) -> Mesh:
    return make_mesh(MeshConfig(fsdp=1), devices=[device or jax.devices()[0]])


# ---------------------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ---------------------------------------------------------------------------------------------------------------


def logical_extents(config) -> dict[str, int]:
    """How many indivisible units stand behind a flattened parameter dimension (heads, not head x dim)."""
    text = getattr(config, "text", config)
    out = {
        "q_heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "gdn_heads": text.num_linear_heads,
    }
    vision = getattr(config, "vision", None)
    if vision is not None:
        out["vision_heads"] = vision.num_heads
    return out


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, *, extents: dict[str, int] | None = None,
                    rules: dict[str, tuple[str, ...]] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array of ``shape`` whose dimensions are named ``axes`` (one fewer: leading ``layers``).

    Each dimension takes the mesh axes of its rule that still divide it (and its extent in ``extents``, e.g. the
    number of KV heads); a mesh axis is used at most once per array.
    """
    axes = tuple(axes)
    if len(axes) == len(shape) - 1:
        axes = ("layers",) + axes
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    extents = extents or {}
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        chosen, prod = [], 1
        for ax in rules[name]:
            n = sizes.get(ax, 1)
            if n == 1 or ax in used:
                continue
            if dim % (prod * n) or extents.get(name, dim) % (prod * n):
                continue
            chosen.append(ax)
            prod *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_sharding(axes, shape, mesh: Mesh, **kw) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, **kw))


def _variable_spec(var: nnx.Variable, mesh, extents) -> P:
    axes = var.get_metadata().get("logical_axes")
    shape = np.shape(var.get_value())
    if axes is None:
        return P()  # not a parameter with a layout (e.g. a counter): replicated
    return logical_to_spec(axes, shape, mesh, extents=extents)


def state_shardings(state: nnx.State, mesh: Mesh, config=None) -> nnx.State:
    """The ``NamedSharding`` of every variable of ``state`` (concrete or abstract), as a state of the same structure."""
    extents = logical_extents(config) if config is not None else {}
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, _variable_spec(v, mesh, extents))), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """``state_shardings`` of a model's whole state, using its config for head counts."""
    return state_shardings(nnx.state(model), mesh, getattr(model, "config", None))


model_shardings = param_shardings  # the name ``checkpoint.load(path, mesh)`` calls


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves an existing model's variables onto ``mesh`` (in place; returns it). For models built on one host."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(model, mesh)))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Model creation without materialising it on one device
# ---------------------------------------------------------------------------------------------------------------


def _builder(config, *, seed: int = 0, dtype=None, param_dtype=jnp.float32, remat_policy: str = "none",
             model_class=None) -> Callable[[], nnx.Module]:
    if model_class is None:
        from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration as model_class

    def build():
        return model_class(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                           rngs=nnx.Rngs(seed))

    return build


def abstract_model(config, mesh: Mesh | None = None, **model_kw) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` values carrying their sharding on ``mesh`` (default: one device).

    ``nnx.state(abstract_model(...))`` is a restore target for Orbax: each array is read straight into its shards.
    """
    mesh = mesh or single_device_mesh()
    model = nnx.eval_shape(_builder(config, **model_kw))
    shardings = state_shardings(nnx.state(model), mesh, config)
    abstract = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())),
        nnx.state(model), shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, abstract)
    return model


def create_model(config, mesh: Mesh, **model_kw) -> nnx.Module:
    """Initialises the model under ``jax.jit`` with ``out_shardings``: each device computes only its own shards.

    ``model_kw``: ``seed``, ``dtype``, ``param_dtype``, ``remat_policy`` (and ``model_class`` for another module
    with the same constructor). The same ``seed`` gives the same values on every mesh.
    """
    build = _builder(config, **model_kw)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract_state, mesh, config)

    def init():
        return nnx.state(build())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def bytes_per_device(tree) -> dict[Any, int]:
    """Bytes each device holds of the arrays in ``tree``, measured from their addressable shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# ---------------------------------------------------------------------------------------------------------------
# Activations and kernels under the ambient mesh (``jax.set_mesh``)
# ---------------------------------------------------------------------------------------------------------------


def current_mesh():
    """The mesh set by ``jax.set_mesh`` when it is one of ours with more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None  # already inside shard_map
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes under the ambient mesh; identity without one."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_axes(batch: int, mesh) -> tuple[str, ...]:
    """The batch mesh axes, in order, that together divide ``batch``."""
    spec = logical_to_spec(("batch",), (batch,), mesh)
    return () if not spec else (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def head_split(mesh, *head_counts: int) -> int:
    """How many ways the ``tensor`` axis splits the heads (1 when it does not divide every head count)."""
    t = _mesh_sizes(mesh).get("tensor", 1)
    return t if all(h % t == 0 for h in head_counts) else 1


def shard_over_batch_and_heads(fn: Callable, args: Sequence[Any], layouts: Sequence[str | None],
                               out_layouts: Any, *, heads: int) -> Any:
    """Runs ``fn(*args)`` under ``shard_map`` on the ambient mesh: batch over ``dcn/data/fsdp``, heads over ``tensor``.

    ``layouts[i]`` names the dimensions of ``args[i]`` with ``"b"`` (batch), ``"h"`` (heads) and ``"."`` (whole),
    e.g. ``"b.h."`` for ``[B,T,H,D]``; an argument that is None passes through as None. ``out_layouts`` is a pytree
    of such strings for the outputs. ``heads`` is the head count shared by every ``"h"`` dimension. Without a mesh
    (or on one device) this is ``fn(*args)``. Kernels see per-device blocks and need no collectives.
    """
    mesh = current_mesh()
    if mesh is None:
        return fn(*args)
    batch = next(a.shape[lay.index("b")] for a, lay in zip(args, layouts) if a is not None and "b" in lay)
    b_axes = batch_axes(batch, mesh)
    h_axis = "tensor" if head_split(mesh, heads) > 1 else None
    if not b_axes and h_axis is None:
        return fn(*args)
    b_entry = None if not b_axes else b_axes[0] if len(b_axes) == 1 else b_axes

    def spec(layout: str) -> P:
        return P(*[b_entry if c == "b" else h_axis if c == "h" else None for c in layout])

    present = [i for i, a in enumerate(args) if a is not None]

    def body(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=tuple(spec(layouts[i]) for i in present),
                           out_specs=jax.tree.map(spec, out_layouts), check_vma=False)
    return mapped(*[args[i] for i in present])


def expand_kv_heads(k: jax.Array, num_q_heads: int, mesh) -> jax.Array:
    """GQA under tensor parallelism with fewer KV heads than ``tensor`` shards: repeat each KV head so that every
    shard holds the one its query heads read (``[B,T,Hkv,D] -> [B,T,t,D]``); unchanged when not needed/possible."""
    if mesh is None:
        return k
    t = _mesh_sizes(mesh).get("tensor", 1)
    hkv = k.shape[2]
    if t == 1 or hkv % t == 0 or num_q_heads % t or t % hkv:
        return k
    return jnp.repeat(k, t // hkv, axis=2)
