"""Sample filters, length shaping and selection for RL (METHODS.md sections 3.5, 3.6, 5).

DAPO extras (dynamic sampling, overlong shaping, truncation masking), RAFT top-k selection
and online-DPO best/worst pairs. Everything except `raft_select` (host numpy) is pure `jnp`
and jittable, with options as plain Python values (static). Rewards are `r [B,G]` (B prompts
x G samples, flat index `b*G + g`); a non-finite reward (NaN = unscorable) is invalid: it is
never selected and stays out of every statistic. See `docs/rl_advantages.md`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

sg = jax.lax.stop_gradient

DYNAMIC_SAMPLING_MODES = ("std", "mean_band")


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


def _rewards(r, fn):
  r = jnp.asarray(r)
  _check(r.ndim == 2, f"{fn}: r must be [B,G] (B prompts x G samples), got shape {r.shape}.")
  r = r.astype(jnp.float64 if r.dtype == jnp.float64 else jnp.float32)
  return r, jnp.isfinite(r)


def _lengths(lengths):
  x = jnp.asarray(lengths)
  return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def dynamic_sampling_filter(r, *, mode="std", lo=0.0, hi=1.0, margin=1e-6,
                            keep_singletons=False):
  """DAPO dynamic sampling: keep_B = groups that carry a learning signal.

  mode "std" (DAPO, verl): keep a group only if sd(r_b) > 0 over its valid samples, i.e. its
  valid rewards are not all equal (fewer than 2 valid: dropped, or kept with
  `keep_singletons=True` as verl does for a single valid sample). mode "mean_band"
  (OpenRLHF `dynamic_filtering_reward_range`): keep groups whose valid mean lies in
  (lo + margin, hi - margin) (OpenRLHF's margin is 1e-6). A group without valid samples is
  dropped. Refill outside jit up to `max_num_gen_batches`; with static shapes pad with
  mask-0 groups. *DAPO: An Open-Source LLM Reinforcement Learning System at Scale*; method
  id `dynamic_sampling_filter`. Shapes: r [B,G] -> keep [B] bool.
  """
  _check(mode in DYNAMIC_SAMPLING_MODES, f"dynamic_sampling_filter: mode must be one of "
         f"{DYNAMIC_SAMPLING_MODES}, got {mode!r}.")
  r_BxG, valid_BxG = _rewards(r, "dynamic_sampling_filter")
  n_B = jnp.sum(valid_BxG, axis=1)
  if mode == "std":
    hi_B = jnp.max(jnp.where(valid_BxG, r_BxG, -jnp.inf), axis=1)
    lo_B = jnp.min(jnp.where(valid_BxG, r_BxG, jnp.inf), axis=1)
    keep_B = hi_B > lo_B  # implies n >= 2; exact for ties (no variance round-off)
    return keep_B | (n_B == 1) if keep_singletons else keep_B
  mean_B = jnp.sum(jnp.where(valid_BxG, r_BxG, 0.0), axis=1) / jnp.maximum(n_B, 1)
  return (n_B > 0) & (mean_B > lo + margin) & (mean_B < hi - margin)


def overlong_soft_penalty(lengths, *, max_len, cache_len):
  """DAPO soft overlong punishment (Eq. 13; TRL), added to the reward.

  0 if L <= Lmax - Lc; ((Lmax - Lc) - L) / Lc if Lmax - Lc < L <= Lmax; -1 if L > Lmax.
  Needs 0 < cache_len <= max_len. *DAPO: An Open-Source LLM Reinforcement Learning System at
  Scale*; method id `overlong_soft_penalty`. Shapes: lengths [N] -> penalty [N] (<= 0).
  """
  _check(0 < cache_len <= max_len, f"overlong_soft_penalty: need 0 < cache_len <= max_len, got "
         f"cache_len={cache_len}, max_len={max_len}.")
  l_N = _lengths(lengths)
  start = max_len - cache_len
  ramp_N = (start - l_N) / cache_len
  return jnp.where(l_N <= start, 0.0, jnp.where(l_N <= max_len, ramp_N, -1.0)).astype(l_N.dtype)


def overlong_buffer_penalty(lengths, *, max_len, buffer_len, factor=1.0):
  """verl's overlong buffer penalty: min(-(L - (Lmax - buf)) / buf * factor, 0).

  For L <= Lmax this is `factor` times `overlong_soft_penalty`; past Lmax it keeps falling
  (verl never sees L > Lmax). *DAPO: An Open-Source LLM Reinforcement Learning System at
  Scale*; method id `overlong_buffer_penalty`. Shapes: lengths [N] -> penalty [N] (<= 0).
  """
  _check(buffer_len > 0, f"overlong_buffer_penalty: buffer_len must be > 0, got {buffer_len}.")
  l_N = _lengths(lengths)
  return jnp.minimum(-(l_N - (max_len - buffer_len)) / buffer_len * factor, 0.0)


def truncation_mask(mask, has_eos):
  """Mask out completions that ended without EOS (TRL `mask_truncated_completions`).

  m_i = 0 for a completion without EOS; its reward stays in the group statistics (only the
  loss mask changes). *DAPO: An Open-Source LLM Reinforcement Learning System at Scale*;
  method id `truncation_mask`. Shapes: mask [N,T], has_eos [N] -> mask [N,T] (mask's dtype).
  """
  m_NxT = jnp.asarray(mask)
  eos_N = jnp.asarray(has_eos)
  _check(m_NxT.ndim == 2 and eos_N.shape == m_NxT.shape[:1],
         f"truncation_mask: need mask [N,T] and has_eos [N], got {m_NxT.shape} and "
         f"{eos_N.shape}.")
  return jnp.where(eos_N[:, None] != 0, m_NxT, jnp.zeros_like(m_NxT))


def _rank_in_group(r_BxG, valid_BxG):
  """Rank of each sample in its group by descending reward (ties: lower index first);
  invalid samples rank after all valid ones."""
  order_BxG = jnp.argsort(jnp.where(valid_BxG, -r_BxG, jnp.inf), axis=1, stable=True)
  return jnp.argsort(order_BxG, axis=1, stable=True)


def raft_weights(r, *, k=1, tau=None):
  """RAFT selection weights: w = 1 for the top-k valid rewards of each group, else 0.

  Ties go to the lower index; with `tau`, only selected samples with r >= tau keep w = 1.
  Loss: -sum w sum_t m logp / max(sum w L, 1). *RAFT: Reward rAnked FineTuning for
  Generative Foundation Model Alignment*; method id `raft_weights`.
  Shapes: r [B,G] -> w [B*G] (0/1 float, no gradient).
  """
  _check(k >= 1, f"raft_weights: k must be >= 1, got {k}.")
  r_BxG, valid_BxG = _rewards(r, "raft_weights")
  keep_BxG = valid_BxG & (_rank_in_group(r_BxG, valid_BxG) < k)
  if tau is not None:
    keep_BxG = keep_BxG & (r_BxG >= tau)
  return sg(keep_BxG.astype(r_BxG.dtype).reshape(-1))


def raft_select(r, *, k=1, tau=None, has_eos=None, skip_ties=False) -> np.ndarray:
  """RAFT selection on the host: flat indices (b*G + g, ascending) of the samples to SFT on.

  Top-k valid rewards per group (ties to the lower index), optionally only r >= tau.
  Samples without EOS (`has_eos [B*G]` False) are dropped before ranking. A group whose
  candidates all tie keeps its first k (index 0 for k=1), or none with `skip_ties=True`.
  *RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment*; method id
  `raft_select`. Shapes: r [B,G] -> int64 [S].
  """
  _check(k >= 1, f"raft_select: k must be >= 1, got {k}.")
  r_BxG = np.asarray(r, np.float64)
  _check(r_BxG.ndim == 2, f"raft_select: r must be [B,G], got shape {r_BxG.shape}.")
  b, g = r_BxG.shape
  valid_BxG = np.isfinite(r_BxG)
  if has_eos is not None:
    eos = np.asarray(has_eos).astype(bool)
    _check(eos.shape == (b * g,), f"raft_select: has_eos must be [B*G={b * g}], got {eos.shape}.")
    valid_BxG &= eos.reshape(b, g)
  out = []
  for i in range(b):
    cand = np.flatnonzero(valid_BxG[i])
    if cand.size == 0:
      continue
    vals = r_BxG[i, cand]
    if skip_ties and cand.size > 1 and np.all(vals == vals[0]):
      continue
    top = cand[np.argsort(-vals, kind="stable")[:k]]
    if tau is not None:
      top = top[r_BxG[i, top] >= tau]
    out.extend(i * g + top)
  return np.sort(np.asarray(out, np.int64))


def online_dpo_pairs(r, *, min_gap=0.0):
  """Best-vs-worst pair per group for online iterative DPO.

  chosen = argmax, rejected = argmin of the group's valid rewards (ties to the lower
  index); a group is invalid if it has < 2 valid samples or max - min <= min_gap (so
  max == min is always invalid). Indices are within the group, g in [0, G) (the flat sample
  index is b*G + g); an invalid group's indices are 0. *RLHF Workflow: From Reward Modeling
  to Online RLHF*; method id `online_dpo_pairs`.
  Shapes: r [B,G] -> (chosen_idx [B] int32, rejected_idx [B] int32, valid [B] bool).
  """
  r_BxG, valid_BxG = _rewards(r, "online_dpo_pairs")
  best_B = jnp.argmax(jnp.where(valid_BxG, r_BxG, -jnp.inf), axis=1)
  worst_B = jnp.argmin(jnp.where(valid_BxG, r_BxG, jnp.inf), axis=1)
  take = lambda idx_B: jnp.take_along_axis(r_BxG, idx_B[:, None], axis=1)[:, 0]
  gap_B = take(best_B) - take(worst_B)
  ok_B = (jnp.sum(valid_BxG, axis=1) >= 2) & (gap_B > min_gap)
  chosen_B = jnp.where(ok_B, best_B, 0).astype(jnp.int32)
  rejected_B = jnp.where(ok_B, worst_B, 0).astype(jnp.int32)
  return chosen_B, rejected_B, ok_B
