"""The one train loop shared by every task.

A task supplies a `Task`: how to build its (sharded) model, a pure `loss_fn(model, batch)
-> (loss_sum, denominator, metrics)`, its data iterators and an optional evaluation. The loop
owns everything else: optimizer, jit-compiled step with donated state, gradient accumulation,
clipping, metrics (loss, grad norm, learning rate, tokens/s, MFU), evaluation cadence,
Orbax checkpoints with exact resumption, and SIGTERM handling.

Metric convention for `loss_fn`: every metric is a sum over the batch; the loop adds them
over micro-batches and divides by the summed denominator, except keys starting with `num_`,
which are reported as totals.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from alignjax import parallel
from alignjax.trainers import checkpoint as ckpt_lib
from alignjax.trainers import metrics as metrics_lib
from alignjax.trainers.optim import make_optimizer

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass
class Task:
  """What a task gives the loop.

  build_model(mesh, rules) -> nnx.Module, created directly sharded.
  loss_fn(model, batch) -> (loss_sum, denominator, metric sums).
  train_iter() -> iterator of host-local numpy batches (grain DatasetIterator, checkpointed).
  eval_iter() -> a fresh finite iterable of eval batches, or None.
  evaluate(model, step) -> dict of extra eval metrics (e.g. generation accuracy), or None.
  flops_per_token: analytic training FLOPs per token (for MFU); tokens_per_batch: B * L.
  build_frozen(model, mesh, rules) -> a pytree of arrays that the step reads but does not
    train (e.g. a DPO reference model's state), stored and checkpointed in
    `TrainState.frozen`; the loop then calls `loss_fn(model, batch, frozen)`.
  update_frozen(step, params, frozen) -> frozen: run inside the jitted step after the
    optimizer update (`step` = the new step count), e.g. resetting a reference to the policy.
  """

  build_model: Callable[[Any, Mapping], nnx.Module]
  loss_fn: LossFn
  train_iter: Callable[[], Iterator[dict]]
  eval_iter: Callable[[], Any] | None = None
  evaluate: Callable[[nnx.Module, int], dict] | None = None
  flops_per_token: float = 0.0
  tokens_per_batch: int = 0
  build_frozen: Callable[[nnx.Module, Any, Mapping], Any] | None = None
  update_frozen: Callable[[jax.Array, Any, Any], Any] | None = None


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  frozen: Any = None  # untrained arrays the step reads (Task.build_frozen), e.g. a reference


def init_state(params, tx, mesh, rules, seed: int, frozen=None) -> TrainState:
  """Optimizer state created directly sharded like the (already sharded) params."""
  def init(p, f):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(jax.random.key(seed)), frozen=f)
  shardings = parallel.state_shardings(jax.eval_shape(init, params, frozen), mesh, rules)
  return jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(params, frozen)


def _call_loss(loss_fn, model, batch, frozen):
  return loss_fn(model, batch) if frozen is None else loss_fn(model, batch, frozen)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
  """[n*m, ...] -> [n, m, ...] with micro-batch rows strided so each micro-batch stays spread
  over all data-parallel devices."""
  if x.shape[0] % n:
    raise ValueError(f"Batch of {x.shape[0]} rows is not divisible by train.grad_accum={n}.")
  return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def _normalise(metrics: dict, denom) -> dict:
  scale = 1.0 / jnp.maximum(denom, 1.0)
  return {k: v if k.startswith("num_") else v * scale for k, v in metrics.items()}


def make_train_step(graphdef, loss_fn: LossFn, tx, schedule, grad_accum: int = 1,
                    update_frozen=None):
  """(state, batch) -> (state, metrics). Gradients are sum-of-losses / total denominator over
  all micro-batches and devices, so accumulation and data parallelism are exact."""

  def compute(params, frozen, batch):
    loss_sum, denom, metrics = _call_loss(loss_fn, nnx.merge(graphdef, params), batch, frozen)
    return loss_sum, (denom, metrics)

  grad_fn = jax.value_and_grad(compute, has_aux=True)

  def step(state: TrainState, batch):
    frozen = state.frozen
    if grad_accum == 1:
      (loss_sum, (denom, metrics)), grads = grad_fn(state.params, frozen, batch)
    else:
      micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)

      def body(acc, mb):
        (ls, (d, m)), g = grad_fn(state.params, frozen, mb)
        return jax.tree.map(jnp.add, acc, (ls, d, m, g)), None

      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(lambda: (lambda o: (o[0][0], o[0][1][0], o[0][1][1], o[1]))(
          grad_fn(state.params, frozen, first)))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (loss_sum, denom, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
    denom = denom.astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / jnp.maximum(denom, 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if update_frozen is not None:
      frozen = update_frozen(state.step + 1, params, frozen)
    out = _normalise(metrics, denom)
    out.update(loss=loss_sum / jnp.maximum(denom, 1.0), grad_norm=optax.tree.norm(grads),
               param_norm=optax.tree.norm(params), learning_rate=schedule(state.step),
               num_denominator=denom)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         frozen=frozen), out

  return step


def make_eval_step(graphdef, loss_fn: LossFn):
  """(params, frozen, batch) -> (loss_sum, denominator, metric sums)."""
  def step(params, frozen, batch):
    return _call_loss(loss_fn, nnx.merge(graphdef, params), batch, frozen)
  return step


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    try:
      self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      pass
    return self

  def _handle(self, signum, frame):
    logging.warning("Signal %d received: saving a checkpoint and exiting.", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def agreed(self) -> bool:
    """True if any process was asked to stop (a collective when multi-process)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested]))
    return bool(np.any(flags))


