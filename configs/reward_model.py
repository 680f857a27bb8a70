"""Reward-model training: a tiny transformer learns a hidden preference rule from scratch.

python -m alignjax.main --config=configs/reward_model.py --workdir=/tmp/alignjax_rm

The built-in synthetic task: prompts are 4 distinct letters, responses 4-8 letters, and the
hidden score of a response is how many of the prompt's letters it contains; chosen has the
higher score (length carries no signal). Prints held-out pairwise accuracy before and after
(about 50% -> above 90%). Variants: `:loss=bt_center`, `:head=mlp`, `:ensemble=4` (heads),
`:ensemble_backbones=4` (parameter sets), `:length_bias=True` (chosen is always longer in
training: a deliberately length-biased RM), `:loss=rm_regression` (rated records: the hidden
score and the length), `:loss=bt_plus_regression` (2-response lists with rated scores),
`:hf_path=/path/to/checkpoint` with `--config.data.train_files=...` for real data.
See docs/reward_models.md.
"""

from alignjax import configlib
from alignjax.data.preference import default_preference_data_config
from alignjax.losses import registry
from alignjax.trainers.reward_model import loss_config, reward_config


def get_config(arg=None):
  args = configlib.parse_arg(arg, steps=1200, batch=64, lr=3e-3, loss="bt", head="linear",
                             ensemble=1, ensemble_backbones=1, length_bias=False, preset="tiny",
                             hf_path="")
  c = configlib.base_config("reward_model")
  c.model.preset = args.preset
  c.model.hf_path = args.hf_path
  c.tokenizer.kind = "hf" if args.hf_path else "char"
  c.reward = reward_config()
  c.reward.head = args.head
  c.reward.ensemble = args.ensemble
  c.reward.ensemble_backbones = args.ensemble_backbones
  c.loss = loss_config(args.loss)
  c.data = default_preference_data_config()
  if not args.hf_path:
    c.data.synthetic = "preference"
    c.data.preference.length_bias = args.length_bias
    c.data.seq_len = 16
    if args.loss == "bt_plus_regression":  # lists of 2 responses scored by the hidden rule
      c.data.max_responses = 2
      c.data.preference.num_responses = 2
    elif registry.get(args.loss).kind == "rated":  # the synthetic rated records' scores
      c.data.attributes = ("score", "length")
      c.reward.num_outputs = 2
      c.reward.attribute_weights = (1.0, 0.0)
  c.data.batch_size = args.batch
  c.optimizer.learning_rate = args.lr
  c.optimizer.warmup_steps = min(50, args.steps // 10)
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98
  c.train.num_steps = args.steps
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.eval_steps = 8
  c.checkpoint.every = 600
  return c
