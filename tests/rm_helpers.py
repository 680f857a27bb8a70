"""Shared by the reward-model evaluation tests: a quickly trained tiny reward model."""

import os

from alignjax import configlib, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(name: str, arg: str | None = None):
  return configlib.load_config_file(os.path.join(REPO, "configs", name), arg)


def train_reward_model(workdir, arg: str = "steps=20,batch=16"):
  """Trains configs/reward_model.py:<arg> quietly in `workdir`; returns its config."""
  rm = config_file("reward_model.py", arg)
  rm.train.progress_bar = False
  rm.train.eval_steps = 0
  rm.train.peak_flops_per_device = 1e9
  tasks.run_task(rm, str(workdir))
  return rm
