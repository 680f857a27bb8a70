"""Orbax checkpoints of the train state and the data-iterator state.

`<workdir>/checkpoints/<step>/` holds `state` (step, params, optimizer state, RNG; sharded
arrays written by every process) and `data` (one grain iterator state per process). Orbax
writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Save / restore / keep-N around `ocp.CheckpointManager`."""

  def __init__(self, directory: str, cfg):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save)
    self._mgr = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state, data_iter, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._mgr.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, state, data_iter, step: int | None = None):
    """Restores into the shapes and shardings of `state`; `data_iter` is updated in place."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mgr.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], data_iter

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.close()
