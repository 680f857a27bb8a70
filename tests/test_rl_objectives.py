"""RL policy losses, KL estimators and aggregation against METHODS.md 3.7 anchors and float64 numpy.

The numpy references below are written from the METHODS.md section 3 formulas, in float64,
and are compared with the float32 kernels per token (masked slots must be 0).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax.rl import objectives as O

# ------------------------------------------------------------------ METHODS 3.7 anchors

G_LOGP = np.array([[-.5, -1, -.2, -2, -.7], [-1.5, -.3, -.9, -.4, -.4],
                   [-.1, -2.5, -.6, -1.1, -3], [-.8, -.2, -.2, -.2, -.2]])
G_OLD = G_LOGP + np.array([[.3, -.4, .05, 0, -.2], [-.25, .1, .5, 0, 0], [0, -.1, .35, -.3, 0],
                           [.6, 0, 0, 0, 0]])
G_REF = G_LOGP + np.array([[.1, .2, -.1, .3, 0], [-.2, .1, 0, 0, 0], [.05, -.3, .2, .1, 0],
                           [-.4, 0, 0, 0, 0]])
G_MASK = (np.arange(5)[None] < np.array([5, 3, 4, 1])[:, None]).astype(np.float64)
G_A = np.array([1.2, -.8, .5, -.9])
G = dict(logp=G_LOGP, old=G_OLD, ref=G_REF, A=G_A, mask=G_MASK)

TM, SMTM = "token-mean", "seq-mean-token-mean"
ANCHORS = [  # (loss, params, mode, aggregation kwargs, expected)
    ("ppo", dict(eps_hi=.28), TM, {}, -0.39738306),
    ("ppo", dict(eps_hi=.28), SMTM, {}, -0.06015760),
    ("ppo", {}, TM, {}, -0.38494588),
    ("ppo", {}, SMTM, {}, -0.05157343),
    ("ppo", {}, "seq-mean-token-sum-norm", dict(norm="trl"), -0.25021482),
    ("ppo", {}, "seq-mean-token-sum-norm", dict(norm="verl"), -1.00085928),
    ("ppo", {}, "seq-mean-token-sum-norm", dict(norm="verl", norm_const=5), -1.00085928),
    ("dual_clip", dict(clip_c=1.25), TM, {}, -0.38703975),
    ("ppo", dict(clip_c=1.25), TM, {}, -0.38703975),
    ("gspo", dict(eps_lo=.2, eps_hi=.28), SMTM, {}, -0.08397728),
    ("sapo", {}, SMTM, {}, -0.18225720),
    ("cispo", dict(mode="trl"), TM, {}, 0.43726219),
    ("cispo", dict(mode="verl"), TM, {}, 0.39542893),
    ("gmpo", {}, SMTM, {}, -0.05293460),
    ("pg", {}, TM, {}, 0.35),
]


@pytest.mark.parametrize("name,params,mode,kw,expected", ANCHORS)
def test_methods_anchors_losses(name, params, mode, kw, expected):
  l, _ = O.call(name, G, **params)
  np.testing.assert_allclose(float(O.aggregate(l, G_MASK, mode, **kw)), expected, atol=1e-6)


def test_methods_anchors_kl():
  expected = {"k1": -0.00384615, "k2": 0.01932692, "k3": 0.01878112, "abs": 0.15769231}
  for k, v in expected.items():
    for mask in (G_MASK, None):
      kl = O.KL_ESTIMATORS[k](G_LOGP, G_REF, mask)
      np.testing.assert_allclose(float(O.aggregate(kl, G_MASK)), v, atol=1e-7)
  # GSPO's anchor does not depend on eps_lo (no negative sequence is clipped).
  l, _ = O.gspo_loss(G_LOGP, G_OLD, G_A, G_MASK, eps_lo=.2, eps_hi=.2)
  np.testing.assert_allclose(float(O.aggregate(l, G_MASK, SMTM)), -0.08397728, atol=1e-6)


# ------------------------------------------------------------------ numpy references (float64)


def clip_lr(lr):
  return np.clip(lr, -20, 20)


def np_ppo(z, eps_lo=.2, eps_hi=.2, clip_c=None, lr_lo=-20., lr_hi=20.):
  A = z["At"]
  rho = np.exp(np.clip(z["logp"] - z["old"], lr_lo, lr_hi))
  l = np.maximum(-A * rho, -A * np.clip(rho, 1 - eps_lo, 1 + eps_hi))
  lo, hi = (A < 0) & (rho < 1 - eps_lo), (A > 0) & (rho > 1 + eps_hi)
  aux = dict(ratio=rho, clip_low=lo, clip_high=hi, clipped=lo | hi)
  if clip_c is not None:
    dual = (A < 0) & (-A * clip_c < l)
    l = np.where(A < 0, np.minimum(l, -A * clip_c), l)
    aux["dual_clipped"] = dual
  return l, aux


def np_preclip(z, eps_lo=.2, eps_hi=.2, d_lo=np.exp(-3), d_hi=np.exp(3)):
  return np_ppo(z, eps_lo, eps_hi, lr_lo=np.log(d_lo), lr_hi=np.log(d_hi))


def np_gspo(z, eps_lo=3e-4, eps_hi=4e-4):
  m, A = z["mask"], z["At"]
  L = np.maximum(m.sum(1), 1)
  s = np.exp(np.minimum((m * clip_lr(z["logp"] - z["old"])).sum(1) / L, 10))[:, None]
  s = np.broadcast_to(s, m.shape)
  l = np.maximum(-A * s, -A * np.clip(s, 1 - eps_lo, 1 + eps_hi))
  lo, hi = (A < 0) & (s < 1 - eps_lo), (A > 0) & (s > 1 + eps_hi)
  return l, dict(ratio=s, clip_low=lo, clip_high=hi, clipped=lo | hi)


def np_gmpo(z, eps_lo=.2, eps_hi=.28):
  m, A = z["mask"], z["At"]
  L = np.maximum(m.sum(1), 1)
  lr = clip_lr(z["logp"] - z["old"])
  lc = np.where(A > 0, np.minimum(lr, eps_hi), np.where(A < 0, np.maximum(lr, -eps_lo), 0.))
  r = np.exp((m * lc).sum(1) / L)
  a = (m * A).sum(1) / L
  l = np.broadcast_to((-a * r)[:, None], m.shape)
  lo, hi = (A < 0) & (lr < -eps_lo), (A > 0) & (lr > eps_hi)
  return l, dict(ratio=np.exp(lr), clip_low=lo, clip_high=hi, clipped=lo | hi,
                 seq_ratio=np.broadcast_to(r[:, None], m.shape))


def np_cispo(z, mode="trl", cap=5., eps_lo=.2, eps_hi=.28):
  rho = np.exp(clip_lr(z["logp"] - z["old"]))
  if mode == "trl":
    w, lo, hi = np.minimum(rho, cap), np.zeros_like(rho, bool), rho > cap
  else:
    w, lo, hi = np.clip(rho, 1 - eps_lo, 1 + eps_hi), rho < 1 - eps_lo, rho > 1 + eps_hi
  return -w * z["At"] * z["logp"], dict(ratio=rho, weight=w, clip_low=lo, clip_high=hi,
                                        clipped=lo | hi)


def np_sapo(z, tau_pos=1., tau_neg=1.05):
  A = z["At"]
  rho = np.exp(clip_lr(z["logp"] - z["old"]))
  tau = np.where(A > 0, tau_pos, tau_neg)
  g = 1 / (1 + np.exp(-tau * (rho - 1)))
  return -A * g * 4 / tau, dict(ratio=rho, gate=4 * g * (1 - g))


def np_pg(z):
  return -z["At"] * z["logp"], {}


def np_kl(logp, ref, kind, clamp="verl"):
  x = logp - ref
  if kind == "k1":
    k = x
  elif kind == "k2":
    k = x * x / 2
  elif kind == "abs":
    k = np.abs(x)
  else:
    if clamp == "verl":
      x = np.clip(x, -20, 20)
    k = np.exp(-x) - 1 + x
    if clamp == "verl":
      k = np.clip(k, -10, 10)
  return np.clip(k, -10, 10) if clamp == "openrlhf" else k


def np_agg(l, m, mode, norm_const=None, norm="verl"):
  L = m.sum(1)
  n_seq = max((L > 0).sum(), 1)
  s = (l * m).sum()
  if mode == "token-mean":
    return s / max(m.sum(), 1)
  if mode == "seq-mean-token-mean":
    return ((l * m).sum(1) / np.maximum(L, 1)).sum() / n_seq
  if mode == "seq-mean-token-sum":
    return s / n_seq
  c = m.shape[1] if norm_const is None else norm_const
  return s / (c if norm == "verl" else n_seq * c)


# ------------------------------------------------------------------ random inputs

N, T = 6, 7
LENGTHS = np.array([7, 3, 0, 5, 1, 6])


def random_inputs(seed=0, token_adv=False):
  rng = np.random.default_rng(seed)
  mask = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.float64)
  logp = -rng.uniform(0.01, 3, (N, T))
  old = logp + rng.normal(0, .4, (N, T))
  ref = logp + rng.normal(0, .5, (N, T))
  A = rng.normal(0, 1, (N, T) if token_adv else (N,))
  At = A if token_adv else np.broadcast_to(A[:, None], (N, T))
  return dict(logp=logp, old=old, ref=ref, A=A, At=At, mask=mask)


LOSS_CASES = [  # (name, params, numpy reference)
    ("ppo", {}, np_ppo),
    ("ppo", dict(eps_lo=.1, eps_hi=.28), np_ppo),
    ("ppo", dict(clip_c=2.0), np_ppo),
    ("dual_clip", {}, functools.partial(np_ppo, clip_c=3.0)),
    ("ppo_preclip", dict(d_lo=.7, d_hi=1.5), np_preclip),
    ("gspo", {}, np_gspo),
    ("gspo", dict(eps_lo=.05, eps_hi=.1), np_gspo),
    ("gmpo", {}, np_gmpo),
    ("gmpo", dict(eps_lo=.1, eps_hi=.1), np_gmpo),
    ("cispo", {}, np_cispo),
    ("cispo", dict(cap=1.1), np_cispo),
    ("cispo", dict(mode="verl"), np_cispo),
    ("sapo", {}, np_sapo),
    ("sapo", dict(tau_pos=2., tau_neg=.5), np_sapo),
    ("pg", {}, np_pg),
]


@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("name,params,ref_fn", LOSS_CASES)
def test_losses_match_numpy(name, params, ref_fn, token_adv):
  z = random_inputs(1 + token_adv, token_adv)
  m = z["mask"]
  l, aux = O.call(name, z, **params)
  l_np, aux_np = ref_fn(z, **params)
  assert l.shape == (N, T) and l.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(l), np.where(m > 0, l_np, 0), rtol=2e-5, atol=2e-6)
  assert set(aux) == set(aux_np), (sorted(aux), sorted(aux_np))
  for k, v in aux.items():
    assert v.shape == (N, T) and v.dtype == jnp.float32, k
    np.testing.assert_allclose(np.asarray(v), np.where(m > 0, aux_np[k], 0), rtol=2e-5,
                               atol=2e-6, err_msg=k)
  if name != "pg" and not (name == "cispo" and not params):  # cap 5 is never reached here
    assert any(np.any(np.asarray(aux.get(k, 0))) for k in ("clipped", "gate"))  # exercised


@pytest.mark.parametrize("mode", O.MODES)
@pytest.mark.parametrize("norm", ["verl", "trl"])
def test_aggregation_matches_numpy(mode, norm):
  z = random_inputs(3)
  l = np.random.default_rng(4).normal(size=(N, T))
  for c in (None, 16.0):
    got = O.aggregate(l, z["mask"], mode, norm_const=c, norm=norm)
    np.testing.assert_allclose(float(got), np_agg(l, z["mask"], mode, c, norm), rtol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("clamp", ["verl", "openrlhf", None])
def test_kl_matches_numpy(kind, clamp):
  z = random_inputs(5)
  logp, ref, m = z["logp"], z["ref"] + np.where(np.arange(T) == 2, 25.0, 0), z["mask"]
  got = O.KL_ESTIMATORS[kind](logp, ref, m, clamp=clamp)
  want = np.where(m > 0, np_kl(logp, ref, kind, clamp), 0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-5)


# ------------------------------------------------------------------ gradients


def test_gspo_straight_through_gradient():
  z = random_inputs(6, token_adv=True)
  m, A = z["mask"], z["A"]
  fn = lambda lp: jnp.sum(O.gspo_loss(lp, z["old"], A, m, eps_lo=.05, eps_hi=.05)[0])
  g = np.asarray(jax.grad(fn)(jnp.asarray(z["logp"], jnp.float32)))
  l_np, aux = np_gspo(z, .05, .05)
  s = aux["ratio"]
  want = np.where((m > 0) & ~aux["clipped"], -A * s, 0)  # d l_it / d logp_it = -A_it s_i
  assert aux["clipped"][m > 0].any() and (~aux["clipped"][m > 0]).any()
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)

  # With a sequence-level A, the seq-mean-token-mean gradient equals TRL's non-ST form.
  z = random_inputs(7)
  m, A = z["mask"], jnp.asarray(z["A"], jnp.float32)

  def trl_form(lp):
    lr = jnp.where(m > 0, lp - z["old"], 0)
    s = jnp.exp(jnp.sum(lr, 1) / jnp.maximum(m.sum(1), 1))[:, None]
    l = jnp.maximum(-A[:, None] * s, -A[:, None] * jnp.clip(s, 1 - .05, 1 + .05))
    return O.aggregate(jnp.broadcast_to(l, m.shape), m, SMTM)

  st_form = lambda lp: O.aggregate(O.gspo_loss(lp, z["old"], A, m, eps_lo=.05,
                                               eps_hi=.05)[0], m, SMTM)
  lp = jnp.asarray(z["logp"], jnp.float32)
  np.testing.assert_allclose(float(st_form(lp)), float(trl_form(lp)), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(st_form)(lp), jax.grad(trl_form)(lp), rtol=1e-5,
                             atol=1e-7)


def test_kl_st_value_of_base_gradient_of_k2():
  z = random_inputs(8)
  lp, m = jnp.asarray(z["logp"], jnp.float32), z["mask"]
  for base, name in (("k3", "k3+"), ("k1", "k1+")):
    f_st = lambda x: O.KL_ESTIMATORS[name](x, z["ref"], m)
    np.testing.assert_allclose(f_st(lp), O.KL_ESTIMATORS[base](lp, z["ref"], m), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(f_st(x)))(lp)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(O.kl_k2(x, z["ref"], m)))(lp),
                               rtol=1e-6)
    np.testing.assert_allclose(g, np.where(m > 0, z["logp"] - z["ref"], 0), rtol=1e-5,
                               atol=1e-6)


def test_cispo_and_pg_weights_carry_no_gradient():
  z = random_inputs(9)
  m, A = z["mask"], z["At"]
  lp = jnp.asarray(z["logp"], jnp.float32)
  w = np.random.default_rng(0).uniform(.5, 2, (N, T))
  g = jax.grad(lambda x: jnp.sum(O.pg_loss(x, z["A"], m, w=jnp.asarray(w) * jnp.exp(x))[0]))(lp)
  np.testing.assert_allclose(g, np.where(m > 0, -w * np.exp(z["logp"]) * A, 0), rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(O.cispo_loss(x, z["old"], z["A"], m, mode="verl")[0]))(lp)
  _, aux = np_cispo(z, mode="verl")
  np.testing.assert_allclose(g, np.where(m > 0, -aux["weight"] * A, 0), rtol=1e-5, atol=1e-6)


def test_data_inputs_carry_no_gradient():
  """old, ref, A get stop_gradient inside the kernels: on-policy `old = logp` is safe."""
  z = random_inputs(20)
  m, A = z["mask"], z["At"]
  lp = jnp.asarray(z["logp"], jnp.float32)
  for name in ("ppo", "dual_clip", "ppo_preclip", "cispo", "sapo"):
    # Passing logp itself as old and A must equal passing constants.
    f = lambda x, old, a: jnp.sum(O.call(name, {**z, "logp": x, "old": old, "A": a})[0])
    g = jax.grad(lambda x: f(x, x, x))(lp)
    g_ref = jax.grad(lambda x: f(x, lp, lp))(lp)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, err_msg=name)
  g = jax.grad(lambda x: jnp.sum(O.ppo_clip_loss(x, x, z["A"], m)[0]))(lp)
  np.testing.assert_allclose(g, np.where(m > 0, -A, 0), rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(O.kl_k3(x, x + 0.1, m)))(lp)
  np.testing.assert_allclose(g, np.where(m > 0, 1 - np.exp(0.1), 0), rtol=1e-5)


def _garbage(z, rng):
  """Copies of the token inputs with NaN / inf / huge values in every masked slot."""
  bad = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -3e38]), size=(N, T))
  out = dict(z)
  for k in ("logp", "old", "ref"):
    out[k] = np.where(z["mask"] > 0, z[k], bad)
  out["A"] = np.where(z["mask"] > 0, z["At"], bad)  # token-level A with garbage
  out["A"][LENGTHS == 0] = np.nan
  return out


LOSS_NAMES = sorted({c[0] for c in LOSS_CASES})


def _terms(lp, z):
  """Every kernel as a scalar function of logp (sum of its outputs, aux included)."""
  m, out = z["mask"], {}
  for name in LOSS_NAMES:
    l, aux = O.call(name, {**z, "logp": lp})
    out[name] = jnp.sum(l) + sum(jnp.sum(v) for v in aux.values())
  for k in ("k1", "k2", "k3", "abs", "k1+", "k3+"):
    fn = O.KL_ESTIMATORS[k]
    for clamp in ("verl", "openrlhf", None):
      out[f"kl_{k}_{clamp}"] = jnp.sum(fn(lp, z["ref"], m, clamp=clamp))
  out["penalty"] = jnp.sum(O.kl_penalty_in_reward(z["old"], z["ref"], m, beta=.1))
  v, vaux = O.value_loss(lp, z["old"], z["ref"], m)
  out["value"] = jnp.sum(v) + jnp.sum(vaux["clipped"])
  for level in ("token", "sequence"):
    for mode in ("tis", "mis"):
      out[f"is_{level}_{mode}"] = jnp.sum(O.rollout_is_weights(z["old"], lp, m, level=level,
                                                              mode=mode, lo=.5))
  out["raft"] = sum(O.raft_loss(lp, m, z["w"]))
  out["superhf"] = sum(O.superhf_loss(lp, z["ref"], m, z["w"], beta=.1))
  for mode in O.MODES:
    out[f"agg_{mode}"] = O.aggregate(lp, m, mode)
  out["entropy"] = O.entropy_bonus(lp, m, TM, coef=.01)
  return out


_terms_jit = _terms  # eager: no fusion, and cheaper than compiling this graph
_terms_grads = jax.jacrev(_terms)  # {term: d term / d logp [N,T]}
W_RAFT = np.where(LENGTHS > 0, (np.arange(N) % 2 == 0) * 1.0, np.nan)  # NaN on empty rows


def _term_inputs(z):
  return {k: np.asarray(z[k], np.float32) for k in ("old", "ref", "mask")} | {
      "A": np.asarray(z["A"], np.float32), "w": W_RAFT.astype(np.float32)}


def test_masked_slots_never_leak():
  z = random_inputs(10)
  m = z["mask"]
  zg = _garbage(z, np.random.default_rng(11))
  lp = jnp.asarray(zg["logp"], jnp.float32)
  vals = _terms_jit(lp, _term_inputs(zg))
  clean = _terms_jit(jnp.asarray(z["logp"], jnp.float32), _term_inputs({**z, "A": z["At"]}))
  for k, v in vals.items():
    assert np.isfinite(float(v)), k
    np.testing.assert_allclose(float(v), float(clean[k]), rtol=1e-6, atol=1e-6, err_msg=k)
  for k, g in _terms_grads(lp, _term_inputs(zg)).items():
    assert np.all(np.isfinite(g)), k
    assert np.all(np.asarray(g)[m == 0] == 0), k
  # Under jit too, for the policy losses.
  f = jax.jit(jax.grad(lambda x, z: sum(jnp.sum(O.call(n, {**z, "logp": x})[0])
                                        for n in LOSS_NAMES)))
  g = f(lp, {k: zg[k] for k in ("old", "A", "mask")})
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[m == 0] == 0)


def test_logit_scale_inputs_stay_finite():
  rng = np.random.default_rng(12)
  z = random_inputs(12)
  big = {k: rng.choice([-1e4, 1e4, 0.0], size=(N, T)) for k in ("logp", "old", "ref")}
  big["logp"] = -np.abs(big["logp"])
  zb = _term_inputs({**z, **big, "A": z["At"] * 1e4})
  lp = jnp.asarray(big["logp"], jnp.float32)
  for k, v in _terms_jit(lp, zb).items():
    assert np.isfinite(float(v)), k
  for k, g in _terms_grads(lp, zb).items():
    assert np.all(np.isfinite(g)), k


def test_empty_mask_gives_zero_and_zero_gradient():
  z = random_inputs(13)
  m0 = np.zeros((N, T))
  lp = jnp.asarray(z["logp"], jnp.float32)
  for name in LOSS_NAMES:
    for mode in O.MODES:
      f = lambda x: O.aggregate(O.call(name, {**z, "logp": x, "mask": m0})[0], m0, mode)
      val, g = jax.value_and_grad(f)(lp)
      assert float(val) == 0 and np.all(np.asarray(g) == 0), (name, mode)
  assert float(sum(O.raft_loss(lp, m0, np.ones(N)))) == 0


# ------------------------------------------------------------------ aggregation exactness


AGG_CASES = [(mode, {}) for mode in O.MODES] + [("seq-mean-token-sum-norm", dict(norm="trl"))]


def _exactness_problem():
  rng = np.random.default_rng(14)
  n, t, d = 16, 6, 3
  lengths = np.array([6, 0, 3, 1, 0, 0, 5, 2, 6, 4, 0, 1, 3, 6, 2, 5])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  X = rng.normal(size=(n, t, d)).astype(np.float32)
  theta = jnp.asarray(rng.normal(size=(d,)), jnp.float32)
  logp0 = -np.log1p(np.exp(X @ np.asarray(theta)))
  old = (logp0 + rng.normal(0, .3, (n, t))).astype(np.float32)
  ref = (logp0 + rng.normal(0, .3, (n, t))).astype(np.float32)
  A = rng.normal(size=(n,)).astype(np.float32)
  return theta, dict(X=X, old=old, ref=ref, A=A, mask=mask)


def _share(theta, b, denom, mode):
  """This micro-batch's contribution to the step loss: PPO + 0.1 k3, numerator / global denom."""
  logp = -jax.nn.softplus(b["X"] @ theta)
  l, _ = O.ppo_clip_loss(logp, b["old"], b["A"], b["mask"], eps_hi=.28)
  l = l + 0.1 * O.kl_k3(logp, b["ref"], b["mask"])
  return O.numerator(l, b["mask"], mode) / denom


