"""Reward-model evaluation reports: `<name>.json` (every number, NaN as null), `<name>.md`
(readable tables) and PNG plots (matplotlib, Agg canvas; no pyplot, no global backend
change). Every file is written atomically (temporary file, then os.replace). Under
multi-host jax, call with `write=(jax.process_index() == 0)`.

`results` is a dict of metric outputs (alignjax.evaluation.metrics) under these keys, all
optional; any other key is listed under "Other metrics":
  meta (dict of strings: checkpoint, step, dataset...), pairwise (pairwise_acc, with groups
  = subsets), rb_score, best_of_k, mrr (one_vs_many_mrr), by_language, ece, temperature
  (fit_temperature), contrast (contrast_consistency), length_bias (length_bias_probe),
  kendall_tau.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from alignjax.evaluation import metrics as M

PLOT_KEYS = ("histogram", "length", "reliability", "subsets")


# ------------------------------------------------------------------------- writing

def to_jsonable(x: Any) -> Any:
  """Nested dicts/lists/arrays/numpy scalars -> JSON types; NaN and +-inf -> None."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _atomic_write(path: str, data: str | bytes) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  os.replace(tmp, path)


def _outdir(workdir: str) -> str:
  if "://" in workdir:  # remote workdir: same local mirror as metrics.jsonl
    from alignjax.trainers.metrics import local_metrics_dir
    workdir = local_metrics_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  return workdir


def _fmt(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "—"
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
  return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
  return out + [""]


def _ci(res: dict) -> str:
  lo, hi = res.get("ci_lo"), res.get("ci_hi")
  return "—" if lo is None or math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


# ------------------------------------------------------------------------ headline

def headline(results: dict) -> dict[str, dict]:
  """The headline numbers of a results dict: {metric: {value, ci_lo, ci_hi, n}}."""
  rows = {}

  def add(name, res, key, ci=False):
    if res is not None and key in res:
      rows[name] = {"value": res[key], "ci_lo": res.get("ci_lo") if ci else None,
                    "ci_hi": res.get("ci_hi") if ci else None, "n": res.get("n")}

  r = results.get
  add("pairwise accuracy", r("pairwise"), "accuracy", ci=True)
  add("RewardBench score", r("rb_score"), "score")
  add("best-of-K accuracy", r("best_of_k"), "accuracy", ci=True)
  add("one-vs-many MRR", r("mrr"), "mrr")
  add("one-vs-many accuracy", r("mrr"), "acc_all", ci=True)
  add("gap to English", r("by_language"), "gap_en")
  add("ECE", r("ece"), "ece")
  add("fitted temperature", r("temperature"), "tau")
  add("contrast consistency (per example)", r("contrast"), "per_example", ci=True)
  add("contrast consistency (per comparison)", r("contrast"), "per_comparison")
  lb = r("length_bias")
  if lb is not None:
    rows["length-bias flag"] = {"value": bool(lb["flag"]["flag"]), "ci_lo": None,
                                "ci_hi": None, "n": None}
  add("Kendall tau (mean)", r("kendall_tau"), "mean")
  return rows


# --------------------------------------------------------------------------- plots

def _figure(w=6.4, h=4.2):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(w, h), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  _atomic_write(path, buf.getvalue())


def _plot_histogram(data, path):
  c, r = (data["chosen"], data["rejected"]) if isinstance(data, dict) else data
  c, r = np.asarray(c, np.float64).ravel(), np.asarray(r, np.float64).ravel()
  both = np.concatenate([c, r])
  both = both[np.isfinite(both)]
  edges = np.histogram_bin_edges(both if both.size else [0.0, 1.0], bins=40)
  fig, ax = _figure()
  for x, label, color in ((c, "chosen", "tab:blue"), (r, "rejected", "tab:red")):
    h = M.reward_histogram(x, edges)
    ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.45, color=color,
              label=f"{label} (n={h['n']}, mean={_fmt(h['mean'])})")
  ax.set(xlabel="reward", ylabel="count", title="Reward distribution")
  ax.legend()
  _save(fig, path)


