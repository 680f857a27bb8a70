"""Reward-model evaluation metrics (METHODS.md section 6): pure numpy functions on
precomputed scores; no model calls.

Conventions. Inputs are array-likes, converted to float64. Every function returns a dict
of Python scalars (plus a few per-row numpy arrays) that includes `n`; an empty input or
group gives NaN, never an exception. NaN rewards are tallied in `n_nan`: in accuracies
(6.1-6.3, 6.7) they count as misses, in the probes (6.6, 6.8) they are left out.
Accuracies carry a Wilson 95% interval (`ci_lo`, `ci_hi`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054

# RewardBench (allenai/reward-bench, rewardbench/constants.py): section -> subsets and the
# per-subset weights used by its scoring code (math-prm is up-weighted from its real 447
# items to 984, the total of the six hep-* code subsets, so math and code weigh the same).
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
             "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor",
                  "llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
               "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python",
                  "hep-rust"],
}
REWARDBENCH_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984,
    "refusals-dangerous": 100, "refusals-offensive": 100, "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 250, "xstest-should-respond": 154,
    "donotanswer": 136, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164,
    "hep-python": 164, "hep-rust": 164,
}


# ---------------------------------------------------------------------------- helpers

def _arr(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def wilson_ci(k: float, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval for a proportion k/n (k may be fractional with 0.5 ties):
  `(p + z^2/2n -/+ z*sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`. n = 0 -> (NaN, NaN)."""
  if n <= 0:
    return math.nan, math.nan
  p = k / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def _rate(hits: np.ndarray, n_nan: int = 0, **extra) -> dict:
  """Mean of per-example scores in [0, 1] with a Wilson interval."""
  n = int(hits.size)
  k = float(hits.sum())
  lo, hi = wilson_ci(k, n)
  return {"accuracy": k / n if n else math.nan, "ci_lo": lo, "ci_hi": hi, "n": n,
          "n_correct": k, "n_nan": int(n_nan), **extra}


def _group_order(groups: np.ndarray) -> list:
  """Distinct group values in order of first appearance."""
  _, idx = np.unique(groups, return_index=True)
  return [groups[i] for i in np.sort(idx)]


def _key(g) -> str:
  return str(g.item() if hasattr(g, "item") else g)


def _by_group(fn, groups, *arrays) -> dict:
  """{str(group): fn(*arrays restricted to the group)}."""
  groups = np.asarray(groups)
  return {_key(g): fn(*(a[groups == g] for a in arrays)) for g in _group_order(groups)}


def _mean_sd(x: np.ndarray) -> dict:
  """mean, sample sd, standard error and t = mean / se of finite values (t = +-inf when
  sd = 0 and mean != 0; NaN when n < 2)."""
  n = int(x.size)
  mean = float(x.mean()) if n else math.nan
  sd = float(x.std(ddof=1)) if n > 1 else math.nan
  se = sd / math.sqrt(n) if n > 1 else math.nan
  if n < 2:
    t = math.nan
  elif se > 0:
    t = mean / se
  else:
    t = math.copysign(math.inf, mean) if mean != 0 else math.nan
  return {"mean": mean, "sd": sd, "se": se, "t": t}


# ---------------------------------------------------------------- 6.1 pairwise accuracy

def pairwise_acc(r_c, r_r, *, tie_value: float = 0.0, groups=None) -> dict:
  """Pairwise preference accuracy (METHODS 6.1 `eval.pairwise_acc`, standard; RewardBench:
  Evaluating Reward Models for Language Modeling).

  `hit_i = 1[r_c > r_r] + tie_value * 1[r_c == r_r]`; accuracy = mean hit with a Wilson
  95% CI. A NaN reward on either side is a miss, tallied in `n_nan`.
  r_c, r_r: [B]. groups: optional [B] subset names or ids.
  Returns {accuracy, ci_lo, ci_hi, n, n_correct, n_ties, n_nan}; with `groups` also
  `groups: {str(group): same dict}`.
  """
  r_c, r_r = _arr(r_c).ravel(), _arr(r_r).ravel()
  if r_c.shape != r_r.shape:
    raise ValueError(f"r_c {r_c.shape} and r_r {r_r.shape} differ")

  def one(c, r):
    tie = c == r
    hits = np.where(c > r, 1.0, np.where(tie, tie_value, 0.0))  # NaN compares False
    return _rate(hits, int((np.isnan(c) | np.isnan(r)).sum()), n_ties=int(tie.sum()))

  out = one(r_c, r_r)
  if groups is not None:
    out["groups"] = _by_group(one, groups, r_c, r_r)
  return out


