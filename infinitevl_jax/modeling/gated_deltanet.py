"""Gated DeltaNet token mixer (the release's layer; REFERENCE section 3).

Per head, with state S ``[K, V]``: ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
``o_t = S_t^T (K^-0.5 q_t)``, with q/k L2-normalised, beta = sigmoid(b_proj x), g = -exp(A_log) softplus(a_proj x + dt_bias).
q, k and v each pass a depthwise causal short convolution (kernel 4) and SiLU; the output is RMS-normalised per head
and gated by SiLU(g_proj x). Segment ids reset both the recurrent state and the convolution windows at document
boundaries, so packed documents and padding never leak into each other (the release ignores both).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax import ops
from infinitevl_jax.config import TextConfig
from infinitevl_jax.modeling.layers import check_step_rows, fuse_linears, linear, pad_rows, padded_rows, split_last
from infinitevl_jax.modeling.norms import rms_norm


def causal_conv1d(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None,
                  state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal convolution. ``x [B,T,C]``, ``kernel [W,C]`` (tap W-1 is the current token).

    ``state [B,W-1,C]``: the inputs preceding ``x`` (zeros when None). Taps reading a token of another segment
    contribute nothing. Returns ``(y [B,T,C], new_state [B,W-1,C])`` = the last W-1 inputs.
    """
    B, T, C = x.shape
    W = kernel.shape[0]
    prev = jnp.zeros((B, W - 1, C), x.dtype) if state is None else state.astype(x.dtype)
    xp = jnp.concatenate([prev, x], axis=1)
    if segment_ids is not None:
        # The preceding inputs belong to the first token's segment (a continued stream).
        seg_p = jnp.concatenate([jnp.repeat(segment_ids[:, :1], W - 1, axis=1), segment_ids], axis=1)
    y = jnp.zeros((B, T, C), jnp.float32)
    for i in range(W):
        xs = xp[:, i : i + T].astype(jnp.float32)
        if segment_ids is not None:
            xs = jnp.where((seg_p[:, i : i + T] == segment_ids)[..., None], xs, 0.0)
        y = y + xs * kernel[i].astype(jnp.float32)
    return y.astype(x.dtype), xp[:, T:]


