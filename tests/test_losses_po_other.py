"""KTO, ADPO, RankDPO, DFT and ASFT (METHODS.md section 2) against float64 numpy references.

Each numpy reference loops over the live entries only (valid rows, candidates, tokens), so
dead entries may hold anything; it returns `(loss_sum, denom, expected_metrics)`.
"""

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.losses import kto as kto_mod, ranked, registry, token

B, K, T = 6, 4, 5
PC, PR = np.array([-12, -30.5, -7.25, -18]), np.array([-14, -29, -9.5, -25])  # METHODS golden
QC, QR = np.array([-12.5, -31, -7, -19]), np.array([-13, -30, -9, -22])
DPO_GOLDEN = .63328931


def sp(x):
  return np.logaddexp(0.0, x)


def sig(x):
  return 1 / (1 + np.exp(-x))


def live_rows(mask, b):
  return [i for i in range(b) if mask is None or mask[i] != 0]


# ------------------------------------------------------------------ numpy references


def np_kto(u, desirable, z0, mask=None, beta=0.1, lam_d=1.0, lam_u=1.0):
  z0 = np.broadcast_to(z0, u.shape)
  loss, m = 0.0, dict.fromkeys(["reward_desirable", "reward_undesirable", "kl",
                                "num_desirable", "num_undesirable"], 0.0)
  rows = live_rows(mask, len(u))
  for i in rows:
    if desirable[i]:
      loss += lam_d * (1 - sig(beta * (u[i] - z0[i])))
      m["reward_desirable"] += beta * u[i]
      m["num_desirable"] += 1
    else:
      loss += lam_u * (1 - sig(beta * (z0[i] - u[i])))
      m["reward_undesirable"] += beta * u[i]
      m["num_undesirable"] += 1
    m["kl"] += z0[i]
  return loss, len(rows), m


def np_adpo(l, l_ref, q, valid, mask=None, tau_anc=10.0):
  loss = ce_total = top1 = lists = 0.0
  for b in live_rows(mask, len(l)):
    idx = [k for k in range(l.shape[1]) if valid[b, k]]
    if len(idx) < 2:
      continue
    x = np.array([(l[b, k] - l_ref[b, k]) / tau_anc for k in idx])
    p = np.exp(x - x.max()) / np.sum(np.exp(x - x.max()))
    qs = np.array([q[b, k] for k in idx])
    ce = -np.sum(qs * np.log(p))
    loss += ce + sum(v * np.log(v) for v in qs if v > 0)
    ce_total += ce
    top = int(np.argmax(qs))
    top1 += all(x[top] > x[j] for j in range(len(idx)) if j != top)
    lists += 1
  return loss, lists, {"cross_entropy": ce_total, "top1_accuracy": top1, "num_lists": lists}


def np_rank_dpo(l, l_ref, g, valid, mask=None, beta=0.1):
  num = den = acc = margin = npairs = ncorrect = 0.0
  rows = live_rows(mask, len(l))
  for b in rows:
    idx = [k for k in range(l.shape[1]) if valid[b, k]]
    z = {k: beta * (l[b, k] - l_ref[b, k]) for k in idx}
    order = sorted(idx, key=lambda k: (-z[k], g[b, k], k))  # ties: lower gain first
    disc = {k: np.log2(1 + r + 1) for r, k in enumerate(order)}
    for i, j in itertools.permutations(idx, 2):
      if g[b, i] > g[b, j]:
        w = abs((2**g[b, i] - 1) - (2**g[b, j] - 1)) * abs(1 / disc[i] - 1 / disc[j])
        d = z[i] - z[j]
        num += w * np.log1p(np.exp(-d))
        den += w
        acc += w * (d > 0)
        margin += w * d
        npairs += 1
        ncorrect += d > 0
  return num, den, {"accuracy": acc, "margin": margin, "num_pairs": npairs,
                    "num_correct_pairs": ncorrect, "num_lists": len(rows)}


