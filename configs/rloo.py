"""RLOO (leave-one-out baseline, PPO-clip token-mean) on the built-in arithmetic task, on CPU: `configs/grpo.py` with
`rl.algorithm = "rloo"` (every other argument of configs/grpo.py applies).

python -m alignjax.main --config=configs/rloo.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_rloo
"""

import os

from alignjax import configlib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = ",".join(filter(None, ["algorithm=rloo", arg or ""]))
  return configlib.load_config_file(os.path.join(_HERE, "grpo.py"), arg)
