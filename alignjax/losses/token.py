"""Per-token SFT-style objectives (METHODS.md section 2: `dft`, `asft`).

Same contract as `losses/reward.py` (see `docs/losses.md`): pure and jittable, data arrays
positional, hyper-parameters keyword-only, `mask [B]` (masks whole rows), returns float32
`(loss_sum, denom, metrics)`. The unit is the token: `loss_sum` is the masked sum over
tokens and `denom` the number of tokens, so accumulation over micro-batches and devices is
exact. Masked tokens may hold anything (inf, NaN): they are replaced before any arithmetic.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import mask_rows as _mask, wsum as _wsum
from alignjax.losses.registry import register

_f32 = jnp.float32
_sg = jax.lax.stop_gradient


def _tokens(arrays, mask_t, mask):
  """float32 [B,T] arrays zeroed outside live tokens, and the token weights m [B,T]."""
  chex.assert_rank(arrays[0], 2)
  chex.assert_equal_shape([*arrays, mask_t])
  m_BxT = jnp.asarray(mask_t, _f32) * _mask(mask, arrays[0].shape[0])[:, None]
  return [jnp.where(m_BxT != 0, jnp.asarray(x, _f32), 0.0) for x in arrays], m_BxT


def _dft_terms(lp_BxT):
  # The weight sg(p) is clipped at 1 (p = exp(lp) <= 1 for real log-probs).
  p_BxT = _sg(jnp.exp(jnp.minimum(lp_BxT, 0.0)))
  return -p_BxT * lp_BxT, p_BxT


@register("dft", "token")
def dft(lp, mask_t, *, mask=None):
  """Dynamic fine-tuning: SFT cross-entropy rescaled by the token's own probability.

  Per token l_t = -sg(exp(lp_t)) lp_t, lp_t = log pi(y_t | x, y_<t) of the target token;
  batch loss = the mean over masked tokens. The gradient is p_t times the SFT gradient.
  *On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
  Rectification*; method id `dft`.
  Shapes: lp, mask_t [B,T] (mask_t float: 1 = completion token); mask [B].
  Denominator: tokens. Metrics: `nll` (sum of -lp), `prob` (sum of exp(lp)), `num_tokens`.
  """
  (lp_BxT,), m_BxT = _tokens((lp,), mask_t, mask)
  l_BxT, p_BxT = _dft_terms(lp_BxT)
  metrics = {"nll": _wsum(m_BxT, -lp_BxT), "prob": _wsum(m_BxT, p_BxT),
             "num_tokens": jnp.sum(m_BxT)}
  return _wsum(m_BxT, l_BxT), jnp.sum(m_BxT), _sg(metrics)


@register("asft", "token")
def asft(lp, kl, mask_t, *, lam=0.1, mask=None):
  """Anchored SFT: DFT plus a token-level KL anchor to the reference model.

  Per token l_t = -sg(exp(lp_t)) lp_t + lam KL_t, KL_t = KL(pi_ref || pi) at position t,
  summed over the full vocabulary in float32 (computed by the caller from logits [B,T,V],
  chunked over T; `token_kl_from_logits` for small models). Batch loss = the mean over
  masked tokens. Default lam = .1 (`recalled - verify`).
  *Anchored Supervised Fine-Tuning*; method id `asft`.
  Shapes: lp, kl, mask_t [B,T]; mask [B]. Denominator: tokens.
  Metrics: `dft` (sum of the DFT term), `kl` (sum of KL_t), `nll`, `num_tokens`.
  """
  (lp_BxT, kl_BxT), m_BxT = _tokens((lp, kl), mask_t, mask)
  l_BxT, _ = _dft_terms(lp_BxT)
  metrics = {"dft": _wsum(m_BxT, l_BxT), "kl": _wsum(m_BxT, kl_BxT),
             "nll": _wsum(m_BxT, -lp_BxT), "num_tokens": jnp.sum(m_BxT)}
  return _wsum(m_BxT, l_BxT + lam * kl_BxT), jnp.sum(m_BxT), _sg(metrics)


def token_kl_from_logits(logits_p, logits_ref):
  """KL(pi_ref || pi) per position: sum_v p_ref (log p_ref - log p), in float32.

  Uses log_softmax of both logit arrays; vocabulary entries with p_ref = 0 (e.g. -inf
  reference logits) contribute 0. Materialises [..., V] float32: for large vocabularies
  compute it chunked over T. Used by `asft`.
  Shapes: logits_p, logits_ref [..., V] -> [...].
  """
  chex.assert_equal_shape([logits_p, logits_ref])
  logp = jax.nn.log_softmax(jnp.asarray(logits_p, _f32), axis=-1)
  logr = jax.nn.log_softmax(jnp.asarray(logits_ref, _f32), axis=-1)
  pr = jnp.exp(logr)
  # Sanitise both logs where p_ref = 0, so -inf logits give neither NaN values nor grads.
  on = pr > 0
  return jnp.sum(jnp.where(on, pr * (jnp.where(on, logr, 0.0) - jnp.where(on, logp, 0.0)), 0.0),
                 axis=-1)
