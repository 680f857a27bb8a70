"""Reward-model losses against independent float64 numpy implementations of METHODS.md §1.

Each numpy reference below is written from the formula (loops, probabilities rather than
log-space forms where possible) and returns `(loss_sum, denom, expected_metrics)`.
"""

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.losses import ensemble, registry, reward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S, K, A = 7, 3, 5, 5  # distinct sizes: an array is a per-row input iff shape[0] == B
RC = np.array([1, .2, -.5])  # METHODS.md golden inputs
RR = np.array([0, .4, -1.5])


def sp(x):
  return np.logaddexp(0.0, x)


def sig(x):
  return 1 / (1 + np.exp(-x))


def pair_metrics(rc, rr, w=None):
  w = np.ones_like(rc) if w is None else w
  d = rc - rr
  return {"accuracy": np.sum(w * (d > 0)), "margin": np.sum(w * d),
          "reward_chosen": np.sum(w * rc), "reward_rejected": np.sum(w * rr),
          "num_pairs": len(rc)}


def oriented(rc, rr, flip):
  return np.where(flip, rr, rc), np.where(flip, rc, rr)


# ------------------------------------------------------------------ numpy references


def np_bt(rc, rr):
  return np.sum(np.log(1 + np.exp(-(rc - rr)))), len(rc), pair_metrics(rc, rr)


def np_bt_margin(rc, rr, margin=0.0):
  return np.sum(np.log(1 + np.exp(-(rc - rr - margin)))), len(rc), pair_metrics(rc, rr)


def np_bt_center(rc, rr, coef=0.01, margin=0.0):
  loss = np.sum(sp(-(rc - rr - margin))) + coef * np.sum((rc + rr) ** 2)
  return loss, len(rc), pair_metrics(rc, rr)


def np_bt_scaled(rc, rr, strength, normalize=False):
  c, r = oriented(rc, rr, strength < 0)
  a = np.abs(strength)
  loss = sum(a[i] * sp(-(c[i] - r[i])) for i in range(len(rc)))
  if normalize:
    return loss, a.sum(), pair_metrics(c, r, a)
  return loss, len(rc), pair_metrics(c, r)


def np_bt_smooth(rc, rr, eps=0.1):
  d = rc - rr
  return np.sum(-(1 - eps) * np.log(sig(d)) - eps * np.log(sig(-d))), len(d), pair_metrics(rc, rr)


def np_bt_flip(rc, rr, mu, tau_flip=0.0):
  c, r = oriented(rc, rr, mu < -tau_flip)
  return np.sum(sp(-(c - r))), len(rc), pair_metrics(c, r)


def np_secrets2(rc, rr, mu, delta=0.0, tau_flip=0.0, eps=0.1):
  loss, cs, rs = 0.0, [], []
  for c, r, m in zip(rc, rr, mu):
    if m < -tau_flip:
      c, r = r, c
      loss += sp(-(c - r))
    elif abs(m) <= delta:
      loss += -(1 - eps) * np.log(sig(c - r)) - eps * np.log(sig(r - c))
    else:
      loss += sp(-(c - r - m))
    cs.append(c)
    rs.append(r)
  return loss, len(rc), pair_metrics(np.array(cs), np.array(rs))


def np_bt_ties(rc, rr, labels, mode="half", theta_raw=0.0, kappa=0.0):
  loss = 0.0
  for d, y in zip(rc - rr, labels):
    if mode == "half":
      loss += 0.5 * (sp(-d) + sp(d)) if y == 0 else sp(-y * d)
      continue
    if mode == "rao_kupper":
      theta = np.log1p(np.exp(theta_raw))
      p_win, p_lose = sig(d - theta), sig(-d - theta)
      p_tie = 1 - p_win - p_lose
    else:
      e = np.array([np.exp(d / 2), np.exp(-d / 2), np.exp(kappa)])
      p_win, p_lose, p_tie = e / e.sum()
    loss -= np.log({1: p_win, -1: p_lose, 0: p_tie}[int(y)])
  c, r = oriented(rc, rr, labels < 0)
  metrics = pair_metrics(c, r)
  metrics["accuracy"] = np.sum((labels != 0) & (c > r))
  return loss, len(rc), metrics


