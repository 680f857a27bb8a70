"""Reward over-optimisation, with and without reward shaping: the showcase experiment.

python -m alignjax.main --config=configs/overoptimization.py --workdir=/tmp/alignjax_overopt

On the built-in letters task (the prompt is a word of 4 letters; the true score of a response
is how many of those letters it contains), on CPU, offline:
  sft       a tiny policy imitates letter strings (true score uniform over 0..4);
  gold      a reward model trained long on unbiased pairs of every length 1..12 (the proxies
            and the policy's SFT data have 4..8 letters): the "gold" judge;
  proxy_e   `ensemble` smaller proxy reward models (`:proxy=limited`: few steps on unbiased
            pairs, the setting of Gao et al.; `:proxy=length_biased`: trained where the chosen
            response is always longer, a reward model that learned length);
  bon       best-of-N of the SFT policy by the proxy (and the ensemble), scored by gold;
  rl_<m>    GRPO against the proxy with each shaping method m in raw, ensemble (mean - std
            over the proxies), lsc (log-sigmoid centred on reference rewards), par (sigmoid
            centred); gold RM, true score, KL and collapse monitors every `curve_every` steps.
Writes <workdir>/report.md with PNG plots (docs/overoptimization.md).

Arguments: proxy, ensemble, proxy_steps, gold_steps, sft_steps, rl_steps, prompts, group,
lr, kl, curve_every, methods ("raw+ensemble+lsc+par"), bon_samples, preset.
"""

import os

import ml_collections

from alignjax import configlib
from alignjax.data.sft import default_data_config
from alignjax.experiments.overoptimization import overopt_config
from alignjax.trainers.rl import rl_config

_HERE = os.path.dirname(os.path.abspath(__file__))
LETTERS = dict(prompt_len=4, min_len=4, max_len=8, num_records=1_000_000, eval_fraction=0.1)


def _letters_data():
  d = default_data_config()
  d.synthetic = "preference"
  d.preference = dict(LETTERS)
  return d


def sft_config(steps, preset):
  c = configlib.base_config("sft")
  c.model.preset = preset
  c.tokenizer.kind = "char"
  c.data = _letters_data()
  c.data.seq_len = 16
  c.data.batch_size = 64
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = min(30, steps // 10)
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98
  c.train.num_steps = steps
  c.train.log_every = 100
  c.train.eval_every = 0
  c.checkpoint.every = steps
  c.sft.eval_examples = 0
  return c


def rm_config(steps, seed, preset, length_bias=False):
  c = configlib.load_config_file(os.path.join(_HERE, "reward_model.py"),
                                 f"steps={steps},preset={preset},length_bias={length_bias}")
  c.seed = seed
  c.checkpoint.every = steps
  c.train.eval_every = 0
  return c


def rl_stage_config(args):
  c = configlib.base_config("rl")
  c.model.preset = args.preset
  c.tokenizer.kind = "char"
  c.model.checkpoint = "{workdir}/sft"
  c.rl = rl_config("grpo")
  c.rl.num_prompts = args.prompts
  c.rl.group_size = args.group
  c.rl.max_new_tokens = 12
  c.rl.kl_coef = args.kl
  c.rl.epochs = 2
  c.rl.mini_batches = 2
  c.rl.ref_reward_samples = 4
  c.rl.eval_examples = 0
  c.rl.curve_every = args.curve_every
  c.rl.curve_prompts = 64
  c.rl.curve_samples = 4
  c.data = _letters_data()
  c.optimizer.learning_rate = args.lr
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = min(5, args.rl_steps // 10)
  c.optimizer.weight_decay = 0.0
  c.train.num_steps = args.rl_steps
  c.train.log_every = 5
  c.train.eval_every = 0
  c.checkpoint.every = args.curve_every
  return c


def get_config(arg=None):
  args = configlib.parse_arg(arg, proxy="limited", ensemble=3, proxy_steps=150, gold_steps=2000,
                             sft_steps=300, rl_steps=40, prompts=32, group=8, lr=3e-4, kl=0.0,
                             curve_every=5, methods="raw+ensemble+lsc+par", bon_samples=32,
                             preset="tiny")
  if args.proxy not in ("limited", "length_biased"):
    raise ValueError(f"configs/overoptimization.py: proxy={args.proxy!r}; choose 'limited' or "
                     "'length_biased'.")
  c = ml_collections.ConfigDict()
  c.task = "overoptimization"
  c.sft = sft_config(args.sft_steps, args.preset)
  # The gold judge sees every length a policy can produce (1..12 letters, hits up to the
  # length), unlike the proxies and the SFT data (4..8 letters).
  c.gold = rm_config(args.gold_steps, 1, args.preset)
  c.gold.data.preference.update(min_len=1, max_len=12, hits="by_length")
  c.gold.data.seq_len = 24
  c.proxy = rm_config(args.proxy_steps, 10, args.preset,
                      length_bias=args.proxy == "length_biased")
  c.rl = rl_stage_config(args)
  c.overopt = overopt_config()
  c.overopt.methods = tuple(m for m in args.methods.split("+") if m)
  c.overopt.ensemble_size = args.ensemble
  c.overopt.bon_samples = args.bon_samples
  return c