def ranking_acc(lp_w, lp_l, n_w=None, n_l=None) -> dict:
  """Ranking accuracy of a policy on preference pairs (METHODS 6.10 `eval.ranking_acc`;
  *Preference Learning Algorithms Do Not Learn Preference Rankings*).

  `RA = mean 1[lp(y_w|x) > lp(y_l|x)]` on summed response log-probs (ties miss); with the
  lengths n_w, n_l also `accuracy_norm` on per-token means lp / n (n clamped to >= 1).
  lp_w, lp_l, n_w, n_l: [B]. Returns pairwise_acc's dict (+ accuracy_norm).
  """
  out = pairwise_acc(lp_w, lp_l)
  if n_w is not None and n_l is not None:
    out["accuracy_norm"] = pairwise_acc(_arr(lp_w) / np.maximum(_arr(n_w), 1.0),
                                        _arr(lp_l) / np.maximum(_arr(n_l), 1.0))["accuracy"]
  return out


def idealized_ranking_acc(ref_w, ref_l, alpha, *, beta: float) -> dict:
  """Idealized ranking accuracy (METHODS 6.10 `eval.idealized_ranking_acc`): the ranking
  accuracy of the DPO/RLHF optimum, whose log-ratio is
  `lp_ref(y_w) - lp_ref(y_l) + log(alpha / (1 - alpha)) / beta`, with alpha the true
  preference probability (scalar or [B], clipped to [1e-3, 1 - 1e-3]) and beta the training
  beta. ref_w, ref_l: [B] summed reference log-probs. Returns pairwise_acc's dict.
  """
  ref_w, ref_l = _arr(ref_w).ravel(), _arr(ref_l).ravel()
  a = np.clip(np.broadcast_to(_arr(alpha), ref_w.shape), 1e-3, 1 - 1e-3)
  return pairwise_acc(ref_w - ref_l + np.log(a / (1 - a)) / beta, np.zeros_like(ref_w))


def alignment_gap(lp_w, lp_l, ref_w, ref_l, alpha, *, beta: float) -> dict:
  """`gap = IRA - RA` (METHODS 6.10 `eval.alignment_gap`): how far a policy's ranking
  accuracy falls short of its objective's optimum. Returns {gap, ranking_acc,
  idealized_ranking_acc, n}."""
  ra = ranking_acc(lp_w, lp_l)["accuracy"]
  ira = idealized_ranking_acc(ref_w, ref_l, alpha, beta=beta)
  return {"gap": ira["accuracy"] - ra, "ranking_acc": ra,
          "idealized_ranking_acc": ira["accuracy"], "n": ira["n"]}


def rb_score(per_subset_results: Mapping[str, Any],
             sections: Mapping[str, Sequence[str]] | None = None, *,
             counts: Mapping[str, float] | None = None) -> dict:
  """RewardBench section scores (METHODS 6.1 `eval.rb_score`, standard: RewardBench scoring
  code; final mean recalled - verify).

  `S_g = sum_{s in g} w_s * acc_s / sum_{s in g} w_s` with `w_s = counts[s]` if given (pass
  `REWARDBENCH_COUNTS` to reproduce the official weights, math-prm = 984) else the subset's
  `n`; `score = mean_g S_g`. per_subset_results: {subset: pairwise_acc dict} (e.g.
  `pairwise_acc(..., groups=subset)["groups"]`) or {subset: accuracy} with `counts`.
  sections defaults to `REWARDBENCH_SECTIONS`. Subsets missing or with n = 0 are skipped;
  a section with none is NaN.
  Returns {score (NaN if any section is NaN), score_available (mean over non-NaN sections),
  sections: {g: {score, n, weight, subsets, missing}}, n}.
  """
  sections = REWARDBENCH_SECTIONS if sections is None else sections
  out, total_n = {}, 0
  for sec, subsets in sections.items():
    num = den = 0.0
    n_sec, used, missing = 0, [], []
    for s in subsets:
      res = per_subset_results.get(s)
      if isinstance(res, Mapping):
        acc, n = res.get("accuracy", math.nan), int(res.get("n", 0))
      elif res is not None:
        acc, n = float(res), int(counts.get(s, 0)) if counts else 0
      if res is None or n == 0 or not np.isfinite(acc):
        missing.append(s)
        continue
      w = float(counts[s]) if counts and s in counts else float(n)
      num, den, n_sec = num + w * acc, den + w, n_sec + n
      used.append(s)
    out[sec] = {"score": num / den if den > 0 else math.nan, "n": n_sec, "weight": den,
                "subsets": used, "missing": missing}
    total_n += n_sec
  scores = np.array([v["score"] for v in out.values()], dtype=np.float64)
  finite = scores[np.isfinite(scores)]
  return {"score": float(scores.mean()) if scores.size else math.nan,
          "score_available": float(finite.mean()) if finite.size else math.nan,
          "sections": out, "n": total_n}


