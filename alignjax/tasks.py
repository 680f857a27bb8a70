"""The task table: `config.task` -> the function that runs it. A new task adds one line."""

from __future__ import annotations

import importlib

# task name -> "module:function(config, workdir)".
TASKS = {
    "sft": "alignjax.trainers.sft:run",
    "reward_model": "alignjax.trainers.reward_model:run",
    "eval_rm": "alignjax.evaluation.rm:run",
    "pref_strength": "alignjax.evaluation.strength:run",
    "dpo": "alignjax.trainers.dpo:run",
    "ref_logps": "alignjax.trainers.ref_logps:run",
    "generate": "alignjax.sampling.task:run",
    "rl": "alignjax.trainers.rl:run",
    "pipeline": "alignjax.pipeline:run",
    "overoptimization": "alignjax.experiments.overoptimization:run",
}


def run_task(config, workdir: str):
  """Dispatches on `config.task`; returns the task's result (e.g. final metrics)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is unknown; choose one of {sorted(TASKS)}.")
  module, fn = TASKS[config.task].split(":")
  return getattr(importlib.import_module(module), fn)(config, workdir)
