"""Over-optimisation measurements (METHODS 6.14, 6.15, 6.18), the ensemble combinator, the
letters task's ground-truth reward, and the RL trainer's monitor rewards and curve rows."""

import itertools
import json
import math
import os

import numpy as np
import pytest

from alignjax import configlib
from alignjax.data import synthetic
from alignjax.evaluation import overopt as O
from alignjax.losses import ensemble
from alignjax.rewards import registry as reward_registry
from alignjax.rewards import shaping
from alignjax.trainers import rl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- best-of-N

def _brute_bon(proxy, gold, big_n, perm):
  """Mean over prompts of the mean over all N-subsets of the gold score of the subset's
  proxy-best sample; ties go to the sample placed later by `perm` (as bon_curve's seeded
  tie-break)."""
  vals = []
  for row, (p, g) in enumerate(zip(proxy, gold)):
    pos = {j: k for k, j in enumerate(perm[row])}
    subs = [g[max(s, key=lambda j: (p[j], pos[j]))]
            for s in itertools.combinations(range(len(p)), big_n)]
    vals.append(np.mean(subs))
  return float(np.mean(vals))


def test_bon_curve_equals_subset_enumeration_with_ties():
  rng = np.random.default_rng(0)
  proxy = rng.integers(0, 3, size=(4, 7)).astype(float)   # many ties
  gold = rng.normal(size=(4, 7))
  c = O.bon_curve(proxy, gold, ns=[1, 2, 3, 5, 7], seed=3, extra={"neg": -gold})
  perm_rng = np.random.default_rng(3)
  perm = [perm_rng.permutation(7) for _ in range(4)]
  for i, n in enumerate(c["n"]):
    assert c["gold"][i] == pytest.approx(_brute_bon(proxy, gold, n, perm), abs=1e-12)
    assert c["neg"][i] == pytest.approx(-_brute_bon(proxy, gold, n, perm), abs=1e-12)
    assert c["kl"][i] == pytest.approx(math.log(n) - (n - 1) / n)
  assert c["gold"][0] == pytest.approx(gold.mean())          # N = 1: the policy's mean
  assert c["num_prompts"] == 4 and c["num_dropped"] == 0


def test_bon_curve_nan_rows_dropped_and_defaults():
  proxy = np.array([[0.1, 0.9, 0.5, 0.3], [np.nan, 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0]])
  gold = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [5.0, 6.0, 7.0, 8.0]])
  c = O.bon_curve(proxy, gold)
  assert c["n"] == [1, 2, 4] and c["num_dropped"] == 1 and c["num_prompts"] == 2
  # N = n picks the proxy argmax: gold 2.0 (row 0) and 5.0 (row 2).
  assert c["gold"][-1] == pytest.approx(3.5)
  assert c["proxy"][-1] == pytest.approx((0.9 + 4.0) / 2)
  w = O.bon_weights(6, 3)
  assert w.sum() == pytest.approx(1.0) and w[:2].sum() == 0.0
  np.testing.assert_allclose(w, [math.comb(i - 1, 2) / math.comb(6, 3) for i in range(1, 7)])
  with pytest.raises(ValueError, match="N"):
    O.bon_weights(3, 4)
  with pytest.raises(ValueError, match="shape"):
    O.bon_curve(proxy, gold[:2])


# ---------------------------------------------------------------------------- RL curve