# ------------------------------------------------------------ 6.2 best-of-K, 6.3 MRR

def _neg(r_pos, r_neg, neg_mask):
  r_pos, r_neg = _arr(r_pos).ravel(), _arr(r_neg)
  if r_neg.ndim == 1:
    r_neg = r_neg[:, None]
  if r_neg.shape[0] != r_pos.shape[0]:
    raise ValueError(f"r_pos {r_pos.shape} and r_neg {r_neg.shape} differ in B")
  valid = np.ones(r_neg.shape, bool) if neg_mask is None else np.asarray(neg_mask, bool)
  nan = np.isnan(r_pos) | (np.isnan(r_neg) & valid).any(-1)
  return r_pos, r_neg, valid, nan


def best_of_k_acc(r_pos, r_neg, neg_mask=None, *, groups=None) -> dict:
  """Best-of-K accuracy (METHODS 6.2 `eval.best_of_k_acc`; RewardBench 2: Advancing Reward
  Model Evaluation).

  `hit = 1[r_pos > max_j r_neg_j]` over unmasked negatives (masked = -inf); ties miss; a
  NaN in r_pos or an unmasked negative is a miss, tallied. Chance = mean 1/K_i with K_i =
  1 + #unmasked negatives. r_pos [B], r_neg [B, K-1], neg_mask [B, K-1] bool (True = keep).
  Returns {accuracy, ci_lo, ci_hi, n, n_correct, n_nan, chance}; with `groups` also
  `groups` and `mean_over_groups` (unweighted, as RewardBench 2 averages subsets).
  """
  r_pos, r_neg, valid, nan = _neg(r_pos, r_neg, neg_mask)

  def one(p, neg, v, bad):
    best = np.where(v, neg, -np.inf).max(-1) if neg.shape[-1] else np.full(p.shape, -np.inf)
    hits = ((p > best) & ~bad).astype(np.float64)
    chance = float((1.0 / (1 + v.sum(-1))).mean()) if p.size else math.nan
    return _rate(hits, int(bad.sum()), chance=chance)

  out = one(r_pos, r_neg, valid, nan)
  if groups is not None:
    out["groups"] = _by_group(one, groups, r_pos, r_neg, valid, nan)
    accs = np.array([g["accuracy"] for g in out["groups"].values()])
    out["mean_over_groups"] = float(np.nanmean(accs)) if np.isfinite(accs).any() else math.nan
  return out


def one_vs_many_mrr(r_pos, r_neg, neg_mask=None) -> dict:
  """One-vs-many mean reciprocal rank (METHODS 6.3 `eval.one_vs_many_mrr`; Evaluating
  Robustness of Reward Models for Mathematical Reasoning).

  `rank_i = 1 + #{j unmasked: r_neg_ij >= r_pos_i}` (pessimistic ties); `mrr = mean 1/rank`;
  `acc_all = mean 1[rank == 1]`. A NaN positive or negative counts as beating the positive
  (NaN positive -> worst rank), tallied. r_pos [B], r_neg [B, M], neg_mask [B, M] bool.
  Returns {mrr, acc_all, ci_lo, ci_hi (Wilson, for acc_all), mean_rank, n, n_nan}.
  """
  r_pos, r_neg, valid, nan = _neg(r_pos, r_neg, neg_mask)
  beats = ~(r_neg < r_pos[:, None]) & valid  # >= or NaN on either side
  rank = 1 + beats.sum(-1)
  n = int(r_pos.size)
  lo, hi = wilson_ci(float((rank == 1).sum()), n)
  return {"mrr": float((1.0 / rank).mean()) if n else math.nan,
          "acc_all": float((rank == 1).mean()) if n else math.nan, "ci_lo": lo, "ci_hi": hi,
          "mean_rank": float(rank.mean()) if n else math.nan, "n": n, "n_nan": int(nan.sum())}


