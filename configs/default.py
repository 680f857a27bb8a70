"""The default run: the alignjax pipeline on a tiny model, on CPU, offline, in a few minutes.

python -m alignjax.main --config=configs/default.py --workdir=/tmp/alignjax_default

Stages (each in <workdir>/<stage>):
  sft                         a tiny transformer learns multi-digit addition from scratch, for
                              a short warm start (held-out exact-match accuracy 0% -> 57%).
  grpo                        GRPO from the SFT model against the verifiable reward (exact
                              sum), 150 RL steps of 64 problems x 8 samples, 4 epochs x 2
                              mini-batches (configs/grpo.py): held-out greedy accuracy
                              57% -> 69%, sampled at temperature 1 16% -> 56%.
  dpo                         DPO from the SFT model on pairs (correct sum vs. a near miss);
                              held-out implicit-reward accuracy (50% -> ~86%; configs/dpo.py).
  reward_model                a reward model learns a hidden preference rule (held-out
                              pairwise accuracy ~50% -> ~90%; see configs/reward_model.py).
  reward_model_length_biased  the same on data where the chosen answer is always longer.
  eval_rm                     both reward models on unbiased held-out pairs: reports, plots,
                              and the length-bias probe, which flags only the biased one.

`:only=sft` (or grpo / dpo / reward_model / reward_model_length_biased) gives a single
stage's config (`:only=eval_rm`, `:only=grpo` and `:only=dpo` also need their `{workdir}`
paths set: `--config.eval_rm.checkpoints=...`, `--config.model.checkpoint=...`; `{workdir}`
is filled in only by the pipeline); `:steps=` and the other arguments size the SFT stage,
`:grpo_steps=` the GRPO stage, `:dpo_steps=` the DPO stage, `:rm_steps=` the reward models.
"""

import os

import ml_collections

from alignjax import configlib
from alignjax.data.sft import default_data_config

_HERE = os.path.dirname(os.path.abspath(__file__))
# The SFT stage is a short warm start that leaves room for RL; GRPO then trains against the
# exact-answer reward (arguments of configs/grpo.py).
SFT_STEPS = 300
GRPO_STEPS = 150
GRPO_ARGS = "prompts=64,group=8,lr=3e-4,max_new_tokens=8,epochs=4,mini_batches=2"


def sft_config(steps=1500, digits=2, batch=64, lr=3e-3, preset="tiny"):
  """SFT on synthetic arithmetic with the character tokenizer."""
  c = configlib.base_config("sft")
  c.model.preset = preset
  c.tokenizer.kind = "char"
  c.data = default_data_config()
  c.data.synthetic = "arithmetic"
  c.data.arithmetic.max_digits = digits
  c.data.seq_len = 4 * digits + 4
  c.data.batch_size = batch
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = min(100, steps // 10)
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98
  c.train.num_steps = steps
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_steps = 4
  c.checkpoint.every = 500
  c.sft.eval_examples = 200
  return c


def get_config(arg=None):
  args = configlib.parse_arg(arg, only="", steps=SFT_STEPS, digits=2, batch=64, lr=3e-3,
                             preset="tiny", rm_steps=1200, dpo_steps=200,
                             grpo_steps=GRPO_STEPS)
  sft = sft_config(args.steps, args.digits, args.batch, args.lr, args.preset)
  if args.only == "sft":
    return sft
  rm_file = os.path.join(_HERE, "reward_model.py")
  # The reward models start from scratch: their task (letters) shares nothing with the SFT
  # task (digits). To start one from the SFT model instead, set
  # `--config.reward_model.model.checkpoint="{workdir}/sft"` (tested in tests/test_pipeline.py).
  rm = configlib.load_config_file(rm_file, f"steps={args.rm_steps},preset={args.preset}")
  biased = configlib.load_config_file(
      rm_file, f"steps={args.rm_steps},preset={args.preset},length_bias=True")
  dpo = configlib.load_config_file(os.path.join(_HERE, "dpo.py"),
                                   f"steps={args.dpo_steps},preset={args.preset}")
  dpo.model.checkpoint = "{workdir}/sft"
  grpo = configlib.load_config_file(os.path.join(_HERE, "grpo.py"),
                                    f"steps={args.grpo_steps},preset={args.preset},"
                                    f"digits={args.digits},{GRPO_ARGS}")
  grpo.model.checkpoint = "{workdir}/sft"
  ev = configlib.load_config_file(os.path.join(_HERE, "eval_rm.py"))
  ev.eval_rm.checkpoints = ("{workdir}/reward_model", "{workdir}/reward_model_length_biased")
  stages = {"sft": sft, "grpo": grpo, "dpo": dpo, "reward_model": rm, "reward_model_length_biased": biased, "eval_rm": ev}
  if args.only:
    if args.only not in stages:
      raise ValueError(f"configs/default.py: only={args.only!r}; choose one of {list(stages)}.")
    return stages[args.only]
  c = ml_collections.ConfigDict({"task": "pipeline", "stages": tuple(stages), **stages})
  return c
