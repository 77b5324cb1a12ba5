"""Per-chunk algebra of the chunked gated delta rule, shared by the XLA form and the Pallas kernels.

Every function works on one chunk of C tokens of one head, as 2-D arrays, and uses only ops that lower both
through Mosaic TPU and through Triton (dot_general, where, exp, iota comparisons, keepdims reductions): the
kernels call these functions on the blocks they load, the XLA form vmaps them over chunks and heads.

Notation (REFERENCE.md section 3), for a chunk with state S0 [K, V] on entry:
  gam [C, 1]  within-chunk cumulative log-decay, gam_i = sum_{t <= i} g_t
  m   [C, 1]  1 where no segment reset happened between the chunk start and token i (S0 still reaches i)
  seg [C, 1]  segment number (monotone, counts resets); tokens interact only inside one segment
  D_ij = [i >= j][seg_i == seg_j] exp(gam_i - gam_j), E_i = m_i exp(gam_i),
  F_j = D_{C-1, j} (decay from token j to the chunk end), gl = E_{C-1}.
  L = strict_lower(beta_i (k_i . k_j) D_ij), A = (I + L)^-1, U = A (beta V), W = A (beta E K)
  V' = U - W S0                       (the delta-rule corrected values)
  O  = (E Q) S0 + (Q K^T * D) V'
  S1 = gl S0 + (F K)^T V'
Resets are exact: they are masks on D, E, F, never a large negative g.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32
SUB = 16  # diagonal block size of the triangular inverse


def dot(a, b, ta=False, tb=False, precision=None):
  """a @ b (optionally transposed operands) with float32 accumulation; exact fp32 for fp32 operands unless
  `precision` (used for float32 operands only) says otherwise."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  prec = lax.Precision.DEFAULT
  if a.dtype == f32 and b.dtype == f32:
    prec = lax.Precision.HIGHEST if precision is None else precision
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=f32)


def _iota2(n, m):
  return lax.broadcasted_iota(jnp.int32, (n, m), 0), lax.broadcasted_iota(jnp.int32, (n, m), 1)


def col_to_row(x):
  """[C, 1] -> [1, C] without a transpose op (a masked sublane reduction lowers everywhere)."""
  r, c = _iota2(x.shape[0], x.shape[0])
  return jnp.sum(jnp.where(r == c, x, 0.0), axis=0, keepdims=True)


def row_to_col(x):
  """[1, C] -> [C, 1]."""
  r, c = _iota2(x.shape[1], x.shape[1])
  return jnp.sum(jnp.where(r == c, x, 0.0), axis=1, keepdims=True)


def last(x):
  """[C, 1] -> [1, 1], the last row."""
  r = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(r == x.shape[0] - 1, x, 0.0), axis=0, keepdims=True)