class GatedDeltaNet(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.head_k, self.head_v = c.num_linear_heads, c.linear_head_dim, c.linear_value_dim
        key_dim, value_dim = self.num_heads * self.head_k, self.num_heads * self.head_v
        self.norm_eps = c.linear_norm_eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(c.hidden_size, key_dim, ("embed", "gdn_heads"), **kw)
        self.k_proj = linear(c.hidden_size, key_dim, ("embed", "gdn_heads"), **kw)
        self.v_proj = linear(c.hidden_size, value_dim, ("embed", "gdn_heads"), **kw)
        self.a_proj = linear(c.hidden_size, self.num_heads, ("embed", "gdn_heads"), **kw)
        self.b_proj = linear(c.hidden_size, self.num_heads, ("embed", "gdn_heads"), **kw)
        self.g_proj = linear(c.hidden_size, value_dim, ("embed", "gdn_heads"), **kw)
        self.o_proj = linear(value_dim, c.hidden_size, ("gdn_heads", "embed"), **kw)
        # fla's defaults: A ~ U(0, 16), dt ~ logU(1e-3, 0.1) stored as inverse-softplus.
        ka, kd = jax.random.split(rngs.params())
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(ka, (self.num_heads,), jnp.float32, 1.0, 16.0)).astype(param_dtype),
                               logical_axes=("gdn_heads",))
        dt = jnp.exp(jax.random.uniform(kd, (self.num_heads,), jnp.float32, math.log(1e-3), math.log(0.1)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype), logical_axes=("gdn_heads",))
        # PyTorch's default depthwise Conv1d init: U(-1/sqrt(W), 1/sqrt(W)).
        bound = 1.0 / math.sqrt(c.conv_size)
        conv = lambda ch: nnx.Param(
            jax.random.uniform(rngs.params(), (c.conv_size, ch), param_dtype, -bound, bound),
            logical_axes=("conv", "gdn_heads"),
        )
        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(key_dim), conv(key_dim), conv(value_dim)
        self.o_norm = nnx.Param(jnp.ones((self.head_v,), param_dtype), logical_axes=("norm",))
        self.in_proj = self.qkv_conv1d = nnx.data(None)  # inference only (``fuse_projections``)

    def fuse_projections(self, *, delete: bool = False) -> None:
        """Inference: the six input projections as one ``in_proj`` (order q, k, v, output gate, a, b) and the three
        short-convolution kernels as one ``qkv_conv1d``, so a step runs one product and one convolution (same
        results; see ``layers.fuse_linears``). ``delete=True`` frees the separate arrays."""
        if self.in_proj is not None:
            return
        self.in_proj = nnx.data(fuse_linears([self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj,
                                              self.b_proj], delete=delete))
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        self.qkv_conv1d = nnx.Param(jnp.concatenate([c[...] for c in convs], axis=1),
                                    logical_axes=("conv", "gdn_heads"))
        if delete:
            for c in convs:
                c[...].delete()
        self.q_proj = self.k_proj = self.v_proj = self.g_proj = self.a_proj = self.b_proj = nnx.data(None)
        self.q_conv1d = self.k_conv1d = self.v_conv1d = nnx.data(None)

    def inputs(self, x: jax.Array, segment_ids, conv_state=None, live=None):
        """Everything the recurrence and the output need from ``x [B,T,E]``: ``q, k [B,T,H,K]``, ``v [B,T,H,V]``
        (projected, convolved, SiLU), ``g, beta [B,T,H]`` float32 (g the log-decay, <= 0), the output gate's
        projection ``[B,T,H*V]`` and the new conv states. ``live [B,T]`` (cached steps): the q/k/v projections of
        padding tokens are zeroed, so padding never enters the convolution windows."""
        B, T, _ = x.shape
        H, HK, HV = self.num_heads, self.num_heads * self.head_k, self.num_heads * self.head_v
        zero_pad = (lambda y: y) if live is None else (lambda y: jnp.where(live[..., None], y, 0))
        st = (None, None, None) if conv_state is None else conv_state
        if self.in_proj is not None:
            qkv, gate, a, b = split_last(self.in_proj(x), (2 * HK + HV, HV, H, H))
            prev = None if conv_state is None else jnp.concatenate(st, axis=-1)
            y, ns = causal_conv1d(zero_pad(qkv), self.qkv_conv1d[...], segment_ids, prev)
            q, k, v = split_last(jax.nn.silu(y), (HK, HK, HV))
            new_state = split_last(ns, (HK, HK, HV))
        else:
            out, new_state = [], []
            for proj, kern, s in ((self.q_proj, self.q_conv1d, st[0]), (self.k_proj, self.k_conv1d, st[1]),
                                  (self.v_proj, self.v_conv1d, st[2])):
                y, ns = causal_conv1d(zero_pad(proj(x)), kern[...], segment_ids, s)
                out.append(jax.nn.silu(y))
                new_state.append(ns)
            q, k, v = out
            gate, a, b = self.g_proj(x), self.a_proj(x), self.b_proj(x)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        a = a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
        return (q.reshape(B, T, H, self.head_k), k.reshape(B, T, H, self.head_k), v.reshape(B, T, H, self.head_v),
                g, beta, gate, tuple(new_state))

    def output(self, gate: jax.Array, o: jax.Array, dtype) -> jax.Array:
        """Per-head RMSNorm of ``o [B,T,H,V]`` times SiLU(gate), then o_proj (``gate``: the output gate's
        projection ``[B,T,H*V]``)."""
        B, T = o.shape[:2]
        gate = jax.nn.silu(gate.astype(jnp.float32)).reshape(B, T, self.num_heads, self.head_v)
        o = rms_norm(o.astype(jnp.float32), self.o_norm[...].astype(jnp.float32), self.norm_eps) * gate
        return self.o_proj(o.reshape(B, T, -1).astype(dtype))

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None, **unused) -> jax.Array:
        q, k, v, g, beta, gate, _ = self.inputs(x, segment_ids)
        o, _ = ops.gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids)
        return self.output(gate, o, x.dtype)

    def step(self, x: jax.Array, *, segment_ids: jax.Array, cache):
        """Cached forward of a chunk ``x [B,C,E]`` (inference; C = 1 decodes with the recurrent form).

        ``cache``: ``(conv_q [B,W-1,H*K], conv_k, conv_v [B,W-1,H*V], state [B,H,K,V] float32)``. Batches are
        left-padded (``segment_ids`` 0 before the prompt, 1 on it): padding inputs are zeroed so they never enter the
        conv windows, and the recurrent state restarts at the first real token. Returns ``(out, new cache)``.
        """
        live = segment_ids > 0
        conv_q, conv_k, conv_v, state = cache
        B, R, T = state.shape[0], x.shape[0], x.shape[1]
        check_step_rows(R, B, T)
        if T == 1 and self.in_proj is not None:
            # Decode with fused projections: everything between in_proj and o_proj as one op (two GPU kernels). Its
            # output has the projection's rows (a single row may run as a padded two-row product).
            y, *conv, new_state = ops.gdn_decode_mixer(
                padded_rows(self.in_proj, x.reshape(R, -1)), conv_q, conv_k, conv_v, self.qkv_conv1d[...],
                self.A_log[...], self.dt_bias[...], self.o_norm[...], live[:, 0], state.astype(jnp.float32),
                num_heads=self.num_heads, head_k=self.head_k, head_v=self.head_v, eps=self.norm_eps)
            out = self.o_proj(y.astype(x.dtype))[:R].reshape(R, 1, -1)
        else:
            x = x[:B]
            q, k, v, g, beta, gate, conv = self.inputs(x, segment_ids, (conv_q, conv_k, conv_v), live)
            o, new_state = ops.gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids,
                                                initial_state=state.astype(jnp.float32), output_final_state=True,
                                                recurrent=T == 1)
            if T > 1:
                # A row that is still all padding keeps an empty state. (One token: a padding row has seen only
                # padding, so its state and conv windows are zeros and its zeroed q/k/v keep them zero.)
                new_state = jnp.where(live[:, -1, None, None, None], new_state, 0.0)
            out = pad_rows(self.output(gate, o, x.dtype), R)
        conv = tuple(c.astype(s.dtype) for c, s in zip(conv, (conv_q, conv_k, conv_v)))
        return out, type(cache)(*conv, new_state.astype(state.dtype))
