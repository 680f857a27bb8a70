"""Log-prob-derived rewards (alignjax/rewards/logprob.py, METHODS.md 7.1-7.5, 7.7): each kernel
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
