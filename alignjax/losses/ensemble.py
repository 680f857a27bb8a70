"""Reward-model ensembles: aggregation, preference strength, filtering and routing.

All functions are pure and jittable (string options are static). Member rewards come
from `vmap` over stacked parameters, member axis first: `R [E,B]`, `d [E,B]`.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

AGGREGATES = ("mean", "median", "min", "mean_minus_std")
FILTER_MODES = ("threshold", "quantile", "snr")
FLIP, SMOOTH, MARGIN = 0, 1, 2  # `route` codes, in this precedence.


def aggregate(R, method: str = "mean", lam: float = 1.0):
  """Aggregates ensemble rewards over members: `R [E,B] -> [B]` float32.

  Method id `rm_ensemble`, *Helping or Herding? Reward Model Ensembles Mitigate but do not
  Eliminate Reward Hacking* (`min` and `mean - lam*std` from *Reward Model Ensembles Help
  Mitigate Overoptimization*).
    mean            mean_e R
    median          median_e R (even E: the mean of the two middle values)
    min             min_e R
    mean_minus_std  mean_e R - lam * std_e R  (ddof = 0; E = 1 gives std 0)
  Centre each member first (`bt_center` or a reference-set mean): otherwise `min` and the
  std mostly reflect arbitrary member offsets.
  """
  chex.assert_rank(R, 2)
  R_ExB = jnp.asarray(R, jnp.float32)
  if method == "mean":
    return jnp.mean(R_ExB, axis=0)
  if method == "median":
    return jnp.median(R_ExB, axis=0)
  if method == "min":
    return jnp.min(R_ExB, axis=0)
  if method == "mean_minus_std":
    return jnp.mean(R_ExB, axis=0) - lam * jnp.std(R_ExB, axis=0, ddof=0)
  raise ValueError(f"aggregate: unknown method {method!r}; expected one of {AGGREGATES}.")


def pref_strength(d):
  """Preference strength from ensemble reward gaps: `d [E,B] -> (mu [B], sigma [B])`.

  Method id `pref_strength`, *Secrets of RLHF in Large Language Models Part II: Reward
  Modeling*. `d_e = r_e(chosen) - r_e(rejected)`; `mu = mean_e d_e`, `sigma = std_e d_e`
  (ddof 0). Members should differ only by seed or data order. `mu` feeds `bt_margin`,
  `bt_flip`, `secrets2` and `strength_filter`.
  """
  chex.assert_rank(d, 2)
  d_ExB = jnp.asarray(d, jnp.float32)
  return jnp.mean(d_ExB, axis=0), jnp.std(d_ExB, axis=0, ddof=0)


def strength_filter(mu, sigma=None, tau_keep: float = 0.0, mode: str = "threshold",
                    q: float = 0.1, mask=None):
  """Keep mask `[B]` bool for pairs by preference strength.

  Method id `strength_filter`, *Secrets of RLHF in Large Language Models Part II*.
    threshold  keep mu >= tau_keep (default 0)
    quantile   drop the lowest fraction `q` of the valid pairs: keep mu >= quantile(mu, q)
               (linear interpolation; q = 0.1 drops the lowest 10%)
    snr        keep mu / (sigma + 1e-6) >= tau_keep  (needs `sigma [B]`)
  `mask [B]` (1 = valid) restricts the quantile to valid rows; invalid rows are never kept.
  """
  chex.assert_rank(mu, 1)
  mu_B = jnp.asarray(mu, jnp.float32)
  valid_B = jnp.ones(mu_B.shape, bool) if mask is None else jnp.asarray(mask) > 0
  chex.assert_equal_shape([mu_B, valid_B])
  if mode == "threshold":
    keep_B = mu_B >= tau_keep
  elif mode == "quantile":
    threshold = jnp.nanquantile(jnp.where(valid_B, mu_B, jnp.nan), q)
    keep_B = mu_B >= threshold
  elif mode == "snr":
    if sigma is None:
      raise ValueError("strength_filter(mode='snr') needs sigma [B] (from pref_strength).")
    chex.assert_equal_shape([mu_B, sigma])
    keep_B = mu_B / (jnp.asarray(sigma, jnp.float32) + 1e-6) >= tau_keep
  else:
    raise ValueError(f"strength_filter: unknown mode {mode!r}; expected one of {FILTER_MODES}.")
  return keep_B & valid_B


def route(mu, delta=0.0, tau_flip=0.0):
  """Routes each pair for the `secrets2` recipe: int32 codes `[B]`.

  `strength_filter` route mode, *Secrets of RLHF in Large Language Models Part II*:
    FLIP = 0    if mu < -tau_flip      (the label is probably wrong)
    SMOOTH = 1  elif |mu| <= delta     (ambiguous pair: label smoothing)
    MARGIN = 2  otherwise              (clear pair: margin m = mu)
  """
  chex.assert_rank(mu, 1)
  mu_B = jnp.asarray(mu, jnp.float32)
  return jnp.where(mu_B < -tau_flip, FLIP,
                   jnp.where(jnp.abs(mu_B) <= delta, SMOOTH, MARGIN)).astype(jnp.int32)