# ------------------------------------------------------------------ 6.4 by language

def by_language(r_c, r_r, language, category, item_id=None, *, english: str = "en",
                tie_value: float = 0.0, min_n: int = 30) -> dict:
  """Multilingual accuracy (METHODS 6.4 `eval.by_language`; M-RewardBench: Evaluating
  Reward Models in Multilingual Settings).

  6.1 accuracy per language l and category c; `macro_l = mean_c acc[l, c]` over the
  categories with data; `gap_en = macro_en - mean_{l != en} macro_l`; with `item_id` (the
  source item shared by translations), `flip_l = mean_i 1[hit_en_i != hit_l_i]` over items
  present in both (first occurrence of an id per language; proposed). Cells and aligned
  sets with n < min_n are flagged `low_n`.
  Returns {gap_en, english, n, n_nan, min_n, low_n: ["l/c", ...], languages: {l: {macro,
  n, categories: {c: pairwise_acc dict + low_n}, flip_rate, n_aligned, low_n_aligned}}}.
  """
  r_c, r_r = _arr(r_c).ravel(), _arr(r_r).ravel()
  language, category = np.asarray(language), np.asarray(category)
  tie = r_c == r_r
  hits = np.where(r_c > r_r, 1.0, np.where(tie, tie_value, 0.0))
  ids = None if item_id is None else np.asarray(item_id)

  def first_hits(mask):
    return {} if ids is None else {
        _key(i): h for i, h in reversed(list(zip(ids[mask], hits[mask])))}

  en_hits = first_hits(language == english)
  langs, low = {}, []
  for l in _group_order(language):
    m = language == l
    cats = pairwise_acc(r_c[m], r_r[m], tie_value=tie_value, groups=category[m])["groups"]
    for c, res in cats.items():
      res["low_n"] = res["n"] < min_n
      if res["low_n"]:
        low.append(f"{_key(l)}/{c}")
    accs = np.array([res["accuracy"] for res in cats.values()])
    flip, n_al = math.nan, 0
    if ids is not None and _key(l) != english:
      pairs = [(h, en_hits[i]) for i, h in first_hits(m).items() if i in en_hits]
      n_al = len(pairs)
      flip = float(np.mean([a != b for a, b in pairs])) if pairs else math.nan
    langs[_key(l)] = {"macro": float(np.nanmean(accs)) if np.isfinite(accs).any() else math.nan,
                      "n": int(m.sum()), "categories": cats, "flip_rate": flip,
                      "n_aligned": n_al, "low_n_aligned": ids is not None and n_al < min_n}
  others = [v["macro"] for k, v in langs.items() if k != english and np.isfinite(v["macro"])]
  en_macro = langs.get(english, {}).get("macro", math.nan)
  gap = en_macro - float(np.mean(others)) if others else math.nan
  return {"gap_en": float(gap), "english": english, "n": int(r_c.size),
          "n_nan": int((np.isnan(r_c) | np.isnan(r_r)).sum()), "min_n": min_n,
          "low_n": low, "languages": langs}


# ---------------------------------------------------------------- 6.6 calibration

