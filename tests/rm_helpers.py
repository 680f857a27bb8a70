"""Shared by the tests: a quickly trained tiny reward model; sharded-step comparisons."""

import os

import jax
import numpy as np
import optax
from flax import nnx

from alignjax import configlib, parallel, tasks
from alignjax.trainers import loop

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


SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}


def assert_sharded_steps_match(task, meshes, frozen_fn=None):
  """One train step of `task` on a single device and on each mesh in `meshes`: equal loss,
  grad norm, metrics and updated parameters. SGD, so updated parameters differ exactly as
  the gradients do (Adam's first step, g / (|g| + eps), would amplify float noise in near-zero
  entries). `frozen_fn(frozen) -> frozen` may change the task's frozen state first (e.g. move
  a DPO reference away from the policy)."""
  batch = next(task.train_iter())
  tx = optax.sgd(1.0)
  results = []
  for sizes in (SINGLE, *meshes):
    mesh = parallel.make_mesh(sizes, jax.devices()[:1] if sizes == SINGLE else None)
    with parallel.use_mesh(mesh):
      model = task.build_model(mesh, parallel.DEFAULT_RULES)
      frozen = task.build_frozen(model, mesh, parallel.DEFAULT_RULES) if task.build_frozen \
          else None
      if frozen is not None and frozen_fn is not None:
        frozen = frozen_fn(frozen)
      graphdef, params = nnx.split(model)
      state = loop.init_state(params, tx, mesh, parallel.DEFAULT_RULES, 0, frozen)
      step = jax.jit(loop.make_train_step(graphdef, task.loss_fn, tx, lambda s: 1e-3))
      state, metrics = step(state, parallel.shard_batch(batch, mesh))
      results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m0, p0), rest = results[0], results[1:]
  for m, p in rest:
    for k in m0:
      np.testing.assert_allclose(m[k], m0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(p0)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  return results
