"""Token log-probs, entropies and KL from hidden states, in blocks (no [B,L,V] float32 logits).

log p(y_t) = z_t[y_t] - logsumexp_v z_t[v],  z_t = (h_t . W) / temperature, in float32.

The sequence is cut into chunks of `chunk_size` positions and the vocabulary into chunks of
`vocab_chunk_size` columns; only one [B, chunk, vocab_chunk] float32 block of logits is live
at a time, in the forward and in the backward pass. Over the vocabulary chunks the
log-normaliser is accumulated online (running max m, running sum s = sum_v exp(z_v - m), and
for the entropy u = sum_v exp(z_v - m) (z_v - m), all rescaled when m grows):

  lse = m + log s,   H = -sum_v p_v log p_v = log s - u / s.

Gradients come from a `jax.custom_vjp` whose backward pass recomputes each block of logits
from (h, W) and the saved per-token lse (and H):

  d lp / dz_v = 1[v = y] - p_v,     d H / dz_v = -p_v (log p_v + H),

and accumulates dh = dz W^T (per sequence chunk) and dW = h^T dz (per vocabulary chunk) in
float32 (cast back to the input dtypes at the end). Zero cotangents are skipped: no entropy
term when the entropy is not differentiated, no dW for a frozen head, no dh for frozen h.

A vocabulary that the chunk does not divide is handled without padding (copying) W: the last
chunk is the *last* `vocab_chunk_size` columns, and its columns already covered by the
previous chunk are masked to -inf (they carry zero probability mass and zero gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

f32 = jnp.float32

DEFAULT_VOCAB_CHUNK = 8192
"""Default `vocab_chunk_size`: vocabularies up to this size are processed in one block."""


# ----------------------------------------------------------------------------- helpers
def _is_zero(ct) -> bool:
  return ct is None or type(ct) is SymbolicZero


def _vocab_geometry(v: int, vocab_chunk_size: int | None) -> tuple[int, int]:
  """(columns per chunk, number of chunks)."""
  if vocab_chunk_size is None or vocab_chunk_size >= v:
    return v, 1
  if vocab_chunk_size <= 0:
    raise ValueError(f"vocab_chunk_size must be positive or None, got {vocab_chunk_size}")
  return vocab_chunk_size, -(-v // vocab_chunk_size)


def _loop(body, carry, xs, n: int):
  """lax.scan(body, carry, xs) of length n; a plain call when n == 1 (cheaper to compile)."""
  if n == 1:
    carry, y = body(carry, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda x: x[None], y)
  return jax.lax.scan(body, carry, xs)


class _VBlock:
  """Vocabulary chunk i of W [D,V]: the columns [start, start + vc) with start clamped so the
  chunk stays inside W; `valid` marks the columns not already covered by chunk i - 1."""

  def __init__(self, w_DxV, i, vc: int, nv: int):
    v = w_DxV.shape[1]
    if nv == 1:
      self.start, self.w, self.valid = 0, w_DxV, None
      self.cols = jnp.arange(v, dtype=jnp.int32)
      return
    self.start = jnp.minimum(i * vc, v - vc)
    self.w = jax.lax.dynamic_slice_in_dim(w_DxV, self.start, vc, axis=1)
    self.cols = self.start + jnp.arange(vc, dtype=jnp.int32)
    self.valid = None if v % vc == 0 else self.cols >= i * vc

  def logits(self, h_BxCxD, inv_temp):
    """(raw logits a, masked scaled logits z = a * inv_temp with -inf at invalid columns)."""
    a = jnp.einsum("bcd,dv->bcv", h_BxCxD, self.w, preferred_element_type=f32)
    z = a * inv_temp
    if self.valid is not None:
      z = jnp.where(self.valid, z, -jnp.inf)
    return a, z

  def finite(self, x):
    """x with invalid columns set to 0 (for products with quantities that are -inf there)."""
    return x if self.valid is None else jnp.where(self.valid, x, 0.0)

  def hit(self, targets_BxC):
    """One-hot [B,C,vc] of the targets that fall in this chunk (never at invalid columns)."""
    hit = self.cols == targets_BxC[..., None]
    return hit if self.valid is None else hit & self.valid


def _online_update(m, s, z):
  """Fold a block of logits z [B,C,vc] into the running max m and sum s (both [B,C]).

  Returns (m_new, s_new, scale, e): scale = exp(m - m_new) rescales any other running sum
  of exp(z_v - m) x_v, and e = exp(z - m_new) is the block's contribution to it.
  """
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  scale = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
  e = jnp.exp(z - m_new[..., None])
  s_new = s * scale + jnp.sum(e, axis=-1)
  return m_new, s_new, scale, e


def _split_seq(x, chunk: int, n: int, pad: int):
  """[B,L,...] -> [n,B,chunk,...] (padding L with zeros)."""
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  b = x.shape[0]
  return x.reshape((b, n, chunk) + x.shape[2:]).swapaxes(0, 1)


def _merge_seq(y, l: int):
  """[n,B,chunk,...] -> [B,L,...]."""
  y = y.swapaxes(0, 1)
  return y.reshape((y.shape[0], y.shape[1] * y.shape[2]) + y.shape[3:])[:, :l]


def _seq_geometry(l: int, chunk_size: int):
  chunk = max(1, min(chunk_size, l))
  pad = (-l) % chunk
  return chunk, (l + pad) // chunk, pad


def _add_dw(dw, start, dw_i, nv: int):
  if nv == 1:
    return dw + dw_i
  cur = jax.lax.dynamic_slice_in_dim(dw, start, dw_i.shape[1], axis=1)
  return jax.lax.dynamic_update_slice_in_dim(dw, cur + dw_i, start, axis=1)


# ------------------------------------------------------------------- token log-probs
def _lp_forward(vc, nv, with_entropy, hs, w, ts, inv_temp):
  """Per sequence chunk: (lp, lse, entropy or None), each [n,B,C]."""

  def seq_body(_, x):
    h_c, t_c = x
    shape = t_c.shape
    m0 = jnp.full(shape, -jnp.inf, f32)
    zero = jnp.zeros(shape, f32)

    def vocab_body(carry, i):
      m, s, u, picked = carry
      blk = _VBlock(w, i, vc, nv)
      _, z = blk.logits(h_c, inv_temp)
      m_new, s_new, scale, e = _online_update(m, s, z)
      picked = picked + jnp.sum(jnp.where(blk.hit(t_c), z, 0.0), axis=-1)
      if with_entropy:
        # u = sum_v exp(z_v - m) (z_v - m): rescale to the new max, then add this block.
        shift = jnp.where(s > 0, (m - m_new) * s, 0.0)
        u = scale * (u + shift) + jnp.sum(e * blk.finite(z - m_new[..., None]), axis=-1)
      return (m_new, s_new, u, picked), None

    (m, s, u, picked), _ = _loop(vocab_body, (m0, zero, zero, zero),
                                 jnp.arange(nv, dtype=jnp.int32), nv)
    log_s = jnp.log(s)
    lse = m + log_s
    ent = log_s - u / s if with_entropy else None
    return None, (picked - lse, lse, ent)

  _, out = _loop(seq_body, None, (hs, ts), hs.shape[0])
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lp_core(vc, nv, with_entropy, hs, w, ts, inv_temp):
  lp, _, ent = _lp_forward(vc, nv, with_entropy, hs, w, ts, inv_temp)
  return (lp, ent) if with_entropy else lp


def _lp_fwd(vc, nv, with_entropy, hs, w, ts, inv_temp):
  lp, lse, ent = _lp_forward(vc, nv, with_entropy, hs.value, w.value, ts.value, inv_temp.value)
  out = (lp, ent) if with_entropy else lp
  # None marks an input that needs no gradient (the pytree structure is static).
  flags = (hs.perturbed, w.perturbed, inv_temp.perturbed)
  res = (hs.value, w.value, ts.value, inv_temp.value, lse, ent,
         tuple(jnp.zeros((), jnp.bool_) if f else None for f in flags))
  return out, res


def _lp_bwd(vc, nv, with_entropy, res, g):
  hs, w, ts, inv_temp, lse, ent, flags = res
  need_h, need_w, need_t = (f is not None for f in flags)
  g_lp, g_ent = g if with_entropy else (g, None)
  use_lp, use_ent = not _is_zero(g_lp), with_entropy and not _is_zero(g_ent)
  if not (use_lp or use_ent):
    return None, None, None, None
  d, v = w.shape

  def seq_body(carry, x):
    dw, dt = carry
    h_c, t_c, lse_c, ent_c, glp_c, gent_c = x

    def vocab_body(carry, i):
      dh_c, dw, dt = carry
      blk = _VBlock(w, i, vc, nv)
      a, z = blk.logits(h_c, inv_temp)
      logp = z - lse_c[..., None]  # -inf at invalid columns
      p = jnp.exp(logp)
      dz = 0.0
      if use_lp:
        dz = glp_c[..., None] * (blk.hit(t_c).astype(f32) - p)
      if use_ent:
        dz = dz - gent_c[..., None] * p * blk.finite(logp + ent_c[..., None])
      dh_c, dw, dt = _side_grads(dz, a, blk, h_c, dh_c, dw, dt, inv_temp, need_h, need_w,
                                 need_t, nv)
      return (dh_c, dw, dt), None

    dh0 = jnp.zeros(h_c.shape, f32) if need_h else None
    (dh_c, dw, dt), _ = _loop(vocab_body, (dh0, dw, dt), jnp.arange(nv, dtype=jnp.int32), nv)
    return (dw, dt), dh_c

  n = hs.shape[0]
  zeros = jnp.zeros(lse.shape, f32)
  xs = (hs, ts, lse, ent if use_ent else zeros, g_lp if use_lp else zeros,
        g_ent if use_ent else zeros)
  dw0 = jnp.zeros((d, v), f32) if need_w else None
  (dw, dt), dh = _loop(seq_body, (dw0, jnp.zeros((), f32)), xs, n)
  dh = dh.astype(hs.dtype) if need_h else None
  dw = dw.astype(w.dtype) if need_w else None
  dt = dt.astype(inv_temp.dtype) if need_t else None
  return dh, dw, None, dt


_lp_core.defvjp(_lp_fwd, _lp_bwd, symbolic_zeros=True)


def token_logprobs(h_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array, *,
                   chunk_size: int = 1024, temperature: float | jax.Array = 1.0,
                   with_entropy: bool = False,
                   vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK):
  """log p(targets) [B,L] float32 (and the entropy [B,L] float32 if `with_entropy`).

  Logits are (h . W) / temperature, never materialised beyond one
  [B, chunk_size, vocab_chunk_size] float32 block (forward and backward). `vocab_chunk_size`
  None (or >= V) processes the whole vocabulary per sequence chunk. Differentiable w.r.t.
  h, W and temperature (also through the entropy). Targets outside [0, V) pick no logit
  (log-prob -logsumexp): mask such positions.
  """
  b, l, _ = h_BxLxD.shape
  v = w_DxV.shape[1]
  if targets_BxL.shape != (b, l):
    raise ValueError(f"targets {targets_BxL.shape} do not match hidden states {(b, l)}")
  chunk, n, pad = _seq_geometry(l, chunk_size)
  vc, nv = _vocab_geometry(v, vocab_chunk_size)
  hs = _split_seq(h_BxLxD, chunk, n, pad)
  ts = _split_seq(targets_BxL.astype(jnp.int32), chunk, n, pad)
  inv_temp = 1.0 / jnp.asarray(temperature, f32)
  out = _lp_core(vc, nv, with_entropy, hs, w_DxV, ts, inv_temp)
  if with_entropy:
    return _merge_seq(out[0], l), _merge_seq(out[1], l)
  return _merge_seq(out, l)


# --------------------------------------------------------------------------- token KL
def _kl_forward(vc, nv, hps, wp, hqs, wq, inv_temp):
  """Per sequence chunk: (kl, lse_p, lse_q), each [n,B,C]."""

  def seq_body(_, x):
    hp_c, hq_c = x
    shape = hp_c.shape[:2]
    m0 = jnp.full(shape, -jnp.inf, f32)
    zero = jnp.zeros(shape, f32)

    def vocab_body(carry, i):
      mp, sp, mq, sq, r = carry
      bp, bq = _VBlock(wp, i, vc, nv), _VBlock(wq, i, vc, nv)
      _, zp = bp.logits(hp_c, inv_temp)
      _, zq = bq.logits(hq_c, inv_temp)
      mp, sp, _, _ = _online_update(mp, sp, zp)
      mq, sq, scale_q, eq = _online_update(mq, sq, zq)
      # r = sum_v exp(zq_v - mq) (zq_v - zp_v)
      r = r * scale_q + jnp.sum(eq * bq.finite(zq - zp), axis=-1)
      return (mp, sp, mq, sq, r), None

    (mp, sp, mq, sq, r), _ = _loop(vocab_body, (m0, zero, m0, zero, zero),
                                   jnp.arange(nv, dtype=jnp.int32), nv)
    lse_p, lse_q = mp + jnp.log(sp), mq + jnp.log(sq)
    # KL(q||p) = E_q[zq - zp] - lse_q + lse_p  (>= 0; clip rounding below 0)
    kl = jnp.maximum(r / sq - lse_q + lse_p, 0.0)
    return None, (kl, lse_p, lse_q)

  _, out = _loop(seq_body, None, (hps, hqs), hps.shape[0])
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kl_core(vc, nv, hps, wp, hqs, wq, inv_temp):
  return _kl_forward(vc, nv, hps, wp, hqs, wq, inv_temp)[0]


def _kl_fwd(vc, nv, hps, wp, hqs, wq, inv_temp):
  args = (hps, wp, hqs, wq, inv_temp)
  kl, lse_p, lse_q = _kl_forward(vc, nv, *(a.value for a in args))
  flags = tuple(jnp.zeros((), jnp.bool_) if a.perturbed else None for a in args)
  return kl, (tuple(a.value for a in args), kl, lse_p, lse_q, flags)


def _side_grads(dz, a, block, h_c, dh, dw, dt, inv_temp, need_h, need_w, need_t, nv):
  """Adds one side's logit cotangent dz [B,C,Vc] to dh, dW and the temperature gradient."""
  f32 = jnp.float32
  if need_t:
    dt = dt + jnp.sum(dz * a)
  da = dz * inv_temp
  if need_h:
    dh = dh + jnp.einsum("bcv,dv->bcd", da, block.w, preferred_element_type=f32)
  if need_w:
    dw = _add_dw(dw, block.start, jnp.einsum("bcd,bcv->dv", h_c, da,
                                             preferred_element_type=f32), nv)
  return dh, dw, dt


