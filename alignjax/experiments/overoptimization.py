"""Task `overoptimization`: reward over-optimisation with and without reward shaping.

The protocol of "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
Reward Hacking" and "Scaling Laws for Reward Model Overoptimization" at tiny size, on the
built-in letters task (alignjax.data.synthetic.PreferenceSource, whose ground truth is known):

  1. `sft`: a base policy imitates letter strings (stage config `config.sft`).
  2. `gold`: a reward model trained long on unbiased pairs (`config.gold`), the stand-in for
     human judgement; the task's true score (`letters_score`) is reported beside it.
  3. `proxy_0..proxy_{E-1}`: E proxy reward models (`config.proxy`, seeds proxy.seed + e), each
     trained on less (or biased) data: what a policy is optimised against.
  4. best-of-N on the base policy (eval.bon_curve, METHODS 6.14): the expected gold score of
     the proxy-best of N samples against KL_bon = log N - (N-1)/N, for the single proxy and the
     ensemble.
  5. one RL run per shaping method (`overopt.methods`) against the proxy, from the SFT policy,
     with the gold RM and the true score as monitors (`rl.monitor_rewards`) and an evaluation
     every `rl.curve_every` steps on fixed held-out prompts (eval.overopt_curve, METHODS 6.15,
     and eval.collapse_monitors, 6.18):
       raw       the proxy reward as it is;
       ensemble  all E proxies, `ensemble_aggregate` (mean - lam * std);
       lsc       `lsc_transform`: log sigmoid(r - r_ref), r_ref from reference-policy samples;
       par       `par_transform`: sigmoid(r - r_ref).
  6. a report: <workdir>/report.md, report.json and PNG plots.

Every stage runs in <workdir>/<stage> and resumes like any run. See docs/overoptimization.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from alignjax.evaluation import metrics
from alignjax.evaluation import overopt
from alignjax.evaluation import report as rep
from alignjax.rewards import shaping

METHODS = ("raw", "ensemble", "lsc", "par")


def overopt_config() -> ml_collections.ConfigDict:
  """`config.overopt`: the experiment's own keys."""
  return ml_collections.ConfigDict(dict(
      methods=METHODS,       # shaping methods to train with (any subset, in this order)
      ensemble_size=3,       # E proxy reward models (raw and lsc / par use proxy_0)
      ensemble_mode="mean_minus_std",
      ensemble_lam=1.0,
      bon_prompts=64,        # held-out prompts for the best-of-N curve
      bon_samples=32,        # n samples per prompt (N = 1, 2, 4, ..., n)
      report_name="report",
  ))


def _fill(cfg, workdir):
  from alignjax import pipeline  # noqa: PLC0415
  return pipeline._fill(cfg, workdir)  # noqa: SLF001


def _rm_reward(path: str, alias: str) -> dict:
  return {"name": "reward_model", "alias": alias, "params": {"path": path}}


def method_rewards(method: str, proxies: list[str], oc) -> tuple[list, list]:
  """(rl.rewards, rl.reward_transforms) of a shaping method; proxies are RM workdirs."""
  if method == "raw":
    return [_rm_reward(proxies[0], "proxy_0")], []
  if method == "ensemble":
    return ([_rm_reward(p, f"proxy_{e}") for e, p in enumerate(proxies)],
            [{"name": "ensemble_aggregate",
              "params": {"mode": oc.ensemble_mode, "lam": float(oc.ensemble_lam)}}])
  if method == "lsc":
    return [_rm_reward(proxies[0], "proxy_0")], [{"name": "lsc_transform"}]
  if method == "par":
    return [_rm_reward(proxies[0], "proxy_0")], [{"name": "par_transform"}]
  raise ValueError(f"config.overopt.methods: unknown method {method!r}; choose from {METHODS}.")


def check_config(config) -> None:
  oc = config.overopt
  for m in oc.methods:
    if m not in METHODS:
      raise ValueError(f"config.overopt.methods: unknown method {m!r}; choose from {METHODS}.")
  if oc.ensemble_size < 1:
    raise ValueError("config.overopt.ensemble_size must be >= 1.")
  if "ensemble" in oc.methods and oc.ensemble_size < 2:
    raise ValueError("config.overopt.methods has 'ensemble' but ensemble_size < 2.")
  if oc.ensemble_mode not in shaping.ENSEMBLE_MODES:
    raise ValueError(f"config.overopt.ensemble_mode={oc.ensemble_mode!r}; choose one of "
                     f"{shaping.ENSEMBLE_MODES}.")
  if oc.bon_samples < 1 or oc.bon_prompts < 1:
    raise ValueError("config.overopt.bon_samples and bon_prompts must be >= 1.")
  if config.rl.rl.curve_every <= 0:
    raise ValueError("config.rl.curve_every must be > 0: the RL curves are its rows.")


