"""Test-time methods: best-of-N with reward-model ensembles, weighted voting, dataset reset.

METHODS.md 8.1 `tt.best_of_n`, 8.2 `tt.weighted_vote` and 8.7 `sampler.dataset_reset`; see
docs/testtime.md. `best_of_n`, `softmax_weights` and `certainty_weights` are pure jnp functions
(jit-compiled, usable inside a caller's jit); `weighted_vote` and `dataset_reset_prompts` are
host functions over Python lists; `best_of_n_generate` drives an alignjax `Sampler`.

Shapes: B prompts, N samples per prompt, E reward-model ensemble members, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.rewards import math as math_reward
from alignjax.rewards.combine import reward_whiten
from alignjax.sampling.sampler import Sampler, SamplingConfig, Samples

_f32 = jnp.float32
AGGREGATES = ("mean", "median", "min", "mean_minus_std")


# ---------------------------------------------------------------------------- 8.1 best_of_n

@functools.partial(jax.jit, static_argnames=("aggregate", "zscore"))
def best_of_n(R, *, aggregate: str = "mean", lam: float = 1.0, zscore: bool = False
              ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Best-of-N selection under a reward-model ensemble: `i* = argmax_n A(R[:, b, n])`.

  (*Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking*;
  METHODS.md 8.1 `tt.best_of_n`. Ensembles mitigate, not remove, hacking: `abstract`; the
  aggregators: `recalled - verify`; the per-member z-score: `proposed`.)

  R: [E,B,N] rewards of N candidates for B prompts from E members, or [B,N] (E = 1).
  aggregate over E: "mean"; "median"; "min" (worst case); "mean_minus_std" = mean - lam*std
    (population std, ddof 0; 0 for E = 1). `lam` is traced (default 1).
  zscore: first whiten each member's scores over the N candidates of each prompt (NaN-aware, as
    `rewards.combine.reward_whiten(axis=-1)`), so members on different scales weigh equally.
  NaN: a candidate with any NaN member score (or whose aggregate is NaN, e.g. inf - inf) scores
    -inf. Ties, including an all -inf row, go to the lowest index.
  Returns (index [B] int32, score [B,N] float32 aggregate with -inf for unscorable).
  """
  if aggregate not in AGGREGATES:
    raise ValueError(f"best_of_n: aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
  R = jnp.asarray(R, _f32)
  if R.ndim == 2:
    R = R[None]
  chex.assert_rank(R, 3)
  if zscore:
    R = reward_whiten(R, axis=-1)
  if aggregate == "mean":
    A = jnp.mean(R, axis=0)
  elif aggregate == "median":
    A = jnp.median(R, axis=0)
  elif aggregate == "min":
    A = jnp.min(R, axis=0)
  else:
    A = jnp.mean(R, axis=0) - lam * jnp.std(R, axis=0)
  # min/median/mean propagate NaN in jnp; make it explicit for every aggregator.
  A = jnp.where(jnp.any(jnp.isnan(R), axis=0) | jnp.isnan(A), -jnp.inf, A)
  return jnp.argmax(A, axis=-1).astype(jnp.int32), A


# ---------------------------------------------------------------------------- 8.2 weighted_vote

@jax.jit
def softmax_weights(scores, temp: float = 1.0) -> jnp.ndarray:
  """Vote weights `softmax_n(scores / temp)` per prompt: scores [B,N] (e.g. reward-model
  scores) -> [B,N] float32 (METHODS.md 8.2 `tt.weighted_vote`, w = softmax(RM/temp); standard).
  NaN scores get weight 0; a row of all NaN gets all 0. temp > 0 (small: close to best-of-N,
  large: close to majority)."""
  s = jnp.asarray(scores, _f32) / temp
  ok = ~jnp.isnan(s)
  m = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  return jnp.where(z > 0, e / jnp.where(z > 0, z, 1.0), 0.0)


@jax.jit
def certainty_weights(top1_logp, top2_logp, mask) -> jnp.ndarray:
  """Path certainty `mean_t (p_top1 - p_top2)` over the answer tokens: [B,N,T] -> [B,N].

  (*Look, Compare, Decide: Alleviating Hallucination in Large Vision-Language Models via
  Multi-View Multi-Path Reasoning*; METHODS.md 8.2 `tt.weighted_vote`. Certainty per answer:
  `abstract`; this form: `recalled - verify`.)
  top1_logp, top2_logp: log-probs of the two most likely tokens at each position (e.g.
  `jax.lax.top_k(log_softmax(logits), 2)`); mask: 1 on the answer tokens. A path with no answer
  tokens gets NaN, which `weighted_vote` drops.
  """
  m = jnp.asarray(mask, _f32)
  gap = jnp.exp(jnp.asarray(top1_logp, _f32)) - jnp.exp(jnp.asarray(top2_logp, _f32))
  n = jnp.sum(m, axis=-1)
  s = jnp.sum(jnp.where(m > 0, gap, 0.0) * m, axis=-1)
  return jnp.where(n > 0, s / jnp.where(n > 0, n, 1.0), jnp.nan)


def weighted_vote(answers: Sequence[Sequence[str | None]], weights=None, *,
                  normalize: Callable[[str], str] = math_reward.normalize,
                  match: Callable[[str, str], bool] | None = math_reward.answers_match,
                  ) -> tuple[list[str | None], list[dict[str, float]]]:
  """Weighted (or majority) vote over N reasoning paths per prompt: `argmax_a sum_i w_i*1[a_i = a]`.

  (Standard: self-consistency / maj@N; METHODS.md 8.2 `tt.weighted_vote`.)
  answers: B lists of N extracted answers (e.g. `rewards.math.extract_answer(text)`); None means
    unparseable. Lists may differ in length.
  weights: None (every path 1: majority vote) or [B,N] (e.g. `softmax_weights(rm / temp)`,
    `certainty_weights(...)`, PRM min-step scores). Paths with a NaN weight are dropped.
  Equality: an answer joins the first earlier cluster whose representative (its first-seen raw
    answer) it matches under `match(answer, representative)` -- by default
    `rewards.math.answers_match`, so "1/2", "0.5" and "\\frac{1}{2}" are one answer. With
    `match=None`, answers are equal when `normalize(a) == normalize(b)` (exact strings:
    `normalize=lambda s: s`). A path whose normalised answer is empty is dropped.
  Returns (winner per prompt, scores per prompt as {representative: total weight}, in first-seen
    order). The winner is a cluster's representative; ties go to the answer seen first. When every
    path drops, the winner is the first sample's answer as given (possibly None) and scores is {}.
  """
  B = len(answers)
  if weights is not None:
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or w.shape[0] != B:
      raise ValueError(f"weighted_vote: weights must be [B,N] with B = {B}, got {w.shape}.")
  winners, scores = [], []
  for b, row in enumerate(answers):
    if weights is not None and w.shape[1] < len(row):
      raise ValueError(f"weighted_vote: prompt {b} has {len(row)} answers but weights has "
                       f"{w.shape[1]} columns.")
    reps: list[str] = []      # first-seen raw answer of each cluster
    keys: list[str] = []      # its normalised form
    tot: list[float] = []
    for i, a in enumerate(row):
      wi = 1.0 if weights is None else float(w[b, i])
      if a is None or np.isnan(wi):
        continue
      key = normalize(a)
      if not key:
        continue
      for c, (rep, k) in enumerate(zip(reps, keys)):
        if (k == key) if match is None else (k == key or match(a, rep)):
          tot[c] += wi
          break
      else:
        reps.append(a)
        keys.append(key)
        tot.append(wi)
    if not reps:
      winners.append(row[0] if len(row) else None)
      scores.append({})
      continue
    best = 0
    for c in range(1, len(tot)):
      if tot[c] > tot[best]:
        best = c
    winners.append(reps[best])
    scores.append(dict(zip(reps, tot)))
  return winners, scores


# ---------------------------------------------------------------------------- 8.7 dataset reset

def dataset_reset_prompts(prompt_ids: Sequence[Sequence[int]],
                          preferred_ids: Sequence[Sequence[int]], *, p_reset: float = 0.5,
                          rng: np.random.Generator
                          ) -> tuple[list[list[int]], list[int], list[tuple[int, int]]]:
  """Dataset-reset start states: with probability p_reset start generation at `x + y_w[:h]`.

  (*Dataset Reset Policy Optimization for RLHF*; METHODS.md 8.7 `sampler.dataset_reset`. Reset
  to offline states: `abstract`; p_reset = 0.5 and h ~ Uniform{0..|y_w|-1}: `proposed`.)
  prompt_ids[i] = x_i, preferred_ids[i] = y_w,i (the preferred offline response). Per prompt one
  Bernoulli(p_reset) draw; on reset one `h = rng.integers(0, len(y_w))`. An empty y_w never resets
  (its Bernoulli draw is still made, so the stream does not depend on lengths of other rows).
  Returns (start_ids, reset_len, group_key): reset_len[i] = h, or -1 for no reset;
  group_key[i] = (i, h). Group baselines (GRPO / RLOO groups) must group completions by identical
  (x, h): draw once per prompt, then sample the group's n completions from the same start
  (`SamplingConfig.n`). h = 0 starts at x itself, the same state as no reset; its key (i, 0)
  still differs from (i, -1), which is conservative. The reward model scores
  `y_w[:h] + completion` after x; loss, KL and entropy use the generated tokens only.
  """
  if not 0.0 <= p_reset <= 1.0:
    raise ValueError(f"dataset_reset_prompts: p_reset must be in [0, 1], got {p_reset}.")
  if len(prompt_ids) != len(preferred_ids):
    raise ValueError(f"dataset_reset_prompts: {len(prompt_ids)} prompts but "
                     f"{len(preferred_ids)} preferred responses.")
  starts, hs, keys = [], [], []
  for i, (x, y) in enumerate(zip(prompt_ids, preferred_ids)):
    reset = rng.random() < p_reset
    h = int(rng.integers(0, len(y))) if reset and len(y) else -1
    starts.append(list(x) + (list(y[:h]) if h > 0 else []))
    hs.append(h)
    keys.append((i, h))
  return starts, hs, keys


# ---------------------------------------------------------------------------- generation

@dataclasses.dataclass
class BestOfN:
  """Result of `best_of_n_generate`: completions [B] chosen token lists; index [B]; score [B,N]
  aggregate (-inf: unscorable); rewards [E,B,N] as returned by score_fn; samples: all B*N."""
  completions: list[list[int]]
  index: np.ndarray
  score: np.ndarray
  rewards: np.ndarray
  samples: Samples


def best_of_n_generate(sampler: Sampler, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                       score_fn: Callable[[list[int], list[list[int]]], np.ndarray], *, n: int,
                       aggregate: str = "mean", lam: float = 1.0, zscore: bool = False,
                       processor=None) -> BestOfN:
  """Samples n completions per prompt (`cfg` with n overridden) and keeps the best under
  `best_of_n` (METHODS.md 8.1 `tt.best_of_n`).

  score_fn(prompt_index, completions): flat lists of the B*N rows (prompt-major, as in `Samples`)
  -> rewards [E,B,N] or [B,N] (also accepted: [E,B*N] or [B*N]); NaN = unscorable.
  """
  cfg = dataclasses.replace(cfg, n=n)
  samples = sampler.generate(prompts, cfg, processor)
  comps = samples.completions()
  B = len(prompts)
  R = np.asarray(score_fn(samples.prompt_index.tolist(), comps), np.float32)
  if R.ndim in (1, 2) and R.shape[-1] == B * n and R.shape != (B, n):
    R = R.reshape(R.shape[:-1] + (B, n))
  if R.ndim == 2:
    R = R[None]
  if R.ndim != 3 or R.shape[1:] != (B, n):
    raise ValueError(f"best_of_n_generate: score_fn must return [E,{B},{n}] or [{B},{n}], "
                     f"got {R.shape}.")
  idx, score = best_of_n(R, aggregate=aggregate, lam=lam, zscore=zscore)
  idx = np.asarray(idx)
  chosen = [comps[b * n + int(idx[b])] for b in range(B)]
  return BestOfN(completions=chosen, index=idx, score=np.asarray(score), rewards=R,
                 samples=samples)
