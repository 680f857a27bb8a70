"""Reward-model evaluation (task `eval_rm`): score held-out preference pairs with one or more
reward models and write a report (JSON + Markdown + PNG plots) per model, plus a comparison.

Each entry of `eval_rm.checkpoints` is either an alignjax `reward_model` workdir (its
config.json says how to build the model; parameters come from its latest checkpoint) or a
Hugging Face `*ForSequenceClassification` directory. Metrics (alignjax.evaluation.metrics):
pairwise accuracy overall and per subset (`eval.pairwise_acc`), calibration (`eval.ece`,
`eval.reliability`, fitted temperature), reward histograms, and the length-bias probes
(`eval.length_bias_probe`): (a) own answer vs. a >= 2x longer answer to another prompt,
(b) per-prompt slope of reward on log length over K answers (listwise eval data), (c) the
answer vs. the same answer with its last sentence repeated; contrast-set consistency
(`eval.contrast_consistency`) from `eval_rm.contrast_files`.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from alignjax import parallel
from alignjax.data import preference as pref_data
from alignjax.evaluation import metrics, report
from alignjax.models import reward
from alignjax.trainers import common
from alignjax.trainers import reward_model as rm_task


def eval_rm_config() -> ml_collections.ConfigDict:
  """`config.eval_rm`."""
  return ml_collections.ConfigDict(dict(
      checkpoints=(),       # alignjax reward_model workdirs and/or HF seq-cls directories
      names=(),             # report names (default: the directory names)
      max_examples=1024,    # eval pairs scored per model (a finite pass stops earlier)
      ece_bins=10,
      # Length-bias probes (METHODS 6.8): "offtopic" (a), "slope" (b; needs listwise eval
      # records with >= 3 answers per prompt, so listwise=True), "filler" (c).
      probes=("offtopic", "filler"),
      offtopic_min_ratio=2.0,  # (a): the other answer is at least this many times longer
      listwise=False,          # also score K answers per prompt (data.max_responses): best-of-K,
                               # one-vs-many MRR, Kendall tau vs. the data's scores, slopes (b)
      max_lists=256,           # prompts with K answers scored
      # Contrast sets (METHODS 6.7): JSONL/Parquet records {"prompt_1", "response_1",
      # "prompt_2", "response_2"}: two similar instructions with their gold answers.
      contrast_files="",
      seed=0,
  ))


def _is_hf_dir(path: str) -> bool:
  cfg = os.path.join(path, "config.json")
  if not os.path.exists(cfg) or os.path.isdir(os.path.join(path, "checkpoints")):
    return False
  with open(cfg) as f:
    return any(a.endswith("ForSequenceClassification")
               for a in json.load(f).get("architectures", []))


def load_reward_model(path: str, tokenizer, mesh, rules):
  """(model, aggregate config) for an alignjax reward_model workdir or a HF seq-cls dir."""
  if _is_hf_dir(path):
    return reward.load_hf_reward_model(path, mesh, rules), None
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{path}: neither an alignjax reward_model workdir (config.json + "
                            "checkpoints/) nor a Hugging Face *ForSequenceClassification dir.")
  with open(cfg_file) as f:
    run_cfg = ml_collections.ConfigDict(json.load(f))
  if run_cfg.get("task") != "reward_model":
    raise ValueError(f"{cfg_file}: task={run_cfg.get('task')!r}; eval_rm needs a reward_model "
                     "run.")
  cfg = common.model_config(run_cfg, tokenizer.vocab_size)
  return rm_task.load_trained(run_cfg, path, cfg, mesh, rules), run_cfg


def _scalar(out_NxExA: np.ndarray, run_cfg) -> np.ndarray:
  """[N] rewards: attributes combined and ensemble members aggregated as the training run's
  config says (`reward.attribute_weights`, `reward.aggregate`); a HF model has one output."""
  if run_cfg is None:
    if out_NxExA.shape[-1] != 1:
      raise ValueError("eval_rm scores HF reward models with a single output (num_labels=1).")
    return out_NxExA[:, 0, 0]
  return np.asarray(rm_task.ensemble_rewards(out_NxExA, run_cfg), np.float64)


class _Scorer:
  """Scores [N, L] rows on the mesh, data-parallel, in chunks; returns numpy [N, E, A]."""

  def __init__(self, model, mesh, rules, chunk: int):
    self.model, self.mesh, self.rules = model, mesh, rules
    shards = math.prod(mesh.shape[a] for a in (rules or parallel.DEFAULT_RULES)["batch"])
    self.chunk = max(shards, chunk - chunk % shards)
    self.fn = nnx.jit(lambda m, t, p, s: m(t, p, s))

  def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
    n = len(rows["tokens"])
    outs = []
    for start in range(0, n, self.chunk):
      part = {k: rows[k][start:start + self.chunk] for k in ("tokens", "positions", "segment_ids")}
      pad = self.chunk - len(part["tokens"])
      part = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in part.items()}
      sharding = parallel.batch_sharding(self.mesh, self.rules, 2)
      placed = [jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
                for v in (part["tokens"], part["positions"], part["segment_ids"])]
      out = self.fn(self.model, *placed)
      outs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:self.chunk - pad])
    return np.concatenate(outs)


def collect_eval(config, tokenizer, max_examples: int, kind: str = "pairwise"
                 ) -> dict[str, np.ndarray]:
  """The eval split's examples as global numpy arrays (every process gets all of them)."""
  dc = config.data
  it = pref_data.make_preference_iterator(
      dc, tokenizer, kind=kind, seq_len=dc.seq_len, global_batch_size=dc.batch_size,
      seed=config.seed, split="eval", num_epochs=1)
  vocab = dict(getattr(it, "vocabularies", {}))
  batches = []
  for _ in range(max(1, math.ceil(max_examples / dc.batch_size))):
    b = next(it, None)
    if b is None:  # this host ran out: filler rows keep hosts in step
      b = {k: np.zeros_like(v) for k, v in batches[-1].items()}
    batches.append(b)
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  if jax.process_count() > 1:
    cat = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in cat.items()}
  keep = cat["example_mask"] > 0
  out = {k: v[keep][:max_examples] for k, v in cat.items()}
  out["vocabularies"] = vocab
  return out


