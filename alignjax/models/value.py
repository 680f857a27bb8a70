"""Value model (critic) for PPO / GAE: a transformer backbone and a linear head on every
position, V = h w + b [B,L] float32 (*Proximal Policy Optimization Algorithms*; METHODS
`gae_adv`, `value_loss`). The head starts at zero, so initial values are 0.

`PolicyAndValue` holds the policy and the critic in one module so that one optimizer trains
both with `loss = policy terms + vf_coef * value loss` (as TRL's PPO wrapper does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.transformer import Transformer


class ValueModel(nnx.Module):
  """V(tokens) [B,L] from `backbone.hidden` (final-normed states, float32 head)."""

  def __init__(self, backbone: Transformer, mesh=None):
    self.backbone = backbone
    d = backbone.cfg.hidden_size
    w, b = jnp.zeros((d,), jnp.float32), jnp.zeros((), jnp.float32)
    if mesh is not None:  # replicated on the backbone's mesh
      rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      w, b = jax.device_put(w, rep), jax.device_put(b, rep)
    self.head_w = nnx.Param(w, logical_axes=("embed",))
    self.head_b = nnx.Param(b, logical_axes=())

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    h = self.backbone.hidden(tokens_BxL, positions_BxL, segment_ids_BxL).astype(jnp.float32)
    return h @ self.head_w[...] + self.head_b[...]


class PolicyAndValue(nnx.Module):
  """`policy` (an LM Transformer) and `value` (a ValueModel), trained together."""

  def __init__(self, policy: Transformer, value: ValueModel):
    self.policy = policy
    self.value = value