def _kl_bwd(vc, nv, res, g):
  (hps, wp, hqs, wq, inv_temp), kl, lse_p, lse_q, flags = res
  need_hp, need_wp, need_hq, need_wq, need_t = (f is not None for f in flags)
  if _is_zero(g):
    return None, None, None, None, None
  need_q = need_hq or need_wq
  d, v = wp.shape

  def seq_body(carry, x):
    dwp, dwq, dt = carry
    hp_c, hq_c, kl_c, lsep_c, lseq_c, g_c = x

    def vocab_body(carry, i):
      dhp, dhq, dwp, dwq, dt = carry
      bp, bq = _VBlock(wp, i, vc, nv), _VBlock(wq, i, vc, nv)
      ap, zp = bp.logits(hp_c, inv_temp)
      aq, zq = bq.logits(hq_c, inv_temp)
      logp, logq = zp - lsep_c[..., None], zq - lseq_c[..., None]
      p, q = jnp.exp(logp), jnp.exp(logq)
      dzp = g_c[..., None] * (p - q)  # d KL / d zp = p - q
      dhp, dwp, dt = _side_grads(dzp, ap, bp, hp_c, dhp, dwp, dt, inv_temp, need_hp, need_wp,
                                 need_t, nv)
      if need_q or need_t:
        # d KL / d zq = q (log q - log p - KL)
        dzq = g_c[..., None] * q * bq.finite(logq - logp - kl_c[..., None])
        dhq, dwq, dt = _side_grads(dzq, aq, bq, hq_c, dhq, dwq, dt, inv_temp, need_hq, need_wq,
                                   need_t, nv)
      return (dhp, dhq, dwp, dwq, dt), None

    dhp0 = jnp.zeros(hp_c.shape, f32) if need_hp else None
    dhq0 = jnp.zeros(hq_c.shape, f32) if need_hq else None
    (dhp, dhq, dwp, dwq, dt), _ = _loop(vocab_body, (dhp0, dhq0, dwp, dwq, dt),
                                        jnp.arange(nv, dtype=jnp.int32), nv)
    return (dwp, dwq, dt), (dhp, dhq)

  xs = (hps, hqs, kl, lse_p, lse_q, g)
  init = (jnp.zeros((d, v), f32) if need_wp else None,
          jnp.zeros((d, v), f32) if need_wq else None, jnp.zeros((), f32))
  (dwp, dwq, dt), (dhp, dhq) = _loop(seq_body, init, xs, hps.shape[0])
  cast = lambda x, ref, need: x.astype(ref.dtype) if need else None  # noqa: E731
  return (cast(dhp, hps, need_hp), cast(dwp, wp, need_wp), cast(dhq, hqs, need_hq),
          cast(dwq, wq, need_wq), cast(dt, inv_temp, need_t))