def np_bt_weighted(rc, rr, weights=None, source=None, source_weights=None,
                   per_source_mean=False):
  w = np.ones_like(rc) if weights is None else weights
  lam = np.ones(1) if source is None else source_weights
  src = np.zeros(len(rc), int) if source is None else source
  l = sp(-(rc - rr))
  if per_source_mean:  # MORE: sum_s lam_s L_s / sum_s lam_s over present sources
    v = np.array([w[i] * lam[src[i]] / w[src == src[i]].sum() for i in range(len(rc))])
    present = [s for s in range(len(lam)) if np.any(src == s)]
    loss = sum(lam[s] * np.sum((w * l)[src == s]) / w[src == s].sum() for s in present)
    return loss, sum(lam[s] for s in present), pair_metrics(rc, rr, v)
  v = w * lam[src]
  return np.sum(v * l), np.sum(v), pair_metrics(rc, rr, v)


def np_rm_regression(pred, target, label_mask):
  m = label_mask.astype(float)
  return np.sum(m * (pred - target) ** 2), m.sum(), {"num_labels": m.sum()}


def np_bt_plus_regression(rc, rr, help_c, help_r, strength=None, lam_reg=0.1):
  s = np.ones_like(rc) if strength is None else strength
  bt_sum = np_bt_scaled(rc, rr, s)[0]
  responses_r, responses_y = np.concatenate([rc, rr]), np.concatenate([help_c, help_r])
  reg_mean = np.mean((responses_r - responses_y) ** 2)  # mean over responses y
  return bt_sum + lam_reg * reg_mean * len(rc), len(rc), {}


def np_plackett_luce(scores, order, n, top_k=None):
  loss, lists = 0.0, 0
  for s, o, m in zip(scores, order, n):
    if m < 2:
      continue
    lists += 1
    z = s[o[:m]]
    for k in range(m - 1 if top_k is None else min(m - 1, top_k)):
      loss += np.log(np.sum(np.exp(z[k:]))) - z[k]
  return loss, lists, {"num_lists": lists}


def np_ranknet(scores, targets, valid, min_gap=0.0):
  loss, pairs, right = 0.0, 0, 0
  for s, t, v in zip(scores, targets, valid):
    for i in range(len(s)):
      for j in range(len(s)):
        if v[i] and v[j] and t[i] > t[j] and t[i] - t[j] >= min_gap:
          loss += sp(-(s[i] - s[j]))
          pairs += 1
          right += s[i] > s[j]
  return loss, pairs, {"accuracy": right, "num_pairs": pairs}


def np_ranklist(scores, targets, valid, w=1, min_gap=0.0):
  loss, positions = 0.0, 0
  for s, t, v in zip(scores, targets, valid):
    idx = sorted(np.flatnonzero(v), key=lambda i: -t[i])  # stable: best first, valid only
    for k, i in enumerate(idx):
      window = [j for j in idx[k + 1:k + 1 + w] if t[i] > t[j] and t[i] - t[j] >= min_gap]
      if window:
        loss += np.log(1 + np.sum(np.exp(s[window])) / np.exp(s[i]))
        positions += 1
  return loss, positions, {"num_positions": positions}


def np_gpm_score(va, vb, lam=None, normalize=False):
  if normalize:
    va = va / np.linalg.norm(va, axis=1, keepdims=True)
    vb = vb / np.linalg.norm(vb, axis=1, keepdims=True)
  k = va.shape[1] // 2
  lam = np.ones((len(va), k)) if lam is None else lam
  skew = np.array([[0, 1], [-1, 0]])
  return np.array([a @ np.kron(np.diag(l), skew) @ b for a, b, l in zip(va, vb, lam)])


def np_gpm(vc, vr, lam=None, tau=0.1, normalize=False):
  s = np_gpm_score(vc, vr, lam, normalize)
  return np.sum(sp(-s / tau)), len(s), {"accuracy": np.sum(s > 0), "margin": np.sum(s)}


# ------------------------------------------------------------------ random cases


def pair(rng, scale):
  return scale * rng.normal(size=B), scale * rng.normal(size=B)


def lists(rng, scale):
  return (scale * rng.normal(size=(B, K)), rng.integers(0, 4, (B, K)).astype(float),
          rng.random((B, K)) < 0.8)


def pl_inputs(rng, scale):
  order = np.stack([rng.permutation(K) for _ in range(B)])
  n = rng.integers(0, K + 1, B)
  n[:3] = [K, 2, 1]
  return scale * rng.normal(size=(B, K)), order, n