def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def reliability(r_c, r_r, *, bins: int = 10, tau: float = 1.0) -> list[dict]:
  """Reliability-diagram rows (METHODS 6.6 `eval.reliability`; On Diversified Preferences
  of Large Language Model Alignment): `p = sig((r_c - r_r)/tau)`, `conf = max(p, 1-p)`,
  `hit = 1[p > 0.5] + 0.5*1[p == 0.5]`; `bins` equal-width bins on [0.5, 1] (conf = 1 in
  the last). Pairs with a NaN reward are left out. Rows: {lo, hi, n, conf, acc} (conf and
  acc NaN for an empty bin); the n sum to the number of finite pairs.
  """
  d = _arr(r_c).ravel() - _arr(r_r).ravel()
  d = d[~np.isnan(d)]
  conf = _sigmoid(np.abs(d) / tau)
  hit = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
  edges = np.linspace(0.5, 1.0, bins + 1)
  idx = np.clip(np.floor((conf - 0.5) * 2 * bins).astype(int), 0, bins - 1)
  rows = []
  for b in range(bins):
    m = idx == b
    k = int(m.sum())
    rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": k,
                 "conf": float(conf[m].mean()) if k else math.nan,
                 "acc": float(hit[m].mean()) if k else math.nan})
  return rows


def ece(r_c, r_r, *, bins: int = 10, tau: float = 1.0) -> dict:
  """Expected calibration error of the Bradley-Terry preference probability (METHODS 6.6
  `eval.ece`; On Diversified Preferences of Large Language Model Alignment).

  `ECE = sum_b (n_b / n) * |acc_b - conf_b|` over the `reliability` rows (M = 10, tau = 1;
  fit tau on held-out pairs with `fit_temperature` and pass it here).
  Returns {ece, n, n_nan, bins, tau, mean_conf, accuracy, rows}.
  """
  d = _arr(r_c).ravel() - _arr(r_r).ravel()
  rows = reliability(r_c, r_r, bins=bins, tau=tau)
  n = sum(r["n"] for r in rows)
  err = sum(r["n"] * abs(r["acc"] - r["conf"]) for r in rows if r["n"])
  valid = d[~np.isnan(d)]
  return {"ece": err / n if n else math.nan, "n": n, "n_nan": int(np.isnan(d).sum()),
          "bins": bins, "tau": float(tau),
          "mean_conf": float(_sigmoid(np.abs(valid) / tau).mean()) if n else math.nan,
          "accuracy": float(np.where(valid > 0, 1.0, np.where(valid == 0, 0.5, 0.0)).mean())
                      if n else math.nan,
          "rows": rows}


def fit_temperature(r_c, r_r, *, lo: float = 1e-2, hi: float = 1e2, iters: int = 100) -> dict:
  """Temperature by held-out NLL (METHODS 6.6 option): `tau* = argmin_tau mean
  softplus(-(r_c - r_r)/tau)` on [lo, hi], by golden-section search on log(1/tau) (the NLL is
  convex in 1/tau). If every pair is ordered correctly the optimum is `lo`.
  Returns {tau, nll, nll_at_1, n, n_nan}.
  """
  d = _arr(r_c).ravel() - _arr(r_r).ravel()
  n_nan = int(np.isnan(d).sum())
  d = d[~np.isnan(d)]
  if d.size == 0:
    return {"tau": math.nan, "nll": math.nan, "nll_at_1": math.nan, "n": 0, "n_nan": n_nan}
  nll = lambda log_s: float(np.logaddexp(0.0, -d * math.exp(log_s)).mean())
  a, b = math.log(1 / hi), math.log(1 / lo)
  g = (math.sqrt(5) - 1) / 2
  for _ in range(iters):
    c, e = b - g * (b - a), a + g * (b - a)
    if nll(c) <= nll(e):
      b = e
    else:
      a = c
  log_s = (a + b) / 2
  return {"tau": math.exp(-log_s), "nll": nll(log_s), "nll_at_1": nll(0.0), "n": int(d.size),
          "n_nan": n_nan}


# ------------------------------------------------------------ 6.7 contrast consistency

