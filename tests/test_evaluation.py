"""alignjax.evaluation: metrics against hand-computed values and brute-force loops; reports."""

import json
import math
import os

import numpy as np
import pytest

from alignjax import evaluation as ev


def _nan(x):
  return isinstance(x, float) and math.isnan(x)


# ------------------------------------------------------------------- 6.1 pairwise

def test_wilson_known_values():
  lo, hi = ev.wilson_ci(8, 10)
  assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
  assert ev.wilson_ci(0, 10)[0] == 0.0 and ev.wilson_ci(10, 10)[1] == pytest.approx(1.0)
  assert all(_nan(x) for x in ev.wilson_ci(0, 0))


def test_pairwise_ties_nan_groups():
  r_c = np.array([2.0, 1.0, 1.0, np.nan, 3.0, 0.0])
  r_r = np.array([1.0, 1.0, 2.0, 0.0, np.nan, -1.0])
  g = np.array(["a", "a", "b", "b", "b", "a"])
  res = ev.pairwise_acc(r_c, r_r, groups=g)
  assert res["n"] == 6 and res["n_nan"] == 2 and res["n_ties"] == 1
  assert res["accuracy"] == pytest.approx(2 / 6)
  assert ev.pairwise_acc(r_c, r_r, tie_value=0.5)["accuracy"] == pytest.approx(2.5 / 6)
  assert res["groups"]["a"]["accuracy"] == pytest.approx(2 / 3)
  assert res["groups"]["b"]["n"] == 3 and res["groups"]["b"]["n_nan"] == 2
  assert res["groups"]["b"]["accuracy"] == 0.0
  lo, hi = ev.wilson_ci(2, 6)
  assert (res["ci_lo"], res["ci_hi"]) == (lo, hi)
  # integer ids become string keys
  assert set(ev.pairwise_acc(r_c, r_r, groups=[1, 1, 2, 2, 2, 1])["groups"]) == {"1", "2"}


def test_pairwise_vs_loop():
  rng = np.random.default_rng(0)
  r_c, r_r = rng.integers(0, 4, 300).astype(float), rng.integers(0, 4, 300).astype(float)
  r_c[::17] = np.nan
  hits = [1.0 if c > r else (0.5 if c == r else 0.0) for c, r in zip(r_c, r_r)]
  res = ev.pairwise_acc(r_c, r_r, tie_value=0.5)
  assert res["accuracy"] == pytest.approx(sum(hits) / 300)
  assert res["n_nan"] == len(r_c[::17])


def test_empty_is_nan():
  res = ev.pairwise_acc([], [])
  assert res["n"] == 0 and _nan(res["accuracy"]) and _nan(res["ci_lo"])
  assert _nan(ev.best_of_k_acc(np.zeros(0), np.zeros((0, 3)))["accuracy"])
  assert _nan(ev.one_vs_many_mrr(np.zeros(0), np.zeros((0, 3)))["mrr"])
  assert _nan(ev.ece([], [])["ece"])
  assert _nan(ev.fit_temperature([], [])["tau"])
  assert _nan(ev.contrast_consistency(np.zeros((0, 2, 2)))["per_example"])
  assert _nan(ev.filler_delta([], [])["mean_delta"])
  assert _nan(ev.offtopic_long_rate([], [])["rate"])
  assert _nan(ev.length_slope(np.zeros((2, 2)), np.ones((2, 2)))["mean"])  # K < 3
  assert _nan(ev.kendall_tau(np.zeros((0, 4)), np.zeros((0, 4)))["mean"])
  assert ev.reward_histogram([np.nan])["n"] == 0