_kl_core.defvjp(_kl_fwd, _kl_bwd, symbolic_zeros=True)


def token_kl(h_p_BxLxD: jax.Array, w_p_DxV: jax.Array, h_q_BxLxD: jax.Array,
             w_q_DxV: jax.Array, *, chunk_size: int = 1024,
             vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK,
             temperature: float | jax.Array = 1.0) -> jax.Array:
  """Per-token KL(q || p) = sum_v q_v (log q_v - log p_v) [B,L] float32 over the full vocabulary.

  p = softmax(h_p W_p / T), q = softmax(h_q W_q / T) (e.g. p the policy, q the reference,
  or the other way round), computed blockwise with two online log-sum-exps:
    KL = (sum_v e^{zq_v - mq} (zq_v - zp_v)) / sq - lse_q + lse_p.
  Differentiable w.r.t. both sides; a side under `jax.lax.stop_gradient` (the usual fixed
  reference) costs nothing in the backward pass.
  """
  b, l, _ = h_p_BxLxD.shape
  if h_q_BxLxD.shape[:2] != (b, l) or w_p_DxV.shape[1] != w_q_DxV.shape[1]:
    raise ValueError(f"p/q shapes differ: {h_p_BxLxD.shape} {w_p_DxV.shape} vs "
                     f"{h_q_BxLxD.shape} {w_q_DxV.shape}")
  chunk, n, pad = _seq_geometry(l, chunk_size)
  vc, nv = _vocab_geometry(w_p_DxV.shape[1], vocab_chunk_size)
  hps = _split_seq(h_p_BxLxD, chunk, n, pad)
  hqs = _split_seq(h_q_BxLxD, chunk, n, pad)
  inv_temp = 1.0 / jnp.asarray(temperature, f32)
  return _merge_seq(_kl_core(vc, nv, hps, w_p_DxV, hqs, w_q_DxV, inv_temp), l)