def _token_loop(mask_t, mask):
  for b in live_rows(mask, mask_t.shape[0]):
    for t in range(mask_t.shape[1]):
      if mask_t[b, t] != 0:
        yield b, t


def np_dft(lp, mask_t, mask=None):
  loss = nll = prob = n = 0.0
  for b, t in _token_loop(mask_t, mask):
    w = mask_t[b, t]
    loss += w * -np.exp(lp[b, t]) * lp[b, t]
    nll += -w * lp[b, t]
    prob += w * np.exp(lp[b, t])
    n += w
  return loss, n, {"nll": nll, "prob": prob, "num_tokens": n}


def np_asft(lp, kl, mask_t, mask=None, lam=0.1):
  d, n, m = np_dft(lp, mask_t, mask)
  klsum = sum(mask_t[b, t] * kl[b, t] for b, t in _token_loop(mask_t, mask))
  return d + lam * klsum, n, {"dft": d, "kl": klsum, "nll": m["nll"], "num_tokens": n}


def np_token_kl(logits_p, logits_ref):
  def logsoftmax(x):
    return x - np.max(x, -1, keepdims=True) - np.log(
        np.sum(np.exp(x - np.max(x, -1, keepdims=True)), -1, keepdims=True))
  lp, lr = logsoftmax(logits_p), logsoftmax(logits_ref)
  return np.sum(np.exp(lr) * (lr - lp), -1)


# ------------------------------------------------------------------ random cases


def kto_inputs(g, scale):
  return (scale * g.normal(size=B), g.random(B) < 0.5, abs(scale * g.normal()) * 0.3)


def list_inputs(g, scale, third):
  valid = g.random((B, K)) < 0.8
  valid[0], valid[1] = True, [True, False, False, False]  # a full list and a 1-candidate list
  l, l_ref = scale * g.normal(size=(B, K)), scale * g.normal(size=(B, K))
  if third == "q":
    x = np.asarray(ranked.adpo_target(g.normal(size=(B, K)), valid, mode="softmax"))
  else:
    x = g.integers(0, 4, (B, K)).astype(float)
  return l, l_ref, x, valid


def token_inputs(g, scale, with_kl):
  lp = -np.abs(scale * g.normal(size=(B, T)))
  mask_t = (g.random((B, T)) < 0.7).astype(float)
  kl = (scale * np.abs(g.normal(size=(B, T))),) if with_kl else ()
  return (lp, *kl, mask_t)


def dead_lists(args, mask):
  return ~(args[3] & (mask[:, None] != 0))


def dead_tokens(args, mask):
  return ~((args[-1] != 0) & (mask[:, None] != 0))


# (id, registry name, make(rng, scale) -> (args, kwargs), numpy reference, grad argnums,
#  dead(args, mask) -> bool array marking the entries of the float data arrays that must not
#  matter, and the data-array argnums it applies to)
CASES = [
    ("kto", "kto", lambda g, c: (kto_inputs(g, c), {}), np_kto, (0,),
     lambda a, m: m == 0, (0,)),
    ("kto_weights", "kto", lambda g, c: (kto_inputs(g, c), {
        "beta": 0.5, "lam_d": 1.2, "lam_u": 0.7}), np_kto, (0,), lambda a, m: m == 0, (0,)),
    ("adpo", "adpo", lambda g, c: (list_inputs(g, c, "q"), {}), np_adpo, (0, 1),
     dead_lists, (0, 1, 2)),
    ("adpo_tau", "adpo", lambda g, c: (list_inputs(g, c, "q"), {"tau_anc": 2.0}), np_adpo,
     (0, 1), dead_lists, (0, 1, 2)),
    ("rank_dpo", "rank_dpo", lambda g, c: (list_inputs(g, c, "g"), {}), np_rank_dpo, (0, 1),
     dead_lists, (0, 1, 2)),
    ("rank_dpo_beta", "rank_dpo", lambda g, c: (list_inputs(g, c, "g"), {"beta": 1.0}),
     np_rank_dpo, (0, 1), dead_lists, (0, 1, 2)),
    ("dft", "dft", lambda g, c: (token_inputs(g, c, False), {}), np_dft, (0,), dead_tokens,
     (0,)),
    ("asft", "asft", lambda g, c: (token_inputs(g, c, True), {"lam": 0.3}), np_asft, (0, 1),
     dead_tokens, (0, 1)),
]
IDS = [c[0] for c in CASES]


