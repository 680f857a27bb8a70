"""Reward combination and whitening (METHODS.md 4.3 `weighted_sum`, 4.2 `reward_whiten`).

Both are pure jnp functions, jit-compiled with `nan`, `ddof` and `axis` static (so they can also
be called inside a caller's jit); no gradient use in mind. NaN marks an unscorable reward, as
produced by `registry.score`.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

_f32 = jnp.float32
NAN_MODES = ("skip", "propagate")


@functools.partial(jax.jit, static_argnames="nan")
def weighted_sum(values, weights, *, nan: str = "skip") -> jnp.ndarray:
  """`sum_k w_k * values[:, k]` per sample: values [N,K], weights [K] -> [N] float32.

  (*Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach*;
  METHODS.md 4.3 `weighted_sum`.)
  nan="skip" (default; TRL's `nansum` over reward functions): a NaN component adds 0; the sum is
    NaN only when every component of the sample is NaN (TRL gives 0 there). Weights are not
    renormalised over the remaining components.
  nan="propagate": any NaN component makes the sample NaN.
  """
  if nan not in NAN_MODES:
    raise ValueError(f"weighted_sum: nan must be one of {NAN_MODES}, got {nan!r}.")
  v_NK = jnp.asarray(values, _f32)
  chex.assert_rank(v_NK, 2)
  w_K = jnp.asarray(weights, _f32)
  chex.assert_shape(w_K, (v_NK.shape[1],), custom_message="weights must be [K] for values [N,K]")
  if nan == "propagate":
    return jnp.sum(v_NK * w_K, axis=1)
  ok_NK = ~jnp.isnan(v_NK)
  s_N = jnp.sum(jnp.where(ok_NK, v_NK * w_K, 0.0), axis=1)
  return jnp.where(jnp.any(ok_NK, axis=1), s_N, jnp.nan)


@functools.partial(jax.jit, static_argnames=("ddof", "axis"))
def reward_whiten(r, valid=None, *, eps: float = 1e-8, ddof: int = 0, axis: int | None = None
                  ) -> jnp.ndarray:
  """NaN-aware z-score `(r - mu) / (sd + eps)` over the valid entries (METHODS.md 4.2
  `reward_whiten`, standard; the edge rules of `grpo_adv`).

  Valid = not NaN and `valid` (a bool mask broadcastable to r; None = all). `axis=None` whitens
  over the whole batch; `axis=-1` on r [B,G] whitens each group. sd uses `ddof` (0: population).
  With fewer than 2 valid entries the values are only centred; equal values give exactly 0 (mean
  taken relative to one valid entry). Invalid entries are returned unchanged (NaN stays NaN).
  """
  r = jnp.asarray(r, _f32)
  ok = ~jnp.isnan(r)
  if valid is not None:
    ok = ok & jnp.broadcast_to(jnp.asarray(valid, bool), r.shape)
  n = jnp.sum(ok, axis=axis, keepdims=True).astype(_f32)
  ref = jnp.max(jnp.where(ok, r, -jnp.inf), axis=axis, keepdims=True)
  ref = jnp.where(n > 0, ref, 0.0)
  shift = jnp.where(ok, r - ref, 0.0)
  mu = ref + jnp.sum(shift, axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
  d = jnp.where(ok, r - mu, 0.0)
  var = jnp.sum(d * d, axis=axis, keepdims=True) / jnp.maximum(n - ddof, 1.0)
  z = jnp.where(n >= 2, d / (jnp.sqrt(var) + eps), d)
  return jnp.where(ok, z, r)
