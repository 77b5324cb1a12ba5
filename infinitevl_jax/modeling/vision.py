"""The Qwen2.5-VL vision tower (identical in the teacher and in InfiniteVL), jittable with static shapes.

Everything that depends on the image sizes is computed on the host by ``vision_layout`` from ``grid_thw``: the window
permutation of the patches, the attention segments of window and full blocks, the 2D rotary positions and the validity
of bucket-padded rows. The traced ``VisionTower.__call__`` only gathers, multiplies and masks, so one compiled program
serves every mix of images and videos whose patch rows fit the same bucket.

Layout conventions (as the Qwen2.5-VL processor writes ``pixel_values``):

- A patch row holds ``channels x temporal_patch x patch x patch`` values (1176), flattened in that order.
- Patches of one image/video are ordered by temporal slice, then merged token (raster order over the
  ``(h/m) x (w/m)`` merged grid), then position inside the ``m x m`` merge group (raster). So every run of
  ``merge_unit`` consecutive rows is one merged token.
- Window blocks attend within windows of ``window_size / patch_size / m`` merged tokens per side (partial windows at
  the right and bottom edges), per temporal slice. Full blocks attend within each temporal slice of each image/video.

Attention cost follows the segment sizes, not the square of all rows. Segments are contiguous in the windowed order,
so for each kind of block (window, full) ``vision_layout`` picks a static block size ``Bs`` >= its longest segment:
when no segment crosses a multiple of ``Bs`` ("aligned", e.g. stacks of 448x448 frames: 64-row windows, 1024-row
frames) rows attend within their ``[Bs]`` block (block-diagonal); otherwise a query of block ``i`` attends to the keys
of blocks ``i-1 .. i+1`` (banded), which hold every segment of at most ``Bs`` rows around it. Both still mask by
segment id; where blocks would not save at least half of the dense ``P x P`` logits, the kind stays dense. The choices
are static fields of the layout (a jitted function recompiles only when they change); with bucket padding they depend
only on the bucket size and the config (windows banded, full blocks dense), so one program still serves every mix.

Logical axis names of the parameters: ``vision_patch`` (1176 patch values), ``vision_embed`` (hidden), ``vision_heads``
(the fused ``3 x heads x head_dim`` of ``qkv`` and the ``heads x head_dim`` input of ``proj``), ``vision_mlp``
(SwiGLU intermediate and the merger's hidden), ``vision_merge`` (``merge_unit x hidden`` merger input) and ``embed``
(the language model's hidden, the merger's output). The stacked block axis is added by the sharding rules.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.config import VisionConfig
from infinitevl_jax.modeling.layers import MLP, linear
from infinitevl_jax.modeling.norms import RMSNorm
from infinitevl_jax.modeling.rope import apply_rotary

# Segment id of bucket-padding rows: real rows have ids >= 0, so they never attend to padding (and padding rows attend
# only to each other, which keeps their outputs finite).
PAD_SEGMENT = -1


# ----------------------------------------------------------------------------------------------------------------------
# Host side: validation and layout.


def _grids(grid_thw, config: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n, 3] (t, h, w per image/video), got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        if not np.all(np.equal(np.mod(grid, 1), 0)):
            raise ValueError(f"grid_thw must hold integers, got {grid.tolist()}")
    grid = grid.astype(np.int64)
    bad = np.flatnonzero((grid <= 0).any(axis=1))
    if bad.size:
        raise ValueError(f"grid_thw rows {bad.tolist()} have non-positive entries: {grid[bad].tolist()}")
    m = config.spatial_merge_size
    bad = np.flatnonzero((grid[:, 1:] % m != 0).any(axis=1))
    if bad.size:
        raise ValueError(
            f"grid_thw rows {bad.tolist()} ({grid[bad].tolist()}): grid h and w must be divisible by the spatial "
            f"merge size {m}"
        )
    return grid


def check_grids(grid_thw, num_patch_rows: int, config: VisionConfig) -> np.ndarray:
    """Validates ``grid_thw [n, 3]`` against ``num_patch_rows`` rows of ``pixel_values``; returns it as int64.

    Raises ``ValueError`` naming the problem: a shape other than ``[n, 3]``, non-positive entries, grids not divisible by
    the merge size, or ``sum(t * h * w)`` not matching the number of patch rows.
    """
    grid = _grids(grid_thw, config)
    expected = int(np.prod(grid, axis=1).sum())
    if expected != num_patch_rows:
        raise ValueError(
            f"grid_thw {grid.tolist()} describes sum(t*h*w) = {expected} patch rows, but pixel_values has "
            f"{num_patch_rows}"
        )
    return grid


# Block sizes are rounded up to a multiple of this (GPU-friendly tiles) unless the exact longest segment aligns.
BLOCK_MULTIPLE = 16
# Blocked attention is used only where it computes at most this fraction of the dense ``P x P`` logits.
MAX_BLOCKED_COST = 0.5


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block_plan(segment_ids: np.ndarray, max_segment: int | None = None) -> tuple[int, bool]:
    """Static ``(block, banded)`` for attention within the contiguous segments ``segment_ids [P]`` (windowed order,
    padding ``PAD_SEGMENT``); ``block`` 0 means dense.

    ``max_segment`` given: a bound on every real segment's length, the plan then depends only on it and ``P`` (banded,
    as segments may start anywhere). Otherwise the longest real segment ``L`` sets ``Bs``: ``round_up(L, 16)``, or
    ``L`` itself, whichever no real segment crosses a multiple of (block-diagonal); else banded with the rounded size.
    """
    p = len(segment_ids)
    if max_segment is not None:
        candidates, starts, ends = [], None, None
        longest = max_segment
    else:
        real = np.flatnonzero(segment_ids != PAD_SEGMENT)
        if real.size == 0:
            return 0, False
        ids = segment_ids[real]
        cut = np.flatnonzero((np.diff(ids) != 0) | (np.diff(real) != 1)) + 1
        starts = real[np.concatenate([[0], cut])]
        ends = real[np.concatenate([cut - 1, [real.size - 1]])] + 1
        longest = int((ends - starts).max())
        candidates = [_round_up(longest, BLOCK_MULTIPLE), longest]
    block, banded = _round_up(longest, BLOCK_MULTIPLE), True
    for bs in candidates:
        if np.all(starts // bs == (ends - 1) // bs):
            block, banded = bs, False
            break
    cost = _round_up(p, block) * block * (3 if banded else 1)
    if not p or cost > MAX_BLOCKED_COST * p * p:
        return 0, False
    return block, banded


@flax.struct.dataclass
class SegmentAttention:
    """Segment ids and the static attention plan of one kind of block; ``(q, k, v) -> out`` like ``segment_attention``.

    ``block`` 0: dense (``segment_attention``); else ``blocked_segment_attention`` with ``block`` and ``banded``.
    """

    segment_ids: jax.Array  # [P] int32
    block: int = flax.struct.field(pytree_node=False, default=0)
    banded: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def plan(self) -> tuple[int, bool]:
        return self.block, self.banded

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if not self.block:
            return segment_attention(q, k, v, self.segment_ids)
        return blocked_segment_attention(q, k, v, self.segment_ids, block=self.block, banded=self.banded)


@flax.struct.dataclass
class VisionLayout:
    """Host-computed index arrays for one call of the tower, over ``P`` (bucket-padded) patch rows.

    ``P`` = ``pad_to`` or the real number of rows ``N``; ``M = P // merge_unit`` merged tokens. "Windowed order" is the
    order in which the blocks see the patches. The static fields (hashable, part of the tree structure rather than
    traced) choose how window and full blocks attend: block size ``*_block`` (0: dense), banded or block-diagonal.
    The defaults (dense) suit any segment ids.
    """

    patch_perm: jax.Array  # [P] int32: row i of the windowed order is patch row patch_perm[i].
    token_unperm: jax.Array  # [M] int32: merged token j (original order) is row token_unperm[j] of the windowed order.
    window_segment_ids: jax.Array  # [P] int32, windowed order: one id per window per temporal slice; padding -1.
    full_segment_ids: jax.Array  # [P] int32, windowed order: one id per temporal slice per image/video; padding -1.
    positions: jax.Array  # [P, 2] int32, windowed order: (h, w) patch coordinates for the 2D rotary embedding.
    valid: jax.Array  # [P] bool, original order: False on bucket-padding rows.
    window_block: int = flax.struct.field(pytree_node=False, default=0)
    window_banded: bool = flax.struct.field(pytree_node=False, default=False)
    full_block: int = flax.struct.field(pytree_node=False, default=0)
    full_banded: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_rows(self) -> int:
        return self.patch_perm.shape[0]

    @property
    def window_attention(self) -> SegmentAttention:
        return SegmentAttention(self.window_segment_ids, self.window_block, self.window_banded)

    @property
    def full_attention(self) -> SegmentAttention:
        return SegmentAttention(self.full_segment_ids, self.full_block, self.full_banded)

    def dense(self) -> VisionLayout:
        """The same layout with dense attention in every block (the reference path)."""
        return self.replace(window_block=0, window_banded=False, full_block=0, full_banded=False)


ATTENTION_PLANS = ("grid", "bucket", "dense")


def vision_layout(grid_thw, config: VisionConfig, pad_to: int | None = None, *,
                  attention: str | None = None) -> VisionLayout:
    """Computes the ``VisionLayout`` of the images/videos ``grid_thw [n, 3]`` (Qwen2.5-VL ``get_window_index``).

    ``pad_to`` (a multiple of ``merge_unit``, >= the real number of patch rows) bucket-pads the flat patch list.

    ``attention`` chooses the static attention plan: ``"grid"`` fits block sizes and alignment to these grids (a
    jitted caller compiles once per distinct plan), ``"bucket"`` derives it from ``P`` and the config alone (window
    blocks banded by the largest window, full blocks dense) so every grid mix of one bucket shares a program and a tree
    structure, ``"dense"`` attends densely. Default: ``"grid"``, or ``"bucket"`` when ``pad_to`` is given.
    """
    attention = attention or ("grid" if pad_to is None else "bucket")
    if attention not in ATTENTION_PLANS:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTION_PLANS}")
    grid = _grids(grid_thw, config)
    m, unit = config.spatial_merge_size, config.merge_unit
    win = config.window_size // (config.patch_size * m)  # merged tokens per window side
    n = int(np.prod(grid, axis=1).sum())
    p = n if pad_to is None else int(pad_to)
    if p < n or p % unit:
        raise ValueError(f"pad_to={pad_to} must be a multiple of merge_unit={unit} and >= the {n} real patch rows")

    token_perm, win_seg, full_seg, pos_h, pos_w = [], [], [], [], []
    tokens = windows = slices = 0
    for t, h, w in grid.tolist():
        gh, gw = h // m, w // m  # merged grid
        nwh, nww = -(-gh // win), -(-gw // win)
        y, x = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        window = ((y // win) * nww + x // win).ravel()  # [gh*gw] window of each merged token
        # A stable sort by window keeps raster order inside each window, as get_window_index does.
        order = np.argsort(window, kind="stable")
        frames = np.arange(t)[:, None]
        token_perm.append((frames * gh * gw + order[None] + tokens).ravel())
        win_seg.append((frames * nwh * nww + window[order][None] + windows).ravel())
        full_seg.append(np.broadcast_to(frames + slices, (t, gh * gw)).ravel())
        # Patch coordinates of each (merged token, merge-group position), in windowed order.
        iy, ix = np.divmod(np.arange(unit), m)
        pos_h.append(np.tile((y.ravel()[order][:, None] * m + iy[None]).ravel(), t))
        pos_w.append(np.tile((x.ravel()[order][:, None] * m + ix[None]).ravel(), t))
        tokens += t * gh * gw
        windows += t * nwh * nww
        slices += t

    pad_tokens = np.arange(n // unit, p // unit)
    token_perm = np.concatenate(token_perm + [pad_tokens])
    patch_perm = (token_perm[:, None] * unit + np.arange(unit)[None]).ravel()
    pad_seg = np.full(p - n, PAD_SEGMENT)
    win_seg = np.concatenate([np.repeat(np.concatenate(win_seg), unit), pad_seg])
    full_seg = np.concatenate([np.repeat(np.concatenate(full_seg), unit), pad_seg])
    positions = np.stack([np.concatenate(pos_h + [np.zeros(p - n, np.int64)]),
                          np.concatenate(pos_w + [np.zeros(p - n, np.int64)])], axis=-1)
    if attention == "grid":
        plans = _block_plan(win_seg) + _block_plan(full_seg)
    elif attention == "bucket":
        plans = _block_plan(win_seg, max_segment=win * win * unit) + (0, False)
    else:
        plans = (0, False, 0, False)
    return VisionLayout(
        patch_perm=jnp.asarray(patch_perm, jnp.int32),
        token_unperm=jnp.asarray(np.argsort(token_perm), jnp.int32),
        window_segment_ids=jnp.asarray(win_seg, jnp.int32),
        full_segment_ids=jnp.asarray(full_seg, jnp.int32),
        positions=jnp.asarray(positions, jnp.int32),
        valid=jnp.asarray(np.arange(p) < n),
        window_block=plans[0], window_banded=plans[1], full_block=plans[2], full_banded=plans[3],
    )


# ----------------------------------------------------------------------------------------------------------------------
# Traced side.


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Bidirectional attention within equal segment ids: the dense reference (``P x P`` logits).

    q, k, v: ``[seq, heads, head_dim]``; segment_ids: ``[seq]`` int. Logits and softmax in float32. Every row sees at
    least itself, so no row is fully masked. Returns ``[seq, heads, head_dim]`` in ``v.dtype``. The tower runs
    ``blocked_segment_attention`` where the layout's plan says so; a faster kernel plugs in at ``SegmentAttention``.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = segment_ids[:, None] == segment_ids[None, :]
    logits = jnp.where(mask[None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


def blocked_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block: int,
                              banded: bool) -> jax.Array:
    """``segment_attention`` over ``[block]``-row blocks: equal for every row whose segment it covers.

    Rows are padded (id ``PAD_SEGMENT``) to a multiple of ``block`` and cut into blocks. Block-diagonal
    (``banded=False``): a row sees its own block, exact when no segment crosses a multiple of ``block``. Banded: a row
    of block ``i`` sees blocks ``i-1 .. i+1``, exact for segments of at most ``block`` rows. Keys are still masked by
    segment id, and every row sees itself, so no row is fully masked (``PAD_SEGMENT`` rows see only the padding rows
    within reach: finite values of no meaning). Costs ``P * block`` (``3 P * block`` banded) logits instead of ``P^2``.
    """
    seq, heads, dim = q.shape
    nb = -(-seq // block)
    pad = nb * block - seq
    if pad:
        q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, (0, pad), constant_values=PAD_SEGMENT)
    q, k, v = (x.reshape(nb, block, heads, dim) for x in (q, k, v))
    seg_q = seg_k = segment_ids.reshape(nb, block)
    if banded:
        # Neighbours of the first and last blocks: an id no row has, so they are masked out.
        def band(x, fill=0):
            x = jnp.pad(x, ((1, 1),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
            return jnp.concatenate([x[:-2], x[1:-1], x[2:]], axis=1)  # [nb, 3 * block, ...]

        k, v, seg_k = band(k), band(v), band(seg_k, PAD_SEGMENT - 1)
    scale = dim**-0.5
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = seg_q[:, :, None] == seg_k[:, None, :]
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(nb * block, heads, dim)[:seq].astype(v.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D rotary ``cos, sin [seq, head_dim]`` (float32) from ``(h, w)`` positions ``[seq, 2]``.

    The first half of the rotated features uses ``head_dim/4`` frequencies of h then the same of w; the second half
    repeats it (rotate-half convention).
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [seq, 2, head_dim/4]
    angles = angles.reshape(positions.shape[0], -1)  # [seq, head_dim/2]: h frequencies, then w frequencies
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [seq, heads, head_dim]`` rotated in float32 and cast back."""
    return apply_rotary(x[None], cos[None], sin[None])[0]


