"""Shared by the RL tests: per-group views of rewards and jitted calls with static options."""

import functools

import jax
import numpy as np


def groups(r):
  """(row, valid column indices, valid values) per group of r [B,G] (NaN = unscorable)."""
  for i, row in enumerate(r):
    v = np.flatnonzero(np.isfinite(row))
    yield i, v, row[v]


@functools.cache
def _jitted(fn, kw_items):
  return jax.jit(functools.partial(fn, **dict(kw_items)))


def run(fn, *args, **kw):
  """jit(fn)(*args) with static keyword options, as numpy (one compile per fn, options, shape)."""
  return jax.tree.map(np.asarray, _jitted(fn, tuple(sorted(kw.items())))(*args))
