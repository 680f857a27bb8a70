"""Advantage estimators against METHODS.md §3.7 anchors and independent float64 numpy code.

The numpy references below loop over groups and tokens and follow the peers' code paths
(verl's loops for returns and GAE, TRL's normalise-then-sum), not the kernels' vectorised
forms. Random rewards include NaN samples, a singleton group, an all-NaN group and ties.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rl import advantages as adv
from tests.rl_helpers import _jitted, groups, run

# METHODS.md §3.7 anchor inputs.
R_GOLD = np.array([[1, 0, .5, .5], [1, 1, 0, .25]])
L_GOLD = np.array([3, 3, 3, 3, 2, 2, 4, 4], float)
M_GOLD = (np.arange(4)[None, :] < L_GOLD[:, None]).astype(float)
GAE_R = np.array([[0, 0, 1, 0], [0, 0, 0, -1.]])
GAE_V = np.array([[.2, .3, .4, 0], [.1] * 4])
GAE_M = np.array([[1, 1, 1, 0], [1.] * 4])

B, G, T = 6, 4, 7


def random_rewards(seed=0, b=B, g=G):
  r = np.random.default_rng(seed).normal(size=(b, g))
  r[0, 1] = np.nan          # one unscorable sample
  r[1, :] = 0.7             # all equal: A must be exactly 0
  r[2, 1:] = np.nan         # singleton group
  r[3, :] = np.nan          # all unscorable
  r[4, 2] = r[4, 0]         # a partial tie
  return r


def random_tokens(seed=0, n=B * G, t=T):
  rng = np.random.default_rng(seed + 100)
  lengths = rng.integers(0, t + 1, size=n)
  lengths[0] = t
  lengths[5] = 0            # empty completion
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(float)
  return mask, lengths.astype(float), rng.normal(size=(n, t)) * .1, rng.normal(size=(n, t))


def run_inputs(fn, inputs):
  """jit(fn) on the float32 inputs it names (see adv.required_inputs)."""
  args = {k: jnp.asarray(inputs[k], jnp.float32) for k in adv.required_inputs(fn)}
  return np.asarray(_jitted(fn, ())(**args))


def x64(fn, *args, **kw):
  """`run` on float64 inputs under x64: a float64 numpy array (or tuple)."""
  with jax.enable_x64(True):
    return run(fn, *[jnp.asarray(a, jnp.float64) for a in args], **kw)


# ------------------------------------------------------------------ numpy references


def np_grpo(r, eps=1e-6, singleton="zero", scale="group"):
  a = np.zeros(r.shape)
  fin = r[np.isfinite(r)]
  sd_all = fin.std(ddof=1) if fin.size >= 2 else 0.0
  for i, v, x in groups(r):
    if x.size < 2:
      if singleton == "raw":
        a[i, v] = x / (sd_all + eps) if scale == "batch" else x
      continue
    d = x - x.mean()
    if scale == "group":
      d = d / (x.std(ddof=1) + eps)
    elif scale == "batch":
      d = d / (sd_all + eps)
    a[i, v] = d
  return a.ravel()


def np_rloo(r, singleton="zero"):
  a = np.zeros(r.shape)
  for i, v, x in groups(r):
    if x.size < 2:
      a[i, v] = x if singleton == "raw" else 0
      continue
    a[i, v] = [x[j] - (x.sum() - x[j]) / (x.size - 1) for j in range(x.size)]
  return a.ravel()


def np_opo(r, lengths, singleton="zero"):
  a = np.zeros(r.shape)
  L = lengths.reshape(r.shape)
  for i, v, x in groups(r):
    if x.size < 2:
      a[i, v] = x if singleton == "raw" else 0
    elif L[i, v].sum() > 0:
      a[i, v] = x - np.sum(L[i, v] * x) / L[i, v].sum()
  return a.ravel()


def np_gpg(r, mode="verl", singleton="zero"):
  fin = np.isfinite(r)
  n_all = fin.sum()
  if mode == "verl":
    alpha = n_all / max(np.sum(fin & (np.nan_to_num(r) != 0)), 1)
  else:
    m_deg = sum(x.size for _, _, x in groups(r) if x.size and np.all(x == x[0]))
    alpha = n_all / max(n_all - m_deg, 1)
  a = np.zeros(r.shape)
  for i, v, x in groups(r):
    a[i, v] = alpha * (x - x.mean()) if x.size >= 2 else (alpha * x if singleton == "raw" else 0)
  return a.ravel()


def np_passk(r, eps=1e-6, norm=True):
  a = np.zeros(r.shape)
  for i, v, x in groups(r):
    if x.size < 2:
      continue
    order = sorted(range(x.size), key=lambda j: (-x[j], j))
    gap = x[order[0]] - x[order[1]]
    a[i, v[order[0]]] = gap / (x.std(ddof=1) + eps) if norm else gap
  return a.ravel()


def np_whiten(x, keep, style="verl"):
  vals = x[keep]
  if vals.size < 2:
    return np.where(keep, x - (vals.mean() if vals.size else 0), 0)
  if style == "verl":
    rstd = 1 / np.sqrt(vals.var(ddof=1) + 1e-8)
  else:
    rstd = 1 / np.sqrt(max(vals.var(ddof=0), 1e-8))
  return np.where(keep, (x - vals.mean()) * rstd, 0)


def np_reinforce_pp(r, mask, kl, gamma=1.0, beta=0.01, style="verl"):
  """Token rewards as OpenRLHF; returns with verl's loop ("reset after EOS")."""
  rf = r.ravel()
  valid = np.isfinite(rf)
  m = mask != 0
  rew = np.where(m, -beta * kl, 0.0)
  for i in range(len(rf)):
    idx = np.flatnonzero(m[i])
    if valid[i] and idx.size:
      rew[i, idx[-1]] += rf[i]
  ret = np.zeros(rew.shape)
  for i in range(len(rf)):
    running = 0.0
    for t in reversed(range(rew.shape[1])):
      running = rew[i, t] + gamma * running
      ret[i, t] = running
      running *= m[i, t]
  return np_whiten(ret, m & valid[:, None], style)


