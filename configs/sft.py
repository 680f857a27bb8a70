"""Supervised fine-tuning of a local Hugging Face checkpoint on JSONL/Parquet records.

python -m alignjax.main --config=configs/sft.py --workdir=/tmp/sft \
  --config.model.hf_path=/path/to/Qwen2.5-0.5B-Instruct \
  --config.data.train_files=/path/to/train.jsonl

`:size=tiny` (the default) uses the tiny Qwen2 fixture checkpoint and the sample records in
configs/data/, so the whole pipeline runs on a CPU; `:size=full` expects the paths above.
"""

import os

from alignjax import configlib
from alignjax.data.sft import default_data_config

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


def get_config(arg=None):
  args = configlib.parse_arg(arg, size="tiny", steps=1000, batch=32, seq_len=1024, lr=1e-5)
  c = configlib.base_config("sft")
  c.data = default_data_config()
  c.data.seq_len = args.seq_len
  c.data.batch_size = args.batch
  c.data.packing = True
  c.optimizer.learning_rate = args.lr
  c.optimizer.weight_decay = 0.0
  c.train.num_steps = args.steps
  c.train.eval_every = 200
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  if args.size == "tiny":
    c.model.hf_path = os.path.join(_REPO, "third_party", "hf_fixtures", "qwen2")
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.train_files = os.path.join(_HERE, "data", "sft_sample.jsonl")
    c.data.eval_files = os.path.join(_HERE, "data", "sft_sample_eval.jsonl")
    c.data.seq_len = min(args.seq_len, 128)
    c.data.batch_size = min(args.batch, 8)
    c.optimizer.learning_rate = 1e-3
    c.train.num_steps = min(args.steps, 50)
    c.train.log_every = 10
    c.train.eval_every = 25
    c.train.eval_steps = 1
    c.checkpoint.every = 25
  elif args.size != "full":
    raise ValueError(f"configs/sft.py: size={args.size!r}; expected 'tiny' or 'full'.")
  c.optimizer.warmup_steps = min(100, c.train.num_steps // 10)
  return c
