"""Reward-model training (task `reward_model`): any registered reward loss on a backbone +
head, through the shared loop. See docs/reward_models.md.

The loss is `config.loss.name` (alignjax.losses.registry); its kind decides the data
(`pairwise` and `gpm`: chosen/rejected pairs; `listwise`: K ranked responses; `rated`:
per-attribute scores; `bt_plus_regression` reads 2-response listwise records whose `scores`
are helpfulness ratings). Constant hyper-parameters come from `config.loss.params`;
per-example inputs (margins, strengths, tie labels, preference strength, source ids) come
from the batch for the names in `config.loss.from_data` (`BATCH_FIELDS`).

Ensembles: `reward.ensemble = E` trains E heads on one backbone, `reward.ensemble_backbones =
E` trains E full parameter sets (vmapped); every member sees the same data and the loss is
their sum (each member's mean loss, averaged). `ensemble_rewards` aggregates members for
scoring. `bt_ties` modes rao_kupper / davidson learn their tie parameter (a head scalar);
`loss.more=True` reweights the sources of `bt_weighted` with MORE.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from alignjax import parallel
from alignjax.data import preference as pref_data
from alignjax.losses import ensemble as ensemble_lib
from alignjax.losses import registry
from alignjax.losses.reward import more_weights
from alignjax.models.reward import (RewardEnsemble, RewardHead, RewardHeadConfig, RewardModel,
                                    init_reward_model, stack_logical_axes)
from alignjax.trainers import common, loop

# Loss keyword -> batch field, for the per-example inputs named in `config.loss.from_data`.
BATCH_FIELDS = {"margin": "margin", "strength": "strength", "labels": "label", "mu": "margin",
                "source": "source_id"}
# Batch fields that only pairwise batches have (the others are in every batch).
PAIRWISE_FIELDS = ("margin", "strength", "label")
# The data each loss reads by default (its per-example inputs).
DEFAULT_FROM_DATA = {"bt_margin": ("margin",), "bt_scaled": ("strength",), "bt_ties": ("labels",),
                     "bt_flip": ("mu",), "secrets2": ("mu",), "bt_weighted": ()}
DATA_KIND = {"pairwise": "pairwise", "gpm": "pairwise", "listwise": "listwise", "rated": "rated"}
# Losses whose data kind is not their registry kind's.
LOSS_DATA_KIND = {"bt_plus_regression": "listwise"}
# bt_ties mode -> the scalar it learns (the `tie_param` of the head).
TIE_PARAMS = {"rao_kupper": "theta_raw", "davidson": "kappa"}


def loss_config(name: str = "bt") -> ml_collections.ConfigDict:
  """`config.loss`: the registered loss, its constant hyper-parameters and per-example
  inputs, and the MORE switch (bt_weighted only)."""
  return ml_collections.ConfigDict(dict(
      name=name, params=registry.defaults(name),
      from_data=tuple(DEFAULT_FROM_DATA.get(name, ())),
      more=False,             # bt_weighted: MORE source weights (needs >= 2 data.sources)
      more_normalize=False,   # MORE: L2-normalise each source's head gradient first
  ))


def reward_config() -> ml_collections.ConfigDict:
  """`config.reward`: the head, ensembles and how members combine into one reward."""
  return ml_collections.ConfigDict(dict(
      head="linear", num_outputs=1, mlp_hidden=0, prompt_scales=False,
      ensemble=1,             # E heads on one backbone
      ensemble_backbones=1,   # E full parameter sets (backbone + head), vmapped
      attribute_weights=(),   # scalar reward = outputs . w for multi-attribute heads
      aggregate="mean",       # scoring: mean | median | min | mean_minus_std over members
      aggregate_lam=1.0,      # lam of mean_minus_std
      checkpoint="",          # a reward_model workdir to start from (backbone and head)
  ))


def _get(section, key, default):
  return section.get(key, default) if section is not None else default


def tie_param_name(config) -> str | None:
  """'theta_raw' / 'kappa' when the loss is bt_ties with a learned tie parameter, else None."""
  lc = config.get("loss")
  if lc is None or lc.get("name") != "bt_ties":
    return None
  mode = _get(lc.get("params"), "mode", "half")
  return TIE_PARAMS.get(mode)


def head_config(config) -> RewardHeadConfig:
  rc = config.reward
  tie = tie_param_name(config)
  return RewardHeadConfig(kind=rc.head, num_outputs=rc.num_outputs, ensemble=rc.ensemble,
                          mlp_hidden=rc.mlp_hidden, prompt_scales=rc.prompt_scales,
                          tie_init=None if tie is None else float(config.loss.params[tie]))


def num_backbones(config) -> int:
  return int(_get(config.reward, "ensemble_backbones", 1))


def build_reward_model(config, cfg, mesh, rules) -> RewardModel | RewardEnsemble:
  """The reward model, created directly sharded.

  `reward.checkpoint`: the latest parameters of that reward_model run (same head and
  ensemble settings), e.g. the rm_regression stage of bt_plus_regression option (a).
  One parameter set: the backbone from `model.checkpoint` / `model.hf_path` / random init
  (no LM head) plus a new head. `reward.ensemble_backbones = E > 1`: a `RewardEnsemble` of E
  randomly initialised members (a different seed each), or, with `model.checkpoint` /
  `model.hf_path`, E copies of that backbone with E differently seeded heads.
  """
  if _get(config.reward, "checkpoint", ""):
    return load_trained(config, config.reward.checkpoint, cfg, mesh, rules)
  members = num_backbones(config)
  hc = head_config(config)
  if members == 1:
    backbone = common.build_model(config, cfg, mesh, rules, lm_head=False)
    head = parallel.create_sharded(
        lambda: RewardHead(cfg.hidden_size, hc, init_std=cfg.init_std,
                           rngs=nnx.Rngs(params=config.model.init_seed + 1)),
        mesh, rules)
    return RewardModel(backbone, head)
  make = lambda: init_reward_model(cfg, hc, config.model.init_seed, members=members)
  if not (config.model.checkpoint or config.model.hf_path):
    return parallel.create_sharded(make, mesh, rules)
  backbone = common.build_model(config, cfg, mesh, rules, lm_head=False)
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = parallel.state_shardings(abstract, mesh, rules)

  def init(backbone_state):
    model = make()
    nnx.update(model.members.backbone, jax.tree.map(
        lambda x: jnp.broadcast_to(x, (members, *x.shape)), backbone_state))
    stack_logical_axes(model.members)  # nnx.update copied the unstacked metadata
    return nnx.state(model)

  with parallel.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(nnx.state(backbone))
  return nnx.merge(graphdef, state)


def load_trained(config, path: str, cfg, mesh, rules=None, step: int | None = None
                 ) -> RewardModel | RewardEnsemble:
  """The reward model saved by a `reward_model` run (its workdir or checkpoints/ dir)."""
  from alignjax.trainers import checkpoint
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: init_reward_model(cfg, head_config(config), members=num_backbones(config))))
  target = parallel.abstract_with_shardings(abstract, mesh, rules)
  return nnx.merge(graphdef, checkpoint.restore_params(path, target, step))


def attribute_weights(config) -> tuple[float, ...]:
  """`reward.attribute_weights`, or, when empty for a multi-output head, helpfulness only if
  `data.attributes` names it (METHODS `rm_regression`), else ()."""
  w = tuple(_get(config.reward, "attribute_weights", ()) or ())
  if w or config.reward.num_outputs == 1:
    return w
  attrs = tuple(_get(config.get("data"), "attributes", ()) or ())
  if "helpfulness" in attrs and len(attrs) == config.reward.num_outputs:
    return tuple(float(a == "helpfulness") for a in attrs)
  return ()


def scalar_rewards(out_NxExA: jax.Array, weights) -> jax.Array:
  """[N, E] scalar rewards: the only output, or outputs . attribute_weights."""
  if out_NxExA.shape[-1] == 1:
    return out_NxExA[..., 0]
  if not weights:
    raise ValueError("reward.num_outputs > 1 needs reward.attribute_weights to form a scalar "
                     "reward for a pairwise or listwise loss.")
  if len(weights) != out_NxExA.shape[-1]:
    raise ValueError(f"reward.attribute_weights has {len(weights)} weights for "
                     f"{out_NxExA.shape[-1]} outputs (reward.num_outputs).")
  return out_NxExA @ jnp.asarray(weights, jnp.float32)


def ensemble_rewards(out_NxExA, config) -> jax.Array:
  """One reward per row [N] from model outputs [N, E, A]: attributes combined by
  `attribute_weights(config)`, then members by `reward.aggregate` ("mean" default, "median",
  "min", "mean_minus_std" with `reward.aggregate_lam`); `ensemble.aggregate`, METHODS
  `rm_ensemble`. E = 1 returns the only member's reward for every method."""
  if config.reward.head == "gpm":
    raise ValueError("A gpm head gives preference embeddings, not scalar rewards; score pairs "
                     "with alignjax.losses.reward.gpm_score.")
  r_NxE = scalar_rewards(jnp.asarray(out_NxExA, jnp.float32), attribute_weights(config))
  return ensemble_lib.aggregate(r_NxE.T, _get(config.reward, "aggregate", "mean"),
                                float(_get(config.reward, "aggregate_lam", 1.0)))