def _plot_reliability(rows, path):
  fig, ax = _figure(5.0, 5.0)
  lo = np.array([r["lo"] for r in rows])
  w = np.array([r["hi"] - r["lo"] for r in rows])
  acc = np.array([r["acc"] if r["acc"] is not None else np.nan for r in rows], np.float64)
  conf = np.array([r["conf"] if r["conf"] is not None else np.nan for r in rows], np.float64)
  ax.bar(lo, np.nan_to_num(acc), width=w, align="edge", alpha=0.6, edgecolor="k",
         label="accuracy")
  ax.plot(conf, acc, "o", color="tab:orange", label="(mean conf, accuracy)")
  ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
  for x, wi, a, r in zip(lo, w, acc, rows):
    if r["n"]:
      ax.text(x + wi / 2, min(np.nan_to_num(a) + 0.02, 1.02), str(r["n"]), ha="center",
              fontsize=7)
  ax.set(xlim=(0.5, 1), ylim=(0, 1.08), xlabel="confidence max(p, 1-p)", ylabel="accuracy",
         title="Reliability diagram")
  ax.legend(loc="upper left", fontsize=8)
  _save(fig, path)


def _plot_length(data, path, max_lines=50):
  r = np.atleast_2d(np.asarray(data["rewards"], np.float64))
  L = np.atleast_2d(np.asarray(data["lengths"], np.float64))
  mask = data.get("mask")
  res = M.length_slope(r, L, mask)
  valid = np.isfinite(r) & np.isfinite(L) & (True if mask is None else np.asarray(mask, bool))
  x = np.log(np.maximum(np.where(valid, L, 1.0), 1.0))
  fig, ax = _figure()
  ax.scatter(x[valid], r[valid], s=6, alpha=0.4)
  for p in np.flatnonzero(np.isfinite(res["slopes"]))[:max_lines]:
    xp, yp = x[p][valid[p]], r[p][valid[p]]
    xs = np.array([xp.min(), xp.max()])
    ax.plot(xs, yp.mean() + res["slopes"][p] * (xs - xp.mean()), lw=0.8, alpha=0.7)
  ax.set(xlabel="log(length)", ylabel="reward",
         title=f"Reward vs length: mean slope {_fmt(res['mean'])}, median "
               f"{_fmt(res['median'])} (P={res['n']})")
  _save(fig, path)


def _plot_bars(ax, names, res_list, labels=None):
  """Bars with asymmetric CI error bars; res_list[j][i] = dict(value|accuracy, ci_lo, ci_hi)."""
  width = 0.8 / len(res_list)
  for j, col in enumerate(res_list):
    v = np.array([np.nan if c is None else _val(c) for c in col], np.float64)
    lo = np.array([_num(c, "ci_lo") for c in col], np.float64)
    hi = np.array([_num(c, "ci_hi") for c in col], np.float64)
    err = np.stack([v - lo, hi - v])
    xs = np.arange(len(names)) + (j - (len(res_list) - 1) / 2) * width
    ax.bar(xs, np.nan_to_num(v), width=width, yerr=err, capsize=3,
           label=None if labels is None else labels[j])
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)


def _val(c):
  v = c.get("value", c.get("accuracy"))
  return np.nan if v is None or isinstance(v, bool) else float(v)


def _num(c, k):
  v = None if c is None else c.get(k)
  return np.nan if v is None else float(v)


def _plot_subsets(groups, path):
  names = list(groups)
  fig, ax = _figure(max(6.4, 0.35 * len(names) + 2), 4.2)
  _plot_bars(ax, names, [[groups[k] for k in names]])
  ax.axhline(0.5, color="k", ls="--", lw=1)
  ax.set(ylim=(0, 1.05), ylabel="accuracy", title="Accuracy per subset (95% Wilson CI)")
  _save(fig, path)


# -------------------------------------------------------------------------- report

def _flat(prefix: str, x: Any, out: list) -> None:
  if isinstance(x, dict):
    for k, v in x.items():
      _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
  elif isinstance(x, (int, float, bool, str, np.generic)) or x is None:
    out.append((prefix, x))


