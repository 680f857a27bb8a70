"""Decoder-only transformer (Llama 3, Qwen2/2.5, Qwen3) in Flax NNX.

Shapes use suffixes: B batch, L length, D hidden, N query heads, K kv heads, G = N/K,
H head dim, F intermediate, V vocab. Every parameter carries logical axis names in its
`logical_axes` metadata (see `alignjax.parallel`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax import parallel
from alignjax.models.config import ModelConfig, to_dtype

_NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(names))


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2] in float32, with linear or Llama-3 scaling."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  scaling = dict(cfg.rope_scaling or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"model.rope_scaling.rope_type={kind!r} is not supported; "
                   "use 'default', 'linear' or 'llama3'.")


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding (half-split layout, as in HF Llama/Qwen); angles in float32."""
  angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # B,L,H/2
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def attention_mask(segment_ids_BxL: jax.Array, causal: bool = True) -> jax.Array:
  """[B,1,L,L] bool: same non-zero segment and (if causal) key position <= query position."""
  seg = segment_ids_BxL
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  if causal:
    l = seg.shape[1]
    mask &= jnp.tril(jnp.ones((l, l), dtype=bool))[None]
  return mask[:, None]


class Attention(nnx.Module):
  """Grouped-query attention with optional QKV bias (Qwen2) and q/k RMSNorm (Qwen3)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = to_dtype(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.init_std)
    self.q_proj = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.k_proj = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_proj = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o_proj = _param(rngs, init, (n, h, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = _param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
      self.k_bias = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
      self.v_bias = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)

  def _qkv(self, x_BxLxD, positions_BxL, inv_freq):
    cfg = self.cfg
    dt = x_BxLxD.dtype
    proj = lambda w: jnp.einsum("bld,dnh->blnh", x_BxLxD, w[...].astype(dt))
    q, k, v = proj(self.q_proj), proj(self.k_proj), proj(self.v_proj)
    if cfg.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                 v + self.v_bias[...].astype(dt))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = parallel.constrain(apply_rope(q, positions_BxL, inv_freq),
                           ("batch", "length", "heads", "head_dim"))
    k = parallel.constrain(apply_rope(k, positions_BxL, inv_freq),
                           ("batch", "length", "kv_heads", "head_dim"))
    return q, k, v

  def _attend(self, q, k, v, mask_Bx1xQxS):
    """softmax(q k^T / sqrt(H)) v over keys [B,S,K,H] for queries [B,Q,N,H], then o_proj."""
    dt = q.dtype
    b, l, n, h = q.shape
    kv = self.cfg.num_kv_heads
    q_BxLxKxGxH = q.reshape(b, l, kv, n // kv, h)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", q_BxLxKxGxH, k,
                        preferred_element_type=jnp.float32) / math.sqrt(h)
    logits = jnp.where(mask_Bx1xQxS[:, :, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v.astype(dt)).reshape(b, l, n, h)
    out = parallel.constrain(out, ("batch", "length", "heads", "head_dim"))
    # [N,H,D] -> [N*H,D] is free (row-major); a plain matmul avoids a per-call relayout of
    # the weight that the 3-index einsum gets on CPU.
    w = self.o_proj[...].astype(dt)
    return out.reshape(b, l, n * h) @ w.reshape(n * h, w.shape[-1])

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL, inv_freq):
    q, k, v = self._qkv(x_BxLxD, positions_BxL, inv_freq)
    return self._attend(q, k, v, mask_Bx1xLxL)

  def cached(self, x_BxTxD, positions_BxT, cache, slot, mask_Bx1xTxS, inv_freq):
    """Attention of T new tokens written at cache slots [slot, slot + T): cache = (k, v)
    [B,S,K,H] each; returns (output [B,T,D], updated cache)."""
    q, k, v = self._qkv(x_BxTxD, positions_BxT, inv_freq)
    ck, cv = cache
    ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), slot, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), slot, axis=1)
    ck = parallel.constrain(ck, ("batch", "length", "kv_heads", "head_dim"))
    cv = parallel.constrain(cv, ("batch", "length", "kv_heads", "head_dim"))
    return self._attend(q, ck, cv, mask_Bx1xTxS), (ck, cv)


class MLP(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    pd = to_dtype(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.init_std)
    self.gate_proj = _param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.up_proj = _param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.down_proj = _param(rngs, init, (f, d), ("mlp", "embed"), pd)

  def __call__(self, x_BxLxD):
    dt = x_BxLxD.dtype
    gate = x_BxLxD @ self.gate_proj[...].astype(dt)
    up = x_BxLxD @ self.up_proj[...].astype(dt)
    h_BxLxF = parallel.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return h_BxLxF @ self.down_proj[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = to_dtype(cfg.param_dtype)
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL, inv_freq):
    x = x_BxLxD + self.attn(self.input_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL, inv_freq)
    x = x + self.mlp(self.post_attn_norm(x))
    return parallel.constrain(x, ("batch", "length", "embed"))

  def cached(self, x_BxTxD, positions_BxT, cache, slot, mask_Bx1xTxS, inv_freq):
    a, cache = self.attn.cached(self.input_norm(x_BxTxD), positions_BxT, cache, slot,
                                mask_Bx1xTxS, inv_freq)
    x = x_BxTxD + a
    x = x + self.mlp(self.post_attn_norm(x))
    return parallel.constrain(x, ("batch", "length", "embed")), cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Decoder-only LM. `hidden(...)` gives final-normed states; `logits(h)` the LM head
  (absent with `lm_head=False` for untied models: reward and value backbones).

  Inputs: tokens [B,L] int; positions [B,L] (default 0..L-1); segment_ids [B,L] (0 marks
  padding; equal non-zero ids attend to each other causally — packed sequences). Output of
  `__call__`: logits [B,L,V] in the compute dtype.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.cfg = cfg
    pd = to_dtype(cfg.param_dtype)
    self.embed = _param(rngs, nnx.initializers.normal(cfg.init_std),
                        (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
    if lm_head and not cfg.tie_embeddings:  # reward/value models read hidden states only
      self.lm_head = _param(rngs, nnx.initializers.normal(cfg.init_std),
                            (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

  def unembedding(self) -> jax.Array:
    """The LM head matrix [D,V] in the compute dtype."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return w.astype(to_dtype(self.cfg.dtype))

  def hidden(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    mask = attention_mask(segment_ids_BxL)
    inv_freq = rope_inv_freq(cfg)
    x = self._embed(tokens_BxL)

    def run(block, x):
      return block(x, positions_BxL, mask, inv_freq)

    if cfg.remat != "none":
      run = nnx.remat(run, policy=_REMAT_POLICIES[cfg.remat])
    for block in self.layers:
      x = run(block, x)
    return self.final_norm(x)

  def _embed(self, tokens_BxL):
    # Gather the table over `embed` first (as FSDP does for every weight), then look up rows
    # of the vocab-sharded table.
    table = parallel.constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, tokens_BxL, axis=0).astype(to_dtype(self.cfg.dtype))
    return parallel.constrain(x, ("batch", "length", "embed"))

  def init_cache(self, batch: int, length: int, dtype=None) -> list:
    """An empty KV cache: per layer (k, v) zeros [batch, length, K, H] in the compute dtype."""
    cfg = self.cfg
    dt = dtype or to_dtype(cfg.dtype)
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    axes = ("batch", "length", "kv_heads", "head_dim")
    return [(parallel.constrain(jnp.zeros(shape, dt), axes),
             parallel.constrain(jnp.zeros(shape, dt), axes)) for _ in range(cfg.num_layers)]

  def hidden_cached(self, tokens_BxT, positions_BxT, cache, slot, kv_valid_BxS):
    """Final-normed hidden states [B,T,D] of T new tokens at cache slots [slot, slot + T),
    attending to earlier valid slots (`kv_valid_BxS`, which must already mark the new ones)
    and causally among themselves; returns (hidden, updated cache)."""
    t, s = tokens_BxT.shape[1], kv_valid_BxS.shape[1]
    q_slot = slot + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & kv_valid_BxS[:, None, :]
    mask = mask[:, None]                                   # [B,1,T,S]
    inv_freq = rope_inv_freq(self.cfg)
    x = self._embed(tokens_BxT)
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      x, layer_cache = block.cached(x, positions_BxT, layer_cache, slot, mask, inv_freq)
      new_cache.append(layer_cache)
    return self.final_norm(x), new_cache

  def logits(self, h_BxLxD):
    out = h_BxLxD @ self.unembedding()
    return parallel.constrain(out, ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL))


def init_model(cfg: ModelConfig, seed: int = 0, lm_head: bool = True) -> Transformer:
  """An unsharded model (use `parallel.create_sharded(lambda: init_model(...), mesh)`)."""
  return Transformer(cfg, rngs=nnx.Rngs(params=seed), lm_head=lm_head)