def test_rb_score_sections():
  subsets = {"s1": {"accuracy": 1.0, "n": 10}, "s2": {"accuracy": 0.5, "n": 30},
             "s3": {"accuracy": 0.2, "n": 5}, "s4": {"accuracy": math.nan, "n": 0}}
  secs = {"A": ["s1", "s2"], "B": ["s3", "s4"], "C": ["zz"]}
  res = ev.rb_score(subsets, secs)
  assert res["sections"]["A"]["score"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)
  assert res["sections"]["B"]["score"] == pytest.approx(0.2)
  assert res["sections"]["B"]["missing"] == ["s4"]
  assert _nan(res["sections"]["C"]["score"]) and _nan(res["score"])
  assert res["score_available"] == pytest.approx((0.625 + 0.2) / 2)
  assert res["n"] == 45
  res = ev.rb_score(subsets, {"A": ["s1", "s2"], "B": ["s3"]}, counts={"s1": 30, "s2": 10})
  assert res["sections"]["A"]["score"] == pytest.approx((30 + 5) / 40)
  assert res["score"] == pytest.approx(((35 / 40) + 0.2) / 2)
  # the RewardBench constants: math weighs as much as all code subsets together
  code = [s for s in ev.REWARDBENCH_SECTIONS["Reasoning"] if s.startswith("hep")]
  assert ev.REWARDBENCH_COUNTS["math-prm"] == sum(ev.REWARDBENCH_COUNTS[s] for s in code)
  accs = {s: 1.0 if s == "math-prm" else 0.0 for s in ev.REWARDBENCH_COUNTS}
  res = ev.rb_score(accs, counts=ev.REWARDBENCH_COUNTS)
  assert res["sections"]["Reasoning"]["score"] == pytest.approx(0.5)
  assert res["score"] == pytest.approx(0.125)


# ------------------------------------------------------------------ 6.2 / 6.3

def test_best_of_k_masks_and_loop():
  r_pos = np.array([1.0, 1.0, 1.0, 1.0, np.nan])
  r_neg = np.array([[0.0, 2.0], [0.0, 1.0], [0.0, 2.0], [np.nan, 0.0], [0.0, 0.0]])
  mask = np.array([[1, 1], [1, 1], [1, 0], [0, 1], [1, 1]], bool)
  res = ev.best_of_k_acc(r_pos, r_neg, mask)
  # row0 beaten, row1 tie (miss), row2 masked 2.0 -> hit, row3 masked NaN -> hit, row4 NaN
  assert res["n_correct"] == 2 and res["n"] == 5 and res["n_nan"] == 1
  assert res["chance"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1 / 2, 1 / 2, 1 / 3]))
  rng = np.random.default_rng(1)
  p, n = rng.integers(0, 5, 200).astype(float), rng.integers(0, 5, (200, 3)).astype(float)
  m = rng.random((200, 3)) > 0.3
  want = np.mean([all(p[i] > n[i, j] for j in range(3) if m[i, j]) for i in range(200)])
  assert ev.best_of_k_acc(p, n, m)["accuracy"] == pytest.approx(want)
  g = ev.best_of_k_acc(p, n, m, groups=np.arange(200) % 2)
  assert g["mean_over_groups"] == pytest.approx(
      np.mean([g["groups"]["0"]["accuracy"], g["groups"]["1"]["accuracy"]]))