# (id, registry name, make(rng, scale) -> (args, kwargs), numpy reference, grad argnums)
P, L = (0, 1), (0,)
CASES = [
    ("bt", "bt", lambda g, c: (pair(g, c), {}), np_bt, P),
    ("bt_margin", "bt_margin", lambda g, c: (pair(g, c), {"margin": g.random(B)}),
     np_bt_margin, P),
    ("bt_margin_scalar", "bt_margin", lambda g, c: (pair(g, c), {"margin": 0.5}),
     np_bt_margin, P),
    ("bt_center", "bt_center", lambda g, c: (pair(g, c), {"coef": 0.05}), np_bt_center, P),
    ("bt_center_margin", "bt_center", lambda g, c: (pair(g, c), {"margin": g.random(B)}),
     np_bt_center, P),
    ("bt_scaled", "bt_scaled", lambda g, c: (
        pair(g, c), {"strength": g.choice([-3., -2, -1, 1, 2, 3], B)}), np_bt_scaled, P),
    ("bt_scaled_norm", "bt_scaled", lambda g, c: (pair(g, c), {
        "strength": g.choice([-3., -2, -1, 1, 2, 3], B), "normalize": True}), np_bt_scaled, P),
    ("bt_smooth", "bt_smooth", lambda g, c: (pair(g, c), {"eps": 0.2}), np_bt_smooth, P),
    ("bt_smooth_rows", "bt_smooth", lambda g, c: (pair(g, c), {"eps": 0.4 * g.random(B)}),
     np_bt_smooth, P),
    ("bt_flip", "bt_flip", lambda g, c: (pair(g, c), {
        "mu": 1.5 * g.normal(size=B), "tau_flip": 0.5}), np_bt_flip, P),
    ("secrets2", "secrets2", lambda g, c: (pair(g, c), {
        "mu": 1.5 * g.normal(size=B), "delta": 0.5, "tau_flip": 0.8, "eps": 0.2}),
     np_secrets2, P),
    ("bt_ties_half", "bt_ties", lambda g, c: (pair(g, c), {
        "labels": g.choice([-1, 0, 1], B)}), np_bt_ties, P),
    ("bt_ties_rk", "bt_ties", lambda g, c: (pair(g, c), {
        "labels": g.choice([-1, 0, 1], B), "mode": "rao_kupper", "theta_raw": 0.3}),
     np_bt_ties, P),
    ("bt_ties_davidson", "bt_ties", lambda g, c: (pair(g, c), {
        "labels": g.choice([-1, 0, 1], B), "mode": "davidson", "kappa": -0.4}),
     np_bt_ties, P),
    ("bt_weighted", "bt_weighted", lambda g, c: (pair(g, c), {
        "weights": g.uniform(.5, 2, B), "source": g.integers(0, S, B),
        "source_weights": g.uniform(.2, 1, S)}), np_bt_weighted, P),
    ("bt_weighted_w", "bt_weighted", lambda g, c: (pair(g, c), {
        "weights": g.uniform(.5, 2, B)}), np_bt_weighted, P),
    ("bt_weighted_more", "bt_weighted", lambda g, c: (pair(g, c), {
        "weights": g.uniform(.5, 2, B), "source": np.array([0, 0, 1, 0, 1, 1, 0]),
        "source_weights": np.array([.3, .7, .5]), "per_source_mean": True}),
     np_bt_weighted, P),
    ("rm_regression", "rm_regression", lambda g, c: ((
        c * g.normal(size=(B, A)), g.integers(0, 5, (B, A)).astype(float),
        g.random((B, A)) < 0.7), {}), np_rm_regression, L),
    ("bt_plus_regression", "bt_plus_regression", lambda g, c: (pair(g, c), {
        "help_c": g.uniform(0, 4, B), "help_r": g.uniform(0, 4, B),
        "strength": g.choice([-3., -1, 1, 2], B), "lam_reg": 0.3}), np_bt_plus_regression, P),
    ("plackett_luce", "plackett_luce", lambda g, c: (pl_inputs(g, c), {}), np_plackett_luce, L),
    ("plackett_luce_top2", "plackett_luce", lambda g, c: (pl_inputs(g, c), {"top_k": 2}),
     np_plackett_luce, L),
    ("ranknet", "ranknet", lambda g, c: (lists(g, c), {}), np_ranknet, L),
    ("ranknet_gap", "ranknet", lambda g, c: (lists(g, c), {"min_gap": 2.0}), np_ranknet, L),
    ("ranklist", "ranklist", lambda g, c: (lists(g, c), {}), np_ranklist, L),
    ("ranklist_w2_gap", "ranklist", lambda g, c: (lists(g, c), {"w": 2, "min_gap": 1.0}),
     np_ranklist, L),
    ("ranklist_wide", "ranklist", lambda g, c: (lists(g, c), {"w": 10}), np_ranklist, L),
    ("gpm", "gpm", lambda g, c: ((c * g.normal(size=(B, 4)), c * g.normal(size=(B, 4))), {}),
     np_gpm, P),
    ("gpm_lam_norm", "gpm", lambda g, c: ((c * g.normal(size=(B, 6)), g.normal(size=(B, 6))), {
        "lam": 3 * np.asarray(jax.nn.softmax(g.normal(size=(B, 3)))), "normalize": True,
        "tau": 0.5}), np_gpm, P),
]
IDS = [c[0] for c in CASES]


