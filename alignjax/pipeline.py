"""Task `pipeline`: run several tasks in order, each in `<workdir>/<stage>`.

`config.stages` names the stages; `config.<stage>` is that stage's full config (any task).
A string value anywhere in a stage config may contain `{workdir}`, replaced by the pipeline's
workdir, so a stage can start from an earlier one (e.g. `model.checkpoint="{workdir}/sft"`).
Finished stages are resumed like any run (their checkpoints are found and training skipped).
"""

from __future__ import annotations

import os

import jax
import ml_collections


def _fill(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `cfg` with `{workdir}` substituted in every string (also inside tuples)."""
  def sub(v):
    if isinstance(v, str):
      return v.replace("{workdir}", workdir)
    if isinstance(v, (tuple, list)):
      return type(v)(sub(x) for x in v)
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      return {k: sub(x) for k, x in v.items()}
    return v
  return ml_collections.ConfigDict(sub(cfg.to_dict()))


def run(config, workdir: str) -> dict:
  from alignjax import tasks  # noqa: PLC0415 (tasks imports this module lazily)
  missing = [s for s in config.stages if s not in config]
  if missing:  # checked before any stage runs
    raise ValueError(f"config.stages names {missing} but those config sections are missing.")
  results = {}
  for stage in config.stages:
    stage_cfg = _fill(config[stage], workdir)
    if jax.process_index() == 0:
      print(f"== pipeline stage {stage} (task {stage_cfg.task}) ==", flush=True)
    results[stage] = tasks.run_task(stage_cfg, os.path.join(workdir, stage))
    if isinstance(results[stage], dict) and "preempted_at" in results[stage]:
      return {**results, "preempted_at": results[stage]["preempted_at"]}  # rerun resumes here
  return results
