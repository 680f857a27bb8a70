"""DPO-family losses against METHODS.md §2 golden values and independent float64 numpy code.

Each numpy reference below is written from the formula (probabilities and direct forms where
the test inputs allow) and gets only the valid rows: `(loss_sum, denom, expected_metrics)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.losses import dpo, registry

B, T = 7, 5
MASK = np.array([1, 0, 1, 1, 0, 1, 0], np.float32)
GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30, -3e38, np.nan, 7.0])  # for masked rows

# METHODS.md §2 golden inputs.
GOLD = {"pc": [-12, -30.5, -7.25, -18], "pr": [-14, -29, -9.5, -25],
        "qc": [-12.5, -31, -7, -19], "qr": [-13, -30, -9, -22],
        "nc": [4, 10, 3, 6], "nr": [5, 8, 3, 9]}
GOLD = {k: np.array(v, float) for k, v in GOLD.items()}
DELTA = np.array([2, .5, 1, 0.])
SIMPO_GOLD = {"pc": np.array([-.8, -1.5, -.3]), "pr": np.array([-1.2, -1.4, -2]),
              "nc": np.ones(3), "nr": np.ones(3)}  # mean logps given directly (n = 1)
DIFF = ("pc", "pr", "qc", "qr", "tlp_c", "tlp_r", "tq_c", "tq_r", "y0_ratio")


# ------------------------------------------------------------------ numpy references


def sig(x):
  return 1 / (1 + np.exp(-x))


def nls(x):  # -log sigmoid(x), direct form (test inputs are moderate)
  return -np.log(sig(x))


def logratios(z):
  uc, ur = z["pc"] - z["qc"], z["pr"] - z["qr"]
  return uc, ur, uc - ur


def total(l, **metrics):
  return np.sum(l), len(l), metrics


def np_dpo_sigmoid(z, beta=.1):
  return total(nls(beta * logratios(z)[2]))


def np_dpo_cdpo(z, beta=.1, eps=.1):
  x = beta * logratios(z)[2]
  return total((1 - eps) * nls(x) + eps * nls(-x))


def np_dpo_robust(z, beta=.1, eps=.1):
  x = beta * logratios(z)[2]
  return total(((1 - eps) * nls(x) - eps * nls(-x)) / (1 - 2 * eps))


def np_ipo(z, beta=.1, length_norm=False):
  uc, ur, d = logratios(z)
  if length_norm:
    d = uc / np.maximum(z["nc"], 1) - ur / np.maximum(z["nr"], 1)
  return total((d - 1 / (2 * beta)) ** 2)


def np_hinge(z, beta=.1):
  return total(np.maximum(0, 1 - beta * logratios(z)[2]))


def np_slic_ref_free(z, delta=1.0, lam=.1):
  return total(np.maximum(0, delta - z["pc"] + z["pr"]) - lam * z["pc"], nll=np.sum(-z["pc"]))


def np_exo_pair(z, beta=.1, eps=1e-3):
  p = sig(beta * logratios(z)[2])  # KL(p || (1-eps, eps))
  return total(p * np.log(p / (1 - eps)) + (1 - p) * np.log((1 - p) / eps))


def np_nca_pair(z, beta=.1):
  uc, ur, _ = logratios(z)
  return total(nls(beta * uc) + .5 * nls(-beta * uc) + .5 * nls(-beta * ur))


def np_bco_pair(z, beta=.1, delta=0.0):
  uc, ur, _ = logratios(z)
  return total(nls(beta * uc - delta) + nls(delta - beta * ur))


def np_sppo_hard(z, beta=.1):
  uc, ur, _ = logratios(z)
  return total((uc - .5 / beta) ** 2 + (ur + .5 / beta) ** 2)


def np_apo_zero(z, beta=.1):
  uc, ur, _ = logratios(z)
  return total(1 - sig(beta * uc) + sig(beta * ur))


def np_apo_down(z, beta=.1):
  uc, _, d = logratios(z)
  return total(sig(beta * uc) + 1 - sig(beta * d))


def np_discopop(z, beta=.1, tau=.05):
  x = beta * logratios(z)[2]
  m = sig(x / tau)
  return total((1 - m) * nls(x) + m * np.exp(-x))


def np_aot(z, beta=.1, eps=0.0):
  x = beta * (np.sort(z["pc"] - z["pr"]) - np.sort(z["qc"] - z["qr"]))
  return total((1 - eps) * nls(x) + eps * nls(-x))


def np_aot_unpaired(z, beta=.1, eps=0.0):
  uc, ur, _ = logratios(z)
  x = beta * (np.sort(uc) - np.sort(ur))
  return total((1 - eps) * nls(x) + eps * nls(-x))


def np_simpo(z, beta=2.0, gamma=.5):
  m = z["pc"] / np.maximum(z["nc"], 1) - z["pr"] / np.maximum(z["nr"], 1)
  return total(nls(beta * m - gamma))


def np_orpo(z, lam=.1):
  ac = np.minimum(z["pc"] / np.maximum(z["nc"], 1), -1e-6)
  ar = np.minimum(z["pr"] / np.maximum(z["nr"], 1), -1e-6)
  odds = lambda a: np.exp(a) / (1 - np.exp(a))
  lor = np.log(odds(ac) / odds(ar))
  return total(-ac + lam * nls(lor), nll=np.sum(-ac), log_odds_ratio=np.sum(lor))


def np_rpo(z, beta=.1, alpha=1.0, nll_norm="completion"):
  nll = -z["pc"] / (np.maximum(z["nc"], 1) if nll_norm == "completion" else 1)
  return total(nls(beta * logratios(z)[2]) + alpha * nll, nll=np.sum(nll))


def np_dpo_fdiv(z, beta=.1, divergence="reverse_kl", alpha=.5):
  psi = {"reverse_kl": lambda u: u, "forward_kl": lambda u: -np.exp(-u),
         "js": lambda u: np.log(sig(u)),
         "alpha": lambda u: (1 - np.exp(-alpha * u)) / alpha}[divergence]
  uc, ur, _ = logratios(z)
  return total(nls(beta * (psi(uc) - psi(ur))))


def np_dpo_dynamic_beta(z, beta=.1, w=.1, k=1.0, mode="beta"):
  f = 1 + w * (1 - np.exp(-k * np.maximum(z["score_c"] - z["score_r"], 0)))
  d = logratios(z)[2]
  if mode == "weight":
    return total(f * nls(beta * d), scale=np.sum(f))
  b = np.maximum(1e-3, beta * f)
  return total(nls(b * d), beta=np.sum(b))


def np_gapo(z, beta=.1, gamma=1.0, g_scale=1.0, mode="margin"):
  gh = np.clip(np.maximum(0, z["score_c"] - z["score_r"]) / g_scale, 0, 1)
  x = beta * logratios(z)[2]
  if mode == "weight":
    return np.sum(gh * nls(x)), np.sum(gh), {}
  return total(nls(x - gamma * gh), gap=np.sum(gh))


def np_cream(z, beta=.1):
  x, c = beta * logratios(z)[2], z["consistency"]
  return total(c * nls(x) + (1 - c) * nls(-x))


def np_selm(z, beta=.01, alpha=1e-3):
  return total(nls(beta * logratios(z)[2]) + alpha * beta * z["y0_ratio"],
               y0_ratio=np.sum(z["y0_ratio"]))


def np_t_reg(z, beta=.1, alpha=1.0):
  loss, reg_sum = [], 0.0
  for i in range(len(z["tlp_c"])):
    d, big_r = 0.0, 0.0
    for side, sign in (("c", 1), ("r", -1)):
      for t in range(z["tlp_c"].shape[1]):
        if z[f"tmask_{side}"][i, t]:
          ell = z[f"tlp_{side}"][i, t] - z[f"tq_{side}"][i, t]
          om = 2 * sig(sign * z[f"rt_{side}"][i, t])
          d += sign * ell
          big_r += sign * om * ell
    reg = nls(beta * big_r)
    loss.append(nls(beta * d) + alpha * reg)
    reg_sum += reg
  return total(np.array(loss), regularizer=reg_sum)


# ------------------------------------------------------------------ cases and inputs

# (id, registry name, static hyper-parameters)
CASES = [
    ("dpo_sigmoid", "dpo_sigmoid", {}),
    ("dpo_sigmoid_b.5", "dpo_sigmoid", {"beta": .5}),
    ("dpo_cdpo", "dpo_cdpo", {"eps": .2}),
    ("dpo_robust", "dpo_robust", {"eps": .3}),
    ("ipo", "ipo", {}),
    ("ipo_length_norm", "ipo", {"length_norm": True, "beta": .5}),
    ("hinge", "hinge", {"beta": .3}),
    ("slic_ref_free", "slic_ref_free", {"delta": 2.0, "lam": .2}),
    ("exo_pair", "exo_pair", {}),
    ("exo_pair_eps", "exo_pair", {"eps": .1, "beta": .5}),
    ("nca_pair", "nca_pair", {}),
    ("bco_pair", "bco_pair", {}),
    ("bco_pair_delta", "bco_pair", {"delta": .3}),
    ("sppo_hard", "sppo_hard", {}),
    ("apo_zero", "apo_zero", {"beta": .5}),
    ("apo_down", "apo_down", {"beta": .5}),
    ("discopop", "discopop", {}),
    ("discopop_tau", "discopop", {"tau": .5, "beta": .5}),
    ("aot", "aot", {}),
    ("aot_eps", "aot", {"eps": .1, "beta": .5}),
    ("aot_unpaired", "aot_unpaired", {}),
    ("aot_unpaired_eps", "aot_unpaired", {"eps": .2}),
    ("simpo", "simpo", {}),
    ("simpo_paper", "simpo", {"beta": 1.0, "gamma": 1.0}),
    ("orpo", "orpo", {}),
    ("orpo_lam", "orpo", {"lam": .5}),
    ("rpo", "rpo", {}),
    ("rpo_sum", "rpo", {"nll_norm": "none", "alpha": .1}),
    ("fdiv_reverse", "dpo_fdiv", {}),
    ("fdiv_forward", "dpo_fdiv", {"divergence": "forward_kl"}),
    ("fdiv_js", "dpo_fdiv", {"divergence": "js"}),
    ("fdiv_alpha", "dpo_fdiv", {"divergence": "alpha", "alpha": .3}),
    ("dynamic_beta", "dpo_dynamic_beta", {"w": .5}),
    ("dynamic_beta_margin", "dpo_dynamic_beta", {"mode": "margin", "k": 2.0}),
    ("dynamic_beta_weight", "dpo_dynamic_beta", {"mode": "weight", "w": .5, "k": 2.0}),
    ("gapo", "gapo", {}),
    ("gapo_weight", "gapo", {"mode": "weight", "g_scale": 2.0}),
    ("cream", "cream", {}),
    ("selm", "selm", {}),
    ("selm_b.1", "selm", {"beta": .1, "alpha": .5}),
    ("t_reg", "t_reg", {}),
    ("t_reg_alpha", "t_reg", {"alpha": .5, "beta": .5}),
]
IDS = [c[0] for c in CASES]
REFS = {"dpo_fdiv": np_dpo_fdiv, "dpo_dynamic_beta": np_dpo_dynamic_beta}


def reference(name):
  return REFS.get(name) or globals()[f"np_{name}"]


def random_inputs(names, rng, scale=1.0, b=B):
  """Per-name random inputs; logps are mostly negative (orpo's clamp is hit at times)."""
  z = {}
  for n in names:
    if n in ("pc", "pr", "qc", "qr", "y0_ratio"):
      z[n] = scale * rng.normal(-3, 3, b)
    elif n in ("nc", "nr"):
      z[n] = rng.integers(0, 12, b).astype(float)
    elif n in ("score_c", "score_r"):
      z[n] = scale * rng.normal(0, 1.5, b)
    elif n == "consistency":
      z[n] = rng.uniform(0, 1, b)
    elif n.startswith(("tlp_", "tq_")):
      z[n] = scale * rng.normal(-1, 1, (b, T))
    elif n.startswith("tmask_"):
      z[n] = (rng.random((b, T)) < 0.7).astype(float)
    elif n.startswith("rt_"):
      z[n] = scale * rng.normal(0, 2, (b, T))
    else:
      raise KeyError(n)
  return z


def with_garbage(z, mask):
  """Masked rows (and masked tokens of valid rows) overwritten with inf / NaN / huge values."""
  out = {}
  for n, x in z.items():
    x = x.copy()
    g = GARBAGE[:len(x)].reshape((-1,) + (1,) * (x.ndim - 1))
    keep = mask.reshape((-1,) + (1,) * (x.ndim - 1)) != 0
    x = np.where(keep, x, g if not n.startswith("tmask_") else 1.0)
    if n.startswith(("tlp_", "tq_", "rt_")):
      x = np.where(z["tmask_" + n.split("_")[1]] != 0, x, np.nan)
    out[n] = x
  return out


@functools.lru_cache(maxsize=None)
def _compiled(name, static):
  """jit(arrays, hyper, mask -> ((loss_sum, denom, metrics), d loss_sum / d DIFF inputs)).

  Numeric hyper-parameters are traced (one compile serves all values); strings and bools
  are static.
  """
  fn = registry.get(name).fn

  def f(arrays, hyper, mask):
    diff = {k: v for k, v in arrays.items() if k in DIFF}
    rest = {k: v for k, v in arrays.items() if k not in DIFF}

    def loss(diff):
      out = fn(**diff, **rest, **hyper, **dict(static), mask=mask)
      return out[0], out

    grads, out = jax.grad(loss, has_aux=True)(diff)
    return out, grads

  return jax.jit(f)


def evaluate(name, z, kwargs, mask=None):
  arrays = {k: jnp.asarray(v, jnp.float32) for k, v in z.items()}
  b = len(next(iter(z.values())))
  mask = jnp.ones(b) if mask is None else jnp.asarray(mask, jnp.float32)
  static = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (str, bool))))
  hyper = {k: jnp.float32(v) for k, v in kwargs.items() if not isinstance(v, (str, bool))}
  (loss_sum, denom, metrics), grads = _compiled(name, static)(arrays, hyper, mask)
  return (float(loss_sum), float(denom), {k: float(v) for k, v in metrics.items()},
          {k: np.asarray(g) for k, g in grads.items()})


