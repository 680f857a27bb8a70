"""Model hyper-parameters: one frozen dataclass shared by the transformer, presets and HF I/O."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: Any) -> Any:
  """Maps 'float32' | 'bfloat16' | 'float16' (or a dtype) to a jnp dtype."""
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama 3 / Qwen2 / Qwen2.5 / Qwen3 families.

  `rope_scaling` is None or a dict with `rope_type` in {"default", "linear", "llama3"}
  (Llama 3 keys: factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings; linear: factor).
  `remat` is "none", "full" (save nothing inside a block) or "dots" (save matmuls).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  family: str = "llama"  # llama | qwen2 | qwen3: the HF architecture used on export.
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  remat: str = "none"
  init_std: float = 0.02

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat={self.remat!r}; expected 'none', 'full' or 'dots'.")
    if self.family not in ("llama", "qwen2", "qwen3"):
      raise ValueError(f"model.family={self.family!r}; expected 'llama', 'qwen2' or 'qwen3'.")
    to_dtype(self.param_dtype), to_dtype(self.dtype)
    scaling = self.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
      raise ValueError(f"rope_scaling rope_type={kind!r} is not supported; alignjax implements "
                       "'default', 'linear' and 'llama3'.")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self, include_embedding: bool = True) -> int:
    """Exact parameter count."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    layer = attn + 3 * d * f + 2 * d
    n = self.num_layers * layer + d
    if include_embedding:
      n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    elif not self.tie_embeddings:
      n += self.vocab_size * d  # the LM head is a matmul, counted in FLOPs
    return n

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style:
    6 * N (matmul parameters, LM head included) + 12 * layers * heads * head_dim * seq_len."""
    n = self.num_params(include_embedding=False)
    if self.tie_embeddings:
      n += self.vocab_size * self.hidden_size
    attn = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    return 6 * n + attn
