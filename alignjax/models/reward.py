"""Reward models: a transformer backbone (no LM head) + a head on the last non-padding token.

Heads (`RewardHeadConfig.kind`):
  linear  r = h W, W [D, A]: a scalar (A = 1) or A attributes; the HF
          `*ForSequenceClassification` layout (`score.weight` [A, D]), hence exportable.
  mlp     r = W2 silu(W1 h + b1) + b2, in float32, W2 initialised near 0
          (BaseReward: A Strong Baseline for Multimodal Reward Model; METHODS `mlp_head`).
  gpm     v = h W [2k] preference embedding (+ optional prompt scales lam = k softmax(h W_p /
          sqrt(D)) [k]) for intransitive preferences (General Preference Modeling with
          Preference Representations for Aligning Language Models; METHODS `gpm`).
`ensemble = E` gives E independent heads on the shared backbone (outputs [B, E, A]); K
separate parameter sets are `ensemble_backbones` in the reward-model task.
Shapes: tokens/positions/segment_ids [B, L] (right padded; segment_ids 0 on padding).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models import hf
from alignjax.models.config import ModelConfig, to_dtype
from alignjax.models.transformer import Transformer

HEAD_KINDS = ("linear", "mlp", "gpm")
_SEQ_CLS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
            "qwen3": "Qwen3ForSequenceClassification"}


@dataclasses.dataclass(frozen=True)
class RewardHeadConfig:
  kind: str = "linear"
  num_outputs: int = 1      # A attributes (linear, mlp) or 2k embedding dims (gpm)
  ensemble: int = 1         # E heads on one backbone
  mlp_hidden: int = 0       # mlp head width; 0: the backbone's hidden size
  prompt_scales: bool = False  # gpm: learn per-prompt eigenvalue scales lam [k]

  def __post_init__(self):
    if self.kind not in HEAD_KINDS:
      raise ValueError(f"reward.head={self.kind!r}; expected one of {HEAD_KINDS}.")
    if self.kind == "gpm" and self.num_outputs % 2:
      raise ValueError(f"reward.num_outputs={self.num_outputs} must be even (2k) for gpm.")
    if self.ensemble < 1 or self.num_outputs < 1:
      raise ValueError("reward.ensemble and reward.num_outputs must be >= 1.")


def _p(rngs, init, shape, names):
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=names)


class RewardHead(nnx.Module):
  """Maps final hidden states h [B, D] to outputs [B, E, A] (float32 parameters)."""

  def __init__(self, hidden_size: int, cfg: RewardHeadConfig, *, init_std: float = 0.02,
               rngs: nnx.Rngs):
    self.cfg = cfg
    d, e, a = hidden_size, cfg.ensemble, cfg.num_outputs
    normal = nnx.initializers.normal(init_std)
    if cfg.kind in ("linear", "gpm"):
      self.kernel = _p(rngs, normal, (e, d, a), (None, "embed", None))
    if cfg.kind == "gpm" and cfg.prompt_scales:
      self.scale_kernel = _p(rngs, normal, (e, d, a // 2), (None, "embed", None))
    if cfg.kind == "mlp":
      hdim = cfg.mlp_hidden or d
      self.w1 = _p(rngs, nnx.initializers.normal(1.0 / math.sqrt(d)), (e, d, hdim),
                   (None, "embed", "mlp"))
      self.b1 = _p(rngs, nnx.initializers.zeros, (e, hdim), (None, "mlp"))
      self.w2 = _p(rngs, nnx.initializers.normal(1e-3), (e, hdim, a), (None, "mlp", None))
      self.b2 = _p(rngs, nnx.initializers.zeros, (e, a), (None, None))

  def __call__(self, h_BxD: jax.Array) -> jax.Array:
    h = h_BxD.astype(jnp.float32)
    if self.cfg.kind == "mlp":
      z = jax.nn.silu(jnp.einsum("bd,edh->beh", h, self.w1[...]) + self.b1[...])
      return jnp.einsum("beh,eha->bea", z, self.w2[...]) + self.b2[...]
    return jnp.einsum("bd,eda->bea", h, self.kernel[...])

  def prompt_scales(self, h_BxD: jax.Array) -> jax.Array:
    """gpm eigenvalue scales lam = k softmax(h W_p / sqrt(D)) [B, E, k]."""
    k = self.cfg.num_outputs // 2
    logits = jnp.einsum("bd,edk->bek", h_BxD.astype(jnp.float32), self.scale_kernel[...])
    return k * jax.nn.softmax(logits / math.sqrt(h_BxD.shape[-1]), axis=-1)


def last_token_index(segment_ids_BxL: jax.Array) -> jax.Array:
  """Index of the last non-padding token per row (right padding): sum(mask) - 1, >= 0."""
  return jnp.maximum(jnp.sum(segment_ids_BxL > 0, axis=-1) - 1, 0)


class RewardModel(nnx.Module):
  """backbone (Transformer without LM head) + head at the last non-padding token."""

  def __init__(self, backbone: Transformer, head: RewardHead):
    self.backbone = backbone
    self.head = head

  @property
  def cfg(self) -> ModelConfig:
    return self.backbone.cfg

  def features(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Final hidden state at the last non-padding token [B, D] (float32)."""
    h = self.backbone.hidden(tokens_BxL, positions_BxL, segment_ids_BxL)
    seg = jnp.ones_like(tokens_BxL) if segment_ids_BxL is None else segment_ids_BxL
    idx = last_token_index(seg)
    return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Head outputs [B, E, A] in float32."""
    return self.head(self.features(tokens_BxL, positions_BxL, segment_ids_BxL))


def init_reward_model(cfg: ModelConfig, head: RewardHeadConfig, seed: int = 0) -> RewardModel:
  """A randomly initialised reward model (wrap in `parallel.create_sharded` for a mesh)."""
  rngs = nnx.Rngs(params=seed)
  return RewardModel(Transformer(cfg, rngs=rngs, lm_head=False),
                     RewardHead(cfg.hidden_size, head, init_std=cfg.init_std, rngs=rngs))


def _score_map(head: RewardHeadConfig):
  """The linear head <-> HF `score.weight` [A, D]."""
  if head.kind != "linear" or head.ensemble != 1:
    raise ValueError("Only a single linear head (reward.head='linear', reward.ensemble=1) has "
                     "a Hugging Face sequence-classification layout.")
  yield (("head", "kernel"), "score.weight", lambda w: w.T[None], lambda w: w[0].T)


def load_hf_reward_model(path: str, mesh=None, rules=None, **overrides) -> RewardModel:
  """Loads a HF `*ForSequenceClassification` checkpoint (backbone + `score.weight`)."""
  cfg, raw = hf.read_config(path, **overrides)
  head = RewardHeadConfig(num_outputs=int(raw.get("num_labels") or len(raw.get("id2label", {0: 0}))))
  fn = lambda: init_reward_model(cfg, head)
  mapping = [*hf.prefixed(hf._param_map(cfg, lm_head=False), ("backbone",)), *_score_map(head)]
  return hf.load_into(path, fn, mapping, mesh, rules)


def save_hf_reward_model(model: RewardModel, path: str, *, like: str | None = None,
                         dtype: str | None = None, pad_token_id: int | None = None,
                         labels: tuple[str, ...] | None = None) -> None:
  """Writes a linear-head reward model as a HF `*ForSequenceClassification` checkpoint.

  HF reads the score at the last token that is not `pad_token_id`, as alignjax does with
  right padding, so `pad_token_id` must be set (from the tokenizer).
  """
  cfg, head = model.cfg, model.head.cfg
  mapping = [*hf.prefixed(hf._param_map(cfg, lm_head=False), ("backbone",)), *_score_map(head)]
  tensors = hf.gather_tensors(model, mapping, dtype)
  base = hf._read_json(os.path.join(like, "config.json")) if like else {}
  hf_cfg = hf.config_to_hf(cfg, base)
  labels = labels or tuple(f"LABEL_{i}" for i in range(head.num_outputs))
  hf_cfg.update(architectures=[_SEQ_CLS[cfg.family]], num_labels=head.num_outputs,
                id2label={str(i): l for i, l in enumerate(labels)},
                label2id={l: i for i, l in enumerate(labels)})
  if pad_token_id is not None:
    hf_cfg["pad_token_id"] = int(pad_token_id)
  if hf_cfg.get("pad_token_id") is None:
    raise ValueError("Exporting a reward model needs pad_token_id (HF finds the scored token "
                     "with it); pass the tokenizer's pad id.")
  hf.write_checkpoint(path, tensors, hf_cfg, like=like, dtype=dtype)