def run(name, z, kwargs):
  loss_sum, denom, metrics = registry.get(name).fn(**z, **kwargs)
  return float(loss_sum), float(denom), {k: float(v) for k, v in metrics.items()}


def inputs_of(name):
  return dpo.required_inputs(registry.get(name).fn)


# ------------------------------------------------------------------ golden values


def _gold(**extra):
  return {**GOLD, **{k: np.asarray(v, float) for k, v in extra.items()}}


# (id, name, hyper-parameters, inputs, golden batch loss); [f] values are from the formula.
GOLDEN = [
    ("dpo_sigmoid", "dpo_sigmoid", {}, GOLD, .63328931),
    ("dpo_cdpo", "dpo_cdpo", {"eps": .1}, GOLD, .64641431),
    ("dpo_robust", "dpo_robust", {"eps": .1}, GOLD, .61688306),
    ("ipo", "ipo", {}, GOLD, 16.515625),
    ("ipo_length_norm", "ipo", {"length_norm": True}, GOLD, 23.00871528),
    ("hinge", "hinge", {}, GOLD, .86875),
    # [f] by hand: relu(1 - (pc - pr)) = [0, 2.5, 0, 0], mean .625; .1 mean(-pc) = 1.69375.
    ("slic_ref_free", "slic_ref_free", {}, GOLD, 2.31875),
    ("exo_pair", "exo_pair", {}, GOLD, 2.54268655),
    ("nca_pair", "nca_pair", {}, GOLD, 1.35596650),
    ("bco_pair", "bco_pair", {}, GOLD, 1.32466237),
    ("sppo_hard", "sppo_hard", {}, GOLD, 40.078125),
    ("apo_zero", "apo_zero", {}, GOLD, .96733395),
    ("apo_down", "apo_down", {}, GOLD, .97846363),
    ("discopop", "discopop", {}, GOLD, .79791589),
    ("aot", "aot", {}, GOLD, .63328931),
    ("aot_unpaired", "aot_unpaired", {}, GOLD, .63089289),
    ("simpo", "simpo", {}, SIMPO_GOLD, .57036802),
    ("orpo", "orpo", {}, SIMPO_GOLD, .90793449),
    ("rpo", "rpo", {}, GOLD, 3.49995598),
    ("fdiv_reverse", "dpo_fdiv", {}, GOLD, .63328931),
    ("fdiv_forward", "dpo_fdiv", {"divergence": "forward_kl"}, GOLD, .52592225),
    ("fdiv_js", "dpo_fdiv", {"divergence": "js"}, GOLD, .65119009),
    ("fdiv_alpha", "dpo_fdiv", {"divergence": "alpha", "alpha": .5}, GOLD, .59438461),
    ("dynamic_beta", "dpo_dynamic_beta", {"w": .5},
     _gold(score_c=DELTA, score_r=np.zeros(4)), .62621032),
    ("gapo", "gapo", {"g_scale": 2.0}, _gold(score_c=DELTA, score_r=np.zeros(4)), .88295616),
    ("cream", "cream", {}, _gold(consistency=np.full(4, .8)), .65953931),
    ("selm", "selm", {"beta": .1}, _gold(y0_ratio=[.3, -.2, .1, .4]), .63330431),
    # t_reg with one token per row holding the summed logps: rt = 0 gives om = 1, R = D and
    # L = (1 + alpha) dpo_sigmoid; rt = +-inf gives om = 2, R = 2 D (golden-derived).
    ("t_reg_rt0", "t_reg", {}, {
        "tlp_c": GOLD["pc"][:, None], "tlp_r": GOLD["pr"][:, None], "tq_c": GOLD["qc"][:, None],
        "tq_r": GOLD["qr"][:, None], "tmask_c": np.ones((4, 1)), "tmask_r": np.ones((4, 1)),
        "rt_c": np.zeros((4, 1)), "rt_r": np.zeros((4, 1))}, 2 * .63328931),
]


