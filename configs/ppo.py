"""PPO with a learned critic (GAE, clipped value loss; KL penalty in the reward) on the built-in arithmetic task, on CPU: `configs/grpo.py` with
`rl.algorithm = "ppo"` (every other argument of configs/grpo.py applies).

python -m alignjax.main --config=configs/ppo.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_ppo
"""

import os

from alignjax import configlib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = ",".join(filter(None, ["algorithm=ppo", arg or ""]))
  return configlib.load_config_file(os.path.join(_HERE, "grpo.py"), arg)