# ------------------------------------------------------------------ sequence reductions
def sequence_logprobs(token_lp_BxL: jax.Array, mask_BxL: jax.Array) -> dict[str, jax.Array]:
  """Per-sequence log-probs from token log-probs: {"sum", "mean", "count"}, each [B] float32.

  sum = sum_t mask_t lp_t;  count = sum_t mask_t;  mean = sum / max(count, 1) (the
  length-normalised log-prob, e.g. for SimPO / IPO-style losses and evaluation). Positions
  with mask 0 contribute exactly 0 even if their log-prob is -inf/NaN.
  """
  mask = mask_BxL.astype(f32)
  lp = jnp.where(mask != 0, token_lp_BxL.astype(f32) * mask, 0.0)
  total = jnp.sum(lp, axis=-1)
  count = jnp.sum(mask, axis=-1)
  return {"sum": total, "mean": total / jnp.maximum(count, 1.0), "count": count}


def masked_entropy_mean(entropy_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Token-level mean entropy over the masked positions (scalar float32; 0 if none)."""
  mask = mask_BxL.astype(f32)
  total = jnp.sum(jnp.where(mask != 0, entropy_BxL.astype(f32) * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def shift_targets(tokens_BxL: jax.Array, loss_mask_BxL: jax.Array):
  """Next-token targets: position t predicts tokens[t+1]; the mask moves with the target.

  Returns targets [B,L] (last position gets token 0) and mask [B,L] float32 where
  mask[t] = loss_mask[t+1] (0 at the last position).
  """
  targets = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
  mask = jnp.concatenate(
      [loss_mask_BxL[:, 1:], jnp.zeros_like(loss_mask_BxL[:, :1])], axis=1).astype(jnp.float32)
  return targets, mask
