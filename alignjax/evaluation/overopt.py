"""Reward over-optimisation measurements (METHODS 6.14, 6.15, 6.18). See docs/overoptimization.md.

* `bon_curve`: the exact expected gold (and proxy) score of best-of-N selection by a proxy,
  for N = 1, 2, 4, ..., n, against the analytic KL(best-of-N || policy) = log N - (N-1)/N.
* `overopt_curve`: gold and proxy reward of RL checkpoints against sqrt(KL(pi_t || pi_ref)),
  with the peak of the gold curve and the fitted scaling forms.
* `collapse_monitors` and `collapse_alerts`: length, truncation, entropy, diversity and
  zero-variance signals of a rollout batch, and the alerts they raise over a run.

All functions are numpy on the host (they run once per evaluation, not per token).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])

__all__ = ["bon_weights", "bon_curve", "bon_kl", "overopt_curve", "fit_bon", "fit_rl",
           "collapse_monitors", "collapse_alerts"]


# ------------------------------------------------------------------------- best-of-N (6.14)

def bon_kl(n: int) -> float:
  """KL(best-of-N || pi) = log N - (N-1)/N (the analytic form used for best-of-N curves)."""
  return math.log(n) - (n - 1) / n


def _log_comb(a, b):
  a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
  ok = (b >= 0) & (b <= a)
  a, b = np.where(ok, a, 1.0), np.where(ok, b, 0.0)
  return np.where(ok, _lgamma(a + 1) - _lgamma(b + 1) - _lgamma(a - b + 1), -np.inf)


def bon_weights(n: int, big_n: int) -> np.ndarray:
  """w [n]: probability that the i-th smallest of n samples (i = 1..n) is the maximum of a
  uniformly random N-subset: w_i = C(i-1, N-1) / C(n, N) (computed with log-gamma)."""
  if not 1 <= big_n <= n:
    raise ValueError(f"best-of-N needs 1 <= N <= n, got N={big_n}, n={n}")
  i = np.arange(1, n + 1)
  return np.exp(_log_comb(i - 1, big_n - 1) - _log_comb(n, big_n))


def bon_curve(proxy, gold, *, ns: Sequence[int] | None = None, seed: int = 0,
              extra: Mapping[str, np.ndarray] | None = None) -> dict:
  """Best-of-N curve (METHODS 6.14, the protocol of "Helping or Herding? Reward Model Ensembles
  Mitigate but do not Eliminate Reward Hacking").

  proxy, gold [P, n]: scores of n samples per prompt (from the base policy). Per prompt the
  samples are sorted by proxy ascending (ties broken by a seeded random permutation) and
  E_N[g] = sum_i C(i-1, N-1)/C(n, N) g_(i): the exact expectation over random N-subsets of the
  gold score of the subset's proxy-best sample. `extra` scores ([P, n] each) get the same
  expectation. Prompts with a non-finite proxy or gold score are dropped (counted).

  Returns {"n": [N], "kl": [log N - (N-1)/N], "proxy": [E_N proxy], "gold": [E_N gold],
  <extra names>: [...], "num_prompts", "num_dropped"}; ns default 1, 2, 4, ..., <= n.
  """
  proxy = np.asarray(proxy, np.float64)
  gold = np.asarray(gold, np.float64)
  if proxy.ndim != 2 or proxy.shape != gold.shape:
    raise ValueError(f"proxy and gold must be [P, n] of the same shape, got {proxy.shape} and "
                     f"{gold.shape}")
  extra = {k: np.asarray(v, np.float64) for k, v in (extra or {}).items()}
  for k, v in extra.items():
    if v.shape != proxy.shape:
      raise ValueError(f"extra[{k!r}] has shape {v.shape}, expected {proxy.shape}")
  p, n = proxy.shape
  ns = list(ns) if ns is not None else [2 ** k for k in range(int(math.log2(n)) + 1)]
  ok = np.isfinite(proxy).all(1) & np.isfinite(gold).all(1)
  series = {"proxy": proxy[ok], "gold": gold[ok], **{k: v[ok] for k, v in extra.items()}}
  rng = np.random.default_rng(seed)
  m = int(ok.sum())
  perm = np.stack([rng.permutation(n) for _ in range(m)]) if m else np.zeros((0, n), int)
  rows = np.arange(m)[:, None]
  shuffled = series["proxy"][rows, perm]
  order = perm[rows, np.argsort(shuffled, axis=1, kind="stable")]   # proxy ascending
  out = {"n": ns, "kl": [bon_kl(k) for k in ns], "num_prompts": m, "num_dropped": p - m}
  for name, v in series.items():
    srt = v[rows, order]
    out[name] = [float(np.mean(srt @ bon_weights(n, k))) if m else math.nan for k in ns]
  return out


# ------------------------------------------------------------------------- RL curve (6.15)

def fit_bon(d, y) -> tuple[float, float]:
  """Least-squares (a, b) of y = d (a - b d) (the best-of-N form; y = gold gain, d = sqrt KL)."""
  return _fit(np.asarray(d, np.float64), np.asarray(y, np.float64), lambda d: d * d)


def fit_rl(d, y) -> tuple[float, float]:
  """Least-squares (a, b) of y = d (a - b log d) (the RL form; points with d = 0 add nothing)."""
  d = np.asarray(d, np.float64)
  return _fit(d, np.asarray(y, np.float64),
              lambda d: d * np.log(np.where(d > 0, d, 1.0)))


def _fit(d, y, second):
  ok = np.isfinite(d) & np.isfinite(y) & (d > 0)
  if ok.sum() < 2:
    return math.nan, math.nan
  x = np.stack([d[ok], -second(d[ok])], 1)
  (a, b), *_ = np.linalg.lstsq(x, y[ok], rcond=None)
  return float(a), float(b)


def overopt_curve(rows: Sequence[Mapping], *, proxy: str = "proxy", gold: str = "gold",
                  kl: str = "kl") -> dict:
  """RL over-optimisation curve (METHODS 6.15): per evaluation row (one RL checkpoint on fixed
  prompts) the mean proxy and gold rewards and KL = mean_y [lp(y; pi_t) - lp(y; pi_ref)],
  y ~ pi_t. Returns steps, kl, sqrt_kl = sqrt(max(KL, 0)), proxy, gold, the gold peak (t* =
  argmax gold, first on ties), its gold and sqrt KL, the final gold, `gold_drop` (peak minus
  final: > 0 means the proxy was over-optimised past the peak), and the fitted
  gold - gold_0 = d (a - b log d) (`fit_a`, `fit_b`; NaN with fewer than 2 points past 0)."""
  rows = sorted(rows, key=lambda r: r["step"])
  if not rows:
    raise ValueError("overopt_curve needs at least one evaluation row")
  get = lambda key: np.array([float(r.get(key, math.nan)) for r in rows])
  k, p, g = get(kl), get(proxy), get(gold)
  d = np.sqrt(np.maximum(np.nan_to_num(k, nan=0.0), 0.0))
  finite = np.isfinite(g)
  t = int(np.argmax(np.where(finite, g, -np.inf))) if finite.any() else 0
  a, b = fit_rl(d, g - g[0])
  return {"steps": [int(r["step"]) for r in rows], "kl": k.tolist(), "sqrt_kl": d.tolist(),
          "proxy": p.tolist(), "gold": g.tolist(), "t_star": int(rows[t]["step"]),
          "gold_peak": float(g[t]), "sqrt_kl_peak": float(d[t]), "gold_final": float(g[-1]),
          "proxy_final": float(p[-1]), "gold_drop": float(g[t] - g[-1]), "fit_a": a,
          "fit_b": b}


# ------------------------------------------------------------------------- collapse (6.18)

def _distinct(seqs: Sequence[Sequence], n: int) -> float:
  grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
  return len(set(grams)) / len(grams) if grams else math.nan


def collapse_monitors(lengths, truncated, rewards, tokens: Sequence[Sequence[int]], *,
                      entropy_sum=None, answers: Sequence | None = None) -> dict:
  """Collapse monitors of one rollout batch (METHODS 6.18, "Evolving Language Models without
  Labels" / "SPINE").

  lengths, truncated, rewards [B, G] (NaN reward = unscorable); tokens: B*G response token
  lists (group-major); entropy_sum [B, G]: the sum over each response's tokens of the token
  entropy -sum_v p_v log p_v (optional); answers: B*G hashable answers (default: the token
  tuples). Returns length_mean, length_p95, truncated_frac, entropy (the mean over all response
  tokens), distinct_2 / distinct_4 (unique n-grams / n-grams within a group, mean over groups
  with any), unique_answers (distinct answers / G, mean over groups) and zero_std_frac
  (groups whose finite rewards have std 0, or fewer than 2 finite rewards).
  """
  lengths = np.asarray(lengths, np.float64)
  b, g = lengths.shape
  if len(tokens) != b * g:
    raise ValueError(f"tokens has {len(tokens)} rows, expected B*G = {b * g}")
  rewards = np.asarray(rewards, np.float64).reshape(b, g)
  answers = [tuple(t) for t in tokens] if answers is None else list(answers)
  out = {"length_mean": float(lengths.mean()),
         "length_p95": float(np.percentile(lengths, 95)),
         "truncated_frac": float(np.mean(np.asarray(truncated, bool)))}
  if entropy_sum is not None:
    total = float(lengths.sum())
    out["entropy"] = float(np.sum(entropy_sum) / total) if total > 0 else math.nan
  groups = [list(tokens[i * g:(i + 1) * g]) for i in range(b)]
  for n in (2, 4):
    vals = [v for v in (_distinct(x, n) for x in groups) if not math.isnan(v)]
    out[f"distinct_{n}"] = float(np.mean(vals)) if vals else math.nan
  out["unique_answers"] = float(np.mean([len(set(answers[i * g:(i + 1) * g])) / g
                                         for i in range(b)]))
  zero = []
  for row in rewards:
    fin = row[np.isfinite(row)]
    zero.append(fin.size < 2 or float(np.std(fin)) == 0.0)
  out["zero_std_frac"] = float(np.mean(zero))
  return out


def collapse_alerts(history: Sequence[Mapping], *, entropy_ratio: float = 0.5,
                    length_dev: float = 0.5, window: int = 50,
                    zero_std_max: float = 0.8) -> list[dict]:
  """Alerts over a run's monitor rows ({"step", "entropy", "length_mean", "zero_std_frac"}),
  the METHODS 6.18 proposals: entropy below `entropy_ratio` x the first row's; mean length off
  by more than `length_dev` (relative) from the median of the rows in the previous `window`
  steps; zero-variance group rate above `zero_std_max`. Returns [{"step", "alerts": [...]}]
  for every row (an empty list when nothing fires)."""
  rows = sorted(history, key=lambda r: r["step"])
  out = []
  e0 = rows[0].get("entropy", math.nan) if rows else math.nan
  for i, r in enumerate(rows):
    alerts = []
    e = r.get("entropy", math.nan)
    if np.isfinite(e) and np.isfinite(e0) and e < entropy_ratio * e0:
      alerts.append(f"entropy {e:.3g} < {entropy_ratio} x initial {e0:.3g}")
    past = [q["length_mean"] for q in rows[:i]
            if r["step"] - window <= q["step"] < r["step"] and "length_mean" in q]
    if past and "length_mean" in r:
      med = float(np.median(past))
      if med > 0 and abs(r["length_mean"] - med) > length_dev * med:
        alerts.append(f"length {r['length_mean']:.3g} is off by more than {length_dev:.0%} from "
                      f"the {window}-step median {med:.3g}")
    z = r.get("zero_std_frac", math.nan)
    if np.isfinite(z) and z > zero_std_max:
      alerts.append(f"zero-variance groups {z:.0%} > {zero_std_max:.0%}")
    out.append({"step": int(r["step"]), "alerts": alerts})
  return out