def _flat(x):
  return x.reshape(-1, x.shape[-1])


def _take(x_BxK, idx_B):
  return jnp.take_along_axis(x_BxK, idx_B[:, None], axis=1)[:, 0]


# Head weights: MORE's gradients are taken with respect to these only.
_HEAD_WEIGHTS = nnx.All(nnx.Param, nnx.PathContains("head"), nnx.Not(nnx.PathContains("tie_param")))


def check_config(config) -> None:
  """Errors for settings the task cannot train, naming the keys."""
  name, lc, rc, dc = config.loss.name, config.loss, config.reward, config.data
  entry = registry.get(name)
  kind = data_kind(config)
  if rc.prompt_scales:
    raise ValueError("reward.prompt_scales=True (gpm per-prompt scales) is not wired into the "
                     "reward_model task yet; set it to False.")
  aggregate = _get(rc, "aggregate", "mean")
  if aggregate not in ensemble_lib.AGGREGATES:
    raise ValueError(f"reward.aggregate={aggregate!r}; expected one of "
                     f"{ensemble_lib.AGGREGATES}.")
  if num_backbones(config) < 1:
    raise ValueError("reward.ensemble_backbones must be >= 1.")
  if entry.kind == "rated" and name != "bt_plus_regression":
    attrs = tuple(dc.attributes)
    if rc.num_outputs != len(attrs):
      raise ValueError(f"reward.num_outputs={rc.num_outputs} but data.attributes has "
                       f"{len(attrs)} names {attrs}: {name} predicts one output per attribute; "
                       f"set reward.num_outputs={len(attrs)}.")
  if name == "bt_plus_regression" and dc.max_responses != 2:
    raise ValueError(f"bt_plus_regression reads 2-response listwise records whose `scores` "
                     f"are helpfulness ratings; set data.max_responses=2 (it is "
                     f"{dc.max_responses}).")
  accepted = inspect.signature(entry.fn).parameters
  for input_name in lc.from_data:
    if input_name not in BATCH_FIELDS:
      raise ValueError(f"config.loss.from_data names {input_name!r}; the batch provides "
                       f"{sorted(BATCH_FIELDS)}.")
    if input_name not in accepted:
      raise ValueError(f"config.loss.from_data names {input_name!r}, which loss {name!r} "
                       "does not take.")
    if BATCH_FIELDS[input_name] in PAIRWISE_FIELDS and kind != "pairwise":
      raise ValueError(f"config.loss.from_data names {input_name!r}, but {kind} batches have "
                       f"no {BATCH_FIELDS[input_name]!r} field (pairwise records only).")
  if _get(lc, "more", False):
    if name != "bt_weighted":
      raise ValueError(f"config.loss.more=True needs config.loss.name='bt_weighted', not "
                       f"{name!r}.")
    if len(dc.sources) < 2:
      raise ValueError(f"config.loss.more=True needs at least 2 sources to weigh: set "
                       f"data.sources to the records' `source` values (it is "
                       f"{tuple(dc.sources)}).")
    if "source" in lc.from_data:
      raise ValueError("config.loss.more=True sets `source` itself; remove it from "
                       "config.loss.from_data.")


