"""DPO (or any DPO-family loss) on the built-in synthetic preference task, on CPU.

python -m alignjax.main --config=configs/dpo.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_dpo

The policy starts from the SFT default's checkpoint (`:checkpoint=<sft workdir>`; empty:
a random initialisation). `:task=arithmetic` (default): pairs of the SFT task's problems,
chosen = the sum, rejected = a near miss (one digit changed). `:task=letters`: the hidden
rule of the synthetic preference task (prompts are 4 distinct letters; the chosen response
contains more of them), best from a random initialisation (the arithmetic SFT model has
never seen letters). Prints the held-out implicit-reward accuracy before (50%: policy =
reference, ties count 1/2) and after. Variants: `:loss=ipo` (any DPO-family name, or several joined by "+", e.g.
`:loss=dpo_sigmoid+rpo`), `:beta=0.1`, `:reference=precomputed` (needs records written by
the ref_logps task), `:ref_update_steps=100` (dynamic anchor).
`:hf_path=/path/to/checkpoint` with `--config.data.train_files=...` for real data.
See docs/dpo.md.
"""

from alignjax import configlib
from alignjax.data.preference import default_preference_data_config
from alignjax.data.sft import default_data_config
from alignjax.trainers.dpo import dpo_config


def get_config(arg=None):
  args = configlib.parse_arg(arg, task="arithmetic", steps=200, batch=32, lr=1e-3,
                             loss="dpo_sigmoid", beta=-1.0, reference="live", ref_update_steps=0,
                             checkpoint="", preset="tiny", hf_path="")
  if args.task not in ("arithmetic", "letters"):
    raise ValueError(f"configs/dpo.py: task={args.task!r}; choose arithmetic or letters.")
  c = configlib.base_config("dpo")
  c.model.preset = args.preset
  c.model.hf_path = args.hf_path
  c.model.checkpoint = args.checkpoint
  c.tokenizer.kind = "hf" if args.hf_path else "char"
  names = tuple(args.loss.split("+"))
  c.dpo = dpo_config(names[0] if len(names) == 1 else names)
  c.dpo.beta = args.beta
  c.dpo.reference = args.reference
  c.dpo.ref_update_steps = args.ref_update_steps
  c.dpo.true_pref_prob = 0.99   # the synthetic rules are deterministic: alpha ~ 1
  c.data = default_preference_data_config()
  c.data.arithmetic = default_data_config().arithmetic
  if not args.hf_path:
    c.data.synthetic = "arithmetic" if args.task == "arithmetic" else "preference"
    c.data.seq_len = 12 if args.task == "arithmetic" else 16
  c.data.batch_size = args.batch
  c.optimizer.learning_rate = args.lr
  c.optimizer.warmup_steps = min(20, args.steps // 10)
  c.optimizer.weight_decay = 0.0
  c.optimizer.b2 = 0.98
  c.train.num_steps = args.steps
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_steps = 8
  c.checkpoint.every = 200
  return c
