"""Token log-probabilities from hidden states, in chunks (no [B,L,V] float32 logits).

log p(y_t) = h_t . W[:, y_t] - logsumexp_v(h_t . W[:, v]), accumulated in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_logprobs(h_BxCxD, w_DxV, targets_BxC, temperature):
  logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  logits = logits / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_BxC[..., None], axis=-1)[..., 0]
  # Entropy of the token distribution, useful as a metric for SFT and RL.
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = lse - jnp.sum(probs * logits, axis=-1)
  return picked - lse, entropy


def token_logprobs(h_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array, *,
                   chunk_size: int = 1024, temperature: float = 1.0,
                   with_entropy: bool = False):
  """log p(targets) [B,L] float32 (and the entropy [B,L] if `with_entropy`).

  The length axis is processed `chunk_size` positions at a time under `jax.checkpoint`,
  so peak memory holds one [B, chunk, V] block of logits in the forward and backward pass.
  """
  b, l, d = h_BxLxD.shape
  chunk = min(chunk_size, l)
  pad = (-l) % chunk
  if pad:
    h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
  n = (l + pad) // chunk
  hs = h_BxLxD.reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = targets_BxL.reshape(b, n, chunk).swapaxes(0, 1)
  fn = jax.checkpoint(lambda args: _chunk_logprobs(args[0], w_DxV, args[1], temperature))
  if n == 1:
    lp, ent = fn((hs[0], ts[0]))
    lp, ent = lp[None], ent[None]
  else:
    lp, ent = jax.lax.map(fn, (hs, ts))
  lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :l]
  ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :l]
  return (lp, ent) if with_entropy else lp


def shift_targets(tokens_BxL: jax.Array, loss_mask_BxL: jax.Array):
  """Next-token targets: position t predicts tokens[t+1]; the mask moves with the target.

  Returns targets [B,L] (last position gets token 0) and mask [B,L] float32 where
  mask[t] = loss_mask[t+1] (0 at the last position).
  """
  targets = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
  mask = jnp.concatenate(
      [loss_mask_BxL[:, 1:], jnp.zeros_like(loss_mask_BxL[:, :1])], axis=1).astype(jnp.float32)
  return targets, mask
