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


def dpo_config(num_steps: int):
  """DPO with a live reference that the dynamic anchor moves (ref_update_steps=2, alpha .5),
  so a resumed run must restore the reference from the checkpoint."""
  from configs import dpo
  c = dpo.get_config(f"steps={num_steps},batch=16,ref_update_steps=2")
  c.dpo.ref_update_alpha = 0.5
  c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
  c.train.log_every, c.train.eval_every, c.train.eval_steps = 1, 0, 1
  c.train.peak_flops_per_device = 0.0
  c.train.progress_bar = False
  c.checkpoint.every = 3
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


def rl_config(num_steps: int):
  """GRPO with a k3 KL to a live reference, 2 epochs x 2 mini-batches, on a (2,2,2) mesh; a
  checkpoint every RL step."""
  from configs import grpo
  c = grpo.get_config(f"steps={num_steps},prompts=4,group=4,max_new_tokens=4,kl=0.04,"
                      "epochs=2,mini_batches=2,eval_examples=4")
  c.rl.eval_samples = 0
  c.train.log_every, c.train.progress_bar = 1, False
  c.checkpoint.every = 1
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
