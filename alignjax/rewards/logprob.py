"""Training-free, log-prob-derived rewards (METHODS.md 7.1-7.8). See docs/rewards_logprob.md.

Two layers:

* Pure jittable kernels on token / sequence log-probs (float32, under `stop_gradient`,
  masked sums with `jnp.where` so padded entries never leak NaN/inf):
  `dpo_implicit`, `implicit_prm`, `cdr`, `cdr_pairs`, `flr`, `sar`, `igpo_info_gain` (+
  `p_from_logprobs`, `spread_turns`), `genrm_yes`, `listener` (the 7.6 / 7.8 ones are
  `jax.jit`-compiled, so eager calls cost one compile per shape, not one per op).
* Model-side scorers on NNX `Transformer`s that compute the log-probs they need with the
  chunked kernel (`alignjax.losses.logprobs.token_logprobs`, no [N,L,V] logits) on rows laid
  out exactly as the RL trainer lays them out (`alignjax.trainers.rl.sequences` +
  `completion_logprobs`): `sequence_logprobs_for`, `score_dpo_implicit`, `score_cdr`,
  `score_flr`, `score_sar`, `score_igpo_info_gain`, `score_genrm_yes` (+ `verdict_logits`),
  `score_listener`.
* Host-side text helper: `strip_answer` (7.8: remove the final answer / option labels from a
  chain of thought before the listener reads it).

Token lists are already tokenised (and templated) by the caller; prompts must be non-empty
(the first completion token is predicted from the last prompt token). `dpo_implicit`, `cdr`,
`flr` and `genrm_yes` are also `config.rl.rewards` entries (alignjax/rewards/logprob_rewards.py,
models loaded from local paths). The IGPO turn-level returns are not fed to the RL trainer's
advantages (it is single-turn; callers spread them over tokens with `spread_turns`).
"""

from __future__ import annotations

import functools
import re
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

__all__ = ["dpo_implicit", "implicit_prm", "cdr", "cdr_pairs", "flr", "sar", "igpo_info_gain",
           "p_from_logprobs", "spread_turns", "genrm_yes", "listener", "strip_answer",
           "sequence_logprobs_for", "verdict_logits", "score_dpo_implicit", "score_cdr",
           "score_flr", "score_sar", "score_igpo_info_gain", "score_genrm_yes",
           "score_listener"]


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


@functools.partial(jax.jit, static_argnames=("mode",))
def p_from_logprobs(lp_sum, n_tokens, *, mode: str = "mean"):
  """7.6 answer probability from a summed log-prob [B] over n_tokens [B] answer tokens:
  exp(lp_sum / n) ("mean": exp of the mean token log-prob, the default) or exp(lp_sum)
  ("sum": the sequence probability). n = 0 counts as 1 (so an empty answer gives exp(0) = 1)."""
  if mode not in ("mean", "sum"):
    raise ValueError(f"mode must be mean|sum, got {mode!r}")
  lp = _f(lp_sum)
  if mode == "mean":
    lp = lp / jnp.maximum(jnp.asarray(n_tokens, f32), 1.0)
  return jnp.exp(lp)


def _group_z(x, valid, group, eps):
  """Per column t: (x - mu) / (sd + eps) over the rows of the same group with valid[:, t]
  (sd ddof=1, two-pass and shifted by the members' largest value, so equal values give exactly
  0); 0 where fewer than 2 members are valid, and at invalid entries. x, valid [B,T]."""
  b = x.shape[0]
  g = jnp.zeros((b,), jnp.int32) if group is None else jnp.asarray(group)
  same = g[:, None] == g[None, :]                                        # [B,B]
  m = same[:, :, None] & valid[None, :, :]                               # [B(i),B(j),T]
  n = jnp.sum(m, axis=1)                                                 # [B,T]
  c = jnp.max(jnp.where(m, x[None], -jnp.inf), axis=1)
  c = jnp.where(n > 0, c, 0.0)
  d = jnp.where(m, x[None] - c[:, None], 0.0)
  mu = jnp.sum(d, axis=1) / jnp.maximum(n, 1)
  var = jnp.sum(jnp.where(m, jnp.square(d - mu[:, None]), 0.0), axis=1) / jnp.maximum(n - 1, 1)
  z = (x - c - mu) / (jnp.sqrt(var) + eps)
  return jnp.where(valid & (n >= 2), z, 0.0)