def chunk_cumsum(g, C):
  """Within-chunk cumulative sum of the per-token log-decay g [N, Tp, *] along its token axis (XLA, outside the
  kernels): [N, Tp, 1] heads-first or [B, Tp, H, 1] in the caller's layout."""
  N, Tp = g.shape[:2]
  return jnp.cumsum(g.reshape(N, Tp // C, C, *g.shape[2:]), axis=2).reshape(g.shape)


def prefix_rows(grow, lo, n):
  """Rows lo .. lo + n - 1 of the inclusive prefix sum of a chunk's row vector grow [1, C], as an [n, 1] column.

  The within-chunk cumulative sum of g from masks and a reduction (a `cumsum` op does not lower inside TPU kernels).
  """
  C = grow.shape[1]
  r = lax.broadcasted_iota(jnp.int32, (n, C), 0) + lo
  c = lax.broadcasted_iota(jnp.int32, (n, C), 1)
  return jnp.sum(jnp.where(c <= r, grow, 0.0), axis=1, keepdims=True)


def gates(gam, m, seg):
  """Decay/segment factors of a chunk: D [C, C], E [C, 1], F [C, 1], gl [1, 1] (all float32)."""
  C = gam.shape[0]
  r, c = _iota2(C, C)
  same = (seg == col_to_row(seg)) & (r >= c)
  # exp only of masked differences: exp(gam_i - gam_j) <= 1 for i >= j, never an overflow.
  D = jnp.where(same, jnp.exp(jnp.where(same, gam - col_to_row(gam), 0.0)), 0.0)
  E = m * jnp.exp(gam)
  gam_last, seg_last = last(gam), last(seg)
  F = jnp.where(seg == seg_last, jnp.exp(gam_last - gam), 0.0)
  gl = last(m) * jnp.exp(gam_last)
  return D, E, F, gl


def strict_lower(C):
  r, c = _iota2(C, C)
  return r > c


def unit_lower_inverse(L, precision=None):
  """(I + L)^-1 for strictly lower-triangular L [C, C] float32, with kernel-friendly ops only.

  The 16x16 diagonal blocks are solved by forward substitution, one row of every block per step
  (a masked [C, C] @ [C, C] product, so it runs on the matrix units); the strictly block-lower rest
  N = Bd L_off is nilpotent of order C/16, so (I + N)^-1 = I - N + N^2 - N^3 (exact for C = 64).
  This is the blocked triangular solve; it avoids the unstable full Neumann series over L itself.
  """
  C = L.shape[0]
  r, c = _iota2(C, C)
  nblk = C // SUB
  blk = jnp.zeros((C, C), bool)
  for b in range(nblk):
    lo, hi = b * SUB, (b + 1) * SUB
    blk = blk | ((r >= lo) & (r < hi) & (c >= lo) & (c < hi))
  eye = (r == c).astype(f32)
  Ld = jnp.where(blk, L, 0.0)
  x = eye
  for i in range(1, SUB):
    rows = r == i
    for b in range(1, nblk):
      rows = rows | (r == b * SUB + i)
    x = jnp.where(rows, eye - dot(jnp.where(rows, Ld, 0.0), x, precision=precision), x)
  if nblk == 1:
    return x
  n = dot(x, jnp.where(blk, 0.0, L), precision=precision)
  acc, term = x, x
  for p in range(1, nblk):
    term = dot(n, term, precision=precision)
    acc = acc - term if p % 2 else acc + term
  return acc


def unit_lower_inverse_doubling(L, precision=None):
  """(I + L)^-1 for strictly lower-triangular L [n, n] (n a power of two) by doubling the inverted diagonal blocks.

  With X the inverse on the diagonal blocks of size s, the inverse on the blocks of size 2s is X - X L_s X, where
  L_s keeps L's entries in the lower-left s x s quadrant of each 2s block: the 2 x 2 block inverse
  [[A, 0], [M, B]]^-1 = [[A^-1, 0], [-B^-1 M A^-1, B^-1]] for all blocks at once. log2(n) - 1 levels of two
  dependent products (6 for n = 16, against n - 1 = 15 for forward substitution); every intermediate is a part of
  the inverse itself, so nothing grows beyond its entries (unlike a power series in L).
  """
  n = L.shape[0]
  r, c = _iota2(n, n)
  blk = lambda x, s: lax.shift_right_logical(x, jnp.full_like(x, s.bit_length() - 1))  # x // s, s a power of 2
  x = (r == c).astype(f32) - jnp.where((blk(r, 2) == blk(c, 2)) & (r > c), L, 0.0)  # [[1, 0], [l, 1]]^-1
  s = 2
  while s < n:
    quad = (blk(r, 2 * s) == blk(c, 2 * s)) & (blk(r, s) != blk(c, s)) & (r > c)
    x = x - dot(x, dot(jnp.where(quad, L, 0.0), x, precision=precision), precision=precision)
    s *= 2
  return x


DIAG_INVERSES = {"substitution": unit_lower_inverse, "doubling": unit_lower_inverse_doubling}


def tile_inverse(Lt, precision=None, diag="substitution"):
  """(I + L)^-1 on tiles: Lt[i][j] (j <= i) are the [S, S] float32 tiles of a strictly lower-triangular L.

  Each diagonal tile is inverted by forward substitution (`unit_lower_inverse` on an S x S tile: S - 1 small
  dependent products), the off-diagonal tiles by block forward substitution,
  Ai_ij = -Ai_ii sum_{j <= t < i} L_it Ai_tj. All products are [S, S] x [S, S]: ~0.3 MFLOP for C = 64 instead of
  ~4.7 MFLOP for the masked [C, C] products of `unit_lower_inverse`. Returns the tiles Ai[i][j], j <= i.
  `precision`: of the float32 products (None: exact float32). `diag`: how the diagonal tiles are inverted
  ("substitution" or "doubling", `DIAG_INVERSES`).
  """
  nb = len(Lt)
  mm = functools.partial(dot, precision=precision)
  Ai = [[None] * nb for _ in range(nb)]
  for i in range(nb):
    Ai[i][i] = DIAG_INVERSES[diag](Lt[i][i], precision)
  for i in range(1, nb):
    for j in range(i - 1, -1, -1):
      acc = mm(Lt[i][j], Ai[j][j])
      for t in range(j + 1, i):
        acc = acc + mm(Lt[i][t], Ai[t][j])
      Ai[i][j] = -mm(Ai[i][i], acc)
  return Ai


def _prep_rows(load, store, C):
  """The outputs of prep that need no inverse: p = Q K^T * D, qe = E Q, kf = F K, gl. Returns k, D, E."""
  q, k = load("q", None), load("k", None)
  D, E, F, gl = gates(load("gam", None), load("m", None), load("seg", None))
  store("p", None, dot(q, k, tb=True) * D)
  store("qe", None, q * E)
  store("kf", None, k * F)
  store("gl", None, jnp.zeros((C, 1), f32) + gl)
  return k, D, E


def chunk_prep(load, store, C, inverse_precision=None, diag_inverse="substitution"):
  """Everything of one chunk that does not depend on the state, written once so the serial passes stay short.

  `load(name, b)` returns rows [b*SUB, (b+1)*SUB) of input `name` (q, k, v, gam, beta, m, seg), or the whole
  chunk for b = None; `store(name, b, x)` writes likewise (for "a", b = (i, j) is a [SUB, SUB] tile).
  Writes w, u (as `chunk_wu`), a = A = (I + L)^-1 (compute dtype, reused by the gradient kernel),
  p = Q K^T * D, qe = E Q, kf = F K and gl (the chunk's total decay, repeated on every row).
  The inverse works on [SUB, SUB] tiles (`tile_inverse`, its float32 products at `inverse_precision`, its diagonal
  tiles by `diag_inverse`).
  """
  k, _, _ = _prep_rows(load, store, C)
  cdt = k.dtype
  nb = C // SUB
  kb = [load("k", b) for b in range(nb)]
  gb = [load("gam", b) for b in range(nb)]
  sb = [load("seg", b) for b in range(nb)]
  bb = [load("beta", b) for b in range(nb)]
  grow = [col_to_row(x) for x in gb]
  srow = [col_to_row(x) for x in sb]
  strict = strict_lower(SUB)
  Lt = [[None] * nb for _ in range(nb)]
  for i in range(nb):
    for j in range(i + 1):
      mask = sb[i] == srow[j]
      if i == j:
        mask = mask & strict
      Dij = jnp.where(mask, jnp.exp(jnp.where(mask, gb[i] - grow[j], 0.0)), 0.0)
      Lt[i][j] = bb[i] * dot(kb[i], kb[j], tb=True) * Dij
  Ai = tile_inverse(Lt, inverse_precision, diag_inverse)
  zero = jnp.zeros((SUB, SUB), cdt)
  for i in range(nb):
    u = w = None
    for j in range(nb):
      if j > i:
        store("a", (i, j), zero)
        continue
      a = Ai[i][j].astype(cdt)
      store("a", (i, j), a)
      Ej = load("m", j) * jnp.exp(gb[j])
      du = dot(a, (bb[j] * load("v", j)).astype(cdt))
      dw = dot(a, (bb[j] * Ej * kb[j]).astype(cdt))
      u, w = (du, dw) if u is None else (u + du, w + dw)
    store("u", i, u)
    store("w", i, w)


def chunk_prep_dense(load, store, C, inverse_precision=None):
  """`chunk_prep` on whole [C, C] matrices instead of [SUB, SUB] tiles: one K K^T product, the inverse by doubling
  over the whole chunk (`unit_lower_inverse_doubling`: 2 log2(C) - 2 dependent [C, C] products), A stored at once
  (`store("a", None, A)`) and U, W as one product each. Fewer, larger products than the tiled form (14 against ~70
  for C = 64) for ~16x the inverse's multiply-adds. Same outputs as `chunk_prep`.
  """
  k, D, E = _prep_rows(load, store, C)
  cdt = k.dtype
  beta = load("beta", None)
  L = jnp.where(strict_lower(C), beta * dot(k, k, tb=True) * D, 0.0)
  a = unit_lower_inverse_doubling(L, inverse_precision).astype(cdt)
  store("a", None, a)
  store("w", None, dot(a, (beta * E * k).astype(cdt)))
  store("u", None, dot(a, (beta * load("v", None)).astype(cdt)))


def chunk_forward_pre(qe, kf, w, u, p, glc, S, need_o=True, return_vn=False):
  """`chunk_forward` from the stored state-independent parts of `chunk_prep`: 4 products (2 without O).

  With `return_vn`, also returns V' in the compute dtype (the gradient kernel of version 3 reads it).
  """
  cdt = w.dtype
  Sc = S.astype(cdt)
  vnc = (u - dot(w, Sc)).astype(cdt)
  o = dot(qe, Sc) + dot(p, vnc) if need_o else None
  S1 = last(glc) * S + dot(kf, vnc, ta=True)
  return (o, S1, vnc) if return_vn else (o, S1)


def chunk_backward_state_pre(qe, kf, w, p, glc, do, dS1, return_dvn=False):
  """`chunk_backward_state` from the stored parts of `chunk_prep` (with `return_dvn`, also dV' in the compute dtype)."""
  cdt = qe.dtype
  dvn = (dot(p, do, ta=True) + dot(kf, dS1.astype(cdt))).astype(cdt)
  dS0 = last(glc) * dS1 + dot(qe, do, ta=True) - dot(w, dvn, ta=True)
  return (dS0, dvn) if return_dvn else dS0


def chunk_wu(k, v, gam, beta, m, seg, inverse=unit_lower_inverse):
  """W [C, K] and U [C, V] (float32) of one chunk; k, v in the compute dtype, the rest float32 [C, 1]."""
  cdt = k.dtype
  D, E, _, _ = gates(gam, m, seg)
  kk = dot(k, k, tb=True)
  L = jnp.where(strict_lower(k.shape[0]), beta * kk * D, 0.0)
  A = inverse(L).astype(cdt)
  u = dot(A, (beta * v).astype(cdt))
  w = dot(A, (beta * E * k).astype(cdt))
  return w, u


def chunk_forward(q, k, w, u, gam, m, seg, S):
  """One chunk of the state pass: returns (O [C, Vb] float32, S1 [K, Vb] float32) from S [K, Vb] float32.

  Works on any slice of the value columns (V' and O are column-separable given W and U).
  """
  cdt = q.dtype
  D, E, F, gl = gates(gam, m, seg)
  Sc = S.astype(cdt)
  vn = u - dot(w.astype(cdt), Sc)
  P = dot(q, k, tb=True) * D
  vnc = vn.astype(cdt)
  o = dot((q * E).astype(cdt), Sc) + dot(P.astype(cdt), vnc)
  S1 = gl * S + dot((k * F).astype(cdt), vnc, ta=True)
  return o, S1


def chunk_backward_state(q, k, w, do, gam, m, seg, dS1):
  """One chunk of the reverse pass: dS0 [K, Vb] from dS1 [K, Vb] (gradient w.r.t. the state after the chunk).

  dV' = (Q K^T * D)^T dO + (F K) dS1 does not depend on S0, so this pass needs no forward states.
  """
  cdt = q.dtype
  D, E, F, gl = gates(gam, m, seg)
  P = (dot(q, k, tb=True) * D).astype(cdt)
  dvn = dot(P, do, ta=True) + dot((k * F).astype(cdt), dS1.astype(cdt))
  return gl * dS1 + dot((q * E).astype(cdt), do, ta=True) - dot(w.astype(cdt), dvn.astype(cdt), ta=True)


def chunk_backward(q, k, gam, beta, m, seg, load, store_dv, nblk=1, inverse=unit_lower_inverse, A=None):
  """Gradients of one chunk given its entry state S0 and the gradient dS1 of its exit state.

  The value dimension is visited in `nblk` column blocks: `load(j)` returns (v_j [C, bv], S0_j [K, bv],
  dS1_j [K, bv], do_j [C, bv]) and `store_dv(j, dv_j)` writes dv's block; every sum over the value columns is
  accumulated across blocks, so a kernel never holds a whole [K, V] state (on GPU it would not fit in registers).
  Returns dq, dk [C, K] and dbeta, dg [C, 1] (float32); dg is w.r.t. the per-token log-decay g (the within-chunk
  cumulative sum gam = cumsum(g) is differentiated here, not by the caller). `A` (the stored (I + L)^-1 in the
  compute dtype, from `chunk_prep`) skips recomputing the inverse; only its compute-dtype value is used either way.
  """
  cdt = q.dtype
  C, K = q.shape
  c_ = lambda x: x.astype(cdt)
  D, E, F, gl = gates(gam, m, seg)
  strict = strict_lower(C)
  kk = dot(k, k, tb=True)
  if A is None:
    A = inverse(jnp.where(strict, beta * kk * D, 0.0))
  Ac = c_(A)
  W = dot(Ac, c_(beta * E * k))
  Wc = c_(W)
  qk = dot(q, k, tb=True)
  Pc = c_(qk * D)
  kF = c_(k * F)

  def block(j, acc):
    dW, doS, Z, dPr, dLu, dbu, dgl = acc
    v, S0, dS1, do = load(j)
    S0c, dS1c, do = c_(S0), c_(dS1), c_(do)
    U = dot(Ac, c_(beta * v))
    vn = U - dot(Wc, S0c)
    vnc = c_(vn)
    dvn = dot(Pc, do, ta=True) + dot(kF, dS1c)
    dxu = dot(Ac, c_(dvn), ta=True)
    store_dv(j, beta * dxu)
    return (dW - dot(c_(dvn), S0c, tb=True), doS + dot(do, S0c, tb=True), Z + dot(vnc, dS1c, tb=True),
            dPr + dot(do, vnc, tb=True), dLu + dot(c_(dxu), c_(U), tb=True),
            dbu + jnp.sum(dxu * v, axis=1, keepdims=True),
            dgl + jnp.sum(jnp.sum(S0 * dS1, axis=1, keepdims=True), axis=0, keepdims=True))

  z = lambda *s: jnp.zeros(s, f32)
  acc = (z(C, K), z(C, K), z(C, K), z(C, C), z(C, C), z(C, 1), z(1, 1))
  acc = block(0, acc) if nblk == 1 else lax.fori_loop(0, nblk, block, acc)
  dW, doS, Z, dPr, dLu, dbu, dgl = acc
  dxw = dot(Ac, c_(dW), ta=True)
  dL = jnp.where(strict, -(dLu + dot(c_(dxw), Wc, tb=True)), 0.0)
  dbeta = dbu + jnp.sum(dxw * E * k, axis=1, keepdims=True) + jnp.sum(dL * kk * D, axis=1, keepdims=True)
  dk = beta * E * dxw
  dE = beta * jnp.sum(dxw * k, axis=1, keepdims=True)
  # O = (E Q) S0 + (Q K^T * D) V'
  dP = c_(dPr * D)
  dq = dot(dP, k) + E * doS
  dk = dk + dot(dP, q, ta=True)
  dD = dPr * qk
  dE = dE + jnp.sum(q * doS, axis=1, keepdims=True)
  # L = beta (K K^T) * D
  G = c_(dL * beta * D)
  dk = dk + dot(G, k) + dot(G, k, ta=True)
  dD = dD + dL * beta * kk
  # S1 = gl S0 + (F K)^T V'
  dk = dk + F * Z
  dF = jnp.sum(k * Z, axis=1, keepdims=True)
  # back to g through D, E, F, gl and gam = within-chunk cumsum(g)
  return dq, dk, dbeta, _dg_from_parts(dD, D, dE, E, dF, F, dgl, gl)


def _dg_cross(DD, split=None):
  """sum_{i >= t, j < t} DD_ij as a [C, 1] column (the part of dg_t that flows through D, DD = dD * D).

  The prefix sums over j are a product with a 0/1 matrix: a float32 product, or with `split` (a 16-bit float dtype)
  three products of the 16-bit parts of DD = hi + mid + lo (0/1 is exact in 16 bits, so the float32 accumulation
  sees DD to ~24 bits) on the matrix units instead of a float32 product (which on GPU runs on the FMA units and
  needs many registers).
  """
  C = DD.shape[0]
  r, c = _iota2(C, C)
  upper = (r < c).astype(f32)
  if split is None:
    pre = dot(DD, upper)  # pre[i, t] = sum_{j < t} DD_ij
  else:
    upper = upper.astype(split)
    hi = DD.astype(split)
    rest = DD - hi.astype(f32)
    mid = rest.astype(split)
    lo = (rest - mid.astype(f32)).astype(split)
    pre = dot(lo, upper) + dot(mid, upper) + dot(hi, upper)
  return row_to_col(jnp.sum(jnp.where(r >= c, pre, 0.0), axis=0, keepdims=True))


def _dg_columns(dE, E, dF, F):
  """The parts of dg_t that flow through E and F: sum_{s >= t} dE_s E_s + sum_{s < t} dF_s F_s."""
  C = E.shape[0]
  r, c = _iota2(C, C)
  after = jnp.sum(jnp.where(c >= r, col_to_row(dE * E), 0.0), axis=1, keepdims=True)
  before = jnp.sum(jnp.where(c < r, col_to_row(dF * F), 0.0), axis=1, keepdims=True)
  return after + before


def _dg_from_parts(dD, D, dE, E, dF, F, dgl, gl):
  """dg w.r.t. the per-token g of one chunk from the gradients w.r.t. D, E, F and gl (formed directly, see below)."""
  # dg_t = sum_{s >= t} dgam_s, formed directly. (Taking the reverse cumulative sum of dgam = rowsum(DD) - colsum(DD)
  # + ... subtracts large partial sums and lost up to ~1e-4 relative accuracy of dg with strongly negative g.)
  return _dg_cross(dD * D) + _dg_columns(dE, E, dF, F) + dgl * gl


def chunk_backward_split(a, gam, beta, m, seg, load, load_state, load_qk, store_dv, store_dqk, nk, nv, bk,
                         loop=False):
  """Gradients of one chunk from V' and dV' (stored by the serial passes) instead of recomputing them.

  Uses dL = -strict(dxu V'^T) (since dxu U^T + dxw W^T = dxu (U - W S0)^T) and dxw = -dxu S0^T, so neither W, U
  nor P is needed. Passes over the value dimension in `nv` column blocks (a `fori_loop` with `loop`, else
  unrolled), each carrying at most three float32 tiles: one for dv and the [C, C] sums dO V'^T, dxu V'^T, then one
  per key block (`nk` column blocks) for dxu S0^T, dO S0^T, V' dS1^T [C, bk]. dxu = A^T dV' is recomputed per pass.
    load(name, j): block j [C, bv] of "dvn", "vn", "do" (compute dtype) or "v" (j may be traced with `loop`);
    load_state(name, kb, j): block [bk, bv] of "h" (S0) or "dh" (dS1), compute dtype;
    load_qk(kb): (q, k) column blocks [C, bk] in the compute dtype (normalised and scaled as in the forward);
    store_dv(j, dv_j); store_dqk(kb, dq_kb, dk_kb) (float32, gradients w.r.t. the normalised scaled q and k).
  `a` is the stored (I + L)^-1 [C, C] (compute dtype); gam, beta, m, seg are [C, 1] float32.
  Returns dbeta, dg [C, 1] (float32, dg w.r.t. the per-token g).
  """
  cdt = a.dtype
  C = a.shape[0]
  c_ = lambda x: x.astype(cdt)
  rsum = lambda x: jnp.sum(x, axis=1, keepdims=True)
  add = lambda acc, t: tuple(x + y for x, y in zip(acc, t))
  zeros = lambda *shapes: tuple(jnp.zeros(s_, f32) for s_ in shapes)

  def over_values(block, acc):
    if loop and nv > 1:
      return lax.fori_loop(0, nv, block, acc)
    for j in range(nv):
      acc = block(j, acc)
    return acc

  def cc_block(j, acc):  # dv and the sums over the value columns that are [C, C]
    dvn, vn, do = load("dvn", j), load("vn", j), load("do", j)
    dxu = dot(a, dvn, ta=True)  # A^T dV': the gradient w.r.t. beta V - beta E K S0 (before A)
    store_dv(j, beta * dxu)
    return add(acc, (rsum(dxu * load("v", j).astype(f32)), dot(do, vn, tb=True), dot(c_(dxu), vn, tb=True)))

  dbu, dPr, dLn = over_values(cc_block, zeros((C, 1), (C, C), (C, C)))
  D, E, F, gl = gates(gam, m, seg)
  qk = kk = None
  for kb in range(nk):
    q, k = load_qk(kb)
    qk = dot(q, k, tb=True) if qk is None else qk + dot(q, k, tb=True)
    kk = dot(k, k, tb=True) if kk is None else kk + dot(k, k, tb=True)
  dL = jnp.where(strict_lower(C), -dLn, 0.0)
  dP = c_(dPr * D)
  G = c_(dL * beta * D)
  dbeta = dbu + rsum(dL * kk * D)
  # O = (E Q) S0 + (Q K^T * D) V';  L = beta (K K^T) * D  (dD -> dg now, so D, qk, kk die here)
  dg = _dg_cross((dPr * qk + dL * beta * kk) * D, split=None if cdt == f32 else jnp.bfloat16)
  dE = dF = jnp.zeros((C, 1), f32)
  dgl = jnp.zeros((1, 1), f32)
  for kb in range(nk):
    def x_block(j, acc, kb=kb):  # the sums over the value columns that are [C, bk]
      dvn, vn, do = load("dvn", j), load("vn", j), load("do", j)
      S0, dS1 = load_state("h", kb, j), load_state("dh", kb, j)
      dxuc = c_(dot(a, dvn, ta=True))
      return add(acc, (dot(dxuc, S0, tb=True), dot(do, S0, tb=True), dot(vn, dS1, tb=True),
                       jnp.sum(rsum(S0.astype(f32) * dS1.astype(f32)), axis=0, keepdims=True)))

    X1, X2, X3, dgl_ = over_values(x_block, zeros((C, bk), (C, bk), (C, bk), (1, 1)))
    # X1 = dxu S0^T = -dxw, X2 = dO S0^T, X3 = V' dS1^T (this key block), dgl_ = sum S0 dS1
    dgl = dgl + dgl_
    q, k = load_qk(kb)
    # ... S1 = gl S0 + (F K)^T V';  W = A (beta E K), dxw = -dxu S0^T
    dq = dot(dP, k) + E * X2
    dk = dot(dP, q, ta=True) + dot(G, k) + dot(G, k, ta=True) + F * X3 - beta * E * X1
    store_dqk(kb, dq, dk)
    kX1 = rsum(k * X1)
    dbeta = dbeta - E * kX1
    dE = dE + rsum(q * X2) - beta * kX1
    dF = dF + rsum(k * X3)
  return dbeta, dg + _dg_columns(dE, E, dF, F) + dgl * gl
