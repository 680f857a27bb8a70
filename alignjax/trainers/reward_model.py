"""Reward-model training (task `reward_model`): any registered reward loss on a backbone +
head, through the shared loop.

The loss is `config.loss.name` (alignjax.losses.registry); its kind decides the data
(`pairwise` and `gpm`: chosen/rejected pairs; `listwise`: K ranked responses; `rated`:
per-attribute scores). Constant hyper-parameters come from `config.loss.params`; per-example
inputs (margins, strengths, tie labels, preference strength, source ids) come from the batch
for the names in `config.loss.from_data`. With `reward.ensemble = E` every head is trained on
the same data and the loss is their sum (each member's mean loss, averaged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from alignjax import parallel
from alignjax.data import preference as pref_data
from alignjax.losses import registry
from alignjax.models.reward import RewardHead, RewardHeadConfig, RewardModel
from alignjax.trainers import common, loop

# Loss keyword -> batch field, for the per-example inputs named in `config.loss.from_data`.
BATCH_FIELDS = {"margin": "margin", "strength": "strength", "labels": "label", "mu": "margin",
                "source": "source_id"}
# The data each loss reads by default (its per-example inputs).
DEFAULT_FROM_DATA = {"bt_margin": ("margin",), "bt_scaled": ("strength",), "bt_ties": ("labels",),
                     "bt_flip": ("mu",), "secrets2": ("mu",), "bt_weighted": ()}
DATA_KIND = {"pairwise": "pairwise", "gpm": "pairwise", "listwise": "listwise", "rated": "rated"}


def loss_config(name: str = "bt") -> ml_collections.ConfigDict:
  """`config.loss`: the registered loss and its constant hyper-parameters (locked)."""
  return ml_collections.ConfigDict(dict(
      name=name, params=registry.defaults(name),
      from_data=tuple(DEFAULT_FROM_DATA.get(name, ()))))


def reward_config() -> ml_collections.ConfigDict:
  """`config.reward`: the head (see alignjax.models.reward)."""
  return ml_collections.ConfigDict(dict(
      head="linear", num_outputs=1, ensemble=1, mlp_hidden=0, prompt_scales=False,
      attribute_weights=(),  # scalar reward = outputs . w for multi-attribute heads
  ))


def head_config(config) -> RewardHeadConfig:
  rc = config.reward
  return RewardHeadConfig(kind=rc.head, num_outputs=rc.num_outputs, ensemble=rc.ensemble,
                          mlp_hidden=rc.mlp_hidden, prompt_scales=rc.prompt_scales)


def build_reward_model(config, cfg, mesh, rules) -> RewardModel:
  """Backbone from `model.checkpoint` / `model.hf_path` / random init (no LM head), plus a
  new head created sharded."""
  backbone = common.build_model(config, cfg, mesh, rules, lm_head=False)
  head = parallel.create_sharded(
      lambda: RewardHead(cfg.hidden_size, head_config(config), init_std=cfg.init_std,
                         rngs=nnx.Rngs(params=config.model.init_seed + 1)),
      mesh, rules)
  return RewardModel(backbone, head)


def load_trained(config, path: str, cfg, mesh, rules=None, step: int | None = None) -> RewardModel:
  """The reward model saved by a `reward_model` run (its workdir or checkpoints/ dir)."""
  from alignjax.models.reward import init_reward_model
  from alignjax.trainers import checkpoint
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_reward_model(cfg, head_config(config))))
  target = parallel.abstract_with_shardings(abstract, mesh, rules)
  return nnx.merge(graphdef, checkpoint.restore_params(path, target, step))


def scalar_rewards(out_NxExA: jax.Array, weights) -> jax.Array:
  """[N, E] scalar rewards: the only output, or outputs . attribute_weights."""
  if out_NxExA.shape[-1] == 1:
    return out_NxExA[..., 0]
  if not weights:
    raise ValueError("reward.num_outputs > 1 needs reward.attribute_weights to form a scalar "
                     "reward for a pairwise or listwise loss.")
  return out_NxExA @ jnp.asarray(weights, jnp.float32)


def _flat(x):
  return x.reshape(-1, x.shape[-1])


def make_loss_fn(config):
  """loss_fn(model, batch) for the loop, summed over ensemble members."""
  entry = registry.get(config.loss.name)
  params = dict(config.loss.params)
  from_data = tuple(config.loss.from_data)
  weights = tuple(config.reward.attribute_weights)

  def member_kwargs(batch):
    kw = dict(params, mask=batch["example_mask"])
    for name in from_data:
      kw[name] = batch[BATCH_FIELDS[name]]
    return kw

  def loss_fn(model, batch):
    b, n = batch["tokens"].shape[:2]
    out = model(_flat(batch["tokens"]), _flat(batch["positions"]),
                _flat(batch["segment_ids"]))                      # [B*n, E, A]
    out = out.reshape(b, n, *out.shape[1:])                         # [B, n, E, A]
    kw = member_kwargs(batch)
    totals = None
    for e in range(out.shape[2]):
      if entry.kind == "pairwise":
        r = scalar_rewards(out[:, :, e], weights)
        res = entry.fn(r[:, 0], r[:, 1], **kw)
      elif entry.kind == "gpm":
        res = entry.fn(out[:, 0, e], out[:, 1, e], **kw)
      elif entry.kind == "listwise":
        scores = scalar_rewards(out[:, :, e], weights)
        if config.loss.name == "plackett_luce":
          res = entry.fn(scores, batch["order"], batch["n"], **kw)
        else:
          res = entry.fn(scores, batch["scores"], batch["valid"], **kw)
      else:  # rated
        res = entry.fn(out[:, 0, e], batch["targets"], batch["target_mask"], **kw)
      totals = res if totals is None else jax.tree.map(jnp.add, totals, res)
    return totals

  return loss_fn


def data_kind(config) -> str:
  return DATA_KIND[registry.get(config.loss.name).kind]


def build_task(config, tokenizer=None) -> loop.Task:
  tokenizer = tokenizer or common.build_tokenizer(config)
  cfg = common.model_config(config, tokenizer.vocab_size)
  dc = config.data
  kind = data_kind(config)
  logging.info("reward model: %s + %s head; loss %s (%s data)", cfg.family, config.reward.head,
               config.loss.name, kind)

  def iterator(split):
    return pref_data.make_preference_iterator(
        dc, tokenizer, kind=kind, seq_len=dc.seq_len, global_batch_size=dc.batch_size,
        seed=config.seed, split=split, num_epochs=1 if split == "eval" else None)

  responses = 2 if kind == "pairwise" else (dc.max_responses if kind == "listwise" else 1)
  has_eval = bool(dc.eval_files or dc.synthetic)
  return loop.Task(
      build_model=lambda mesh, rules: build_reward_model(config, cfg, mesh, rules),
      loss_fn=make_loss_fn(config),
      train_iter=lambda: iterator("train"),
      eval_iter=(lambda: iterator("eval")) if has_eval else None,
      flops_per_token=cfg.flops_per_token(dc.seq_len),
      tokens_per_batch=dc.batch_size * responses * dc.seq_len,
  )


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "reward_model"`."""
  summary = loop.train(config, workdir, build_task(config))
  if "eval_accuracy" in summary and jax.process_index() == 0:
    before = summary.get("initial_eval_accuracy", float("nan"))
    print(f"held-out pairwise accuracy: before {before:.1%}, after "
          f"{summary['eval_accuracy']:.1%}", flush=True)
  return summary