def test_mrr_pessimistic_ties():
  r_pos = np.array([1.0, 1.0, 1.0, np.nan])
  r_neg = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  res = ev.one_vs_many_mrr(r_pos, r_neg)
  # ranks 1, 2 (tie pessimistic), 3, 4 (NaN positive = worst)
  assert res["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
  assert res["acc_all"] == 0.25 and res["mean_rank"] == 2.5 and res["n_nan"] == 1
  rng = np.random.default_rng(2)
  p, n = rng.integers(0, 6, 100).astype(float), rng.integers(0, 6, (100, 9)).astype(float)
  ranks = [1 + sum(n[i, j] >= p[i] for j in range(9)) for i in range(100)]
  assert ev.one_vs_many_mrr(p, n)["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))


# ---------------------------------------------------------------------- 6.4

def test_by_language():
  lang = ["en"] * 4 + ["de"] * 4 + ["fr"] * 2
  cat = ["chat", "chat", "safety", "safety"] * 2 + ["chat", "chat"]
  ids = [0, 1, 2, 3, 0, 1, 2, 3, 0, 9]
  r_c = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 1.0])
  r_r = np.zeros(10)
  res = ev.by_language(r_c, r_r, lang, cat, ids, min_n=2)
  en, de, fr = (res["languages"][k] for k in ("en", "de", "fr"))
  assert en["macro"] == pytest.approx((1.0 + 0.5) / 2)
  assert de["macro"] == pytest.approx((0.5 + 0.0) / 2)
  assert fr["macro"] == pytest.approx(0.5)
  assert res["gap_en"] == pytest.approx(0.75 - (0.25 + 0.5) / 2)
  # en hits 1,1,1,0; de hits 1,0,0,0 -> flips on ids 1, 2; fr aligned only id 0 (flip)
  assert de["flip_rate"] == pytest.approx(0.5) and de["n_aligned"] == 4
  assert fr["flip_rate"] == 1.0 and fr["n_aligned"] == 1
  assert res["low_n"] == [] and fr["low_n_aligned"]
  assert ev.by_language(r_c, r_r, lang, cat)["low_n"]  # default min_n = 30
  assert _nan(ev.by_language(r_c, r_r, ["de"] * 10, cat)["gap_en"])


# ---------------------------------------------------------------------- 6.6

def _ece_loop(d, bins=10):
  conf = [1 / (1 + math.exp(-abs(x))) for x in d]
  hit = [1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in d]
  tot = 0.0
  for b in range(bins):
    lo, hi = 0.5 + b * 0.5 / bins, 0.5 + (b + 1) * 0.5 / bins
    idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == hi)]
    if idx:
      acc, cf = np.mean([hit[i] for i in idx]), np.mean([conf[i] for i in idx])
      tot += len(idx) / len(d) * abs(acc - cf)
  return tot


def test_ece_calibrated_overconfident_and_loop():
  rng = np.random.default_rng(3)
  s = rng.normal(0, 2, 100_000)
  first_wins = rng.random(s.size) < 1 / (1 + np.exp(-s))
  d = np.where(first_wins, s, -s)  # the chosen response wins with probability sig(d)
  cal = ev.ece(d, np.zeros_like(d))
  assert cal["ece"] < 0.01 and cal["n"] == s.size
  first_wins = rng.random(s.size) < 1 / (1 + np.exp(-s / 4))  # scores 4x over-confident
  d_over = np.where(first_wins, s, -s)
  over = ev.ece(d_over, np.zeros_like(d))
  assert over["ece"] > 0.1
  assert sum(r["n"] for r in over["rows"]) == over["n"]
  fit = ev.fit_temperature(d_over, np.zeros_like(d))
  assert fit["tau"] == pytest.approx(4.0, rel=0.1) and fit["nll"] < fit["nll_at_1"]
  assert ev.ece(d_over, 0 * d, tau=fit["tau"])["ece"] < 0.02
  small = rng.normal(0, 2, 300)
  small[:5] = 0.0
  small[5] = np.nan
  res = ev.ece(small, np.zeros(300))
  assert res["n_nan"] == 1 and res["n"] == 299
  assert res["ece"] == pytest.approx(_ece_loop(small[~np.isnan(small)]))
  rows = ev.reliability(small, np.zeros(300), bins=5)
  assert len(rows) == 5 and sum(r["n"] for r in rows) == 299
  assert rows[0]["lo"] == 0.5 and rows[-1]["hi"] == 1.0


# ---------------------------------------------------------------------- 6.7

def test_contrast_consistency_counts():
  S = np.array([
      [[2, 1], [1, 2]],  # instruction pass both, response pass both
      [[2, 1], [3, 2]],  # instr: 2>1, 2>3 no; response: 2>3 no, 2>1 yes
      [[1, 1], [0, 2]],  # instr: tie fails, 2>0 yes; response: 1>0 yes, 2>1 yes
      [[np.nan, 0], [0, 1]],  # NaN fails
  ], float)
  res = ev.contrast_consistency(S)
  assert res["n"] == 4 and res["n_comparisons"] == 8 and res["n_nan"] == 1
  assert res["n_pass_example"] == 1 and res["per_example"] == 0.25
  assert res["n_pass_comparison"] == 5 and res["per_comparison"] == 5 / 8
  assert res["response_per_example"] == 0.5 and res["response_per_comparison"] == 6 / 8


