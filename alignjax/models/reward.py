"""Reward models: a transformer backbone (no LM head) + a head on the last non-padding token.

Heads (`RewardHeadConfig.kind`):
  linear  r = h W, W [D, A]: a scalar (A = 1) or A attributes; the HF
          `*ForSequenceClassification` layout (`score.weight` [A, D]), hence exportable.
  mlp     r = W2 silu(W1 h + b1) + b2, in float32, W2 initialised near 0
          (BaseReward: A Strong Baseline for Multimodal Reward Model; METHODS `mlp_head`).
  gpm     v = h W [2k] preference embedding (+ optional prompt scales lam = k softmax(h W_p /
          sqrt(D)) [k]) for intransitive preferences (General Preference Modeling with
          Preference Representations for Aligning Language Models; METHODS `gpm`).
Ensembles (METHODS `rm_ensemble`), both with outputs [B, E, A]:
  heads          `RewardHeadConfig.ensemble = E`: E independent heads on one shared backbone.
  parameter sets `RewardEnsemble(cfg, head, members=E)`: E full reward models (backbone +
                 head) with stacked parameters (leading member axis), created with
                 `nnx.split_rngs` + `nnx.vmap` (a different seed per member) and run with
                 `nnx.vmap` over members. Both kinds combine: outputs [B, E * ensemble, A].
An optional scalar `tie_param` (`RewardHeadConfig.tie_init`) on the head is the learned
`theta_raw` / `kappa` of the `bt_ties` modes rao_kupper / davidson.
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
from alignjax.parallel import LOGICAL_AXES_KEY
from alignjax.models.config import ModelConfig
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
  tie_init: float | None = None  # bt_ties rao_kupper/davidson: a learned scalar `tie_param`

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
    if cfg.tie_init is not None:  # theta_raw (rao_kupper) or kappa (davidson), shared by heads
      self.tie_param = nnx.Param(jnp.asarray(cfg.tie_init, jnp.float32), logical_axes=())

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

  @property
  def num_members(self) -> int:
    """Ensemble members E of the output [B, E, A] (the head ensemble)."""
    return self.head.cfg.ensemble

  def features(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Final hidden state at the last non-padding token [B, D] (float32)."""
    h = self.backbone.hidden(tokens_BxL, positions_BxL, segment_ids_BxL)
    seg = jnp.ones_like(tokens_BxL) if segment_ids_BxL is None else segment_ids_BxL
    idx = last_token_index(seg)
    return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)

  def head_outputs(self, features) -> jax.Array:
    """Head outputs [B, E, A] from `features(...)` [B, D]."""
    return self.head(features)

  def tie_parameter(self) -> jax.Array | None:
    """The learned bt_ties scalar per member [E] (None without one)."""
    if not hasattr(self.head, "tie_param"):
      return None
    return jnp.broadcast_to(self.head.tie_param[...], (self.num_members,))

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Head outputs [B, E, A] in float32."""
    return self.head_outputs(self.features(tokens_BxL, positions_BxL, segment_ids_BxL))


def stack_logical_axes(module: nnx.Module, lead=(None,)) -> None:
  """Prepends `lead` to the `logical_axes` of every Variable whose names are one short of its
  rank (parameters stacked by `nnx.vmap`), so they shard like the unstacked ones on the other
  dimensions and are replicated along the member axis."""
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable):
      names = var.get_metadata().get(LOGICAL_AXES_KEY)
      if names is not None and len(names) + len(lead) == var.get_value().ndim:
        var.set_metadata(**{LOGICAL_AXES_KEY: (*lead, *names)})


class RewardEnsemble(nnx.Module):
  """E full reward models (backbone + head) with stacked parameters (leading member axis).

  Members are initialised from `rngs` split E ways (different seeds) and run with
  `nnx.vmap`; outputs [B, E * head.ensemble, A] (member-major), like a head ensemble, so a
  loss sees the same layout. METHODS `rm_ensemble` ("K parameter sets trained together with
  vmap"; *Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
  Hacking*). Parameters carry `logical_axes` with a leading None: the member axis is
  replicated and the other dimensions shard as in a single model.
  """

  def __init__(self, cfg: ModelConfig, head: RewardHeadConfig, members: int, *,
               rngs: nnx.Rngs):
    if members < 2:
      raise ValueError(f"reward.ensemble_backbones={members}: a parameter-set ensemble needs "
                       ">= 2 members (use a RewardModel for one).")
    self.size = members

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return RewardModel(Transformer(cfg, rngs=rngs, lm_head=False),
                         RewardHead(cfg.hidden_size, head, init_std=cfg.init_std, rngs=rngs))

    self.members = create(rngs)
    stack_logical_axes(self.members)

  @property
  def cfg(self) -> ModelConfig:
    return self.members.backbone.cfg

  @property
  def num_members(self) -> int:
    return self.size * self.members.head.cfg.ensemble

  def _over_members(self, method: str, out_axis: int, *args, in_axes=None):
    """`member.<method>(*args)` for every member, with jax.vmap over the stacked state (a
    plain jax transform, so it also runs inside jax.grad / jacrev of part of the state)."""
    graphdef, state = nnx.split(self.members)
    run = lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a)
    in_axes = (0, *(in_axes or (None,) * len(args)))
    return jax.vmap(run, in_axes=in_axes, out_axes=out_axis)(state, *args)

  def features(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Each member's final hidden state at the last non-padding token [E, B, D] (float32)."""
    return self._over_members("features", 0, tokens_BxL, positions_BxL, segment_ids_BxL)

  def head_outputs(self, features) -> jax.Array:
    """Outputs [B, E * head.ensemble, A] from `features(...)` [E, B, D]."""
    out = self._over_members("head_outputs", 1, features, in_axes=(0,))  # [B, E, ens, A]
    return out.reshape(out.shape[0], -1, out.shape[-1])

  def tie_parameter(self) -> jax.Array | None:
    """The learned bt_ties scalar per output member [E * head.ensemble] (None without one)."""
    head = self.members.head
    if not hasattr(head, "tie_param"):
      return None
    return jnp.repeat(head.tie_param[...], head.cfg.ensemble)

  def member(self, e: int) -> RewardModel:
    """Member `e` as a plain RewardModel (sliced parameters, e.g. to export it to HF)."""
    graphdef, state = nnx.split(self.members)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x[e], state))
    for _, var in nnx.iter_graph(model):
      if isinstance(var, nnx.Variable):
        names = var.get_metadata().get(LOGICAL_AXES_KEY)
        if names is not None and len(names) == var.get_value().ndim + 1:
          var.set_metadata(**{LOGICAL_AXES_KEY: tuple(names[1:])})
    return model

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Outputs [B, E * head.ensemble, A] in float32."""
    return self.head_outputs(self.features(tokens_BxL, positions_BxL, segment_ids_BxL))


def init_reward_model(cfg: ModelConfig, head: RewardHeadConfig, seed: int = 0,
                      members: int = 1) -> RewardModel | RewardEnsemble:
  """A randomly initialised reward model (wrap in `parallel.create_sharded` for a mesh);
  `members > 1`: a `RewardEnsemble` of that many parameter sets."""
  rngs = nnx.Rngs(params=seed)
  if members > 1:
    return RewardEnsemble(cfg, head, members, rngs=rngs)
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
  right padding, so `pad_token_id` must be set (from the tokenizer). A learned bt_ties
  `tie_param` is not exported (HF has no place for it).
  """
  if isinstance(model, RewardEnsemble):
    raise ValueError("A parameter-set ensemble (reward.ensemble_backbones > 1) has no Hugging "
                     "Face layout; export one member: save_hf_reward_model(model.member(e), ...).")
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

