"""RAFT (reward-ranked fine-tuning: SFT on the best of each group) on the built-in arithmetic task, on CPU: `configs/grpo.py` with
`rl.algorithm = "raft"` (every other argument of configs/grpo.py applies).

python -m alignjax.main --config=configs/raft.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_raft
"""

import os

from alignjax import configlib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = ",".join(filter(None, ["algorithm=raft", arg or ""]))
  return configlib.load_config_file(os.path.join(_HERE, "grpo.py"), arg)
