"""GRPO (or any `rl.algorithm`) on the built-in verifiable arithmetic task, on CPU.

python -m alignjax.main --config=configs/grpo.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_grpo

The policy starts from an SFT checkpoint (`:checkpoint=<sft workdir>`; empty: a random
initialisation, which never finds a correct answer to learn from). Each RL step samples
`prompts` problems x `group` completions, rewards exact answers (`math_reward`, numeric
equality with the problem's answer), and takes one PPO-clip step on group-normalised
advantages. Prints held-out greedy accuracy before and after. Variants: `:algorithm=` any
name in alignjax.trainers.rl.ALGORITHMS (dr_grpo, dapo, gspo, rloo, reinforce_pp, ppo, raft,
online_dpo, ...), `:kl=0.04` (KL to the reference in the loss), `:steps=`, `:lr=`.
`:prompts_file=<jsonl>` trains on your own prompt records ({"prompt", "answer", ...}) with
`:hf_path=<local HF checkpoint>`. See docs/rl.md.
"""

from alignjax import configlib
from alignjax.data.sft import default_data_config
from alignjax.trainers.rl import rl_config


def get_config(arg=None):
  args = configlib.parse_arg(arg, algorithm="grpo", checkpoint="", preset="tiny", hf_path="",
                             steps=40, prompts=16, group=8, max_new_tokens=8, lr=3e-4,
                             temperature=1.0, kl=0.0, digits=2, epochs=1, mini_batches=1,
                             prompts_file="", eval_examples=200)
  c = configlib.base_config("rl")
  c.model.preset = args.preset
  c.model.hf_path = args.hf_path
  c.model.checkpoint = args.checkpoint
  c.tokenizer.kind = "hf" if args.hf_path else "char"
  c.rl = rl_config(args.algorithm)
  c.rl.num_prompts = args.prompts
  c.rl.group_size = args.group
  c.rl.max_new_tokens = args.max_new_tokens
  c.rl.temperature = args.temperature
  c.rl.kl_coef = args.kl
  c.rl.epochs = args.epochs
  c.rl.mini_batches = args.mini_batches
  c.rl.eval_examples = args.eval_examples
  c.rl.rewards = "math_reward"
  if args.algorithm in ("raft", "superhf"):
    c.rl.raft_tau = 0.5  # 0/1 reward: fine-tune only on correct samples, never a group's
                         # "best" wrong one
  c.data = default_data_config()
  if args.prompts_file:
    c.data.train_files = args.prompts_file
  else:
    c.data.synthetic = "arithmetic"
    c.data.arithmetic.max_digits = args.digits
  c.optimizer.learning_rate = args.lr
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = min(10, args.steps // 10)
  c.optimizer.weight_decay = 0.0
  c.train.num_steps = args.steps
  c.train.log_every = 5
  c.train.eval_every = 0
  c.checkpoint.every = 20
  return c
