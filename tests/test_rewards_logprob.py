"""Log-prob-derived rewards (alignjax/rewards/logprob.py, METHODS.md 7.1-7.8): each kernel
against numpy on hand-made inputs, and each model-side scorer (chunked kernel, left-padded
rows) against its definition computed from float64 full logits of the unpadded sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax.models.presets import get_preset
from alignjax.models.transformer import init_model
from alignjax.rewards import logprob as lpr

PAD = 0
V = 64


@pytest.fixture(scope="module")
def models():
  cfg = get_preset("tiny", vocab_size=V, init_std=0.3)
  return init_model(cfg, 0), init_model(cfg, 1)


_FWD = nnx.jit(lambda m, t: m(t))
L_REF = 24


def _full_logits(model, rows):
  """float64 full logits [R,L,V] of unpadded token rows (right-filled: causal, so the filler
  after a row's end does not change its logits; R and L fixed-size to reuse one compile)."""
  r = -(-len(rows) // 8) * 8
  toks = np.full((r, L_REF), PAD, np.int32)
  for i, row in enumerate(rows):
    toks[i, :len(row)] = row
  return np.asarray(_FWD(model, jnp.asarray(toks)), np.float64)[:len(rows)]


def _log_softmax(z):
  mx = z.max(-1, keepdims=True)
  return z - (np.log(np.sum(np.exp(z - mx), -1, keepdims=True)) + mx)


def _full_logp(model, contexts, targets, temperature=1.0):
  """Per row: float64 log p(target_t | context, target_<t) [len(target)] from full logits."""
  logits = _full_logits(model, [list(c) + list(t) for c, t in zip(contexts, targets)])
  out = []
  for z, c, t in zip(logits / temperature, contexts, targets):
    lp = _log_softmax(z[len(c) - 1:len(c) - 1 + len(t)])
    out.append(lp[np.arange(len(t)), np.asarray(t, np.int64)])
  return out


def _next_logits(model, contexts):
  logits = _full_logits(model, contexts)
  return [z[len(c) - 1] for z, c in zip(logits, contexts)]


def _lse(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return m + np.log(np.sum(np.exp(x - m)))


RNG = np.random.default_rng(0)
PROMPTS = [[int(t) for t in RNG.integers(1, V, n)] for n in (3, 7, 1, 5)]
COMPS = [[int(t) for t in RNG.integers(1, V, n)] for n in (5, 2, 6, 0)]


# ------------------------------------------------------------------------------ kernels
def test_dpo_implicit_kernel():
  lp_pi = np.array([[-1.0, -2.0, np.nan], [-0.5, -0.1, -3.0], [np.inf, 0, 0]], np.float32)
  lp_ref = np.array([[-1.5, -1.0, 7.0], [-0.7, -0.4, -2.0], [0, 0, 0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], np.float32)
  d = np.where(mask > 0, 0.1 * (np.nan_to_num(lp_pi, posinf=0) - lp_ref), 0.0)
  np.testing.assert_allclose(lpr.dpo_implicit(lp_pi, lp_ref, mask), d.sum(1), rtol=1e-6)
  np.testing.assert_allclose(lpr.dpo_implicit(lp_pi, lp_ref, mask, beta=0.1, per_token=True),
                             d, rtol=1e-6)
  g = jax.grad(lambda x: lpr.dpo_implicit(x, lp_ref, mask).sum())(jnp.asarray(lp_ref))
  assert np.all(np.asarray(g) == 0)  # stop_gradient


def _prm_ref(lp_pi, lp_ref, mask, ends, beta, reduce):
  q = np.cumsum(np.where(mask > 0, beta * (lp_pi - lp_ref), 0.0), 1)
  b, s = ends.shape
  r, score = np.zeros((b, s)), np.zeros(b)
  for i in range(b):
    prev, rs = 0.0, []
    for j in range(s):
      if ends[i, j] < 0:
        continue
      qe = q[i, min(ends[i, j], q.shape[1] - 1)]
      r[i, j] = qe - prev
      prev = qe
      rs.append(r[i, j])
    if not rs:
      score[i] = q[i, -1]
    else:
      score[i] = dict(min=min(rs), sum=sum(rs), last=rs[-1], mean=np.mean(rs))[reduce]
  return r, q[:, -1], score


@pytest.mark.parametrize("reduce", ["min", "sum", "last", "mean"])
def test_implicit_prm_kernel(reduce):
  rng = np.random.default_rng(1)
  lp_pi = rng.normal(size=(4, 6)).astype(np.float32)
  lp_ref = rng.normal(size=(4, 6)).astype(np.float32)
  mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0], [0] * 6, [1, 1, 1, 0, 0, 0]], np.float32)
  lp_pi[1, 4:] = np.nan  # padding never leaks
  ends = np.array([[1, 3, 5], [0, -1, 3], [-1, -1, -1], [2, 9, -1]], np.int32)
  r, qt, sc = lpr.implicit_prm(lp_pi, lp_ref, mask, ends, beta=0.05, reduce=reduce)
  wr, wq, ws = _prm_ref(np.nan_to_num(lp_pi), lp_ref, mask, ends, 0.05, reduce)
  np.testing.assert_allclose(r, wr, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(qt, wq, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sc, ws, rtol=1e-5, atol=1e-7)
  assert float(qt[2]) == 0.0 and float(sc[2]) == 0.0  # empty mask, no steps
  with pytest.raises(ValueError):
    lpr.implicit_prm(lp_pi, lp_ref, mask, ends, reduce="max")


def test_cdr_kernels():
  np.testing.assert_allclose(lpr.cdr(np.array([-3.0, -1.0]), np.array([-4.0, -0.5])),
                             [1.0, -0.5])
  r = np.array([[0.2, 1.0, -0.3, 1.0], [0.5, 0.5, 0.5, 0.5], [np.nan, 2.0, 1.5, np.nan],
                [0.0, 0.1, 0.05, 0.0]], np.float32)
  hi, lo, margin, valid = lpr.cdr_pairs(r, delta=0.0)
  assert hi.tolist() == [1, 0, 1, 1] and lo.tolist() == [2, 0, 2, 0]
  np.testing.assert_allclose(margin, [1.3, 0.0, 0.5, 0.1], rtol=1e-6)
  assert valid.tolist() == [True, False, True, True]
  assert lpr.cdr_pairs(r, delta=0.2)[3].tolist() == [True, False, True, False]


def test_flr_sar_genrm_kernels():
  pos = np.array([[-2.0, -4.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
  neg = np.array([[-5.0, -6.0], [-0.5, -1.5]])
  np.testing.assert_allclose(lpr.flr(pos, neg), [-2.5 + 5.5, -1.0 + 1.0], rtol=1e-6)
  mq = np.array([-1.0, -2.0, -0.1, -1.0, -3.0])
  m0 = np.array([-2.0, -1.0, -5.0, -1.0, -1.0])
  lengths = np.array([10, 4, 7, 3, 0])
  want = np.clip(1 - np.exp(m0 - mq), -1, 1) * (lengths >= 4)
  np.testing.assert_allclose(lpr.sar(mq, m0, lengths), want, rtol=1e-6)
  assert float(lpr.sar(mq, m0, lengths)[1]) == -1.0  # clipped
  zy = np.array([[2.0, 0.5], [-1.0, -3.0]])
  zn = np.array([[1.0, 1.0, -2.0], [0.0, 4.0, 1.0]])
  want = [1 / (1 + np.exp(-(_lse(a) - _lse(b)))) for a, b in zip(zy, zn)]
  np.testing.assert_allclose(lpr.genrm_yes(zy, zn), want, rtol=1e-6)


# ----------------------------------------------------------- scorers vs full logits
def test_sequence_logprobs_match_full_logits(models):
  pol, _ = models
  lp, m = lpr.sequence_logprobs_for(pol, PROMPTS, COMPS, pad_id=PAD, chunk_size=4,
                                    temperature=0.7, vocab_chunk_size=24)
  lp, m = np.asarray(lp), np.asarray(m)
  assert lp.shape == m.shape == (4, 8)
  want = _full_logp(pol, PROMPTS, COMPS, 0.7)
  for i, y in enumerate(COMPS):
    assert m[i].tolist() == [1.0] * len(y) + [0.0] * (m.shape[1] - len(y))
    np.testing.assert_allclose(lp[i, :len(y)], want[i], rtol=2e-5, atol=2e-5)
    assert np.all(lp[i, len(y):] == 0)
  with pytest.raises(ValueError):
    lpr.sequence_logprobs_for(pol, [[]], [[1, 2]], pad_id=PAD)


def _sums(model, contexts, targets):
  return np.array([x.sum() for x in _full_logp(model, contexts, targets)])


def test_score_dpo_implicit_and_cdr(models):
  pol, ref = models
  got = lpr.score_dpo_implicit(pol, ref, PROMPTS, COMPS, pad_id=PAD, beta=0.1)
  want = 0.1 * (_sums(pol, PROMPTS, COMPS) - _sums(ref, PROMPTS, COMPS))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(got[3]) == 0.0  # empty completion
  tok = lpr.score_dpo_implicit(pol, ref, PROMPTS, COMPS, pad_id=PAD, per_token=True)
  np.testing.assert_allclose(np.asarray(tok).sum(1), got, rtol=1e-5, atol=1e-6)
  prefix = [9, 8, 7]
  got = lpr.score_cdr(pol, ref, PROMPTS, COMPS, pad_id=PAD, prefix=prefix)
  px = [prefix + x for x in PROMPTS]
  want = _sums(pol, px, COMPS) - _sums(ref, px, COMPS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_score_flr(models):
  pol, _ = models
  pos = [[11, 12, 13], [14, 15]]
  neg = [[21], [22, 23, 24, 25]]
  xs, ys = PROMPTS[:2], COMPS[:2]
  got = lpr.score_flr(pol, xs, ys, pos, neg, pad_id=PAD)
  ctx = [x + y for x, y in zip(xs, ys) for _ in range(4)]
  lp = _sums(pol, ctx, (pos + neg) * 2).reshape(2, 4)
  want = lp[:, :2].mean(1) - lp[:, 2:].mean(1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_score_sar(models):
  pol, _ = models
  empty = [2, 3]
  got = lpr.score_sar(pol, PROMPTS, COMPS, empty, pad_id=PAD, min_tokens=3)
  mq = _full_logp(pol, PROMPTS, COMPS)
  m0 = _full_logp(pol, [empty] * 4, COMPS)
  want = [np.clip(1 - np.exp(b.mean() - a.mean()), -1, 1) if len(y) >= 3 else 0.0
          for a, b, y in zip(mq, m0, COMPS)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(got[1]) == 0.0 and float(got[3]) == 0.0  # below min_tokens / empty
  assert abs(float(got[0])) > 1e-3


def test_score_genrm_yes(models):
  pol, _ = models
  yes, no = [5, 6], [7]
  got = lpr.score_genrm_yes(pol, PROMPTS, yes, no, pad_id=PAD)
  want = [1 / (1 + np.exp(-(_lse(z[yes]) - _lse(z[no])))) for z in _next_logits(pol, PROMPTS)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    lpr.score_genrm_yes(pol, PROMPTS, [5], [5, 6], pad_id=PAD)


# ------------------------------------------------------- 7.6 IGPO, 7.8 listener: kernels
def _igpo_ref(p, tm, outcome, group, gamma, normalise, eps=1e-6):
  """float64 loops: leading run of valid turns, r, discounted G, per-group per-turn z-score
  (ddof 1; fewer than 2 members -> 0)."""
  p, outcome = np.asarray(p, np.float64), np.asarray(outcome, np.float64)
  b, t = tm.shape
  n = [next((k for k in range(t) if tm[i, k] <= 0), t) for i in range(b)]
  r, g = np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    for k in range(n[i]):
      r[i, k] = outcome[i] if k == n[i] - 1 else p[i, k + 1] - p[i, k]
    for k in range(n[i]):
      g[i, k] = sum(gamma ** (j - k) * r[i, j] for j in range(k, n[i]))
  if not normalise:
    return r, g
  z = np.zeros((b, t))
  for i in range(b):
    for k in range(n[i]):
      vals = [g[j, k] for j in range(b) if group[j] == group[i] and k < n[j]]
      if len(vals) >= 2:
        z[i, k] = (g[i, k] - np.mean(vals)) / (np.std(vals, ddof=1) + eps)
  return r, z


def _igpo_inputs():
  nan = np.nan
  p = np.array([[0.1, 0.3, 0.25, 0.9],     # 3 turns
                [0.2, 0.6, nan, nan],      # 2 turns (P_2 never read)
                [0.5, nan, nan, nan],      # mask [1,0,1]: only the leading turn counts
                [nan, nan, nan, nan],      # no valid turn
                [0.2, 0.6, 0.1, 0.0],      # 2 turns, same as row 1 (tie within the group)
                [0.4, 0.1, 0.7, 0.3]],     # single-member group
               np.float32)
  tm = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1]], np.float32)
  outcome = np.array([1.0, 0.0, 1.0, nan, 0.0, 1.0], np.float32)
  group = np.array([0, 0, 0, 0, 0, 1])
  return p, tm, outcome, group


@pytest.mark.parametrize("gamma,normalise", [(1.0, False), (0.8, False), (1.0, True),
                                             (0.5, True)])
def test_igpo_info_gain_kernel(gamma, normalise):
  p, tm, outcome, group = _igpo_inputs()
  r, g = lpr.igpo_info_gain(p, tm, outcome, group, gamma=gamma, normalise=normalise)
  r, g = np.asarray(r), np.asarray(g)
  wr, wg = _igpo_ref(p, tm, outcome, group, gamma, normalise)
  assert np.all(np.isfinite(r)) and np.all(np.isfinite(g))  # NaN in unread p / outcome
  np.testing.assert_allclose(r, wr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-5)
  assert np.all(r[3] == 0) and np.all(g[3] == 0) and np.all(g[2, 1:] == 0)  # invalid turns
  if normalise:
    assert np.all(g[5] == 0)           # single-member group
    assert g[0, 2] == 0                # turn 3 reached by one row of the group only
    assert np.all(g[[0, 1, 2, 4], 0] != 0)
  else:
    assert r[2, 0] == 1.0 and r[0, 2] == 1.0 and r[1, 1] == 0.0  # last valid turn = outcome


def test_igpo_info_gain_relations():
  rng = np.random.default_rng(3)
  p = rng.uniform(size=(5, 7)).astype(np.float32)
  tm = (np.arange(6)[None, :] < np.array([6, 1, 3, 4, 6])[:, None]).astype(np.float32)
  outcome = rng.normal(size=5).astype(np.float32)
  r, g = lpr.igpo_info_gain(p, tm, outcome, np.zeros(5, np.int32), gamma=1.0, normalise=False)
  r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
  for i, n in enumerate([6, 1, 3, 4, 6]):
    # METHODS 7.6: r_t telescopes, sum_{t<T} r_t = P_{T-1} - P_0; G_1 = that + outcome
    np.testing.assert_allclose(r[i, :n - 1].sum(), p[i, n - 1] - p[i, 0], atol=1e-6)
    np.testing.assert_allclose(g[i, 0], p[i, n - 1] - p[i, 0] + outcome[i], atol=1e-5)
    np.testing.assert_allclose(g[i, :n], np.cumsum(r[i, :n][::-1])[::-1], atol=1e-5)
  # ties: identical rows -> exactly 0 after normalisation; group=None = one batch group
  same = np.tile(p[:1], (3, 1))
  z = lpr.igpo_info_gain(same, np.ones((3, 6)), np.ones(3), None)[1]
  assert np.all(np.asarray(z) == 0)
  _, z = lpr.igpo_info_gain(p, tm, outcome * 1e6, None, gamma=0.9)
  _, wz = _igpo_ref(p, tm, outcome * 1e6, np.zeros(5), 0.9, True)
  np.testing.assert_allclose(z, wz, rtol=1e-4, atol=1e-4)
  g0 = jax.grad(lambda x: lpr.igpo_info_gain(x, tm, outcome, None)[1].sum())(jnp.asarray(p))
  assert np.all(np.asarray(g0) == 0)  # stop_gradient
  with pytest.raises(ValueError):
    lpr.igpo_info_gain(p[:, :6], tm, outcome, None)


def test_igpo_helpers():
  lp = np.array([-2.0, -1e30, -np.inf, 0.0, -3.0], np.float32)
  n = np.array([4, 3, 2, 0, 1])
  np.testing.assert_allclose(lpr.p_from_logprobs(lp, n), [np.exp(-0.5), 0, 0, 1, np.exp(-3)],
                             rtol=1e-6)
  np.testing.assert_allclose(lpr.p_from_logprobs(lp, n, mode="sum"),
                             [np.exp(-2), 0, 0, 1, np.exp(-3)], rtol=1e-6)
  with pytest.raises(ValueError):
    lpr.p_from_logprobs(lp, n, mode="max")
  v = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, np.nan]], np.float32)
  tt = np.array([[-1, 0, 0, 1, -1, 2, 3], [1, 1, -1, 0, 0, 2, -1]])
  want = np.array([[0, 1, 1, 2, 0, 3, 0], [5, 5, 0, 4, 4, np.nan, 0]])
  np.testing.assert_array_equal(lpr.spread_turns(v, tt), want)


def _listener_ref(lp, mask, a, rf, ra, lam):
  out_c = []
  for row, m, k in zip(np.asarray(lp, np.float64), mask, a):
    ok = (m > 0) & np.isfinite(row)
    if not (0 <= k < len(row)) or not ok[k]:
      out_c.append(0.0)
      continue
    e = np.exp(row[ok] - row[ok].max())
    out_c.append(np.exp(row[k] - row[ok].max()) / e.sum())
  c = np.array(out_c)
  return rf + ra + lam * c, c


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_listener_kernel(lam):
  inf, nan = np.inf, np.nan
  lp = np.array([[-1.0, -2.0, -0.5],
                 [-1.0, -inf, -1.0],          # tie among the valid options
                 [nan, -3.0, -1.0],           # NaN gold -> 0
                 [-inf, -inf, -inf],          # nothing valid -> 0
                 [-1e4, -1e4 - 50.0, -3e38],  # extreme log-probs
                 [5.0, -1.0, -2.0],           # option 0 masked out
                 [-1.0, -2.0, -3.0],          # gold out of range -> 0
                 [-0.1, -7.0, 0.0]], np.float32)
  mask = np.ones_like(lp)
  mask[5, 0] = 0
  a = np.array([2, 0, 0, 1, 0, 1, 3, 1])
  rf = np.array([1, 0, 1, 0, 1, 0, 1, 0], np.float32)
  ra = np.array([0, 1, 1, 0, 0, 1, 1, 0], np.float32)
  r, c = lpr.listener(lp, a, rf, ra, option_mask=mask, lam=lam)
  wr, wc = _listener_ref(lp, mask, a, rf, ra, lam)
  assert np.all(np.isfinite(r)) and np.all(np.isfinite(c))
  np.testing.assert_allclose(c, wc, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(r, wr, rtol=1e-5, atol=1e-6)
  assert float(c[1]) == 0.5 and float(c[2]) == 0.0 and float(c[3]) == 0.0
  assert float(c[6]) == 0.0 and float(c[4]) == 1.0
  # no mask: same as the mask of finite entries (row 5's option 0 back in)
  c2 = np.asarray(lpr.listener(lp, a, rf, ra)[1])
  np.testing.assert_allclose(c2[:5], wc[:5], rtol=1e-5, atol=1e-7)
  assert float(c2[5]) < float(c[5])


def test_strip_answer():
  cot = ("Compare (A) and ( B ). Option B is clearer, so \\boxed{\\text{B}}.\n"
         "Final answer: (B)\n")
  assert lpr.strip_answer(cot) == "Compare and . is clearer, so ."
  assert lpr.strip_answer("<think>short</think><answer>\nA\n</answer>") == "<think>short</think>"
  assert lpr.strip_answer("Step 1: add.\nSo the answer is: 42\nok") == "Step 1: add.\nSo\nok"
  assert lpr.strip_answer("Edges are sharp. The final answer is = 2.") == "Edges are sharp."
  assert lpr.strip_answer("x = \\boxed{\\frac{1}{2}} done") == "x = done"
  assert lpr.strip_answer("keep (a) lowercase", patterns=()) == "keep (a) lowercase"


# ----------------------------------------------- 7.6 IGPO, 7.8 listener: scorers
IG_TURNS = [[[21, 22], [23, 24, 25]], [[26]], [[27, 28, 29]], []]
IG_ANS = [[31, 32, 33], [34], [35, 36], [37, 38]]
IG_APREF = [3]


def _igpo_p_ref(model):
  """float64 P_t [4,3] per mode ("mean": exp of the mean answer log-prob; "sum": exp(sum))."""
  ctx, rows = [], []
  for b, (x, hs) in enumerate(zip(PROMPTS, IG_TURNS)):
    acc = list(x)
    for t in range(len(hs) + 1):
      acc = acc + (list(hs[t - 1]) if t else [])
      ctx.append(acc + IG_APREF)
      rows.append(b)
  lps = _full_logp(model, ctx, [IG_ANS[b] for b in rows])
  p = {"mean": np.zeros((4, 3)), "sum": np.zeros((4, 3))}
  k = 0
  for b, hs in enumerate(IG_TURNS):
    for t in range(len(hs) + 1):
      p["mean"][b, t], p["sum"][b, t] = np.exp(lps[k].mean()), np.exp(lps[k].sum())
      k += 1
  return p


def test_score_igpo_info_gain(models):
  pol, _ = models
  outcome = np.array([1.0, 0.0, 1.0, 0.5], np.float32)
  group = np.array([0, 0, 0, 1])
  tm = np.array([[1, 1], [1, 0], [1, 0], [0, 0]], np.float32)
  ref_p = _igpo_p_ref(pol)
  for mode, gamma, norm in (("mean", 1.0, True), ("sum", 0.9, False)):
    r, g, p = lpr.score_igpo_info_gain(pol, PROMPTS, IG_TURNS, IG_ANS, outcome, group,
                                       pad_id=PAD, gamma=gamma, normalise=norm, mode=mode,
                                       answer_prefix=IG_APREF)
    wp = ref_p[mode]
    np.testing.assert_allclose(p, wp, rtol=1e-4, atol=1e-7)
    wr, wg = _igpo_ref(wp, tm, outcome, group, gamma, norm)
    np.testing.assert_allclose(r, wr, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g, wg, rtol=1e-3, atol=1e-5)
    if mode == "mean":
      assert abs(float(r[0, 0])) > 1e-4  # a real information gain, not 0
  with pytest.raises(ValueError):
    lpr.score_igpo_info_gain(pol, PROMPTS[:1], [[]], [[]], [1.0], None, pad_id=PAD)


LS_OPTS = [[[11], [12, 13], [14]], [[15], [16]]]


def test_score_listener(models):
  pol, _ = models
  xs = PROMPTS[:2]
  a = np.array([0, 1])
  rf, ra = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
  r, c = lpr.score_listener(pol, xs, LS_OPTS, a, rf, ra, pad_id=PAD, lam=0.5)
  lp = np.full((2, 3), -np.inf)
  mask = np.zeros((2, 3))
  for b, os_ in enumerate(LS_OPTS):
    lp[b, :len(os_)] = _sums(pol, [xs[b]] * len(os_), os_)
    mask[b, :len(os_)] = 1
  wr, wc = _listener_ref(lp, mask, a, rf, ra, 0.5)
  np.testing.assert_allclose(c, wc, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(r, wr, rtol=1e-4, atol=1e-6)
  assert 0.01 < float(c[0]) < 0.99
  with pytest.raises(ValueError):
    lpr.score_listener(pol, xs, [[[11], []], [[15]]], a, rf, ra, pad_id=PAD)


def test_igpo_listener_scorers_extreme_logits(models):
  """Logits scaled by ~1e4 (final-norm scale): log-probs hit -1e4 and beyond; rewards stay
  finite and probabilities in [0, 1]."""
  hot = nnx.clone(models[0])
  hot.final_norm.scale[...] = hot.final_norm.scale[...] * 1e4
  r, g, p = lpr.score_igpo_info_gain(hot, PROMPTS, IG_TURNS, IG_ANS, np.ones(4), None,
                                     pad_id=PAD, answer_prefix=IG_APREF)
  for x in (r, g, p):
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all((np.asarray(p) >= 0) & (np.asarray(p) <= 1))
  r, c = lpr.score_listener(hot, PROMPTS[:2], LS_OPTS, [1, 0], np.zeros(2), np.zeros(2),
                            pad_id=PAD)
  c = np.asarray(c)
  assert np.all(np.isfinite(c)) and np.all((c >= 0) & (c <= 1)) and np.all(np.isfinite(r))
  lp = np.full((2, 3), -np.inf)
  for b, os_ in enumerate(LS_OPTS):
    lp[b, :len(os_)] = _sums(hot, [PROMPTS[b]] * len(os_), os_)
  assert np.all(lp[np.isfinite(lp)] < -1e3)  # really extreme
  wc = _listener_ref(lp, np.isfinite(lp), [1, 0], 0.0, 0.0, 0.5)[1]
  np.testing.assert_allclose(c, wc, atol=1e-3)
