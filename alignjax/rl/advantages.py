"""Advantage estimators for policy-gradient training (METHODS.md section 3.1).

Contract (see `docs/rl_advantages.md`):
- pure and jittable. The positional parameter names are inputs from the vocabulary `INPUTS`,
  which the RL trainer computes and passes by keyword (`required_inputs(fn)`).
  Hyper-parameters are keyword-only plain Python values (static under jit);
- `r [B,G]`: B prompts x G samples, flat index `i = b*G + g`, `N = B*G`. A non-finite reward
  (NaN = unscorable) marks the sample invalid: it gets A = 0 and is left out of every
  statistic;
- each estimator returns `A` wrapped in `stop_gradient`: [N] for sequence-level estimators
  (used as `A[:, None]`), [N,T] for token-level ones (`is_token_level(fn)`; zero outside the
  mask). float32, or float64 when the inputs are float64 (under `jax.enable_x64`);
- statistics are two-pass, with masked sums written `where(valid, x, 0)`, so NaN never leaks.
  Group deviations are taken relative to the group's largest reward, so equal rewards give
  exactly A = 0 and rewards of 1e6 stay accurate;
- edge rules (METHODS section 3 conventions): a group with fewer than 2 valid samples gives
  A = 0 (TRL); `singleton="raw"` gives verl's mean 0 / std 1 instead (A = r). Whitening over
  fewer than 2 elements only centres.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient

INPUTS = {
    "r": "[B,G] scalar reward per sample (non-finite = unscorable); flat index b*G+g",
    "mask": "[B*G,T] completion-token mask (float or bool)",
    "lengths": "[B*G] completion lengths (float)",
    "kl": "[B*G,T] per-token old - ref log-prob difference (KL in reward)",
    "values": "[B*G,T] value-model predictions",
    "token_rewards": "[B*G,T] per-token rewards: the scalar reward on the last valid token, "
                     "minus any per-token KL penalty",
    "baseline": "[B] reward of one greedy rollout per prompt (ReMax)",
    "r_multi": "[B,G,K] rewards of K reward functions per sample (non-finite = missing)",
}

ESTIMATORS: dict[str, Callable] = {}
SINGLETON_RULES = ("zero", "raw")
WHITEN_STYLES = ("verl", "openrlhf")
GPG_ALPHA_MODES = ("verl", "paper")
WHITEN_EPS = 1e-8  # verl's masked_whiten and OpenRLHF's variance floor


# ---------------------------------------------------------------------------- registry


def required_inputs(fn) -> tuple[str, ...]:
  """Names of `fn`'s positional parameters: the inputs the trainer must pass (see INPUTS).

  `fn` is an estimator or its registered name.
  """
  fn = get(fn) if isinstance(fn, str) else fn
  return tuple(p.name for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


def register(name: str, *, token_level: bool = False):
  """Decorator: registers `fn` in ESTIMATORS under `name`; returns `fn` unchanged.

  `token_level=True` marks estimators returning A [N,T] (`is_token_level`). Every
  positional parameter must be a name from INPUTS.
  """

  def wrap(fn):
    if name in ESTIMATORS and ESTIMATORS[name] is not fn:
      raise ValueError(f"Advantage estimator {name!r} is already registered (by "
                       f"{ESTIMATORS[name].__module__}.{ESTIMATORS[name].__qualname__}).")
    unknown = [n for n in required_inputs(fn) if n not in INPUTS]
    if unknown:
      raise ValueError(f"Advantage estimator {name!r}: positional parameters {unknown} are not "
                       f"in INPUTS ({', '.join(INPUTS)}); make hyper-parameters keyword-only.")
    fn.token_level = token_level
    ESTIMATORS[name] = fn
    return fn

  return wrap


def names() -> list[str]:
  """Sorted registered estimator names."""
  return sorted(ESTIMATORS)


def get(name: str) -> Callable:
  """The estimator registered under `name`; ValueError listing the registered names if none."""
  if name not in ESTIMATORS:
    raise ValueError(f"Unknown advantage estimator {name!r}. Registered estimators: "
                     f"{', '.join(names())}.")
  return ESTIMATORS[name]


def is_token_level(fn) -> bool:
  """True if the estimator (or its name) returns A [N,T] rather than [N]."""
  fn = get(fn) if isinstance(fn, str) else fn
  return bool(getattr(fn, "token_level", False))


def defaults(fn) -> dict:
  """Keyword-only hyper-parameters of the estimator (or its name) with their defaults."""
  fn = get(fn) if isinstance(fn, str) else fn
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def call(fn, inputs: dict, **params):
  """`fn(**{k: inputs[k] for k in required_inputs(fn)}, **params)`; `fn` may be a name.

  `inputs` may hold more names than `fn` needs; a missing one raises ValueError.
  """
  fn = get(fn) if isinstance(fn, str) else fn
  need = required_inputs(fn)
  missing = [k for k in need if k not in inputs]
  _check(not missing, f"Advantage estimator {fn.__name__}: missing inputs {missing} "
         f"(see INPUTS).")
  return fn(**{k: inputs[k] for k in need}, **params)


# ---------------------------------------------------------------------------- helpers


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


def _choice(value, choices, what):
  _check(value in choices, f"{what} must be one of {choices}, got {value!r}.")


def _ftype(x):
  """float64 if `x` is float64 (x64 enabled), else float32."""
  return jnp.float64 if jnp.asarray(x).dtype == jnp.float64 else jnp.float32


def _rewards(r, name="r"):
  """(r [B,G] float, valid [B,G] bool, dtype)."""
  r = jnp.asarray(r)
  _check(r.ndim == 2, f"{name} must be [B,G] (B prompts x G samples), got shape {r.shape}.")
  dt = _ftype(r)
  r = r.astype(dt)
  return r, jnp.isfinite(r), dt


def _token_mask(mask, n, name="mask"):
  """`mask` [N,T] as bool (nonzero = completion token)."""
  mask = jnp.asarray(mask)
  _check(mask.ndim == 2 and mask.shape[0] == n,
         f"{name} must be [N={n},T] (N = B*G rows, flat index b*G+g), got shape {mask.shape}.")
  return mask != 0


def _tokens(x, shape, dt, name):
  x = jnp.asarray(x)
  _check(x.shape == shape, f"{name} must have the mask's shape {shape}, got {x.shape}.")
  return x.astype(dt)


def _center(x, valid, axis=-1):
  """(n, dev, sd) over `axis` (keepdims): valid count, x - mean (0 where invalid), ddof-1 std.

  Two-pass, shifted by the largest valid value: equal values give dev exactly 0 and sd 0;
  fewer than 2 valid values give sd 0.
  """
  n = jnp.sum(valid, axis=axis, keepdims=True)
  c = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  d = jnp.where(valid, x - jnp.where(n > 0, c, 0.0), 0.0)
  mu = jnp.sum(d, axis=axis, keepdims=True) / jnp.maximum(n, 1)
  dev = jnp.where(valid, d - mu, 0.0)
  var = jnp.sum(jnp.square(dev), axis=axis, keepdims=True) / jnp.maximum(n - 1, 1)
  return n, dev, jnp.sqrt(var)


def _edge(a, n, singleton, raw):
  """`a` where the group has >= 2 valid samples; else 0, or `raw` with singleton="raw"."""
  return jnp.where(n >= 2, a, raw if singleton == "raw" else 0.0)


def _out(a, valid):
  """A [N] (flattened), 0 at invalid samples, without gradient."""
  return sg(jnp.where(valid, a, 0.0).reshape(-1))


def _out_tok(a_NxT, keep_NxT):
  return sg(jnp.where(keep_NxT, a_NxT, 0.0))


def _whiten(x, m, *, ddof, eps=WHITEN_EPS, var_floor=False, shift_mean=True):
  """(x - mu) * rsqrt(var + eps) (or rsqrt(max(var, eps))) with stats over `m` (bool)."""
  n = jnp.sum(m)
  mu = jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(n, 1)
  dev = jnp.where(m, x - mu, 0.0)
  var = jnp.sum(jnp.square(dev)) / jnp.maximum(n - ddof, 1)
  rstd = jax.lax.rsqrt(jnp.maximum(var, eps) if var_floor else var + eps)
  out = (x - mu) * jnp.where(n >= 2, rstd, 1.0)
  return out if shift_mean else out + mu


def whiten(x, mask, *, ddof=1, shift_mean=True, eps=WHITEN_EPS, var_floor=False):
  """Global masked whitening: (x - mu) * rsqrt(var + eps), mu and var over mask != 0.

  `ddof=1` with `var + eps` is verl's `masked_whiten` (also TRL PPO's `masked_whiten`);
  OpenRLHF's form is `ddof=0, var_floor=True`, i.e. rsqrt(max(var, eps)). Fewer than 2
  masked elements: only centres. `shift_mean=False` adds mu back. Entries outside the mask
  are transformed too (not zeroed), as in verl; masked-out NaN never enters the statistics.
  METHODS.md section 3.1 (`reinforce_pp_adv`, `gae_adv`). Shapes: x, mask any equal shape.
  """
  x = jnp.asarray(x)
  x = x.astype(_ftype(x))
  return _whiten(x, jnp.asarray(mask) != 0, ddof=ddof, eps=eps, var_floor=var_floor,
                 shift_mean=shift_mean)


def _whiten_style(style):
  _choice(style, WHITEN_STYLES, "whiten")
  return {"verl": {"ddof": 1}, "openrlhf": {"ddof": 0, "var_floor": True}}[style]


# ---------------------------------------------------------------------------- group estimators


@register("grpo_adv")
def grpo_adv(r, *, eps=1e-6, singleton="zero"):
  """GRPO group z-score: A = (r - mu_b) / (sd_b + eps), over the group's valid samples.

  sd_b with ddof=1 (two-pass; equal rewards give exactly 0). eps default 1e-6 (verl); TRL
  1e-4, OpenRLHF 1e-9. *DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models*; method id `grpo_adv`. Shapes: r [B,G] -> A [B*G].
  """
  _choice(singleton, SINGLETON_RULES, "grpo_adv: singleton")
  r_BxG, valid_BxG, _ = _rewards(r)
  n_Bx1, dev_BxG, sd_Bx1 = _center(r_BxG, valid_BxG)
  return _out(_edge(dev_BxG / (sd_Bx1 + eps), n_Bx1, singleton, r_BxG), valid_BxG)


@register("grpo_adv_batch")
def grpo_adv_batch(r, *, eps=1e-6, singleton="zero"):
  """GRPO with a batch std: A = (r - mu_b) / (sd_all + eps) (TRL `scale_rewards="batch"`).

  sd_all = ddof-1 std of all valid rewards of the batch (0 with < 2 valid); "raw" singletons
  give r / (sd_all + eps). *DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
  Open Language Models*; method id `grpo_adv_batch`. Shapes: r [B,G] -> A [B*G].
  """
  _choice(singleton, SINGLETON_RULES, "grpo_adv_batch: singleton")
  r_BxG, valid_BxG, _ = _rewards(r)
  n_Bx1, dev_BxG, _ = _center(r_BxG, valid_BxG)
  _, _, sd_all = _center(r_BxG.reshape(-1), valid_BxG.reshape(-1))
  a_BxG = _edge(dev_BxG / (sd_all + eps), n_Bx1, singleton, r_BxG / (sd_all + eps))
  return _out(a_BxG, valid_BxG)


@register("grpo_adv_none")
def grpo_adv_none(r, *, singleton="zero"):
  """GRPO without std scaling: A = r - mu_b (TRL `scale_rewards="none"`; verl
  `norm_adv_by_std_in_grpo=False`).

  *DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models*;
  method id `grpo_adv_none`. Shapes: r [B,G] -> A [B*G].
  """
  _choice(singleton, SINGLETON_RULES, "grpo_adv_none: singleton")
  r_BxG, valid_BxG, _ = _rewards(r)
  n_Bx1, dev_BxG, _ = _center(r_BxG, valid_BxG)
  return _out(_edge(dev_BxG, n_Bx1, singleton, r_BxG), valid_BxG)


@register("drgrpo_adv")
def drgrpo_adv(r, *, singleton="zero"):
  """Dr. GRPO advantage: A = r - mu_b (= `grpo_adv_none`).

  The other half of Dr. GRPO, the constant normaliser, lives in the loss aggregation
  (`seq-mean-token-sum-norm`, METHODS 3.4). *Understanding R1-Zero-Like Training: A Critical
  Perspective*; method id `drgrpo_adv`. Shapes: r [B,G] -> A [B*G].
  """
  return grpo_adv_none(r, singleton=singleton)


@register("rloo_adv")
def rloo_adv(r, *, singleton="zero"):
  """RLOO leave-one-out baseline: A_i = r_i - (S_b - r_i)/(n_b - 1) = n_b/(n_b - 1) (r_i - mu_b).

  S_b = sum of the group's valid rewards. verl keeps raw r for singletons (`singleton="raw"`);
  TRL first subtracts beta * sum_t(old - ref) from r (do that upstream).
  *Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
  in LLMs*; method id `rloo_adv`. Shapes: r [B,G] -> A [B*G].
  """
  _choice(singleton, SINGLETON_RULES, "rloo_adv: singleton")
  r_BxG, valid_BxG, _ = _rewards(r)
  n_Bx1, dev_BxG, _ = _center(r_BxG, valid_BxG)
  scale_Bx1 = n_Bx1 / jnp.maximum(n_Bx1 - 1, 1)
  return _out(_edge(scale_Bx1 * dev_BxG, n_Bx1, singleton, r_BxG), valid_BxG)


@register("opo_adv")
def opo_adv(r, lengths, *, singleton="zero"):
  """OPO length-weighted baseline: A = r - sum_g(L r) / sum_g(L), over the group's valid samples.

  A zero length sum gives A = 0; "raw" singletons give A = r (verl's baseline 0).
  *On-Policy RL with Optimal Reward Baseline*; method id `opo_adv`.
  Shapes: r [B,G], lengths [B*G] -> A [B*G].
  """
  _choice(singleton, SINGLETON_RULES, "opo_adv: singleton")
  r_BxG, valid_BxG, dt = _rewards(r)
  b, g = r_BxG.shape
  lengths = jnp.asarray(lengths)
  _check(lengths.shape == (b * g,), f"opo_adv: lengths must be [B*G={b * g}], got "
         f"{lengths.shape}.")
  l_BxG = jnp.where(valid_BxG, lengths.astype(dt).reshape(b, g), 0.0)
  n_Bx1 = jnp.sum(valid_BxG, axis=1, keepdims=True)
  c_Bx1 = jnp.max(jnp.where(valid_BxG, r_BxG, -jnp.inf), axis=1, keepdims=True)
  d_BxG = jnp.where(valid_BxG, r_BxG - jnp.where(n_Bx1 > 0, c_Bx1, 0.0), 0.0)
  den_Bx1 = jnp.sum(l_BxG, axis=1, keepdims=True)
  base_Bx1 = jnp.sum(l_BxG * d_BxG, axis=1, keepdims=True) / jnp.where(den_Bx1 != 0, den_Bx1, 1)
  a_BxG = jnp.where(den_Bx1 != 0, d_BxG - base_Bx1, 0.0)
  return _out(_edge(a_BxG, n_Bx1, singleton, r_BxG), valid_BxG)


@register("gpg_adv")
def gpg_adv(r, *, alpha_mode="verl", singleton="zero"):
  """GPG: A = alpha (r - mu_b), alpha a batch-level correction for degenerate groups.

  alpha_mode "verl" (default): alpha = N / max(#{r_i != 0}, 1) (verl counts nonzero rewards);
  "paper": alpha = N / max(N - M, 1), M = valid samples in zero-variance groups (incl.
  singletons; `recalled - verify`). N = valid samples of the batch (all of them in verl).
  "raw" singletons give alpha r. *GPG: A Simple and Strong Reinforcement Learning Baseline
  for Model Reasoning*; method id `gpg_adv`. Shapes: r [B,G] -> A [B*G].
  """
  _choice(alpha_mode, GPG_ALPHA_MODES, "gpg_adv: alpha_mode")
  _choice(singleton, SINGLETON_RULES, "gpg_adv: singleton")
  r_BxG, valid_BxG, dt = _rewards(r)
  n_Bx1, dev_BxG, sd_Bx1 = _center(r_BxG, valid_BxG)
  n_all = jnp.sum(valid_BxG).astype(dt)
  if alpha_mode == "verl":
    alpha = n_all / jnp.maximum(jnp.sum(valid_BxG & (r_BxG != 0)), 1)
  else:
    m_deg = jnp.sum(jnp.where(sd_Bx1 == 0, n_Bx1, 0))
    alpha = n_all / jnp.maximum(n_all - m_deg, 1)
  return _out(_edge(alpha * dev_BxG, n_Bx1, singleton, alpha * r_BxG), valid_BxG)


@register("passk_adv")
def passk_adv(r, *, eps=1e-6, norm_by_std=True):
  """Pass@k advantage (verl `grpo_passk`): only the group's best sample gets a nonzero A.

  A = (r_max - r_2nd) / (sd_b + eps) at the argmax (ties to the first index; unscaled with
  `norm_by_std=False`), 0 elsewhere; sd_b ddof=1 over valid samples. r_max = r_2nd gives all
  0; n_b < 2 gives 0 (verl raises). Implemented as cited by verl (arXiv 2503.19595, *Optimizing
  Language Models for Inference Time Objectives using Reinforcement Learning*; title
  `recalled - verify`); method id `passk_adv`. Shapes: r [B,G] (G >= 2) -> A [B*G].
  """
  r_BxG, valid_BxG, dt = _rewards(r)
  b, g = r_BxG.shape
  _check(g >= 2, f"passk_adv needs G >= 2 samples per prompt, got r of shape {r_BxG.shape}.")
  n_Bx1, _, sd_Bx1 = _center(r_BxG, valid_BxG)
  top_Bx2, idx_Bx2 = jax.lax.top_k(jnp.where(valid_BxG, r_BxG, -jnp.inf), 2)
  top_Bx2 = jnp.where(n_Bx1 >= 2, top_Bx2, 0.0)
  gap_B = top_Bx2[:, 0] - top_Bx2[:, 1]
  if norm_by_std:
    gap_B = gap_B / (sd_Bx1[:, 0] + eps)
  a_BxG = jax.nn.one_hot(idx_Bx2[:, 0], g, dtype=dt) * gap_B[:, None]
  return _out(a_BxG, valid_BxG)


@register("gdpo_adv")
def gdpo_adv(r_multi, *, weights=None, eps=1e-4):
  """Normalise-then-sum over K reward functions (TRL `normalize_then_sum`).

  z_k = (r_k - mu_bk) / (sd_bk + eps) per function over the group's valid values (ddof=1; a
  missing value or a function with < 2 valid values in the group adds 0);
  s = sum_k w_k z_k; A = (s - mean s) / (sd s + eps) over the batch's samples with at least one
  valid reward (ddof=1); a sample whose rewards are all missing gets A = 0 and is left out
  (TRL keeps it in the batch statistics with s = 0). `weights`: K floats (default all 1).
  eps 1e-4 as TRL. *GDPO: Group reward-Decoupled Normalization Policy Optimization for
  Multi-reward RL Optimization* (title `recalled - verify`); method id `gdpo_adv`.
  Shapes: r_multi [B,G,K] -> A [B*G].
  """
  r = jnp.asarray(r_multi)
  _check(r.ndim == 3, f"gdpo_adv: r_multi must be [B,G,K], got shape {r.shape}.")
  dt = _ftype(r)
  r = r.astype(dt)
  k = r.shape[2]
  if weights is None:
    w_K = jnp.ones((k,), dt)
  else:
    _check(len(weights) == k, f"gdpo_adv: weights must have K={k} entries, got {len(weights)}.")
    w_K = jnp.asarray(weights, dt)
  r_BxKxG = jnp.moveaxis(r, 2, 1)
  valid_BxKxG = jnp.isfinite(r_BxKxG)
  n_BxKx1, dev_BxKxG, sd_BxKx1 = _center(r_BxKxG, valid_BxKxG)
  z_BxKxG = jnp.where(n_BxKx1 >= 2, dev_BxKxG / (sd_BxKx1 + eps), 0.0)
  s_N = jnp.sum(w_K[None, :, None] * z_BxKxG, axis=1).reshape(-1)
  ok_N = jnp.any(valid_BxKxG, axis=1).reshape(-1)
  _, dev_N, sd_N = _center(s_N, ok_N)
  return _out(dev_N / (sd_N + eps), ok_N)


# ---------------------------------------------------------------------------- token-level


def _last_token(m_NxT):
  """One-hot [N,T] bool at each row's last mask token (all False for an empty row)."""
  t = m_NxT.shape[1]
  last_N = t - 1 - jnp.argmax(m_NxT[:, ::-1], axis=1)
  return (jnp.arange(t)[None, :] == last_N[:, None]) & jnp.any(m_NxT, axis=1, keepdims=True)


def _returns(r_NxT, m_NxT, gamma):
  """Ret_t = R_t + gamma * m_t * Ret_{t+1} (reverse scan; R already zero off the mask)."""

  def step(carry_N, xs):
    r_N, m_N = xs
    ret_N = r_N + gamma * jnp.where(m_N, carry_N, 0.0)
    return ret_N, ret_N

  _, ret_TxN = jax.lax.scan(step, jnp.zeros(r_NxT.shape[:1], r_NxT.dtype),
                            (r_NxT.T, m_NxT.T), reverse=True)
  return ret_TxN.T


@register("reinforce_pp_adv", token_level=True)
def reinforce_pp_adv(r, mask, kl, *, gamma=1.0, beta=0.01, whiten="verl"):
  """REINFORCE++: discounted token returns with the KL in the reward, whitened over the batch.

  R[i,t] = -beta m sg(old - ref)_t + r_i [t = last_i]; Ret_t = R_t + gamma m_t Ret_{t+1};
  A = (Ret - mu) rsqrt(var + 1e-8) with token-weighted global mu, var. `whiten="verl"`
  (ddof=1, var + 1e-8) or "openrlhf" (ddof=0, rsqrt(max(var, 1e-8))). Carries stop at
  masked tokens (verl; identical to OpenRLHF for contiguous masks). beta 0.01 as OpenRLHF's
  `init_kl_coef`. Invalid samples get A = 0 and stay out of the statistics.
  *REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models*; method
  id `reinforce_pp_adv`. Shapes: r [B,G], mask, kl [B*G,T] -> A [B*G,T].
  """
  style = _whiten_style(whiten)
  r_BxG, valid_BxG, dt = _rewards(r)
  m_NxT = _token_mask(mask, r_BxG.size)
  kl_NxT = jnp.where(m_NxT, _tokens(kl, m_NxT.shape, dt, "reinforce_pp_adv: kl"), 0.0)
  valid_N = valid_BxG.reshape(-1)
  r_N = jnp.where(valid_N, r_BxG.reshape(-1), 0.0)
  rew_NxT = -beta * kl_NxT + jnp.where(_last_token(m_NxT), r_N[:, None], 0.0)
  keep_NxT = m_NxT & valid_N[:, None]
  ret_NxT = _returns(jnp.where(keep_NxT, rew_NxT, 0.0), m_NxT, gamma)
  return _out_tok(_whiten(ret_NxT, keep_NxT, **style), keep_NxT)


@register("reinforce_pp_baseline_adv", token_level=True)
def reinforce_pp_baseline_adv(r, mask, *, whiten="verl", singleton="zero"):
  """REINFORCE++ with a group-mean baseline: r_i - mu_b broadcast to tokens, then whitened.

  Whitening as in `reinforce_pp_adv` (token-weighted global mu, var; `whiten="verl"` ddof=1
  or "openrlhf" ddof=0). With `singleton="zero"` samples of groups with < 2 valid samples get
  A = 0 and stay out of the statistics; "raw" uses r for them (verl's mean 0).
  *REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models*; method
  id `reinforce_pp_baseline_adv`. Shapes: r [B,G], mask [B*G,T] -> A [B*G,T].
  """
  style = _whiten_style(whiten)
  _choice(singleton, SINGLETON_RULES, "reinforce_pp_baseline_adv: singleton")
  r_BxG, valid_BxG, _ = _rewards(r)
  m_NxT = _token_mask(mask, r_BxG.size)
  n_Bx1, dev_BxG, _ = _center(r_BxG, valid_BxG)
  c_N = _edge(dev_BxG, n_Bx1, singleton, r_BxG).reshape(-1)
  use_BxG = valid_BxG & ((n_Bx1 >= 2) | (singleton == "raw"))
  keep_NxT = m_NxT & use_BxG.reshape(-1)[:, None]
  x_NxT = jnp.where(keep_NxT, c_N[:, None], 0.0)
  return _out_tok(_whiten(x_NxT, keep_NxT, **style), keep_NxT)


@register("remax_adv", token_level=True)
def remax_adv(token_rewards, mask, baseline):
  """ReMax: A[i,t] = sum_{s>=t} m R[i,s] - b_b, b_b the reward of a greedy rollout of prompt b.

  Not whitened. A row with a non-finite masked token reward, or a non-finite baseline, gets
  A = 0. *ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
  Large Language Models*; method id `remax_adv`.
  Shapes: token_rewards, mask [B*G,T], baseline [B] -> A [B*G,T].
  """
  tr = jnp.asarray(token_rewards)
  _check(tr.ndim == 2, f"remax_adv: token_rewards must be [B*G,T], got shape {tr.shape}.")
  dt = _ftype(tr)
  m_NxT = _token_mask(mask, tr.shape[0])
  r_NxT = _tokens(tr, m_NxT.shape, dt, "remax_adv: token_rewards")
  b_B = jnp.asarray(baseline)
  n = tr.shape[0]
  _check(b_B.ndim == 1 and b_B.shape[0] > 0 and n % b_B.shape[0] == 0,
         f"remax_adv: baseline must be [B] with B dividing B*G={n}, got shape {b_B.shape}.")
  b_N = jnp.repeat(b_B.astype(dt), n // b_B.shape[0])
  ok_N = jnp.all(jnp.where(m_NxT, jnp.isfinite(r_NxT), True), axis=1) & jnp.isfinite(b_N)
  keep_NxT = m_NxT & ok_N[:, None]
  ret_NxT = jax.lax.cumsum(jnp.where(keep_NxT, r_NxT, 0.0), axis=1, reverse=True)
  return _out_tok(ret_NxT - jnp.where(ok_N, b_N, 0.0)[:, None], keep_NxT)


def gae_returns(token_rewards, values, mask, *, gamma=1.0, lam=0.95):
  """GAE before whitening: (A_unwhitened [B*G,T], Ret [B*G,T]); Ret is the value-loss target.

  delta_t = R_t + gamma Vn_{t+1} - V_t; A_t = delta_t + gamma lam An_{t+1}; the carries skip
  masked tokens (verl; safe with tool tokens): Vn_t = m V_t + (1-m) Vn_{t+1}, An likewise, and
  the A output at t is An_t (a masked slot holds the carry, not 0). Ret = A + V (V taken as 0
  off the mask). Reverse `lax.scan` in the input float type. A row with non-finite inputs on
  its mask gives non-finite values in that row only (`gae_adv` zeroes them).
  *High-Dimensional Continuous Control Using Generalized Advantage Estimation*; method id
  `gae_adv`. Shapes: token_rewards, values, mask [B*G,T].
  """
  tr = jnp.asarray(token_rewards)
  _check(tr.ndim == 2, f"gae_returns: token_rewards must be [B*G,T], got shape {tr.shape}.")
  dt = _ftype(tr)
  m_NxT = _token_mask(mask, tr.shape[0])
  r_NxT = jnp.where(m_NxT, _tokens(tr, m_NxT.shape, dt, "gae: token_rewards"), 0.0)
  v_NxT = jnp.where(m_NxT, _tokens(values, m_NxT.shape, dt, "gae: values"), 0.0)

  def step(carry, xs):
    vn_N, an_N = carry
    r_N, v_N, m_N = xs
    a_N = r_N + gamma * vn_N - v_N + gamma * lam * an_N
    vn_N, an_N = jnp.where(m_N, v_N, vn_N), jnp.where(m_N, a_N, an_N)
    return (vn_N, an_N), an_N

  zeros_N = jnp.zeros(tr.shape[:1], dt)
  _, a_TxN = jax.lax.scan(step, (zeros_N, zeros_N), (r_NxT.T, v_NxT.T, m_NxT.T), reverse=True)
  a_NxT = a_TxN.T
  return sg(a_NxT), sg(a_NxT + v_NxT)


@register("gae_adv", token_level=True)
def gae_adv(token_rewards, values, mask, *, gamma=1.0, lam=0.95, normalize=True):
  """GAE advantages, whitened globally over the mask (ddof=1, var + 1e-8; verl / TRL PPO).

  A from `gae_returns` (use its Ret for the value loss), whitened unless `normalize=False`,
  then zeroed off the mask. gamma 1 (verl, TRL); lam .95 (TRL PPO; verl uses 1). A row with a
  non-finite reward or value on its mask gets A = 0 and stays out of the statistics.
  *High-Dimensional Continuous Control Using Generalized Advantage Estimation*; method id
  `gae_adv`. Shapes: token_rewards, values, mask [B*G,T] -> A [B*G,T].
  """
  a_NxT, _ = gae_returns(token_rewards, values, mask, gamma=gamma, lam=lam)
  m_NxT = jnp.asarray(mask) != 0
  fin_NxT = jnp.isfinite(jnp.asarray(token_rewards)) & jnp.isfinite(jnp.asarray(values))
  keep_NxT = m_NxT & jnp.all(jnp.where(m_NxT, fin_NxT, True), axis=1, keepdims=True)
  if normalize:
    a_NxT = _whiten(a_NxT, keep_NxT, ddof=1)
  return _out_tok(a_NxT, keep_NxT)


# ---------------------------------------------------------------------------- filters


def stable_adv_filter(a, *, valid=None, z_max=3.0, eps=1e-6):
  """StableReinforce advantage filter: weight w_i = [|z_i| <= z_max] on batch-standardised A.

  z = (A - mean A) / (sd A + eps) over valid samples (ddof=1; non-finite A is invalid and
  gets w = 0; fewer than 2 valid samples keep all of them). Multiply w into the mask before
  the loss normalisers. Not an estimator (not in ESTIMATORS). Apply it to batch-level
  advantages, never to group z-scores: their max |z| is (G-1)/sqrt(G) (2.47 at G=8), so it
  never fires for G <= 10. Pass `valid` (e.g. finite rewards) so A = 0 of unscorable samples
  stays out of the statistics. *R1-Reward: Training Multimodal Reward Model Through Stable
  Reinforcement Learning*; method id `stable_adv_filter` (rule `recalled - verify`).
  Shapes: a, valid [B*G] -> w [B*G] (0/1 float, no gradient).
  """
  a = jnp.asarray(a)
  _check(a.ndim == 1, f"stable_adv_filter: a must be sequence-level [B*G], got shape {a.shape}.")
  dt = _ftype(a)
  a = a.astype(dt)
  ok = jnp.isfinite(a)
  if valid is not None:
    ok = ok & (jnp.asarray(valid) != 0)
  _, dev, sd = _center(a, ok)
  return sg((ok & (jnp.abs(dev / (sd + eps)) <= z_max)).astype(dt))