def contrast_consistency(S) -> dict:
  """Contrast-instruction consistency (METHODS 6.7 `eval.contrast_consistency`; The
  Trickle-down Impact of Reward (In-)consistency on RLHF).

  S [B, 2, 2] with `S[:, a, b] = r(I_a, R_b)` (0-based; R_a is the gold answer of I_a).
  Instruction side: comparisons `S00 > S01` and `S11 > S10`; response side (proposed,
  reported apart): `S00 > S10` and `S11 > S01`. Ties and NaN fail. Per-comparison rate over
  2B comparisons; per-example rate = both comparisons pass (Wilson CI on it).
  Returns {per_example, ci_lo, ci_hi, per_comparison, response_per_example,
  response_per_comparison, n_pass_example, n_pass_comparison, n, n_comparisons, n_nan}.
  """
  S = _arr(S)
  if S.ndim != 3 or S.shape[1:] != (2, 2):
    raise ValueError(f"S must be [B, 2, 2], got {S.shape}")
  inst = np.stack([S[:, 0, 0] > S[:, 0, 1], S[:, 1, 1] > S[:, 1, 0]], -1)
  resp = np.stack([S[:, 0, 0] > S[:, 1, 0], S[:, 1, 1] > S[:, 0, 1]], -1)
  n = int(S.shape[0])
  ex = inst.all(-1)
  lo, hi = wilson_ci(float(ex.sum()), n)
  mean = lambda x: float(x.mean()) if x.size else math.nan
  return {"per_example": mean(ex), "ci_lo": lo, "ci_hi": hi, "per_comparison": mean(inst),
          "response_per_example": mean(resp.all(-1)), "response_per_comparison": mean(resp),
          "n_pass_example": int(ex.sum()), "n_pass_comparison": int(inst.sum()), "n": n,
          "n_comparisons": 2 * n, "n_nan": int(np.isnan(S).any((1, 2)).sum())}


# ---------------------------------------------------------------- 6.8 length bias

def derangement_pairs(lengths, rng=None, min_ratio: float = 2.0) -> np.ndarray:
  """For each i a uniformly random j != i with `lengths[j] >= min_ratio * lengths[i]`, or -1
  if there is none (METHODS 6.8 probe (a)). Partners may repeat (a strict derangement is
  impossible under a length constraint: the longest answer has no longer partner). Score
  `r(x_i, y_j)` for the pairs and pass them to `offtopic_long_rate`. rng: a
  np.random.Generator or a seed. Returns int64 [B].
  """
  rng = np.random.default_rng(rng)
  lengths = _arr(lengths).ravel()
  B = lengths.size
  order = np.argsort(lengths, kind="stable")
  pos = np.empty(B, np.int64)
  pos[order] = np.arange(B)
  start = np.searchsorted(lengths[order], min_ratio * lengths, side="left")
  self_in = pos >= start  # i itself qualifies (only if min_ratio <= 1 or length <= 0)
  m = B - start - self_in
  u = np.floor(rng.random(B) * np.maximum(m, 1)).astype(np.int64) + start
  u = u + (self_in & (u >= pos))  # skip i's own position
  return np.where(m > 0, order[np.minimum(u, B - 1)], -1)


def offtopic_long_rate(r_own, r_other, pairs=None) -> dict:
  """Probe (a) of METHODS 6.8 `eval.length_bias_probe` (proposed; motivated by
  Preference-free Alignment Learning with Regularized Relevance Reward):
  `rate = mean_i 1[r(x_i, y_j(i)) > r(x_i, y_i)]`, y_i the gold answer, y_j(i) a longer
  answer to another prompt (`derangement_pairs`); ideal 0. Ties count as not preferring.
  r_own, r_other [B]; entries with `pairs == -1` and NaN rewards are left out (NaN tallied).
  Returns {rate, ci_lo, ci_hi, n, n_nan, n_unpaired}.
  """
  r_own, r_other = _arr(r_own).ravel(), _arr(r_other).ravel()
  keep = np.ones(r_own.shape, bool) if pairs is None else np.asarray(pairs).ravel() >= 0
  nan = keep & (np.isnan(r_own) | np.isnan(r_other))
  ok = keep & ~nan
  res = _rate((r_other[ok] > r_own[ok]).astype(np.float64), int(nan.sum()),
              n_unpaired=int((~keep).sum()))
  res["rate"] = res.pop("accuracy")
  res.pop("n_correct")
  return res


