"""Optimizer and learning-rate schedule from `config.optimizer` (see configlib)."""

from __future__ import annotations

import jax
import optax


def make_schedule(opt, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine / linear decay to
  `learning_rate * end_lr_ratio` at `num_steps`, or constant."""
  peak, warm = opt.learning_rate, int(opt.warmup_steps)
  end = peak * opt.end_lr_ratio
  decay_steps = max(num_steps - warm, 1)
  if opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.end_lr_ratio)
  elif opt.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r}; expected cosine, linear "
                     "or constant.")
  if warm <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _decay_mask(params):
  """Weight decay on matrices only (not norms or biases), as is standard for LMs."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, schedule). Gradient clipping by global norm comes first."""
  schedule = make_schedule(opt, num_steps)
  if opt.name == "adamw":
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=_decay_mask)
  elif opt.name == "adam":
    core = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  elif opt.name == "lion":
    core = optax.lion(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                      mask=_decay_mask)
  elif opt.name == "sgd":
    core = optax.sgd(schedule, momentum=opt.b1 or None)
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r}; expected adamw, adam, lion or sgd.")
  chain = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  return optax.chain(*chain, core), schedule