def _markdown(results, name, files) -> str:
  md = [f"# Reward-model evaluation: {name}", ""]
  if results.get("meta"):
    md += _table(["", ""], list(results["meta"].items()))
  md += ["## Headline", ""]
  md += _table(["metric", "value", "95% CI", "n"],
               [(k, v["value"], _ci(v), v["n"]) for k, v in headline(results).items()])
  pw = results.get("pairwise")
  if pw and pw.get("groups"):
    md += ["## Accuracy per subset", ""]
    md += _table(["subset", "accuracy", "95% CI", "n", "ties", "NaN"],
                 [(g, v["accuracy"], _ci(v), v["n"], v["n_ties"], v["n_nan"])
                  for g, v in pw["groups"].items()])
  rb = results.get("rb_score")
  if rb:
    md += ["## Sections", "", f"Score (mean of sections): **{_fmt(rb['score'])}**; over "
           f"sections with data: {_fmt(rb['score_available'])}.", ""]
    md += _table(["section", "score", "n", "weight", "missing subsets"],
                 [(s, v["score"], v["n"], v["weight"], ", ".join(v["missing"]) or "—")
                  for s, v in rb["sections"].items()])
  for key, title, cols in (
      ("best_of_k", "Best-of-K", ("accuracy", "ci_lo", "ci_hi", "chance", "n", "n_nan")),
      ("mrr", "One-vs-many", ("mrr", "acc_all", "mean_rank", "n", "n_nan"))):
    if results.get(key):
      md += [f"## {title}", ""] + _table(cols, [[results[key][c] for c in cols]])
  bl = results.get("by_language")
  if bl:
    md += ["## By language", "", f"Gap to English: **{_fmt(bl['gap_en'])}**. "
           f"Cells with n < {bl['min_n']}: {', '.join(bl['low_n']) or 'none'}.", ""]
    md += _table(["language", "macro accuracy", "n", "flip rate vs en", "aligned n"],
                 [(l, v["macro"], v["n"], v["flip_rate"], v["n_aligned"])
                  for l, v in bl["languages"].items()])
  ec = results.get("ece")
  if ec:
    md += ["## Calibration", "", f"ECE = **{_fmt(ec['ece'])}** (tau = {_fmt(ec['tau'])}, "
           f"{ec['bins']} bins, n = {ec['n']}, NaN = {ec['n_nan']}).", ""]
    tp = results.get("temperature")
    if tp:
      md += [f"Fitted temperature {_fmt(tp['tau'])}: NLL {_fmt(tp['nll'])} (at tau = 1: "
             f"{_fmt(tp['nll_at_1'])}).", ""]
    md += _table(["bin", "n", "mean confidence", "accuracy"],
                 [(f"[{r['lo']:.2f}, {r['hi']:.2f})", r["n"], r["conf"], r["acc"])
                  for r in ec["rows"]])
  cc = results.get("contrast")
  if cc:
    md += ["## Contrast consistency", ""]
    md += _table(["side", "per example", "per comparison"],
                 [("instruction", cc["per_example"], cc["per_comparison"]),
                  ("response", cc["response_per_example"], cc["response_per_comparison"])])
    md += [f"n = {cc['n']} examples, NaN = {cc['n_nan']}.", ""]
  lb = results.get("length_bias")
  if lb:
    fl = lb["flag"]
    md += ["## Length bias", "", f"Flag: **{'LENGTH-BIASED' if fl['flag'] else 'not flagged'}**"
           f" (z = {_fmt(fl['thresholds']['z'], 2)}, rate > {fl['thresholds']['rate']}, "
           f"fraction > {fl['thresholds']['frac']}).", ""]
    md += [f"- {r}" for r in fl["reasons"]] + ([""] if fl["reasons"] else [])
    rows = []
    if lb.get("offtopic"):
      o = lb["offtopic"]
      rows.append(("(a) longer off-topic preferred", o["rate"], _ci(o), o["n"], fl["offtopic"]))
    if lb.get("slope"):
      s = lb["slope"]
      rows.append(("(b) slope on log length: mean (median, frac > 0)",
                   f"{_fmt(s['mean'])} ({_fmt(s['median'])}, {_fmt(s['frac_positive'])})",
                   f"t = {_fmt(s['t'], 2)}", s["n"], fl["slope"]))
    if lb.get("filler"):
      f = lb["filler"]
      rows.append(("(c) filler: mean delta (frac increased)",
                   f"{_fmt(f['mean_delta'])} ({_fmt(f['frac_increased'])})",
                   f"t = {_fmt(f['t'], 2)}", f["n"], fl["filler"]))
    md += _table(["probe", "value", "CI / t", "n", "flagged"], rows)
  kt = results.get("kendall_tau")
  if kt:
    md += ["## Kendall tau-b", ""] + _table(
        ["mean tau", "rows", "valid", "constant (NaN)", "NaN input"],
        [(kt["mean"], kt["n"], kt["n_valid"], kt["n_constant"], kt["n_nan"])])
  other = []
  for k, v in results.items():
    if k not in ("meta", "pairwise", "rb_score", "best_of_k", "mrr", "by_language", "ece",
                 "temperature", "contrast", "length_bias", "kendall_tau"):
      _flat(k, v, other)
  if other:
    md += ["## Other metrics", ""] + _table(["metric", "value"], other)
  md += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
  return "\n".join(md)