@functools.partial(jax.jit, static_argnames=("mode", "norm"))
def _sharded_grad(theta, b, mode, norm):
  denom = O.denominator(b["mask"], mode, norm=norm)  # global counts of the sharded batch
  return jax.grad(_share)(theta, b, denom, mode)


@pytest.mark.parametrize("mode,kw", AGG_CASES)
def test_aggregation_exact_across_microbatches_and_shards(mode, kw):
  theta, b = _exactness_problem()
  norm = kw.get("norm", "verl")
  # (a) one batch
  g_one = jax.grad(lambda th: O.aggregate(_loss_tokens(th, b), b["mask"], mode, norm=norm))(
      theta)
  assert np.all(np.abs(np.asarray(g_one)) > 1e-4)
  # (b) 8 micro-batches with the global denominator, gradients summed
  denom = O.denominator(b["mask"], mode, norm=norm)
  micro = jax.jit(jax.grad(_share), static_argnames="mode")
  g_micro = sum(micro(theta, jax.tree.map(lambda x: x[i:i + 2], b), denom, mode=mode)
                for i in range(0, 16, 2))
  np.testing.assert_allclose(g_micro, g_one, rtol=1e-6, atol=1e-8)
  # (c) the batch sharded over 8 devices
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  bs = jax.device_put(b, NamedSharding(mesh, P("data")))
  g_shard = _sharded_grad(theta, bs, mode, norm)
  np.testing.assert_allclose(g_shard, g_one, rtol=1e-6, atol=1e-8)
  # The step loss itself: micro-batch shares add up to the one-batch aggregate.
  full = O.aggregate(_loss_tokens(theta, b), b["mask"], mode, norm=norm)
  parts = sum(_share(theta, jax.tree.map(lambda x: x[i:i + 2], b), denom, mode)
              for i in range(0, 16, 2))
  np.testing.assert_allclose(float(parts), float(full), rtol=1e-6)


