"""Greedy decoding by full recomputation, for short evaluations (held-out accuracy).

Each new token re-runs the model over the whole [B, P+T] buffer: O(T) forward passes with no
KV cache. Right for tiny models and answers of a few tokens.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to [B, P]; returns (tokens, mask) with mask 1 on real tokens."""
  p = max(len(x) for x in prompts)
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    if len(x):
      tokens[i, p - len(x):] = x
      mask[i, p - len(x):] = 1
  return tokens, mask


@nnx.jit(static_argnames=("max_new_tokens",))
def _generate(model, tokens_BxP, mask_BxP, max_new_tokens: int):
  b, p = tokens_BxP.shape
  total = p + max_new_tokens
  tokens = jnp.pad(tokens_BxP, ((0, 0), (0, max_new_tokens)))
  mask = jnp.pad(mask_BxP, ((0, 0), (0, max_new_tokens)), constant_values=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

  def body(i, tokens):
    logits = model(tokens, positions, mask)
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False),
                     axis=-1).astype(tokens.dtype)
    return jax.lax.dynamic_update_index_in_dim(tokens, nxt, p + i, axis=1)

  tokens = jax.lax.fori_loop(0, max_new_tokens, body, tokens)
  return tokens[:, p:total]


def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    pad_id: int, eos_id: int | None = None) -> list[list[int]]:
  """Greedy continuations of token-id prompts; each is cut at (and excludes) `eos_id`."""
  tokens, mask = left_pad(prompts, pad_id)
  # Prompts are replicated on the model's mesh; every process passes the same prompts.
  mesh = getattr(jax.tree.leaves(nnx.state(model))[0].sharding, "mesh", None)
  if mesh is None:  # an unsharded model on one device
    place = jnp.asarray
  else:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda x: jax.make_array_from_process_local_data(replicated, x)
  out = _generate(model, place(tokens), place(mask), max_new_tokens)
  out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
  result = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    result.append(row)
  return result
