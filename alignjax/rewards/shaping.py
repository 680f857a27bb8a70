"""Reward transforms and combinators for RL (METHODS.md 4.1 `reward_noise`, 4.2, 4.3).

See `docs/reward_shaping.md`. Contract:
- pure and jittable jnp functions; hyper-parameters are keyword-only plain Python values (static
  under jit). The positional parameter names are inputs from the vocabulary `INPUTS`, which the
  RL trainer passes by keyword (`required_inputs(fn)`, `call(fn, inputs, **params)`);
- `N = B*G` samples, consecutive rows per prompt; `group [N]` holds the prompt index. NaN marks an
  unscorable reward (METHODS section 3 conventions); each docstring says whether NaN propagates
  or is skipped. No transform turns a NaN reward into a finite reward unless its docstring says so;
- outputs are wrapped in `stop_gradient`, float32 (float64 when the input is float64 under x64).
  `output_of(fn)` names the INPUTS entry the result replaces in a pipeline (`run_pipeline`);
- stateful transforms (`is_stateful`) take `state` (None on the first call: initialised from the
  hyper-parameters) and return `(value, new_state)`.
"""

from __future__ import annotations

import collections.abc
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from alignjax.rewards import combine
from alignjax.rewards.registry import _plain  # ConfigDict -> plain dicts and lists

sg = jax.lax.stop_gradient

INPUTS = {
    "r": "[N] combined reward per sample (NaN = unscorable); N = B*G, consecutive rows per group",
    "R": "[N,K] per-function rewards (columns = the configured reward functions)",
    "group": "[N] int prompt index of each sample",
    "step": "scalar int training step",
    "r_ref": "[N] or [N,K] reference rewards (e.g. of SFT/reference responses to the prompt)",
    "dataset": "[N] int dataset id of each sample",
    "key": "jax PRNG key (fresh per call)",
    "state": "pytree of a stateful transform (None on the first call)",
    "steps": "[N,S] per-step (process) or per-turn rewards",
    "step_mask": "[N,S] valid-step mask (float or bool; nonzero = step)",
    "sim": "[N] cosine similarity of the prompt and reference embeddings (e.g. CLIP)",
    "seg_rewards": "[N,K,S] segment rewards of K fine-grained reward models",
    "seg_end": "[N,S] int token index of each segment's last token (< 0 = no segment)",
    "mask": "[N,T] completion-token mask (float or bool)",
}
OUTPUTS = ("r", "R", "steps", "weights", "token_rewards")
NAN_MODES = ("skip", "propagate")
NOISE_MODES = ("flip", "gaussian")
_CHOICES = {"nan": NAN_MODES, ("reward_noise", "mode"): NOISE_MODES,
            ("ensemble_aggregate", "mode"): ("mean", "median", "min", "mean_minus_std")}
EPS = 1e-6

TRANSFORMS: dict[str, Callable] = {}


# ---------------------------------------------------------------------------- registry