def make(case, seed=0, scale=1.0):
  _, name, mk, ref, argnums = case
  args, kwargs = mk(np.random.default_rng(seed), scale)
  return registry.get(name).fn, tuple(args), kwargs, ref, argnums


def _split(kwargs):
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
  return arrays, tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
  return jax.jit(lambda args, arrays: fn(*args, **arrays, **dict(static)))


def call(fn, *args, **kwargs):
  """fn under jit (one compile per signature: much faster than op-by-op); non-arrays static."""
  arrays, static = _split(kwargs)
  return _jitted(fn, static)(args, arrays)


def run(fn, args, kwargs, **extra):
  loss_sum, denom, metrics = call(fn, *args, **kwargs, **extra)
  return float(loss_sum), float(denom), {k: float(v) for k, v in metrics.items()}


@functools.lru_cache(maxsize=None)
def _with_grads(fn, static, argnums):
  """jit(args, arrays, mask -> ((loss_sum, denom, metrics), d loss_sum / d args[argnums]))."""

  def f(args, arrays, mask):
    def loss(diff):
      full = list(args)
      for i, x in zip(argnums, diff):
        full[i] = x
      out = fn(*full, **arrays, **dict(static), mask=mask)
      return out[0], out

    grads, out = jax.grad(loss, has_aux=True)([args[i] for i in argnums])
    return out, grads

  return jax.jit(f)


def evaluate(fn, args, kwargs, argnums, mask=None):
  """One compile per case and batch size serves the reference, mask, extreme and NaN tests."""
  arrays, static = _split(kwargs)
  args = tuple(jnp.asarray(a, jnp.float32) if i in argnums else a for i, a in enumerate(args))
  mask = jnp.ones(len(args[0])) if mask is None else jnp.asarray(mask, jnp.float32)
  return _with_grads(fn, static, argnums)(args, arrays, mask)


def scalars(out):
  loss_sum, denom, metrics = out
  return float(loss_sum), float(denom), {k: float(v) for k, v in metrics.items()}


