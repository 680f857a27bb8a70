"""Test-time methods (METHODS.md 8.1 `tt.best_of_n`, 8.2 `tt.weighted_vote`, 8.7
`sampler.dataset_reset`): numpy references, edge rules, and best-of-N generation end to end."""

import numpy as np
import pytest

from alignjax import testtime as tt
from alignjax.models.presets import get_preset
from alignjax.models.transformer import init_model
from alignjax.sampling.sampler import Sampler, SamplingConfig


# ---------------------------------------------------------------------------- best_of_n

def _np_best(R, aggregate, lam=1.0, zscore=False):
  R = np.asarray(R, np.float64)
  if R.ndim == 2:
    R = R[None]
  if zscore:
    Z = np.empty_like(R)
    for e in range(R.shape[0]):
      for b in range(R.shape[1]):
        row = R[e, b]
        ok = ~np.isnan(row)
        Z[e, b] = row
        if ok.sum() >= 2:
          Z[e, b, ok] = (row[ok] - row[ok].mean()) / (row[ok].std() + 1e-8)
        elif ok.sum() == 1:
          Z[e, b, ok] = 0.0
    R = Z
  A = {"mean": lambda: R.mean(0), "median": lambda: np.median(R, 0), "min": lambda: R.min(0),
       "mean_minus_std": lambda: R.mean(0) - lam * R.std(0)}[aggregate]()
  A = np.where(np.isnan(A) | np.isnan(R).any(0), -np.inf, A)
  return A.argmax(-1), A


@pytest.mark.parametrize("aggregate", tt.AGGREGATES)
@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("zscore", [False, True])
def test_best_of_n_matches_numpy(aggregate, E, zscore):
  rng = np.random.default_rng(E)
  R = rng.normal(size=(E, 5, 6)) * rng.uniform(0.5, 3.0, size=(E, 1, 1))
  R[0, 1, 2] = np.nan
  R[-1, 3, :] = np.nan  # whole row unscorable -> index 0
  idx, score = tt.best_of_n(R, aggregate=aggregate, lam=0.7, zscore=zscore)
  ref_idx, ref_A = _np_best(R, aggregate, 0.7, zscore)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(score), ref_A, rtol=1e-5, atol=1e-5)
  assert np.isneginf(np.asarray(score)[1, 2]) and np.asarray(idx)[3] == 0


def test_best_of_n_2d_is_E1_and_ties_lowest():
  R = np.array([[1.0, 3.0, 3.0, 0.0], [np.nan, 2.0, np.nan, 2.0], [np.nan] * 4])
  idx, score = tt.best_of_n(R)
  np.testing.assert_array_equal(np.asarray(idx), [1, 1, 0])
  idx3, score3 = tt.best_of_n(R[None], aggregate="mean_minus_std")  # std = 0 for E = 1
  np.testing.assert_array_equal(np.asarray(idx3), [1, 1, 0])
  np.testing.assert_array_equal(np.asarray(score3), np.asarray(score))
  assert np.asarray(idx).dtype == np.int32


def test_best_of_n_aggregators_disagree():
  # Member 1 "hacked" candidate 1: the mean follows it, min / mean-std do not.
  R = np.array([[[1.0, 0.9]], [[1.0, 5.0]]])
  assert int(tt.best_of_n(R, aggregate="mean")[0][0]) == 1
  assert int(tt.best_of_n(R, aggregate="min")[0][0]) == 0
  assert int(tt.best_of_n(R, aggregate="mean_minus_std", lam=1.0)[0][0]) == 0
  with pytest.raises(ValueError, match="aggregate"):
    tt.best_of_n(R, aggregate="max")


# ---------------------------------------------------------------------------- weighted_vote

def test_majority_vote_and_ties():
  answers = [["3", "4", "4", "3", "5"],        # tie 3 vs 4 -> first seen "3"
             ["7", "8", "8"],
             ["x = 2", "2", "\\boxed"],        # "x = 2" and "2" are one answer
             ["a", "b"]]
  win, sc = tt.weighted_vote(answers)
  assert win == ["3", "8", "x = 2", "a"]
  assert sc[0] == {"3": 2.0, "4": 2.0, "5": 1.0}
  assert sc[2]["x = 2"] == 2.0


def test_weighted_vote_weights_and_numeric_equivalence():
  answers = [["1/2", "0.5", "\\frac{1}{2}", "3"], ["1", "2", "2"]]
  w = np.array([[0.1, 0.1, 0.1, 0.5], [0.9, 0.3, 0.3, 0.0]])
  win, sc = tt.weighted_vote(answers, w)
  assert win == ["3", "1"]
  assert sc[0]["1/2"] == pytest.approx(0.3) and sc[1]["2"] == pytest.approx(0.6)
  assert tt.weighted_vote(answers)[0] == ["1/2", "2"]  # majority: 1/2 = 0.5 = \frac{1}{2}
  # exact strings: no numeric equivalence -> all four distinct, tie -> first seen
  win, sc = tt.weighted_vote(answers, match=None, normalize=lambda s: s)
  assert win == ["1/2", "2"] and len(sc[0]) == 4