def required_inputs(fn) -> tuple[str, ...]:
  """Names of `fn`'s positional parameters: the INPUTS the trainer must pass. `fn` may be a
  name."""
  fn = get(fn) if isinstance(fn, str) else fn
  return tuple(p.name for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


def register(name: str, *, output: str = "r", stateful: bool = False):
  """Decorator: registers `fn` in TRANSFORMS under `name`; returns `fn` unchanged.

  `output` (one of OUTPUTS) is the INPUTS entry the result replaces in a pipeline ("weights":
  per-sample loss weights). `stateful=True`: `fn` takes `state` and returns (value, new_state).
  Every positional parameter must be a name from INPUTS.
  """
  _check(output in OUTPUTS, f"Transform {name!r}: output must be one of {OUTPUTS}, got {output!r}.")

  def wrap(fn):
    if name in TRANSFORMS and TRANSFORMS[name] is not fn:
      raise ValueError(f"Reward transform {name!r} is already registered (by "
                       f"{TRANSFORMS[name].__module__}.{TRANSFORMS[name].__qualname__}).")
    need = required_inputs(fn)
    unknown = [n for n in need if n not in INPUTS]
    _check(not unknown, f"Reward transform {name!r}: positional parameters {unknown} are not in "
           f"INPUTS ({', '.join(INPUTS)}); make hyper-parameters keyword-only.")
    _check(stateful == ("state" in need),
           f"Reward transform {name!r}: stateful={stateful} but 'state' is "
           f"{'' if 'state' in need else 'not '}a positional parameter.")
    fn.output, fn.stateful = output, stateful
    TRANSFORMS[name] = fn
    return fn

  return wrap


def names() -> list[str]:
  """Sorted registered transform names."""
  return sorted(TRANSFORMS)


def get(name: str) -> Callable:
  """The transform registered under `name`; ValueError listing the registered names if none."""
  if name not in TRANSFORMS:
    raise ValueError(f"Unknown reward transform {name!r}. Registered transforms: "
                     f"{', '.join(names())}.")
  return TRANSFORMS[name]


def output_of(fn) -> str:
  """The INPUTS entry (or "weights") that the transform's result replaces."""
  return (get(fn) if isinstance(fn, str) else fn).output


def is_stateful(fn) -> bool:
  """True if the transform takes `state` and returns (value, new_state)."""
  return bool((get(fn) if isinstance(fn, str) else fn).stateful)


def defaults(fn) -> dict:
  """Keyword-only hyper-parameters of the transform (or its name) with their defaults."""
  fn = get(fn) if isinstance(fn, str) else fn
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def call(fn, inputs: dict, **params):
  """`fn(**{k: inputs[k] for k in required_inputs(fn)}, **params)`; `fn` may be a name.

  `inputs` may hold more names than `fn` needs; a missing one raises ValueError (a missing
  `state` is None: first call).
  """
  fn = get(fn) if isinstance(fn, str) else fn
  need = required_inputs(fn)
  missing = [k for k in need if k not in inputs and k != "state"]
  _check(not missing, f"Reward transform {fn.__name__}: missing inputs {missing} (see INPUTS).")
  return fn(**{k: inputs.get(k) for k in need}, **params)


def _hashable(v):
  if isinstance(v, (list, tuple)):
    return tuple(_hashable(x) for x in v)
  return v


def parse_transforms(specs) -> list[tuple[str, Callable, dict]]:
  """`config.rl.reward_transforms` -> [(name, fn, params)], in order.

  `specs` is None, a comma-separated string of names, or a list of names and mappings with keys
  `name` and optional `params` (ConfigDicts are accepted). Unknown names, keys or parameters
  raise ValueError naming the entry; list values become tuples (static under jit).
  """
  specs = _plain(specs)
  if isinstance(specs, str):
    specs = [n.strip() for n in specs.split(",") if n.strip()]
  out = []
  for i, spec in enumerate(specs or ()):
    where = f"rl.reward_transforms[{i}]"
    if isinstance(spec, str):
      spec = {"name": spec}
    _check(isinstance(spec, collections.abc.Mapping),
           f"{where}: expected a name or a dict with 'name' and 'params', got {spec!r}.")
    bad = [k for k in spec if k not in ("name", "params")]
    _check(not bad, f"{where}: unknown keys {bad}; valid keys: name, params.")
    _check("name" in spec, f"{where}: missing 'name'.")
    try:
      fn = get(spec["name"])
    except ValueError as e:
      raise ValueError(f"{where}.name: {e}") from None
    params = {k: _hashable(v) for k, v in dict(spec.get("params") or {}).items()}
    valid = defaults(fn)
    bad = [k for k in params if k not in valid]
    _check(not bad, f"{where}.params: {spec['name']} has no parameters {bad}. Valid parameters: "
           f"{', '.join(valid) or '(none)'}.")
    for k, v in params.items():
      choices = _CHOICES.get((spec["name"], k), _CHOICES.get(k))
      _check(choices is None or v in choices,
             f"{where}.params.{k}: must be one of {choices}, got {v!r}.")
    out.append((spec["name"], fn, params))
  return out


def run_pipeline(specs, inputs: dict, states=None, *, reward_weights=None):
  """Applies the transforms of `specs` (see `parse_transforms`) in order: (inputs, new_states).

  Each result replaces `inputs[output_of(fn)]` ("weights" multiplies any previous weights).
  `states` holds one entry per spec (None for stateless ones and on the first call). After a
  transform that outputs `R`, `r` is recomputed as `weighted_sum(R, reward_weights)` (NaN skipped)
  when `reward_weights` [K] is given, and left stale otherwise. Jittable when `specs` is static.
  """
  parsed = (specs if isinstance(specs, list) and specs and isinstance(specs[0], tuple)
            and callable(specs[0][1]) else parse_transforms(specs))
  states = list(states) if states is not None else [None] * len(parsed)
  _check(len(states) == len(parsed), f"run_pipeline: {len(states)} states for {len(parsed)} "
         f"transforms.")
  x, new_states = dict(inputs), []
  for (_, fn, params), st in zip(parsed, states):
    out = call(fn, {**x, "state": st}, **params)
    if fn.stateful:
      out, st = out
    if fn.output == "weights" and "weights" in x:
      out = x["weights"] * out
    x[fn.output] = out
    if fn.output == "R" and reward_weights is not None:
      x["r"] = combine.weighted_sum(out, jnp.asarray(reward_weights, jnp.float32))
    new_states.append(st)
  return x, new_states


# ---------------------------------------------------------------------------- helpers


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


def _choice(value, choices, what):
  _check(value in choices, f"{what} must be one of {choices}, got {value!r}.")


def _fl(x, name="x", ndim=None):
  """x as float32 (float64 if it already is float64), with an optional rank check."""
  x = jnp.asarray(x)
  _check(ndim is None or x.ndim in (ndim if isinstance(ndim, tuple) else (ndim,)),
         f"{name} must have rank {ndim}, got shape {x.shape}.")
  return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def _rows(x, n, name):
  _check(x.shape[0] == n, f"{name} must have N={n} rows, got shape {x.shape}.")
  return x


def _vec(v, k, name, dt):
  """A Python scalar or length-k sequence as a [k] array."""
  a = jnp.asarray(v, dt)
  _check(a.ndim == 0 or a.shape == (k,), f"{name} must be a scalar or have {k} entries, got {v!r}.")
  return jnp.broadcast_to(a, (k,))


def _nan_sum(v_NK, w_K, nan):
  """sum_k w_k v_k; "skip": NaN terms add 0 (NaN if all are NaN); "propagate": any NaN -> NaN."""
  _choice(nan, NAN_MODES, "nan")
  if nan == "propagate":
    return jnp.sum(v_NK * w_K, axis=1)
  ok_NK = ~jnp.isnan(v_NK)
  s_N = jnp.sum(jnp.where(ok_NK, v_NK * w_K, 0.0), axis=1)
  return jnp.where(jnp.any(ok_NK, axis=1), s_N, jnp.nan)


def _same_group(group, n):
  g = _rows(jnp.asarray(group), n, "group")
  return g[:, None] == g[None, :]


def _col(R_NK, c, name):
  _check(-R_NK.shape[1] <= c < R_NK.shape[1], f"{name}={c} is out of range for K={R_NK.shape[1]}.")
  return R_NK[:, c]


# ---------------------------------------------------------------------------- 4.1 noise


@register("reward_noise")
def reward_noise(r, key, *, p=0.1, mode="flip", sigma=0.1, r_min=0.0, r_max=1.0):
  """Noisy rewards: flip `r -> r_max + r_min - r` with probability p, or add N(0, sigma^2).

  *The Climb Carves Wisdom Deeper Than the Summit: On the Noisy Rewards in Learning to Reason*
  (40% flipped rewards still train; `abstract`); METHODS.md 4.1 `reward_noise`.
  mode="flip": u ~ U(0,1) per sample, flip where u < p; r_min / r_max None = the batch's
  min / max over finite rewards. mode="gaussian": r + sigma*eps for every sample (p unused).
  Reproducible for a given `key`. NaN passes through. Shapes: r [N] (any shape) -> same.
  """
  _choice(mode, NOISE_MODES, "reward_noise: mode")
  x = _fl(r, "r")
  if mode == "gaussian":
    return sg(x + sigma * jax.random.normal(key, x.shape, x.dtype))
  lo = jnp.nanmin(x) if r_min is None else r_min
  hi = jnp.nanmax(x) if r_max is None else r_max
  flip = jax.random.uniform(key, x.shape) < p
  return sg(jnp.where(flip, hi + lo - x, x))


# ---------------------------------------------------------------------------- 4.2 transforms


def median_norm_init(*, num_datasets=0, medians=None):
  """Initial `median_norm` state {"median": [D]}: the given `medians` (NaN = unknown yet) or
  `num_datasets` NaNs."""
  if medians is not None:
    return {"median": jnp.asarray(medians, jnp.float32).reshape(-1)}
  _check(num_datasets > 0, "median_norm: give num_datasets > 0 or precomputed medians.")
  return {"median": jnp.full((num_datasets,), jnp.nan, jnp.float32)}


def median_norm_update(state, r, dataset, *, rate=0.1):
  """Running per-dataset median: EMA of the batch medians (METHODS.md 4.2 `median_norm`, proposed).

  For each dataset d with finite rewards in the batch: `m_d <- bm_d` if m_d is NaN (first
  batch), else `(1-rate)*m_d + rate*bm_d`, with bm_d the median (mean of the two middle values
  for an even count) of the batch's finite rewards of d. Other datasets, ids outside [0, D) and
  NaN rewards are ignored. Shapes: state {"median": [D]}, r [N], dataset [N] -> new state.
  """
  med_D = jnp.asarray(state["median"])
  x_N = _fl(r, "r", 1)
  d_N = _rows(jnp.asarray(dataset, jnp.int32), x_N.shape[0], "dataset")
  D, N = med_D.shape[0], x_N.shape[0]
  m_DN = (d_N[None, :] == jnp.arange(D)[:, None]) & ~jnp.isnan(x_N)[None, :]
  s_DN = jnp.sort(jnp.where(m_DN, x_N[None, :], jnp.inf), axis=1)
  n_D = jnp.sum(m_DN, axis=1)
  lo = jnp.take_along_axis(s_DN, jnp.clip((n_D - 1) // 2, 0, N - 1)[:, None], axis=1)[:, 0]
  hi = jnp.take_along_axis(s_DN, jnp.clip(n_D // 2, 0, N - 1)[:, None], axis=1)[:, 0]
  bm_D = 0.5 * (lo + hi).astype(med_D.dtype)
  new = jnp.where(jnp.isnan(med_D), bm_D, (1 - rate) * med_D + rate * bm_D)
  return {"median": sg(jnp.where(n_D > 0, new, med_D))}


@register("median_norm", stateful=True)
def median_norm(r, dataset, state, *, c=0.5, r_max=1.0, rate=0.1, update=True, num_datasets=0,
                medians=None):
  """Cross-dataset median normalisation: each dataset's median maps to the common value c.

  *MedGRPO: Multi-Task Reinforcement Learning for Heterogeneous Medical Video Understanding*;
  METHODS.md 4.2 `median_norm`. The mapping of medians is `abstract`; this form is `proposed`:
  with md = max(median_d, 1e-6), `r' = c*r/md` if r <= md, else
  `c + (1-c)*(r-md)/max(r_max-md, 1e-6)`.
  Medians are state["median"][d] (D = num_datasets, or precomputed `medians`, e.g. from SFT
  samples, with update=False). update=True first folds this batch into the running medians
  (`median_norm_update`, `rate`), then normalises with them. Unknown dataset (id outside
  [0, D) or no median yet): identity. NaN r propagates. Stateful: returns (r' [N], new_state).
  Shapes: r [N], dataset [N] int.
  """
  if state is None:
    state = median_norm_init(num_datasets=num_datasets, medians=medians)
  x_N = _fl(r, "r", 1)
  d_N = _rows(jnp.asarray(dataset, jnp.int32), x_N.shape[0], "dataset")
  if update:
    state = median_norm_update(state, x_N, d_N, rate=rate)
  med_D = state["median"]
  D = med_D.shape[0]
  md_raw = med_D[jnp.clip(d_N, 0, D - 1)].astype(x_N.dtype)
  known = (d_N >= 0) & (d_N < D) & ~jnp.isnan(md_raw)
  md = jnp.maximum(md_raw, EPS)
  low = c * x_N / md
  high = c + (1 - c) * (x_N - md) / jnp.maximum(r_max - md, EPS)
  out = jnp.where(known, jnp.where(x_N <= md, low, high), x_N)
  return sg(out), jax.tree.map(sg, state)


@register("lsc_transform")
def lsc_transform(R, r_ref, *, weights=None, nan="skip"):
  """Log-sigmoid-centred transform `u = -softplus(-(r - r_ref)) = log sigmoid(r - r_ref)` (<= 0,
  steepest for poor outputs); summed over K as a logical AND: `U = sum_k w_k u_k`.

  *Transforming and Combining Rewards for Aligning Large Language Models*; METHODS.md 4.2
  `lsc_transform`. The transform and AND-sum are `abstract`; r_ref (SFT/reference response's
  reward, or a base-policy quantile) is `recalled - verify`.
  R [N,K] with r_ref [N,K] (per property), [N] (one per sample) or a scalar -> U [N] (weights
  [K], default 1). R [N] with r_ref [N] -> u [N] (no sum). NaN in R or r_ref makes u_k NaN;
  the sum follows `nan` as `weighted_sum`: "skip" drops NaN terms (NaN only if all are NaN; a
  skipped property counts as satisfied, u = 0), "propagate" gives NaN for any NaN term.
  """
  x = _fl(R, "R", (1, 2))
  ref = _fl(r_ref, "r_ref")
  if x.ndim == 2 and ref.ndim == 1:
    ref = ref[:, None]
  _check(ref.ndim == 0 or ref.shape in (x.shape, (x.shape[0], 1)),
         f"lsc_transform: r_ref must be a scalar, [N] or R's shape {x.shape}, got {ref.shape}.")
  u = -jax.nn.softplus(-(x - ref.astype(x.dtype)))
  if x.ndim == 1:
    return sg(u)
  w_K = jnp.ones(x.shape[1], x.dtype) if weights is None else _vec(weights, x.shape[1], "weights",
                                                                  x.dtype)
  return sg(_nan_sum(u, w_K, nan))


@register("par_transform")
def par_transform(r, r_ref):
  """Preference As Reward: `r' = mean_k sigmoid(r - r_ref_k)` over K reference rewards (K=1
  default): bounded in (0,1) and centred (0.5 at r = r_ref).

  *Reward Shaping to Mitigate Reward Hacking in RLHF*; METHODS.md 4.2 `par_transform`. Principles
  `abstract`, formula `recalled - verify`. Shapes: r [N], r_ref [N,K] or [N] -> [N].
  NaN r propagates; NaN references are skipped (mean over the finite ones; NaN if none).
  """
  x_N = _fl(r, "r", 1)
  ref = _rows(_fl(r_ref, "r_ref", (1, 2)), x_N.shape[0], "r_ref").astype(x_N.dtype)
  ref_NK = ref[:, None] if ref.ndim == 1 else ref
  ok_NK = ~jnp.isnan(ref_NK)
  s_NK = jax.nn.sigmoid(x_N[:, None] - jnp.where(ok_NK, ref_NK, 0.0))
  n_N = jnp.sum(ok_NK, axis=1)
  out = jnp.sum(jnp.where(ok_NK, s_NK, 0.0), axis=1) / jnp.maximum(n_N, 1)
  return sg(jnp.where((n_N > 0) & ~jnp.isnan(x_N), out, jnp.nan))


def _steps(steps, step_mask):
  s_NS = _fl(steps, "steps", 2)
  m = jnp.asarray(step_mask)
  _check(m.shape == s_NS.shape, f"step_mask {m.shape} must have the shape of steps {s_NS.shape}.")
  return s_NS, m != 0


@register("prm_clip", output="steps")
def prm_clip(steps, step_mask, *, eta=0.5):
  """PRM Clip: `r_k' = min(r_k - eta, 0)` per valid step (bounded above by 0, so the return is
  bounded and more steps cannot earn more).

  *On Designing Effective RL Reward at Training Time for LLM Reasoning*; METHODS.md 4.2
  `prm_clip`. Bounded return `abstract`; formula `recalled - verify`; default eta proposed.
  Shapes: steps, step_mask [N,S] -> [N,S], 0 outside the mask. NaN steps propagate.
  Put each step reward on its step's last token and the success reward at EOS.
  """
  s_NS, m_NS = _steps(steps, step_mask)
  return sg(jnp.where(m_NS, jnp.minimum(s_NS - eta, 0.0), 0.0))


@register("prm_delta", output="steps")
def prm_delta(steps, step_mask):
  """PRM Delta: `r_k' = r_k - r_{k+1}` (next valid step), the last valid step keeps r_K, so the
  return from step k telescopes to r_k.

  *On Designing Effective RL Reward at Training Time for LLM Reasoning*; METHODS.md 4.2
  `prm_delta`. Bounded return `abstract`; formula `recalled - verify`. Shapes: steps, step_mask
  [N,S] -> [N,S], 0 outside the mask (masked-out steps are skipped, not differenced). A NaN
  step makes its own and the previous valid step's value NaN.
  """
  s_NS, m_NS = _steps(steps, step_mask)
  S = s_NS.shape[1]
  pos_NS = jnp.where(m_NS, jnp.arange(S), S)
  nxt_NS = jnp.concatenate([jax.lax.cummin(pos_NS, axis=1, reverse=True)[:, 1:],
                            jnp.full_like(pos_NS[:, :1], S)], axis=1)
  nv_NS = jnp.take_along_axis(s_NS, jnp.minimum(nxt_NS, S - 1), axis=1)
  return sg(jnp.where(m_NS, jnp.where(nxt_NS < S, s_NS - nv_NS, s_NS), 0.0))


@register("renorm", output="steps")
def renorm(steps, step_mask, r):
  """ReNorm: `r_k' = p_k + o - 1` with process rewards p_k in [0,1] and outcome o = r in {0,1}:
  failed runs get rewards <= 0.

  *Hybrid Reward Normalization for Process-supervised Non-verifiable Agentic Tasks*; METHODS.md
  4.2 `renorm`. Calibration `abstract`; formula `recalled - verify` (else proposed). Shapes:
  steps, step_mask [N,S], r [N] -> [N,S], 0 outside the mask. NaN p_k or o propagates.
  """
  s_NS, m_NS = _steps(steps, step_mask)
  o_N = _rows(_fl(r, "r", 1), s_NS.shape[0], "r").astype(s_NS.dtype)
  return sg(jnp.where(m_NS, s_NS + o_N[:, None] - 1.0, 0.0))


@register("gated_accumulation")
def gated_accumulation(r, steps, step_mask, *, tau=1.0):
  """Gated Reward Accumulation: `R = R_high + [R_high >= tau] * sum_t r_t`.

  *Stabilizing Long-term Multi-turn Reinforcement Learning with Gated Rewards*; METHODS.md 4.2
  `gated_accumulation` (`abstract`; default tau proposed). R_high = r [N]; turn rewards r_t =
  steps [N,S] on step_mask -> [N]. NaN R_high gives NaN; a NaN turn reward propagates only
  when the gate is open (a closed gate ignores the turns).
  """
  s_NS, m_NS = _steps(steps, step_mask)
  h_N = _rows(_fl(r, "r", 1), s_NS.shape[0], "r").astype(s_NS.dtype)
  acc_N = jnp.sum(jnp.where(m_NS, s_NS, 0.0), axis=1)
  return sg(h_N + jnp.where(h_N >= tau, acc_N, 0.0))


@register("difficulty_scale")
def difficulty_scale(r, r_ref, sim, group, *, a=1.0, b=1.0, k=1.0):
  """GRPO-S difficulty scaling: `r' = w*r`, `w = 1 + a*(1-sim) + b*(1-sigmoid(k*(mean_b r -
  r_ref)))`, w normalised to mean 1 over the batch's valid samples.

  *Inverse Reinforcement Learning with Dynamic Reward Scaling for LLM Alignment*; METHODS.md 4.2
  `difficulty_scale`. Hardness (CLIP similarity) and responsiveness (reward gap) `abstract`;
  this form `proposed`. mean_b r = mean of the finite r of the sample's group; r_ref = the
  reference reward of the prompt. Shapes: r, r_ref, sim [N], group [N] int -> [N].
  NaN propagates: a NaN r, r_ref or sim gives NaN; such samples are left out of mean_b (NaN r)
  and of the normalisation.
  """
  x_N = _fl(r, "r", 1)
  n = x_N.shape[0]
  ref_N = _rows(_fl(r_ref, "r_ref", 1), n, "r_ref").astype(x_N.dtype)
  sim_N = _rows(_fl(sim, "sim", 1), n, "sim").astype(x_N.dtype)
  ok_N = ~jnp.isnan(x_N)
  same_NN = _same_group(group, n) & ok_N[None, :]
  mean_N = (jnp.sum(jnp.where(same_NN, x_N[None, :], 0.0), axis=1)
            / jnp.maximum(jnp.sum(same_NN, axis=1), 1))
  w_N = 1 + a * (1 - sim_N) + b * (1 - jax.nn.sigmoid(k * (mean_N - ref_N)))
  ok_N = ok_N & ~jnp.isnan(w_N)
  wbar = jnp.sum(jnp.where(ok_N, w_N, 0.0)) / jnp.maximum(jnp.sum(ok_N), 1)
  return sg(jnp.where(ok_N, w_N / wbar * x_N, jnp.nan))


@register("trust_weight")
def trust_weight(R, group, step, *, out_col=0, think_col=1, alpha=0.3, decay_steps=500.0,
                 threshold=0.5, nan="propagate"):
  """Trust-GRPO: `r = r_out + gamma*alpha*exp(-t/decay_steps)*R_think`, `gamma = 1` if mu_c >=
  mu_w else `exp(mu_c - mu_w)`.

  *SophiaVL-R1: Reinforcing MLLMs Reasoning with Thinking Reward*; METHODS.md 4.2
  `trust_weight`. Mechanism `abstract`; constants (alpha .3, 500 steps) `recalled - verify`.
  r_out = R[:, out_col], R_think = R[:, think_col]; mu_c / mu_w = group mean R_think of the
  correct (r_out >= threshold) / wrong samples; a group without both (all-correct, all-wrong,
  single sample) gets R_think = 0. Shapes: R [N,K], group [N] int, step scalar -> [N].
  NaN r_out propagates. NaN R_think: "propagate" gives NaN where the thinking term is used;
  "skip" drops its term (r = r_out). Samples with a NaN in either column are left out of mu.
  """
  _choice(nan, NAN_MODES, "trust_weight: nan")
  R_NK = _fl(R, "R", 2)
  n = R_NK.shape[0]
  o_N, t_N = _col(R_NK, out_col, "out_col"), _col(R_NK, think_col, "think_col")
  ok_N = ~jnp.isnan(o_N) & ~jnp.isnan(t_N)
  same_NN = _same_group(group, n)
  corr_N = o_N >= threshold

  def gmean(sel_N):
    m_NN = same_NN & (ok_N & sel_N)[None, :]
    cnt_N = jnp.sum(m_NN, axis=1)
    return jnp.sum(jnp.where(m_NN, t_N[None, :], 0.0), axis=1) / jnp.maximum(cnt_N, 1), cnt_N

  mu_c, n_c = gmean(corr_N)
  mu_w, n_w = gmean(~corr_N)
  gamma = jnp.where(mu_c >= mu_w, 1.0, jnp.exp(mu_c - mu_w))
  coef = alpha * jnp.exp(-jnp.asarray(step, R_NK.dtype) / decay_steps)
  use = (n_c > 0) & (n_w > 0)
  if nan == "skip":
    use = use & ~jnp.isnan(t_N)
  return sg(o_N + jnp.where(use, gamma * coef * t_N, 0.0))


# ---------------------------------------------------------------------------- 4.3 combination


@register("weighted_sum")
def weighted_sum(R, *, weights=None, nan="skip"):
  """`sum_k w_k R[:, k]` (weights default 1): recombines R into r after R-output transforms.

  *Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach*;
  METHODS.md 4.3 `weighted_sum` (`abstract`); `alignjax.rewards.combine.weighted_sum`. NaN:
  "skip" drops NaN terms (NaN only if all are NaN), "propagate" gives NaN. R [N,K] -> [N].
  """
  R_NK = _fl(R, "R", 2)
  w_K = jnp.ones(R_NK.shape[1], R_NK.dtype) if weights is None else _vec(
      weights, R_NK.shape[1], "weights", R_NK.dtype)
  return sg(_nan_sum(R_NK, w_K, nan))


ENSEMBLE_MODES = ("mean", "median", "min", "mean_minus_std")


@register("ensemble_aggregate")
def ensemble_aggregate(R, *, mode="mean_minus_std", lam=1.0):
  """An ensemble of reward models as one reward: the columns of R are the members.

  *Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking*;
  METHODS.md 8.1 / `rm_ensemble` (conservative `min` and `mean - lam*std` from *Reward Model
  Ensembles Help Mitigate Overoptimization*). mode: mean | median | min | mean_minus_std
  (`mean_e R - lam * std_e R`, ddof 0) over the finite members of each row; NaN if none is
  finite. Shapes: R [N,E] -> [N]. Same values as `alignjax.losses.ensemble.aggregate` on
  finite inputs.
  """
  _choice(mode, ENSEMBLE_MODES, "ensemble_aggregate: mode")
  R_NE = _fl(R, "R", 2)
  ok = ~jnp.isnan(R_NE)
  cnt = jnp.sum(ok, axis=1)
  safe = jnp.maximum(cnt, 1)
  mean = jnp.sum(jnp.where(ok, R_NE, 0.0), axis=1) / safe
  if mode == "mean":
    out = mean
  elif mode == "median":
    out = jnp.nanmedian(jnp.where(ok, R_NE, jnp.nan), axis=1)
  elif mode == "min":
    out = jnp.min(jnp.where(ok, R_NE, jnp.inf), axis=1)
  else:
    var = jnp.sum(jnp.where(ok, (R_NE - mean[:, None]) ** 2, 0.0), axis=1) / safe
    out = mean - lam * jnp.sqrt(var)
  return sg(jnp.where(cnt > 0, out, jnp.nan))


@register("harmonic_mean")
def harmonic_mean(R, *, weights=None, sigmoid=False, nan="skip"):
  """lambda-Harmonic combination `H = sum_k w_k / sum_k(w_k / max(s_k, 1e-6))` (= METHODS'
  `1/sum_k(w_k/max(s_k,1e-6))` for weights summing to 1): the weakest objective dominates.

  *Subject-driven Text-to-Image Generation via Preference-based Reinforcement Learning*;
  METHODS.md 4.3 `harmonic_mean` (`recalled - verify`). s = R, or sigmoid(R) with sigmoid=True;
  s should lie in (0,1]. weights [K] default 1/K. Shapes: R [N,K] -> [N]. NaN: "skip" leaves
  NaN objectives out and renormalises the weights over the rest (NaN if all are NaN);
  "propagate" gives NaN for any NaN objective.
  """
  _choice(nan, NAN_MODES, "harmonic_mean: nan")
  R_NK = _fl(R, "R", 2)
  K = R_NK.shape[1]
  w_K = jnp.full(K, 1.0 / K, R_NK.dtype) if weights is None else _vec(weights, K, "weights",
                                                                     R_NK.dtype)
  s_NK = jax.nn.sigmoid(R_NK) if sigmoid else R_NK
  if nan == "propagate":
    return sg(jnp.sum(w_K) / jnp.sum(w_K / jnp.maximum(s_NK, EPS), axis=1))
  ok_NK = ~jnp.isnan(s_NK)
  num_N = jnp.sum(jnp.where(ok_NK, w_K, 0.0), axis=1)
  den_N = jnp.sum(jnp.where(ok_NK, w_K / jnp.maximum(jnp.where(ok_NK, s_NK, 1.0), EPS), 0.0),
                  axis=1)
  return sg(jnp.where(jnp.any(ok_NK, axis=1), num_N / den_N, jnp.nan))


@register("pareto_select", output="weights")
def pareto_select(R, group, *, per_group=True):
  """Pareto-front selection: loss weight 1 for non-dominated samples, 0 for the rest.

  *Parrot: Pareto-optimal Multi-Reward Reinforcement Learning Framework for Text-to-Image
  Generation*; METHODS.md 4.3 `pareto_select`. Pareto-optimal selection `abstract`; the 0/1
  weights `proposed`. `dom_ij = all_k(R_jk >= R_ik) & any_k(R_jk > R_ik)`, front_i = no j (of
  the same group if per_group, else of the batch) dominates i. Ties stay on the front. NaN
  counts as -inf; a row with every column NaN (unscorable) gets weight 0.
  Shapes: R [N,K], group [N] int -> weights [N] in {0, 1}.
  """
  R_NK = _fl(R, "R", 2)
  X = jnp.where(jnp.isnan(R_NK), -jnp.inf, R_NK)
  ge_NN = jnp.all(X[None, :, :] >= X[:, None, :], axis=-1)
  gt_NN = jnp.any(X[None, :, :] > X[:, None, :], axis=-1)
  dom_NN = ge_NN & gt_NN
  if per_group:
    dom_NN = dom_NN & _same_group(group, R_NK.shape[0])
  front_N = ~jnp.any(dom_NN, axis=1) & ~jnp.all(jnp.isnan(R_NK), axis=1)
  return sg(front_N.astype(R_NK.dtype))


def lagrangian_update(lam, R, *, theta=0.0, eta=0.01, lam_max=10.0):
  """Pure dual step `lam_i <- clip(lam_i - eta*(mean_n R_ni - theta_i), 0, lam_max)`.

  *Confronting Reward Model Overoptimization with Constrained RLHF*; METHODS.md 4.3
  `lagrangian_multi_reward` (`recalled - verify`). The mean is over finite entries; a column with
  none keeps its lam. Shapes: lam [K], R [N,K]; theta scalar or [K] -> [K].
  """
  R_NK = _fl(R, "R", 2)
  K = R_NK.shape[1]
  lam_K = jnp.asarray(lam, R_NK.dtype)
  ok_NK = ~jnp.isnan(R_NK)
  n_K = jnp.sum(ok_NK, axis=0)
  mean_K = jnp.sum(jnp.where(ok_NK, R_NK, 0.0), axis=0) / jnp.maximum(n_K, 1)
  new_K = jnp.clip(lam_K - eta * (mean_K - _vec(theta, K, "theta", R_NK.dtype)), 0.0, lam_max)
  return sg(jnp.where(n_K > 0, new_K, lam_K))


@register("lagrangian_multi_reward", stateful=True)
def lagrangian_multi_reward(R, state, *, theta=0.0, eta=0.01, lam_max=10.0, lam_init=1.0,
                            nan="skip"):
  """Constrained multi-reward `r = sum_i lam_i*(r_i - theta_i)` with dynamic multipliers.

  *Confronting Reward Model Overoptimization with Constrained RLHF*; METHODS.md 4.3
  `lagrangian_multi_reward`. Dynamic multipliers `abstract`; form `recalled - verify`. theta
  (proxy points, e.g. from a gold-eval sweep) scalar or [K]. Stateful: state {"lam": [K]} (None:
  lam_init); returns (r [N], {"lam": lagrangian_update(lam, R)}) — r uses the multipliers
  before the step; eta=0 freezes them. NaN as `weighted_sum`: "skip" drops NaN terms (NaN if
  all are NaN), "propagate" gives NaN. Shapes: R [N,K] -> [N].
  """
  R_NK = _fl(R, "R", 2)
  K = R_NK.shape[1]
  lam_K = (_vec(lam_init, K, "lam_init", R_NK.dtype) if state is None
           else jnp.asarray(state["lam"], R_NK.dtype))
  r_N = _nan_sum(R_NK - _vec(theta, K, "theta", R_NK.dtype), lam_K, nan)
  new = lagrangian_update(lam_K, R_NK, theta=theta, eta=eta, lam_max=lam_max)
  return sg(r_N), {"lam": new}


@register("dense_segment_reward", output="token_rewards")
def dense_segment_reward(seg_rewards, seg_end, mask, *, weights=None):
  """Fine-grained dense rewards: `R[i,t] = sum_k w_k * sum_s r_k[i,s] * [t = end_is]`.

  *Fine-Grained Human Feedback Gives Better Rewards for Language Model Training*; METHODS.md
  4.3 `dense_segment_reward` (`abstract`). Built by scatter-add; segments with seg_end < 0 are
  padding (ignored); a segment ending past the last mask token (truncated) goes on the last
  mask token; rows with an empty mask get 0. weights [K] default 1; a column with weight 0 is
  ignored. NaN propagates to its token (the row then counts as invalid for token-level
  estimators such as `gae_adv`). Use with `kl_in_reward` and `gae_adv`.
  Shapes: seg_rewards [N,K,S], seg_end [N,S] int, mask [N,T] -> token rewards [N,T].
  """
  x_NKS = _fl(seg_rewards, "seg_rewards", 3)
  N, K, S = x_NKS.shape
  end_NS = jnp.asarray(seg_end, jnp.int32)
  _check(end_NS.shape == (N, S), f"seg_end must be [N,S]={(N, S)}, got {end_NS.shape}.")
  m_NT = jnp.asarray(mask) != 0
  _check(m_NT.ndim == 2 and m_NT.shape[0] == N, f"mask must be [N={N},T], got {m_NT.shape}.")
  T = m_NT.shape[1]
  w_K = jnp.ones(K, x_NKS.dtype) if weights is None else _vec(weights, K, "weights", x_NKS.dtype)
  w_1K1 = w_K[None, :, None]
  c_NS = jnp.sum(jnp.where(w_1K1 == 0, 0.0, w_1K1 * x_NKS), axis=1)
  last_N = jnp.max(jnp.where(m_NT, jnp.arange(T), -1), axis=1)
  keep_NS = (end_NS >= 0) & (last_N[:, None] >= 0)
  pos_NS = jnp.where(keep_NS, jnp.minimum(end_NS, last_N[:, None]), 0)
  rows_NS = jnp.broadcast_to(jnp.arange(N)[:, None], (N, S))
  out = jnp.zeros((N, T), x_NKS.dtype).at[rows_NS, pos_NS].add(jnp.where(keep_NS, c_NS, 0.0))
  return sg(out)


@register("reward_schedule")
def reward_schedule(R, step, *, proc_col=1, out_col=0, a0=0.5, total_steps=1000):
  """Atom-Searcher curriculum: `r = a(t)*r_proc + (1-a(t))*r_out`, `a(t) = a0*max(0, 1-t/T)`.

  *Atom-Searcher: Enhancing Agentic Deep Research via Fine-Grained Atomic Thought Reward*;
  METHODS.md 4.3 `reward_schedule`. Schedule `abstract`; curve `proposed`. r_proc =
  R[:, proc_col], r_out = R[:, out_col], T = total_steps; a pure function of `step` (no
  recompiles). NaN propagates, except from a column whose current weight is 0.
  Shapes: R [N,K], step scalar -> [N].
  """
  R_NK = _fl(R, "R", 2)
  p_N, o_N = _col(R_NK, proc_col, "proc_col"), _col(R_NK, out_col, "out_col")
  t = jnp.asarray(step, R_NK.dtype)
  a = a0 * jnp.maximum(0.0, 1.0 - t / total_steps)
  return sg(jnp.where(a == 0, 0.0, a * p_N) + jnp.where(a == 1, 0.0, (1 - a) * o_N))


@register("threshold_schedule", output="R")
def threshold_schedule(R, step, *, col=0, boundaries=(), thresholds=(0.5,), binary=False):
  """Vision-R1 progressive rule refinement: column `col` of R counts only when it reaches the
  step's threshold `tau(t)`: `R' = R if R >= tau(t) else 0` (binary: 1 / 0).

  *Vision-R1: Evolving Human-Free Alignment in Large Vision-Language Models via Vision-Guided
  Reinforcement Learning*; METHODS.md 4.3 `reward_schedule`. Strategy `abstract`; the
  piecewise-constant curve `proposed`: `tau(t) = thresholds[#{b in boundaries: t >= b}]`
  (len(thresholds) = len(boundaries)+1, boundaries increasing; a pure function of `step`).
  NaN passes through. Shapes: R [N,K], step scalar -> R [N,K] (other columns unchanged).
  """
  _check(len(thresholds) == len(boundaries) + 1,
         f"threshold_schedule: need len(thresholds) = len(boundaries)+1, got {len(thresholds)} "
         f"and {len(boundaries)}.")
  R_NK = _fl(R, "R", 2)
  x_N = _col(R_NK, col, "col")
  i = jnp.sum(jnp.asarray(step) >= jnp.asarray(boundaries, jnp.float32).reshape(-1))
  tau = jnp.asarray(thresholds, R_NK.dtype)[i]
  y_N = jnp.where(x_N >= tau, 1.0 if binary else x_N, 0.0)
  return sg(R_NK.at[:, col].set(jnp.where(jnp.isnan(x_N), x_N, y_N)))
