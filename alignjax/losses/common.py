"""Small helpers shared by the loss kernels (row vectors, masks, masked sums)."""

from __future__ import annotations

import chex
import jax.numpy as jnp

f32 = jnp.float32


def rows(x, b: int, name: str) -> jnp.ndarray:
  """`x` as float32 [B]; a scalar is broadcast. `name` appears in the shape error."""
  x = jnp.asarray(x, f32)
  if x.ndim == 0:
    return jnp.broadcast_to(x, (b,))
  chex.assert_shape(x, (b,), custom_message=f"{name} must be a scalar or [B={b}]")
  return x


def mask_rows(mask, b: int) -> jnp.ndarray:
  """The row mask as float32 [B] (all ones when `mask` is None)."""
  return jnp.ones((b,), f32) if mask is None else rows(mask, b, "mask")


def wsum(w, x) -> jnp.ndarray:
  """sum(w * x), with entries of weight 0 contributing exactly 0 (even if x is inf/NaN there)."""
  return jnp.sum(jnp.where(w != 0, w * x, 0.0))