def test_weighted_vote_drops_unparseable():
  answers = [[None, "5", None, "6", "6"], [None, None], ["", " ", None], []]
  w = np.array([[9.0, 1.0, 9.0, 0.2, np.nan], [1.0, 1.0, 0, 0, 0], [1.0, 1.0, 1.0, 0, 0],
                [0, 0, 0, 0, 0]])
  win, sc = tt.weighted_vote(answers, w)
  assert win[0] == "5" and sc[0] == {"5": 1.0, "6": pytest.approx(0.2)}  # NaN weight drops
  assert win[1] is None and sc[1] == {}       # all dropped -> first sample's answer (None)
  assert win[2] == "" and sc[2] == {}         # empty answers drop; first sample as given
  assert win[3] is None


def test_softmax_and_certainty_weights():
  s = np.array([[1.0, 2.0, np.nan], [np.nan, np.nan, np.nan]])
  w = np.asarray(tt.softmax_weights(s, 0.5))
  e = np.exp(np.array([2.0, 4.0]) - 4.0)
  np.testing.assert_allclose(w[0], [*(e / e.sum()), 0.0], rtol=1e-6)
  np.testing.assert_array_equal(w[1], 0.0)
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(5), size=(2, 3, 4))
  top = -np.sort(-p, -1)
  mask = rng.integers(0, 2, size=(2, 3, 4)).astype(np.float32)
  mask[1, 2] = 0
  c = np.asarray(tt.certainty_weights(np.log(top[..., 0]), np.log(top[..., 1]), mask))
  gap = top[..., 0] - top[..., 1]
  ref = (gap * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
  ok = mask.sum(-1) > 0
  np.testing.assert_allclose(c[ok], ref[ok], rtol=1e-5)
  assert np.isnan(c[1, 2])


# ---------------------------------------------------------------------------- dataset_reset

def test_dataset_reset_statistics():
  rng = np.random.default_rng(123)
  P = 4000
  prompts = [[1, 2, i % 7 + 3] for i in range(P)]
  pref = [list(range(10, 10 + (i % 5) + 1)) for i in range(P)]  # lengths 1..5
  starts, hs, keys = tt.dataset_reset_prompts(prompts, pref, p_reset=0.3, rng=rng)
  hs = np.asarray(hs)
  assert abs((hs >= 0).mean() - 0.3) < 0.03
  for i in range(P):
    L = len(pref[i])
    assert -1 <= hs[i] <= L - 1
    h = max(hs[i], 0)
    assert starts[i] == prompts[i] + pref[i][:h]
    assert keys[i] == (i, int(hs[i]))
  # h ~ Uniform{0..4} for the length-5 responses
  h5 = hs[(np.arange(P) % 5 == 4) & (hs >= 0)]
  counts = np.bincount(h5, minlength=5)
  assert counts.min() > 0.6 * counts.mean()
  # deterministic given the rng; p_reset edge cases; empty y_w never resets
  a = tt.dataset_reset_prompts(prompts[:50], pref[:50], rng=np.random.default_rng(1))
  b = tt.dataset_reset_prompts(prompts[:50], pref[:50], rng=np.random.default_rng(1))
  assert a == b
  _, h0, _ = tt.dataset_reset_prompts(prompts[:50], pref[:50], p_reset=0.0, rng=rng)
  _, h1, _ = tt.dataset_reset_prompts(prompts[:50], [[]] * 50, p_reset=1.0, rng=rng)
  assert set(h0) == {-1} and set(h1) == {-1}
  _, h2, _ = tt.dataset_reset_prompts(prompts[:50], pref[:50], p_reset=1.0, rng=rng)
  assert min(h2) >= 0
  with pytest.raises(ValueError):
    tt.dataset_reset_prompts(prompts[:2], pref[:1], rng=rng)
  with pytest.raises(ValueError):
    tt.dataset_reset_prompts(prompts[:2], pref[:2], p_reset=1.5, rng=rng)


# ---------------------------------------------------------------------------- generation

def test_best_of_n_generate_end_to_end():
  model = init_model(get_preset("tiny", vocab_size=64, init_std=0.5), 0)
  sampler = Sampler(model, pad_id=0)
  prompts = [[1, 2, 3, 4, 5], [7, 8]]
  cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, n=1, seed=3)
  calls = []

  def score_fn(prompt_index, completions):  # 2 members: count of token 5, count of even tokens
    calls.append(list(prompt_index))
    a = [c.count(5) + 0.1 * c.count(6) for c in completions]
    b = [sum(t % 2 == 0 for t in c) for c in completions]
    return np.array([a, b], np.float32).reshape(2, len(prompts), -1)

  out = tt.best_of_n_generate(sampler, prompts, cfg, score_fn, n=6)
  assert calls == [[0] * 6 + [1] * 6]
  comps = out.samples.completions()
  assert len(comps) == 12 and out.rewards.shape == (2, 2, 6) and out.score.shape == (2, 6)
  ref_idx, _ = _np_best(out.rewards, "mean")
  np.testing.assert_array_equal(out.index, ref_idx)
  assert out.completions == [comps[b * 6 + int(ref_idx[b])] for b in range(2)]
  # [B*N] output, "min" aggregate, and the same samples for the same seed
  flat = lambda pi, cs: np.array([c.count(5) for c in cs], np.float32)
  out2 = tt.best_of_n_generate(sampler, prompts, cfg, flat, n=6, aggregate="min")
  assert out2.samples.completions() == comps
  r = np.array([c.count(5) for c in comps]).reshape(2, 6)
  np.testing.assert_array_equal(out2.index, r.argmax(-1))
  with pytest.raises(ValueError, match="score_fn"):
    tt.best_of_n_generate(sampler, prompts, cfg, lambda pi, cs: np.zeros((3, 5)), n=6)
