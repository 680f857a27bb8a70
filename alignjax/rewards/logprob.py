"""Training-free, log-prob-derived rewards (METHODS.md 7.1-7.5, 7.7). See docs/rewards_logprob.md.

Two layers:

* Pure jittable kernels on token / sequence log-probs (float32, under `stop_gradient`,
  masked sums with `jnp.where` so padded entries never leak NaN/inf):
  `dpo_implicit`, `implicit_prm`, `cdr`, `cdr_pairs`, `flr`, `sar`, `genrm_yes`.
* Model-side scorers on NNX `Transformer`s that compute the log-probs they need with the
  chunked kernel (`alignjax.losses.logprobs.token_logprobs`, no [N,L,V] logits) on rows laid
  out exactly as the RL trainer lays them out (`alignjax.trainers.rl.sequences` +
  `completion_logprobs`): `sequence_logprobs_for`, `score_dpo_implicit`, `score_cdr`,
  `score_flr`, `score_sar`, `score_genrm_yes` (+ `verdict_logits`).

Token lists are already tokenised (and templated) by the caller; prompts must be non-empty
(the first completion token is predicted from the last prompt token). Not yet wired as
reward functions in `config.rl.rewards`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.losses.logprobs import DEFAULT_VOCAB_CHUNK
from alignjax.sampling.sampler import GEN_BUCKETS, bucket
from alignjax.trainers.rl import completion_logprobs, sequences

f32 = jnp.float32
_sg = jax.lax.stop_gradient

__all__ = ["dpo_implicit", "implicit_prm", "cdr", "cdr_pairs", "flr", "sar", "genrm_yes",
           "sequence_logprobs_for", "verdict_logits", "score_dpo_implicit", "score_cdr",
           "score_flr", "score_sar", "score_genrm_yes"]


def _f(x):
  return _sg(jnp.asarray(x, f32))


def _masked(x, mask):
  return jnp.where(jnp.asarray(mask) > 0, x, 0.0)


# ============================================================================= kernels
def dpo_implicit(lp_pi, lp_ref, mask, *, beta: float = 0.1, per_token: bool = False):
  """7.1 DPO implicit reward: beta * sum_t mask_t [lp_pi_t - lp_ref_t] -> [B]
  (per_token: the masked terms [B,T]). Off by beta*log Z(x): compare within a prompt."""
  d = _masked(beta * (_f(lp_pi) - _f(lp_ref)), mask)
  return d if per_token else jnp.sum(d, axis=-1)


def implicit_prm(lp_pi, lp_ref, mask, step_end, *, beta: float = 0.05, reduce: str = "min"):
  """7.2 implicit PRM. q_t = beta * sum_{i<=t} mask_i [lp_pi_i - lp_ref_i] [B,T].

  step_end [B,S] int: token index e_s of each step's last token (< 0 = padding; indices past
  T-1 are clipped to T-1; valid steps are expected in increasing order). Step reward
  r_s = q_{e_s} - q_{e_prev} (e_prev = the previous *valid* step, q = 0 before the first);
  padded steps get 0. Returns (r [B,S], q_T [B], score [B]) with score = reduce(min | sum |
  last | mean) over the valid steps; a row with no valid step is one step ending at the end
  (score = q_T).
  """
  if reduce not in ("min", "sum", "last", "mean"):
    raise ValueError(f"reduce must be min|sum|last|mean, got {reduce!r}")
  q = jnp.cumsum(_masked(beta * (_f(lp_pi) - _f(lp_ref)), mask), axis=-1)       # [B,T]
  t = q.shape[-1]
  e = jnp.asarray(step_end, jnp.int32)
  valid = e >= 0
  qe = jnp.take_along_axis(q, jnp.clip(e, 0, t - 1), axis=-1)                      # [B,S]
  s = e.shape[-1]
  idx = jnp.where(valid, jnp.arange(s, dtype=jnp.int32)[None, :], -1)
  last = jax.lax.cummax(idx, axis=1)                                               # last valid <= s
  prev = jnp.concatenate([jnp.full_like(last[:, :1], -1), last[:, :-1]], axis=1)
  q_prev = jnp.where(prev >= 0, jnp.take_along_axis(qe, jnp.maximum(prev, 0), axis=-1), 0.0)
  r = jnp.where(valid, qe - q_prev, 0.0)
  q_t = q[:, -1]
  n = jnp.sum(valid, axis=-1)
  if reduce == "min":
    sc = jnp.min(jnp.where(valid, r, jnp.inf), axis=-1)
  elif reduce == "sum":
    sc = jnp.sum(r, axis=-1)
  elif reduce == "mean":
    sc = jnp.sum(r, axis=-1) / jnp.maximum(n, 1)
  else:
    sc = jnp.take_along_axis(r, jnp.maximum(last[:, -1:], 0), axis=-1)[:, 0]
  sc = jnp.where(n > 0, sc, q_t)
  return r, q_t, sc


def cdr(lp_strong_sum, lp_weak_sum):
  """7.3 CDR density ratio: lp(y | c+x; strong) - lp(y | c+x; weak) [B]."""
  return _f(lp_strong_sum) - _f(lp_weak_sum)


def cdr_pairs(r, *, delta: float = 0.0):
  """7.3 pair mining over K samples per prompt, r [B,K]: (chosen [B] = argmax, rejected [B] =
  argmin, margin [B], valid [B] bool). Ties -> lowest index; NaN never chosen nor rejected;
  valid iff margin >= delta, finite and chosen != rejected."""
  r = _f(r)
  nan = jnp.isnan(r)
  hi = jnp.argmax(jnp.where(nan, -jnp.inf, r), axis=-1)
  lo = jnp.argmin(jnp.where(nan, jnp.inf, r), axis=-1)
  margin = (jnp.take_along_axis(r, hi[:, None], -1) - jnp.take_along_axis(r, lo[:, None], -1))[:, 0]
  valid = jnp.isfinite(margin) & (margin >= delta) & (hi != lo)
  return hi, lo, margin, valid


def flr(lp_pos, lp_neg):
  """7.4 follow-up likelihood reward: mean_F+ lp(f|x,y) - mean_F- lp(f|x,y) [B]; inputs are
  summed log-probs of each follow-up, [B,F+] and [B,F-]."""
  return jnp.mean(_f(lp_pos), axis=-1) - jnp.mean(_f(lp_neg), axis=-1)


def sar(mlp_q, mlp_0, lengths, *, min_tokens: int = 4):
  """7.5 self-aligned reward: clip(1 - exp(m_0 - m_q), -1, 1) [B] with m_q / m_0 the mean
  completion log-prob given the question / an empty user turn; 0 when lengths < min_tokens."""
  v = jnp.clip(1.0 - jnp.exp(_f(mlp_0) - _f(mlp_q)), -1.0, 1.0)
  return jnp.where(jnp.asarray(lengths) >= min_tokens, v, 0.0)


def genrm_yes(z_yes, z_no):
  """7.7 generative yes/no verdict: sigmoid(logsumexp(z_yes) - logsumexp(z_no)) [B]."""
  return jax.nn.sigmoid(jax.nn.logsumexp(_f(z_yes), axis=-1) - jax.nn.logsumexp(_f(z_no), axis=-1))


# ======================================================================= model side
@functools.partial(nnx.jit, static_argnames=("chunk_size", "vocab_chunk_size"))
def _completion_lp(model, batch, temperature, *, chunk_size, vocab_chunk_size):
  lp = completion_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size,
                           vocab_chunk_size=vocab_chunk_size)
  return _sg(jnp.where(batch["mask"] > 0, lp, 0.0))


def _check_prompts(prompts):
  if not prompts:
    raise ValueError("no rows to score")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (the first completion token is "
                     "predicted from the last prompt token)")


def _row_bucket(n: int) -> int:
  return bucket(n, GEN_BUCKETS)


def _completion_array(completions, pad_id):
  lengths = np.array([len(c) for c in completions], np.int32)
  t = bucket(max(1, int(lengths.max())), GEN_BUCKETS)
  arr = np.full((len(completions), t), pad_id, np.int32)
  for i, c in enumerate(completions):
    arr[i, :len(c)] = c
  return arr, lengths


def sequence_logprobs_for(model, prompts: Sequence[Sequence[int]],
                          completions: Sequence[Sequence[int]], *, pad_id: int,
                          chunk_size: int = 1024, temperature: float = 1.0,
                          vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK):
  """Token log-probs lp(y_t | x, y_<t) [N,T] float32 (0 off the mask) and mask [N,T] float32,
  T = the completion length bucket. Rows: left-padded prompt + completion as in the RL
  trainer; log-probs from the chunked kernel (jitted; rows, prompt and completion lengths
  are bucketed, so shapes and compiles repeat)."""
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts vs {len(completions)} completions")
  _check_prompts(prompts)
  n = len(prompts)
  extra = _row_bucket(n) - n  # filler rows ([pad] prompt, empty completion): fewer compiles
  toks, lengths = _completion_array(list(completions) + [[]] * extra, pad_id)
  arr = sequences([list(p) for p in prompts] + [[pad_id]] * extra, toks, lengths, pad_id)
  batch = {k: jnp.asarray(v) for k, v in arr.items()}
  lp = _completion_lp(model, batch, jnp.asarray(temperature, f32), chunk_size=chunk_size,
                      vocab_chunk_size=vocab_chunk_size)
  return lp[:n], batch["mask"][:n]


def _sum_lp(model, prompts, completions, pad_id, **kw):
  lp, m = sequence_logprobs_for(model, prompts, completions, pad_id=pad_id, **kw)
  return jnp.sum(lp, axis=-1), m


def score_dpo_implicit(policy, ref, prompts, completions, *, pad_id: int, beta: float = 0.1,
                       per_token: bool = False, **kw):
  """7.1 on (prompt, completion) token lists: beta * [lp(y|x; policy) - lp(y|x; ref)] [N]."""
  lp_pi, m = sequence_logprobs_for(policy, prompts, completions, pad_id=pad_id, **kw)
  lp_ref, _ = sequence_logprobs_for(ref, prompts, completions, pad_id=pad_id, **kw)
  return dpo_implicit(lp_pi, lp_ref, m, beta=beta, per_token=per_token)


def score_cdr(strong, weak, prompts, completions, *, pad_id: int,
              prefix: Sequence[int] = (), **kw):
  """7.3 on token lists: lp(y | c+x; strong) - lp(y | c+x; weak) [N], c = `prefix`."""
  px = [list(prefix) + list(p) for p in prompts]
  s, _ = _sum_lp(strong, px, completions, pad_id, **kw)
  w, _ = _sum_lp(weak, px, completions, pad_id, **kw)
  return cdr(s, w)


def score_flr(model, prompts, responses, pos_followups: Sequence[Sequence[int]],
              neg_followups: Sequence[Sequence[int]], *, pad_id: int, **kw):
  """7.4 on token lists: follow-up f appended after prompt + response; lp(f | x, y) summed
  over f's tokens; mean over positive minus mean over negative follow-ups [N]."""
  if not pos_followups or not neg_followups:
    raise ValueError("need at least one positive and one negative follow-up")
  fs = [list(f) for f in list(pos_followups) + list(neg_followups)]
  ctx = [list(x) + list(y) for x, y in zip(prompts, responses)]
  n, k = len(ctx), len(fs)
  lp, _ = _sum_lp(model, [c for c in ctx for _ in range(k)], fs * n, pad_id, **kw)
  lp = lp.reshape(n, k)
  return flr(lp[:, :len(pos_followups)], lp[:, len(pos_followups):])