def test_overopt_curve_peak_drop_and_fits():
  rows = [{"step": 10, "kl": 1.0, "proxy": 1.0, "gold": 0.5},
          {"step": 0, "kl": -1e-4, "proxy": 0.0, "gold": 0.0},   # tiny negative KL estimate
          {"step": 20, "kl": 4.0, "proxy": 2.0, "gold": 0.8},
          {"step": 30, "kl": 9.0, "proxy": 3.0, "gold": 0.2}]
  c = O.overopt_curve(rows)
  assert c["steps"] == [0, 10, 20, 30]
  np.testing.assert_allclose(c["sqrt_kl"], [0.0, 1.0, 2.0, 3.0])
  assert c["t_star"] == 20 and c["gold_peak"] == 0.8 and c["gold_drop"] == pytest.approx(0.6)
  # Exact data of the fitted forms is recovered.
  d = np.array([0.5, 1.0, 2.0, 3.0])
  a, b = O.fit_rl(d, d * (1.5 - 0.4 * np.log(d)))
  assert (a, b) == pytest.approx((1.5, 0.4))
  a, b = O.fit_bon(np.r_[0.0, d], np.r_[0.0, d * (2.0 - 0.3 * d)])
  assert (a, b) == pytest.approx((2.0, 0.3))
  assert all(math.isnan(x) for x in O.fit_rl([0.0, 1.0], [0.0, 1.0]))


# ---------------------------------------------------------------------------- collapse

def test_collapse_monitors_by_hand():
  tokens = [[1, 2, 3], [1, 2, 3], [4, 5], [6],          # group 0
            [1, 1, 1, 1, 1], [2, 2], [3], [4, 4, 4]]    # group 1
  lengths = np.array([[3, 3, 2, 1], [5, 2, 1, 3]])
  rewards = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, np.nan, 1.0, np.nan]])
  ent = np.array([[0.3, 0.3, 0.2, 0.1], [1.0, 0.0, 0.0, 0.6]])
  out = O.collapse_monitors(lengths, np.array([[0, 0, 0, 0], [1, 0, 0, 0]]), rewards, tokens,
                            entropy_sum=ent, answers=list("aabcxyzz"))
  assert out["length_mean"] == pytest.approx(20 / 8)
  assert out["length_p95"] == pytest.approx(np.percentile(lengths, 95))
  assert out["truncated_frac"] == pytest.approx(1 / 8)
  assert out["entropy"] == pytest.approx(2.5 / 20)
  # distinct-2: group 0 bigrams (1,2),(2,3),(1,2),(2,3),(4,5): 3/5; group 1: (1,1)x4,(2,2),
  # (4,4)x2: 3/7. distinct-4: group 0 has none; group 1 (1,1,1,1)x2: 1/2.
  assert out["distinct_2"] == pytest.approx((3 / 5 + 3 / 7) / 2)
  assert out["distinct_4"] == pytest.approx(0.5)
  assert out["unique_answers"] == pytest.approx((3 / 4 + 3 / 4) / 2)
  assert out["zero_std_frac"] == pytest.approx(0.5)      # group 0 all equal; group 1 varies
  one = O.collapse_monitors([[2, 2]], [[0, 0]], [[np.nan, 1.0]], [[1], [2]])
  assert one["zero_std_frac"] == 1.0 and "entropy" not in one   # < 2 finite rewards


def test_collapse_alerts():
  hist = [{"step": 0, "entropy": 2.0, "length_mean": 10.0, "zero_std_frac": 0.1},
          {"step": 10, "entropy": 1.2, "length_mean": 11.0, "zero_std_frac": 0.5},
          {"step": 20, "entropy": 0.9, "length_mean": 20.0, "zero_std_frac": 0.9},
          {"step": 90, "entropy": 1.5, "length_mean": 20.0, "zero_std_frac": 0.2}]
  al = {a["step"]: a["alerts"] for a in O.collapse_alerts(hist, window=50)}
  assert al[0] == [] and al[10] == []
  assert len(al[20]) == 3 and "entropy" in al[20][0] and "length" in al[20][1]
  assert al[90] == []       # the window holds no earlier row; entropy 1.5 >= 0.5 x 2.0


# ---------------------------------------------------------------------------- combinator