def evaluate(task: Task, graphdef, params, eval_step, mesh, rules, num_batches: int,
             step: int, frozen=None) -> dict:
  """Mean eval loss over `num_batches` eval batches plus the task's own evaluation."""
  out = {}
  if task.eval_iter is not None and num_batches > 0:
    # Exactly `num_batches` steps on every host (collectives stay in lockstep); a host whose
    # finite eval data ran out feeds batches of padding, which add nothing to the sums.
    totals, it, template = None, iter(task.eval_iter()), None
    for _ in range(num_batches):
      batch = next(it, None)
      if batch is None:
        if template is None:
          raise ValueError("The eval data yielded no batch on this host; add eval records or "
                           "set train.eval_steps=0.")
        batch = {k: np.zeros_like(v) for k, v in template.items()}
      if template is None:
        template = batch
      res = eval_step(params, frozen, parallel.shard_batch(batch, mesh, rules))
      totals = res if totals is None else jax.tree.map(jnp.add, totals, res)
    if totals is not None:
      loss_sum, denom, metrics = jax.device_get(totals)
      out["eval_loss"] = float(loss_sum / max(denom, 1.0))
      out.update({f"eval_{k}": float(v) for k, v in _normalise(metrics, denom).items()})
  if task.evaluate is not None:
    out.update(task.evaluate(nnx.merge(graphdef, params), step))
  return out


def train(config, workdir: str, task: Task) -> dict:
  """Runs `config.train.num_steps` steps of `task`; returns the last train/eval metrics."""
  tc = config.train
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:  # what this run was, for reproduction
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = parallel.rules_from_config(config.sharding_rules.to_dict())
  logging.info("mesh %s on %d process(es)", dict(mesh.shape), jax.process_count())
  tx, schedule = make_optimizer(config.optimizer, tc.num_steps)
  # Measured on this process's devices, before the global mesh becomes current.
  peak = tc.peak_flops_per_device or metrics_lib.measure_peak_flops(config.model.dtype)
  peak_total = peak * jax.device_count()

  with parallel.use_mesh(mesh, rules):
    model = task.build_model(mesh, rules)
    frozen = task.build_frozen(model, mesh, rules) if task.build_frozen else None
    graphdef, params = nnx.split(model)
    del model
    state = init_state(params, tx, mesh, rules, config.seed, frozen)
    del frozen
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(make_train_step(graphdef, task.loss_fn, tx, schedule, tc.grad_accum,
                                         task.update_frozen),
                         donate_argnums=0, out_shardings=(state_sharding, None))
    eval_step = jax.jit(make_eval_step(graphdef, task.loss_fn))

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
    train_iter = task.train_iter()
    start = 0
    if config.checkpoint.resume and checkpointer.latest_step() is not None:
      state, train_iter = checkpointer.restore(state, train_iter)
      start = int(jax.device_get(state.step))
      logging.info("Resumed from step %d in %s", start, checkpointer.directory)

    writer = metrics_lib.MetricWriter(workdir, total=tc.num_steps, initial=start,
                                      progress_bar=tc.progress_bar)
    summary: dict = {}

    def run_eval(state, step):
      return evaluate(task, graphdef, state.params, eval_step, mesh, rules, tc.eval_steps, step,
                      state.frozen)

    if start == 0:
      initial = run_eval(state, 0)
      summary.update({f"initial_{k}": v for k, v in initial.items()})
      writer.write(0, summary)

    last_log_time, last_log_step = None, start
    step = start
    with _Preemption() as preempt:
      while step < tc.num_steps:
        batch = parallel.shard_batch(next(train_iter), mesh, rules)
        state, m = train_step(state, batch)
        step += 1
        is_last = step == tc.num_steps
        if step % tc.log_every == 0 or is_last or step == start + 1:
          m = jax.device_get(m)
          now = time.perf_counter()
          if last_log_time is not None:
            tok_s = task.tokens_per_batch * (step - last_log_step) / (now - last_log_time)
            m["tokens_per_sec"] = tok_s
            m["mfu"] = task.flops_per_token * tok_s / peak_total if peak_total else 0.0
          last_log_time, last_log_step = now, step
          writer.write(step, {k: float(v) for k, v in m.items()})
          summary.update({k: float(v) for k, v in m.items()})
        if tc.eval_every and step % tc.eval_every == 0 and not is_last:
          writer.write(step, run_eval(state, step))
        stop = preempt.requested if jax.process_count() == 1 else (
            step % tc.log_every == 0 and preempt.agreed())
        if is_last or stop or step % config.checkpoint.every == 0:
          checkpointer.save(step, state, train_iter, force=is_last or stop)
        if stop:
          logging.warning("Stopped at step %d after a signal; the next run resumes here.", step)
          checkpointer.wait()
          writer.close()
          summary["preempted_at"] = step
          return summary
    checkpointer.wait()
    res = run_eval(state, step)
    writer.write(step, res)
    writer.close()
    summary.update(res)
    return summary