def _rl_config(config, workdir, rewards, transforms):
  d = _fill(config.rl, workdir).to_dict()
  d["rl"].update(rewards=rewards, reward_transforms=transforms)
  return ml_collections.ConfigDict(d)


def best_of_n(config, workdir: str, proxies: list[str]) -> tuple[dict, dict]:
  """Samples `bon_samples` completions of the base policy per held-out prompt and scores them
  with every proxy, the gold RM and the true score; returns the best-of-N curves and each
  reward model's agreement with the true score on those samples (Kendall tau-b within each
  prompt, mean over prompts)."""
  from alignjax.trainers.rl import RLTrainer  # noqa: PLC0415
  from alignjax import parallel  # noqa: PLC0415
  oc = config.overopt
  cfg = _rl_config(config, workdir, [_rm_reward(p, f"proxy_{e}") for e, p in enumerate(proxies)],
                   [])
  cfg.rl.curve_every = 0
  cfg.checkpoint.resume = False
  trainer = RLTrainer(cfg, os.path.join(workdir, "bon"))
  src = trainer.eval_src if len(trainer.eval_src) else trainer.train_src
  records = [src[i] for i in range(min(oc.bon_prompts, len(src)))]
  n = oc.bon_samples
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    _, out = trainer._generate(state, records, 0, 96, n)  # noqa: SLF001
  _, res, _ = trainer._score(records, out, n)  # noqa: SLF001
  _, mon, _ = trainer._score(records, out, n, trainer.monitors)  # noqa: SLF001
  p = len(records)
  cols = {name: res.values[:, k].reshape(p, n) for k, name in enumerate(res.names)}
  gold = mon.values[:, mon.names.index("gold")].reshape(p, n)
  true = mon.values[:, mon.names.index("letters_score")].reshape(p, n)
  curves = {"raw": overopt.bon_curve(cols["proxy_0"], gold, extra={"true": true})}
  corr = lambda a: metrics.kendall_tau(a, true)["mean"]   # within prompt, mean over prompts
  correlation = {"gold": corr(gold), **{k: corr(v) for k, v in cols.items()}}
  if len(proxies) > 1:
    ens = np.asarray(shaping.ensemble_aggregate(res.values, mode=oc.ensemble_mode,
                                                lam=float(oc.ensemble_lam))).reshape(p, n)
    curves["ensemble"] = overopt.bon_curve(ens, gold, extra={"true": true,
                                                             "proxy_0": cols["proxy_0"]})
  return curves, correlation


def _plot_bon(curves, path):
  fig, axes = _figures(1, 2)
  for name, c in curves.items():
    axes[0].plot(c["kl"], c["gold"], "o-", label=f"{name} proxy")
    axes[1].plot(c["kl"], c.get("true", [math.nan] * len(c["kl"])), "o-", label=name)
  axes[0].set(xlabel="KL(best-of-N || policy) = log N - (N-1)/N", ylabel="gold RM",
              title="Best-of-N: gold reward")
  axes[1].set(xlabel="KL(best-of-N || policy)", ylabel="true score (letters)",
              title="Best-of-N: true score")
  for ax in axes:
    ax.legend(fontsize=8)
  rep._save(fig, path)  # noqa: SLF001


def _figures(rows, cols, w=5.2, h=3.8):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  fig = Figure(figsize=(w * cols, h * rows), dpi=100)
  FigureCanvasAgg(fig)
  return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def _plot_rl(curves, rows_by_method, path):
  fig, axes = _figures(1, 3)
  for m, c in curves.items():
    axes[0].plot(c["sqrt_kl"], c["proxy"], "o-", label=m)
    axes[1].plot(c["sqrt_kl"], c["gold"], "o-", label=m)
    true = [r.get("monitor/letters_score", math.nan) for r in rows_by_method[m]]
    axes[2].plot(c["sqrt_kl"], true, "o-", label=m)
  for ax, what in zip(axes, ("proxy RM (proxy_0)", "gold RM", "true score (letters)")):
    ax.set(xlabel="sqrt KL(pi || pi_ref)", ylabel=what, title=f"RL: {what}")
    ax.legend(fontsize=8)
  rep._save(fig, path)  # noqa: SLF001


def _plot_collapse(rows_by_method, path):
  keys = ("entropy", "length_mean", "distinct_2", "unique_answers")
  fig, axes = _figures(1, len(keys), w=4.2)
  for m, rows in rows_by_method.items():
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes, keys):
      ax.plot(steps, [r.get(k, math.nan) for r in rows], "o-", label=m)
  for ax, k in zip(axes, keys):
    ax.set(xlabel="RL step", ylabel=k, title=k)
    ax.legend(fontsize=8)
  rep._save(fig, path)  # noqa: SLF001