def _split_row(tokens, response_mask, segment_ids):
  real = segment_ids > 0
  prompt = tokens[real & (response_mask == 0)].tolist()
  response = tokens[response_mask > 0].tolist()
  return prompt, response


def _with_filler(response: list[int], tokenizer) -> list[int]:
  """The response with its last sentence repeated (before a final eos)."""
  end = [response[-1]] if response and response[-1] == tokenizer.eos_id else []
  body = response[:len(response) - len(end)]
  text = tokenizer.decode(body)
  sentences = [s for s in re.split(r"(?<=[.!?\n])\s*", text) if s.strip()]
  last = sentences[-1] if sentences else text
  sep = "" if not text or text[-1].isspace() else " "
  return tokenizer.encode(text + sep + last.strip()) + end


def _rows(items, tokenizer, seq_len: int):
  out = [pref_data.preference_rows(p, [r], seq_len=seq_len, pad_id=tokenizer.pad_id)[0]
         for p, r in items]
  return {k: np.concatenate([o[k] for o in out]) for k in out[0]} if out else None


def _chosen_parts(pairs):
  return [_split_row(pairs["tokens"][i, 0], pairs["response_mask"][i, 0],
                     pairs["segment_ids"][i, 0]) for i in range(len(pairs["tokens"]))]


def offtopic_rows(pairs, tokenizer, seq_len: int, rng, min_ratio: float):
  """Probe (a): prompt_i + chosen_j, j a deranged answer >= `min_ratio` x longer.
  Returns (rows or None, partner index [N], -1 where no partner)."""
  split = _chosen_parts(pairs)
  lengths = np.array([len(r) for _, r in split])
  partner = metrics.derangement_pairs(lengths, rng, min_ratio=min_ratio)
  items = [(split[i][0], split[j][1]) for i, j in enumerate(partner) if j >= 0]
  return _rows(items, tokenizer, seq_len), partner


def filler_rows(pairs, tokenizer, seq_len: int):
  """Probe (c): prompt_i + chosen_i with its last sentence repeated."""
  return _rows([(p, _with_filler(r, tokenizer)) for p, r in _chosen_parts(pairs)],
               tokenizer, seq_len)