@pytest.mark.parametrize("mode", shaping.ENSEMBLE_MODES)
def test_ensemble_aggregate(mode):
  rng = np.random.default_rng(1)
  R = rng.normal(size=(6, 4)).astype(np.float32)
  R[1] = R[1, 0]                               # tie: all members agree
  got = np.asarray(shaping.ensemble_aggregate(R, mode=mode, lam=0.7))
  np.testing.assert_allclose(got, ensemble.aggregate(R.T, mode, 0.7), rtol=1e-6, atol=1e-6)
  R[2, 1], R[3] = np.nan, np.nan               # NaN members are skipped; all-NaN -> NaN
  got = np.asarray(shaping.ensemble_aggregate(R, mode=mode, lam=0.7))
  row = R[2, [0, 2, 3]].astype(np.float64)
  want = {"mean": row.mean(), "median": np.median(row), "min": row.min(),
          "mean_minus_std": row.mean() - 0.7 * row.std()}[mode]
  assert got[2] == pytest.approx(want, rel=1e-5) and np.isnan(got[3])
  single = np.asarray(shaping.ensemble_aggregate(R[:, :1], mode=mode))   # E = 1: the member
  np.testing.assert_allclose(single[~np.isnan(R[:, 0])], R[~np.isnan(R[:, 0]), 0], rtol=1e-6)
  with pytest.raises(ValueError, match="mode"):
    shaping.parse_transforms([{"name": "ensemble_aggregate", "params": {"mode": "max"}}])


def test_letters_score_and_sft_records():
  spec = reward_registry.make_spec("letters_score")
  assert spec(["kbqe=", "abcd="], ["xkaeb", "aaaa"], {}) == [3.0, 1.0]
  src = synthetic.PreferenceSource(0, "train", kind="sft")
  rec = src[5]
  assert set(rec) == {"prompt", "completion", "score"}
  assert rec["score"] == synthetic.true_score(rec["prompt"], rec["completion"])
  assert 4 <= len(rec["completion"]) <= 8
  scores = [src[i]["score"] for i in range(400)]
  assert set(scores) == {0.0, 1.0, 2.0, 3.0, 4.0}
  with pytest.raises(ValueError, match="length_bias"):
    synthetic.PreferenceSource(0, "train", kind="sft", length_bias=True)


# ---------------------------------------------------------------------------- RL curve rows

def _letters_rl(tmp, steps):
  c = configlib.load_config_file(os.path.join(REPO, "configs", "overoptimization.py"),
                                 f"rl_steps={steps},prompts=4,group=4,curve_every=1")
  r = c.rl
  r.model.checkpoint = ""
  r.train.progress_bar = False
  r.rl.rewards = "letters_score"
  r.rl.monitor_rewards = [{"name": "letters_score", "alias": "gold"}]
  r.rl.curve_prompts = 3
  r.rl.curve_samples = 2
  r.rl.max_new_tokens = 4
  r.checkpoint.every = 1
  return r


def test_rl_monitors_and_curve_rows_resume(tmp_path):
  """Curve rows at steps 0, 1, 2 across a resume (no duplicates, none lost); 6 curve rows on
  8 devices exercise the row padding; a monitor equal to the reward gives the same numbers."""
  rl.RLTrainer(_letters_rl(tmp_path, 1), str(tmp_path)).run()
  with open(tmp_path / "curve.jsonl") as f:
    assert [json.loads(x)["step"] for x in f] == [0, 1]
  rows = rl.RLTrainer(_letters_rl(tmp_path, 2), str(tmp_path)).run()["curve"]
  assert [r["step"] for r in rows] == [0, 1, 2]
  with open(tmp_path / "curve.jsonl") as f:
    assert [json.loads(x)["step"] for x in f] == [0, 1, 2]
  assert rows[0]["kl"] == 0.0                        # pi_0 = pi_ref
  assert rows[2]["kl"] != 0.0
  for r in rows:
    assert r["monitor/gold"] == r["reward/letters_score"] == r["reward"]
    assert 0.0 <= r["distinct_2"] <= 1.0 and r["entropy"] > 0
  bad = _letters_rl(tmp_path, 1)
  bad.rl.monitor_rewards = "no_such_reward"
  with pytest.raises(ValueError, match="rl.monitor_rewards"):
    rl.check_config(bad)