def write_report(results: dict, workdir: str, name: str = "report") -> dict:
  """<workdir>/<name>.md, <name>.json and <name>_{bon,rl,collapse}.png (atomic writes)."""
  out = rep._outdir(workdir)  # noqa: SLF001
  files = {k: os.path.join(out, f"{name}_{k}.png") for k in ("bon", "rl", "collapse")}
  _plot_bon(results["bon"], files["bon"])
  _plot_rl(results["curves"], results["rows"], files["rl"])
  _plot_collapse(results["rows"], files["collapse"])
  rep._atomic_write(os.path.join(out, f"{name}.json"),  # noqa: SLF001
                    json.dumps(rep.to_jsonable(results), indent=1))
  rep._atomic_write(os.path.join(out, f"{name}.md"), _markdown(results, name))  # noqa: SLF001
  return files


def _markdown(results: dict, name: str) -> str:
  t = rep._table  # noqa: SLF001
  meta = results["meta"]
  lines = [f"# Reward over-optimisation: {meta['title']}", "",
           meta["setup"], "",
           "## Reward models", ""]
  corr = results["rm_true_correlation"]
  lines += t(["model", "held-out pairwise accuracy (its own data)",
              "Kendall tau with the true score within a prompt (SFT samples)"],
             [[k, v, corr.get(k)] for k, v in results["rm_accuracy"].items()])
  lines += ["## Best-of-N on the base policy (METHODS 6.14)", "",
            f"{meta['bon']}", "", f"![best-of-N]({name}_bon.png)", ""]
  for m, c in results["bon"].items():
    lines += [f"Selection by **{m}**:", ""]
    lines += t(["N", "KL", "proxy", "gold RM", "true score"],
               [[n, k, p, g, tr] for n, k, p, g, tr in zip(c["n"], c["kl"], c["proxy"], c["gold"],
                                                          c["true"])])
  lines += ["## RL against the proxy, per shaping method (METHODS 6.15)", "",
            meta["rl"], "", f"![RL curves]({name}_rl.png)", ""]
  rows = []
  for m, c in results["curves"].items():
    tr = [r.get("monitor/letters_score", math.nan) for r in results["rows"][m]]
    rows.append([m, c["sqrt_kl"][-1], c["proxy"][0], c["proxy"][-1], c["gold"][0],
                 c["gold_peak"], c["t_star"], c["gold"][-1], c["gold_drop"], tr[0], tr[-1]])
  lines += t(["method", "final sqrt KL", "proxy start", "proxy end", "gold start", "gold peak",
              "peak step", "gold end", "gold drop from peak", "true start", "true end"], rows)
  lines += ["Every evaluation row:", ""]
  for m, c in results["curves"].items():
    lines += [f"**{m}**", ""]
    lines += t(["step", "KL", "proxy", "gold", "true", "length", "entropy", "distinct-2"],
               [[r["step"], r["kl"], r.get("reward/proxy_0"), r.get("monitor/gold"),
                 r.get("monitor/letters_score"), r.get("length_mean"), r.get("entropy"),
                 r.get("distinct_2")] for r in results["rows"][m]])
  lines += ["## Collapse monitors (METHODS 6.18)", "", f"![collapse]({name}_collapse.png)", ""]
  for m, al in results["alerts"].items():
    fired = [f"step {a['step']}: " + "; ".join(a["alerts"]) for a in al if a["alerts"]]
    lines += [f"- **{m}**: " + ("; ".join(fired) if fired else "no alerts")]
  lines += ["", "## Reading", "", results["reading"], "",
            f"Wall time: {results['wall_time_s']:.0f} s.", ""]
  return "\n".join(lines)


def _verdict(d_gold: float, d_true: float) -> str:
  if d_gold > 0 and d_true > 0:
    return "gold and true score both higher: closes part of the gap"
  return "not higher on both: does not close the gap"