def _loss_tokens(theta, b):
  logp = -jax.nn.softplus(b["X"] @ theta)
  l, _ = O.ppo_clip_loss(logp, b["old"], b["A"], b["mask"], eps_hi=.28)
  return l + 0.1 * O.kl_k3(logp, b["ref"], b["mask"])


# ------------------------------------------------------------------ other terms


def test_value_loss_matches_numpy():
  rng = np.random.default_rng(15)
  m = random_inputs(15)["mask"]
  V, V_old, Ret = (rng.normal(size=(N, T)) for _ in range(3))
  for eps in (.2, .5):
    l, aux = O.value_loss(V, V_old, Ret, m, clip_eps=eps)
    e1, e2 = (V - Ret) ** 2, (np.clip(V, V_old - eps, V_old + eps) - Ret) ** 2
    np.testing.assert_allclose(l, np.where(m > 0, .5 * np.maximum(e1, e2), 0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(aux["clipped"], np.where(m > 0, e2 > e1, 0))
  l, _ = O.value_loss(V, V_old, Ret, m, clip_eps=None)
  np.testing.assert_allclose(l, np.where(m > 0, .5 * (V - Ret) ** 2, 0), rtol=1e-5, atol=1e-6)


def np_is(old, samp, m, level, mode, cap, lo, hi, length_norm, keep_ratio):
  lw = m * (old - samp)
  if level == "sequence":
    s = lw.sum(1) / (np.maximum(m.sum(1), 1) if length_norm else 1)
    lw = np.broadcast_to(s[:, None], m.shape)
  if mode == "tis":
    w = np.minimum(np.exp(lw), cap)
  else:
    hi = cap if hi is None else hi
    band = (np.exp(lw) <= hi) & (np.exp(lw) >= (0 if lo is None else lo))
    w = np.where(band, np.exp(lw) if keep_ratio else 1., 0.)
  return np.where(m > 0, w, 0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_match_numpy(level):
  z = random_inputs(16)
  m, old = z["mask"], z["old"]
  samp = old + np.random.default_rng(16).normal(0, .3, (N, T))
  cases = [dict(mode="tis", cap=2.), dict(mode="tis", cap=1.2), dict(mode="mis", cap=1.5),
           dict(mode="mis", lo=.8, hi=1.3, keep_ratio=False),
           dict(mode="mis", lo=.95, hi=1.05, length_norm=True)]
  for kw in cases:
    full = dict(mode="tis", cap=2., lo=None, hi=None, length_norm=False, keep_ratio=True) | kw
    got = O.rollout_is_weights(old, samp, m, level=level, **kw)
    want = np_is(old, samp, m, level, **full)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(kw))
  g = jax.grad(lambda s: jnp.sum(O.rollout_is_weights(old, s, m, level=level)))(
      jnp.asarray(samp, jnp.float32))
  assert np.all(np.asarray(g) == 0)


def test_raft_and_superhf_match_numpy():
  z = random_inputs(17)
  m, logp, ref = z["mask"], z["logp"], z["ref"]
  w = np.array([1., 0, 1, 0, 1, 1])
  ls, d = O.raft_loss(logp, m, w)
  np.testing.assert_allclose(float(ls), -(w[:, None] * m * logp).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(d), (w * m.sum(1)).sum())
  ls, d = O.superhf_loss(logp, ref, m, w, beta=.3)
  k3 = np.exp(ref - logp) - 1 - (ref - logp)
  np.testing.assert_allclose(float(ls), (w[:, None] * m * (-logp + .3 * k3)).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(d), (w * m.sum(1)).sum())


def test_kl_penalty_entropy_and_adaptive_kl():
  z = random_inputs(18)
  m = z["mask"]
  pen = O.kl_penalty_in_reward(z["old"], z["ref"], m, beta=.05)
  np.testing.assert_allclose(pen, np.where(m > 0, .05 * (z["old"] - z["ref"]), 0), rtol=1e-5,
                             atol=1e-7)
  g = jax.grad(lambda o: jnp.sum(O.kl_penalty_in_reward(o, z["ref"], m, beta=.05,
                                                        estimator="k3")))(
      jnp.asarray(z["old"], jnp.float32))
  assert np.all(np.asarray(g) == 0)
  H = np.random.default_rng(18).uniform(0, 3, (N, T))
  for mode in O.MODES:
    np.testing.assert_allclose(float(O.entropy_bonus(H, m, mode, coef=.01)),
                               -.01 * np_agg(H, m, mode), rtol=1e-6)
  np.testing.assert_allclose(float(O.entropy_bonus(H, m, TM, 10.0, coef=.01)),
                             -.01 * (H * m).sum() / 10, rtol=1e-6)
  # e = clip(kl/target - 1, +-0.2); beta *= 1 + e n / horizon
  for kl, e in ((.1, 0.), (.11, .1), (.5, .2), (0., -.2), (.09, -.1)):
    np.testing.assert_allclose(float(O.adaptive_kl_update(.001, kl, 256, target=.1,
                                                          horizon=10000)),
                               .001 * (1 + e * 256 / 10000), rtol=1e-6)
  ctl = O.AdaptiveKL()
  np.testing.assert_allclose(float(ctl.update(ctl.init(), .5, 100)), .001 * (1 + .2 * .01),
                             rtol=1e-6)
  with pytest.raises(ValueError):
    O.adaptive_kl_update(.1, .1, 1, target=0.)


# ------------------------------------------------------------------ registry and validation


def test_registry_contract():
  assert set(O.names()) >= {"ppo", "dual_clip", "ppo_preclip", "gspo", "gmpo", "cispo",
                            "sapo", "pg"}
  for name in O.names():
    fn = O.get(name)
    assert set(O.required_inputs(fn)) <= set(O.INPUTS), name
    assert "logp" in O.required_inputs(fn) and "mask" in O.required_inputs(fn)
    assert O.PAPER_MODES[name] in O.MODES
    assert all(isinstance(v, (bool, int, float, str)) for v in O.defaults(name).values())
  assert O.PAPER_MODES["gspo"] == O.PAPER_MODES["sapo"] == SMTM
  assert O.required_inputs(O.pg_loss) == ("logp", "A", "mask")
  with pytest.raises(ValueError, match="ppo, ppo_preclip"):
    O.get("nope")
  with pytest.raises(ValueError, match="mode"):
    O.aggregate(G_LOGP, G_MASK, "mean")
  with pytest.raises(ValueError, match="estimator"):
    O.kl_estimator("k9")


@pytest.mark.parametrize("call", [
    lambda: O.dual_clip_loss(G_LOGP, G_OLD, G_A, G_MASK, clip_c=1.0),
    lambda: O.ppo_clip_loss(G_LOGP, G_OLD, G_A, G_MASK, clip_c=.5),
    lambda: O.dual_clip_loss(G_LOGP, G_OLD, G_A, G_MASK, clip_c=None),
    lambda: O.ppo_clip_loss(G_LOGP, G_OLD, G_A, G_MASK, eps_lo=-.1),
    lambda: O.cispo_loss(G_LOGP, G_OLD, G_A, G_MASK, mode="openrlhf"),
    lambda: O.ppo_preclip_loss(G_LOGP, G_OLD, G_A, G_MASK, d_lo=2.0),
    lambda: O.kl_k3(G_LOGP, G_REF, clamp="trl"),
    lambda: O.denominator(G_MASK, TM, norm="openrlhf"),
    lambda: O.rollout_is_weights(G_OLD, G_LOGP, G_MASK, level="batch"),
])
def test_invalid_options_raise(call):
  with pytest.raises(ValueError):
    call()


def test_jit_equals_eager():
  z = random_inputs(19, token_adv=True)
  f = jax.jit(lambda lp: O.aggregate(O.gspo_loss(lp, z["old"], z["A"], z["mask"])[0],
                                     z["mask"], SMTM))
  lp = jnp.asarray(z["logp"], jnp.float32)
  eager = O.aggregate(O.gspo_loss(lp, z["old"], z["A"], z["mask"])[0], z["mask"], SMTM)
  np.testing.assert_allclose(float(f(lp)), float(eager), rtol=1e-6)