def make(case, seed=0, scale=1.0):
  _, name, mk, ref, argnums, dead, data = case
  args, kwargs = mk(np.random.default_rng(seed), scale)
  mask = np.random.default_rng(seed + 100).random(B) < 0.75
  mask[:2] = True
  return registry.get(name).fn, tuple(args), kwargs, mask.astype(float), ref, argnums


@functools.lru_cache(maxsize=None)
def _with_grads(fn, static, argnums):
  def f(args, mask):
    def loss(diff):
      full = list(args)
      for i, x in zip(argnums, diff):
        full[i] = x
      out = fn(*full, **dict(static), mask=mask)
      return out[0], out

    grads, out = jax.grad(loss, has_aux=True)([args[i] for i in argnums])
    return out, grads

  return jax.jit(f)


def evaluate(fn, args, kwargs, argnums, mask):
  """jit(loss and d loss_sum / d args[argnums]); kwargs are static."""
  args = tuple(jnp.asarray(a, jnp.float32) if i in argnums else a for i, a in enumerate(args))
  return _with_grads(fn, tuple(sorted(kwargs.items())), argnums)(args, jnp.asarray(mask))


def scalars(out):
  loss_sum, denom, metrics = out
  return float(loss_sum), float(denom), {k: float(v) for k, v in metrics.items()}


def check_against(out, want, rtol=1e-5):
  loss_sum, denom, metrics = scalars(out)
  want_sum, want_denom, want_metrics = want
  np.testing.assert_allclose(loss_sum, want_sum, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(denom, want_denom, rtol=1e-6, atol=1e-7)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=rtol, atol=1e-5, err_msg=k)


NEW = {"kto": "unpaired", "adpo": "policy_list", "rank_dpo": "policy_list", "dft": "token",
       "asft": "token"}


def test_registered_with_kinds_and_defaults():
  assert {c[1] for c in CASES} == set(NEW)
  for name, kind in NEW.items():
    assert registry.get(name).kind == kind
  assert registry.defaults("kto") == {"beta": 0.1, "lam_d": 1.0, "lam_u": 1.0}
  assert registry.defaults("adpo") == {"tau_anc": 10.0}
  assert registry.defaults("rank_dpo") == {"beta": 0.1}
  assert registry.defaults("dft") == {}
  assert registry.defaults("asft") == {"lam": 0.1}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_numpy_reference_with_masks_and_garbage(case):
  for seed in range(2):
    fn, args, kwargs, mask, ref, argnums = make(case, seed)
    want = ref(*args, mask=mask, **kwargs)
    out, grads = evaluate(fn, args, kwargs, argnums, mask)
    check_against(out, want)
    # Dead entries (masked rows, invalid candidates, masked tokens) hold inf / NaN / 1e30:
    # nothing changes, and their gradients are exactly 0.
    dead = case[5](args, mask)
    fill = np.resize(np.array([np.nan, np.inf, -np.inf, 1e30]), dead.shape)
    bad = tuple(np.where(dead, fill, a) if i in case[6] else a for i, a in enumerate(args))
    if case[1] == "kto":
      bad = (bad[0], np.where(dead, True, args[1]), args[2])
    out2, grads2 = evaluate(fn, bad, kwargs, argnums, mask)
    assert scalars(out2) == scalars(out)
    for g1, g2 in zip(grads, grads2):
      np.testing.assert_array_equal(g1, g2)
      assert np.all(np.asarray(g2)[dead] == 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extreme_values_finite_loss_and_grads(case):
  fn, args, kwargs, mask, _, argnums = make(case, seed=2, scale=1e4)
  if case[1] in ("dft", "asft"):  # log-probs of both signs (a positive lp is clipped at 0)
    signs = np.where(np.random.default_rng(0).random(args[0].shape) < 0.3, -1, 1)
    args = (args[0] * signs, *args[1:])
  out, grads = evaluate(fn, args, kwargs, argnums, mask)
  loss_sum, denom, metrics = scalars(out)
  assert np.isfinite(loss_sum) and np.isfinite(denom) and denom > 0
  assert all(np.isfinite(v) for v in metrics.values())
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_masked_is_zero_without_nan(case):
  fn, args, kwargs, _, _, argnums = make(case, seed=3)
  (loss_sum, denom, metrics), grads = evaluate(fn, args, kwargs, argnums, np.zeros(B))
  assert float(loss_sum) == 0.0 and float(denom) == 0.0
  assert loss_sum.dtype == denom.dtype == jnp.float32 and loss_sum.shape == denom.shape == ()
  assert all(np.isfinite(v) and float(v) == 0 for v in metrics.values())
  assert all(np.all(g == 0) for g in grads)


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_jit_equals_eager(case):
  fn, args, kwargs, mask, _, argnums = make(case, seed=4)
  got = scalars(fn(*args, **kwargs, mask=mask))
  want = scalars(evaluate(fn, args, kwargs, argnums, mask)[0])
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)
  assert got[2] == pytest.approx(want[2], rel=1e-5, abs=1e-6)

