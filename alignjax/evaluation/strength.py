"""Preference strength from a reward-model ensemble, written back into the data (task
`pref_strength`; METHODS `pref_strength`, `strength_filter`; Secrets of RLHF in Large Language
Models Part II: Reward Modeling).

Every member e of the ensemble (all members of every model in `strength.checkpoints`) scores
each pair: d_e = r_e(chosen) - r_e(rejected), [E, N]; mu = mean_e d_e, sigma = std_e d_e. The
output JSONL holds the input records with `mu` written to `strength.mu_field` (default
`margin`, which bt_margin / bt_flip / secrets2 read) and sigma to `strength.sigma_field`, then
optionally flipped (pairs with mu < -tau_flip get chosen and rejected swapped, mu negated and
`strength_flipped: true`) and then filtered (`strength_filter` on the flipped mu), with the
ensemble's `route` code for the original pair (0 flip, 1 smooth, 2 margin) in
`strength.route_field`.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignjax import parallel
from alignjax.data import preference as pref_data
from alignjax.data import records as records_lib
from alignjax.data import sft as sft_data
from alignjax.evaluation import rm as rm_eval
from alignjax.losses import ensemble
from alignjax.trainers import common
from alignjax.trainers import reward_model as rm_task


def strength_config() -> ml_collections.ConfigDict:
  """`config.strength`."""
  return ml_collections.ConfigDict(dict(
      checkpoints=(),        # reward_model workdirs / HF seq-cls dirs: the ensemble members
      output="",             # JSONL to write (default <workdir>/pref_strength.jsonl)
      split="train",         # which data split to annotate (data.<split>_files or synthetic)
      max_records=0,         # 0: all (a synthetic source needs a limit)
      mu_field="margin", sigma_field="margin_std", route_field="strength_route",
      filter="none",         # none | threshold | quantile | snr (ensemble.strength_filter)
      tau_keep=0.0, q=0.1,
      flip=False, tau_flip=0.0, delta=0.0,
  ))


def _member_diffs(model, run_cfg, rows, mesh, rules, batch: int) -> np.ndarray:
  """[E, N] reward differences chosen - rejected for every member of one model."""
  out = rm_eval._Scorer(model, mesh, rules, batch)(rows)            # [2N, E, A]
  weights = rm_task.attribute_weights(run_cfg) if run_cfg is not None else ()
  r = np.asarray(rm_task.scalar_rewards(jnp.asarray(out), weights))  # [2N, E]
  r = r.reshape(-1, 2, r.shape[-1])                                  # [N, 2, E]
  return (r[:, 0] - r[:, 1]).T


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "pref_strength"`."""
  sc, dc = config.strength, config.data
  if not sc.checkpoints:
    raise ValueError("config.strength.checkpoints is empty: list the reward models whose "
                     "members vote (reward_model workdirs or HF seq-cls dirs).")
  tokenizer = common.build_tokenizer(config)
  source = sft_data.open_records(dc, split=sc.split, seed=config.seed, kind="pairwise")
  n = len(source) if sc.max_records <= 0 else min(len(source), sc.max_records)
  records, rows = [], []
  for i in range(n):
    where = source.where(i)
    raw = source[i]
    rec = records_lib.validate_preference(raw, where, kind="pairwise")
    prompt, responses = pref_data.encode_preference(
        rec, tokenizer, where, context_template=dc.context_template)
    row, _ = pref_data.preference_rows(prompt, responses, seq_len=dc.seq_len,
                                       pad_id=tokenizer.pad_id,
                                       min_response_tokens=dc.min_response_tokens, where=where)
    records.append(dict(raw))
    rows.append(row)
  flat = {k: np.concatenate([r[k] for r in rows]) for k in ("tokens", "positions", "segment_ids")}
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = parallel.rules_from_config(config.sharding_rules.to_dict())
  diffs = []
  with parallel.use_mesh(mesh, rules):
    for path in sc.checkpoints:
      model, run_cfg = rm_eval.load_reward_model(path, tokenizer, mesh, rules)
      diffs.append(_member_diffs(model, run_cfg, flat, mesh, rules, dc.batch_size))
  d_ExN = jnp.asarray(np.concatenate(diffs), jnp.float32)
  if d_ExN.shape[0] < 2:
    raise ValueError("Preference strength needs at least 2 ensemble members (the spread is "
                     "their standard deviation); list more checkpoints or train with "
                     "reward.ensemble / reward.ensemble_backbones > 1.")
  mu, sigma = ensemble.pref_strength(d_ExN)
  # The secrets2 route of each pair as the ensemble sees it (0 flip, 1 smooth, 2 margin).
  route = np.asarray(ensemble.route(mu, delta=sc.delta, tau_flip=sc.tau_flip))
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  # Flipping first: a confidently reversed pair is repaired, not filtered away.
  flip = (mu < -sc.tau_flip) if sc.flip else np.zeros(n, bool)
  mu = np.where(flip, -mu, mu)
  keep = (np.ones(n, bool) if sc.filter == "none" else
          np.asarray(ensemble.strength_filter(jnp.asarray(mu), jnp.asarray(sigma),
                                              tau_keep=sc.tau_keep, mode=sc.filter, q=sc.q)))
  out_records = []
  for i, rec in enumerate(records):
    if not keep[i]:
      continue
    if flip[i]:
      rec["chosen"], rec["rejected"] = rec["rejected"], rec["chosen"]
    rec[sc.mu_field], rec[sc.sigma_field] = float(mu[i]), float(sigma[i])
    rec[sc.route_field] = int(route[i])
    rec["strength_flipped"] = bool(flip[i])
    out_records.append(rec)
  flipped = int(flip[keep].sum())
  output = sc.output or os.path.join(workdir, "pref_strength.jsonl")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(output)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      for rec in out_records:
        f.write(json.dumps(rec) + "\n")
    os.replace(tmp, output)
    print(f"preference strength: {n} pairs scored by {d_ExN.shape[0]} members; kept "
          f"{len(out_records)}, flipped {flipped} of them; kept mean mu "
          f"{mu[keep].mean() if keep.any() else float('nan'):.3f}, mean sigma "
          f"{sigma[keep].mean() if keep.any() else float('nan'):.3f} -> {output}", flush=True)
  return {"num_scored": n, "num_kept": len(out_records), "num_flipped": flipped,
          "mu": mu, "sigma": sigma, "output": output}