def test_every_registered_loss_has_a_case():
  assert {c[1] for c in CASES} == set(REWARD_LOSSES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_numpy_reference(case):
  for seed in range(3):
    fn, args, kwargs, ref, argnums = make(case, seed)
    loss_sum, denom, metrics = scalars(evaluate(fn, args, kwargs, argnums)[0])
    want_sum, want_denom, want_metrics = ref(*args, **kwargs)
    np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(denom, want_denom, rtol=1e-6)
    for k, v in want_metrics.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_masking_a_row_equals_dropping_it(case):
  fn, args, kwargs, ref, argnums = make(case, seed=1)
  keep = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  take = lambda x: x[keep] if isinstance(x, np.ndarray) and x.shape[:1] == (B,) else x
  # Masked rows get other inputs (huge scores, different labels...): nothing may change.
  _, other_args, other_kwargs, _, _ = make(case, seed=9, scale=1e3)
  mix = lambda x, o: (np.where(keep.reshape((B,) + (1,) * (x.ndim - 1)), x, o)
                      if isinstance(x, np.ndarray) and x.shape[:1] == (B,) else x)
  masked = scalars(evaluate(fn, args, kwargs, argnums, mask=keep)[0])
  garbage = scalars(evaluate(fn, tuple(map(mix, args, other_args)),
                             {k: mix(v, other_kwargs[k]) for k, v in kwargs.items()},
                             argnums, mask=keep)[0])
  want_sum, want_denom, want_metrics = ref(*map(take, args), **{k: take(v) for k, v in
                                                                 kwargs.items()})
  np.testing.assert_allclose(masked[:2], [want_sum, want_denom], rtol=1e-5, atol=1e-6)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(masked[2][k], v, rtol=1e-5, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(garbage[:2], masked[:2], rtol=1e-6)
  assert garbage[2] == pytest.approx(masked[2], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extreme_gaps_finite_values_and_gradients(case):
  fn, args, kwargs, _, argnums = make(case, seed=2, scale=1e4)
  out, grads = evaluate(fn, args, kwargs, argnums)
  loss_sum, denom, metrics = scalars(out)
  assert np.isfinite(loss_sum) and loss_sum >= 0 and np.isfinite(denom)
  assert all(np.isfinite(v) for v in metrics.values())
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_masked_batch_is_zero_without_nan(case):
  fn, args, kwargs, _, argnums = make(case, seed=3)
  (loss_sum, denom, metrics), grads = evaluate(fn, args, kwargs, argnums, mask=np.zeros(B))
  assert float(loss_sum) == 0.0 and float(denom) == 0.0
  assert loss_sum.dtype == denom.dtype == jnp.float32 and loss_sum.shape == denom.shape == ()
  assert all(np.all(np.isfinite(v)) for v in metrics.values())
  assert all(np.all(g == 0) for g in grads)


ONE_PER_LOSS = list({c[1]: c for c in reversed(CASES)}.values())


@pytest.mark.parametrize("case", ONE_PER_LOSS, ids=[c[0] for c in ONE_PER_LOSS])
def test_jit_equals_eager(case):
  fn, args, kwargs, _, argnums = make(case, seed=4)
  got = scalars(fn(*args, **kwargs))  # op by op
  want = scalars(evaluate(fn, args, kwargs, argnums)[0])
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)
  assert got[2] == pytest.approx(want[2], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ golden values (METHODS.md)

STRENGTH, MU, Y = np.array([3., 1, 2]), np.array([.8, -1.2, .3]), np.array([1, 0, -1])
GOLDEN = [
    ("bt", {}, 0.47488741),
    ("bt_margin", {"margin": .5}, 0.68378001),
    ("bt_center", {}, 0.49275408),
    ("bt_center", {"margin": .5}, 0.70164667),
    ("bt_scaled", {"strength": STRENGTH}, 0.78814910),
    ("bt_scaled", {"strength": STRENGTH, "normalize": True}, 0.39407455),
    ("bt_smooth", {"eps": .1}, 0.53488741),
    ("bt_flip", {"mu": MU, "tau_flip": 1.0}, 0.40822075),
    ("bt_ties", {"labels": Y}, 0.77488741),
    ("bt_ties", {"labels": Y, "mode": "rao_kupper", "theta_raw": float(np.log(np.expm1(.5)))},
     1.19723557),
    ("bt_ties", {"labels": Y, "mode": "davidson", "kappa": 0.0}, 1.15416073),
]
REFS = {c[1]: c[3] for c in CASES}


@pytest.mark.parametrize("name,kwargs,golden", GOLDEN)
def test_golden_pairwise(name, kwargs, golden):
  loss_sum, denom, _ = run(registry.get(name).fn, (RC, RR), kwargs)
  assert abs(loss_sum / denom - golden) < 1e-6
  want_sum, want_denom, _ = REFS[name](RC, RR, **kwargs)
  assert abs(want_sum / want_denom - golden) < 1e-8  # the reference agrees with the golden


def test_golden_bt_metrics_and_ties():
  _, denom, m = run(reward.bt, (RC, RR), {})
  assert (denom, m["accuracy"], m["num_pairs"]) == (3, 2, 3)
  assert m["margin"] == pytest.approx(1.8) and m["reward_chosen"] == pytest.approx(.7)
  tie = np.array([.3, -2, 5.])
  for name in registry.names("pairwise"):
    kwargs = {"bt_scaled": {"strength": np.ones(3)}, "bt_flip": {"mu": np.ones(3)},
              "secrets2": {"mu": np.ones(3)}, "bt_ties": {"labels": np.ones(3)},
              }.get(name, {})
    assert run(registry.get(name).fn, (tie, tie), kwargs)[2]["accuracy"] == 0, name
  loss_sum, denom, _ = run(reward.bt, (tie, tie), {})
  assert loss_sum / denom == pytest.approx(np.log(2), abs=1e-7)


def test_golden_listwise():
  s = jnp.array([[2, .5, 1, -1], [0, .3, -.2, .1]])
  t = jnp.array([[4., 3, 2, 1], [1, 4, 3, 2]])
  valid = jnp.ones((2, 4), bool)
  order = jnp.argsort(-t, axis=1)
  per_list = [float(call(reward.plackett_luce, s[i:i + 1], order[i:i + 1], jnp.array([4]))[0])
              for i in range(2)]
  np.testing.assert_allclose(per_list, [1.67706683, 3.06980969], atol=1e-6)
  per_list = [call(reward.ranknet, s[i:i + 1], t[i:i + 1], valid[:1]) for i in range(2)]
  np.testing.assert_allclose([float(a / b) for a, b, _ in per_list], [0.31094677, 0.65391031],
                             atol=1e-6)
  loss_sum, denom, _ = call(reward.ranknet, s, t, valid)
  assert abs(float(loss_sum / denom) - 0.48242854) < 1e-6
  for w, golden in zip((1, 2, 3), (0.54587453, 0.74158477, 0.79114609)):
    loss_sum, denom, _ = call(reward.ranklist, s, t, valid, w=w)
    assert abs(float(loss_sum / denom) - golden) < 1e-6


def test_golden_ensemble():
  R = jnp.array([[1, .2], [2, -.4], [0, .1], [1.4, .3]])
  for method, golden in [("mean", [1.1, .05]), ("median", [1.2, .15]), ("min", [0, -.4]),
                         ("mean_minus_std", [.37198901, -.21925824])]:
    np.testing.assert_allclose(ensemble.aggregate(R, method), golden, atol=1e-6)
    np.testing.assert_allclose(jax.jit(ensemble.aggregate, static_argnums=1)(R, method),
                               golden, atol=1e-6)
  np.testing.assert_allclose(ensemble.aggregate(R[:3], "median"), [1, .1], atol=1e-7)
  np.testing.assert_allclose(ensemble.aggregate(R[:1], "mean_minus_std", lam=2.0), R[0])
  np.testing.assert_allclose(ensemble.aggregate(R, "mean_minus_std", lam=0.5),
                             np.mean(R, 0) - 0.5 * np.std(np.asarray(R), 0), atol=1e-6)
  with pytest.raises(ValueError, match="median"):
    ensemble.aggregate(R, "max")


# ------------------------------------------------------------------ properties


@pytest.mark.parametrize("mode,param", [("rao_kupper", "theta_raw"), ("davidson", "kappa")])
def test_ties_probabilities_sum_to_one_and_limits(mode, param):
  d = np.random.default_rng(0).normal(size=B) * 3
  for value in (-1.0, 0.3, 2.0):
    nll_3xB = np.stack([_per_row(mode, d, y, param, value) for y in (1, 0, -1)])
    np.testing.assert_allclose(np.exp(-nll_3xB).sum(0), 1, rtol=1e-5)
  limit = {"theta_raw": -30.0, "kappa": -60.0}[param]
  labels = np.where(d > 0, 1, -1) * np.array([1, 1, -1, 1, -1, 1, 1])
  got = call(reward.bt_ties, d, 0 * d, labels=labels, mode=mode, **{param: limit})
  want = call(reward.bt, np.where(labels > 0, d, 0), np.where(labels > 0, 0, d))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  # The tie parameter is trainable: finite gradients, also at extreme gaps.
  grad = jax.grad(lambda p: call(reward.bt_ties, 1e4 * d, 0 * d, labels=np.array(
      [1, 0, -1, 0, 1, 0, -1]), mode=mode, **{param: p})[0])(0.1)
  assert np.isfinite(grad)


def _per_row(mode, d, y, param, value):
  """Per-row -log P(y) from single-row calls."""
  return np.array([float(call(reward.bt_ties, d[i:i + 1], np.zeros(1), labels=np.array([y]),
                                        mode=mode, **{param: value})[0]) for i in range(len(d))])


def test_ties_half_without_ties_is_bt():
  rc, rr = pair(np.random.default_rng(0), 2.0)
  labels = np.ones(B)
  np.testing.assert_allclose(call(reward.bt_ties, rc, rr, labels=labels)[0],
                             call(reward.bt, rc, rr)[0])


def test_plackett_luce_k2_is_bt():
  rc, rr = pair(np.random.default_rng(1), 2.0)
  got = call(reward.plackett_luce, np.stack([rr, rc], 1), np.tile([1, 0], (B, 1)), np.full(B, 2))
  want = call(reward.bt, rc, rr)
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)


def test_ranklist_window_one_is_adjacent_ranknet_and_full_window_is_plackett_luce():
  g = np.random.default_rng(2)
  s, t, v = lists(g, 1.0)
  got = call(reward.ranklist, s, t, v, w=1)
  hi, lo = [], []
  for si, ti, vi in zip(s, t, v):
    idx = sorted(np.flatnonzero(vi), key=lambda i: -ti[i])
    for a, b in zip(idx, idx[1:]):
      if ti[a] > ti[b]:
        hi.append([si[a], si[b]])
        lo.append([ti[a], ti[b]])
  want = call(reward.ranknet, np.array(hi), np.array(lo), np.ones((len(hi), 2), bool))
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)
  # Distinct targets, all valid: w = K-1 is Plackett-Luce averaged per position.
  t = np.stack([g.permutation(K) for _ in range(B)]).astype(float)
  got = call(reward.ranklist, s, t, np.ones((B, K), bool), w=K - 1)
  pl = call(reward.plackett_luce, s, np.argsort(-t, axis=1), np.full(B, K))
  np.testing.assert_allclose(got[0], pl[0], rtol=1e-6)
  assert float(got[1]) == B * (K - 1)


def test_gpm_antisymmetry_and_cycle():
  g = np.random.default_rng(3)
  va, vb, lam = g.normal(size=(B, 6)), g.normal(size=(B, 6)), g.random((B, 3))
  for norm in (False, True):
    np.testing.assert_allclose(call(reward.gpm_score, va, vb, lam, normalize=norm),
                               -call(reward.gpm_score, vb, va, lam, normalize=norm), atol=1e-6)
    np.testing.assert_allclose(call(reward.gpm_score, va, va, lam, normalize=norm), 0, atol=1e-6)
  angles = np.deg2rad([0, 120, 240])
  v = np.stack([np.cos(angles), np.sin(angles)], 1)
  nxt = np.roll(v, -1, axis=0)  # 0 > 120 > 240 > 0
  np.testing.assert_allclose(call(reward.gpm_score, v, nxt), np.sin(np.deg2rad(120)), atol=1e-6)
  assert float(call(reward.gpm, v, nxt)[2]["accuracy"]) == 3  # no scalar reward gets > 2 of 3


def test_more_weights_two_sources_closed_form():
  g = np.random.default_rng(4)
  for _ in range(5):
    g1, g2 = g.normal(size=(2, 10))
    g1 = g1 + 2 * g2 * g.random()
    want = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    lam = call(reward.more_weights, np.stack([g1, g2]), np.array([True, True]))
    np.testing.assert_allclose(lam, [want, 1 - want], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(call(reward.more_weights, np.ones((2, 3)), np.array([True, True])),
                             [.5, .5])
  np.testing.assert_allclose(call(reward.more_weights, g.normal(size=(2, 3)),
                                  np.array([False, True])),
                             [0, 1])


def test_more_weights_frank_wolfe_on_simplex_and_no_worse_than_vertices():
  g = np.random.default_rng(5)
  grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 101)
                   for b in np.linspace(0, 1, 101) if a + b <= 1 + 1e-12])
  for _ in range(5):
    grads = g.normal(size=(3, 8)) + g.normal(size=8)
    lam = np.asarray(jax.jit(reward.more_weights)(grads, np.ones(3, bool)))
    assert np.all(lam >= 0) and abs(lam.sum() - 1) < 1e-5
    value = np.sum((lam @ grads) ** 2)
    assert value <= np.min(np.sum(grads**2, axis=1)) + 1e-5
    assert value <= np.min(np.sum((grid @ grads) ** 2, axis=1)) * 1.05 + 1e-4
  lam = call(reward.more_weights, g.normal(size=(3, 8)), np.array([True, False, True]))
  assert lam[1] == 0 and abs(float(lam.sum()) - 1) < 1e-5
  np.testing.assert_allclose(call(reward.more_weights, g.normal(size=(3, 8)), np.zeros(3, bool)), 0)