@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
  return jax.jit(lambda args, arrays: fn(*args, **arrays, **dict(static)))


def call(fn, *args, **kwargs):
  """fn under jit (one compile per signature); keyword arguments that are not arrays are
  static."""
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
  return _jitted(fn, static)(args, arrays)


# ------------------------------------------------------------------ golden values (METHODS.md)


def test_golden_dpo_reference_formula():
  x = 0.1 * ((PC - QC) - (PR - QR))
  assert abs(np.mean(sp(-x)) - DPO_GOLDEN) < 1e-8


def test_golden_kto():
  u, des = np.array([.5, -.25, 1, -3]), np.array([1, 1, 0, 0])
  loss_sum, denom, m = scalars(call(kto_mod.kto, u, des, .5, lam_u=1.33))
  assert abs(loss_sum / denom - .56254034) < 1e-6 and denom == 4
  want = np_kto(u, des, .5, lam_u=1.33)
  assert abs(want[0] / want[1] - .56254034) < 1e-8
  assert m["num_desirable"] == m["num_undesirable"] == 2 and m["kl"] == pytest.approx(2.0)
  assert m["reward_desirable"] == pytest.approx(.025)
  assert m["reward_undesirable"] == pytest.approx(-.2)


def golden_lists():
  return np.stack([PC, PR], 1), np.stack([QC, QR], 1), np.ones((4, 2), bool)


def test_golden_adpo():
  l, l_ref, valid = golden_lists()
  loss_sum, denom, _ = scalars(call(ranked.adpo, l, l_ref, np.tile([1., 0], (4, 1)), valid))
  assert abs(loss_sum / denom - DPO_GOLDEN) < 1e-6 and denom == 4
  loss_sum, denom, m = scalars(call(ranked.adpo, l, l_ref, np.tile([.9, .1], (4, 1)), valid))
  assert abs(m["cross_entropy"] / denom - .64641431) < 1e-6
  assert abs(loss_sum / denom - .32133134) < 1e-6
  want = np_adpo(l, l_ref, np.tile([.9, .1], (4, 1)), valid)
  assert abs(want[0] / 4 - .32133134) < 1e-8
  assert abs(want[2]["cross_entropy"] / 4 - .64641431) < 1e-8