# ---------------------------------------------------------------------- 6.8

def test_derangement_respects_ratio():
  rng = np.random.default_rng(4)
  L = rng.integers(1, 200, 500).astype(float)
  pairs = ev.derangement_pairs(L, rng)
  for i, j in enumerate(pairs):
    exists = any(L[k] >= 2 * L[i] for k in range(500) if k != i)
    assert (j >= 0) == exists
    if j >= 0:
      assert j != i and L[j] >= 2 * L[i]
  assert len(set(pairs[L == L.min()].tolist())) > 1  # random partners
  z = ev.derangement_pairs([0.0, 0.0, 5.0], 0)  # zero length: every other answer qualifies
  assert z[0] in (1, 2) and z[1] in (0, 2) and z[2] == -1
  assert (ev.derangement_pairs([3.0, 3.0, 3.0], 0, min_ratio=1.0) != [0, 1, 2]).all()


def _probe(kind, rng, B=300, P=80, K=6):
  """The three probes for a synthetic RM: 'length' (r = length), 'quality' (r = quality of
  the answer to its own prompt, off-topic answers poor, length irrelevant), 'noise'."""
  L = np.exp(rng.uniform(np.log(10), np.log(1000), B))
  q = rng.normal(size=B)
  pairs = ev.derangement_pairs(L, rng)
  j = np.where(pairs >= 0, pairs, 0)
  Lk, qk = np.exp(rng.uniform(np.log(10), np.log(1000), (P, K))), rng.normal(size=(P, K))
  if kind == "length":
    own, other, rew, orig, fill = L, L[j], Lk, L, 1.5 * L
  elif kind == "quality":
    own, other, rew, orig, fill = q, q[j] - 3.0, qk, q, q
  else:
    own, other, rew, orig, fill = (rng.normal(size=B), rng.normal(size=B),
                                   rng.normal(size=(P, K)), rng.normal(size=B),
                                   rng.normal(size=B))
  return ev.length_bias_probe(r_own=own, r_other=other, pairs=pairs, rewards=rew,
                              lengths=Lk, r_orig=orig, r_filler=fill)


def test_length_bias_flag():
  rng = np.random.default_rng(5)
  biased = _probe("length", rng)
  assert biased["flag"]["flag"] and biased["flag"]["offtopic"] and biased["flag"]["slope"]
  assert biased["flag"]["filler"] and len(biased["flag"]["reasons"]) == 3
  assert biased["offtopic"]["rate"] == 1.0 and biased["slope"]["frac_positive"] == 1.0
  for kind in ("quality", "noise"):
    res = _probe(kind, rng)
    assert not res["flag"]["flag"], (kind, res["flag"])
  assert ev.length_bias_flag()["flag"] is False  # nothing run, nothing flagged


def test_length_probes_vs_loops():
  rng = np.random.default_rng(6)
  r, L = rng.normal(size=(5, 4)), rng.integers(1, 50, (5, 4)).astype(float)
  mask = np.ones((5, 4), bool)
  mask[0, :2] = False  # 2 valid samples: skipped
  L[1] = 7.0  # constant length: skipped
  res = ev.length_slope(r, L, mask)
  for p in range(2, 5):
    x = np.log(L[p])
    assert res["slopes"][p] == pytest.approx(np.polyfit(x, r[p], 1)[0])
  assert res["n"] == 3 and res["n_skipped"] == 2 and np.isnan(res["slopes"][:2]).all()
  assert res["mean"] == pytest.approx(np.mean(res["slopes"][2:]))
  o = ev.offtopic_long_rate([1.0, 1.0, 1.0, np.nan, 0.0], [2.0, 1.0, 0.0, 5.0, 9.0],
                            pairs=[3, 4, 0, 1, -1])
  assert o["rate"] == pytest.approx(1 / 3) and o["n"] == 3 and o["n_nan"] == 1
  assert o["n_unpaired"] == 1
  f = ev.filler_delta([0.0, 1.0, 2.0, np.nan], [1.0, 1.0, 4.0, 0.0])
  assert f["mean_delta"] == pytest.approx(1.0) and f["frac_increased"] == pytest.approx(2 / 3)
  assert f["n"] == 3 and f["n_nan"] == 1


