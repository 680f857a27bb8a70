"""Reward-model losses (METHODS.md section 1): Bradley-Terry family, ties, listwise, rated, GPM.

Contract shared by every loss here (see `docs/losses.md`):
- pure and jittable; data arrays positional or keyword-only, hyper-parameters keyword-only,
  string options static; inputs are cast to float32;
- `mask [B]` float (1 = valid row, default all valid); masking a row equals dropping it;
- returns `(loss_sum, denom, metrics)`, float32 scalars: the batch loss is
  `loss_sum / max(denom, eps)`, so summing over micro-batches and devices is exact;
- `metrics` holds sums over the same units as `denom` (the trainer divides them by the
  summed denom), except `num_*` keys, which are totals. Pairwise losses report `accuracy`
  (1[d > 0], ties count 0), `margin` (d), `reward_chosen`, `reward_rejected` and
  `num_pairs`, on the pair as trained (after flips / orientation);
- an all-masked batch gives `(0, 0, metrics)` without NaN; `-logsig(x)` is written
  `softplus(-x)`, so reward gaps of +-1e4 give finite values and gradients.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses import ensemble
from alignjax.losses.common import mask_rows as _mask, rows as _rows, wsum as _wsum
from alignjax.losses.registry import register

_f32 = jnp.float32
sp = jax.nn.softplus
TIE_MODES = ("half", "rao_kupper", "davidson")


# ---------------------------------------------------------------------------- helpers


def _pairs(r_c, r_r, mask):
  chex.assert_rank(r_c, 1)
  chex.assert_equal_shape([r_c, r_r])
  b = r_c.shape[0]
  return jnp.asarray(r_c, _f32), jnp.asarray(r_r, _f32), _mask(mask, b)


def _orient(flip_B, r_c_B, r_r_B):
  """Swaps chosen and rejected where `flip_B`."""
  return jnp.where(flip_B, r_r_B, r_c_B), jnp.where(flip_B, r_c_B, r_r_B)


def _pair_metrics(r_c_B, r_r_B, w_B, mask_B, **extra):
  d_B = r_c_B - r_r_B
  metrics = {"accuracy": _wsum(w_B, (d_B > 0).astype(_f32)), "margin": _wsum(w_B, d_B),
             "reward_chosen": _wsum(w_B, r_c_B), "reward_rejected": _wsum(w_B, r_r_B),
             "num_pairs": jnp.sum(mask_B), **extra}
  return jax.lax.stop_gradient(metrics)


def _pairwise_out(loss_B, r_c_B, r_r_B, mask_B, w_B=None, **extra):
  """(loss_sum, denom, metrics) with per-row weights `w_B` (default: the mask)."""
  w_B = mask_B if w_B is None else w_B
  return _wsum(w_B, loss_B), jnp.sum(w_B), _pair_metrics(r_c_B, r_r_B, w_B, mask_B, **extra)


def _warn_if_negative(name, x):
  if x is not None and not isinstance(x, jax.core.Tracer) and np.any(np.asarray(x) < 0):
    warnings.warn(f"{name} < 0 acts as slack (the loss rewards a reward gap below 0).",
                  stacklevel=3)


# ---------------------------------------------------------------------------- pairwise


@register("bt", "pairwise")
def bt(r_c, r_r, *, mask=None):
  """Bradley-Terry loss on scalar rewards.

  l = softplus(-d), d = r_c - r_r; batch loss mean(l).
  *Learning to summarize from human feedback* (Bradley & Terry 1952); method id `bt`.
  Shapes: r_c, r_r, mask [B]. Denominator: number of valid pairs.
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  return _pairwise_out(sp(r_r_B - r_c_B), r_c_B, r_r_B, mask_B)