@functools.partial(jax.jit, static_argnames=("normalise",))
def igpo_info_gain(p, turn_mask, outcome, group=None, *, gamma: float = 1.0,
                   normalise: bool = True, eps: float = 1e-6):
  """7.6 IGPO information-gain turn rewards and returns.

  p [B,T+1]: P_0..P_T, the probability of the gold answer a* teacher-forced after the prefix
  x, h_1..h_t (P_0 from x alone; see `p_from_logprobs`). turn_mask [B,T]: valid turns. Turns
  are ragged but contiguous: a row's valid turns are its leading run of turn_mask > 0
  (anything after the first invalid turn is ignored); n_b = their count, the last valid turn
  is T_b = n_b. outcome [B]: the outcome reward of the trajectory. group [B] int: rows with
  equal ids form a group (None: the whole batch is one group).

  r_t = P_t - P_{t-1} for t < T_b, r_{T_b} = outcome_b (P_{T_b}.. and p past the valid turns
  are never read, so NaN there does not leak); G_t = sum_{k=t}^{T_b} gamma^(k-t) r_k. With
  `normalise`, G is z-scored per turn index within each group, over the group's rows that
  have that turn valid: (G - mu) / (sd + eps), sd with ddof=1 (as `grpo_adv`); fewer than 2
  such rows (a single-member group, or a turn only one row reached) gives 0, and equal values
  give exactly 0 (the group statistics use a [B,B,T] same-group mask). Returns
  (r [B,T], g [B,T]) with g = normalised G (or raw G), both 0 at invalid turns. Turn t is
  column t-1. Spread g over each turn's action tokens with `spread_turns`. Jitted
  (`normalise` static; gamma and eps traced).
  """
  p = _f(p)
  tm = jnp.asarray(turn_mask)
  t = tm.shape[-1]
  if p.shape[-1] != t + 1:
    raise ValueError(f"p must have T+1 = {t + 1} columns, got {p.shape}")
  valid = jnp.cumprod((tm > 0).astype(jnp.int32), axis=-1) > 0                  # [B,T]
  n = jnp.sum(valid, axis=-1, keepdims=True)
  col = jnp.arange(t)[None, :]
  gain = col < n - 1                                                            # t < T_b
  last = col == n - 1
  r = jnp.where(gain, p[:, 1:] - p[:, :-1], 0.0)
  r = jnp.where(last, _f(outcome)[:, None], r)

  def step(carry, r_t):
    g_t = r_t + gamma * carry
    return g_t, g_t

  _, g = jax.lax.scan(step, jnp.zeros(r.shape[:1], f32), r.T, reverse=True)
  g = jnp.where(valid, g.T, 0.0)
  if normalise:
    g = _group_z(g, valid, group, eps)
  return _sg(r), _sg(g)


@jax.jit
def spread_turns(values, token_turn):
  """values [B,T] per turn -> [B,L] per token: values[b, token_turn[b, l]], 0 where
  token_turn < 0 (not an action token: observation, prompt or padding) or >= T."""
  v = _f(values)
  tt = jnp.asarray(token_turn, jnp.int32)
  out = jnp.take_along_axis(v, jnp.clip(tt, 0, v.shape[-1] - 1), axis=-1)
  return jnp.where((tt >= 0) & (tt < v.shape[-1]), out, 0.0)


def genrm_yes(z_yes, z_no):
  """7.7 generative yes/no verdict: sigmoid(logsumexp(z_yes) - logsumexp(z_no)) [B]."""
  return jax.nn.sigmoid(jax.nn.logsumexp(_f(z_yes), axis=-1) - jax.nn.logsumexp(_f(z_no), axis=-1))


