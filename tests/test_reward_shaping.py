"""Reward transforms and combinators (alignjax.rewards.shaping) against independent numpy code.

The numpy references loop over samples, groups and steps and use float64. Inputs include NaN
(unscorable) entries, single-sample groups and ties. Calls go through a cached jit (`run`, one
compile per transform, options and shapes); one test checks the eager calls against jit.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rewards import combine
from alignjax.rewards import shaping as sh

NAN = np.nan
# 4 prompts with 3, 3, 1 and 3 samples; the last group is all unscorable in `R_`'s column 0.
GROUP = np.array([0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
N = len(GROUP)
RNG = np.random.default_rng(0)
R_ = RNG.uniform(0.05, 1.0, size=(N, 3))
R_[1, 2] = NAN
R_[4, :] = NAN                 # fully unscorable sample
R_[7:, 0] = NAN
R_[5] = R_[3]                  # tie in group 1
R_REF = RNG.uniform(0.2, 0.8, size=(N, 3))
R_REF[2, 1] = NAN
r_ = np.array([.9, .2, NAN, .5, .5, .1, .7, 1., 0., .3])


@functools.cache
def _jitted(fn, kw_items):
  return jax.jit(functools.partial(fn, **dict(kw_items)))


def run(fn, *args, **kw):
  """jit(fn)(*args) with static keyword options (one compile per fn, options and shapes; faster
  than eager dispatch). test_jit_matches_eager covers the eager path."""
  return _jitted(fn, tuple(sorted(kw.items())))(*args)


def np_(x):
  return np.asarray(x, np.float64)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np_(a), np_(b), rtol=tol, atol=tol, equal_nan=True)


def log_sigmoid(x):
  if math.isnan(x):
    return NAN
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
  return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------- registry


EXPECTED = {
    "reward_noise": ("r", "key"), "median_norm": ("r", "dataset", "state"),
    "lsc_transform": ("R", "r_ref"), "par_transform": ("r", "r_ref"),
    "prm_clip": ("steps", "step_mask"), "prm_delta": ("steps", "step_mask"),
    "renorm": ("steps", "step_mask", "r"), "gated_accumulation": ("r", "steps", "step_mask"),
    "difficulty_scale": ("r", "r_ref", "sim", "group"), "trust_weight": ("R", "group", "step"),
    "weighted_sum": ("R",), "harmonic_mean": ("R",), "pareto_select": ("R", "group"),
    "ensemble_aggregate": ("R",),
    "lagrangian_multi_reward": ("R", "state"),
    "dense_segment_reward": ("seg_rewards", "seg_end", "mask"),
    "reward_schedule": ("R", "step"), "threshold_schedule": ("R", "step"),
}


def test_registry():
  assert sh.names() == sorted(EXPECTED)
  for name, need in EXPECTED.items():
    assert sh.required_inputs(name) == need, name
    assert sh.is_stateful(name) == ("state" in need)
    assert all(isinstance(v, (int, float, str, bool, tuple, type(None)))
               for v in sh.defaults(name).values()), name
  assert sh.output_of("pareto_select") == "weights"
  assert sh.output_of("dense_segment_reward") == "token_rewards"
  assert sh.output_of("prm_delta") == "steps" and sh.output_of("threshold_schedule") == "R"
  with pytest.raises(ValueError, match="lsc_transform"):
    sh.get("nope")
  with pytest.raises(ValueError, match="not in INPUTS"):
    sh.register("bad")(lambda r, eta: r)
  with pytest.raises(ValueError, match="missing inputs"):
    sh.call("lsc_transform", {"R": R_})


def test_parse_transforms_errors():
  parsed = sh.parse_transforms(["prm_delta", {"name": "harmonic_mean",
                                              "params": {"weights": [.5, .25, .25]}}])
  assert parsed[1][2] == {"weights": (.5, .25, .25)}
  assert [p[0] for p in sh.parse_transforms("prm_clip, renorm")] == ["prm_clip", "renorm"]
  assert sh.parse_transforms(None) == []
  with pytest.raises(ValueError, match=r"reward_transforms\[0\].name: Unknown"):
    sh.parse_transforms([{"name": "nope"}])
  with pytest.raises(ValueError, match="Valid parameters: eta"):
    sh.parse_transforms([{"name": "prm_clip", "params": {"eps": 1}}])
  with pytest.raises(ValueError, match=r"params.nan: must be one of"):
    sh.parse_transforms([{"name": "harmonic_mean", "params": {"nan": "zero"}}])
  with pytest.raises(ValueError, match=r"params.mode: must be one of"):
    sh.parse_transforms([{"name": "reward_noise", "params": {"mode": "uniform"}}])
  with pytest.raises(ValueError, match="unknown keys"):
    sh.parse_transforms([{"name": "prm_clip", "weight": 1}])


# ---------------------------------------------------------------------------- 4.1 noise


def test_reward_noise_flip():
  key = jax.random.PRNGKey(3)
  r = np.where(np.arange(20000) % 3 == 0, 1.0, 0.0)
  r[::7] = NAN
  a = np_(run(sh.reward_noise, r, key, p=0.3))
  b = np_(run(sh.reward_noise, r, key, p=0.3))
  np.testing.assert_array_equal(a, b)                              # reproducible with a key
  assert not np.array_equal(a, np_(run(sh.reward_noise, r, jax.random.PRNGKey(4), p=0.3)),
                            equal_nan=True)
  ok = ~np.isnan(r)
  assert np.array_equal(np.isnan(a), ~ok)                           # NaN passes through
  flipped = a[ok] != r[ok]
  np.testing.assert_array_equal(a[ok][flipped], 1 - r[ok][flipped])
  assert abs(flipped.mean() - 0.3) < 0.015
  # r_min / r_max None: the batch range; flipped values map r -> max + min - r.
  x = np.array([2., 5., NAN, 3.])
  y = np_(run(sh.reward_noise, x, key, p=1.0, r_min=None, r_max=None))
  close(y, [5., 2., NAN, 4.])
  np.testing.assert_array_equal(np_(run(sh.reward_noise, x, key, p=0.0)), x)


def test_reward_noise_gaussian():
  key = jax.random.PRNGKey(0)
  r = np.zeros(20000)
  r[0] = NAN
  a = np_(run(sh.reward_noise, r, key, mode="gaussian", sigma=0.5))
  np.testing.assert_array_equal(a, np_(run(sh.reward_noise, r, key, mode="gaussian", sigma=0.5)))
  assert np.isnan(a[0]) and np.isfinite(a[1:]).all()
  assert abs(a[1:].mean()) < 0.02 and abs(a[1:].std() - 0.5) < 0.02


# ---------------------------------------------------------------------------- 4.2


def np_median_update(med, r, d, rate):
  med = med.copy()
  for k in range(len(med)):
    v = [x for x, dd in zip(r, d) if dd == k and not math.isnan(x)]
    if v:
      bm = float(np.median(v))
      med[k] = bm if math.isnan(med[k]) else (1 - rate) * med[k] + rate * bm
  return med


def np_median_norm(r, d, med, c, r_max):
  out = []
  for x, dd in zip(r, d):
    if not 0 <= dd < len(med) or math.isnan(med[dd]):
      out.append(x)
      continue
    md = max(med[dd], 1e-6)
    out.append(c * x / md if x <= md else c + (1 - c) * (x - md) / max(r_max - md, 1e-6))
  return out


def test_median_norm():
  d = np.array([0, 0, 0, 1, 1, 1, 1, 5, -1, 2])   # 5, -1: unknown ids; 2: never seen
  r1 = np.array([.2, .4, NAN, .9, .1, .5, .7, .3, .6, NAN])
  r2 = np.array([.6, .8, .7, .3, .3, NAN, .9, .3, .6, .1])
  state = None
  med = np.full(3, NAN)
  for r in (r1, r2):
    out, state = run(sh.median_norm, r, d, state, c=0.4, r_max=1.2, rate=0.25, num_datasets=3)
    med = np_median_update(med, r, d, 0.25)
    close(state["median"], med)
    close(out, np_median_norm(r, d, med, 0.4, 1.2))
  assert np_(out)[9] == pytest.approx(.4)     # id 2 seen in r2 only: its own median maps to c
  # Precomputed medians, no update; a median below 1e-6 is clamped; NaN stays NaN.
  meds = (0.5, 1e-9, NAN)
  out, st = run(sh.median_norm, r1, d, None, medians=meds, update=False)
  close(st["median"], meds)
  close(out, np_median_norm(r1, d, np.array(meds), 0.5, 1.0))
  assert np.isnan(np_(out)[2])
  with pytest.raises(ValueError, match="num_datasets"):
    run(sh.median_norm, r1, d, None)


def test_lsc_transform():
  u = np.vectorize(lambda x, y: log_sigmoid(x - y))(R_, R_REF)
  w = np.array([1., 2., .5])
  skip = [NAN if np.isnan(row).all() else np.nansum(row * w) for row in u]
  close(run(sh.lsc_transform, R_, R_REF, weights=(1., 2., .5)), skip)
  close(run(sh.lsc_transform, R_, R_REF, weights=(1., 2., .5), nan="propagate"), (u * w).sum(1))
  close(run(sh.lsc_transform, R_[:, 0], R_REF[:, 0]), u[:, 0])          # [N] in: element-wise u
  u1 = np.vectorize(lambda x, y: log_sigmoid(x - y))(R_, R_REF[:, :1])   # r_ref [N]: per sample
  close(run(sh.lsc_transform, R_, R_REF[:, 0], nan="propagate"), u1.sum(1))
  with pytest.raises(ValueError, match="r_ref must be"):
    run(sh.lsc_transform, R_, R_REF[:, :2])
  close(run(sh.lsc_transform, R_, 0.5), [NAN if np.isnan(row).all() else np.nansum(row) for row in
                                    np.vectorize(lambda x: log_sigmoid(x - .5))(R_)])
  big = np_(run(sh.lsc_transform, np.array([60., -60.]), np.zeros(2)))
  assert big[0] <= 0 and abs(big[0]) < 1e-20 and big[1] == pytest.approx(-60.)


def test_par_transform():
  out = []
  for x, refs in zip(r_, R_REF):
    refs = [y for y in refs if not math.isnan(y)]
    out.append(NAN if math.isnan(x) or not refs else np.mean([sigmoid(x - y) for y in refs]))
  close(run(sh.par_transform, r_, R_REF), out)
  close(run(sh.par_transform, r_, R_REF[:, 0]), [sigmoid(x - y) for x, y in zip(r_, R_REF[:, 0])])
  close(run(sh.par_transform, [.3], [[NAN, NAN]]), [NAN])


STEPS = np.array([[.9, .6, .8, 0.], [.7, NAN, .2, .4], [.5, .5, .5, .5], [.3, 9., .6, 9.],
                  [1., 1., 1., 1.]])
SMASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
OUT5 = np.array([1., 0., NAN, .5, 1.])


def test_prm_clip_delta_renorm():
  S = STEPS.shape[1]
  clip, delta, ren = (np.zeros_like(STEPS) for _ in range(3))
  for i in range(len(STEPS)):
    idx = [k for k in range(S) if SMASK[i, k]]
    for j, k in enumerate(idx):
      clip[i, k] = min(STEPS[i, k] - .6, 0.)
      delta[i, k] = STEPS[i, k] - STEPS[i, idx[j + 1]] if j + 1 < len(idx) else STEPS[i, k]
      ren[i, k] = STEPS[i, k] + OUT5[i] - 1
  close(run(sh.prm_clip, STEPS, SMASK, eta=.6), clip)
  close(run(sh.prm_delta, STEPS, SMASK.astype(bool)), delta)
  close(run(sh.renorm, STEPS, SMASK, OUT5), ren)
  # Return from each valid step telescopes to r_k.
  d = np_(run(sh.prm_delta, STEPS[[0, 2, 3]], SMASK[[0, 2, 3]]))
  for row, s, m in zip(d, STEPS[[0, 2, 3]], SMASK[[0, 2, 3]]):
    for k in np.flatnonzero(m):
      assert row[k:].sum() == pytest.approx(s[k])


def test_gated_accumulation():
  high = np.array([1., .5, 1., NAN, 2.])
  out = []
  for h, s, m in zip(high, STEPS, SMASK):
    acc = sum(x for x, mm in zip(s, m) if mm)
    out.append(h + (acc if h >= 1. else 0.) if not math.isnan(h) else NAN)
  close(run(sh.gated_accumulation, high, STEPS, SMASK, tau=1.), out)
  assert np.isnan(np_(run(sh.gated_accumulation, [1.], STEPS[1:2], SMASK[1:2]))[0])  # open gate
  close(run(sh.gated_accumulation, [.5], STEPS[1:2], SMASK[1:2]), [.5])  # closed gate ignores it


def test_difficulty_scale():
  r = r_.copy()
  sim = np.linspace(-.2, .9, N)
  sim[9] = NAN
  ref = RNG.uniform(0, 1, N)
  a, b, k = .7, 1.3, 2.
  w = np.full(N, NAN)
  for i in range(N):
    vals = [r[j] for j in range(N) if GROUP[j] == GROUP[i] and not math.isnan(r[j])]
    if not math.isnan(r[i]):
      w[i] = 1 + a * (1 - sim[i]) + b * (1 - sigmoid(k * (np.mean(vals) - ref[i])))
  ok = ~np.isnan(w)
  expect = np.where(ok, w / w[ok].mean() * r, NAN)
  out = np_(run(sh.difficulty_scale, r, ref, sim, GROUP, a=a, b=b, k=k))
  close(out, expect)
  assert np.isnan(out[9]) and np.isnan(out[2])
  # Single-sample groups; equal weights give r back.
  close(run(sh.difficulty_scale, [.2, .4], [.2, .4], [.5, .5], [0, 1]), [.2, .4])


def np_trust(R, group, step, alpha, T, thr, nan):
  o, t = R[:, 0], R[:, 2]
  out = []
  for i in range(len(o)):
    mem = [j for j in range(len(o)) if group[j] == group[i]
           and not (math.isnan(o[j]) or math.isnan(t[j]))]
    c = [t[j] for j in mem if o[j] >= thr]
    wr = [t[j] for j in mem if o[j] < thr]
    term = 0.
    if c and wr and not (nan == "skip" and math.isnan(t[i])):
      mc, mw = np.mean(c), np.mean(wr)
      g = 1. if mc >= mw else math.exp(mc - mw)
      term = g * alpha * math.exp(-step / T) * t[i]
    out.append(o[i] + term)
  return out


@pytest.mark.parametrize("nan", ["propagate", "skip"])
def test_trust_weight(nan):
  R = np.zeros((N, 3))
  R[:, 0] = [1, 0, NAN, 1, 1, 1, 0, 1, 0, 1]           # group 1 all correct; group 2 single
  R[:, 2] = [.2, .9, .3, .5, .6, .7, .8, NAN, .4, .1]  # group 0: mu_c < mu_w -> gamma < 1
  R[:, 1] = 7.                                          # other columns are ignored
  out = run(sh.trust_weight, R, GROUP, 120, out_col=0, think_col=2, alpha=.4, decay_steps=300.,
                        nan=nan)
  close(out, np_trust(R, GROUP, 120, .4, 300., .5, nan))
  o = np_(out)
  assert np.isnan(o[2]) and (np.isnan(o[7]) == (nan == "propagate"))
  close(o[3:6], R[3:6, 0])                              # all-correct group: no thinking term


def test_weighted_sum_matches_combine():
  close(run(sh.weighted_sum, R_, weights=(1., .5, 2.)),
        combine.weighted_sum(R_, np.array([1, .5, 2.])))
  close(run(sh.weighted_sum, R_, nan="propagate"), R_.sum(1))


# ---------------------------------------------------------------------------- 4.3


def test_harmonic_mean():
  R = R_.copy()
  R[0, 1] = -0.3                                         # clamped to 1e-6: dominates
  w = np.array([.5, .3, .2])
  prop, skip = [], []
  for row in R:
    s = np.maximum(row, 1e-6)
    prop.append(w.sum() / (w / s).sum())
    ok = ~np.isnan(row)
    skip.append(w[ok].sum() / (w[ok] / s[ok]).sum() if ok.any() else NAN)
  close(run(sh.harmonic_mean, R, weights=(.5, .3, .2), nan="propagate"), prop)
  close(run(sh.harmonic_mean, R, weights=(.5, .3, .2)), skip)
  assert np_(run(sh.harmonic_mean, R))[0] < 1e-5
  sig = 1 / (1 + np.exp(-np.array([[0., 2.], [-1., 1.]])))
  close(run(sh.harmonic_mean, np.array([[0., 2.], [-1., 1.]]), sigmoid=True),
        [2 / (1 / s).sum() for s in sig])


def np_pareto(R, group, per_group):
  X = np.where(np.isnan(R), -np.inf, R)
  out = []
  for i in range(len(X)):
    dominated = False
    for j in range(len(X)):
      if per_group and group[j] != group[i]:
        continue
      if all(X[j] >= X[i]) and any(X[j] > X[i]):
        dominated = True
    out.append(0. if dominated or np.isnan(R[i]).all() else 1.)
  return out


def test_pareto_select():
  R = np.array([[1, 2], [2, 1], [1, 1], [1, 2], [NAN, 3], [0, 0], [5, 5], [NAN, NAN],
                [NAN, NAN], [0, NAN]], float)
  group = np.array([0, 0, 0, 0, 0, 1, 2, 3, 3, 3])
  for pg in (True, False):
    close(run(sh.pareto_select, R, group, per_group=pg), np_pareto(R, group, pg))
  w = np_(run(sh.pareto_select, R, group))
  np.testing.assert_array_equal(w, [1, 1, 0, 1, 1, 1, 1, 0, 0, 1])  # ties (rows 0, 3) kept
  assert np_(run(sh.pareto_select, R, group, per_group=False))[5] == 0
  close(run(sh.pareto_select, R_, GROUP), np_pareto(R_, GROUP, True))


def test_lagrangian():
  theta = np.array([.5, .4, .6])
  lam = np.array([1., 1., .001])
  R = R_.copy()
  R[:, 1] = NAN                                          # no data: its lam is kept
  means = np.array([np.nanmean(c) if not np.isnan(c).all() else NAN for c in R.T])
  new = np.where(np.isnan(means), lam, np.clip(lam - 2. * (means - theta), 0, 1.2))
  close(run(sh.lagrangian_update, lam, R, theta=tuple(theta), eta=2., lam_max=1.2), new)
  # Stateful transform: r uses the multipliers before the dual step.
  kw = dict(theta=tuple(theta), eta=.5, lam_max=3., lam_init=(1., 2., .5))
  r1, st = run(sh.lagrangian_multi_reward, R_, None, **kw)
  lam1 = np.array([1., 2., .5])
  terms = (R_ - theta) * lam1
  close(r1, [NAN if np.isnan(t).all() else np.nansum(t) for t in terms])
  means = np.nanmean(R_, axis=0)
  lam2 = np.clip(lam1 - .5 * (means - theta), 0, 3.)
  close(st["lam"], lam2)
  r2, st2 = run(sh.lagrangian_multi_reward, R_, st, nan="propagate", **kw)
  close(r2, ((R_ - theta) * lam2).sum(1))
  close(st2["lam"], np.clip(lam2 - .5 * (means - theta), 0, 3.))


def test_dense_segment_reward():
  seg = np.array([[[.5, 1., 2.], [1., 0., -1.]],
                  [[.3, NAN, 9.], [.1, .2, NAN]],
                  [[1., 1., 1.], [1., 1., 1.]],
                  [[4., 4., 4.], [NAN, NAN, NAN]]])
  end = np.array([[1, 3, 9], [0, 2, -1], [0, 1, 2], [0, 0, 4]])   # 9: truncated; -1: padding
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6])
  w = (2., .5)
  out = np.zeros((4, 6))
  for i in range(4):
    last = max([t for t in range(6) if mask[i, t]], default=-1)
    for s in range(3):
      if end[i, s] < 0 or last < 0:
        continue
      for k in range(2):
        out[i, min(end[i, s], last)] += w[k] * seg[i, k, s]
  close(run(sh.dense_segment_reward, seg, end, mask, weights=w), out)
  got = np_(run(sh.dense_segment_reward, seg, end, mask, weights=(1., 0.)))   # weight-0 NaN ignored
  assert np.isfinite(got[3]).all() and got[3, 0] == 8. and got[3, 4] == 4.
  assert np.isnan(got[1, 2]) and got[1, 0] == pytest.approx(.3)
  np.testing.assert_array_equal(got[2], 0.)


def test_reward_schedule():
  R = R_.copy()
  for t in (0, 250, 1000, 5000):
    a = .8 * max(0., 1 - t / 1000)
    exp = a * R[:, 2] + (1 - a) * R[:, 0] if a > 0 else R[:, 0]
    close(run(sh.reward_schedule, R, t, proc_col=2, out_col=0, a0=.8, total_steps=1000), exp)
  # Once a(t) = 0 a NaN process reward no longer matters.
  x = np.array([[1., NAN]])
  assert np.isnan(np_(run(sh.reward_schedule, x, 10))[0])
  assert np_(run(sh.reward_schedule, x, 2000))[0] == 1.


def test_threshold_schedule():
  R = np.array([[.55, 1.], [.75, 2.], [.95, 3.], [NAN, 4.]])
  kw = dict(col=0, boundaries=(100, 200), thresholds=(.5, .7, .9))
  for t, tau in ((0, .5), (99, .5), (100, .7), (199, .7), (200, .9), (10 ** 6, .9)):
    exp = R.copy()
    exp[:, 0] = [x if x >= tau else 0. for x in R[:, 0][:3]] + [NAN]
    close(run(sh.threshold_schedule, R, t, **kw), exp)
    exp[:3, 0] = [1. if x >= tau else 0. for x in R[:3, 0]]
    close(run(sh.threshold_schedule, R, t, binary=True, **kw), exp)
  with pytest.raises(ValueError, match="len"):
    run(sh.threshold_schedule, R, 0, boundaries=(1,), thresholds=(.5,))


# ------------------------------------------------------------------ jit, gradient, pipeline


def all_inputs():
  return {
      "r": r_, "R": R_, "group": GROUP, "step": 7, "r_ref": R_REF, "dataset": GROUP % 2,
      "key": jax.random.PRNGKey(1), "steps": np.tile(STEPS, (2, 1)),
      "step_mask": np.tile(SMASK, (2, 1)), "sim": np.linspace(0, 1, N),
      "seg_rewards": np.random.default_rng(1).normal(size=(N, 3, 2)), "seg_end": np.tile([[1, 4]], (N, 1)),
      "mask": np.ones((N, 5)),
  }


PARAMS = {"median_norm": {"num_datasets": 2}, "lsc_transform": {"nan": "propagate"}}
OVERRIDES = {"difficulty_scale": {"r_ref": R_REF[:, 0]}}


EAGER = ("median_norm", "reward_noise", "prm_delta", "dense_segment_reward", "threshold_schedule")


def test_jit_matches_eager():
  """All transforms in one jitted function (one compile) against eager calls of a few (eager
  dispatch compiles op by op and is slow; the other tests run everything under jit)."""
  def each(x, names):
    return {name: sh.call(name, {**x, **OVERRIDES.get(name, {})}, **PARAMS.get(name, {}))
            for name in names}

  x = all_inputs()
  jitted = jax.jit(functools.partial(each, names=tuple(sh.names())))(x)
  assert sorted(jitted) == sh.names()
  jax.tree.map(lambda a, b: close(a, b), each(x, EAGER), {k: jitted[k] for k in EAGER})
  close(jitted["lsc_transform"], run(sh.lsc_transform, R_, R_REF, nan="propagate"))


def test_no_gradient():
  g = jax.grad(lambda R: jnp.nansum(run(sh.lsc_transform, R, R_REF)))(jnp.asarray(R_))
  np.testing.assert_array_equal(np_(g), 0.)
  g = jax.grad(lambda r: jnp.nansum(run(sh.median_norm, r, GROUP % 2, None, num_datasets=2)[0]))(
      jnp.asarray(r_))
  np.testing.assert_array_equal(np_(g), 0.)


def test_run_pipeline():
  specs = [{"name": "threshold_schedule", "params": {"col": 1, "thresholds": [.5]}},
           {"name": "median_norm", "params": {"num_datasets": 2, "rate": .5}},
           {"name": "reward_noise", "params": {"p": .5}},
           "pareto_select", "pareto_select"]
  inputs = all_inputs()
  out, states = sh.run_pipeline(specs, inputs, reward_weights=[1., 2., 1.])
  R1 = np_(run(sh.threshold_schedule, R_, 7, col=1, thresholds=(.5,)))
  r1 = np_(combine.weighted_sum(R1, np.array([1., 2., 1.])))
  r2, st = run(sh.median_norm, r1, GROUP % 2, None, num_datasets=2, rate=.5)
  r3 = run(sh.reward_noise, r2, inputs["key"], p=.5)
  close(out["R"], R1)
  close(out["r"], r3)
  w = np_(run(sh.pareto_select, R1, GROUP))
  close(out["weights"], w * w)
  assert states[0] is None and states[2] is None
  close(states[1]["median"], st["median"])
  # The next step carries the state.
  out2, states2 = sh.run_pipeline(specs[1:2], {"r": r_, "dataset": GROUP % 2}, states[1:2])
  r4, st4 = run(sh.median_norm, r_, GROUP % 2, st, rate=.5)
  close(out2["r"], r4)
  close(states2[0]["median"], st4["median"])
  # jittable with static specs.
  f = jax.jit(lambda x: sh.run_pipeline(specs, x, reward_weights=(1., 2., 1.))[0]["r"])
  close(f({k: inputs[k] for k in ("r", "R", "group", "step", "dataset", "key")}), r3)