@pytest.mark.parametrize("gold", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_value(gold):
  _, name, kwargs, z, want = gold
  z = {k: z[k] for k in inputs_of(name)}
  loss_sum, denom, metrics = run(name, z, kwargs)  # op by op: cheaper than one more compile
  np.testing.assert_allclose(loss_sum / denom, want, rtol=1e-5, atol=1e-6)
  assert denom == len(next(iter(z.values())))
  # The float64 numpy reference agrees with the golden value too.
  ref_sum, ref_denom, _ = reference(name)(z, **kwargs)
  np.testing.assert_allclose(ref_sum / ref_denom, want, rtol=1e-7)
  if name == "orpo":  # the ratio term alone
    np.testing.assert_allclose((loss_sum - metrics["nll"]) / denom, .04126783, rtol=1e-5)


def test_t_reg_golden_full_token_weight():
  z = {"tlp_c": GOLD["pc"][:, None], "tlp_r": GOLD["pr"][:, None],
       "tq_c": GOLD["qc"][:, None], "tq_r": GOLD["qr"][:, None],
       "tmask_c": np.ones((4, 1)), "tmask_r": np.ones((4, 1)),
       "rt_c": np.full((4, 1), 1e4), "rt_r": np.full((4, 1), -1e4)}
  loss_sum, denom, metrics, _ = evaluate("t_reg", z, {"alpha": .5})
  x = .1 * np.array([1.5, -.5, .25, 4])
  np.testing.assert_allclose(loss_sum / denom, .63328931 + .5 * np.mean(np.log1p(np.exp(-2 * x))),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["regularizer"], np.sum(np.log1p(np.exp(-2 * x))), rtol=1e-5)


# ------------------------------------------------------------------ per-case properties


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_numpy_with_masked_garbage(case):
  """Random inputs, 3 of 7 rows masked and full of inf / NaN: equals numpy on the valid rows."""
  _, name, kwargs = case
  keep = MASK != 0
  for seed in range(2):
    z = random_inputs(inputs_of(name), np.random.default_rng(seed))
    loss_sum, denom, metrics, grads = evaluate(name, with_garbage(z, MASK), kwargs, MASK)
    want_sum, want_denom, want_metrics = reference(name)({k: v[keep] for k, v in z.items()},
                                                         **kwargs)
    np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(denom, want_denom, rtol=1e-6)
    assert set(metrics) == set(want_metrics)
    for k, v in want_metrics.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    for k, g in grads.items():
      assert np.all(np.isfinite(g)), k
      assert np.all(g[~keep] == 0), k


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extreme_inputs_finite_values_and_gradients(case):
  _, name, kwargs = case
  for seed in range(2):
    z = random_inputs(inputs_of(name), np.random.default_rng(10 + seed), scale=1e4)
    loss_sum, denom, metrics, grads = evaluate(name, z, kwargs)
    assert np.isfinite(loss_sum) and np.isfinite(denom)
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_masked_batch_is_zero_without_nan(case):
  _, name, kwargs = case
  z = with_garbage(random_inputs(inputs_of(name), np.random.default_rng(3)), np.zeros(B))
  loss_sum, denom, metrics, grads = evaluate(name, z, kwargs, np.zeros(B))
  assert loss_sum == 0.0 and denom == 0.0
  assert all(np.isfinite(v) for v in metrics.values())
  assert all(np.all(g == 0) for g in grads.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_ties_are_finite(case, scale):
  """pc == pr, qc == qr (and equal token arrays and lengths): finite values and gradients."""
  _, name, kwargs = case
  z = random_inputs(inputs_of(name), np.random.default_rng(4), scale=scale)
  for n in list(z):
    if (n.endswith("_r") and n != "score_r") or n in ("pr", "qr", "nr"):
      z[n] = z[n[:-1] + "c"]
  loss_sum, denom, metrics, grads = evaluate(name, z, kwargs)
  assert np.isfinite(loss_sum) and np.isfinite(denom)
  assert denom == B or kwargs.get("mode") == "weight"
  assert all(np.isfinite(v) for v in metrics.values())
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  if name == "dpo_sigmoid":
    np.testing.assert_allclose(loss_sum, B * np.log(2), rtol=1e-6)


def test_every_registered_dpo_loss_has_cases():
  names = set(registry.names("dpo"))
  assert {c[1] for c in CASES} == names
  assert {g[1] for g in GOLDEN} == names


# ------------------------------------------------------------------ cross-checks


def test_cream_equals_cdpo_with_eps_one_minus_c():
  z = random_inputs(("pc", "pr", "qc", "qr"), np.random.default_rng(5))
  cdpo = evaluate("dpo_cdpo", z, {"eps": .2})
  for c in (np.full(B, .8), np.float32(.8)):  # per-row and dataset-wide scalar C
    got = dpo.cream(**z, consistency=c)
    np.testing.assert_allclose(float(got[0]), cdpo[0], rtol=1e-6)


def test_fdiv_reverse_kl_and_small_alpha_equal_dpo_sigmoid():
  z = random_inputs(("pc", "pr", "qc", "qr"), np.random.default_rng(6))
  want = evaluate("dpo_sigmoid", z, {})[0]
  np.testing.assert_allclose(evaluate("dpo_fdiv", z, {})[0], want, rtol=1e-6)
  np.testing.assert_allclose(evaluate("dpo_fdiv", z, {"divergence": "alpha", "alpha": 1e-4})[0],
                             want, rtol=1e-3)
  np.testing.assert_allclose(evaluate("dpo_fdiv", z, {"divergence": "alpha", "alpha": 1.0})[0],
                             evaluate("dpo_fdiv", z, {"divergence": "forward_kl"})[0], rtol=1e-6)


def test_aot_on_sorted_inputs_equals_dpo_sigmoid():
  rng = np.random.default_rng(7)
  qr = rng.normal(-20, 3, B)
  pr = rng.normal(-20, 3, B)
  z = {"pc": pr + np.sort(rng.normal(0, 5, B)), "pr": pr,
       "qc": qr + np.sort(rng.normal(0, 5, B)), "qr": qr}  # both margins ascending
  want = evaluate("dpo_sigmoid", z, {})
  got = evaluate("aot", z, {})
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for k in want[3]:
    np.testing.assert_allclose(got[3][k], want[3][k], rtol=1e-5, atol=1e-7)


def test_aot_masked_rows_do_not_shift_the_sort():
  """Masked rows with margins in the middle of the valid ones leave the result unchanged."""
  rng = np.random.default_rng(8)
  z = random_inputs(("pc", "pr", "qc", "qr"), rng)
  keep = MASK != 0
  dropped = evaluate("aot", {k: v[keep] for k, v in z.items()}, {})
  for fill in (0.0, np.median(z["pc"] - z["pr"]), -1e4, 1e4):
    z2 = {k: np.where(keep, v, fill if k == "pc" else 0.0) for k, v in z.items()}
    got = evaluate("aot", z2, {}, MASK)
    np.testing.assert_allclose(got[:2], dropped[:2], rtol=1e-6)


def test_gapo_weight_mode_is_a_weighted_mean():
  z = _gold(score_c=DELTA, score_r=np.zeros(4))
  loss_sum, denom, _, _ = evaluate("gapo", {k: z[k] for k in inputs_of("gapo")},
                                   {"mode": "weight", "g_scale": 2.0})
  np.testing.assert_allclose(denom, 1.75, rtol=1e-6)  # sum(gh) = 1 + .25 + .5 + 0
  np.testing.assert_allclose(loss_sum / denom, .65196264, rtol=1e-5)  # [f]


def test_dynamic_beta_modes():
  z = {k: v for k, v in _gold(score_c=DELTA, score_r=np.zeros(4)).items()
       if k in inputs_of("dpo_dynamic_beta")}
  beta_mode = evaluate("dpo_dynamic_beta", z, {"w": .5})
  np.testing.assert_allclose(evaluate("dpo_dynamic_beta", z, {"w": .5, "mode": "margin"})[0],
                             beta_mode[0], rtol=1e-7)
  np.testing.assert_allclose(beta_mode[2]["beta"], np.sum(.1 * (1 + .5 * (1 - np.exp(-DELTA)))),
                             rtol=1e-6)
  weight = evaluate("dpo_dynamic_beta", z, {"w": .5, "mode": "weight"})
  np.testing.assert_allclose(weight[0] / weight[1], .78952831, rtol=1e-5)  # [f]
  # A negative RM margin is clipped at 0: beta stays at the base value.
  z_neg = {**z, "score_c": -DELTA}
  np.testing.assert_allclose(evaluate("dpo_dynamic_beta", z_neg, {"w": .5})[0],
                             evaluate("dpo_sigmoid", {k: z[k] for k in GOLD if k in z}, {})[0],
                             rtol=1e-6)
  # The RM margin carries no gradient.
  g = jax.grad(lambda s: dpo.dpo_dynamic_beta(**{**z, "score_c": s})[0])(jnp.asarray(DELTA))
  assert np.all(np.asarray(g) == 0)


def test_float64_inputs_under_x64():
  with jax.enable_x64(True):
    z = {k: jnp.asarray(v, jnp.float64) for k, v in GOLD.items()}
    out = dpo.ipo(**z, length_norm=True)
    assert out[0].dtype == out[1].dtype == jnp.float32
    np.testing.assert_allclose(float(out[0] / out[1]), 23.00871528, rtol=1e-5)
    big = {k: v * 1e4 for k, v in z.items() if k in ("pc", "pr", "qc", "qr")}
    val, grads = jax.value_and_grad(lambda a: dpo.dpo_fdiv(**a, divergence="forward_kl")[0])(big)
    assert np.isfinite(float(val)) and all(np.all(np.isfinite(g)) for g in grads.values())


def test_jit_equals_eager():
  z = random_inputs(inputs_of("t_reg"), np.random.default_rng(9))
  eager = dpo.t_reg(**z, mask=MASK)
  jitted = evaluate("t_reg", z, {}, MASK)
  np.testing.assert_allclose(float(eager[0]), jitted[0], rtol=1e-6)


# ------------------------------------------------------------------ inputs and options


def test_inputs_vocabulary_and_reference_use():
  for name in registry.names("dpo"):
    fn = registry.get(name).fn
    assert set(dpo.required_inputs(fn)) <= set(dpo.INPUTS), name
    assert dpo.uses_reference(fn) == (name not in ("simpo", "orpo", "slic_ref_free")), name
  assert dpo.required_inputs(dpo.dpo_sigmoid) == ("pc", "pr", "qc", "qr")
  assert registry.defaults("simpo") == {"beta": 2.0, "gamma": .5}
  assert registry.defaults("selm") == {"beta": .01, "alpha": 1e-3}


@pytest.mark.parametrize("fn,kwargs", [
    (dpo.dpo_fdiv, {"divergence": "tv"}), (dpo.dpo_fdiv, {"divergence": "alpha", "alpha": 0.0}),
    (dpo.gapo, {"mode": "offset"}), (dpo.dpo_dynamic_beta, {"mode": "scale"}),
    (dpo.rpo, {"nll_norm": "prompt"}), (dpo.dpo_robust, {"eps": .5}),
    (dpo.dpo_cdpo, {"eps": -.1}), (dpo.exo_pair, {"eps": 0.0})])
def test_bad_options_raise(fn, kwargs):
  z = _gold(score_c=DELTA, score_r=np.zeros(4))
  with pytest.raises(ValueError):
    fn(**{k: z[k] for k in dpo.required_inputs(fn)}, **kwargs)


def test_shape_mismatch_raises():
  with pytest.raises(AssertionError):
    dpo.dpo_sigmoid(GOLD["pc"], GOLD["pr"][:3], GOLD["qc"], GOLD["qr"])