def make_loss_fn(config):
  """loss_fn(model, batch) -> (loss_sum, denom, metrics) for the loop, summed over ensemble
  members (so the loop's division gives the members' mean loss).

  Per member: pairwise losses get the scalar rewards of rows 0 (chosen) and 1 (rejected),
  listwise losses [B, K] scores, `rm_regression` the outputs [B, A], `bt_plus_regression`
  the better- and worse-rated response of a 2-response list with their ratings. bt_ties in
  mode rao_kupper / davidson gets the model's learned `tie_param` instead of the constant.
  With `loss.more` (bt_weighted), lam = MORE weights (see `more_lambdas`; no EMA across
  steps) feeds `bt_weighted(source=source_id, source_weights=lam, per_source_mean=True)`,
  and metrics `more_lam_<s>` carry lam * denom, so the loop reports lam.
  """
  check_config(config)
  name = config.loss.name
  entry = registry.get(name)
  params = dict(config.loss.params)
  from_data = tuple(config.loss.from_data)
  weights = attribute_weights(config)
  tie_name = tie_param_name(config)
  more = bool(_get(config.loss, "more", False))
  more_normalize = bool(_get(config.loss, "more_normalize", False))
  num_sources = len(config.data.sources)

  def member_kwargs(batch):
    kw = dict(params, mask=batch["example_mask"])
    for input_name in from_data:
      kw[input_name] = batch[BATCH_FIELDS[input_name]]
    return kw

  def member_loss(out_BxnxA, batch, kw):
    """(loss_sum, denom, metrics) of one member from its outputs [B, n, A]."""
    if name == "bt_plus_regression":
      r_Bx2 = scalar_rewards(out_BxnxA, weights)
      order, ratings = batch["order"], batch["scores"]
      help_c, help_r = _take(ratings, order[:, 0]), _take(ratings, order[:, 1])
      # Equal ratings: no preference (strength 0), the regression term only.
      return entry.fn(_take(r_Bx2, order[:, 0]), _take(r_Bx2, order[:, 1]), help_c=help_c,
                      help_r=help_r, strength=(help_c != help_r).astype(jnp.float32), **kw)
    if entry.kind == "pairwise":
      r = scalar_rewards(out_BxnxA, weights)
      return entry.fn(r[:, 0], r[:, 1], **kw)
    if entry.kind == "gpm":
      return entry.fn(out_BxnxA[:, 0], out_BxnxA[:, 1], **kw)
    if entry.kind == "listwise":
      scores = scalar_rewards(out_BxnxA, weights)
      if name == "plackett_luce":
        return entry.fn(scores, batch["order"], batch["n"], **kw)
      return entry.fn(scores, batch["scores"], batch["valid"], **kw)
    return entry.fn(out_BxnxA[:, 0], batch["targets"], batch["target_mask"], **kw)  # rated

  def more_lambdas(model, features, batch, b, n):
    """MORE source weights lam [E, S] (stop-gradient), one simplex point per member.

    *On Diversified Preferences of Large Language Model Alignment* (MORE); METHODS
    `bt_weighted`. g_s = d(source s's mean BT loss)/d(head weights) with stop-gradient
    features (jacrev over the head's Params, `tie_param` excluded); for a linear head
    g_s = mean_{i in s} -sig(-d_i) (h_c,i - h_r,i). lam = more_weights(g, present). The
    gradient EMA across steps (rate a < 1) is out of scope: rate 1, each step (each
    micro-batch with grad_accum) uses only its own rows.
    """
    graphdef, head_state, rest = nnx.split(model, _HEAD_WEIGHTS, ...)
    h = jax.lax.stop_gradient(features)
    mask, src = batch["example_mask"].astype(jnp.float32), batch["source_id"]
    count_S = jax.ops.segment_sum(mask, src, num_segments=num_sources)

    def source_losses(state):  # [E, S]: each source's mean BT loss, per member
      out = nnx.merge(graphdef, state, rest).head_outputs(h)
      r = scalar_rewards(out.reshape(b, n, *out.shape[1:]), weights)       # [B, 2, E]
      l_BxE = jax.nn.softplus(r[:, 1] - r[:, 0]) * mask[:, None]
      sums_SxE = jax.ops.segment_sum(l_BxE, src, num_segments=num_sources)
      return (sums_SxE / jnp.maximum(count_S, 1.0)[:, None]).T

    jac = jax.jacrev(source_losses)(head_state)
    leaves = jax.tree.leaves(jac)
    e = leaves[0].shape[0]
    g_ExSxP = jnp.concatenate([x.reshape(e, num_sources, -1) for x in leaves], axis=-1)
    lam = jax.vmap(lambda g: more_weights(g, count_S > 0, normalize=more_normalize))(g_ExSxP)
    return jax.lax.stop_gradient(lam)

  def loss_fn(model, batch):
    b, n = batch["tokens"].shape[:2]
    features = model.features(_flat(batch["tokens"]), _flat(batch["positions"]),
                              _flat(batch["segment_ids"]))
    out = model.head_outputs(features)                              # [B*n, E, A]
    out = out.reshape(b, n, *out.shape[1:])                         # [B, n, E, A]
    kw = member_kwargs(batch)
    tie = model.tie_parameter() if tie_name else None               # [E]
    lam = more_lambdas(model, features, batch, b, n) if more else None  # [E, S]
    totals = None
    for e in range(out.shape[2]):
      kw_e = dict(kw)
      if tie is not None:
        kw_e[tie_name] = tie[e]
      if lam is not None:
        kw_e.update(source=batch["source_id"], source_weights=lam[e], per_source_mean=True)
      loss_sum, denom, metrics = member_loss(out[:, :, e], batch, kw_e)
      if lam is not None:  # the loop divides metrics by the summed denominator
        metrics = dict(metrics, **{f"more_lam_{s}": lam[e, s] * denom
                                   for s in range(num_sources)})
      res = (loss_sum, denom, metrics)
      totals = res if totals is None else jax.tree.map(jnp.add, totals, res)
    return totals

  return loss_fn