def test_more_ema_and_normalize():
  grads, ema = np.array([[3., 4], [1, 0]]), np.array([[1., 1], [2, 2]])
  got = call(reward.more_ema, grads, np.array([True, False]), ema, rate=0.25, normalize=True)
  np.testing.assert_allclose(got, [[.25 * .6 + .75, .25 * .8 + .75], [2, 2]], rtol=1e-6)
  lam = call(reward.more_weights, grads, np.array([True, True]), ema, rate=0.5)
  want = call(reward.more_weights, .5 * grads + .5 * ema, np.ones(2, bool))
  np.testing.assert_allclose(lam, want)


def test_pref_strength_filter_and_route():
  d = np.random.default_rng(6).normal(size=(4, 10))
  mu, sigma = ensemble.pref_strength(d)
  np.testing.assert_allclose(mu, d.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, d.std(0), rtol=1e-5)
  keep = ensemble.strength_filter(mu, tau_keep=0.1)
  np.testing.assert_array_equal(keep, d.mean(0) >= 0.1)
  keep = ensemble.strength_filter(mu, sigma, tau_keep=1.0, mode="snr")
  np.testing.assert_array_equal(keep, d.mean(0) / (d.std(0) + 1e-6) >= 1.0)
  keep = jax.jit(lambda m: ensemble.strength_filter(m, mode="quantile", q=0.3))(mu)
  assert int(keep.sum()) == 7 and bool(np.all(mu[keep] >= mu[~keep].max()))
  valid = np.arange(10) < 5
  keep = ensemble.strength_filter(mu, mode="quantile", q=0.0, mask=valid)
  np.testing.assert_array_equal(keep, valid)
  codes = jax.jit(ensemble.route)(jnp.array([-2., -.5, -.1, 0, .2, .9]), .3, 1.0)
  np.testing.assert_array_equal(codes, [ensemble.FLIP, ensemble.MARGIN, ensemble.SMOOTH,
                                        ensemble.SMOOTH, ensemble.SMOOTH, ensemble.MARGIN])
  with pytest.raises(ValueError, match="sigma"):
    ensemble.strength_filter(mu, mode="snr")


