"""The default run: a tiny model learns multi-digit addition from scratch on CPU.

python -m alignjax.main --config=configs/default.py --workdir=/tmp/alignjax_default

Prints held-out exact-match accuracy before and after training (eval prompts are disjoint from
training prompts). Variants: `configs/default.py:steps=300,digits=3`.
"""

from alignjax import configlib
from alignjax.data.sft import default_data_config


def get_config(arg=None):
  args = configlib.parse_arg(arg, steps=1500, digits=2, batch=64, lr=3e-3, preset="tiny")
  c = configlib.base_config("sft")
  c.model.preset = args.preset
  c.tokenizer.kind = "char"
  c.data = default_data_config()
  c.data.synthetic = "arithmetic"
  c.data.arithmetic.max_digits = args.digits
  c.data.seq_len = 4 * args.digits + 4
  c.data.batch_size = args.batch
  c.optimizer.learning_rate = args.lr
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98
  c.train.num_steps = args.steps
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_steps = 4
  c.checkpoint.every = 500
  c.sft.eval_examples = 200
  return c