def reading(curves: dict, rows: dict) -> str:
  """A plain-language summary computed from the numbers (no claims beyond them)."""
  true = {m: [r.get("monitor/letters_score", math.nan) for r in rows[m]] for m in curves}
  out = []
  for m, c in curves.items():
    t = true[m]
    tp = int(np.nanargmax(t)) if np.isfinite(t).any() else 0
    out.append(f"- {m}: proxy {c['proxy'][-1] - c['proxy'][0]:+.2f}; gold RM "
               f"{c['gold'][-1] - c['gold'][0]:+.2f} at the end, peak "
               f"{c['gold_peak'] - c['gold'][0]:+.2f} at step {c['t_star']}; true score "
               f"{t[-1] - t[0]:+.2f} at the end, peak {t[tp] - t[0]:+.2f} at step "
               f"{rows[m][tp]['step']}; final sqrt KL {c['sqrt_kl'][-1]:.2f}.")
  if "raw" in curves:
    raw = curves["raw"]
    for m, c in curves.items():
      if m == "raw":
        continue
      dg = (c["gold"][-1] - c["gold"][0]) - (raw["gold"][-1] - raw["gold"][0])
      dt = (true[m][-1] - true[m][0]) - (true["raw"][-1] - true["raw"][0])
      out.append(f"- {m} vs raw at the end: gold RM {dg:+.2f}, true score {dt:+.2f} "
                 f"({_verdict(dg, dt)} on this run; one seed, no error bars).")
  return "\n".join(out)


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "overoptimization"`."""
  from alignjax import tasks  # noqa: PLC0415
  check_config(config)
  t0 = time.time()
  oc = config.overopt
  say = (lambda s: print(s, flush=True)) if jax.process_index() == 0 else (lambda s: None)
  res_sft = tasks.run_task(_fill(config.sft, workdir), os.path.join(workdir, "sft"))
  rm_acc = {}
  gold_dir = os.path.join(workdir, "gold")
  say("== overoptimization: gold reward model ==")
  rm_acc["gold"] = tasks.run_task(_fill(config.gold, workdir), gold_dir).get("eval_accuracy")
  proxies = []
  for e in range(oc.ensemble_size):
    c = _fill(config.proxy, workdir)
    c.seed = config.proxy.seed + e
    d = os.path.join(workdir, f"proxy_{e}")
    say(f"== overoptimization: proxy reward model {e} (seed {c.seed}) ==")
    rm_acc[f"proxy_{e}"] = tasks.run_task(c, d).get("eval_accuracy")
    proxies.append(d)
  monitors = [_rm_reward(gold_dir, "gold"), "letters_score"]
  config = copy.deepcopy(config)
  config.rl.rl.monitor_rewards = monitors
  say("== overoptimization: best-of-N ==")
  bon, correlation = best_of_n(config, workdir, proxies)
  rows, curves = {}, {}
  for m in oc.methods:
    say(f"== overoptimization: RL with {m} ==")
    rewards, transforms = method_rewards(m, proxies, oc)
    summary = tasks.run_task(_rl_config(config, workdir, rewards, transforms),
                             os.path.join(workdir, f"rl_{m}"))
    rows[m] = summary.get("curve") or []
    curves[m] = overopt.overopt_curve(rows[m], proxy="reward/proxy_0", gold="monitor/gold")
  alerts = {m: overopt.collapse_alerts(r) for m, r in rows.items()}
  rc = config.rl.rl
  gp = config.gold.data.preference
  pp = config.proxy.data.preference
  results = {
      "meta": {
          "title": "tiny policy, letters task",
          "setup": (f"Policy: tiny transformer, SFT {config.sft.train.num_steps} steps on letter "
                    "strings. Gold RM: "
                    f"{config.gold.train.num_steps} steps on unbiased pairs of "
                    f"{gp.min_len}..{gp.max_len} letters (hits={gp.hits}, seed "
                    f"{config.gold.seed}). Proxy RMs: {oc.ensemble_size} x "
                    f"{config.proxy.train.num_steps} steps (seeds {config.proxy.seed}.."
                    f"{config.proxy.seed + oc.ensemble_size - 1}) on pairs of "
                    f"{pp.min_len}..{pp.max_len} letters, length_bias={bool(pp.length_bias)}. "
                    "True score: letters_score "
                    "(distinct prompt letters in the response)."),
          "bon": (f"{oc.bon_prompts} held-out prompts x {oc.bon_samples} samples of the SFT "
                  "policy at temperature 1; exact expectation over N-subsets. lsc and par are "
                  "monotone in the proxy within a prompt, so their best-of-N selection equals "
                  "raw's and is not repeated."),
          "rl": (f"{rc.algorithm}, {config.rl.train.num_steps} steps of {rc.num_prompts} prompts "
                 f"x {rc.group_size}, lr {config.rl.optimizer.learning_rate}, kl_coef "
                 f"{rc.kl_coef}; evaluated every {rc.curve_every} steps on {rc.curve_prompts} "
                 f"held-out prompts x {rc.curve_samples} samples. 'proxy' is proxy_0 for every "
                 "method (the ensemble trains on the aggregate of all members)."),
      },
      "rm_accuracy": rm_acc, "rm_true_correlation": correlation, "bon": bon, "curves": curves, "rows": rows, "alerts": alerts,
      "reading": reading(curves, rows), "sft": {k: v for k, v in (res_sft or {}).items()
                                                if isinstance(v, (int, float))},
  }
  results["wall_time_s"] = time.time() - t0
  if jax.process_index() == 0:
    files = write_report(results, workdir, oc.report_name)
    say(f"over-optimisation report: {os.path.join(workdir, oc.report_name + '.md')} "
        f"(plots: {', '.join(os.path.basename(f) for f in files.values())})")
    say(results["reading"])
  return results