# ---------------------------------------------------------------------- 6.12

def _tau_b_loop(a, b):
  K = len(a)
  s = n1 = n2 = 0
  for i in range(K):
    for j in range(i + 1, K):
      sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
      s += sa * sb
      n1 += sa == 0
      n2 += sb == 0
  n0 = K * (K - 1) / 2
  den = math.sqrt((n0 - n1) * (n0 - n2))
  return s / den if den else math.nan


def test_kendall_tau():
  assert ev.kendall_tau([1, 2, 3], [1, 3, 2])["tau"] == pytest.approx(1 / 3)
  assert ev.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1])["tau"] == pytest.approx(-1.0)
  rng = np.random.default_rng(7)
  a, b = rng.integers(0, 3, (40, 6)).astype(float), rng.integers(0, 4, (40, 6)).astype(float)
  a[0] = 1.0  # constant row
  b[1, 2] = np.nan
  res = ev.kendall_tau(a, b)
  want = np.array([_tau_b_loop(x, y) for x, y in zip(a, b)])
  assert np.allclose(res["tau"], want, equal_nan=True)
  assert res["n"] == 40 and res["n_constant"] >= 1 and res["n_nan"] == 1
  assert res["n_valid"] == int(np.isfinite(want).sum())
  assert res["mean"] == pytest.approx(np.nanmean(want))
  assert _nan(ev.kendall_tau([2, 2, 2], [1, 2, 3])["tau"])


def test_reward_histogram():
  h = ev.reward_histogram([0.0, 0.5, 1.0, np.nan, np.inf], bins=2)
  assert h["counts"].tolist() == [1, 2] and h["n"] == 3 and h["n_nan"] == 2
  assert h["mean"] == pytest.approx(0.5)


# ---------------------------------------------------------------------- reports

def _results(seed=0, shift=1.0):
  rng = np.random.default_rng(seed)
  r_c, r_r = rng.normal(shift, 1, 120), rng.normal(0, 1, 120)
  subsets = np.array(["alpacaeval-easy", "mt-bench-hard", "donotanswer", "custom"])[
      np.arange(120) % 4]
  pw = ev.pairwise_acc(r_c, r_r, groups=subsets)
  L = rng.integers(5, 300, 120).astype(float)
  rew, lens = rng.normal(size=(10, 5)), rng.integers(5, 300, (10, 5))
  res = {"meta": {"checkpoint": f"ckpt_{seed}"}, "pairwise": pw,
         "rb_score": ev.rb_score(pw["groups"]), "ece": ev.ece(r_c, r_r),
         "best_of_k": ev.best_of_k_acc(r_c, rng.normal(size=(120, 3))),
         "contrast": ev.contrast_consistency(rng.normal(size=(20, 2, 2))),
         "length_bias": ev.length_bias_probe(
             r_own=r_c, r_other=r_r, pairs=ev.derangement_pairs(L, 0), rewards=rew,
             lengths=lens, r_orig=r_c, r_filler=r_c + 0.1),
         "kendall_tau": ev.kendall_tau(rew, lens)}
  plots = {"histogram": {"chosen": r_c, "rejected": r_r},
           "length": {"rewards": rew, "lengths": lens}}
  return res, plots


def _no_nan(s):
  def bad(c):
    raise ValueError(c)
  return json.loads(s, parse_constant=bad)