@register("bt_margin", "pairwise")
def bt_margin(r_c, r_r, *, margin=0.0, mask=None):
  """Bradley-Terry with a margin.

  l = softplus(-(d - m)); `margin` m is a scalar or [B] (a gap from the data, or `mu` from
  `ensemble.pref_strength`). A negative m acts as slack: allowed, with a warning when m is
  concrete. *Llama 2: Open Foundation and Fine-Tuned Chat Models*; method id `bt_margin`.
  Shapes: r_c, r_r, mask [B]; margin scalar or [B]. Denominator: valid pairs.
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  _warn_if_negative("bt_margin: margin", margin)
  m_B = _rows(margin, r_c_B.shape[0], "margin")
  return _pairwise_out(sp(m_B - (r_c_B - r_r_B)), r_c_B, r_r_B, mask_B)


@register("bt_center", "pairwise")
def bt_center(r_c, r_r, *, coef=0.01, margin=None, mask=None):
  """Bradley-Terry plus a reward-centring penalty.

  l = softplus(-(d - m)) + coef * (r_c + r_r)^2  (m = 0 unless `margin` is given), so the
  batch loss is bt(_margin) + coef * mean((r_c + r_r)^2). The penalty pins the reward offset,
  so ensemble members and checkpoints are comparable.
  *Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking*;
  method id `bt_center`. Shapes: r_c, r_r, mask [B]; margin None, scalar or [B].
  Extra metric: `center_penalty` (sum of coef * (r_c + r_r)^2).
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  m_B = _rows(0.0 if margin is None else margin, r_c_B.shape[0], "margin")
  penalty_B = coef * jnp.square(r_c_B + r_r_B)
  return _pairwise_out(sp(m_B - (r_c_B - r_r_B)) + penalty_B, r_c_B, r_r_B, mask_B,
                       center_penalty=jax.lax.stop_gradient(_wsum(mask_B, penalty_B)))


@register("bt_scaled", "pairwise")
def bt_scaled(r_c, r_r, *, strength, normalize=False, mask=None):
  """Scaled Bradley-Terry: each pair weighted by its annotated preference strength.

  l = |s| * softplus(-sgn(s) d), `strength` s [B] on the -3..3 scale; s < 0 means the
  "rejected" response is preferred (the pair is flipped; metrics use the flipped pair).
  Ties (s = 0) should be dropped upstream: they weigh 0 but still count in the default
  denominator. Batch loss mean(l), or with `normalize=True` sum(|s| l') / sum(|s|)
  (l' = softplus(-sgn(s) d); denominator and metrics are then |s|-weighted).
  *HelpSteer2-Preference: Complementing Ratings with Preferences*; method id `bt_scaled`.
  Shapes: r_c, r_r, strength, mask [B].
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  s_B = _rows(strength, r_c_B.shape[0], "strength")
  r_c_B, r_r_B = _orient(s_B < 0, r_c_B, r_r_B)
  l_B = sp(r_r_B - r_c_B)
  if normalize:
    return _pairwise_out(l_B, r_c_B, r_r_B, mask_B, w_B=mask_B * jnp.abs(s_B))
  return _wsum(mask_B, jnp.abs(s_B) * l_B), jnp.sum(mask_B), _pair_metrics(
      r_c_B, r_r_B, mask_B, mask_B)


def _smooth(d_B, eps):
  # -(1-eps) logsig(d) - eps logsig(-d)
  return (1.0 - eps) * sp(-d_B) + eps * sp(d_B)


@register("bt_smooth", "pairwise")
def bt_smooth(r_c, r_r, *, eps=0.1, mask=None):
  """Conservative (label-smoothed) Bradley-Terry.

  l = -(1-eps) logsig(d) - eps logsig(-d) = (1-eps) softplus(-d) + eps softplus(d), with
  eps in [0, .5) (scalar or [B]); the minimiser d* = log((1-eps)/eps) keeps rewards bounded.
  Method id `bt_smooth` (standard; its use on ambiguous pairs follows *Secrets of RLHF in
  Large Language Models Part II: Reward Modeling*). Shapes: r_c, r_r, mask [B]; eps scalar/[B].
  """
  if isinstance(eps, (int, float)) and not 0 <= eps < 0.5:
    raise ValueError(f"bt_smooth: eps must be in [0, 0.5), got {eps}.")
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  eps_B = _rows(eps, r_c_B.shape[0], "eps")
  return _pairwise_out(_smooth(r_c_B - r_r_B, eps_B), r_c_B, r_r_B, mask_B)


@register("bt_flip", "pairwise")
def bt_flip(r_c, r_r, *, mu, tau_flip=0.0, mask=None):
  """Bradley-Terry with label flipping by ensemble preference strength.

  sgn = -1 where mu < -tau_flip else 1; l = softplus(-sgn d). `mu [B]` comes from
  `ensemble.pref_strength`. Metrics use the flipped pairs; `num_flipped` counts flips.
  *Secrets of RLHF in Large Language Models Part II: Reward Modeling*; method id `bt_flip`.
  Shapes: r_c, r_r, mu, mask [B].
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  flip_B = _rows(mu, r_c_B.shape[0], "mu") < -tau_flip
  r_c_B, r_r_B = _orient(flip_B, r_c_B, r_r_B)
  return _pairwise_out(sp(r_r_B - r_c_B), r_c_B, r_r_B, mask_B,
                       num_flipped=_wsum(mask_B, flip_B.astype(_f32)))