def score_sar(policy, prompts, completions, empty_prompt: Sequence[int], *, pad_id: int,
              min_tokens: int = 4, **kw):
  """7.5 on token lists: mean lp of the completion given its prompt (m_q) vs given
  `empty_prompt` (m_0, e.g. the chat template with an empty user turn) [N]."""
  n = len(prompts)
  both = [list(p) for p in prompts] + [list(empty_prompt)] * n
  s, m = _sum_lp(policy, both, list(completions) * 2, pad_id, **kw)
  cnt = jnp.sum(m, axis=-1)
  mean = s / jnp.maximum(cnt, 1.0)
  return sar(mean[:n], mean[n:], cnt[:n], min_tokens=min_tokens)


@nnx.jit
def _last_hidden(model, tokens, positions, segment_ids):
  return _sg(model.hidden(tokens, positions, segment_ids)[:, -1])


def verdict_logits(model, judge_prompts, ids: Sequence[int], *, pad_id: int,
                   temperature: float = 1.0):
  """Next-token logits at the end of each (left-padded) judge prompt, restricted to the
  vocabulary ids `ids` [N, len(ids)] float32 (only those columns of the head are used)."""
  _check_prompts(judge_prompts)
  n = len(judge_prompts)
  rows = [list(p) for p in judge_prompts] + [[pad_id]] * (_row_bucket(n) - n)
  arr = sequences(rows, np.full((len(rows), 1), pad_id), np.zeros(len(rows), np.int32), pad_id)
  p = arr["tokens"].shape[1] - 1
  h = _last_hidden(model, *(jnp.asarray(arr[k][:, :p])
                            for k in ("tokens", "positions", "segment_ids")))[:n]
  w = model.unembedding()[:, jnp.asarray(list(ids), jnp.int32)]
  return _sg(jnp.einsum("nd,dk->nk", h, w, preferred_element_type=f32) / temperature)


def score_genrm_yes(model, judge_prompts, yes_ids: Sequence[int], no_ids: Sequence[int], *,
                    pad_id: int, temperature: float = 1.0):
  """7.7 on token lists: sigmoid(lse z[yes_ids] - lse z[no_ids]) of the verdict token [N]."""
  yes_ids, no_ids = list(yes_ids), list(no_ids)
  if not yes_ids or not no_ids or set(yes_ids) & set(no_ids):
    raise ValueError(f"yes_ids {yes_ids} and no_ids {no_ids} must be non-empty and disjoint")
  z = verdict_logits(model, judge_prompts, yes_ids + no_ids, pad_id=pad_id,
                     temperature=temperature)
  return genrm_yes(z[:, :len(yes_ids)], z[:, len(yes_ids):])