def test_write_report(tmp_path):
  import matplotlib.image as mpimg
  res, plots = _results()
  paths = ev.write_report(res, str(tmp_path), name="eval", plots=plots)
  doc = _no_nan((tmp_path / "eval.json").read_text())
  assert doc["results"]["rb_score"]["score"] is None  # NaN (Reasoning missing) -> null
  assert doc["results"]["rb_score"]["sections"]["Chat"]["score"] is not None
  assert doc["results"]["pairwise"]["accuracy"] == pytest.approx(res["pairwise"]["accuracy"])
  assert doc["headline"]["pairwise accuracy"]["n"] == 120
  md = (tmp_path / "eval.md").read_text()
  assert f"{res['pairwise']['accuracy']:.3f}" in md and f"{res['ece']['ece']:.3f}" in md
  assert "Length bias" in md and "Kendall" in md and "mt-bench-hard" in md
  assert set(paths["plots"]) == {"histogram", "length", "reliability", "subsets"}
  for p in paths["plots"].values():
    assert os.path.getsize(p) > 1000 and os.path.basename(p) in md
    img = mpimg.imread(p)
    assert img.ndim == 3 and img.shape[0] > 100
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
  with pytest.raises(ValueError):
    ev.write_report(res, str(tmp_path), plots={"bogus": 1})


def test_write_false_writes_nothing(tmp_path):
  res, plots = _results()
  assert ev.write_report(res, str(tmp_path / "x"), plots=plots, write=False) is None
  assert ev.compare_report([("a", res)], str(tmp_path / "x"), write=False) is None
  assert not (tmp_path / "x").exists()


def test_compare_report(tmp_path):
  runs = [("step_100", _results(0, 0.5)[0]), ("step_200", _results(1, 1.5)[0])]
  paths = ev.compare_report(runs, str(tmp_path))
  doc = _no_nan(open(paths["json"]).read())
  assert [r["label"] for r in doc["runs"]] == ["step_100", "step_200"]
  assert "pairwise accuracy" in doc["metrics"]
  md = open(paths["markdown"]).read()
  for label, r in runs:
    assert label in md and f"{r['pairwise']['accuracy']:.3f}" in md
  assert os.path.getsize(paths["plot"]) > 1000


def test_ranking_accuracy_idealized_and_gap():
  """METHODS 6.10 on hand-made numbers: RA, its per-token form, IRA and the gap."""
  lp_w, lp_l = np.array([-10.0, -20.0, -5.0, -8.0]), np.array([-12.0, -15.0, -5.0, -9.0])
  n_w, n_l = np.array([2, 10, 1, 4]), np.array([6, 3, 1, 1])
  ra = ev.ranking_acc(lp_w, lp_l, n_w, n_l)
  assert ra["accuracy"] == 0.5 and ra["n_ties"] == 1                 # rows 0, 3
  assert ra["accuracy_norm"] == 0.5           # per token: rows 1 (-2 > -5) and 3 (-2 > -9)
  ref_w, ref_l = np.array([-11.0, -19.0, -6.0, -7.0]), np.array([-10.0, -16.0, -5.0, -9.0])
  # log(.9/.1)/.1 = 21.97: every margin of at least -21 is ideal; alpha .5 leaves ref's own.
  assert ev.idealized_ranking_acc(ref_w, ref_l, 0.9, beta=0.1)["accuracy"] == 1.0
  assert ev.idealized_ranking_acc(ref_w, ref_l, 0.5, beta=0.1)["accuracy"] == 0.25
  alpha = np.array([0.5, 0.5, 0.9, 1.0])  # 1.0 is clipped to 1 - 1e-3
  ira = ev.idealized_ranking_acc(ref_w, ref_l, alpha, beta=1.0)["accuracy"]
  assert ira == 0.5                                                   # rows 2 (-1+2.2), 3
  gap = ev.alignment_gap(lp_w, lp_l, ref_w, ref_l, alpha, beta=1.0)
  assert gap["gap"] == 0.0 and gap["n"] == 4
  assert ev.alignment_gap(lp_w, lp_l, ref_w, ref_l, 0.9, beta=0.1)["gap"] == 0.5
