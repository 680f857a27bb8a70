"""Precomputed reference log-probs (task `ref_logps`): stores them with the dataset.

Reads the preference records of `data` (files or a synthetic task), scores every response
with the reference model (`model.*`: a checkpoint, a local HF path, or a preset) and writes
the records back as JSONL with the summed completion log-probs added:

  pairwise: `ref_chosen_logps`, `ref_rejected_logps` (of the record's chosen / rejected,
            as written, before any label orientation)
  listwise: `ref_logps` [K] (one per response, in the record's order)

to `<ref_logps.output_dir or workdir>/<split>.jsonl`. A `dpo` run with
`dpo.reference="precomputed"` and `data.train_files` / `data.eval_files` pointing at these
files then needs no reference forward pass. Files are written to a temporary name and
renamed when complete, so an interrupted run leaves nothing half-written. Single process.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from alignjax import parallel
from alignjax.data import preference as pref_data
from alignjax.data import sft as sft_lib
from alignjax.trainers import common
from alignjax.trainers.dpo import REF_FIELDS, sequence_logps


def ref_logps_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind="pairwise",          # pairwise | listwise records
      splits=("train", "eval"),
      output_dir="",            # default: the workdir
      batch_size=32,
      max_records=0,            # 0: every record (a synthetic task needs a limit)
  ))


def _records(config, split):
  dc, rc = config.data, config.ref_logps
  source = sft_lib.open_records(dc, split=split, seed=config.seed, kind=rc.kind)
  n = len(source) if rc.max_records <= 0 else min(len(source), rc.max_records)
  if dc.synthetic and rc.max_records <= 0:
    raise ValueError("config.ref_logps.max_records must be > 0 for a synthetic task (its "
                     f"source has a nominal {len(source)} records).")
  return source, n


def write_split(config, model, tokenizer, split: str, path: str, mesh, rules) -> int:
  """Scores the records of `split` and writes them with reference log-probs to `path`."""
  dc, rc = config.data, config.ref_logps
  source, n = _records(config, split)
  stats = pref_data.PreferenceStats()
  build = pref_data._PreferenceExample(dc, tokenizer, kind=rc.kind, seq_len=dc.seq_len,
                                       vocabularies={f: () for f in pref_data.VOCAB_FIELDS},
                                       stats=stats)
  chunk = config.train.logprob_chunk_size
  vchunk = int(config.train.get("logprob_vocab_chunk_size", 0)) or None
  keys = ("tokens", "positions", "segment_ids", "response_mask")
  score = jax.jit(lambda m, b: sequence_logps(m, b, chunk, vchunk)[2])
  ways = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  bs = -(-rc.batch_size // ways) * ways  # a multiple of the batch-sharding devices
  tmp = path + ".tmp"
  with open(tmp, "w") as out:
    for start in range(0, n, bs):
      idx = list(range(start, min(n, start + bs)))
      raws = [source[i] for i in idx]
      examples = [build(r, source.where(i)) for r, i in zip(raws, idx)]
      batch = {k: np.stack([e[k] for e in examples]) for k in keys}
      rows = len(idx)
      if rows < bs:  # pad to a fixed shape (one compilation)
        batch = {k: np.concatenate([v, np.zeros((bs - rows,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
      k = batch["tokens"].shape[1]
      sums = np.asarray(jax.device_get(score(model, parallel.shard_batch(batch, mesh, rules))))
      sums = sums.reshape(bs, k)[:rows]
      for raw, s, e in zip(raws, sums, examples):
        record = dict(raw)
        if rc.kind == "pairwise":
          record[REF_FIELDS["pairwise"][0]] = float(s[0])
          record[REF_FIELDS["pairwise"][1]] = float(s[1])
        else:
          n_resp = len(raw["responses"])
          record["ref_logps"] = [float(v) for v in s[:n_resp]]
        out.write(json.dumps(record) + "\n")
  os.replace(tmp, path)
  return n


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "ref_logps"`."""
  if jax.process_count() > 1:
    raise ValueError("The ref_logps task runs in a single process; run it on one host.")
  rc = config.ref_logps
  if rc.kind not in REF_FIELDS:
    raise ValueError(f"config.ref_logps.kind={rc.kind!r}; expected one of {tuple(REF_FIELDS)}.")
  out_dir = rc.output_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  tokenizer = common.build_tokenizer(config)
  cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = parallel.rules_from_config(config.sharding_rules.to_dict())
  summary = {}
  with parallel.use_mesh(mesh, rules):
    model = common.build_model(config, cfg, mesh, rules)
    for split in rc.splits:
      path = os.path.join(out_dir, f"{split}.jsonl")
      summary[f"num_{split}"] = write_split(config, model, tokenizer, split, path, mesh, rules)
      summary[f"{split}_file"] = path
      logging.info("ref_logps: %d %s records -> %s", summary[f"num_{split}"], split, path)
      print(f"reference log-probs of {summary[f'num_{split}']} {split} records: {path}",
            flush=True)
  return summary
