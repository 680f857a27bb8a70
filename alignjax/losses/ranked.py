"""Listwise policy losses over K completions per prompt (METHODS.md section 2: `adpo`,
`rank_dpo`).

Same contract as `losses/reward.py` (see `docs/losses.md`): pure and jittable, data arrays
positional, hyper-parameters keyword-only, `mask [B]`, returns float32
`(loss_sum, denom, metrics)` with the batch loss `loss_sum / max(denom, eps)`. Inputs are
[B,K] with `valid [B,K]` (bool) marking real candidates; invalid candidates and masked rows
may hold anything (inf, NaN): they are replaced before any arithmetic.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import mask_rows as _mask, wsum as _wsum
from alignjax.losses.registry import register

_f32 = jnp.float32
_sg = jax.lax.stop_gradient
sp = jax.nn.softplus
TARGET_MODES = ("onehot", "softmax", "smooth")


def _lists(arrays, valid, mask):
  """float32 [B,K] arrays zeroed outside live candidates; live [B,K] bool; row mask [B]."""
  chex.assert_rank(arrays[0], 2)
  chex.assert_equal_shape([*arrays, valid])
  mask_B = _mask(mask, arrays[0].shape[0])
  live_BxK = jnp.asarray(valid, bool) & (mask_B != 0)[:, None]
  return [jnp.where(live_BxK, jnp.asarray(x, _f32), 0.0) for x in arrays], live_BxK, mask_B


# ---------------------------------------------------------------------------- adpo


def adpo_target(scores, valid, *, mode="onehot", tau_q=1.0, eps=0.1):
  """Target distribution q [B,K] for `adpo`, from candidate scores (no gradient).

  onehot:  1 on the best valid candidate (ties share the mass equally);
  softmax: softmax(scores / tau_q) over valid candidates;
  smooth:  1 - eps on the best (shared by ties), eps spread equally over the other valid
           candidates (K = 2: (1 - eps, eps)); a list with no other candidate gets onehot.
  Invalid candidates get 0; a row with no valid candidate is all 0. (`proposed`.)
  *ADPO: Anchored Direct Preference Optimization*; method id `adpo`.
  Shapes: scores, valid [B,K] -> q [B,K] float32.
  """
  if mode not in TARGET_MODES:
    raise ValueError(f"adpo_target: mode must be one of {TARGET_MODES}, got {mode!r}.")
  chex.assert_rank(scores, 2)
  chex.assert_equal_shape([scores, valid])
  v_BxK = jnp.asarray(valid, bool)
  has_Bx1 = jnp.any(v_BxK, axis=1, keepdims=True)
  s_BxK = jnp.where(v_BxK, jnp.asarray(scores, _f32), -jnp.inf)
  if mode == "softmax":
    q_BxK = jax.nn.softmax(jnp.where(has_Bx1, s_BxK / tau_q, 0.0), axis=1)
  else:
    best_BxK = v_BxK & (s_BxK == jnp.max(s_BxK, axis=1, keepdims=True))
    q_BxK = best_BxK / jnp.maximum(jnp.sum(best_BxK, axis=1, keepdims=True), 1)
    if mode == "smooth":
      other_BxK = v_BxK & ~best_BxK
      n_Bx1 = jnp.sum(other_BxK, axis=1, keepdims=True)
      q_BxK = jnp.where(n_Bx1 > 0, (1 - eps) * q_BxK + eps * other_BxK / jnp.maximum(n_Bx1, 1),
                        q_BxK)
  return _sg(jnp.where(v_BxK & has_Bx1, q_BxK, 0.0).astype(_f32))


@register("adpo", "policy_list")
def adpo(l, l_ref, q, valid, *, tau_anc=10.0, mask=None):
  """Anchored DPO: KL from a target distribution q to the anchored policy over K candidates.

  logp = log_softmax((l - l_ref) / tau_anc) over valid candidates (invalid ones: -inf);
  per list  L = sum_k (xlogy(q_k, q_k) - q_k logp_k) = KL(q || p).
  The entropy term is constant, so the gradient equals that of the cross-entropy. q should
  sum to 1 over valid candidates (`adpo_target` builds it); q at invalid candidates is
  taken as 0 (not renormalised). With K = 2, one-hot q and tau_anc = 1/beta this is
  `dpo_sigmoid`; with q = (1 - e, e) the cross-entropy is cDPO. The anchor `l_ref` may be
  a frozen reference or an EMA / lagged policy. Default tau_anc = 10 (`proposed`).
  *ADPO: Anchored Direct Preference Optimization*; method id `adpo`.
  Shapes: l, l_ref (summed completion log-probs), q, valid [B,K]; mask [B].
  Denominator: lists with >= 2 valid candidates (others have loss 0).
  Metrics: `cross_entropy` (sum of -sum_k q logp), `top1_accuracy` (argmax q scores
  strictly above every other valid candidate; ties count 0), `num_lists`.
  """
  (l_BxK, lr_BxK, q_BxK), live_BxK, mask_B = _lists((l, l_ref, q), valid, mask)
  n_B = jnp.sum(live_BxK, axis=1)
  x_BxK = jnp.where(live_BxK, (l_BxK - lr_BxK) / tau_anc, -jnp.inf)
  # A row without live candidates would be all -inf (NaN log_softmax): use zeros there.
  x_BxK = jnp.where((n_B > 0)[:, None], x_BxK, 0.0)
  logp_BxK = jax.nn.log_softmax(x_BxK, axis=1)
  ce_B = -jnp.sum(jnp.where(live_BxK, q_BxK * logp_BxK, 0.0), axis=1)
  negent_B = jnp.sum(jax.scipy.special.xlogy(q_BxK, q_BxK), axis=1)
  lists_B = mask_B * (n_B >= 2)
  top_B = jnp.argmax(jnp.where(live_BxK, q_BxK, -jnp.inf), axis=1)
  x_top_B = jnp.take_along_axis(x_BxK, top_B[:, None], axis=1)[:, 0]
  others_BxK = live_BxK & (jnp.arange(x_BxK.shape[1]) != top_B[:, None])
  top1_B = jnp.all(jnp.where(others_BxK, x_top_B[:, None] > x_BxK, True), axis=1)
  metrics = {"cross_entropy": _wsum(lists_B, ce_B),
             "top1_accuracy": _wsum(lists_B, top1_B.astype(_f32)),
             "num_lists": jnp.sum(lists_B)}
  return _wsum(lists_B, negent_B + ce_B), jnp.sum(lists_B), _sg(metrics)


# ---------------------------------------------------------------------------- rank_dpo


def rank_dpo_weights(z, g, valid):
  """Delta-DCG pair weights W [B,K,K] (no gradient) for `rank_dpo`; W[b,i,j] > 0 iff
  candidates i and j are valid with g_i > g_j.

  tau = 1-based rank of z (descending) among valid candidates; ties in z rank the lower
  gain first (pessimistic), then the lower index. Dc = log2(1 + tau), G = 2^g - 1,
  W_ij = |G_i - G_j| |1/Dc_i - 1/Dc_j|. Shapes: z, g [B,K] float32, valid [B,K] bool.
  """
  z_BxK, g_BxK = _sg(jnp.asarray(z, _f32)), _sg(jnp.asarray(g, _f32))
  valid = jnp.asarray(valid, bool)
  zi, zj = z_BxK[:, :, None], z_BxK[:, None, :]
  gi, gj = g_BxK[:, :, None], g_BxK[:, None, :]
  k = z_BxK.shape[1]
  idx_i, idx_j = jnp.arange(k)[:, None], jnp.arange(k)[None, :]
  # ahead[b,i,j]: valid candidate j is ranked ahead of i.
  ahead_BxKxK = valid[:, None, :] & (
      (zj > zi) | ((zj == zi) & ((gj < gi) | ((gj == gi) & (idx_j < idx_i)))))
  tau_BxK = 1.0 + jnp.sum(ahead_BxKxK, axis=2).astype(_f32)
  inv_dc_BxK = 1.0 / jnp.log2(1.0 + tau_BxK)
  gain_BxK = jnp.exp2(g_BxK) - 1.0
  pair_BxKxK = valid[:, :, None] & valid[:, None, :] & (gi > gj)
  w_BxKxK = (jnp.abs(gain_BxK[:, :, None] - gain_BxK[:, None, :])
             * jnp.abs(inv_dc_BxK[:, :, None] - inv_dc_BxK[:, None, :]))
  return _sg(jnp.where(pair_BxKxK, w_BxKxK, 0.0))


@register("rank_dpo", "policy_list")
def rank_dpo(l, l_ref, g, valid, *, beta=0.1, mask=None):
  """RankDPO: DPO over all ordered pairs of a ranked list, weighted by delta-DCG.

  z = beta (l - l_ref) [B,K]; for valid pairs with g_i > g_j,
    W_ij = |G_i - G_j| |1/Dc_i - 1/Dc_j|,  G = 2^g - 1,  Dc = log2(1 + tau),
  tau = rank of sg(z) descending among the list's valid candidates (argsort(argsort(-z))
  + 1; invalid candidates are not ranked and form no pair; ties in z rank the lower gain
  first, so tied pairs count as mis-ordered and W > 0 for every pair with g_i > g_j).
  L = sum W softplus(-(z_i - z_j)) / sum W, pooled over the batch: `loss_sum` =
  sum W l, `denom` = sum W (a W-weighted mean over pairs). All gains equal gives (0, 0).
  g is a relevance score (e.g. the mean of several reward models); keep |g| small
  (2^g overflows float32 past g = 128).
  *Scalable Ranked Preference Optimization for Text-to-Image Generation*; method id
  `rank_dpo` (delta-DCG weights `recalled - verify`).
  Shapes: l, l_ref, g, valid [B,K]; mask [B]. Weights: `rank_dpo_weights`.
  Metrics: `accuracy` (W-weighted count of pairs with z_i > z_j; ties count 0), `margin`
  (W-weighted z_i - z_j), the totals `num_pairs`, `num_correct_pairs` (unweighted) and
  `num_lists`.
  """
  (l_BxK, lr_BxK, g_BxK), live_BxK, mask_B = _lists((l, l_ref, g), valid, mask)
  z_BxK = beta * (l_BxK - lr_BxK)
  w_BxKxK = rank_dpo_weights(z_BxK, g_BxK, live_BxK)
  d_BxKxK = z_BxK[:, :, None] - z_BxK[:, None, :]
  pair_BxKxK = (live_BxK[:, :, None] & live_BxK[:, None, :]
                & (g_BxK[:, :, None] > g_BxK[:, None, :])).astype(_f32)
  right_BxKxK = (d_BxKxK > 0).astype(_f32)
  metrics = {"accuracy": _wsum(w_BxKxK, right_BxKxK), "margin": _wsum(w_BxKxK, d_BxKxK),
             "num_pairs": jnp.sum(pair_BxKxK),
             "num_correct_pairs": jnp.sum(pair_BxKxK * right_BxKxK),
             "num_lists": jnp.sum(mask_B)}
  return _wsum(w_BxKxK, sp(-d_BxKxK)), jnp.sum(w_BxKxK), _sg(metrics)
