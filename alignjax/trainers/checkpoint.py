"""Orbax checkpoints of the train state and the data-iterator state.

`<workdir>/checkpoints/<step>/` holds `state` (step, params, optimizer state, RNG; sharded
arrays written by every process), `data` (one grain iterator state per process) and optionally
`extra` (a small JSON dict of host state). Orbax
writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import os

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

  def save(self, step: int, state, data_iter, force: bool = False,
           extra: dict | None = None) -> bool:
    """`extra`: a small JSON-able dict of host state (written by process 0, in the same atomic
    checkpoint directory; e.g. the RL trainer's reward-transform states)."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if extra is not None:
      args["extra"] = ocp.args.JsonSave(extra)
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

  def restore_extra(self, step: int | None = None) -> dict | None:
    """The `extra` dict saved with checkpoint `step` (latest by default); None if it has
    none."""
    step = self.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(self.directory, str(step), "extra")):
      return None
    restored = self._mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return restored["extra"]

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.close()


def find_checkpoint_dir(path: str) -> str:
  """`path` itself if it holds numbered checkpoints, else `path/checkpoints` (a workdir)."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def restore_params(path: str, abstract_params, step: int | None = None):
  """Only the model parameters of an alignjax checkpoint (workdir or checkpoints dir), into the
  shapes and shardings of `abstract_params` (e.g. to start a new task from an SFT run)."""
  directory = find_checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No alignjax checkpoint in {directory}: the directory does not "
                            "exist; pass a workdir of an earlier run or its checkpoints/.")
  mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No alignjax checkpoint in {directory}; pass a workdir of a "
                            "finished run or its checkpoints/ directory.")
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_params)
  item = {"params": target}
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  mgr.close()
  return restored["state"]["params"]