def test_golden_rank_dpo_two_candidates_is_dpo():
  # K = 2: W = (2^1 - 1)(1 - 1/log2 3) for every list, so the weighted mean is dpo_sigmoid.
  l, l_ref, valid = golden_lists()
  loss_sum, denom, m = scalars(call(ranked.rank_dpo, l, l_ref, np.tile([1., 0], (4, 1)), valid))
  assert abs(loss_sum / denom - DPO_GOLDEN) < 1e-6
  assert denom == pytest.approx(4 * (1 - 1 / np.log2(3)))
  assert m["num_pairs"] == 4 and m["num_correct_pairs"] == 3


def test_golden_dft_and_asft():
  logits = jnp.zeros((2, 3, 2))  # uniform 2-token vocabulary
  targets = jnp.array([[0, 1, 1], [1, 0, 0]])
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  mask_t = jnp.ones((2, 3))
  loss_sum, denom, m = scalars(call(token.dft, lp, mask_t))
  assert abs(loss_sum / denom - .34657359) < 1e-7 and denom == 6
  assert loss_sum / denom == pytest.approx(m["nll"] / denom / 2)  # CE / 2
  ref = jnp.broadcast_to(jnp.log(jnp.array([.9, .1])), logits.shape)
  kl = call(token.token_kl_from_logits, logits, ref)
  kl_want = .9 * np.log(.9 / .5) + .1 * np.log(.1 / .5)  # .36806400 [f]
  np.testing.assert_allclose(kl, kl_want, rtol=1e-6)
  loss_sum, denom, m = scalars(call(token.asft, lp, kl, mask_t))
  assert abs(loss_sum / denom - (.34657359 + .1 * kl_want)) < 1e-6
  assert m["kl"] / denom == pytest.approx(kl_want, rel=1e-6)


# ------------------------------------------------------------------ kto properties


def test_kto_baseline_rows_and_gradients():
  u = np.array([.3, .3, -1., 2.])
  des = np.array([True, False, True, False])
  loss_sum, denom, _ = scalars(call(kto_mod.kto, u, des, .3, lam_d=2.0, lam_u=.5))
  want = 2.0 * .5 + .5 * .5 + 2.0 * (1 - sig(-.13)) + .5 * (1 - sig(-.17))
  assert loss_sum == pytest.approx(want)
  g_u, g_z0 = jax.grad(lambda u, z: call(kto_mod.kto, u, des, z)[0], argnums=(0, 1))(
      jnp.asarray(u), 0.3)
  assert g_z0 == 0  # z0 is a constant baseline
  assert np.all(np.asarray(g_u)[des] < 0) and np.all(np.asarray(g_u)[~des] > 0)
  # A [B] z0 equals a broadcast scalar; 0/1 flags equal bools.
  np.testing.assert_allclose(call(kto_mod.kto, u, des.astype(float), np.full(4, .3))[0],
                             call(kto_mod.kto, u, des, .3)[0], rtol=1e-7)


def test_kto_z0():
  u = np.array([1., -.5, 3., 100.])
  mask = np.array([1., 1, 1, 0])
  assert float(call(kto_mod.kto_z0, u, mask)) == pytest.approx(3.5 / 3)
  assert float(call(kto_mod.kto_z0, -np.abs(u))) == 0  # clamped at 0
  assert float(call(kto_mod.kto_z0, np.array([5.]))) == 0  # B = 1: y' = y
  assert float(call(kto_mod.kto_z0, u, np.zeros(4))) == 0  # all masked
  assert float(jax.grad(lambda x: call(kto_mod.kto_z0, x, mask))(jnp.asarray(u)).sum()) == 0
  assert float(jax.jit(kto_mod.kto_z0)(u, mask)) == pytest.approx(3.5 / 3)