def np_rpp_baseline(r, mask, style="verl", singleton="zero"):
  c = np.zeros(r.shape)
  use = np.zeros(r.shape, bool)
  for i, v, x in groups(r):
    if x.size >= 2:
      c[i, v], use[i, v] = x - x.mean(), True
    elif singleton == "raw":
      c[i, v], use[i, v] = x, True
  keep = (mask != 0) & use.ravel()[:, None]
  return np_whiten(np.where(keep, c.ravel()[:, None], 0.0), keep, style)


def np_remax(token_rewards, mask, baseline):
  n, t = mask.shape
  g = n // len(baseline)
  a = np.zeros((n, t))
  for i in range(n):
    b = baseline[i // g]
    m = mask[i] != 0
    if not np.isfinite(b) or not np.all(np.isfinite(token_rewards[i][m])):
      continue
    for s in range(t):
      if m[s]:
        a[i, s] = np.sum(token_rewards[i, s:][m[s:]]) - b
  return a


def np_gae(rew, values, mask, gamma=1.0, lam=0.95):
  """verl's compute_gae_advantage_return loop: (A unwhitened, Ret)."""
  n, t = rew.shape
  nextv, lastgae = np.zeros(n), np.zeros(n)
  out = np.zeros((n, t))
  for s in reversed(range(t)):
    delta = rew[:, s] + gamma * nextv - values[:, s]
    gae = delta + gamma * lam * lastgae
    nextv = values[:, s] * mask[:, s] + (1 - mask[:, s]) * nextv
    lastgae = gae * mask[:, s] + (1 - mask[:, s]) * lastgae
    out[:, s] = lastgae
  return out, out + values


def np_gdpo(r3, weights=None, eps=1e-4):
  b, g, k = r3.shape
  w = np.ones(k) if weights is None else np.asarray(weights, float)
  s = np.zeros((b, g))
  for i in range(b):
    for j in range(k):
      col = r3[i, :, j]
      v = np.isfinite(col)
      if v.sum() >= 2:
        s[i, v] += w[j] * (col[v] - col[v].mean()) / (col[v].std(ddof=1) + eps)
  s = s.ravel()
  ok = np.isfinite(r3).any(axis=2).ravel()
  a = np.zeros(b * g)
  if ok.sum():
    sd = s[ok].std(ddof=1) if ok.sum() >= 2 else 0.0
    a[ok] = (s[ok] - s[ok].mean()) / (sd + eps)
  return a


# ------------------------------------------------------------------ METHODS §3.7 anchors


def test_methods_anchors():
  close = functools.partial(np.testing.assert_allclose, rtol=0, atol=2e-6)
  close(x64(adv.grpo_adv, R_GOLD, eps=1e-4),
        [1.224445, -1.224445, 0, 0, .84871, .84871, -1.091199, -.606221])
  close(x64(adv.grpo_adv_batch, R_GOLD, eps=1e-4),
        [1.157884, -1.157884, 0, 0, 1.013149, 1.013149, -1.30262, -.723678])
  rloo = [.666667, -.666667, 0, 0, .583333, .583333, -.75, -.416667]
  close(x64(adv.rloo_adv, R_GOLD), rloo, atol=1e-6)
  close(x64(adv.gpg_adv, R_GOLD), rloo, atol=1e-6)
  close(x64(adv.opo_adv, R_GOLD, L_GOLD), [.5, -.5, 0, 0, .583333, .583333, -.416667, -.166667],
        atol=1e-6)
  a = x64(adv.reinforce_pp_baseline_adv, R_GOLD, M_GOLD)
  close(a[:, 0], [1.410559, -1.051507, .179526, .179526, 1.25668, 1.25668, -1.205387, -.58987])
  assert np.all(a[M_GOLD == 0] == 0) and np.all(a == a[:, :1] * M_GOLD)
  a_raw, ret = x64(adv.gae_returns, GAE_R, GAE_V, GAE_M, gamma=1.0, lam=.95)
  close(ret, [[.9365, .97, 1, 0], [-.843112, -.89275, -.945, -1]])
  gold_a0 = [1.141314, 1.06783, .990478, .327461]  # masked slot not zeroed
  close(x64(adv.whiten, a_raw, GAE_M)[0], gold_a0)
  a = x64(adv.gae_adv, GAE_R, GAE_V, GAE_M, gamma=1.0, lam=.95)
  close(a[0], gold_a0[:3] + [0])


# ------------------------------------------------------------------ against numpy


SEQ_CASES = [
    ("grpo_adv", {}, lambda r: np_grpo(r)),
    ("grpo_adv", {"eps": 1e-4, "singleton": "raw"}, lambda r: np_grpo(r, 1e-4, "raw")),
    ("grpo_adv_batch", {}, lambda r: np_grpo(r, scale="batch")),
    ("grpo_adv_batch", {"singleton": "raw"}, lambda r: np_grpo(r, 1e-6, "raw", "batch")),
    ("grpo_adv_none", {}, lambda r: np_grpo(r, scale="none")),
    ("drgrpo_adv", {"singleton": "raw"}, lambda r: np_grpo(r, 0, "raw", "none")),
    ("rloo_adv", {}, np_rloo),
    ("rloo_adv", {"singleton": "raw"}, lambda r: np_rloo(r, "raw")),
    ("gpg_adv", {}, np_gpg),
    ("gpg_adv", {"alpha_mode": "paper", "singleton": "raw"}, lambda r: np_gpg(r, "paper", "raw")),
    ("passk_adv", {}, np_passk),
    ("passk_adv", {"norm_by_std": False}, lambda r: np_passk(r, norm=False)),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_estimators_match_numpy(seed):
  r = random_rewards(seed)
  for name, kw, ref in SEQ_CASES:
    np.testing.assert_allclose(x64(adv.get(name), r, **kw), ref(r), rtol=1e-10, atol=1e-12,
                               err_msg=f"{name} {kw}")
  _, lengths, _, _ = random_tokens(seed)
  lengths[4 * G:5 * G] = 0  # a group whose valid lengths sum to 0
  for kw in ({}, {"singleton": "raw"}):
    np.testing.assert_allclose(x64(adv.opo_adv, r, lengths, **kw), np_opo(r, lengths, **kw),
                               rtol=1e-10, atol=1e-12)


def test_float32_matches_numpy():
  r = random_rewards(3)
  for name, kw, ref in SEQ_CASES[::3]:
    out = run(adv.get(name), jnp.asarray(r, jnp.float32), **kw)
    assert out.dtype == np.float32 and out.shape == (B * G,)
    np.testing.assert_allclose(np.asarray(out), ref(r), rtol=1e-5, atol=1e-5, err_msg=name)


def test_edge_rules():
  r = random_rewards(0)
  for name in ("grpo_adv", "grpo_adv_batch", "grpo_adv_none", "rloo_adv", "gpg_adv",
               "passk_adv"):
    a = run(adv.get(name), r).reshape(B, G)
    assert np.all(a[1] == 0), name                      # ties: exactly 0, no eps residue
    assert np.all(a[2] == 0) and np.all(a[3] == 0), name  # singleton and all-NaN groups
    assert a[0, 1] == 0, name                            # the unscorable sample
  a = run(adv.opo_adv, r, np.ones(B * G)).reshape(B, G)
  assert np.all(a[1] == 0) and np.all(a[2] == 0)
  # singleton="raw": A = r (verl's mean 0, std 1).
  assert run(adv.grpo_adv, r, singleton="raw")[2 * G] == np.float32(r[2, 0])
  # The largest group z-score is (G-1)/sqrt(G), the reason stable_adv_filter is batch-level.
  one_hot = np.eye(8)[:1]
  np.testing.assert_allclose(run(adv.grpo_adv, one_hot, eps=0.0).max(), 7 / np.sqrt(8),
                             rtol=1e-6)
  # pass@k: tie at the top gives all zeros; the first of tied maxima takes the credit otherwise.
  a = run(adv.passk_adv, np.array([[1., 1., 0, .5], [0, 2, 2, 1]]))
  assert np.all(a[:4] == 0) and np.all(a[4:] == 0)
  a = run(adv.passk_adv, np.array([[0., 3, 3, 5]]), norm_by_std=False)
  np.testing.assert_array_equal(a, [0, 0, 0, 2])


def test_token_estimators_match_numpy():
  r = random_rewards(4)
  mask, _, kl, values = random_tokens(4)
  mask[7] = 1
  mask[7, 2:4] = 0  # a hole (tool tokens) inside a completion
  for style in ("verl", "openrlhf"):
    for gamma, beta in ((1.0, 0.01), (0.9, 0.2)):
      np.testing.assert_allclose(
          x64(adv.reinforce_pp_adv, r, mask, kl, gamma=gamma, beta=beta, whiten=style),
          np_reinforce_pp(r, mask, kl, gamma, beta, style), rtol=1e-9, atol=1e-10,
          err_msg=f"reinforce_pp {style} {gamma}")
    for singleton in ("zero", "raw"):
      np.testing.assert_allclose(
          x64(adv.reinforce_pp_baseline_adv, r, mask, whiten=style, singleton=singleton),
          np_rpp_baseline(r, mask, style, singleton), rtol=1e-9, atol=1e-10,
          err_msg=f"baseline {style} {singleton}")

  # Token rewards as the trainer builds them: scalar reward on the last token, minus beta kl.
  rew = -0.05 * kl * mask
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  rows = np.flatnonzero(mask.any(1))
  rew[rows, last[rows]] += r.ravel()[rows]  # NaN rewards propagate: those rows get A = 0
  baseline = np.random.default_rng(4).normal(size=B)
  baseline[5] = np.nan
  np.testing.assert_allclose(x64(adv.remax_adv, rew, mask, baseline),
                             np_remax(rew, mask, baseline), rtol=1e-10, atol=1e-12)

  ok = np.all(np.where(mask != 0, np.isfinite(rew), True), axis=1)
  rew_clean = np.where(mask != 0, np.nan_to_num(rew), 0.0)
  for gamma, lam in ((1.0, 0.95), (0.99, 1.0)):
    a_raw, ret = x64(adv.gae_returns, rew_clean, values, mask, gamma=gamma, lam=lam)
    np_a, np_ret = np_gae(rew_clean, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(a_raw, np_a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ret, np_ret, rtol=1e-10, atol=1e-12)
    keep = (mask != 0) & ok[:, None]
    np.testing.assert_allclose(x64(adv.gae_adv, rew, values, mask, gamma=gamma, lam=lam),
                               np_whiten(np_gae(np.where(keep, rew_clean, 0), values * mask,
                                                mask, gamma, lam)[0], keep),
                               rtol=1e-9, atol=1e-10)
  a = x64(adv.gae_adv, rew_clean, values, mask, normalize=False)
  np.testing.assert_allclose(a, np.where(mask != 0, np_gae(rew_clean, values * mask, mask)[0], 0),
                             rtol=1e-10, atol=1e-12)


def test_gdpo_matches_numpy():
  rng = np.random.default_rng(5)
  r3 = rng.normal(size=(B, G, 3))
  r3[0, 1, 0] = np.nan           # a missing component adds 0
  r3[1, :, 1] = 2.0              # a constant function: z = 0
  r3[2, 1:, 2] = np.nan          # a function with one valid value in the group
  r3[3, 2, :] = np.nan           # a sample with no rewards: A = 0, out of the statistics
  for kw in ({}, {"weights": (1.0, .5, 2.0), "eps": 1e-6}):
    np.testing.assert_allclose(x64(adv.gdpo_adv, r3, **kw), np_gdpo(r3, **kw), rtol=1e-9,
                               atol=1e-12)
  assert x64(adv.gdpo_adv, r3)[3 * G + 2] == 0
  # Without NaN this is TRL's normalize_then_sum (numpy transcription, eps 1e-4).
  clean = rng.normal(size=(B, G, 2))
  z = (clean - clean.mean(1, keepdims=True)) / (clean.std(1, ddof=1, keepdims=True) + 1e-4)
  s = z.sum(2).ravel()
  np.testing.assert_allclose(x64(adv.gdpo_adv, clean), (s - s.mean()) / (s.std(ddof=1) + 1e-4),
                             rtol=1e-9)
  with pytest.raises(ValueError, match="K=3"):
    adv.gdpo_adv(r3, weights=(1.0, 2.0))


def test_stable_adv_filter():
  rng = np.random.default_rng(6)
  a = rng.normal(size=32)
  a[3], a[9] = 40.0, np.nan
  valid = np.ones(32, bool)
  valid[11] = False
  w = x64(lambda a, v: adv.stable_adv_filter(a, valid=v), a, valid)
  ok = np.isfinite(a) & valid
  z = (a[ok] - a[ok].mean()) / (a[ok].std(ddof=1) + 1e-6)
  ref = np.zeros(32)
  ref[ok] = np.abs(z) <= 3
  np.testing.assert_array_equal(w, ref)
  assert w[3] == 0 and w[9] == 0 and w[11] == 0 and w.sum() == 29
  assert "stable_adv_filter" not in adv.ESTIMATORS


# ------------------------------------------------------------------ robustness, jit, registry


def _all_inputs(r, scale=1.0):
  mask, lengths, kl, values = random_tokens(7, n=r.size)
  rew = np.where(mask != 0, kl * scale, 0.0)
  return {"r": r, "mask": mask, "lengths": lengths, "kl": kl, "values": values * scale,
          "token_rewards": rew, "baseline": np.full(r.shape[0], scale),
          "r_multi": np.stack([r, r * .5 + 1], axis=-1)}


def test_large_and_all_nan_rewards_stay_finite():
  base = random_rewards(8)
  big = _all_inputs(np.nan_to_num(base, nan=0.0) * 1e6 + 1e6, scale=1e6)
  nan = _all_inputs(np.full((B, G), np.nan))
  nan["token_rewards"] = np.full((B * G, T), np.nan)
  nan["baseline"] = np.full(B, np.nan)
  for name in adv.names():
    fn = adv.get(name)
    a = run_inputs(fn, big)
    assert a.dtype == np.float32 and np.all(np.isfinite(a)), name
    a = run_inputs(fn, nan)
    assert np.all(a == 0), name
  # grpo at 1e6: the float32 result still matches float64 numpy.
  r = np.array([[1e6, 1e6 + 1, 1e6 + 3, 1e6]])
  np.testing.assert_allclose(run(adv.grpo_adv, r), np_grpo(r), rtol=1e-5)


def test_jit_matches_eager_and_no_gradient():
  inputs = _all_inputs(random_rewards(9))
  for name, kw in (("grpo_adv", {"singleton": "raw"}), ("reinforce_pp_adv", {"gamma": .9}),
                   ("gae_adv", {})):
    fn = adv.get(name)
    args = {k: jnp.asarray(inputs[k], jnp.float32) for k in adv.required_inputs(fn)}
    jitted = jax.jit(functools.partial(fn, **kw))(**args)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(fn(**args, **kw)), rtol=1e-6,
                               atol=1e-6, err_msg=name)
  g = jax.grad(lambda r: jnp.sum(adv.grpo_adv(r) * jnp.arange(B * G)))(
      jnp.asarray(np.nan_to_num(random_rewards(9)), jnp.float32))
  assert np.all(np.asarray(g) == 0)


def test_registry_and_inputs():
  expected = {"grpo_adv", "grpo_adv_batch", "grpo_adv_none", "drgrpo_adv", "rloo_adv",
              "reinforce_pp_adv", "reinforce_pp_baseline_adv", "remax_adv", "opo_adv", "gpg_adv",
              "passk_adv", "gae_adv", "gdpo_adv"}
  assert set(adv.names()) == expected
  token = {n for n in expected if adv.is_token_level(n)}
  assert token == {"reinforce_pp_adv", "reinforce_pp_baseline_adv", "remax_adv", "gae_adv"}
  for name in adv.names():
    assert set(adv.required_inputs(name)) <= set(adv.INPUTS), name
    for key, value in adv.defaults(name).items():
      assert value is None or isinstance(value, (bool, int, float, str)), (name, key)
  assert adv.required_inputs("opo_adv") == ("r", "lengths")
  assert adv.required_inputs("gae_adv") == ("token_rewards", "values", "mask")
  assert adv.defaults("grpo_adv") == {"eps": 1e-6, "singleton": "zero"}
  inputs = {"r": R_GOLD, "lengths": L_GOLD, "mask": M_GOLD}
  np.testing.assert_array_equal(adv.call("opo_adv", inputs), adv.opo_adv(R_GOLD, L_GOLD))
  with pytest.raises(ValueError, match=r"missing inputs \['kl'\]"):
    adv.call("reinforce_pp_adv", inputs, beta=0.1)
  with pytest.raises(ValueError, match="Registered estimators: drgrpo_adv, gae_adv"):
    adv.get("ppo")
  with pytest.raises(ValueError, match="already registered"):
    adv.register("grpo_adv")(lambda r: r)
  with pytest.raises(ValueError, match="not in INPUTS"):
    adv.register("bad_adv")(lambda r, eps: r)
  assert "bad_adv" not in adv.ESTIMATORS
  with pytest.raises(ValueError, match="singleton"):
    adv.grpo_adv(R_GOLD, singleton="one")
  with pytest.raises(ValueError, match="whiten"):
    adv.reinforce_pp_baseline_adv(R_GOLD, M_GOLD, whiten="trl")
  with pytest.raises(ValueError, match=r"\[B,G\]"):
    adv.grpo_adv(R_GOLD.ravel())
  with pytest.raises(ValueError, match="mask must be"):
    adv.reinforce_pp_baseline_adv(R_GOLD, M_GOLD[:4])


def test_float64_dtype_under_x64():
  with jax.enable_x64(True):
    assert adv.grpo_adv(jnp.asarray(R_GOLD)).dtype == jnp.float64
    assert adv.grpo_adv(jnp.asarray(R_GOLD, jnp.float32)).dtype == jnp.float32
