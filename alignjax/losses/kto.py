"""KTO: unpaired preference optimisation (METHODS.md section 2, `kto`).

Same contract as `losses/reward.py` (see `docs/losses.md`): pure and jittable, data arrays
positional, hyper-parameters keyword-only, `mask [B]`, returns float32
`(loss_sum, denom, metrics)` with the batch loss `loss_sum / max(denom, eps)`.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses.common import mask_rows as _mask, rows as _rows, wsum as _wsum
from alignjax.losses.registry import register

_f32 = jnp.float32
_sg = jax.lax.stop_gradient
KTO_RATIO_RANGE = (1.0, 4.0 / 3.0)


@register("kto", "unpaired")
def kto(u, desirable, z0, *, beta=0.1, lam_d=1.0, lam_u=1.0, mask=None):
  """Kahneman-Tversky optimisation on unpaired completions.

  Per row, with u = logpi(y|x) - logpi_ref(y|x) and the baseline z0 (held constant):
    desirable:    l = lam_d (1 - sig(beta (u - z0)))
    undesirable:  l = lam_u (1 - sig(beta (z0 - u)))
  Batch loss: the plain mean of l over valid rows (not normalised by the lam weights).
  `z0` comes from `kto_z0` (the trainer computes it on mismatched completions); it is
  wrapped in stop_gradient here as well. Keep lam_d nD / (lam_u nU) in [1, 4/3]
  (`kto_weight_check`).
  *KTO: Model Alignment as Prospect Theoretic Optimization*; method id `kto`.
  Shapes: u, desirable (bool or 0/1), mask [B]; z0 scalar or [B]. Denominator: valid rows.
  Metrics (sums; the trainer divides them by the number of rows): `reward_desirable`,
  `reward_undesirable` (sums of beta u over desirable / undesirable rows; divide by
  `num_desirable` / `num_undesirable` for per-class means), `kl` (sum of z0 over rows, so
  the divided value is z0), and the totals `num_desirable`, `num_undesirable`.
  """
  chex.assert_rank(u, 1)
  b = u.shape[0]
  mask_B = _mask(mask, b)
  live_B = mask_B != 0
  u_B = jnp.where(live_B, jnp.asarray(u, _f32), 0.0)
  des_B = jnp.where(live_B, _rows(desirable, b, "desirable") != 0, False)
  z0_B = jnp.where(live_B, _sg(_rows(z0, b, "z0")), 0.0)
  x_B = beta * (u_B - z0_B)
  # 1 - sig(x) = sig(-x): desirable rows lam_d sig(-x), undesirable rows lam_u sig(x).
  l_B = jnp.where(des_B, lam_d * jax.nn.sigmoid(-x_B), lam_u * jax.nn.sigmoid(x_B))
  w_des_B, w_und_B = mask_B * des_B, mask_B * ~des_B
  metrics = {"reward_desirable": _wsum(w_des_B, beta * u_B),
             "reward_undesirable": _wsum(w_und_B, beta * u_B),
             "kl": _wsum(mask_B, z0_B),
             "num_desirable": jnp.sum(w_des_B), "num_undesirable": jnp.sum(w_und_B)}
  return _wsum(mask_B, l_B), jnp.sum(mask_B), _sg(metrics)


def kto_z0(u_mismatched, mask=None, axis_name=None):
  """The KTO reference point z0 = sg(max(0, mean over valid rows of u')).

  `u_mismatched [B]` = logpi(y'|x) - logpi_ref(y'|x) for mismatched completions
  (y' = roll(y, 1) over the batch; the trainer builds the pairing). With `axis_name` (inside
  `shard_map` / `pmap`), the masked sum and the row count are each `lax.pmean`-ed, so z0 is
  the exact mean over all valid rows of all shards. Under plain `jit` on globally sharded
  arrays the mean is already global: leave `axis_name=None`. With B = 1 (static shape, no
  `axis_name`) y' = y, so z0 = 0. An all-masked batch gives 0.
  *KTO: Model Alignment as Prospect Theoretic Optimization*; method id `kto`.
  Returns a float32 scalar.
  """
  chex.assert_rank(u_mismatched, 1)
  b = u_mismatched.shape[0]
  if b == 1 and axis_name is None:
    return jnp.zeros((), _f32)
  mask_B = _mask(mask, b)
  total, count = _wsum(mask_B, jnp.asarray(u_mismatched, _f32)), jnp.sum(mask_B)
  if axis_name is not None:
    total, count = jax.lax.pmean(total, axis_name), jax.lax.pmean(count, axis_name)
  mean = jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
  return _sg(jnp.maximum(mean, 0.0))


def kto_weight_check(n_desirable, n_undesirable, lam_d, lam_u):
  """The ratio lam_d nD / (lam_u nU) as a float; warns if it lies outside [1, 4/3].

  KTO recommends weighting so that desirable examples carry 1 to 4/3 times the weight of
  undesirable ones. Host-side helper (concrete counts, e.g. of the whole data set).
  *KTO: Model Alignment as Prospect Theoretic Optimization*; method id `kto`.
  """
  num = float(lam_d) * float(np.sum(n_desirable))
  den = float(lam_u) * float(np.sum(n_undesirable))
  ratio = num / den if den > 0 else (np.inf if num > 0 else np.nan)
  lo, hi = KTO_RATIO_RANGE
  if not lo - 1e-9 <= ratio <= hi + 1e-9:
    warnings.warn(f"kto: lam_d * n_desirable / (lam_u * n_undesirable) = {ratio:.4g} is "
                  f"outside the recommended [1, 4/3]; adjust lam_d or lam_u.", stacklevel=2)
  return ratio