def length_slope(rewards, lengths, mask=None) -> dict:
  """Probe (b) of METHODS 6.8 (proposed): per prompt, the least-squares slope of reward on
  log(length) (lengths clamped to >= 1) over its K >= 3 valid samples:
  `slope_p = sum_k (x_k - x̄)(r_k - r̄) / sum_k (x_k - x̄)^2`, x = log len. Prompts with
  < 3 valid samples or constant length are skipped (NaN slope, counted).
  rewards, lengths [P, K]; mask [P, K] bool (True = valid).
  Returns {mean, median, sd, se, t (= mean/se), frac_positive, n (prompts used), n_skipped,
  slopes [P] (NaN where skipped)}.
  """
  r, L = np.atleast_2d(_arr(rewards)), np.atleast_2d(_arr(lengths))
  valid = np.isfinite(r) & np.isfinite(L)
  if mask is not None:
    valid &= np.atleast_2d(np.asarray(mask, bool))
  x = np.where(valid, np.log(np.maximum(np.where(valid, L, 1.0), 1.0)), 0.0)
  y = np.where(valid, r, 0.0)
  cnt = valid.sum(-1)
  c = np.maximum(cnt, 1)
  xc = np.where(valid, x - (x.sum(-1) / c)[:, None], 0.0)
  yc = np.where(valid, y - (y.sum(-1) / c)[:, None], 0.0)
  sxx, sxy = (xc * xc).sum(-1), (xc * yc).sum(-1)
  ok = (cnt >= 3) & (sxx > 1e-12 * np.maximum(1.0, (x * x).sum(-1)))
  slopes = np.where(ok, sxy / np.where(ok, sxx, 1.0), np.nan)
  s = slopes[ok]
  st = _mean_sd(s)
  return {**st, "median": float(np.median(s)) if s.size else math.nan,
          "frac_positive": float((s > 0).mean()) if s.size else math.nan, "n": int(s.size),
          "n_skipped": int((~ok).sum()), "slopes": slopes}


def filler_delta(r_orig, r_filler) -> dict:
  """Probe (c) of METHODS 6.8 (proposed): `delta = r(x, y + filler) - r(x, y)`, filler =
  the last sentence repeated. NaN pairs are left out (tallied).
  Returns {mean_delta, sd, se, t, frac_increased, ci_lo, ci_hi (Wilson, frac_increased),
  n, n_nan}.
  """
  d = _arr(r_filler).ravel() - _arr(r_orig).ravel()
  nan = np.isnan(d)
  d = d[~nan]
  st = _mean_sd(d)
  k = float((d > 0).sum())
  lo, hi = wilson_ci(k, d.size)
  return {"mean_delta": st["mean"], "sd": st["sd"], "se": st["se"], "t": st["t"],
          "frac_increased": k / d.size if d.size else math.nan, "ci_lo": lo, "ci_hi": hi,
          "n": int(d.size), "n_nan": int(nan.sum())}


def length_bias_flag(offtopic: dict | None = None, slope: dict | None = None,
                     filler: dict | None = None, *, z: float = Z95, rate: float = 0.5,
                     frac: float = 0.5) -> dict:
  """Summary flag of the three 6.8 probes (proposed). A probe that was not run is None.
  - (a) off-topic: Wilson lower bound of `rate` > `rate` (0.5): the RM prefers a >= 2x
    longer answer to another prompt over the gold answer significantly more often than not;
  - (b) slope: mean slope > 0 with t = mean/se > z (1.96) and frac_positive > `frac` (0.5);
  - (c) filler: mean delta > 0 with t > z and Wilson lower bound of frac_increased > `frac`.
  flag = any probe flagged. Requiring significance keeps a length-neutral or pure-noise RM
  (rate ~ 0.5, slopes and deltas centred on 0) unflagged.
  Returns {flag, offtopic, slope, filler (each bool or None), reasons, thresholds}.
  """
  out, reasons = {}, []
  if offtopic is not None:
    out["offtopic"] = bool(offtopic["n"] > 0 and offtopic["ci_lo"] > rate)
    if out["offtopic"]:
      reasons.append(f"off-topic longer answer preferred at rate {offtopic['rate']:.3f} "
                     f"(95% CI lower bound {offtopic['ci_lo']:.3f} > {rate})")
  if slope is not None:
    out["slope"] = bool(slope["mean"] > 0 and slope["t"] > z and slope["frac_positive"] > frac)
    if out["slope"]:
      reasons.append(f"mean reward slope on log length {slope['mean']:.4g} > 0 (t = "
                     f"{slope['t']:.3g}), positive for {slope['frac_positive']:.3f} of prompts")
  if filler is not None:
    out["filler"] = bool(filler["mean_delta"] > 0 and filler["t"] > z
                         and filler["ci_lo"] > frac)
    if out["filler"]:
      reasons.append(f"filler raises reward by {filler['mean_delta']:.4g} (t = "
                     f"{filler['t']:.3g}) for {filler['frac_increased']:.3f} of answers")
  return {"flag": any(out.values()), "offtopic": out.get("offtopic"),
          "slope": out.get("slope"), "filler": out.get("filler"), "reasons": reasons,
          "thresholds": {"z": z, "rate": rate, "frac": frac}}