# ------------------------------------------------------------------ registry, docs, errors


REWARD_KINDS = ("pairwise", "listwise", "rated", "gpm")
REWARD_LOSSES = [n for n in registry.names() if registry.get(n).kind in REWARD_KINDS]


def test_registry():
  kinds = {n: registry.get(n).kind for n in REWARD_LOSSES}
  assert kinds == {
      "bt": "pairwise", "bt_margin": "pairwise", "bt_center": "pairwise",
      "bt_scaled": "pairwise", "bt_smooth": "pairwise", "bt_flip": "pairwise",
      "secrets2": "pairwise", "bt_ties": "pairwise", "bt_weighted": "pairwise",
      "rm_regression": "rated", "bt_plus_regression": "rated", "plackett_luce": "listwise",
      "ranknet": "listwise", "ranklist": "listwise", "gpm": "gpm"}
  assert registry.names("listwise") == ["plackett_luce", "ranklist", "ranknet"]
  assert registry.get("bt").fn is reward.bt and registry.get("bt").name == "bt"
  assert registry.defaults("bt_ties") == {"mode": "half", "theta_raw": 0.0, "kappa": 0.0}
  assert registry.defaults("bt_center") == {"coef": 0.01}
  assert registry.defaults("plackett_luce") == {}
  with pytest.raises(ValueError, match="Unknown loss 'btt'.*bt_margin"):
    registry.get("btt")
  with pytest.raises(ValueError, match="already registered"):
    registry.register("bt", "pairwise")(lambda r_c, r_r: None)
  with pytest.raises(ValueError, match="unknown kind"):
    registry.register("new_loss", "pointwise")
  with pytest.raises(ValueError, match="kind"):
    registry.names("pointwise")