def test_kto_z0_across_shards_is_the_global_masked_mean():
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  g = np.random.default_rng(0)
  u = g.normal(size=4 * n) + 0.5
  mask = (g.random(4 * n) < 0.6).astype(float)
  mask[:4] = [1, 0, 0, 0]  # unequal valid counts per shard
  want = max(0.0, np.sum(u * mask) / np.sum(mask))
  spec = jax.sharding.PartitionSpec("data")
  fn = jax.shard_map(functools.partial(kto_mod.kto_z0, axis_name="data"), mesh=mesh,
                     in_specs=(spec, spec), out_specs=jax.sharding.PartitionSpec())
  u, mask = jax.device_put((u, mask), jax.sharding.NamedSharding(mesh, spec))
  np.testing.assert_allclose(jax.jit(fn)(u, mask), want, rtol=1e-5)
  # Under plain jit on globally sharded arrays the mean is already global.
  np.testing.assert_allclose(jax.jit(kto_mod.kto_z0)(u, mask), want, rtol=1e-5)


def test_kto_weight_check():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert kto_mod.kto_weight_check(100, 100, 1.0, 1.0) == 1.0
    assert kto_mod.kto_weight_check(100, 75, 1.0, 1.0) == pytest.approx(4 / 3)
    assert kto_mod.kto_weight_check(50, 100, 2.4, 1.0) == pytest.approx(1.2)
  for args in [(50, 100, 1.0, 1.0), (100, 50, 1.0, 1.0), (10, 0, 1.0, 1.0)]:
    with pytest.warns(UserWarning, match="4/3"):
      kto_mod.kto_weight_check(*args)


# ------------------------------------------------------------------ adpo properties


def test_adpo_two_candidates_is_dpo_and_invalid_candidate_is_dropped():
  g = np.random.default_rng(5)
  pc, pr, qc, qr = 3 * g.normal(size=(4, B))
  beta = 0.25
  x = beta * ((pc - qc) - (pr - qr))
  onehot = np.tile([1., 0], (B, 1))
  got = call(ranked.adpo, np.stack([pc, pr], 1), np.stack([qc, qr], 1), onehot,
             np.ones((B, 2), bool), tau_anc=1 / beta)
  np.testing.assert_allclose(float(got[0]), np.sum(sp(-x)), rtol=1e-5)
  # A third, invalid candidate (with garbage) changes nothing.
  l3 = np.stack([pc, pr, np.full(B, np.nan)], 1)
  lr3 = np.stack([qc, qr, np.full(B, np.inf)], 1)
  q3 = np.concatenate([onehot, np.full((B, 1), .7)], 1)
  v3 = np.tile([True, True, False], (B, 1))
  got3 = call(ranked.adpo, l3, lr3, q3, v3, tau_anc=1 / beta)
  np.testing.assert_allclose(float(got3[0]), float(got[0]), rtol=1e-6)
  assert float(got3[1]) == B


def test_adpo_kl_is_cross_entropy_minus_entropy_and_nonnegative():
  l, l_ref, q, valid = list_inputs(np.random.default_rng(6), 2.0, "q")
  loss_sum, denom, m = scalars(call(ranked.adpo, l, l_ref, q, valid))
  ent = -sum(np.sum(q[b][valid[b]] * np.log(q[b][valid[b]])) for b in range(B)
             if valid[b].sum() >= 2)
  assert loss_sum == pytest.approx(m["cross_entropy"] - ent, rel=1e-5)
  assert loss_sum >= 0
  # q equal to the policy's own distribution gives 0 loss and zero gradient.
  x = (l - l_ref) / 10.0
  p = np.asarray(jax.nn.softmax(jnp.where(valid, x, -jnp.inf), axis=1))
  loss, grad = jax.value_and_grad(lambda l: call(ranked.adpo, l, l_ref, p, valid)[0])(
      jnp.asarray(l))
  assert abs(float(loss)) < 1e-5 and np.max(np.abs(grad)) < 1e-6