def data_kind(config) -> str:
  name = config.loss.name
  return LOSS_DATA_KIND.get(name) or DATA_KIND[registry.get(name).kind]


def build_task(config, tokenizer=None) -> loop.Task:
  tokenizer = tokenizer or common.build_tokenizer(config)
  cfg = common.model_config(config, tokenizer.vocab_size)
  dc = config.data
  kind = data_kind(config)
  loss_fn = make_loss_fn(config)
  members = num_backbones(config)
  logging.info("reward model: %s + %s head%s; loss %s (%s data)", cfg.family, config.reward.head,
               f" x {members} parameter sets" if members > 1 else "", config.loss.name, kind)

  def iterator(split):
    return pref_data.make_preference_iterator(
        dc, tokenizer, kind=kind, seq_len=dc.seq_len, global_batch_size=dc.batch_size,
        seed=config.seed, split=split, num_epochs=1 if split == "eval" else None)

  responses = 2 if kind == "pairwise" else (dc.max_responses if kind == "listwise" else 1)
  has_eval = bool(dc.eval_files or dc.synthetic)
  return loop.Task(
      build_model=lambda mesh, rules: build_reward_model(config, cfg, mesh, rules),
      loss_fn=loss_fn,
      train_iter=lambda: iterator("train"),
      eval_iter=(lambda: iterator("eval")) if has_eval else None,
      flops_per_token=members * cfg.flops_per_token(dc.seq_len),
      tokens_per_batch=dc.batch_size * responses * dc.seq_len,
  )


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "reward_model"`."""
  summary = loop.train(config, workdir, build_task(config))
  if jax.process_index() == 0:  # "before" is known only when this call started at step 0
    for key, label, fmt in (("eval_accuracy", "pairwise accuracy", ".1%"),
                            ("eval_squared_error", "squared error per label", ".4g")):
      if key in summary:
        before = summary.get(f"initial_{key}")
        prefix = f"before {before:{fmt}}, after " if before is not None else ""
        print(f"held-out {label}: {prefix}{summary[key]:{fmt}}", flush=True)
        break
  return summary
