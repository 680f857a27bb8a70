"""Config and batch recorder shared by the multi-process test and its worker."""

import contextlib

from alignjax.trainers import loop


def config(num_steps: int):
  from configs import default
  c = default.get_config(f"only=sft,steps={num_steps},batch=16,digits=5")
  c.optimizer.schedule = "constant"  # the 6 + 2 resumed steps see the same schedule as 8
  c.optimizer.warmup_steps = 0
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_steps = 0
  c.train.peak_flops_per_device = 0.0  # measured per process at start-up
  c.train.progress_bar = False
  c.checkpoint.every = 3
  c.sft.eval_examples = 4  # greedy held-out accuracy runs on the global mesh too
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


@contextlib.contextmanager
def record_batches():
  """Records the host-local `tokens` of every batch placed on the mesh."""
  seen = []
  original = loop.parallel.shard_batch

  def recording(batch, mesh, rules=None):
    seen.append(batch["tokens"].copy())
    return original(batch, mesh, rules)

  loop.parallel.shard_batch = recording
  try:
    yield seen
  finally:
    loop.parallel.shard_batch = original