def test_docs_list_every_loss_with_its_defaults():
  doc = ""
  for page in ("losses.md", "dpo.md"):
    with open(os.path.join(REPO, "docs", page)) as f:
      doc += f.read()
  for name in registry.names():
    row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}`")), None)
    assert row is not None, name
    assert registry.get(name).kind in row, name
    for k, v in registry.defaults(name).items():
      assert f"{k}={v!r}".replace("'", '"') in row or f"{k}={v}" in row, (name, k)


def test_input_errors_and_warnings():
  rc, rr = pair(np.random.default_rng(7), 1.0)
  with pytest.raises(AssertionError, match="shapes"):  # chex shape checks
    reward.bt(rc, rr[:3])
  with pytest.raises(ValueError, match="eps"):
    reward.bt_smooth(rc, rr, eps=0.5)
  with pytest.raises(ValueError, match="mode"):
    reward.bt_ties(rc, rr, labels=np.ones(B), mode="bad")
  with pytest.raises(ValueError, match="window"):
    reward.ranklist(*lists(np.random.default_rng(0), 1.0), w=0)
  with pytest.raises(ValueError, match="source_weights"):
    reward.bt_weighted(rc, rr, source=np.zeros(B, int))
  with pytest.warns(UserWarning, match="slack"):
    reward.bt_margin(rc, rr, margin=-0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(lambda m: reward.bt_margin(rc, rr, margin=m))(jnp.full(B, -1.0))