@jax.jit
def listener(lp_options, answer_index, r_format, r_acc, *, option_mask=None,
             lam: float = 0.5):
  """7.8 listener-shaped reward. lp_options [B,O]: log-prob of each option's tokens (summed)
  under the frozen listener given (x, cot with the answer stripped); option_mask [B,O]
  (None: all); an option is valid iff masked in and its lp is finite (-inf or NaN = absent).
  c = softmax over the valid options at answer_index [B] (the gold option), i.e.
  P_L(a*|x,cot) renormalised over the options; 0 when the gold option is invalid or out of
  range, or no option is valid. Returns (r [B], c [B]), r = r_format + r_acc + lam * c."""
  lp = _f(lp_options)
  valid = jnp.isfinite(lp)
  if option_mask is not None:
    valid = valid & (jnp.asarray(option_mask) > 0)
  z = jnp.where(valid, lp, -jnp.inf)
  mx = jnp.max(z, axis=-1, keepdims=True)
  e = jnp.where(valid, jnp.exp(z - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
  tot = jnp.sum(e, axis=-1)                                        # >= 1 if any valid
  a = jnp.asarray(answer_index, jnp.int32)
  ok = (a >= 0) & (a < lp.shape[-1])
  eg = jnp.take_along_axis(e, jnp.clip(a, 0, lp.shape[-1] - 1)[:, None], axis=-1)[:, 0]
  c = jnp.where(ok & (tot > 0), eg / jnp.where(tot > 0, tot, 1.0), 0.0)
  return _f(r_format) + _f(r_acc) + lam * c, _sg(c)


# ============================================================================= host text
STRIP_PATTERNS = (
    r"(?s)<answer>.*?</answer>",                                   # R1-style answer tags
    r"\\boxed\s*\{(?:[^{}]|\{[^{}]*\})*\}",                         # \boxed{..}, 1 nesting level
    r"(?i)\b(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*(?:is)?[ \t]*[:=].*",  # "answer: X.."
    r"\([ \t]*[A-Z][ \t]*\)",                                        # option labels "(A)"
    r"\b[Oo]ption[ \t]+[A-Z]\b",                                     # "Option A"
)


def strip_answer(cot: str, patterns: Sequence[str] = STRIP_PATTERNS) -> str:
  """7.8: remove the final answer and option labels from a chain of thought before the
  listener reads it. Each regex in `patterns` is deleted everywhere, in order (default
  `STRIP_PATTERNS`: `<answer>..</answer>`, `\\boxed{..}`, "[the] [final] answer: X" /
  "answer is: X" / "answer = X" up to the end of its line (any case), "(A)"-style labels,
  "Option A");
  then runs of spaces/tabs collapse to one and the ends are stripped. A simple, lossy
  filter: the listener must judge from the reasoning, not from a stated label."""
  for pat in patterns:
    cot = re.sub(pat, "", cot)
  cot = re.sub(r"[ \t]{2,}", " ", cot)
  cot = re.sub(r"[ \t]+\n", "\n", cot)
  return cot.strip()


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


def score_igpo_info_gain(model, prompts, turns: Sequence[Sequence[Sequence[int]]],
                         answers: Sequence[Sequence[int]], outcome, group=None, *, pad_id: int,
                         gamma: float = 1.0, normalise: bool = True, eps: float = 1e-6,
                         mode: str = "mean", answer_prefix: Sequence[int] = (), **kw):
  """7.6 on token lists. Row b: prompt x, its turns h_1..h_{n_b} (`turns[b]`, a list of token
  lists, ragged over rows; each turn holds its action and observation tokens) and gold
  answer a* (`answers[b]`, non-empty). P_t = p_from_logprobs(lp(a* | x + h_1..h_t +
  answer_prefix), mode) for t = 0..n_b: all prefixes of all rows in one batched call
  (`answer_prefix`, e.g. the tokens of "Answer:", is appended to every prefix and not scored).
  Returns (r [B,T], g [B,T], p [B,T+1]) of `igpo_info_gain` with T = max(1, max n_b); p is 0
  past a row's n_b + 1 prefixes. Left-truncating long prefixes is the caller's job."""
  n = len(prompts)
  if not (len(turns) == len(answers) == n):
    raise ValueError(f"{n} prompts, {len(turns)} turn lists, {len(answers)} answers")
  if any(len(a) == 0 for a in answers):
    raise ValueError("every gold answer needs at least one token")
  ctx, ans, rows, cols = [], [], [], []
  for b, (x, hs, a) in enumerate(zip(prompts, turns, answers)):
    acc = list(x)
    for t in range(len(hs) + 1):
      if t:
        acc = acc + list(hs[t - 1])
      ctx.append(acc + list(answer_prefix))
      ans.append(list(a))
      rows.append(b)
      cols.append(t)
  t_max = max(1, max(len(hs) for hs in turns))
  lp, m = _sum_lp(model, ctx, ans, pad_id, **kw)
  pf = p_from_logprobs(lp, jnp.sum(m, axis=-1), mode=mode)
  p = jnp.zeros((n, t_max + 1), f32).at[np.array(rows), np.array(cols)].set(pf)
  tm = (np.arange(t_max)[None, :] < np.array([len(hs) for hs in turns])[:, None])
  r, g = igpo_info_gain(p, tm.astype(np.float32), outcome, group, gamma=gamma,
                        normalise=normalise, eps=eps)
  return r, g, _sg(p)


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


def score_listener(model, prompts_with_cot, options: Sequence[Sequence[Sequence[int]]],
                   answer_index, r_format, r_acc, *, pad_id: int, lam: float = 0.5, **kw):
  """7.8 on token lists: prompts_with_cot[b] = the listener's templated prompt holding x and
  the chain of thought with its answer stripped (`strip_answer`; left-truncate the cot, never
  the options); options[b] = that row's option token lists (non-empty; ragged over rows, e.g.
  `[[id_A], [id_B]] * B`). lp of each option's tokens after the prompt (summed), all rows x
  options in one batched call, then `listener`. Returns (r [B], c [B])."""
  n = len(prompts_with_cot)
  if len(options) != n:
    raise ValueError(f"{n} prompts vs {len(options)} option lists")
  if any(len(o) == 0 for os_ in options for o in os_) or any(len(os_) == 0 for os_ in options):
    raise ValueError("every row needs at least one option, and every option a token")
  ctx, opts, rows, cols = [], [], [], []
  for b, (x, os_) in enumerate(zip(prompts_with_cot, options)):
    for j, o in enumerate(os_):
      ctx.append(list(x))
      opts.append(list(o))
      rows.append(b)
      cols.append(j)
  lp, _ = _sum_lp(model, ctx, opts, pad_id, **kw)
  k = max(len(os_) for os_ in options)
  idx = (np.array(rows), np.array(cols))
  lp_bo = jnp.full((n, k), -jnp.inf, f32).at[idx].set(lp)
  mask = np.zeros((n, k), np.float32)
  mask[idx] = 1.0
  return listener(lp_bo, answer_index, r_format, r_acc, option_mask=mask, lam=lam)