def test_adpo_target_modes():
  s = np.array([[1., 3, 2, 3], [0, 5, 1, 2], [2, 2, 2, 2], [1, 1, 1, 1]])
  v = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_allclose(call(ranked.adpo_target, s, v), [[0, .5, 0, .5], [0, 0, 0, 1],
                                                        [1, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(call(ranked.adpo_target, s, v, mode="smooth", eps=.2),
                             [[.1, .4, .1, .4], [.1, 0, .1, .8], [1, 0, 0, 0], [0, 0, 0, 0]],
                             rtol=1e-6)
  q = np.asarray(call(ranked.adpo_target, s, v, mode="softmax", tau_q=2.0))
  e = np.exp(np.array([0, 1, 2]) / 2.0)
  np.testing.assert_allclose(q[1], [e[0] / e.sum(), 0, e[1] / e.sum(), e[2] / e.sum()], rtol=1e-6)
  np.testing.assert_allclose(q.sum(1), [1, 1, 1, 0], rtol=1e-6)
  # K = 2 smoothing is (1 - eps, eps): adpo's cross-entropy is then cDPO.
  np.testing.assert_allclose(call(ranked.adpo_target, np.array([[2., 1]]), np.ones((1, 2), bool),
                                                mode="smooth", eps=.1), [[.9, .1]], rtol=1e-6)
  with pytest.raises(ValueError, match="mode"):
    call(ranked.adpo_target, s, v, mode="hard")


# ------------------------------------------------------------------ rank_dpo properties


def test_rank_dpo_equal_gains_give_zero():
  l, l_ref, _, valid = list_inputs(np.random.default_rng(7), 1.0, "g")
  fn = lambda l: call(ranked.rank_dpo, l, l_ref, np.full((B, K), 2.0), valid)
  grad = jax.grad(lambda l: fn(l)[0])(jnp.asarray(l))
  loss_sum, denom, m = scalars(fn(l))
  assert loss_sum == 0 and denom == 0 and m["num_pairs"] == 0 and m["accuracy"] == 0
  assert np.all(np.asarray(grad) == 0)


def test_rank_dpo_permutation_and_shift_invariance_with_ties():
  g = np.random.default_rng(8)
  l, l_ref, gains, valid = list_inputs(g, 1.0, "g")
  l[2, :2] = l_ref[2, :2] + 1.0  # tied z (and possibly tied gains) in some rows
  l[3] = l_ref[3]
  base = scalars(call(ranked.rank_dpo, l, l_ref, gains, valid))
  for _ in range(3):
    perm = np.stack([g.permutation(K) for _ in range(B)])
    take = lambda x: np.take_along_axis(x, perm, axis=1)
    got = scalars(call(ranked.rank_dpo, take(l), take(l_ref), take(gains), take(valid)))
    np.testing.assert_allclose(got[:2], base[:2], rtol=1e-5)
    assert got[2] == pytest.approx(base[2], rel=1e-5, abs=1e-6)
  shifted = scalars(call(ranked.rank_dpo, l + g.normal(size=(B, 1)), l_ref, gains, valid))
  np.testing.assert_allclose(shifted[:2], base[:2], rtol=1e-4)


def test_rank_dpo_ties_at_initialisation_weight_every_pair():
  # l = l_ref (a fresh policy): every z is 0. Ties rank the lower gain first, so each pair
  # with g_i > g_j has W > 0 and the loss is log 2 with a non-zero gradient.
  gains = np.array([[3., 1, 2, 0], [1, 1, 0, 2]])
  l = np.random.default_rng(9).normal(size=(2, 4))
  valid = np.ones((2, 4), bool)
  w = np.asarray(call(ranked.rank_dpo_weights, jnp.zeros((2, 4)), jnp.asarray(gains), valid))
  pairs = gains[:, :, None] > gains[:, None, :]
  assert np.all(w[pairs] > 0) and np.all(w[~pairs] == 0)
  loss_sum, denom, m = scalars(call(ranked.rank_dpo, l, l, gains, valid))
  assert loss_sum / denom == pytest.approx(np.log(2), rel=1e-6)
  assert m["accuracy"] == 0 and m["num_pairs"] == 6 + 5
  grad = jax.grad(lambda x: call(ranked.rank_dpo, x, l, gains, valid)[0])(jnp.asarray(l))
  assert np.any(np.asarray(grad) != 0)
  # The worst candidate ranked best (ties): its ranks follow ascending gain.
  assert np.all(w[0, 0, 3] > w[0, 0, 1])


def test_rank_dpo_weights_match_delta_dcg_of_a_swap():
  # W_ij = |DCG(ranking) - DCG(ranking with i and j swapped)| for distinct z.
  g = np.random.default_rng(10)
  z, gains = g.normal(size=(1, K)), g.integers(0, 4, (1, K)).astype(float)
  w = np.asarray(call(ranked.rank_dpo_weights, jnp.asarray(z), jnp.asarray(gains),
                      np.ones((1, K), bool)))
  tau = np.argsort(np.argsort(-z[0])) + 1

  def dcg(t):
    return np.sum((2**gains[0] - 1) / np.log2(1 + t))

  for i, j in itertools.permutations(range(K), 2):
    t = tau.copy()
    t[i], t[j] = t[j], t[i]
    want = abs(dcg(tau) - dcg(t)) if gains[0, i] > gains[0, j] else 0.0
    assert w[0, i, j] == pytest.approx(want, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------ token properties


def test_dft_gradient_is_probability_weighted_sft():
  lp, mask_t = token_inputs(np.random.default_rng(11), 1.0, False)
  grad = jax.grad(lambda x: call(token.dft, x, mask_t)[0])(jnp.asarray(lp))
  np.testing.assert_allclose(grad, -np.exp(lp) * mask_t, rtol=1e-6)
  row_mask = np.array([1., 0, 1, 1, 0, 1])
  grad = jax.grad(lambda x: call(token.dft, x, mask_t, mask=row_mask)[0])(jnp.asarray(lp))
  np.testing.assert_allclose(grad, -np.exp(lp) * mask_t * row_mask[:, None], rtol=1e-6)


def test_asft_gradient_wrt_kl_logits():
  g = np.random.default_rng(12)
  logits, ref = g.normal(size=(B, T, 7)), g.normal(size=(B, T, 7))
  targets = g.integers(0, 7, (B, T))
  mask_t = (g.random((B, T)) < 0.7).astype(float)

  def loss(x):
    lp = jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)[..., 0]
    return call(token.asft, lp, call(token.token_kl_from_logits, x, ref), mask_t, lam=0.5)[0]

  grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  pr = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
  onehot = np.eye(7)[targets]
  pt = np.sum(p * onehot, -1, keepdims=True)
  want = mask_t[..., None] * (-pt * (onehot - p) + 0.5 * (p - pr))
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_token_kl_from_logits():
  g = np.random.default_rng(13)
  a, b = 5 * g.normal(size=(3, 4, 9)), 5 * g.normal(size=(3, 4, 9))
  kl = np.asarray(call(token.token_kl_from_logits, a, b))
  np.testing.assert_allclose(kl, np_token_kl(a, b), rtol=1e-4, atol=1e-5)
  assert np.all(kl >= -1e-6) and kl.dtype == np.float32
  np.testing.assert_allclose(call(token.token_kl_from_logits, a, a), 0, atol=1e-5)
  np.testing.assert_allclose(call(token.token_kl_from_logits, a, a + 3.0), 0, atol=1e-5)
  # -inf reference logits (banned tokens) and -inf policy logits where p_ref = 0 are fine.
  b[..., :2] = -np.inf
  a[..., :1] = -np.inf
  kl, grads = jax.value_and_grad(lambda x, y: call(token.token_kl_from_logits, x, y).sum(),
                                 argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
  assert np.isfinite(float(kl)) and all(np.all(np.isfinite(gr)) for gr in grads)
  np.testing.assert_allclose(float(kl), np_token_kl(np.where(np.isinf(a), -1e30, a),
                                                    np.where(np.isinf(b), -1e30, b)).sum(),
                             rtol=1e-4)
