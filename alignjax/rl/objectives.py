"""Policy-gradient objectives, KL estimators and loss aggregation (METHODS.md section 3).

Contract of the policy losses (`POLICY_LOSSES`; see `docs/rl_objectives.md`):
- pure and jittable; data arrays positional, hyper-parameters keyword-only with plain
  Python defaults (string options are static); arithmetic in float32;
- the positional parameter names are the inputs the trainer computes and passes by keyword
  (vocabulary: `INPUTS`; `required_inputs(fn)`); `logp` is the only differentiable input
  (`old`, `ref`, `A` are treated as data, and `A` may be `[N]` or `[N,T]`);
- return `(l [N,T], aux)`: `l` is the per-token loss, zero in masked slots, to be reduced by
  `aggregate` (or `numerator` / `denominator`) with the same mask; `aux` maps names to
  `[N,T]` float32 per-token indicators or statistics (stop-gradient, zero in masked slots),
  reduced by the trainer with the same mask and mode;
- masked slots (`mask == 0`) are replaced by 0 before any arithmetic, so whatever they hold
  (NaN, inf) they change neither values nor gradients; log-ratios are clipped to +-20 before
  `exp`, so log-probs of +-1e4 stay finite.

Aggregation (METHODS 3.4) is exact across data-parallel shards and micro-batches: compute
`denominator(mask_global, mode)` once for the optimizer step, then every micro-batch adds
`numerator(l, mask, mode) / denom` and the gradients are summed.

Notation (METHODS.md 3): `lr = logp - old`, `rho = exp(lr)`, `x = logp - ref`,
`L_i = sum_t m`, `sg = stop_gradient`.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

_f32 = jnp.float32
sg = jax.lax.stop_gradient
LR_CLIP = 20.0  # |lr| bound before exp (verl, TRL): exp(20) ~ 4.9e8
EXP_MAX = 80.0  # cap on other exponent arguments (float32; e^80 ~ 5.5e34)

INPUTS = {
    "logp": "[N,T] current-policy token log-probs (differentiable)",
    "old": "[N,T] behaviour / old-policy token log-probs (no gradient)",
    "ref": "[N,T] frozen reference-model token log-probs (no gradient)",
    "A": "[N] or [N,T] advantages (no gradient; [N] is broadcast over tokens)",
    "mask": "[N,T] completion-token mask (1 = token counts; weights allowed)",
}

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

POLICY_LOSSES: dict[str, Callable] = {}
PAPER_MODES: dict[str, str] = {}  # name -> aggregation mode the paper intends


# ---------------------------------------------------------------------------- registry


def register(name: str, *, mode: str = "token-mean"):
  """Decorator: registers a policy loss under `name` (with the paper's aggregation `mode`)."""
  _check(mode in MODES, f"Policy loss {name!r}: unknown mode {mode!r}; expected one of {MODES}.")

  def wrap(fn):
    if name in POLICY_LOSSES and POLICY_LOSSES[name] is not fn:
      raise ValueError(f"Policy loss {name!r} is already registered.")
    bad = [n for n in required_inputs(fn) if n not in INPUTS]
    _check(not bad, f"Policy loss {name!r}: positional inputs {bad} are not in INPUTS.")
    POLICY_LOSSES[name] = fn
    PAPER_MODES[name] = mode
    return fn

  return wrap


def names() -> list[str]:
  """Sorted names of the registered policy losses."""
  return sorted(POLICY_LOSSES)


def get(name: str) -> Callable:
  """The policy loss registered under `name`; ValueError listing the names if there is none."""
  if name not in POLICY_LOSSES:
    raise ValueError(f"Unknown policy loss {name!r}. Registered: {', '.join(names())}.")
  return POLICY_LOSSES[name]


def required_inputs(fn) -> tuple[str, ...]:
  """Names of `fn`'s positional parameters: the inputs the trainer must pass (see INPUTS)."""
  return tuple(p.name for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


def defaults(name: str) -> dict:
  """Keyword-only hyper-parameters of `name` with plain Python scalar / string defaults."""
  params = inspect.signature(get(name)).parameters.values()
  return {p.name: p.default for p in params
          if p.kind is inspect.Parameter.KEYWORD_ONLY
          and isinstance(p.default, (bool, int, float, str))}


def call(fn, inputs: dict, **params):
  """`fn(**{k: inputs[k] for k in required_inputs(fn)}, **params)`; `fn` may be a name."""
  fn = get(fn) if isinstance(fn, str) else fn
  missing = [k for k in required_inputs(fn) if k not in inputs]
  _check(not missing, f"{fn.__name__}: missing inputs {missing}.")
  return fn(**{k: inputs[k] for k in required_inputs(fn)}, **params)


# ---------------------------------------------------------------------------- helpers


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


def _concrete(x):
  return isinstance(x, (int, float))


_DIFFERENTIABLE = ("logp", "V")


def _tokens(mask, **xs):
  """(keep_NxT bool, m_NxT, *xs as float32 [N,T] with masked slots set to 0).

  A scalar, or an input of rank 1 (an advantage `[N]`), is broadcast over the tokens. Every
  input but `logp` and `V` is data and gets stop_gradient (so `old = logp` on-policy is safe).
  """
  m_NxT = sg(jnp.asarray(mask, _f32))
  chex.assert_rank(m_NxT, 2)
  keep_NxT = m_NxT != 0
  out = []
  for name, x in xs.items():
    x = jnp.asarray(x, _f32)
    if name not in _DIFFERENTIABLE:
      x = sg(x)
    if x.ndim == 0:
      x = jnp.broadcast_to(x, m_NxT.shape)
    elif x.ndim == 1:
      chex.assert_shape(x, (m_NxT.shape[0],), custom_message=f"{name} must be [N] or [N,T]")
      x = jnp.broadcast_to(x[:, None], m_NxT.shape)
    chex.assert_shape(x, m_NxT.shape, custom_message=f"{name} must be [N,T]={m_NxT.shape}")
    out.append(jnp.where(keep_NxT, x, 0.0))
  return (keep_NxT, jnp.where(keep_NxT, m_NxT, 0.0), *out)


def _lengths(m_NxT):
  """L_i = sum_t m [N] (not clamped)."""
  return jnp.sum(m_NxT, axis=-1)


def _seq_mean(x_NxT, m_NxT):
  """Masked per-row mean sum_t m x / max(L_i, 1) [N] (x already zero in masked slots)."""
  return jnp.sum(m_NxT * x_NxT, axis=-1) / jnp.maximum(_lengths(m_NxT), 1.0)


def _ratio(lr_NxT):
  return jnp.exp(jnp.clip(lr_NxT, -LR_CLIP, LR_CLIP))


def _out(keep_NxT, l_NxT, **aux):
  z = lambda v: jnp.where(keep_NxT, jnp.asarray(v, _f32), 0.0)
  return z(l_NxT), {k: sg(z(v)) for k, v in aux.items()}


def _eps(name, eps_lo, eps_hi):
  if _concrete(eps_lo):
    _check(eps_lo >= 0, f"{name}: eps_lo must be >= 0, got {eps_lo}.")
  if _concrete(eps_hi):
    _check(eps_hi >= 0, f"{name}: eps_hi must be >= 0, got {eps_hi}.")


def _dual_c(clip_c):
  if clip_c is not None and _concrete(clip_c):
    _check(clip_c > 1, f"dual clip: clip_c must be > 1, got {clip_c}.")


def _clip_flags(a_NxT, r_NxT, lo, hi):
  """clip_low (A<0, r<lo), clip_high (A>0, r>hi), clipped: the tokens whose clip is active."""
  low_NxT, high_NxT = (a_NxT < 0) & (r_NxT < lo), (a_NxT > 0) & (r_NxT > hi)
  return dict(clip_low=low_NxT, clip_high=high_NxT, clipped=low_NxT | high_NxT)


# ---------------------------------------------------------------------------- policy losses


def _ppo(logp, old, A, mask, eps_lo, eps_hi, clip_c, lr_lo, lr_hi):
  keep_NxT, _, lp_NxT, old_NxT, a_NxT = _tokens(mask, logp=logp, old=old, A=A)
  rho_NxT = jnp.exp(jnp.clip(lp_NxT - old_NxT, lr_lo, lr_hi))
  l_NxT = jnp.maximum(-a_NxT * rho_NxT,
                      -a_NxT * jnp.clip(rho_NxT, 1.0 - eps_lo, 1.0 + eps_hi))
  aux = dict(ratio=rho_NxT, **_clip_flags(a_NxT, rho_NxT, 1.0 - eps_lo, 1.0 + eps_hi))
  if clip_c is not None:
    dual_NxT = (a_NxT < 0) & (-a_NxT * clip_c < l_NxT)
    l_NxT = jnp.where(dual_NxT, -a_NxT * clip_c, l_NxT)
    aux["dual_clipped"] = dual_NxT
  return _out(keep_NxT, l_NxT, **aux)


@register("ppo")
def ppo_clip_loss(logp, old, A, mask, *, eps_lo=0.2, eps_hi=0.2, clip_c=None):
  """PPO clipped surrogate: l = max(-A rho, -A clip(rho, 1-eps_lo, 1+eps_hi)).

  rho = exp(clip(logp - old, -20, 20)). `eps_hi = 0.28` is DAPO's clip-higher. `clip_c`
  (None = off, else > 1) adds the dual clip `l = min(l, -A c)` for A < 0 (`dual_clip_loss`).
  *Proximal Policy Optimization Algorithms* / *DAPO: An Open-Source LLM Reinforcement
  Learning System at Scale*; METHODS id `ppo_clip_loss`. Intended aggregation: token-mean
  (DAPO; verl default). Shapes: logp, old, mask [N,T]; A [N] or [N,T].
  aux: ratio, clip_low (A<0, rho<1-eps_lo), clip_high (A>0, rho>1+eps_hi), clipped
  (either), and dual_clipped when `clip_c` is set.
  """
  _eps("ppo_clip_loss", eps_lo, eps_hi)
  _dual_c(clip_c)
  return _ppo(logp, old, A, mask, eps_lo, eps_hi, clip_c, -LR_CLIP, LR_CLIP)


@register("dual_clip")
def dual_clip_loss(logp, old, A, mask, *, eps_lo=0.2, eps_hi=0.2, clip_c=3.0):
  """Dual-clip PPO: for A < 0, l = min(l_ppo, -A c), c > 1 (default 3).

  Bounds the loss of negative-advantage tokens whose ratio exploded. TRL's `delta` caps rho
  for both signs instead; it equals this only if delta >= 1+eps_hi. *Mastering Complex
  Control in MOBA Games with Deep Reinforcement Learning*; METHODS id `dual_clip_loss`.
  Intended aggregation: token-mean. Shapes as `ppo_clip_loss`.
  aux: ratio, clip_low, clip_high, clipped, dual_clipped (A<0 and -A c < l_ppo).
  """
  _check(clip_c is not None, "dual_clip_loss: clip_c must be a number > 1, got None.")
  return ppo_clip_loss(logp, old, A, mask, eps_lo=eps_lo, eps_hi=eps_hi, clip_c=clip_c)


@register("ppo_preclip")
def ppo_preclip_loss(logp, old, A, mask, *, eps_lo=0.2, eps_hi=0.2, d_lo=math.exp(-3.0),
                     d_hi=math.exp(3.0), clip_c=None):
  """PPO with a pre-clipped ratio: rho = exp(clip(lr, log d_lo, log d_hi)), then PPO clipping.

  Tokens whose ratio lies outside [d_lo, d_hi] get zero gradient (the ratio is constant
  there). *R1-Reward: Training Multimodal Reward Model Through Stable Reinforcement
  Learning* (StableReinforce); METHODS id `preclip_ratio` (`recalled - verify`; the bounds
  exp(+-3) are `proposed`). Intended aggregation: token-mean. Shapes as `ppo_clip_loss`.
  aux: as `ppo_clip_loss` (ratio is the pre-clipped ratio).
  """
  _eps("ppo_preclip_loss", eps_lo, eps_hi)
  _dual_c(clip_c)
  if _concrete(d_lo) and _concrete(d_hi):
    _check(0 < d_lo <= 1 <= d_hi, f"ppo_preclip_loss: need 0 < d_lo <= 1 <= d_hi, got "
           f"{d_lo}, {d_hi}.")
  lo = max(math.log(d_lo), -LR_CLIP) if _concrete(d_lo) else jnp.log(d_lo)
  hi = min(math.log(d_hi), LR_CLIP) if _concrete(d_hi) else jnp.log(d_hi)
  return _ppo(logp, old, A, mask, eps_lo, eps_hi, clip_c, lo, hi)


@register("gspo", mode="seq-mean-token-mean")
def gspo_loss(logp, old, A, mask, *, eps_lo=3e-4, eps_hi=4e-4):
  """GSPO: sequence-level ratio s_i = exp(sum_t m lr / max(L_i,1)), PPO-clipped.

  Straight-through token form (verl `gspo`): log s_it = min(logp - sg(logp) + sg(log s_i),
  10), so the value is s_i on every token and the gradient of l_it is -A_it s_i grad(logp_t)
  (unclipped); A may be [N,T]. l = max(-A s, -A clip(s, 1-eps_lo, 1+eps_hi)). Paper eps
  3e-4 / 4e-4 (`recalled - verify`). *Group Sequence Policy Optimization*; METHODS id
  `gspo_loss`. Intended aggregation: seq-mean-token-mean (then l_i is the per-sequence
  loss). Shapes: logp, old, mask [N,T]; A [N] or [N,T].
  aux: ratio (s_i on each token), clip_low, clip_high, clipped.
  """
  _eps("gspo_loss", eps_lo, eps_hi)
  keep_NxT, m_NxT, lp_NxT, old_NxT, a_NxT = _tokens(mask, logp=logp, old=old, A=A)
  log_s_N = _seq_mean(jnp.clip(lp_NxT - old_NxT, -LR_CLIP, LR_CLIP), m_NxT)
  s_NxT = jnp.exp(jnp.minimum(lp_NxT - sg(lp_NxT) + sg(log_s_N)[:, None], 10.0))
  l_NxT = jnp.maximum(-a_NxT * s_NxT, -a_NxT * jnp.clip(s_NxT, 1.0 - eps_lo, 1.0 + eps_hi))
  return _out(keep_NxT, l_NxT, ratio=s_NxT,
              **_clip_flags(a_NxT, s_NxT, 1.0 - eps_lo, 1.0 + eps_hi))


@register("gmpo", mode="seq-mean-token-mean")
def gmpo_loss(logp, old, A, mask, *, eps_lo=0.2, eps_hi=0.28):
  """GMPO: geometric-mean ratio with log-space clipping, l_i = -A_i exp(mean_t m lc).

  lc = sgn(A) min(sgn(A) lr, sgn(A) clip(lr, -eps_lo, eps_hi)) per token (lr clipped to
  +-20 first); A_i is the masked token mean of A when A is [N,T] (verl). The value l_i is
  written on each valid token of row i, so seq-mean-token-mean gives mean_i l_i.
  *Geometric-Mean Policy Optimization*; METHODS id `gmpo_loss`. Intended aggregation:
  seq-mean-token-mean (= mean over sequences). Shapes: logp, old, mask [N,T]; A [N] or [N,T].
  aux: ratio (token rho), clip_low (A<0, lr<-eps_lo), clip_high (A>0, lr>eps_hi), clipped,
  seq_ratio (the geometric-mean ratio of the row).
  """
  _eps("gmpo_loss", eps_lo, eps_hi)
  keep_NxT, m_NxT, lp_NxT, old_NxT, a_NxT = _tokens(mask, logp=logp, old=old, A=A)
  lr_NxT = jnp.clip(lp_NxT - old_NxT, -LR_CLIP, LR_CLIP)
  sgn_NxT = jnp.sign(a_NxT)
  lc_NxT = sgn_NxT * jnp.minimum(sgn_NxT * lr_NxT, sgn_NxT * jnp.clip(lr_NxT, -eps_lo, eps_hi))
  r_Nx1 = jnp.exp(_seq_mean(lc_NxT, m_NxT))[:, None]
  a_Nx1 = _seq_mean(a_NxT, m_NxT)[:, None]
  return _out(keep_NxT, jnp.broadcast_to(-a_Nx1 * r_Nx1, m_NxT.shape), ratio=jnp.exp(lr_NxT),
              **_clip_flags(a_NxT, lr_NxT, -eps_lo, eps_hi),
              seq_ratio=jnp.broadcast_to(r_Nx1, m_NxT.shape))


@register("cispo")
def cispo_loss(logp, old, A, mask, *, mode="trl", cap=5.0, eps_lo=0.2, eps_hi=0.28):
  """CISPO: clipped IS-weight REINFORCE, l = -sg(w) A logp.

  `mode="trl"`: w = min(rho, cap) (TRL's `epsilon_high` = 5); `mode="verl"`:
  w = clip(rho, 1-eps_lo, 1+eps_hi). Every token keeps its gradient (only the weight is
  clipped). *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention*;
  METHODS id `cispo_loss`. Intended aggregation: token-mean.
  Shapes: logp, old, mask [N,T]; A [N] or [N,T].
  aux: ratio, weight (w), clip_low (w raised), clip_high (w lowered), clipped (either);
  the clip flags do not depend on the sign of A.
  """
  _check(mode in ("trl", "verl"), f"cispo_loss: mode must be 'trl' or 'verl', got {mode!r}.")
  keep_NxT, _, lp_NxT, old_NxT, a_NxT = _tokens(mask, logp=logp, old=old, A=A)
  rho_NxT = _ratio(lp_NxT - old_NxT)
  if mode == "trl":
    w_NxT = jnp.minimum(rho_NxT, cap)
    low_NxT, high_NxT = jnp.zeros_like(rho_NxT, bool), rho_NxT > cap
  else:
    _eps("cispo_loss", eps_lo, eps_hi)
    w_NxT = jnp.clip(rho_NxT, 1.0 - eps_lo, 1.0 + eps_hi)
    low_NxT, high_NxT = rho_NxT < 1.0 - eps_lo, rho_NxT > 1.0 + eps_hi
  w_NxT = sg(w_NxT)
  return _out(keep_NxT, -w_NxT * a_NxT * lp_NxT, ratio=rho_NxT, weight=w_NxT, clip_low=low_NxT,
              clip_high=high_NxT, clipped=low_NxT | high_NxT)


@register("sapo", mode="seq-mean-token-mean")
def sapo_loss(logp, old, A, mask, *, tau_pos=1.0, tau_neg=1.05):
  """SAPO soft gate: l = -A sigmoid(tau (rho - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg.

  The gate has slope 1 at rho = 1 (matches PPO there) and decays smoothly away from it.
  *Soft Adaptive Policy Optimization*; METHODS id `sapo_loss` (TRL and verl agree).
  Intended aggregation: seq-mean-token-mean. Shapes: logp, old, mask [N,T]; A [N] or [N,T].
  aux: ratio, gate (4 sig (1 - sig): the gradient weight relative to the unclipped -A rho).
  """
  if _concrete(tau_pos) and _concrete(tau_neg):
    _check(tau_pos > 0 and tau_neg > 0, f"sapo_loss: taus must be > 0, got {tau_pos}, "
           f"{tau_neg}.")
  keep_NxT, _, lp_NxT, old_NxT, a_NxT = _tokens(mask, logp=logp, old=old, A=A)
  rho_NxT = _ratio(lp_NxT - old_NxT)
  tau_NxT = jnp.where(a_NxT > 0, tau_pos, tau_neg)
  g_NxT = jax.nn.sigmoid(tau_NxT * (rho_NxT - 1.0))
  return _out(keep_NxT, -a_NxT * g_NxT * 4.0 / tau_NxT, ratio=rho_NxT,
              gate=4.0 * g_NxT * (1.0 - g_NxT))


@register("pg")
def pg_loss(logp, A, mask, *, w=None):
  """REINFORCE / GPG policy gradient: l = -sg(w) A logp, w = 1 or an IS weight [N,T].

  `w` is an optional array (e.g. `rollout_is_weights`); it is stop-gradient'd and masked.
  *Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
  Learning* / *GPG: A Simple and Strong Reinforcement Learning Baseline for Model
  Reasoning*; METHODS id `pg_loss`. Intended aggregation: token-mean.
  Shapes: logp, mask [N,T]; A [N] or [N,T]. aux: empty (no ratio without `old`).
  """
  keep_NxT, _, lp_NxT, a_NxT, w_NxT = _tokens(mask, logp=logp, A=A,
                                              w=1.0 if w is None else w)
  return _out(keep_NxT, -w_NxT * a_NxT * lp_NxT)


# ---------------------------------------------------------------------------- KL (3.3)

KL_CLAMPS = ("verl", "openrlhf", None)


def _kl(logp, ref, mask, kind, clamp):
  _check(clamp in KL_CLAMPS, f"KL clamp must be one of {KL_CLAMPS}, got {clamp!r}.")
  if mask is None:
    keep_NxT = None
    x_NxT = jnp.asarray(logp, _f32) - sg(jnp.asarray(ref, _f32))
  else:
    keep_NxT, _, lp_NxT, ref_NxT = _tokens(mask, logp=logp, ref=ref)
    x_NxT = lp_NxT - ref_NxT
  if kind == "k1":
    k_NxT = x_NxT
  elif kind == "k2":
    k_NxT = 0.5 * jnp.square(x_NxT)
  elif kind == "abs":
    k_NxT = jnp.abs(x_NxT)
  else:  # k3 = exp(-x) - 1 + x
    if clamp == "verl":
      x_NxT = jnp.clip(x_NxT, -LR_CLIP, LR_CLIP)
    k_NxT = jnp.expm1(jnp.minimum(-x_NxT, EXP_MAX)) + x_NxT
    if clamp == "verl":
      k_NxT = jnp.clip(k_NxT, -10.0, 10.0)
  if clamp == "openrlhf":
    k_NxT = jnp.clip(k_NxT, -10.0, 10.0)
  return k_NxT if keep_NxT is None else jnp.where(keep_NxT, k_NxT, 0.0)


def kl_k1(logp, ref, mask=None, *, clamp="verl"):
  """k1 = x = logp - ref per token [N,T] (unbiased, high variance; verl `kl`).

  `clamp`: "verl" (none for k1), "openrlhf" (value clipped to +-10), None. With `mask`,
  masked slots are 0 and carry no gradient. *Approximating KL Divergence* (Schulman);
  METHODS id `kl_k1`.
  """
  return _kl(logp, ref, mask, "k1", clamp)


def kl_k2(logp, ref, mask=None, *, clamp="verl"):
  """k2 = x^2 / 2 per token [N,T] (verl `mse`); clamp and mask as `kl_k1`. METHODS id `kl_k2`."""
  return _kl(logp, ref, mask, "k2", clamp)


def kl_k3(logp, ref, mask=None, *, clamp="verl"):
  """k3 = expm1(-x) + x per token [N,T] (verl `low_var_kl`, TRL GRPO's KL term).

  `clamp="verl"`: x clipped to +-20 and k3 to +-10; "openrlhf": k3 clipped to +-10; None:
  unclipped (the exponent is still capped at 80 so the value stays finite). METHODS id
  `kl_k3`.
  """
  return _kl(logp, ref, mask, "k3", clamp)


def kl_abs(logp, ref, mask=None, *, clamp="verl"):
  """|x| per token [N,T] (verl `abs`); clamp and mask as `kl_k1`. METHODS id `kl_abs`."""
  return _kl(logp, ref, mask, "abs", clamp)


def kl_st(logp, ref, mask=None, *, base="k3", clamp="verl"):
  """Straight-through KL: k2 - sg(k2) + sg(k_base); the value of `base`, the gradient of k2.

  verl `k1+` / `k3+`. k2 is unclamped (as in verl); `clamp` applies to the base value.
  METHODS id `kl_st`.
  """
  _check(base in ("k1", "k2", "k3", "abs"), f"kl_st: unknown base {base!r}.")
  k2 = _kl(logp, ref, mask, "k2", None)
  return k2 - sg(k2) + sg(_kl(logp, ref, mask, base, clamp))


def _kl_plus(base):
  def fn(logp, ref, mask=None, *, clamp="verl"):
    return kl_st(logp, ref, mask, base=base, clamp=clamp)
  fn.__name__ = fn.__qualname__ = f"kl_{base}_st"
  fn.__doc__ = f"`kl_st(..., base={base!r})` (verl `{base}+`)."
  return fn


KL_ESTIMATORS: dict[str, Callable] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "abs": kl_abs,
    "k1+": _kl_plus("k1"), "k3+": _kl_plus("k3"),
    # verl spellings
    "kl": kl_k1, "mse": kl_k2, "low_var_kl": kl_k3,
}


def kl_estimator(name: str) -> Callable:
  """The KL estimator `name` (KL_ESTIMATORS); ValueError listing the names if unknown."""
  if name not in KL_ESTIMATORS:
    raise ValueError(f"Unknown KL estimator {name!r}; expected one of {sorted(KL_ESTIMATORS)}.")
  return KL_ESTIMATORS[name]


def kl_penalty_in_reward(old, ref, mask, *, beta, estimator="k1", clamp="verl"):
  """Per-token KL penalty beta * k(sg(old), ref) [N,T], to subtract from the token rewards.

  Uses the behaviour log-probs (no gradient) before the advantage is computed; masked slots
  are 0. beta: 0.01 (OpenRLHF), 0.05 (TRL PPO). *Fine-Tuning Language Models from Human
  Preferences*; METHODS id `kl_in_reward`.
  """
  return sg(beta * kl_estimator(estimator)(sg(jnp.asarray(old, _f32)), ref, mask, clamp=clamp))


def adaptive_kl_update(beta, kl, n_steps, *, target=0.1, horizon=10000):
  """Adaptive KL coefficient: beta * (1 + clip(kl/target - 1, -0.2, 0.2) * n_steps / horizon).

  `kl` is the measured mean KL of the step, `n_steps` the samples (or steps) since the last
  update. Pure; keep beta in the train state. *Fine-Tuning Language Models from Human
  Preferences*; METHODS id `adaptive_kl` (verl defaults: beta 0.001, target 0.1, horizon
  10000).
  """
  if _concrete(target):
    _check(target > 0, f"adaptive_kl_update: target must be > 0, got {target}.")
  if _concrete(horizon):
    _check(horizon > 0, f"adaptive_kl_update: horizon must be > 0, got {horizon}.")
  e = jnp.clip(jnp.asarray(kl, _f32) / target - 1.0, -0.2, 0.2)
  return jnp.asarray(beta, _f32) * (1.0 + e * n_steps / horizon)


class AdaptiveKL(NamedTuple):
  """Adaptive-KL settings; `update(beta, kl, n_steps)` is `adaptive_kl_update` (METHODS 3.3)."""
  init_beta: float = 0.001
  target: float = 0.1
  horizon: int = 10000

  def init(self):
    return jnp.asarray(self.init_beta, _f32)

  def update(self, beta, kl, n_steps):
    return adaptive_kl_update(beta, kl, n_steps, target=self.target, horizon=self.horizon)


# ---------------------------------------------------------------------------- aggregation (3.4)


def _mode(mode):
  _check(mode in MODES, f"Unknown aggregation mode {mode!r}; expected one of {MODES}.")


def masked_sum(x, mask) -> jnp.ndarray:
  """sum(m * x) over all axes, with masked slots contributing exactly 0 (even if x is NaN)."""
  m_NxT = jnp.asarray(mask, _f32)
  return jnp.sum(jnp.where(m_NxT != 0, m_NxT * jnp.asarray(x, _f32), 0.0))


def numerator(l, mask, mode: str) -> jnp.ndarray:
  """This (micro-)batch's share of the aggregated loss, before the global denominator.

  token-mean, seq-mean-token-sum(-norm): sum l m; seq-mean-token-mean: sum_i sum_t l m /
  max(L_i, 1). Shapes: l, mask [N,T]. METHODS 3.4.
  """
  _mode(mode)
  m_NxT = jnp.asarray(mask, _f32)
  lm_NxT = jnp.where(m_NxT != 0, m_NxT * jnp.asarray(l, _f32), 0.0)
  if mode == "seq-mean-token-mean":
    return jnp.sum(jnp.sum(lm_NxT, axis=-1) / jnp.maximum(_lengths(m_NxT), 1.0))
  return jnp.sum(lm_NxT)


def denominator(mask, mode: str, *, norm_const=None, norm="verl") -> jnp.ndarray:
  """The global normaliser of `mode`, computed once on the step's global mask [N,T].

  token-mean: max(N_tok, 1); seq-mean-token-mean / -token-sum: max(N_seq, 1) with
  N_seq = #{L_i > 0}; seq-mean-token-sum-norm (Dr. GRPO): `norm="verl"` C, `norm="trl"`
  max(N_seq, 1) * C, with C = `norm_const` (default: the padded width T; pass a constant
  such as the max response length so it does not vary with padding). METHODS 3.4.
  """
  _mode(mode)
  _check(norm in ("verl", "trl"), f"denominator: norm must be 'verl' or 'trl', got {norm!r}.")
  m_NxT = jnp.asarray(mask, _f32)
  m_NxT = jnp.where(m_NxT != 0, m_NxT, 0.0)
  if mode == "token-mean":
    return jnp.maximum(jnp.sum(m_NxT), 1.0)
  n_seq = jnp.maximum(jnp.sum(_lengths(m_NxT) > 0).astype(_f32), 1.0)
  if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
    return n_seq
  c = jnp.asarray(m_NxT.shape[-1] if norm_const is None else norm_const, _f32)
  return c if norm == "verl" else n_seq * c


def aggregate(l, mask, mode: str = "token-mean", **kw) -> jnp.ndarray:
  """numerator(l, mask, mode) / denominator(mask, mode, **kw) on one (global) batch.

  An all-masked batch gives 0 with zero gradient. For micro-batches or shards use the global
  `denominator` and sum `numerator / denom` (METHODS 3.4, global rule).
  """
  return numerator(l, mask, mode) / denominator(mask, mode, **kw)


# ---------------------------------------------------------------------------- other terms


def entropy_bonus(H, mask, mode: str = "token-mean", denom=None, *, coef):
  """Entropy term to ADD to the loss: -coef * numerator(H, mask, mode) / denom (a scalar).

  H [N,T] per-token entropies (`logsumexp(z) - sum softmax(z) z`, computed elsewhere in
  vocab chunks). `denom` is the global `denominator(mask, mode)` (computed here when None).
  Same mask and aggregation as the policy term; coef 0 by default in the recipes.
  METHODS id `entropy_bonus`.
  """
  d = denominator(mask, mode) if denom is None else denom
  return -coef * numerator(H, mask, mode) / d


def value_loss(V, V_old, Ret, mask, *, clip_eps=0.2):
  """Clipped value loss l = 0.5 max((V - Ret)^2, (clip(V, V_old +- eps) - Ret)^2) [N,T].

  clip_eps 0.2 (TRL), 0.5 (verl); None disables the clipped term. Returns `(l, aux)` like the
  policy losses; aux: clipped (the clipped error is the larger). *Proximal Policy
  Optimization Algorithms*; METHODS id `value_loss`. Shapes: V, V_old, Ret, mask [N,T].
  """
  keep_NxT, _, v_NxT, vold_NxT, ret_NxT = _tokens(mask, V=V, V_old=V_old, Ret=Ret)
  e_NxT = jnp.square(v_NxT - ret_NxT)
  if clip_eps is None:
    return _out(keep_NxT, 0.5 * e_NxT, clipped=jnp.zeros_like(e_NxT))
  ec_NxT = jnp.square(jnp.clip(v_NxT, vold_NxT - clip_eps, vold_NxT + clip_eps) - ret_NxT)
  return _out(keep_NxT, 0.5 * jnp.maximum(e_NxT, ec_NxT), clipped=ec_NxT > e_NxT)


def _log(x):
  return math.log(x) if _concrete(x) else jnp.log(x)


def rollout_is_weights(old, samp, mask, *, level="token", mode="tis", cap=2.0, lo=None, hi=None,
                       length_norm=False, keep_ratio=True):
  """Rollout (trainer vs sampler) importance weights sg(w) [N,T] to multiply the policy term.

  lw = m (old - samp) per token (`level="token"`) or its row sum (`"sequence"`, divided by
  max(L_i,1) if `length_norm`), broadcast over the row. `mode="tis"`: w = exp(min(lw,
  log cap)). `mode="mis"`: w = exp(lw) [log lo <= lw <= log hi] (hi defaults to cap, lo to
  no lower bound); `keep_ratio=False` gives verl's 0/1 rejection weights. Comparisons are in
  log space. cap 2 (verl), 3 with sequence masking (TRL); length-normalised band [0.999,
  1.001]. Masked slots get 0. Apply as `l * w` to the policy term only (`pg_loss` takes
  `w=`). METHODS id `rollout_is_weights` (TIS/MIS).
  """
  _check(level in ("token", "sequence"), f"rollout_is_weights: unknown level {level!r}.")
  _check(mode in ("tis", "mis"), f"rollout_is_weights: unknown mode {mode!r}.")
  keep_NxT, m_NxT, old_NxT, samp_NxT = _tokens(mask, old=old, samp=samp)
  lw_NxT = old_NxT - samp_NxT
  if level == "sequence":
    lw_N = jnp.sum(lw_NxT, axis=-1)
    if length_norm:
      lw_N = lw_N / jnp.maximum(_lengths(m_NxT), 1.0)
    lw_NxT = jnp.broadcast_to(lw_N[:, None], m_NxT.shape)
  if mode == "tis":
    w_NxT = jnp.exp(jnp.minimum(lw_NxT, _log(cap)))
  else:
    log_hi = _log(cap if hi is None else hi)
    band_NxT = lw_NxT <= log_hi
    if lo is not None:
      band_NxT &= lw_NxT >= _log(lo)
    w_NxT = jnp.where(band_NxT, jnp.exp(jnp.minimum(lw_NxT, log_hi)) if keep_ratio else 1.0, 0.0)
  return sg(jnp.where(keep_NxT, w_NxT, 0.0))


def raft_loss(logp, mask, w):
  """RAFT filtered-SFT loss terms: (loss_sum, denom) = (-sum_i w_i sum_t m logp, sum_i w_i L_i).

  The step loss is loss_sum / max(denom, 1) with both summed over the global batch (so
  micro-batches and shards add up exactly). w [N] from `raft_weights` (top-k per group;
  `alignjax.rl.filters`). *RAFT: Reward rAnked FineTuning for Generative Foundation Model
  Alignment*; METHODS id `raft_weights`. Shapes: logp, mask [N,T]; w [N].
  """
  _, m_NxT, lp_NxT, w_NxT = _tokens(mask, logp=logp, w=w)
  return -jnp.sum(jnp.where(w_NxT != 0, w_NxT * m_NxT * lp_NxT, 0.0)), jnp.sum(w_NxT * m_NxT)


def superhf_loss(logp, ref, mask, w, *, beta):
  """SuperHF: NLL of the selected samples plus a k3 KL prior, as (loss_sum, denom).

  loss_sum = sum_i w_i sum_t m (-logp + beta k3(logp - ref)), denom = sum_i w_i L_i; the step
  loss is loss_sum / max(denom, 1) over the global batch. w [N] selects the top-1 of n per
  prompt (`recalled - verify`). *SuperHF: Supervised Iterative Learning from Human
  Feedback*; METHODS id `superhf_loss`. Shapes: logp, ref, mask [N,T]; w [N].
  """
  _, m_NxT, lp_NxT, w_NxT = _tokens(mask, logp=logp, w=w)
  l_NxT = -lp_NxT + beta * kl_k3(logp, ref, mask)
  return jnp.sum(jnp.where(w_NxT != 0, w_NxT * m_NxT * l_NxT, 0.0)), jnp.sum(w_NxT * m_NxT)