CONTRAST_FIELDS = ("prompt_1", "response_1", "prompt_2", "response_2")


def contrast_rows(config, tokenizer) -> dict[str, np.ndarray]:
  """Rows r(I_a, R_b) for a, b in {1, 2} of every contrast record: [4 * B, L] in the order
  (1,1), (1,2), (2,1), (2,2)."""
  from alignjax.data import sources  # noqa: PLC0415
  from alignjax.data.records import RecordError  # noqa: PLC0415
  source = sources.open_source(config.eval_rm.contrast_files, config.data.format)
  items = []
  for i in range(len(source)):
    rec, where = source[i], source.where(i)
    for field in CONTRAST_FIELDS:
      if not isinstance(rec.get(field) if isinstance(rec, dict) else None, str):
        raise RecordError(where, field, "a contrast record needs four strings "
                          f"{CONTRAST_FIELDS}", "fix the record")
    for a in (1, 2):
      prompt, responses = pref_data.encode_preference(
          {"prompt": rec[f"prompt_{a}"], "responses": [rec["response_1"], rec["response_2"]]},
          tokenizer, where, context_template=config.data.context_template)
      items += [(prompt, r) for r in responses]
  return _rows(items, tokenizer, config.data.seq_len)


def listwise_metrics(rewards_PxK: np.ndarray, lists) -> dict:
  """Best-of-K accuracy, one-vs-many MRR (the data's best answer vs. the others; prompts whose
  best answer is tied are left out) and Kendall tau-b between rewards and the data's scores
  (prompts with all K answers)."""
  valid, scores, order = lists["valid"] > 0, lists["scores"], lists["order"]
  rows = np.arange(len(order))
  best = order[:, 0]
  second = np.take_along_axis(scores, order[:, 1:2], axis=1)[:, 0]
  unique = (scores[rows, best] > second) & (valid.sum(1) >= 2)
  r_pos = rewards_PxK[rows, best][unique]
  neg_mask = valid.copy()
  neg_mask[rows, best] = False
  r_neg = np.where(neg_mask, rewards_PxK, -np.inf)[unique]
  full = valid.all(axis=1)
  return {
      "best_of_k": metrics.best_of_k_acc(r_pos, r_neg, neg_mask[unique]),
      "mrr": metrics.one_vs_many_mrr(r_pos, r_neg, neg_mask[unique]),
      "kendall_tau": metrics.kendall_tau(rewards_PxK[full], scores[full]),
  }


