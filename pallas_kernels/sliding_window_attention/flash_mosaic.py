"""Sliding-window flash attention for Hopper GPUs (sm90), forward and backward, in Pallas's Mosaic GPU lowering.

The Triton lowering (``flash_gpu``) gives each program one instruction stream: the tensor-core products, the
softmax and the loads take turns. Here each program (CTA) is three warpgroups, one *memory* warpgroup issuing TMA
copies into rings of shared-memory slots (``_stream``) and two *compute* warpgroups running asynchronous wgmma
products on what it brings:
  - forward (``_fwd``): the compute warpgroups each own ``block_q`` query rows of one head (the CTA covers
    ``2 * block_q`` rows) and run the online softmax over the window's key/value blocks, which the memory warpgroup
    streams into ``stages`` slots; with ``pingpong`` they take turns on the tensor cores through a shared barrier,
    so that one's softmax (exp2 on the SFU, reductions) runs while the other's products do;
  - backward (``_bwd``): the compute warpgroups each own ``block_k`` keys of one kv head, and the memory warpgroup
    streams (q, dO, lse, delta) blocks of every query head of the group that sees those keys; five products per
    block pair, dQ added by TMA reductions (see ``_bwd``).

The window and causality are the ``flash_gpu`` rule (query ``t`` sees keys ``(t - window, t]``): a CTA walks only the
blocks its rows can see, and each compute warpgroup masks only the blocks that cross its rows' window edge or
diagonal. Softmax in base 2 with ``scale * log2(e)`` applied to the float32 scores; the saved log-sum-exp
``[B, Hq, T]`` (base 2) is ``flash_gpu``'s too, so either backward can follow this forward (``backward=``).

No segment ids (packed batches go to ``flash_gpu``); ``T`` is padded to a multiple of the blocks (padded keys lie
after every real query). Runs only compiled on an sm90 GPU; on other hosts the kernels can be lowered
(``lower(lowering_platforms=("cuda",))``: Mosaic's layout inference and shared-memory budget run then) but not run.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.sliding_window_attention import flash_gpu

LOG2E = math.log2(math.e)
NEG = -1e30  # finite start of the running max: a row whose first blocks are all masked keeps alpha = 1, p = 0


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu
  return mosaic_gpu


def supported() -> bool:
  """Whether the default device can run the kernel: an NVIDIA Hopper (sm90) GPU."""
  dev = jax.devices()[0]
  try:
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")
  except (TypeError, ValueError):  # pragma: no cover
    return False


def _stream(fetch, total, stages, free):
  """The memory warpgroup's loop: ``fetch(s, slot)`` issues step ``s``'s copies into ring slot ``slot``; the first
  ``stages`` steps fill the ring, then step ``s`` waits until every barrier array in ``free`` has seen slot
  ``s % stages`` released by the compute warpgroups."""
  plgpu = _plgpu()
  for s in range(stages):
    pl.when(s < total)(functools.partial(fetch, s, s))

  @pl.loop(stages, jnp.maximum(total, stages))
  def _refill(s):
    slot = lax.rem(s, stages)
    for barrier in free:
      plgpu.barrier_wait(barrier.at[slot])
    fetch(s, slot)


def _fwd(q, k, v, *, scale, window, block_q, block_k, stages, pingpong):
  plgpu = _plgpu()
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  nk = t // block_k
  rows = 2 * block_q  # query rows per CTA
  dtype = q.dtype
  c = scale * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def body(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem,
           k_ready, v_ready, q_ready, k_free, v_free, turn):
    bi = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_q0 = lax.axis_index("q_seq") * rows
    lo, _, _, hi = flash_gpu._kv_block_range(cta_q0, rows, block_k, nk, window)
    n = hi - lo  # key blocks this CTA walks (>= 1)

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q0 = cta_q0 + wg * block_q
      my_q = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, block_q), h], my_q, q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      # this warpgroup's rows need no mask on blocks [lo_f, hi_f) of the CTA's [lo, hi)
      _, lo_f, hi_f, _ = flash_gpu._kv_block_range(q0, block_q, block_k, nk, window)
      lo_f = jnp.clip(lo_f, lo, hi)
      hi_f = jnp.clip(hi_f, lo_f, hi)

      def step(s, carry, masked):
        acc, m_i, l_i = carry
        slot = lax.rem(s, stages)
        j = lo + s
        plgpu.barrier_wait(k_ready.at[slot])

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          if pingpong:
            take_turn()
          return acc_ref[...]

        sc = pl.run_scoped(scores, plgpu.ACC((block_q, block_k), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        sc = sc * c
        if masked:
          qi = q0 + plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 0, layout=wgmma_layout)
          ki = j * block_k + plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 1, layout=wgmma_layout)
          ok = ki <= qi
          if window is not None:
            ok = ok & (ki > qi - window)
          sc = jnp.where(ok, sc, -jnp.inf)
        m_new = jnp.maximum(m_i, sc.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        if pingpong:
          plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may issue its products
        plgpu.barrier_wait(v_ready.at[slot])
        if pingpong:
          plgpu.barrier_wait(turn)  # and the tensor cores are ours again

        def values(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

        acc = pl.run_state(values)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      carry = (plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), wgmma_layout),
               plgpu.layout_cast(jnp.full((block_q,), NEG, jnp.float32), row_layout),
               plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), row_layout))
      if pingpong:
        pl.when(wg == 1)(take_turn)  # offset the two warpgroups by half a step
      carry = lax.fori_loop(0, lo_f - lo, functools.partial(step, masked=True), carry)
      carry = lax.fori_loop(lo_f - lo, hi_f - lo, functools.partial(step, masked=False), carry)
      acc, m_i, l_i = lax.fori_loop(hi_f - lo, n, functools.partial(step, masked=True), carry)
      if pingpong:
        pl.when(wg == 0)(take_turn)

      acc = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
      my_q[...] = acc.astype(dtype)
      lse_smem.at[wg][...] = m_i + jnp.log2(l_i)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, o_ref.at[bi, pl.ds(q0, block_q), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, h, pl.ds(q0, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      kvh = h // g

      def fetch(s, slot):
        src = (bi, pl.ds((lo + s) * block_k, block_k), kvh)
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

      _stream(fetch, n, stages, (k_free, v_free))

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  scratch = [
      plgpu.SMEM((2, block_q, d), dtype, **tiled),  # each compute warpgroup's q, then its output
      plgpu.SMEM((stages, block_k, d), dtype, **tiled),
      plgpu.SMEM((stages, block_k, d), dtype, **tiled),
      plgpu.SMEM((2, block_q), jnp.float32),
      plgpu.Barrier(num_barriers=stages),  # k_ready
      plgpu.Barrier(num_barriers=stages),  # v_ready
      plgpu.Barrier(num_barriers=2),  # q_ready
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k_free
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # v_free
      plgpu.Barrier(num_arrivals=2),  # turn
  ]
  o, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
      scratch_types=scratch,
      grid=(hq, t // rows, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v)
  return o, lse


def _bwd(q, k, v, o, lse, do, *, scale, window, block_q, block_k, stages, dq_mode="reduce", group_dq=False,
         dq_buffers=1, registers=(240, 24)):
  """dQ, dK, dV in one kernel: per CTA ``2 * block_k`` keys of one kv head (one compute warpgroup per ``block_k``),
  walking the ``G`` query heads of the group and, per head, the query blocks that see those keys. Five products per
  (query block, key block): S^T, dV += P^T dO, dP^T, dK += dS^T Q, and dQ's share dS K, which is added into a float32
  dQ in global memory by a TMA reduction (no recomputation of S and dP in a second kernel). For dQ the two compute
  warpgroups pool their dS^T rows in shared memory and each takes half of dQ's columns over all the CTA's keys, so
  one CTA adds one [block_q, D] share per query block (not two). The products go to the tensor cores in two groups
  per pair, (S^T, dP^T), (dV, dK), then dQ (``group_dq=True``: dQ with dV and dK, measured slower). ``registers``:
  per-thread registers of a compute and of the memory warpgroup (setmaxnreg; 2 x compute + memory <= 504).
  ``dq_buffers``:
  shared-memory buffers per warpgroup for the dQ share (2: a reduction may still be reading one while the next is
  written). ``dq_mode``, other than ``"reduce"``, is a timing probe only (dQ is then wrong): ``"none"`` leaves dQ's
  product and reduction out, ``"store"`` its reduction, ``"reduce_only"`` its product (zeros are added)."""
  plgpu = _plgpu()
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  nq = t // block_q
  keys = 2 * block_k  # keys per CTA
  dtype = q.dtype
  c = scale * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))

  half = d // 2  # dQ's columns per compute warpgroup

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dk_ref, dv_ref,
           k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem, ds_smem, dq_smem,
           k_ready, v_ready, q_ready, do_ready, lse_ready, dl_ready, slot_free, ds_ready, done):
    bi = lax.axis_index("batch")
    kvh = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_k0 = lax.axis_index("k_seq") * keys
    lo, _, _, hi = flash_gpu._q_block_range(cta_k0, block_q, keys, nq, window)
    n = hi - lo  # query blocks per head this CTA walks

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(registers[0], action="increase")
      k0 = cta_k0 + wg * block_k

      def operands(w):
        """Warpgroup ``w``'s keys and values in shared memory, and its columns of dQ."""
        mine = pl.ds(w * block_k, block_k)
        return mine, k_smem.at[mine], v_smem.at[mine], pl.ds(w * half, half)

      mine, my_k, my_v, my_cols = operands(wg)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(k0, block_k), kvh], my_k, k_ready.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(k0, block_k), kvh], my_v, v_ready.at[wg])
      plgpu.barrier_wait(k_ready.at[0])  # dQ's product reads both warpgroups' keys
      plgpu.barrier_wait(k_ready.at[1])
      plgpu.barrier_wait(v_ready.at[wg])
      _, lo_f, hi_f, _ = flash_gpu._q_block_range(k0, block_q, block_k, nq, window)
      lo_f = jnp.clip(lo_f, lo, hi)
      hi_f = jnp.clip(hi_f, lo_f, hi)

      def step(i, carry, gi, masked):
        dk, dv = carry
        # the products' loop-invariant operands, with their addresses recomputed in every step: an optimization
        # barrier hides that the warpgroup index is the same. Hoisted out of the loop, their 24 wgmma descriptors
        # (48 registers) were spilled and reloaded before every product, and those reloads' latency bounded the
        # kernel (the backward took 1.2x as long)
        _, op_k, op_v, op_cols = operands(lax.optimization_barrier(wg))
        s = gi * n + (i - lo)
        slot = lax.rem(s, stages)
        h = kvh * g + gi
        plgpu.barrier_wait(q_ready.at[slot])
        plgpu.barrier_wait(lse_ready.at[slot])

        plgpu.barrier_wait(do_ready.at[slot])

        def scores_t(refs):  # S^T = K Q^T and dP^T = V dO^T, [block_k, block_q] each, issued together
          st_ref, dpt_ref = refs
          plgpu.wgmma(st_ref, op_k, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
          plgpu.wgmma(dpt_ref, op_v, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

        zeros_t = plgpu.layout_cast(jnp.zeros((block_k, block_q), jnp.float32), wgmma_layout)
        st, dpt = pl.run_state(scores_t)((plgpu.ACC.init(zeros_t), plgpu.ACC.init(zeros_t)))
        lse = plgpu.load(lse_smem.at[slot], (), layout=col_layout)
        pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, st.shape, [1]))
        if masked:
          ki = k0 + plgpu.broadcasted_iota(jnp.int32, st.shape, 0, layout=wgmma_layout)
          qi = i * block_q + plgpu.broadcasted_iota(jnp.int32, st.shape, 1, layout=wgmma_layout)
          ok = ki <= qi
          if window is not None:
            ok = ok & (ki > qi - window)
          pt = jnp.where(ok, pt, 0.0)
        plgpu.barrier_wait(dl_ready.at[slot])
        dl = plgpu.load(dl_smem.at[slot], (), layout=col_layout)
        dst = (pt * (dpt - lax.broadcast_in_dim(dl, st.shape, [1]))).astype(dtype)
        par = lax.rem(s, 2)
        dq_product = dq_mode in ("reduce", "store")
        if dq_product:
          # dS^T's rows of this warpgroup's keys, for dQ's product below (as its transposed left operand); two
          # buffers by step parity: a warpgroup reaches step s + 2 only after the other has passed step s + 1's
          # barrier, i.e. finished step s's dQ product
          ds_smem.at[par, mine][...] = dst
          plgpu.commit_smem()
          plgpu.barrier_arrive(ds_ready.at[par])

        if dq_product and group_dq:
          plgpu.barrier_wait(ds_ready.at[par])

        def dq_share(acc_ref):
          # dQ's share over the CTA's keys, this warpgroup's half of the columns: dS K[:, cols], with dS the
          # transposed dS^T of both warpgroups
          plgpu.wgmma(acc_ref, plgpu.transpose_ref(ds_smem.at[par], (1, 0)), k_smem.at[:, op_cols])

        def dv_dk_dq(refs):
          plgpu.wgmma(refs[0], pt.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(refs[1], dst, q_smem.at[slot])
          if len(refs) == 3:
            dq_share(refs[2])

        zeros_q = plgpu.layout_cast(jnp.zeros((block_q, half), jnp.float32), wgmma_layout)
        if dq_product and group_dq:
          dv, dk, dq = pl.run_state(dv_dk_dq)((plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(zeros_q)))
        else:
          dv, dk = pl.run_state(dv_dk_dq)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
        plgpu.barrier_arrive(slot_free.at[slot])
        if dq_mode != "none":
          if dq_mode == "reduce_only":
            dq = zeros_q
          elif not group_dq:
            plgpu.barrier_wait(ds_ready.at[par])
            dq = pl.run_state(dq_share)(plgpu.ACC.init(zeros_q))
          # added into the float32 dQ by a TMA reduction
          # the reduction issued dq_buffers steps ago has read this buffer
          plgpu.wait_smem_to_gmem(dq_buffers - 1, wait_read_only=True)
          my_dq = dq_smem.at[wg, lax.rem(s, dq_buffers)]
          my_dq[...] = dq
          plgpu.commit_smem()
          if dq_mode != "store":
            plgpu.copy_smem_to_gmem(my_dq, dq_ref.at[bi, pl.ds(i * block_q, block_q), h, my_cols],
                                    reduction_op="add")
        return dk, dv

      def per_head(gi, carry):
        carry = lax.fori_loop(lo, lo_f, functools.partial(step, gi=gi, masked=True), carry)
        carry = lax.fori_loop(lo_f, hi_f, functools.partial(step, gi=gi, masked=False), carry)
        return lax.fori_loop(hi_f, hi, functools.partial(step, gi=gi, masked=True), carry)

      zeros = plgpu.layout_cast(jnp.zeros((block_k, d), jnp.float32), wgmma_layout)
      dk, dv = lax.fori_loop(0, g, per_head, (zeros, zeros))
      plgpu.wait_smem_to_gmem(0)
      plgpu.barrier_arrive(done)  # the other warpgroup's last dQ product has read these keys
      plgpu.barrier_wait(done)
      my_k[...] = (dk * scale).astype(dtype)
      my_v[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_k, dk_ref.at[bi, pl.ds(k0, block_k), kvh])
      plgpu.copy_smem_to_gmem(my_v, dv_ref.at[bi, pl.ds(k0, block_k), kvh])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(registers[1], action="decrease")

      def fetch(s, slot):
        gi = lax.div(s, n)
        i = lo + lax.rem(s, n)
        h = kvh * g + gi
        rows = (bi, pl.ds(i * block_q, block_q), h)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(i * block_q, block_q)], lse_smem.at[slot],
                                lse_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
        plgpu.copy_gmem_to_smem(dl_ref.at[bi, h, pl.ds(i * block_q, block_q)], dl_smem.at[slot],
                                dl_ready.at[slot])

      _stream(fetch, g * n, stages, (slot_free,))

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  scratch = [
      plgpu.SMEM((keys, d), dtype, **tiled),  # the CTA's keys (then dk), block_k rows per compute warpgroup
      plgpu.SMEM((keys, d), dtype, **tiled),  # values (then dv)
      plgpu.SMEM((stages, block_q, d), dtype, **tiled),  # q ring
      plgpu.SMEM((stages, block_q, d), dtype, **tiled),  # dO ring
      plgpu.SMEM((stages, block_q), jnp.float32),  # lse ring
      plgpu.SMEM((stages, block_q), jnp.float32),  # delta ring
      plgpu.SMEM((2, keys, block_q), dtype, **tiled),  # dS^T by step parity, block_k rows per warpgroup
      plgpu.SMEM((2, dq_buffers, block_q, half), jnp.float32, transforms=(plgpu.TilingTransform((8, 32)),
                                                             plgpu.SwizzleTransform(128))),  # dQ share
      plgpu.Barrier(num_barriers=2),  # k_ready
      plgpu.Barrier(num_barriers=2),  # v_ready
      plgpu.Barrier(num_barriers=stages),  # q_ready
      plgpu.Barrier(num_barriers=stages),  # do_ready
      plgpu.Barrier(num_barriers=stages),  # lse_ready
      plgpu.Barrier(num_barriers=stages),  # dl_ready
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # slot_free
      plgpu.Barrier(num_arrivals=2, num_barriers=2),  # ds_ready, by step parity
      plgpu.Barrier(num_arrivals=2),  # done
  ]
  mesh = plgpu.Mesh(grid=(hkv, t // keys, b), grid_names=("heads", "k_seq", "batch"), num_threads=3,
                    thread_name="wg")

  def stateful(refs):
    @pl.core_map(mesh, compiler_params=plgpu.CompilerParams(approx_math=True), name="swa_mosaic_bwd")
    def _():
      pl.run_scoped(lambda *scr: body(*refs, *scr), *scratch, collective_axes="wg")

  dq_acc = jnp.zeros(q.shape, jnp.float32)
  *_, dq_acc, dk, dv = pl.run_state(stateful)(
      (q, k, v, do, lse, delta, dq_acc, jnp.zeros_like(k), jnp.zeros_like(v)))
  return (dq_acc * scale).astype(dtype), dk, dv


class _Config:
  """Hashable static configuration (custom_vjp's non-differentiable argument)."""

  def __init__(self, **kw):
    self._kw = tuple(sorted(kw.items()))
    self.fwd = {n: kw[n] for n in ("scale", "window", "block_q", "block_k", "stages", "pingpong")}
    self.backward = kw["backward"]
    if self.backward == "mosaic":
      self.bwd = dict(scale=kw["scale"], window=kw["window"], block_q=kw["bwd_block_q"], block_k=kw["bwd_block_k"],
                      stages=kw["bwd_stages"], group_dq=kw["bwd_group_dq"], registers=kw["bwd_registers"])
    else:
      self.bwd = dict(scale=kw["scale"], window=kw["window"], interpret=False, block_q=kw["bwd_block_q"],
                      block_k=kw["bwd_block_k"], num_warps=kw["bwd_num_warps"], num_stages=kw["bwd_stages"])

  def __hash__(self):
    return hash(self._kw)

  def __eq__(self, other):
    return isinstance(other, _Config) and self._kw == other._kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, cfg):
  return _fwd(q, k, v, **cfg.fwd)[0]