def write_report(results: dict, workdir: str, *, name: str = "rm_eval",
                 plots: dict | None = None, write: bool = True) -> dict | None:
  """Writes `<workdir>/<name>.json`, `<name>.md` and the PNG plots; returns their paths
  {json, markdown, plots: {kind: path}} (None when `write` is False: pass
  `write=jax.process_index() == 0`).

  plots (all optional): histogram = {chosen: [B], rejected: [B]} -> `<name>_hist.png`;
  length = {rewards: [P,K], lengths: [P,K], mask?} -> `<name>_length.png`; reliability =
  rows (default results["ece"]["rows"]) -> `<name>_reliability.png`; subsets = {subset:
  pairwise dict} (default results["pairwise"]["groups"]) -> `<name>_subsets.png`.
  """
  plots = dict(plots or {})
  bad = set(plots) - set(PLOT_KEYS)
  if bad:
    raise ValueError(f"unknown plot kinds {sorted(bad)}; expected {PLOT_KEYS}")
  if "reliability" not in plots and results.get("ece"):
    plots["reliability"] = results["ece"]["rows"]
  if "subsets" not in plots and (results.get("pairwise") or {}).get("groups"):
    plots["subsets"] = results["pairwise"]["groups"]
  if not write:
    return None
  out = _outdir(workdir)
  drawers = {"histogram": ("hist", _plot_histogram), "length": ("length", _plot_length),
             "reliability": ("reliability", _plot_reliability),
             "subsets": ("subsets", _plot_subsets)}
  pngs = {}
  for kind in PLOT_KEYS:
    if plots.get(kind) is not None:
      suffix, draw = drawers[kind]
      pngs[kind] = os.path.join(out, f"{name}_{suffix}.png")
      draw(plots[kind], pngs[kind])
  files = [f"{name}.json", f"{name}.md"] + [os.path.basename(p) for p in pngs.values()]
  doc = {"name": name, "headline": headline(results), "results": results,
         "files": files}
  paths = {"json": os.path.join(out, f"{name}.json"),
           "markdown": os.path.join(out, f"{name}.md"), "plots": pngs}
  _atomic_write(paths["json"], json.dumps(to_jsonable(doc), indent=1, allow_nan=False))
  _atomic_write(paths["markdown"], _markdown(results, name, files))
  return paths


def compare_report(runs: Sequence[tuple[str, dict]], workdir: str, *,
                   name: str = "rm_compare", write: bool = True) -> dict | None:
  """Headline numbers of several checkpoints side by side: `<name>.json` {metrics, runs:
  [{label, headline}]}, `<name>.md` (one row per checkpoint) and `<name>.png` (grouped bars
  with 95% CIs where available; booleans and the fitted temperature are left out).
  Returns the paths {json, markdown, plot} (None when `write` is False)."""
  heads = [(label, headline(res)) for label, res in runs]
  metrics = list(dict.fromkeys(m for _, h in heads for m in h))
  if not write:
    return None
  out = _outdir(workdir)
  paths = {"json": os.path.join(out, f"{name}.json"),
           "markdown": os.path.join(out, f"{name}.md"), "plot": os.path.join(out, f"{name}.png")}

  def cell(h, m):
    v = h.get(m)
    if v is None:
      return "—"
    return _fmt(v["value"]) + (f" {_ci(v)}" if v.get("ci_lo") is not None else "")

  md = [f"# Reward-model comparison: {name}", ""]
  md += _table(["checkpoint"] + metrics, [[label] + [cell(h, m) for m in metrics]
                                          for label, h in heads])
  md += ["## Files", "", f"- `{name}.json`", f"- `{name}.png`", ""]
  bars = [m for m in metrics if m != "fitted temperature"
          and not any(isinstance(h.get(m, {}).get("value"), bool) for _, h in heads)]
  fig, ax = _figure(max(6.4, 1.2 * len(bars) + 2), 4.5)
  if bars:
    _plot_bars(ax, bars, [[h.get(m) for m in bars] for _, h in heads],
               labels=[label for label, _ in heads])
    ax.legend(fontsize=8)
  ax.set(ylabel="value", title="Checkpoint comparison (95% CI where available)")
  _save(fig, paths["plot"])
  _atomic_write(paths["json"], json.dumps(to_jsonable(
      {"name": name, "metrics": metrics,
       "runs": [{"label": label, "headline": h} for label, h in heads]}),
      indent=1, allow_nan=False))
  _atomic_write(paths["markdown"], "\n".join(md))
  return paths
