"""Preference strength from a reward-model ensemble, written into the data as `margin`.

python -m alignjax.main --config=configs/pref_strength.py --workdir=/tmp/strength \
  --config.strength.checkpoints="('/tmp/rm_ensemble',)" \
  --config.data.train_files=/path/to/pairs.jsonl --config.strength.filter=threshold

The output JSONL (<workdir>/pref_strength.jsonl) trains `bt_margin`, `bt_flip` or `secrets2`
(`--config.data.train_files=<workdir>/pref_strength.jsonl`). Defaults: the synthetic
preference task (first 2048 training pairs) and the character tokenizer.
"""

from alignjax import configlib
from alignjax.data.preference import default_preference_data_config
from alignjax.evaluation.strength import strength_config


def get_config(arg=None):
  args = configlib.parse_arg(arg, checkpoints="", records=2048)
  c = configlib.base_config("pref_strength")
  c.tokenizer.kind = "char"
  c.data = default_preference_data_config()
  c.data.synthetic = "preference"
  c.data.seq_len = 16
  c.data.batch_size = 64
  c.strength = strength_config()
  c.strength.checkpoints = tuple(p for p in str(args.checkpoints).split("+") if p)
  c.strength.max_records = args.records
  return c