@register("secrets2", "pairwise")
def secrets2(r_c, r_r, *, mu, delta=0.0, tau_flip=0.0, eps=0.1, mask=None):
  """The flip / smooth / margin recipe of *Secrets of RLHF ... Part II*, routed by `mu`.

  Per pair (`ensemble.route`, in this precedence):
    mu < -tau_flip   flip:    l = softplus(d)                     (bt_flip)
    |mu| <= delta    smooth:  l = (1-eps) softplus(-d) + eps softplus(d)   (bt_smooth)
    otherwise        margin:  l = softplus(-(d - mu))             (bt_margin, m = mu)
  *Secrets of RLHF in Large Language Models Part II: Reward Modeling*; method id `bt_flip`
  (recipe `secrets2`). The defaults delta = 0, tau_flip = 0 are `proposed`: set them from
  the distribution of mu. Shapes: r_c, r_r, mu, mask [B]. Extra metrics: `num_flipped`,
  `num_smoothed`, `num_margin`; pair metrics use the flipped pairs.
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  mu_B = _rows(mu, r_c_B.shape[0], "mu")
  code_B = ensemble.route(mu_B, delta, tau_flip)
  r_c_B, r_r_B = _orient(code_B == ensemble.FLIP, r_c_B, r_r_B)
  d_B = r_c_B - r_r_B
  l_B = jnp.where(code_B == ensemble.FLIP, sp(-d_B),
                  jnp.where(code_B == ensemble.SMOOTH, _smooth(d_B, eps), sp(mu_B - d_B)))
  counts = {f"num_{k}": _wsum(mask_B, (code_B == c).astype(_f32)) for k, c in
            (("flipped", ensemble.FLIP), ("smoothed", ensemble.SMOOTH),
             ("margin", ensemble.MARGIN))}
  return _pairwise_out(l_B, r_c_B, r_r_B, mask_B, **counts)


@register("bt_ties", "pairwise")
def bt_ties(r_c, r_r, *, labels, mode="half", theta_raw=0.0, kappa=0.0, mask=None):
  """Bradley-Terry with tie labels `labels [B]` in {+1 (chosen wins), 0 (tie), -1}.

  l = -log P(label), d = r_c - r_r:
    half (default; proposed): ties .5 softplus(-d) + .5 softplus(d); others softplus(-y d).
      Equals `bt` when there are no ties.
    rao_kupper (Rao & Kupper 1967): theta = softplus(theta_raw) > 0,
      log P(c>r) = logsig(d - theta), log P(r>c) = logsig(-d - theta),
      log P(tie) = 2 theta + log(-expm1(-2 theta)) + logsig(d - theta) + logsig(-d - theta).
    davidson (Davidson 1970): kappa = log nu, Z = lse(d/2, -d/2, kappa),
      log P(c>r) = d/2 - Z, log P(r>c) = -d/2 - Z, log P(tie) = kappa - Z.
  `theta_raw` and `kappa` are scalars (Python or arrays): pass them as trainable parameters
  to learn them. theta -> 0 and kappa -> -inf recover `bt`.
  Tie labels as in *Robust Reward Modeling via Causal Rubrics*; method id `bt_ties`.
  Shapes: r_c, r_r, labels, mask [B]; theta_raw, kappa scalars. Metrics: pairs oriented by
  the label, `accuracy` counts won pairs with y d > 0 (tie rows count 0), `num_ties`.
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  y_B = _rows(labels, r_c_B.shape[0], "labels")
  d_B = r_c_B - r_r_B
  if mode == "half":
    l_B = jnp.where(y_B == 0, 0.5 * (sp(-d_B) + sp(d_B)), sp(-y_B * d_B))
  else:
    if mode == "rao_kupper":
      chex.assert_rank(theta_raw, 0)
      theta = jnp.maximum(sp(jnp.asarray(theta_raw, _f32)), 1e-20)
      lp_win_B, lp_lose_B = -sp(theta - d_B), -sp(theta + d_B)
      lp_tie_B = 2 * theta + jnp.log(-jnp.expm1(-2 * theta)) + lp_win_B + lp_lose_B
    elif mode == "davidson":
      chex.assert_rank(kappa, 0)
      kappa_B = jnp.broadcast_to(jnp.asarray(kappa, _f32), d_B.shape)
      z_B = jax.nn.logsumexp(jnp.stack([d_B / 2, -d_B / 2, kappa_B]), axis=0)
      lp_win_B, lp_lose_B, lp_tie_B = d_B / 2 - z_B, -d_B / 2 - z_B, kappa_B - z_B
    else:
      raise ValueError(f"bt_ties: unknown mode {mode!r}; expected one of {TIE_MODES}.")
    l_B = -jnp.where(y_B > 0, lp_win_B, jnp.where(y_B < 0, lp_lose_B, lp_tie_B))
  r_c_B, r_r_B = _orient(y_B < 0, r_c_B, r_r_B)
  won_B = (y_B != 0).astype(_f32)
  metrics = _pair_metrics(r_c_B, r_r_B, mask_B, mask_B, num_ties=_wsum(mask_B, 1 - won_B))
  metrics["accuracy"] = _wsum(mask_B * won_B, ((r_c_B - r_r_B) > 0).astype(_f32))
  return _wsum(mask_B, l_B), jnp.sum(mask_B), metrics