# ``(q, k, v) [seq, heads, head_dim] -> [seq, heads, head_dim]``: attention within segments (a ``SegmentAttention``).
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class VisionAttention(nnx.Module):
    """Fused ``qkv`` (bias), 2D rotary on q and k, segment attention, ``proj`` (bias)."""

    def __init__(self, config: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = config.num_heads
        self.qkv = linear(config.hidden_size, 3 * config.hidden_size, ("vision_embed", "vision_heads"), **kw)
        self.proj = linear(config.hidden_size, config.hidden_size, ("vision_heads", "vision_embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> jax.Array:
        seq = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(seq, 3, self.num_heads, -1), 1, 0)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        return self.proj(attend(q, k, v).reshape(seq, -1))


class VisionBlock(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (SwiGLU with bias)."""

    def __init__(self, config: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        axes = ("vision_embed",)
        self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axes=axes, param_dtype=param_dtype)
        self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axes=axes, param_dtype=param_dtype)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, use_bias=True, axes=("vision_embed", "vision_mlp"),
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """``RMSNorm(hidden)``, concatenation of each ``m x m`` group, ``Linear -> GELU (exact) -> Linear``."""

    def __init__(self, config: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        merged = config.hidden_size * config.merge_unit
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.merge_unit = config.merge_unit
        self.ln_q = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axes=("vision_embed",), param_dtype=param_dtype)
        self.mlp_0 = linear(merged, merged, ("vision_merge", "vision_mlp"), **kw)
        self.mlp_2 = linear(merged, config.out_hidden_size, ("vision_mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(x.shape[0] // self.merge_unit, -1)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


@nnx.scan(in_axes=(0, nnx.Carry, 0, None), out_axes=nnx.Carry)
def _run_blocks(block: VisionBlock, x: jax.Array, is_full: jax.Array, context) -> jax.Array:
    cos, sin, window, full = context  # window, full: SegmentAttention (static plans travel in the tree structure)
    if window.plan == full.plan:  # same shapes: one attention, the scanned flag picks the segment ids
        attend = window.replace(segment_ids=jnp.where(is_full, full.segment_ids, window.segment_ids))
    else:
        def attend(q, k, v):
            return jax.lax.cond(is_full, lambda *a: full(*a), lambda *a: window(*a), q, k, v)
    return block(x, cos, sin, attend)


class VisionTower(nnx.Module):
    """Qwen2.5-VL vision transformer: ``pixel_values [P, patch_dim]`` -> merged tokens ``[P // merge_unit, out]``.

    The ``depth`` blocks are one stacked module (leading axis ``depth``) run with ``nnx.scan``, so compile time does not
    grow with depth; window and full-attention blocks differ only in how they attend (segment ids and, where the
    layout's plans differ, block shapes: a ``lax.cond`` on the scanned flag).
    """

    def __init__(self, config: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = linear(config.patch_dim, config.hidden_size, ("vision_patch", "vision_embed"), rngs=rngs,
                                  **kw)

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> VisionBlock:
            return VisionBlock(config, rngs=rngs, **kw)

        self.blocks = make_blocks(rngs)
        self.merger = PatchMerger(config, rngs=rngs, **kw)

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """``pixel_values [P, patch_dim]`` (rows in processor order, bucket padding at the end) -> ``[P // merge_unit,
        out_hidden]`` in the original merged-token order; rows of padding tokens hold finite values of no meaning."""
        cfg = self.config
        if pixel_values.ndim != 2 or pixel_values.shape != (layout.num_rows, cfg.patch_dim):
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}, expected [{layout.num_rows}, {cfg.patch_dim}] "
                f"(rows of the layout, values per patch)"
            )
        # Zeroing padding rows keeps garbage (even NaN) there from reaching real rows through 0 * NaN.
        x = jnp.where(layout.valid[:, None], pixel_values, 0)
        x = self.patch_embed(x.astype(self.dtype) if self.dtype is not None else x)
        x = x[layout.patch_perm]
        cos, sin = rotary_tables(layout.positions, cfg.head_dim, cfg.rope_theta)
        is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes))  # [depth], scanned with blocks
        x = _run_blocks(self.blocks, x, is_full, (cos, sin, layout.window_attention, layout.full_attention))
        return self.merger(x)[layout.token_unperm]
