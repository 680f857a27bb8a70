"""Reference log-probs stored with the dataset (task `ref_logps`), for
`dpo.reference="precomputed"`.

python -m alignjax.main --config=configs/ref_logps.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_ref

Scores the records of configs/dpo.py's data (`:task=arithmetic` or `letters`, the first
`:max_records` of each split; or `--config.data.train_files=...` / `eval_files`) with the
reference (`:checkpoint=` an alignjax run, `:hf_path=` a local HF checkpoint, else the
preset's random initialisation) and writes `<workdir>/train.jsonl` and `eval.jsonl` with
`ref_chosen_logps` / `ref_rejected_logps` (pairwise) or `ref_logps` (listwise) added. Then:

python -m alignjax.main --config=configs/dpo.py:checkpoint=...,reference=precomputed \
    --config.data.synthetic= --config.data.train_files=/tmp/alignjax_ref/train.jsonl \
    --config.data.eval_files=/tmp/alignjax_ref/eval.jsonl --workdir=/tmp/alignjax_dpo_pre

See docs/dpo.md.
"""

import os

from alignjax import configlib
from alignjax.trainers.ref_logps import ref_logps_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  args = configlib.parse_arg(arg, task="arithmetic", checkpoint="", hf_path="", preset="tiny",
                             max_records=2048, batch=64, kind="pairwise")
  dpo = configlib.load_config_file(
      os.path.join(_HERE, "dpo.py"),
      f"task={args.task},checkpoint={args.checkpoint},preset={args.preset}"
      + (f",hf_path={args.hf_path}" if args.hf_path else ""))
  c = configlib.base_config("ref_logps")
  for section in ("model", "tokenizer", "data", "train", "mesh", "sharding_rules"):
    c[section] = dpo[section]
  c.ref_logps = ref_logps_config()
  c.ref_logps.max_records = args.max_records
  c.ref_logps.batch_size = args.batch
  c.ref_logps.kind = args.kind
  return c
