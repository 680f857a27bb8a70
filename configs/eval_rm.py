"""Evaluate reward models on held-out preference pairs; write reports and a comparison.

python -m alignjax.main --config=configs/eval_rm.py --workdir=/tmp/rm_eval \
  --config.eval_rm.checkpoints="('/tmp/alignjax_rm', '/tmp/alignjax_rm_biased')"

Default data: the synthetic preference task's eval split (unbiased), char tokenizer. For real
data set `--config.data.eval_files=...` and `--config.tokenizer.path=...`.
"""

from alignjax import configlib
from alignjax.data.preference import default_preference_data_config
from alignjax.evaluation.rm import eval_rm_config


def get_config(arg=None):
  args = configlib.parse_arg(arg, checkpoints="", examples=1024, tokenizer="char")
  c = configlib.base_config("eval_rm")
  c.tokenizer.kind = args.tokenizer
  c.data = default_preference_data_config()
  c.data.synthetic = "preference"
  c.data.seq_len = 16
  c.data.batch_size = 64
  c.eval_rm = eval_rm_config()
  c.eval_rm.checkpoints = tuple(p for p in str(args.checkpoints).split("+") if p)
  c.eval_rm.max_examples = args.examples
  # The synthetic task's answers are 4-8 letters: a 1.5x longer partner exists, 2x does not.
  # Its gold score counts distinct prompt letters, so repeating an answer (filler) is
  # out-of-distribution for a reward model trained on it rather than a length test: the
  # default probes here are (a) off-topic longer answers and (b) length slopes.
  c.eval_rm.offtopic_min_ratio = 1.5
  c.eval_rm.probes = ("offtopic", "slope")
  c.eval_rm.listwise = True  # the synthetic task also makes K-answer lists
  return c