@register("bt_weighted", "pairwise")
def bt_weighted(r_c, r_r, *, weights=None, source=None, source_weights=None,
                per_source_mean=False, mask=None):
  """Bradley-Terry with per-example and per-source weights.

  v_i = w_i lam[src_i]; batch loss sum(v l) / sum(v), l = softplus(-d); denominator and
  metrics are v-weighted. `weights` w [B] (default 1), `source` src [B] int in [0, S),
  `source_weights` lam [S] (default 1; required with `source`).
  `per_source_mean=True` divides v_i by the w-sum of its source in the batch, so the batch
  loss is sum_s lam_s L_s / sum_s lam_s over the sources present (L_s = the source's
  w-weighted mean loss). With lam = sg(`more_weights(...)`), which sums to 1 over present
  sources, this is MORE's L = sum_s sg(lam_s) L_s.
  *On Diversified Preferences of Large Language Model Alignment* (MORE); method id
  `bt_weighted`. Shapes: r_c, r_r, weights, source, mask [B]; source_weights [S].
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  b = r_c_B.shape[0]
  v_B = mask_B * (1.0 if weights is None else _rows(weights, b, "weights"))
  if source is not None:
    if source_weights is None:
      raise ValueError("bt_weighted: `source` needs `source_weights` [S].")
    chex.assert_shape(source, (b,))
    chex.assert_rank(source_weights, 1)
    lam_S = jnp.asarray(source_weights, _f32)
    if per_source_mean:
      total_S = jax.ops.segment_sum(v_B, source, num_segments=lam_S.shape[0])
      v_B = jnp.where(v_B != 0, v_B / jnp.where(total_S == 0, 1.0, total_S)[source], 0.0)
    v_B = v_B * lam_S[source]
  elif per_source_mean:
    raise ValueError("bt_weighted: per_source_mean=True needs `source` and `source_weights`.")
  return _pairwise_out(sp(r_r_B - r_c_B), r_c_B, r_r_B, mask_B, w_B=v_B)


def more_ema(grads, present, ema=None, rate=1.0, normalize=False):
  """The per-source gradient EMA that `more_weights` uses: `[S,P]`.

  g_s is optionally L2-normalised; then ema_s <- rate g_s + (1 - rate) ema_s for present
  sources (absent sources keep their EMA; with `ema=None`, the EMA starts at g).
  Keep the result as trainer state and pass it as `ema` on the next step.
  """
  chex.assert_rank(grads, 2)
  g_SxP = jnp.asarray(grads, _f32)
  chex.assert_shape(present, g_SxP.shape[:1])
  present = jnp.asarray(present, bool)
  if normalize:
    g_SxP = g_SxP / jnp.sqrt(jnp.maximum(jnp.sum(g_SxP**2, axis=1, keepdims=True), 1e-24))
  if ema is None:
    return g_SxP
  chex.assert_equal_shape([g_SxP, ema])
  return jnp.where(present[:, None], rate * g_SxP + (1 - rate) * ema, ema)


def more_weights(grads, present, ema=None, rate=1.0, normalize=False, steps=20):
  """MORE source weights: lam [S] on the simplex minimising ||sum_s lam_s g_s||^2.

  `grads [S,P]`: g_s = gradient of source s's mean loss w.r.t. the reward-head weights only
  (computed by the trainer); `present [S]` bool: sources in the batch (absent ones get 0);
  `ema`, `rate`, `normalize`: see `more_ema` (g is replaced by the EMA).
  S = 2: lam_1 = clip((g_2 - g_1).g_2 / ||g_1 - g_2||^2, 0, 1), lam_2 = 1 - lam_1.
  Otherwise `steps` Frank-Wolfe steps with exact line search, from the uniform point.
  One present source gets 1; no present source gives all zeros. Use sg(lam) as
  `bt_weighted(source_weights=..., per_source_mean=True)`.
  *On Diversified Preferences of Large Language Model Alignment* (MORE); method id
  `bt_weighted`.
  """
  g_SxP = more_ema(grads, present, ema, rate=rate, normalize=normalize)
  s = g_SxP.shape[0]
  present_S = jnp.asarray(present, bool)
  gram_SxS = g_SxP @ g_SxP.T

  def segment_min(vv, vu, uu, tie=0.0):
    """argmin over t in [0, 1] of ||(1 - t) v + t u||^2 from inner products (`tie` if u = v)."""
    den = vv - 2 * vu + uu
    return jnp.clip(jnp.where(den > 0, (vv - vu) / jnp.where(den > 0, den, 1.0), tie), 0, 1)

  if s == 2:
    lam_1 = segment_min(gram_SxS[1, 1], gram_SxS[0, 1], gram_SxS[0, 0], tie=0.5)
    lam_S = jnp.stack([lam_1, 1 - lam_1])
    lam_S = jnp.where(present_S.all(), lam_S, present_S.astype(_f32))
  else:
    def fw_step(_, lam_S):
      glam_S = gram_SxS @ lam_S
      t = jnp.argmin(jnp.where(present_S, glam_S, jnp.inf))
      gamma = segment_min(lam_S @ glam_S, glam_S[t], gram_SxS[t, t])
      return (1 - gamma) * lam_S + gamma * jax.nn.one_hot(t, s, dtype=_f32)

    lam0_S = present_S / jnp.maximum(jnp.sum(present_S), 1)
    lam_S = jax.lax.fori_loop(0, steps, fw_step, lam0_S.astype(_f32))
  return jnp.where(present_S.any(), lam_S, 0.0)


# ---------------------------------------------------------------------------- rated


@register("rm_regression", "rated")
def rm_regression(pred, target, label_mask, *, mask=None):
  """Multi-attribute reward regression (mean squared error over labelled attributes).

  L = sum(M (yhat - y)^2) / sum(M), M = label_mask * mask[:, None]. HelpSteer2 has A = 5
  attributes (helpfulness, correctness, coherence, complexity, verbosity) scored 0-4; the
  scalar reward is r = yhat . w (default w = helpfulness only).
  *HelpSteer2: Open-source dataset for training top-performing reward models*; method id
  `rm_regression`. Shapes: pred, target, label_mask [B,A]; mask [B]. Denominator: number
  of labels. Metrics: `squared_error`, `abs_error` (sums over labels), `num_labels`.
  """
  chex.assert_rank(pred, 2)
  chex.assert_equal_shape([pred, target, label_mask])
  m_BxA = jnp.asarray(label_mask, _f32) * _mask(mask, pred.shape[0])[:, None]
  err_BxA = jnp.asarray(pred, _f32) - jnp.asarray(target, _f32)
  loss_sum = _wsum(m_BxA, jnp.square(err_BxA))
  metrics = {"squared_error": loss_sum, "abs_error": _wsum(m_BxA, jnp.abs(err_BxA)),
             "num_labels": jnp.sum(m_BxA)}
  return loss_sum, jnp.sum(m_BxA), jax.lax.stop_gradient(metrics)


@register("bt_plus_regression", "rated")
def bt_plus_regression(r_c, r_r, *, help_c, help_r, strength=None, lam_reg=0.1, mask=None):
  """Joint scaled Bradley-Terry + helpfulness regression on one shared scalar head.

  Option (b) of `bt_plus_regression` (`proposed`): per pair
    l = |s| softplus(-sgn(s) d) + lam_reg * ((r_c - h_c)^2 + (r_r - h_r)^2) / 2,
  batch loss mean(l) = bt_scaled + lam_reg * mean over responses of (r_y - y_help)^2.
  Inputs: the head's scalar rewards `r_c, r_r [B]`, the responses' helpfulness ratings
  `help_c, help_r [B]` (same scale as the reward, e.g. 0-4), optional `strength` s [B]
  (default 1: plain bt). The regression term also fixes the reward offset. Option (a), the
  paper's two stages, is `rm_regression` then `bt_scaled`.
  *HelpSteer2-Preference: Complementing Ratings with Preferences*; method id
  `bt_plus_regression`. Extra metric: `regression` (sum of the per-pair squared error).
  """
  r_c_B, r_r_B, mask_B = _pairs(r_c, r_r, mask)
  b = r_c_B.shape[0]
  s_B = _rows(1.0 if strength is None else strength, b, "strength")
  reg_B = 0.5 * (jnp.square(r_c_B - _rows(help_c, b, "help_c"))
                 + jnp.square(r_r_B - _rows(help_r, b, "help_r")))
  o_c_B, o_r_B = _orient(s_B < 0, r_c_B, r_r_B)
  l_B = jnp.abs(s_B) * sp(o_r_B - o_c_B) + lam_reg * reg_B
  return _pairwise_out(l_B, o_c_B, o_r_B, mask_B,
                       regression=jax.lax.stop_gradient(_wsum(mask_B, reg_B)))


# ---------------------------------------------------------------------------- listwise


def _lists(scores, mask):
  chex.assert_rank(scores, 2)
  return jnp.asarray(scores, _f32), _mask(mask, scores.shape[0])


@register("plackett_luce", "listwise")
def plackett_luce(scores, order, n, *, top_k=None, mask=None):
  """Plackett-Luce negative log-likelihood of a best-first ranking.

  z = scores taken in `order` (best first), -inf past n;
  L_b = sum_{k < min(n, top_k+1) - 1} (lse(z[k:]) - z_k), via a reverse cumlogsumexp
  (positions k >= n - 1 are masked before subtracting). K = 2 reduces to `bt`.
  Plackett 1975 / Luce 1959; method id `plackett_luce`.
  Shapes: scores, order [B,K] (indices into K; tail past n is padding); n, mask [B].
  Denominator: lists with n >= 2. Metrics (per list, summed): `accuracy` (fraction of the
  list's pairs ordered correctly, ties 0), `top1_accuracy`; `num_lists`, `num_pairs`.
  """
  s_BxK, mask_B = _lists(scores, mask)
  b, k = s_BxK.shape
  chex.assert_shape(order, (b, k))
  chex.assert_shape(n, (b,))
  n_B = jnp.asarray(n, jnp.int32)
  pos_K = jnp.arange(k)
  live_BxK = pos_K < n_B[:, None]
  z_BxK = jnp.where(live_BxK, jnp.take_along_axis(s_BxK, order, axis=1), -jnp.inf)
  tail_BxK = jax.lax.cumlogsumexp(z_BxK, axis=z_BxK.ndim - 1, reverse=True)
  limit_B = n_B - 1 if top_k is None else jnp.minimum(n_B - 1, top_k)
  l_B = jnp.sum(jnp.where(pos_K < limit_B[:, None], tail_BxK - z_BxK, 0.0), axis=1)
  lists_B = mask_B * (n_B >= 2)
  # Pair (i, j) with i before j in the order, both live.
  pair_BxKxK = live_BxK[:, None, :] & (pos_K[:, None] < pos_K[None, :])
  right_BxKxK = pair_BxKxK & (z_BxK[:, :, None] > z_BxK[:, None, :])
  npairs_B = jnp.sum(pair_BxKxK, axis=(1, 2)).astype(_f32)
  top1_B = jnp.all(jnp.where(live_BxK & (pos_K > 0), z_BxK[:, :1] > z_BxK, True), axis=1)
  metrics = {"accuracy": _wsum(lists_B, jnp.sum(right_BxKxK, (1, 2)) / jnp.maximum(npairs_B, 1)),
             "top1_accuracy": _wsum(lists_B, top1_B.astype(_f32)),
             "num_lists": jnp.sum(lists_B), "num_pairs": _wsum(lists_B, npairs_B)}
  return _wsum(lists_B, l_B), jnp.sum(lists_B), jax.lax.stop_gradient(metrics)


@register("ranknet", "listwise")
def ranknet(scores, targets, valid, *, min_gap=0.0, mask=None):
  """RankNet: Bradley-Terry over all ordered pairs of a list, pooled over the batch.

  M_ij = valid_i & valid_j & (t_i > t_j) & (t_i - t_j >= W), W = `min_gap`;
  L = sum(M softplus(-(s_i - s_j))) / sum(M). Equal targets form no pair. (InstructGPT's
  K-choose-2 loss is this with per-prompt normalisation.)
  *Learning to Rank using Gradient Descent*; method id `ranknet`.
  Shapes: scores, targets, valid [B,K]; mask [B]. Denominator: number of pairs.
  Metrics: pair metrics (`accuracy`, `margin`, `reward_chosen` = s_i, `reward_rejected` =
  s_j, `num_pairs`) and `num_lists`.
  """
  s_BxK, mask_B = _lists(scores, mask)
  chex.assert_equal_shape([s_BxK, targets, valid])
  t_BxK = jnp.asarray(targets, _f32)
  v_BxK = jnp.asarray(valid, bool)
  gap_BxKxK = t_BxK[:, :, None] - t_BxK[:, None, :]
  pair_BxKxK = v_BxK[:, :, None] & v_BxK[:, None, :] & (gap_BxKxK > 0) & (gap_BxKxK >= min_gap)
  w_BxKxK = pair_BxKxK * mask_B[:, None, None]
  hi_BxKxK = jnp.broadcast_to(s_BxK[:, :, None], w_BxKxK.shape)
  lo_BxKxK = jnp.broadcast_to(s_BxK[:, None, :], w_BxKxK.shape)
  metrics = _pair_metrics(hi_BxKxK, lo_BxKxK, w_BxKxK, w_BxKxK,
                          num_lists=jnp.sum(mask_B))
  return _wsum(w_BxKxK, sp(lo_BxKxK - hi_BxKxK)), jnp.sum(w_BxKxK), metrics


@register("ranklist", "listwise")
def ranklist(scores, targets, valid, *, w=1, min_gap=0.0, mask=None):
  """RankList: each rank position against the next `w` positions, with an LSE.

  Sort each list by target (best first). For position k, C_k = positions k+1..k+w that are
  valid with t_k > t_j and t_k - t_j >= W (`min_gap`);
  l_k = softplus(lse_{j in C_k} s_j - s_k); L = mean of l_k over non-empty C_k (pooled over
  the batch). w = 1 is adjacent-pair RankNet; w = K-1 is Plackett-Luce averaged per
  position. Skip-wise curriculum: grow `w` (a Python int) from 1 to K-1 during training.
  *RankList -- A Listwise Preference Learning Framework for Predicting Subjective
  Preferences*; method id `ranklist` (this exact form is `proposed`).
  Shapes: scores, targets, valid [B,K]; mask [B]. Denominator: non-empty positions.
  Metrics: `accuracy` (s_k above every score in C_k), `num_positions`, `num_lists`.
  """
  s_BxK, mask_B = _lists(scores, mask)
  chex.assert_equal_shape([s_BxK, targets, valid])
  if not isinstance(w, int) or w < 1:
    raise ValueError(f"ranklist: the window w must be a Python int >= 1, got {w!r}.")
  b, k = s_BxK.shape
  v_BxK = jnp.asarray(valid, bool)
  t_BxK = jnp.asarray(targets, _f32)
  order_BxK = jnp.argsort(jnp.where(v_BxK, -t_BxK, jnp.inf), axis=1, stable=True)
  z_BxK, t_BxK, v_BxK = (jnp.take_along_axis(x, order_BxK, axis=1)
                         for x in (s_BxK, t_BxK, v_BxK))
  j_KxW = jnp.arange(k)[:, None] + jnp.arange(1, min(w, max(k - 1, 1)) + 1)[None, :]
  jc_KxW = jnp.minimum(j_KxW, k - 1)
  gap_BxKxW = t_BxK[:, :, None] - t_BxK[:, jc_KxW]
  cand_BxKxW = ((j_KxW < k) & v_BxK[:, :, None] & v_BxK[:, jc_KxW]
                & (gap_BxKxW > 0) & (gap_BxKxW >= min_gap))
  nonempty_BxK = jnp.any(cand_BxKxW, axis=-1)
  # Empty windows get finite filler (an all -inf lse has a NaN gradient); they are masked.
  fill_BxKx1 = jnp.where(nonempty_BxK, -jnp.inf, 0.0)[..., None]
  lse_BxK = jax.nn.logsumexp(jnp.where(cand_BxKxW, z_BxK[:, jc_KxW], fill_BxKx1), axis=-1)
  pos_BxK = nonempty_BxK * mask_B[:, None]
  l_BxK = sp(jnp.where(pos_BxK > 0, lse_BxK - z_BxK, 0.0))
  best_BxK = jnp.max(jnp.where(cand_BxKxW, z_BxK[:, jc_KxW], -jnp.inf), axis=-1)
  metrics = {"accuracy": _wsum(pos_BxK, (z_BxK > best_BxK).astype(_f32)),
             "num_positions": jnp.sum(pos_BxK), "num_lists": jnp.sum(mask_B)}
  return _wsum(pos_BxK, l_BxK), jnp.sum(pos_BxK), jax.lax.stop_gradient(metrics)


# ---------------------------------------------------------------------------- gpm


def _unit(v):
  return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))


def gpm_score(v_a, v_b, lam=None, normalize=False):
  """General-preference score s(a > b) = sum_l lam_l (a[2l] b[2l+1] - a[2l+1] b[2l]).

  That is <R v_a, v_b> with 2x2 skew-symmetric blocks, so s(a,b) = -s(b,a), s(a,a) = 0.
  `lam [B,k]` per-prompt scales (default 1; e.g. k * softmax(W_p h_x / sqrt(D)));
  `normalize` L2-normalises v first (the paper does; the released code does not).
  *General Preference Modeling with Preference Representations for Aligning Language
  Models*; method id `gpm`. Shapes: v_a, v_b [B,2k] -> [B].
  """
  chex.assert_rank(v_a, 2)
  chex.assert_equal_shape([v_a, v_b])
  b, two_k = v_a.shape
  if two_k % 2:
    raise ValueError(f"gpm_score: the embedding size must be even (2k), got {two_k}.")
  a_BxKx2, b_BxKx2 = (jnp.asarray(v, _f32) for v in (v_a, v_b))
  if normalize:
    a_BxKx2, b_BxKx2 = _unit(a_BxKx2), _unit(b_BxKx2)
  a_BxKx2, b_BxKx2 = a_BxKx2.reshape(b, -1, 2), b_BxKx2.reshape(b, -1, 2)
  s_BxK = a_BxKx2[..., 0] * b_BxKx2[..., 1] - a_BxKx2[..., 1] * b_BxKx2[..., 0]
  if lam is not None:
    chex.assert_shape(lam, s_BxK.shape)
    s_BxK = s_BxK * jnp.asarray(lam, _f32)
  return jnp.sum(s_BxK, axis=-1)


@register("gpm", "gpm")
def gpm(v_c, v_r, *, lam=None, tau=0.1, normalize=False, mask=None):
  """General preference model loss: l = softplus(-s(c > r) / tau), s from `gpm_score`.

  `v = W h [B,2k]` from a bias-free head on the last-token state (default 2k = 4).
  *General Preference Modeling with Preference Representations for Aligning Language
  Models*; method id `gpm`. Shapes: v_c, v_r [B,2k]; lam [B,k] or None; mask [B].
  Denominator: valid pairs. Metrics: `accuracy` (s > 0), `margin` (s), `num_pairs`.
  """
  s_B = gpm_score(v_c, v_r, lam, normalize=normalize)
  mask_B = _mask(mask, s_B.shape[0])
  metrics = {"accuracy": _wsum(mask_B, (s_B > 0).astype(_f32)), "margin": _wsum(mask_B, s_B),
             "num_pairs": jnp.sum(mask_B)}
  return _wsum(mask_B, sp(-s_B / tau)), jnp.sum(mask_B), jax.lax.stop_gradient(metrics)