def _attention_fwd(q, k, v, cfg):
  o, lse = _fwd(q, k, v, **cfg.fwd)
  return o, (q, k, v, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, o, lse = res
  if cfg.backward == "mosaic":
    return _bwd(q, k, v, o, lse, do, **cfg.bwd)
  return flash_gpu._bwd(q, k, v, None, o, lse, do, **cfg.bwd)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, window, segment_ids=None, scale=None, block_q=64, block_k=128, stages=2,
                    pingpong=True, backward="mosaic", bwd_block_q=64, bwd_block_k=64, bwd_stages=2,
                    bwd_num_warps=8, bwd_group_dq=False, bwd_registers=(240, 24)):
  """Sliding-window (``window=None``: full) causal attention, ``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]`` in bf16 or
  float16, ``D`` a multiple of 64. Differentiable. ``backward``: ``"mosaic"`` (``_bwd``: one kernel, five products
  per block pair, ``bwd_block_k`` keys per compute warpgroup) or ``"triton"`` (``flash_gpu``'s two kernels, which
  recompute S and dP for dQ; ``bwd_block_q`` x ``bwd_block_k`` is then its dK/dV kernel's block). ``bwd_group_dq``,
  ``bwd_registers``: the Mosaic backward's ``group_dq`` and ``registers``."""
  if segment_ids is not None:
    raise ValueError("the Mosaic GPU kernel takes no segment_ids; packed batches need backend='pallas_gpu' or 'xla'")
  if backward not in ("mosaic", "triton"):
    raise ValueError(f"backward must be 'mosaic' or 'triton', got {backward!r}")
  b, t, hq, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d or hq % k.shape[2]:
    raise ValueError(f"expected k, v [B, T, Hkv, D] with Hq a multiple of Hkv; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must share a 16-bit float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if d % 64 or any(x % 64 for x in (block_q, block_k, bwd_block_q, bwd_block_k)):
    raise ValueError(f"head dim ({d}) and the blocks ({block_q}, {block_k}, {bwd_block_q}, {bwd_block_k}) must be "
                     "multiples of 64")
  scale = d ** -0.5 if scale is None else float(scale)
  mult = math.lcm(2 * block_q, block_k, bwd_block_q, 2 * bwd_block_k)
  tp = -(-t // mult) * mult
  if tp != t:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
  if window is not None and window >= tp:
    window = None
  cfg = _Config(scale=scale, window=window, block_q=block_q, block_k=block_k, stages=stages, pingpong=pingpong,
                backward=backward, bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, bwd_stages=bwd_stages,
                bwd_num_warps=bwd_num_warps, bwd_group_dq=bwd_group_dq, bwd_registers=tuple(bwd_registers))
  return _attention(q, k, v, cfg)[:, :t]