def evaluate_model(model, run_cfg, config, tokenizer, pairs, lists, mesh, rules,
                   name: str, contrast=None) -> tuple:
  """(results, plots) of one reward model on `pairs` (and `lists`, K answers per prompt)."""
  ec = config.eval_rm
  scorer = _Scorer(model, mesh, rules, config.data.batch_size)
  n = len(pairs["tokens"])
  flat = {k: pairs[k].reshape(n * 2, -1) for k in ("tokens", "positions", "segment_ids")}
  r = _scalar(scorer(flat), run_cfg).reshape(n, 2)
  r_c, r_r = r[:, 0], r[:, 1]
  subsets = pairs["vocabularies"].get("subset") or ()
  groups = (np.array([subsets[i] if i < len(subsets) else str(i) for i in pairs["subset_id"]])
            if len(set(pairs["subset_id"].tolist())) > 1 else None)
  temp = metrics.fit_temperature(r_c, r_r)
  results = {
      "meta": {"model": name, "n_pairs": int(n), "data": config.data.eval_files or
               config.data.synthetic},
      "pairwise": metrics.pairwise_acc(r_c, r_r, groups=groups),
      "ece": metrics.ece(r_c, r_r, bins=ec.ece_bins),
      "temperature": temp,
      "reward_chosen": metrics.reward_histogram(r_c),
      "reward_rejected": metrics.reward_histogram(r_r),
  }
  plots = {"histogram": {"chosen": r_c, "rejected": r_r}}
  probes = set(ec.probes)
  unknown = probes - {"offtopic", "slope", "filler"}
  if unknown:
    raise ValueError(f"config.eval_rm.probes: unknown {sorted(unknown)}; use offtopic, slope, "
                     "filler.")
  seq_len = config.data.seq_len
  kw = {}
  if "offtopic" in probes:
    rows, partner = offtopic_rows(pairs, tokenizer, seq_len, np.random.default_rng(ec.seed),
                                  ec.offtopic_min_ratio)
    kw.update(r_own=r_c[partner >= 0],
              r_other=_scalar(scorer(rows), run_cfg) if rows is not None else np.zeros(0))
  if "filler" in probes:
    kw.update(r_orig=r_c, r_filler=_scalar(scorer(filler_rows(pairs, tokenizer, seq_len)),
                                           run_cfg))
  if lists is not None:
    p, k = lists["tokens"].shape[:2]
    flat_l = {key: lists[key].reshape(p * k, -1) for key in ("tokens", "positions", "segment_ids")}
    rewards = _scalar(scorer(flat_l), run_cfg).reshape(p, k)
    results.update(listwise_metrics(rewards, lists))
    if "slope" in probes:
      lengths = lists["length"].astype(np.float64)
      kw.update(rewards=rewards, lengths=lengths, mask=lists["valid"] > 0)
      plots["length"] = {"rewards": rewards, "lengths": lengths, "mask": lists["valid"] > 0}
  if contrast is not None:
    s = _scalar(scorer(contrast), run_cfg).reshape(-1, 2, 2)
    results["contrast"] = metrics.contrast_consistency(s)
  if groups is not None:
    names = set(groups.tolist())
    if any(names & set(s) for s in metrics.REWARDBENCH_SECTIONS.values()):
      results["rb_score"] = metrics.rb_score(results["pairwise"]["groups"])
  languages = pairs["vocabularies"].get("language") or ()
  if len(set(pairs["language_id"].tolist())) > 1:
    lang = np.array([languages[i] for i in pairs["language_id"]])
    results["by_language"] = metrics.by_language(
        r_c, r_r, lang, groups if groups is not None else np.full(n, "all"))
  if kw:
    results["length_bias"] = metrics.length_bias_probe(**kw)
  return results, plots


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "eval_rm"`: one report per model, and a comparison."""
  ec = config.eval_rm
  if not ec.checkpoints:
    raise ValueError("config.eval_rm.checkpoints is empty: list reward_model workdirs or HF "
                     "*ForSequenceClassification directories to evaluate.")
  names = list(ec.names) or [os.path.basename(os.path.normpath(p)) for p in ec.checkpoints]
  if len(names) != len(ec.checkpoints):
    raise ValueError("config.eval_rm.names must be empty or name every checkpoint.")
  tokenizer = common.build_tokenizer(config)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = parallel.rules_from_config(config.sharding_rules.to_dict())
  pairs = collect_eval(config, tokenizer, ec.max_examples)
  if "slope" in ec.probes and not ec.listwise:
    raise ValueError("config.eval_rm.probes has 'slope', which needs listwise eval records "
                     "(K answers per prompt): set config.eval_rm.listwise=True.")
  lists = collect_eval(config, tokenizer, ec.max_lists, "listwise") if ec.listwise else None
  contrast = contrast_rows(config, tokenizer) if ec.contrast_files else None
  write = jax.process_index() == 0
  runs = []
  with parallel.use_mesh(mesh, rules):
    for name, path in zip(names, ec.checkpoints):
      model, run_cfg = load_reward_model(path, tokenizer, mesh, rules)
      results, plots = evaluate_model(model, run_cfg, config, tokenizer, pairs, lists, mesh,
                                      rules, name, contrast)
      report.write_report(results, os.path.join(workdir, name), name="rm_eval", plots=plots,
                          write=write)
      runs.append((name, results))
      acc = results["pairwise"]["accuracy"]
      flag = results.get("length_bias", {}).get("flag", {}).get("flag")
      logging.info("%s: pairwise accuracy %.3f, length-bias flag %s", name, acc, flag)
      if write:
        print(f"{name}: held-out pairwise accuracy {acc:.1%}, ECE "
              f"{results['ece']['ece']:.3f}, length-bias flag: {flag}", flush=True)
  if len(runs) > 1:
    report.compare_report(runs, workdir, write=write)
  return {name: res for name, res in runs}