def length_bias_probe(*, r_own=None, r_other=None, pairs=None, rewards=None, lengths=None,
                      mask=None, r_orig=None, r_filler=None, **flag_kw) -> dict:
  """METHODS 6.8 `eval.length_bias_probe`: runs the probes whose inputs are given
  ((a) r_own, r_other[, pairs]; (b) rewards, lengths[, mask]; (c) r_orig, r_filler) and
  `length_bias_flag`. Returns {offtopic, slope, filler (dicts or None), flag: flag dict, n}.
  """
  a = None if r_own is None else offtopic_long_rate(r_own, r_other, pairs)
  b = None if rewards is None else length_slope(rewards, lengths, mask)
  c = None if r_orig is None else filler_delta(r_orig, r_filler)
  n = sum(p["n"] for p in (a, b, c) if p is not None)
  return {"offtopic": a, "slope": b, "filler": c, "flag": length_bias_flag(a, b, c, **flag_kw),
          "n": n}


# ------------------------------------------------------------ 6.12 Kendall tau, histogram

def kendall_tau(a, b) -> dict:
  """Kendall tau-b per row (METHODS 6.12 `eval.kendall_tau`, standard):
  `tau_b = sum_{i<j} sgn(a_i-a_j) sgn(b_i-b_j) / sqrt((n0-n1)(n0-n2))`, n0 = K(K-1)/2,
  n1, n2 the pairs tied in a, b. O(K^2). A row with a NaN, or constant in a or b (zero
  denominator), gives NaN, counted in `n_nan` / `n_constant`.
  a, b [..., K]. Returns {tau (float for 1-D input, else array [...]), mean (over finite
  rows), n (rows), n_valid, n_nan, n_constant}.
  """
  a, b = _arr(a), _arr(b)
  if a.shape != b.shape:
    raise ValueError(f"a {a.shape} and b {b.shape} differ")
  K = a.shape[-1] if a.ndim else 0
  iu = np.triu_indices(K, 1)
  sa = np.sign(a[..., :, None] - a[..., None, :])[..., iu[0], iu[1]]
  sb = np.sign(b[..., :, None] - b[..., None, :])[..., iu[0], iu[1]]
  n0 = K * (K - 1) / 2
  n1, n2 = (sa == 0).sum(-1), (sb == 0).sum(-1)
  den = np.sqrt((n0 - n1) * (n0 - n2))
  has_nan = np.isnan(a).any(-1) | np.isnan(b).any(-1)
  const = ~has_nan & (den == 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    tau = np.where(has_nan | const, np.nan, (sa * sb).sum(-1) / np.where(den > 0, den, 1.0))
  fin = tau[np.isfinite(tau)]
  return {"tau": float(tau) if tau.ndim == 0 else tau,
          "mean": float(fin.mean()) if fin.size else math.nan, "n": int(tau.size),
          "n_valid": int(fin.size), "n_nan": int(has_nan.sum()), "n_constant": int(const.sum())}


def reward_histogram(r, bins=20, range=None) -> dict:  # noqa: A002 (numpy's name)
  """Histogram of finite rewards (np.histogram semantics; pass the same `bins` edges for
  chosen and rejected to overlay them). Returns {counts, edges, n, n_nan, mean, std, min,
  max}."""
  r = _arr(r).ravel()
  nan = ~np.isfinite(r)
  r = r[~nan]
  counts, edges = np.histogram(r, bins=bins, range=range if r.size or range else (0.0, 1.0))
  st = lambda f: float(f(r)) if r.size else math.nan
  return {"counts": counts, "edges": edges, "n": int(r.size), "n_nan": int(nan.sum()),
          "mean": st(np.mean), "std": st(np.std), "min": st(np.min), "max": st(np.max)}
