"""Online RL (`task = "rl"`): GRPO and its variants, PPO, RLOO, REINFORCE++, ReMax, RAFT,
SuperHF and online DPO, against reward functions (METHODS.md sections 3 and 4).

One RL step (`train.num_steps` of them):
  1. rollout   B prompts (`rl.num_prompts`) -> G completions each (`rl.group_size`) from the
               KV-cache sampler, synced to the current policy, on the training mesh;
  2. score     every configured reward function (`rl.rewards`, alignjax/rewards) on the
               decoded text and the record's fields -> r [B,G] (NaN = unscorable: advantage 0,
               counted in `num_unscorable/<name>`); optional overlong penalty; DAPO dynamic
               sampling drops groups whose rewards are all equal and samples more prompts;
  3. log-probs old (recomputed with the pre-update policy, or the sampler's), reference, and
               the critic's values (PPO), each in one jitted forward;
  4. advantages a registered estimator (alignjax/rl/advantages.py) whose positional inputs
               name what the trainer computes (r, mask, lengths, kl, values, ...);
  5. update    `rl.epochs` passes over `rl.mini_batches` mini-batches, one optimizer step
               each, with the registered policy loss (alignjax/rl/objectives.py), KL in the
               loss, entropy bonus and (PPO) the clipped value loss. Normalisers (token and
               sequence counts) are computed on each whole mini-batch before its micro-batches
               (`train.grad_accum`), so every aggregation mode is exact across data-parallel
               shards and accumulation steps (METHODS 3.4).

`rl.algorithm` picks a recipe (defaults for the estimator, loss, aggregation and extras,
`ALGORITHMS`); any key set explicitly in `config.rl` overrides it. Checkpoints are written at
RL-step boundaries (policy, optimizer, reference, adaptive-KL state); prompts and sampling
keys are functions of (seed, RL step), so a resumed run continues exactly.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignjax import parallel
from alignjax.data import synthetic
from alignjax.evaluation import overopt, report
from alignjax.losses.logprobs import token_logprobs
from alignjax.models.value import PolicyAndValue, ValueModel
from alignjax.rewards import combine as reward_combine
from alignjax.rewards import registry as reward_registry
from alignjax.rewards import shaping
from alignjax.rl import advantages as adv_lib
from alignjax.rl import filters
from alignjax.rl import objectives as obj
from alignjax.sampling.sampler import Sampler, SamplingConfig, bucket, PROMPT_BUCKETS
from alignjax.trainers import checkpoint as ckpt_lib
from alignjax.trainers import common
from alignjax.trainers import loop
from alignjax.trainers import metrics as metrics_lib
from alignjax.trainers.optim import make_optimizer

f32 = jnp.float32

# Recipes: defaults that `rl.algorithm` fills in for keys left at "" / None in config.rl.
# objective: "policy" (a registered policy loss on advantages), "raft" (reward-ranked SFT),
# "superhf" (top-1 SFT + KL prior) or "online_dpo" (best vs worst of each group, DPO loss).
ALGORITHMS = {
    "grpo": dict(advantage="grpo_adv", policy_loss="ppo",
                 aggregation="seq-mean-token-mean"),
    "dr_grpo": dict(advantage="drgrpo_adv", policy_loss="ppo",
                    aggregation="seq-mean-token-sum-norm"),
    "dapo": dict(advantage="grpo_adv", policy_loss="ppo", aggregation="token-mean",
                 policy_loss_params={"eps_hi": 0.28}, dynamic_sampling=True,
                 overlong="soft"),
    "gspo": dict(advantage="grpo_adv", policy_loss="gspo",
                 aggregation="seq-mean-token-mean"),
    "gmpo": dict(advantage="grpo_adv", policy_loss="gmpo",
                 aggregation="seq-mean-token-mean"),
    "cispo": dict(advantage="grpo_adv", policy_loss="cispo", aggregation="token-mean"),
    "sapo": dict(advantage="grpo_adv", policy_loss="sapo",
                 aggregation="seq-mean-token-mean"),
    "rloo": dict(advantage="rloo_adv", policy_loss="ppo", aggregation="token-mean"),
    "reinforce_pp": dict(advantage="reinforce_pp_adv", policy_loss="ppo",
                         aggregation="token-mean", kl_in_reward_coef=0.01),
    "reinforce_pp_baseline": dict(advantage="reinforce_pp_baseline_adv",
                                  policy_loss="ppo", aggregation="token-mean"),
    "remax": dict(advantage="remax_adv", policy_loss="ppo", aggregation="token-mean"),
    "opo": dict(advantage="opo_adv", policy_loss="ppo", aggregation="token-mean"),
    "gpg": dict(advantage="gpg_adv", policy_loss="pg", aggregation="token-mean"),
    "ppo": dict(advantage="gae_adv", policy_loss="ppo", aggregation="token-mean",
                kl_in_reward_coef=0.05, critic=True),
    "raft": dict(objective="raft", advantage="", policy_loss=""),
    "superhf": dict(objective="superhf", advantage="", policy_loss=""),
    "online_dpo": dict(objective="online_dpo", advantage="", policy_loss=""),
}
OBJECTIVES = ("policy", "raft", "superhf", "online_dpo")


def rl_config(algorithm: str = "grpo") -> ml_collections.ConfigDict:
  """`config.rl`. Keys left "" or None take the recipe's value (`ALGORITHMS[algorithm]`)."""
  return ml_collections.ConfigDict(dict(
      algorithm=algorithm,
      objective="",               # "": from the recipe (policy | raft | superhf | online_dpo)
      # Rollouts.
      num_prompts=16,             # B prompts per RL step
      group_size=8,               # G completions per prompt
      max_new_tokens=16,
      temperature=1.0,
      top_k=0, top_p=1.0, min_p=0.0,
      chat_template="auto",       # auto | always | never (prompt records; see sampling/task.py)
      # Dataset Reset Policy Optimization (METHODS 8.7): with this probability a prompt starts
      # at x + y_w[:h], h ~ U{0..|y_w|-1}, y_w = the record's `dataset_reset_field` (its
      # preferred offline response); rewards score y_w[:h] + the completion; the loss, KL and
      # entropy cover the generated tokens only. 0: off.
      dataset_reset=0.0,
      dataset_reset_field="chosen",
      # Rewards: a list of {"name", "weight", "params", "alias"} or "a,b:0.5" (docs/rewards.md).
      rewards=ml_collections.FieldReference("math_reward", field_type=object),
      # Rewards scored on every rollout and logged (`monitor/<name>`) but never trained on,
      # e.g. a held-out "gold" reward model; same format as `rewards`.
      monitor_rewards=ml_collections.FieldReference("", field_type=object),
      reward_whiten=False,        # whiten the combined reward over the batch (NaN-aware)
      # Reward transforms and combinators applied in order after the reward functions
      # (alignjax/rewards/shaping.py, docs/reward_shaping.md): a list of {"name", "params"}
      # or "a,b".
      reward_transforms=ml_collections.FieldReference("", field_type=object),
      ref_reward_samples=1,       # samples of the reference policy per prompt for `r_ref`
      dataset_field="dataset",    # record field giving each prompt's dataset (median_norm)
      # Estimator and objective.
      advantage="",               # a name in alignjax/rl/advantages.py ("": recipe)
      advantage_params=ml_collections.ConfigDict(type_safe=False),
      policy_loss="",             # a name in alignjax/rl/objectives.py ("": recipe)
      policy_loss_params=ml_collections.ConfigDict(type_safe=False),
      aggregation="",             # token-mean | seq-mean-token-mean | seq-mean-token-sum |
                                  # seq-mean-token-sum-norm ("": recipe)
      norm_const=0,               # seq-mean-token-sum-norm constant C (0: max_new_tokens)
      norm="verl",                # verl: / C; trl: / (N_seq * C)
      stable_adv_filter=False,    # drop tokens of rows with |batch z(A)| > 3 (StableReinforce)
      # Updates.
      epochs=1,                   # mu passes over each rollout batch
      mini_batches=1,             # optimizer steps per pass
      old_logprobs="recompute",   # recompute (a forward of the pre-update policy) | sampler
      rollout_is="",              # "" | tis | mis: trainer-vs-sampler importance weights
      rollout_is_params=ml_collections.ConfigDict(type_safe=False),
      # KL and entropy.
      kl_coef=0.0,                # beta of KL(pi || ref) in the loss (GRPO: 0.04 paper, 0.001 verl)
      kl_estimator="k3",          # k1 | k2 | k3 | abs | k1+ | k3+ (straight-through)
      kl_in_reward_coef=None,     # per-token -beta (old - ref) in the reward (PPO; None: recipe)
      kl_in_reward_estimator="k1",
      adaptive_kl_target=0.0,     # > 0: adapt kl_coef (or kl_in_reward_coef) to this KL
      adaptive_kl_horizon=10000,
      entropy_coef=0.0,           # c_H: loss -= c_H * agg(entropy)
      ref_update_steps=0,         # > 0: reset the reference to the policy every K RL steps
      reference_checkpoint="",    # "" : the initial policy
      # DAPO extras.
      dynamic_sampling=None,      # None: recipe; True: keep only groups with reward std > 0
      max_gen_batches=3,          # rollout rounds per step when dynamic sampling refills
      overlong=None,              # None: recipe; "" | soft | buffer
      overlong_cache_len=4,       # soft: penalty ramps over the last `cache_len` tokens
      overlong_buffer_len=4,      # buffer: verl's buffer length
      overlong_factor=1.0,
      truncation_mask=False,      # rows without a stop token get mask 0 (reward kept in stats)
      # PPO critic.
      critic=None,                # None: recipe (ppo: True)
      vf_coef=0.5,
      value_clip=0.2,
      gamma=1.0,
      lam=0.95,
      # RAFT / SuperHF / online DPO.
      raft_k=1,
      raft_tau=ml_collections.FieldReference(None, field_type=object),
      superhf_beta=0.1,
      dpo_beta=0.1,
      # Evaluation (synthetic arithmetic: greedy exact match on held-out problems).
      eval_examples=200,
      eval_samples=4,             # also sample k completions per held-out prompt at
                                  # rl.temperature: eval_sampled_reward / _accuracy (0: off)
      logprob_batch_size=0,       # rows per forward when computing old / ref log-probs (0: all)
      # Over-optimisation curve (docs/overoptimization.md): every `curve_every` RL steps (and
      # at step 0 and the end), `curve_samples` samples on the first `curve_prompts` held-out
      # prompts give KL(pi || ref), every reward and monitor and the collapse monitors, one
      # row per evaluation in <workdir>/curve.jsonl. 0: off.
      curve_every=0,
      curve_prompts=64,
      curve_samples=4,
  ))


def resolve(rc) -> dict:
  """config.rl with the recipe's defaults filled in (a plain dict)."""
  if rc.algorithm not in ALGORITHMS:
    raise ValueError(f"config.rl.algorithm={rc.algorithm!r} is unknown; choose one of "
                     f"{sorted(ALGORITHMS)}.")
  recipe = {**dict(objective="policy", dynamic_sampling=False, overlong="", critic=False,
                   kl_in_reward_coef=0.0, policy_loss_params={}), **ALGORITHMS[rc.algorithm]}
  out = rc.to_dict()
  for k, v in recipe.items():
    if k in ("policy_loss_params",):
      out[k] = {**v, **out.get(k, {})}
    elif out.get(k) in ("", None):
      out[k] = v
  if out["norm_const"] <= 0:
    out["norm_const"] = out["max_new_tokens"]
  return out


def check_config(config) -> dict:
  """Validates config.rl (errors name the key and the choices); returns `resolve(config.rl)`."""
  r = resolve(config.rl)
  if r["objective"] not in OBJECTIVES:
    raise ValueError(f"config.rl.objective={r['objective']!r}; choose one of {OBJECTIVES}.")
  if r["objective"] == "policy":
    if r["advantage"] not in adv_lib.names():
      _bad("advantage", r["advantage"], adv_lib.names())
    if r["policy_loss"] not in obj.names():
      _bad("policy_loss", r["policy_loss"], obj.names())
    if r["aggregation"] not in obj.MODES:
      _bad("aggregation", r["aggregation"], obj.MODES)
    for key, fn, params in (("advantage_params", adv_lib.get(r["advantage"]),
                             r["advantage_params"]),
                            ("policy_loss_params", obj.get(r["policy_loss"]),
                             r["policy_loss_params"])):
      known = _keyword_names(fn)
      for p in params:
        if p not in known:
          raise ValueError(f"config.rl.{key}.{p}: {fn.__name__} has no parameter {p!r}; "
                           f"its parameters: {sorted(known)}.")
  if r["kl_estimator"] not in _KL:
    _bad("kl_estimator", r["kl_estimator"], sorted(_KL))
  if r["kl_in_reward_estimator"] not in _KL:
    _bad("kl_in_reward_estimator", r["kl_in_reward_estimator"], sorted(_KL))
  if r["old_logprobs"] not in ("recompute", "sampler"):
    _bad("old_logprobs", r["old_logprobs"], ("recompute", "sampler"))
  if r["old_logprobs"] == "sampler" and (r["top_k"] or r["top_p"] < 1 or r["min_p"] > 0):
    raise ValueError("config.rl.old_logprobs='sampler' needs an unfiltered sampling "
                     "distribution (top_k=0, top_p=1, min_p=0): the sampler's log-probs are "
                     "then the policy's at rl.temperature. Use 'recompute' with filters.")
  if r["rollout_is"] not in ("", "tis", "mis"):
    _bad("rollout_is", r["rollout_is"], ("", "tis", "mis"))
  if r["overlong"] not in ("", "soft", "buffer"):
    _bad("overlong", r["overlong"], ("", "soft", "buffer"))
  if r["group_size"] < 1 or r["num_prompts"] < 1 or r["epochs"] < 1 or r["mini_batches"] < 1:
    raise ValueError("config.rl.group_size, num_prompts, epochs and mini_batches must be >= 1.")
  n = r["num_prompts"] * r["group_size"]
  if r["objective"] == "online_dpo":
    n = 2 * r["num_prompts"]
  ways = r["mini_batches"] * config.train.grad_accum
  if n % ways:
    raise ValueError(f"config.rl: {n} rollout rows (num_prompts x group_size) must divide "
                     f"into rl.mini_batches x train.grad_accum = {ways}.")
  if r["objective"] in ("online_dpo",) and r["group_size"] < 2:
    raise ValueError("config.rl.group_size must be >= 2 for online_dpo (best vs worst).")
  if r["objective"] == "online_dpo" and (config.train.grad_accum != 1
                                         or r["num_prompts"] % r["mini_batches"]):
    raise ValueError("online_dpo keeps each (chosen, rejected) pair in adjacent rows: it needs "
                     "train.grad_accum = 1 and rl.num_prompts divisible by rl.mini_batches.")
  reward_registry.parse_rewards(_rewards_value(config.rl.rewards))
  reward_registry.parse_rewards(_rewards_value(config.rl.get("monitor_rewards", "")),
                                key="rl.monitor_rewards")
  if not 0.0 <= r["dataset_reset"] <= 1.0:
    raise ValueError(f"config.rl.dataset_reset={r['dataset_reset']} must be a probability in "
                     "[0, 1].")
  if r["curve_every"] < 0 or (r["curve_every"] and (r["curve_prompts"] < 1
                                                     or r["curve_samples"] < 1)):
    raise ValueError("config.rl.curve_every must be >= 0, and curve_prompts and curve_samples "
                     ">= 1 when it is on.")
  for name, fn, _ in shaping.parse_transforms(_rewards_value(config.rl.reward_transforms)):
    missing = [k for k in shaping.required_inputs(fn) if k not in _TRANSFORM_INPUTS]
    if missing or shaping.output_of(fn) not in ("r", "R", "weights"):
      raise ValueError(f"config.rl.reward_transforms: {name} needs {missing or 'an output'} "
                       f"that the RL trainer does not provide (it passes "
                       f"{sorted(_TRANSFORM_INPUTS)} and uses outputs r, R, weights); apply it "
                       "in a reward function instead.")
  return r


# What the trainer passes to reward transforms (alignjax/rewards/shaping.INPUTS).
_TRANSFORM_INPUTS = ("r", "R", "group", "step", "key", "r_ref", "dataset", "state")


def _bad(key, value, choices):
  raise ValueError(f"config.rl.{key}={value!r} is unknown; choose one of {sorted(choices)}.")


def _keyword_names(fn) -> set[str]:
  return {p.name for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _rewards_value(x):
  return x.to_dict() if hasattr(x, "to_dict") else (list(x) if isinstance(x, tuple) else x)


_KL = obj.KL_ESTIMATORS


# ---------------------------------------------------------------------------- prompts


class PromptSource:
  """Prompt records for rollouts and evaluation: the built-in arithmetic task (records
  {"prompt", "answer"}), the built-in letters task (`data.synthetic="preference"`, records
  {"prompt"}; its ground truth is the `letters_score` reward) or JSONL files
  (`data.train_files` / `data.eval_files`) of {"prompt": str} or {"messages": [...]} records
  with any other fields (passed to rewards)."""

  def __init__(self, config, split: str):
    dc = config.data
    self.records = None
    self.letters = dc.get("synthetic", "") == "preference"
    if dc.get("synthetic", "") == "arithmetic":
      self.src = synthetic.ArithmeticSource(config.seed, split,
                                             max_digits=dc.arithmetic.max_digits,
                                             ops=dc.arithmetic.ops)
    elif self.letters:
      opts = dict(dc.get("preference") or {})
      opts = {k: v for k, v in opts.items() if k in ("prompt_len", "min_len", "max_len",
                                                     "num_records", "eval_fraction")}
      self.src = synthetic.PreferenceSource(config.seed, split, kind="sft", **opts)
    else:
      from alignjax.sampling.task import _read_prompts  # noqa: PLC0415
      files = dc.train_files if split == "train" else dc.get("eval_files", "")
      if not files:
        if split == "eval":
          self.src = None
          return
        raise ValueError("config.data.train_files is empty and data.synthetic is not "
                         "'arithmetic': give a JSONL file of prompt records.")
      paths = [files] if isinstance(files, str) else list(files)
      self.records = [r for p in paths for r in _read_prompts(p)]
      self.src = self.records

  def __len__(self):
    return 0 if self.src is None else len(self.src)

  def __getitem__(self, i):
    if self.records is not None:
      return self.records[i]
    if self.letters:
      return {"prompt": self.src[i]["prompt"]}
    prompt, answer = self.src.problem(i)
    return {"prompt": prompt, "answer": answer}


def _encode(record, tokenizer, mode):
  from alignjax.sampling.task import encode_prompt  # noqa: PLC0415
  return encode_prompt(record, tokenizer, mode)


def prompt_indices(n_src: int, seed: int, step: int, count: int, round_: int = 0) -> np.ndarray:
  """Prompt indices of RL step `step` (round `round_` of dynamic sampling): a pure function of
  (seed, step, round), so resumed runs see the same prompts."""
  rng = np.random.default_rng([seed, step, round_, 17])
  return rng.integers(0, n_src, size=count)


# ---------------------------------------------------------------------------- arrays


def place(batch: dict, mesh, rules) -> dict:
  """Global numpy arrays (the same on every process) -> arrays sharded over the batch axes."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sharding = parallel.batch_sharding(mesh, rules, v.ndim)
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def sequences(prompts: list[list[int]], samples_tokens: np.ndarray, lengths: np.ndarray,
              pad_id: int) -> dict:
  """Training arrays for (prompt, completion) rows: prompts left-padded to a bucket P, then
  the completion's T slots. tokens/positions/segment_ids [N,P+T]; completion [N,T] (targets,
  the generated tokens) and mask [N,T] (1 on generated tokens, including the stop token)."""
  n, t = samples_tokens.shape
  p = bucket(max(len(x) for x in prompts), PROMPT_BUCKETS)
  tokens = np.full((n, p + t), pad_id, np.int32)
  valid = np.zeros((n, p + t), np.int32)
  for i, pr in enumerate(prompts):
    tokens[i, p - len(pr):p] = pr
    valid[i, p - len(pr):p] = 1
  tokens[:, p:] = samples_tokens
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  valid[:, p:] = mask
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
  return dict(tokens=tokens, positions=positions, segment_ids=valid,
              completion=samples_tokens.astype(np.int32), mask=mask.astype(np.float32))


def _policy(model):
  return model.policy if isinstance(model, PolicyAndValue) else model


def completion_logprobs(policy, batch, *, temperature, chunk_size, vocab_chunk_size,
                        with_entropy=False):
  """Token log-probs (and entropies) of the completion slots [N,T], at `temperature`."""
  t = batch["completion"].shape[1]
  p = batch["tokens"].shape[1] - t
  h = policy.hidden(batch["tokens"][:, :p + t - 1], batch["positions"][:, :p + t - 1],
                    batch["segment_ids"][:, :p + t - 1])[:, p - 1:]
  return token_logprobs(h, policy.unembedding(), batch["completion"], chunk_size=chunk_size,
                        temperature=temperature, with_entropy=with_entropy,
                        vocab_chunk_size=vocab_chunk_size)


def completion_values(value_model, batch):
  """Critic values of the states before each completion token [N,T]."""
  t = batch["completion"].shape[1]
  p = batch["tokens"].shape[1] - t
  v = value_model(batch["tokens"][:, :p + t - 1], batch["positions"][:, :p + t - 1],
                  batch["segment_ids"][:, :p + t - 1])
  return v[:, p - 1:]


# ---------------------------------------------------------------------------- the loss


def make_loss_fn(r: dict, *, temperature: float, chunk_size: int, vocab_chunk_size,
                 grad_accum: int):
  """loss_fn(model, batch, frozen) for `loop.make_train_step`.

  Every term is already divided by its global (mini-batch) normaliser, carried in the batch
  (`d_pol`, `d_tok`, `d_v`: the same value on every row), so the loop's sum over micro-batches
  is the exact mini-batch loss; the returned denominator is 1 / grad_accum per micro-batch
  (the loop divides by the sum, 1). Metrics are normalised the same way.
  """
  objective, mode = r["objective"], r["aggregation"]
  pol_fn = obj.get(r["policy_loss"]) if objective == "policy" else None
  pol_params = dict(r["policy_loss_params"])
  kl_fn = _KL[r["kl_estimator"]]
  critic = r["critic"]
  ent_coef = float(r["entropy_coef"])

  def loss_fn(model, batch, frozen):
    policy = _policy(model)
    m = batch["mask"]
    logp, ent = completion_logprobs(policy, batch, temperature=temperature,
                                    chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                                    with_entropy=True)
    d_tok = batch["d_tok"][0]
    metrics = {"entropy": obj.masked_sum(jax.lax.stop_gradient(ent), m) / d_tok}
    if objective == "policy":
      inputs = dict(logp=logp, old=batch["old"], A=batch["A"], mask=m,
                    ref=batch.get("ref"))
      l, aux = obj.call(pol_fn, inputs, **pol_params)
      if "is_w" in batch:
        l = l * batch["is_w"]
      d = batch["d_pol"][0]
      loss = obj.numerator(l, m, mode) / d
      metrics["pg_loss"] = jax.lax.stop_gradient(loss)
      for k, v in aux.items():
        if k in ("clipped", "clip_low", "clip_high", "dual_clipped"):
          metrics[f"clipfrac/{k}"] = obj.masked_sum(v, m) / d_tok
      if "ratio" in aux:
        metrics["ratio_mean"] = obj.masked_sum(aux["ratio"], m) / d_tok
    elif objective == "raft":
      num, _ = obj.raft_loss(logp, m, batch["w"])
      loss = num / batch["d_pol"][0]
    elif objective == "superhf":
      num, _ = obj.superhf_loss(logp, batch["ref"], m, batch["w"], beta=r["superhf_beta"])
      loss = num / batch["d_pol"][0]
    else:  # online_dpo: rows alternate chosen, rejected
      s = jnp.sum(jnp.where(m != 0, logp, 0.0), axis=1) - batch["ref_sum"]
      x = r["dpo_beta"] * (s[0::2] - s[1::2])
      w = batch["w"][0::2]
      loss = jnp.sum(w * jax.nn.softplus(-x)) / batch["d_pol"][0]
      metrics["dpo_accuracy"] = jax.lax.stop_gradient(
          jnp.sum(w * (x > 0)) / batch["d_pol"][0])
    if objective in ("policy",) and "ref" in batch and r["kl_coef"] > 0:
      kl = kl_fn(logp, batch["ref"], m)
      loss = loss + frozen["kl_coef"] * obj.numerator(kl, m, mode) / batch["d_pol"][0]
    if "ref" in batch:
      metrics["kl"] = obj.masked_sum(jax.lax.stop_gradient(obj.kl_k3(logp, batch["ref"], m)),
                                     m) / d_tok
    if ent_coef:
      loss = loss - ent_coef * obj.numerator(ent, m, mode) / batch["d_pol"][0]
    if critic:
      v = completion_values(model.value, batch)
      lv, vaux = obj.value_loss(v, batch["values"], batch["returns"], m,
                                clip_eps=r["value_clip"])
      vf = obj.numerator(lv, m, "token-mean") / d_tok
      loss = loss + r["vf_coef"] * vf
      metrics["value_loss"] = jax.lax.stop_gradient(vf)
      metrics["clipfrac/value"] = obj.masked_sum(vaux["clipped"], m) / d_tok
    return loss, jnp.asarray(1.0 / grad_accum, f32), metrics

  return loss_fn


# ---------------------------------------------------------------------------- the trainer


class RLTrainer:
  """Builds the models, the sampler and the jitted functions; `run()` trains."""

  def __init__(self, config, workdir: str, tokenizer=None):
    self.config, self.workdir = config, workdir
    self.r = check_config(config)
    self.tok = tokenizer or common.build_tokenizer(config)
    if self.tok.eos_id is None:
      raise ValueError("The tokenizer has no eos token: completions could never stop.")
    self.cfg = common.model_config(config, self.tok.vocab_size)
    self.specs = reward_registry.parse_rewards(_rewards_value(config.rl.rewards))
    self.monitors = reward_registry.parse_rewards(
        _rewards_value(config.rl.get("monitor_rewards", "")), key="rl.monitor_rewards")
    self.transforms = shaping.parse_transforms(_rewards_value(config.rl.reward_transforms))
    self.transform_states = None   # stateful transforms (host memory; see docs/rl.md)
    self.needs_r_ref = any("r_ref" in shaping.required_inputs(fn) for _, fn, _ in self.transforms)
    self._ref_rewards: dict = {}   # prompt -> [S, K] rewards of reference-policy samples
    self._datasets: dict = {}
    self.train_src = PromptSource(config, "train")
    self.eval_src = PromptSource(config, "eval")
    tc = config.train
    self.updates_per_step = self.r["epochs"] * self.r["mini_batches"]
    self.mesh = parallel.make_mesh(config.mesh.to_dict())
    self.rules = parallel.rules_from_config(config.sharding_rules.to_dict())
    self.tx, self.schedule = make_optimizer(config.optimizer,
                                            tc.num_steps * self.updates_per_step)
    r = self.r
    self.needs_ref = (r["objective"] in ("superhf", "online_dpo") or r["kl_coef"] > 0
                      or self.needs_r_ref or r["curve_every"] > 0
                      or r["kl_in_reward_coef"] > 0
                      or "kl" in _adv_inputs(r) or "ref" in _pol_inputs(r))
    self.temperature = max(float(r["temperature"]), 1e-6) if r["temperature"] > 0 else 1.0
    vchunk = tc.logprob_vocab_chunk_size or None
    self.lp_kw = dict(temperature=self.temperature, chunk_size=tc.logprob_chunk_size,
                      vocab_chunk_size=vchunk)
    self.loss_fn = make_loss_fn(r, grad_accum=tc.grad_accum, **self.lp_kw)

  # -- models and state
  def build(self):
    config, mesh, rules = self.config, self.mesh, self.rules
    policy = common.build_model(config, self.cfg, mesh, rules)
    ref = None
    if self.needs_ref:
      ref = common.reference_state(config, policy, mesh, rules, self.r["reference_checkpoint"])
    model = policy
    if self.r["critic"]:
      backbone = common.build_model(config, self.cfg, mesh, rules)
      model = PolicyAndValue(policy, ValueModel(backbone, mesh))
    self.policy_graphdef = nnx.graphdef(policy)
    graphdef, params = nnx.split(model)
    self.graphdef = graphdef
    # KL coefficients live in the train state (checkpointed; adapted by adaptive KL).
    frozen = {"ref": ref, "kl_coef": jnp.asarray(self.r["kl_coef"], f32),
              "kl_reward_coef": jnp.asarray(self.r["kl_in_reward_coef"], f32)}
    state = loop.init_state(params, self.tx, mesh, rules, config.seed, frozen)
    self.sampler = Sampler(_policy(model), pad_id=self.tok.pad_id, mesh=mesh, rules=rules)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    self.train_step = jax.jit(
        loop.make_train_step(graphdef, self.loss_fn, self.tx, self.schedule,
                             config.train.grad_accum),
        donate_argnums=0, out_shardings=(state_sharding, None))
    lp = functools.partial(completion_logprobs, **self.lp_kw)
    self._logp = jax.jit(lambda gd, p, b: lp(_policy(nnx.merge(gd, p)), b), static_argnums=0)
    self._logp_ent = jax.jit(lambda gd, p, b: jnp.stack(
        lp(_policy(nnx.merge(gd, p)), b, with_entropy=True), -1), static_argnums=0)
    self._values = jax.jit(lambda gd, p, b: completion_values(nnx.merge(gd, p).value, b),
                           static_argnums=0)
    return state

  def _policy_model(self, state):
    return _policy(nnx.merge(self.graphdef, state.params))

  def _batched(self, fn, gd, params, arrays):
    """fn over row chunks of `arrays` (rl.logprob_batch_size), concatenated on the host."""
    n = arrays["tokens"].shape[0]
    size = self.r["logprob_batch_size"] or n
    outs = []
    for s in range(0, n, size):
      chunk = {k: v[s:s + size] for k, v in arrays.items()}
      out = fn(gd, params, place(chunk, self.mesh, self.rules))
      outs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
    return np.concatenate(outs)

  # -- rollouts
  def _generate(self, state, records, step, round_, n, temperature=None, prompts=None):
    if prompts is None:
      prompts = [_encode(rec, self.tok, self.r["chat_template"]) for rec in records]
    r = self.r
    cfg = SamplingConfig(max_new_tokens=r["max_new_tokens"],
                         temperature=r["temperature"] if temperature is None else temperature,
                         top_k=r["top_k"], top_p=r["top_p"], min_p=r["min_p"], n=n,
                         seed=int(np.random.default_rng([self.config.seed, step, round_, 29])
                                  .integers(2**31)),
                         stop_ids=(self.tok.eos_id,))
    self.sampler.sync(self._policy_model(state))
    return prompts, self.sampler.generate(prompts, cfg)

  def _score(self, records, samples, n, specs=None, prefixes=None):
    """(combined reward [N], ScoreResult, completion texts) of `specs` (rl.rewards);
    `prefixes` [B]: text put before each record's completions (dataset-reset starts)."""
    texts = [self.tok.decode([t for t in row if t != self.tok.eos_id])
             for row in samples.completions()]
    if prefixes is not None:
      texts = [prefixes[i // n] + t for i, t in enumerate(texts)]
    prompts = [rec.get("prompt", "") for rec in records for _ in range(n)]
    keys = sorted({k for rec in records for k in rec if not k.startswith("_")} - {"prompt"})
    fields = {k: [rec.get(k) for rec in records for _ in range(n)] for k in keys}
    fields.update(length=samples.lengths.tolist(), truncated=samples.truncated.tolist(),
                  group=samples.prompt_index.tolist(),
                  max_new_tokens=self.r["max_new_tokens"])
    res = reward_registry.score(self.specs if specs is None else specs, prompts, texts, fields)
    total = np.asarray(reward_combine.weighted_sum(res.values, res.weights), np.float64)
    return total, res, texts

  def _monitor_metrics(self, records, samples, n, prefix="monitor/", prefixes=None) -> dict:
    """Mean of each rl.monitor_rewards function (NaN-aware) under `prefix`."""
    if not self.monitors:
      return {}
    _, res, _ = self._score(records, samples, n, self.monitors, prefixes)
    return {f"{prefix}{k[len('reward/'):]}": v for k, v in res.metrics().items()
            if k.startswith("reward/")}

  def _reference_rewards(self, state, records):
    """[B, S, K] rewards of `rl.ref_reward_samples` samples of the reference policy (the frozen
    reference: the initial policy unless rl.reference_checkpoint), cached per prompt."""
    todo = [rec for rec in records if rec.get("prompt", "") not in self._ref_rewards]
    if todo:
      s_ = self.r["ref_reward_samples"]
      ref_model = nnx.merge(self.policy_graphdef, state.frozen["ref"])
      prompts = [_encode(rec, self.tok, self.r["chat_template"]) for rec in todo]
      cfg = SamplingConfig(max_new_tokens=self.r["max_new_tokens"],
                           temperature=self.r["temperature"], top_k=self.r["top_k"],
                           top_p=self.r["top_p"], min_p=self.r["min_p"], n=s_, seed=12345,
                           stop_ids=(self.tok.eos_id,))
      out = self.sampler.sync(ref_model).generate(prompts, cfg)
      _, res, _ = self._score(todo, out, s_)
      for i, rec in enumerate(todo):
        self._ref_rewards[rec.get("prompt", "")] = res.values[i * s_:(i + 1) * s_]
    return np.stack([self._ref_rewards[rec.get("prompt", "")] for rec in records])

  def _transform(self, state, records, out, total, res, step, round_):
    """rl.reward_transforms over this round's rewards: (combined reward [N], loss weights [N])."""
    g = self.r["group_size"]
    n = len(total)
    inputs = dict(r=jnp.asarray(total, f32), R=jnp.asarray(res.values, f32),
                  group=jnp.asarray(out.prompt_index, jnp.int32), step=jnp.int32(step),
                  key=jax.random.key(int(np.random.default_rng([self.config.seed, step, round_,
                                                                 41]).integers(2**31))))
    field = self.r["dataset_field"]
    ids = [self._datasets.setdefault(str(rec.get(field, "")), len(self._datasets))
           for rec in records]
    inputs["dataset"] = jnp.asarray(np.repeat(ids, g), jnp.int32)
    states = list(self.transform_states or [None] * len(self.transforms))
    weights = np.ones(n)
    for i, (name, fn, params) in enumerate(self.transforms):
      if "r_ref" in shaping.required_inputs(fn):
        ref = self._reference_rewards(state, records)             # [B, S, K]
        if name == "lsc_transform":   # per reward function: mean over reference samples
          inputs["r_ref"] = jnp.asarray(np.repeat(np.nanmean(ref, 1), g, 0), f32)
        else:                         # combined reward of each reference sample
          comb = np.asarray(reward_combine.weighted_sum(ref.reshape(-1, ref.shape[-1]),
                                                        res.weights)).reshape(ref.shape[:2])
          inputs["r_ref"] = jnp.asarray(np.repeat(comb, g, 0), f32)
      x, (st,) = shaping.run_pipeline([(name, fn, params)], inputs, [states[i]],
                                      reward_weights=res.weights)
      states[i] = st
      if "weights" in x:
        weights = weights * np.asarray(x.pop("weights"))
      inputs.update({k: x[k] for k in ("r", "R") if k in x})
    if self.needs_r_ref:
      self.sampler.sync(self._policy_model(state))
    self.transform_states = states
    return np.asarray(inputs["r"], np.float64), weights

  def _reset_starts(self, records, step, round_, metrics):
    """(start token lists, text prefixes) of dataset-reset starts (rl.dataset_reset), or
    (None, None) when off. One draw per prompt, so a group shares its start (x, h)."""
    p = float(self.r["dataset_reset"])
    if p <= 0:
      return None, None
    from alignjax import testtime  # noqa: PLC0415
    field = self.r["dataset_reset_field"]
    prompts = [_encode(rec, self.tok, self.r["chat_template"]) for rec in records]
    preferred = [self.tok.encode(str(rec[field])) if rec.get(field) else [] for rec in records]
    rng = np.random.default_rng([self.config.seed, step, round_, 43])
    starts, hs, _ = testtime.dataset_reset_prompts(prompts, preferred, p_reset=p, rng=rng)
    if round_ == 0:
      metrics["dataset_reset_frac"] = float(np.mean([h > 0 for h in hs]))
      metrics["num_missing_reset_field"] = sum(not y for y in preferred)
    prefixes = [self.tok.decode(y[:h]) if h > 0 else "" for y, h in zip(preferred, hs)]
    return starts, prefixes

  def rollout(self, state, step: int) -> tuple[dict, dict]:
    """Samples, scores and (dynamic sampling) refills one RL step's groups; returns host
    arrays for the update and rollout metrics."""
    r, g, b = self.r, self.r["group_size"], self.r["num_prompts"]
    t0 = time.perf_counter()
    kept = []   # (record, prompt ids, token rows, lengths, truncated, logprobs, rewards, res)
    metrics, n_gen, gen_tokens, score_time = {}, 0, 0, 0.0
    rounds = r["max_gen_batches"] if r["dynamic_sampling"] else 1
    zero_std = []
    for round_ in range(rounds):
      idx = prompt_indices(len(self.train_src), self.config.seed, step, b, round_)
      records = [self.train_src[int(i)] for i in idx]
      starts, prefixes = self._reset_starts(records, step, round_, metrics)
      prompts, out = self._generate(state, records, step, round_, g, prompts=starts)
      n_gen += len(records)
      gen_tokens += int(out.lengths.sum())
      ts = time.perf_counter()
      total, res, _ = self._score(records, out, g, prefixes=prefixes)
      loss_w = np.ones(b * g)
      if self.transforms:
        total, loss_w = self._transform(state, records, out, total, res, step, round_)
      score_time += time.perf_counter() - ts
      if round_ == 0:
        metrics.update(res.metrics())
        metrics.update(self._monitor_metrics(records, out, g, prefixes=prefixes))
        for k, name in enumerate(res.names):
          col = res.values[:, k]
          metrics[f"reward_std/{name}"] = float(np.nanstd(col)) if np.isfinite(col).any() \
              else math.nan
        metrics["reward"] = float(np.nanmean(total)) if np.isfinite(total).any() else math.nan
        metrics["num_unscorable"] = int(np.sum(~np.isfinite(total)))
      lengths = out.lengths.astype(np.float64)
      if r["overlong"] == "soft":
        total = total + np.asarray(filters.overlong_soft_penalty(
            lengths, max_len=r["max_new_tokens"], cache_len=r["overlong_cache_len"]))
      elif r["overlong"] == "buffer":
        total = total + np.asarray(filters.overlong_buffer_penalty(
            lengths, max_len=r["max_new_tokens"], buffer_len=r["overlong_buffer_len"],
            factor=r["overlong_factor"]))
      rg = total.reshape(b, g)
      std0 = np.array([np.nanstd(x) if np.isfinite(x).sum() > 1 else 0.0 for x in rg])
      zero_std.append(float(np.mean(std0 == 0)))
      keep = (np.asarray(filters.dynamic_sampling_filter(jnp.asarray(rg, f32)))
              if r["dynamic_sampling"] else np.ones(b, bool))
      for i in np.nonzero(keep)[0]:
        rows = slice(i * g, (i + 1) * g)
        kept.append((records[i], prompts[i], out.tokens[rows], out.lengths[rows],
                     out.truncated[rows], out.logprobs[rows], rg[i], res.values[rows],
                     loss_w[rows]))
      if len(kept) >= b:
        break
    gen_time = time.perf_counter() - t0 - score_time
    metrics["frac_zero_std_groups"] = zero_std[0]
    metrics["num_gen_rounds"] = len(zero_std)
    valid_groups = min(len(kept), b)
    metrics["num_kept_groups"] = valid_groups
    if not kept:  # nothing learnable: pad with the last round's groups, all masked
      for i in range(b):
        rows = slice(i * g, (i + 1) * g)
        kept.append((records[i], prompts[i], out.tokens[rows], out.lengths[rows],
                     out.truncated[rows], out.logprobs[rows], rg[i], res.values[rows],
                     loss_w[rows]))
    while len(kept) < b:   # static shapes: repeat groups, masked out below
      kept.append(kept[len(kept) % max(valid_groups, 1)])
    kept = kept[:b]
    prompts = [k[1] for k in kept for _ in range(g)]
    toks = np.concatenate([k[2] for k in kept])
    lengths = np.concatenate([k[3] for k in kept])
    truncated = np.concatenate([k[4] for k in kept])
    samp = np.concatenate([k[5] for k in kept])
    rewards = np.stack([k[6] for k in kept])               # [B,G]
    arrays = sequences(prompts, toks, lengths, self.tok.pad_id)
    group_ok = np.repeat(np.arange(b) < valid_groups, g) if r["dynamic_sampling"] or \
        not valid_groups else np.ones(b * g, bool)
    if r["truncation_mask"]:
      arrays["mask"] = arrays["mask"] * ~truncated[:, None]
    arrays["mask"] = arrays["mask"] * group_ok[:, None]
    arrays["mask"] = arrays["mask"] * np.concatenate([k[8] for k in kept])[:, None]
    columns = np.stack([k[7] for k in kept])               # [B,G,K] per reward function
    host = dict(rewards=rewards, columns=columns, weights=res.weights,
                lengths=lengths.astype(np.float32), samp=samp,
                truncated=truncated, prompts=[k[0] for k in kept for _ in range(g)])
    metrics.update(response_length=float(lengths.mean()),
                   truncated_frac=float(truncated.mean()),
                   rollout_tokens_per_sec=gen_tokens / max(gen_time, 1e-9),
                   time_generate=gen_time, time_score=score_time)
    return arrays, host, metrics

  def prepare(self, state, arrays, host, metrics, step: int = 0):
    """Old / reference log-probs, values, advantages and weights for the update."""
    r = self.r
    t0 = time.perf_counter()
    gd, params = self.graphdef, state.params
    m = arrays["mask"]
    if r["old_logprobs"] == "sampler":
      arrays["old"] = host["samp"].astype(np.float32)
    else:
      arrays["old"] = self._batched(self._logp, gd, params, _model_inputs(arrays))
    if self.needs_ref:
      arrays["ref"] = self._batched(self._logp, self.policy_graphdef, state.frozen["ref"],
                                    _model_inputs(arrays))
    if r["critic"]:
      arrays["values"] = self._batched(self._values, gd, params, _model_inputs(arrays))
    t1 = time.perf_counter()
    metrics["time_logprobs"] = t1 - t0
    b, g = host["rewards"].shape
    rew = host["rewards"].astype(np.float32)
    if r["reward_whiten"]:
      rew = np.asarray(reward_combine.reward_whiten(jnp.asarray(rew)))
    if r["rollout_is"]:
      arrays["is_w"] = np.asarray(obj.rollout_is_weights(
          arrays["old"], host["samp"], m, mode=r["rollout_is"],
          **dict(r["rollout_is_params"])))
    kl_tok = None
    if self.needs_ref:
      kl_tok = np.where(m != 0, arrays["old"] - arrays["ref"], 0.0).astype(np.float32)
    if r["objective"] == "policy":
      a = self._advantages(state, step, rew, arrays, host, kl_tok)
      if r["stable_adv_filter"]:
        a_seq = a if a.ndim == 1 else a[:, 0]
        keep = np.asarray(adv_lib.stable_adv_filter(
            jnp.asarray(a_seq), valid=jnp.asarray(np.isfinite(rew.reshape(-1)))))
        arrays["mask"] = arrays["mask"] * keep[:, None]
      arrays["A"] = a.astype(np.float32)
      metrics.update(adv_mean=float(_masked_mean(a, arrays["mask"])),
                     adv_std=float(_masked_std(a, arrays["mask"])),
                     adv_abs_max=float(np.max(np.abs(a)) if a.size else 0.0))
    elif r["objective"] in ("raft", "superhf"):
      k = r["raft_k"] if r["objective"] == "raft" else 1
      w = np.asarray(filters.raft_weights(jnp.asarray(rew), k=k, tau=r["raft_tau"]))
      arrays["w"] = w.astype(np.float32) * (arrays["mask"].sum(1) > 0)
      metrics["num_selected"] = float(arrays["w"].sum())
    else:
      arrays = self._dpo_pairs(rew, arrays, metrics)
    metrics["time_advantages"] = time.perf_counter() - t1
    return arrays

  def _advantages(self, state, step, rew, arrays, host, kl_tok):
    r = self.r
    kl_coef = float(state.frozen["kl_reward_coef"])
    fn = adv_lib.get(r["advantage"])
    m = arrays["mask"]
    n, t = m.shape
    scorable = np.isfinite(rew.reshape(-1))
    need = adv_lib.required_inputs(fn)
    if (r["kl_in_reward_coef"] > 0 and kl_tok is not None and "token_rewards" not in need
        and "kl" not in need):  # sequence-level: r -= beta * sum_t KL_t (TRL's RLOO)
      pen = np.asarray(obj.kl_penalty_in_reward(arrays["old"], arrays["ref"], m, beta=kl_coef,
                                                estimator=r["kl_in_reward_estimator"]))
      rew = rew - pen.sum(1).reshape(rew.shape)
    if adv_lib.is_token_level(fn):  # unscorable rows: out of the whitening statistics, A = 0
      m = m * scorable[:, None]
    inputs = dict(r=jnp.asarray(rew), mask=jnp.asarray(m), lengths=jnp.asarray(host["lengths"]))
    if "kl" in need:
      inputs["kl"] = jnp.asarray(kl_tok)
    if "token_rewards" in need:
      tr = np.zeros((n, t), np.float32)
      last = np.clip(m.sum(1).astype(int) - 1, 0, t - 1)
      flat = rew.reshape(-1)
      tr[np.arange(n), last] = np.where(np.isfinite(flat) & (m.sum(1) > 0), flat, 0.0)
      if r["kl_in_reward_coef"] > 0 and kl_tok is not None:
        tr = tr - np.asarray(obj.kl_penalty_in_reward(
            arrays["old"], arrays["ref"], m, beta=kl_coef,
            estimator=r["kl_in_reward_estimator"]))
      inputs["token_rewards"] = jnp.asarray(tr)
    if "values" in need:
      inputs["values"] = jnp.asarray(arrays["values"])
    if "r_multi" in need:  # GDPO: each reward function normalised in its group, then summed
      inputs["r_multi"] = jnp.asarray(host["columns"], f32)
    if "baseline" in need:  # ReMax: the reward of one greedy rollout per prompt
      records = host["prompts"][::r["group_size"]]
      _, greedy = self._generate(state, records, step, 7, 1, temperature=0.0)
      base, _, _ = self._score(records, greedy, 1)
      inputs["baseline"] = jnp.asarray(np.nan_to_num(base, nan=0.0), f32)
    params = dict(r["advantage_params"])
    if "r_multi" in need and "weights" not in params:
      params["weights"] = tuple(float(w) for w in host["weights"])
    if r["advantage"] == "reinforce_pp_adv" and "beta" not in params:
      params["beta"] = kl_coef
    a = np.asarray(fn(**{k: inputs[k] for k in need}, **params))
    a = np.where(scorable.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)
    if r["critic"]:
      _, ret = adv_lib.gae_returns(inputs["token_rewards"], inputs["values"], inputs["mask"],
                                   gamma=params.get("gamma", r["gamma"]),
                                   lam=params.get("lam", r["lam"]))
      arrays["returns"] = np.asarray(ret, np.float32)
    return a

  def _dpo_pairs(self, rew, arrays, metrics):
    """Online DPO rows: per group the best and the worst sample (chosen, rejected)."""
    b, g = rew.shape
    ci, ri, ok = (np.asarray(x) for x in filters.online_dpo_pairs(jnp.asarray(rew)))
    rows = np.stack([np.arange(b) * g + ci, np.arange(b) * g + ri], 1).reshape(-1)
    out = {k: v[rows] for k, v in arrays.items()}
    ok2 = np.repeat(ok, 2).astype(np.float32)
    out["ref_sum"] = np.sum(np.where(out["mask"] != 0, out["ref"], 0.0), 1).astype(np.float32)
    out["w"] = ok2
    out["mask"] = out["mask"] * ok2[:, None]
    metrics["num_pairs"] = float(ok.sum())
    # Rows of the update are pairs: keep them adjacent (no shuffling across the pair).
    return out

  def update(self, state, arrays, step: int, metrics):
    """`epochs` x `mini_batches` optimizer steps on one rollout batch."""
    r = self.r
    t0 = time.perf_counter()
    n = arrays["mask"].shape[0]
    pairs = r["objective"] == "online_dpo"
    unit = 2 if pairs else 1
    mb = r["mini_batches"]
    out = {}
    train_tokens = 0
    for epoch in range(r["epochs"]):
      rng = np.random.default_rng([self.config.seed, step, epoch, 31])
      order = (rng.permutation(n // unit)[:, None] * unit + np.arange(unit)).reshape(-1)
      for chunk in np.array_split(order, mb):
        batch = {k: v[chunk] for k, v in arrays.items() if k in _TRAIN_KEYS}
        batch.update(self._denominators(batch))
        state, m = self.train_step(state, place(batch, self.mesh, self.rules))
        train_tokens += int(batch["mask"].sum())
        out = m
    out = {k: float(v) for k, v in jax.device_get(out).items()}
    dt = time.perf_counter() - t0
    out["time_update"] = dt
    out["train_tokens_per_sec"] = train_tokens / max(dt, 1e-9)
    metrics.update(out)
    return state

  def _denominators(self, batch):
    r = self.r
    m = jnp.asarray(batch["mask"])
    n = m.shape[0]
    d_tok = float(obj.denominator(m, "token-mean"))
    if r["objective"] == "policy":
      d_pol = float(obj.denominator(m, r["aggregation"], norm_const=r["norm_const"],
                                    norm=r["norm"]))
    elif r["objective"] in ("raft", "superhf"):
      d_pol = max(float(np.sum(batch["w"] * batch["mask"].sum(1))), 1.0)
    else:
      d_pol = max(float(np.sum(batch["w"][0::2])), 1.0)
    full = lambda x: np.full((n,), x, np.float32)
    return dict(d_tok=full(d_tok), d_pol=full(d_pol))

  def evaluate(self, state) -> dict:
    """Held-out greedy accuracy (synthetic arithmetic) or mean reward of greedy completions."""
    r = self.r
    if r["eval_examples"] <= 0 or not len(self.eval_src):
      return {}
    n = min(r["eval_examples"], len(self.eval_src))
    records = [self.eval_src[i] for i in range(n)]
    _, out = self._generate(state, records, 0, 99, 1, temperature=0.0)
    total, res, texts = self._score(records, out, 1)
    result = {f"eval_{k}": v for k, v in res.metrics().items() if k.startswith("reward/")}
    result["eval_reward"] = float(np.nanmean(total)) if np.isfinite(total).any() else math.nan
    result.update(self._monitor_metrics(records, out, 1, "eval_monitor/"))
    if self.config.data.get("synthetic", "") == "arithmetic":
      result["eval_accuracy"] = float(np.mean([t.strip() == rec["answer"]
                                               for t, rec in zip(texts, records)]))
    k = r["eval_samples"]
    if k > 0 and r["temperature"] > 0:  # pass@1 of the sampling policy, mean over k samples
      _, out = self._generate(state, records, 0, 98, k)
      total, _, texts = self._score(records, out, k)
      result["eval_sampled_reward"] = float(np.nanmean(total)) if np.isfinite(total).any() \
          else math.nan
      if self.config.data.get("synthetic", "") == "arithmetic":
        result["eval_sampled_accuracy"] = float(np.mean(
            [t.strip() == records[i // k]["answer"] for i, t in enumerate(texts)]))
    return result

  def curve(self, state, step: int) -> dict:
    """One row of the over-optimisation curve (rl.curve_every; METHODS 6.15, 6.18): on the
    first `curve_prompts` held-out prompts (training prompts if there is no eval split),
    `curve_samples` samples y ~ pi_t at rl.temperature (the same sampling seed at every step),
    KL = mean_y sum_t [log pi_t(y_t) - log pi_ref(y_t)], the mean of every reward function
    (`reward/<name>`, before transforms) and monitor (`monitor/<name>`), and the collapse
    monitors (alignjax.evaluation.overopt.collapse_monitors)."""
    r = self.r
    src = self.eval_src if len(self.eval_src) else self.train_src
    n, k = min(r["curve_prompts"], len(src)), r["curve_samples"]
    records = [src[i] for i in range(n)]
    prompts, out = self._generate(state, records, 0, 97, k)
    total, res, texts = self._score(records, out, k)
    arrays = sequences([p for p in prompts for _ in range(k)], out.tokens, out.lengths,
                       self.tok.pad_id)
    rows = n * k
    shards = math.prod(self.mesh.shape[a] for a in
                       (self.rules or parallel.DEFAULT_RULES)["batch"])
    pad = -rows % shards      # rows for the data-parallel mesh: repeat the last, drop after
    inputs = {k_: np.concatenate([v] + [v[-1:]] * pad) for k_, v in
              _model_inputs(arrays).items()}
    pe = self._batched(self._logp_ent, self.graphdef, state.params, inputs)[:rows]
    ref = self._batched(self._logp, self.policy_graphdef, state.frozen["ref"], inputs)[:rows]
    m = arrays["mask"]
    kl = np.sum(np.where(m != 0, pe[..., 0] - ref, 0.0), 1)
    row = {"step": int(step), "kl": float(kl.mean()), "kl_std": float(kl.std()),
           "reward": float(np.nanmean(total)) if np.isfinite(total).any() else math.nan}
    row.update({k_: v for k_, v in res.metrics().items() if k_.startswith("reward/")})
    row.update(self._monitor_metrics(records, out, k))
    row.update(overopt.collapse_monitors(
        out.lengths.reshape(n, k), out.truncated.reshape(n, k), total.reshape(n, k),
        [list(x) for x in out.completions()],
        entropy_sum=np.sum(np.where(m != 0, pe[..., 1], 0.0), 1).reshape(n, k),
        answers=[t.strip() for t in texts]))
    return row

  def host_state(self) -> dict | None:
    """Host-side state saved with each checkpoint when rl.reward_transforms is set: the
    stateful transforms' states, the cached reference-policy rewards and the dataset ids
    (JSON; arrays as {"a": values, "dtype"})."""
    if not self.transforms:
      return None
    enc = lambda x: {"a": np.asarray(x).tolist(), "dtype": str(np.asarray(x).dtype)}
    return {"transform_states": jax.tree.map(enc, self.transform_states),
            "ref_rewards": {k: np.asarray(v).tolist() for k, v in self._ref_rewards.items()},
            "datasets": dict(self._datasets)}

  def load_host_state(self, saved: dict | None) -> None:
    if not saved:
      return
    dec = lambda x: jnp.asarray(np.asarray(x["a"], x["dtype"]))
    self.transform_states = jax.tree.map(dec, saved["transform_states"],
                                         is_leaf=lambda x: isinstance(x, dict) and "a" in x)
    self._ref_rewards = {k: np.asarray(v, np.float32) for k, v in saved["ref_rewards"].items()}
    self._datasets = dict(saved["datasets"])

  def _write_curve(self, rows):
    if jax.process_index() == 0:
      text = "".join(json.dumps(report.to_jsonable(x)) + "\n" for x in rows)
      report._atomic_write(os.path.join(self.workdir, "curve.jsonl"), text)  # noqa: SLF001

  def _load_curve(self, start: int) -> list:
    """Curve rows of an interrupted run up to its checkpoint (later rows are recomputed)."""
    path = os.path.join(self.workdir, "curve.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return [x for x in rows if x["step"] <= start]

  def adapt_kl(self, state, metrics):
    r = self.r
    if r["adaptive_kl_target"] <= 0 or "kl" not in metrics:
      return state
    n_steps = r["num_prompts"] * r["group_size"]
    key = "kl_reward_coef" if r["kl_in_reward_coef"] > 0 else "kl_coef"
    beta = obj.adaptive_kl_update(state.frozen[key], metrics["kl"], n_steps,
                                  target=r["adaptive_kl_target"], horizon=r["adaptive_kl_horizon"])
    metrics[key] = float(beta)
    frozen = dict(state.frozen, **{key: jnp.asarray(beta, f32)})
    return state.replace(frozen=frozen)

  def reset_reference(self, state, step):
    k = self.r["ref_update_steps"]
    if k > 0 and step % k == 0 and state.frozen.get("ref") is not None:
      new_ref = jax.tree.map(jnp.copy, nnx.state(self._policy_model(state)))
      return state.replace(frozen=dict(state.frozen, ref=new_ref))
    return state

  def run(self) -> dict:
    config, workdir = self.config, self.workdir
    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with parallel.use_mesh(self.mesh, self.rules):
      state = self.build()
      checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           config.checkpoint)
      start = 0
      if config.checkpoint.resume and checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state, None)
        start = checkpointer.latest_step()
        self.load_host_state(checkpointer.restore_extra(start))
        logging.info("Resumed from RL step %d in %s", start, checkpointer.directory)
      writer = metrics_lib.MetricWriter(workdir, total=tc.num_steps, initial=start,
                                        progress_bar=tc.progress_bar)
      summary: dict = {}
      every = self.r["curve_every"]
      curve_rows = self._load_curve(start) if every else []

      def add_curve(step_):
        row = self.curve(state, step_)
        curve_rows.append(row)
        self._write_curve(curve_rows)
        writer.write(step_, {f"curve/{k}": v for k, v in row.items() if k != "step"})

      if start == 0:
        initial = self.evaluate(state)
        summary.update({f"initial_{k}": v for k, v in initial.items()})
        writer.write(0, initial)
        if every:
          add_curve(0)
      step = start
      with loop._Preemption() as preempt:
        while step < tc.num_steps:
          t0 = time.perf_counter()
          arrays, host, metrics = self.rollout(state, step)
          arrays = self.prepare(state, arrays, host, metrics, step)
          state = self.update(state, arrays, step, metrics)
          step += 1
          state = self.adapt_kl(state, metrics)
          state = self.reset_reference(state, step)
          metrics["time_step"] = time.perf_counter() - t0
          is_last = step == tc.num_steps
          if step % tc.log_every == 0 or is_last or step == start + 1:
            writer.write(step, metrics)
          summary.update(metrics)
          if tc.eval_every and step % tc.eval_every == 0 and not is_last:
            writer.write(step, self.evaluate(state))
          if every and (step % every == 0 or is_last):
            add_curve(step)
          stop = preempt.requested if jax.process_count() == 1 else preempt.agreed()
          if is_last or stop or step % config.checkpoint.every == 0:
            checkpointer.save(step, state, None, force=is_last or stop,
                              extra=self.host_state())
          if stop:
            checkpointer.wait()
            writer.close()
            summary["preempted_at"] = step
            return summary
      checkpointer.wait()
      res = self.evaluate(state)
      writer.write(step, res)
      writer.close()
      summary.update(res)
      summary["num_compiles_sampler"] = self.sampler.num_compiles
      if every:
        summary["curve"] = curve_rows
      return summary


_TRAIN_KEYS = ("tokens", "positions", "segment_ids", "completion", "mask", "old", "ref", "A",
               "is_w", "values", "returns", "w", "ref_sum")


def _model_inputs(arrays):
  return {k: arrays[k] for k in ("tokens", "positions", "segment_ids", "completion")}


def _adv_inputs(r):
  return adv_lib.required_inputs(r["advantage"]) if r["objective"] == "policy" else ()


def _pol_inputs(r):
  return obj.required_inputs(obj.get(r["policy_loss"])) if r["objective"] == "policy" else ()


def _masked_mean(a, m):
  a = a if a.ndim == 2 else a[:, None] * np.ones_like(m)
  return np.sum(a * m) / max(np.sum(m), 1.0)


def _masked_std(a, m):
  a = a if a.ndim == 2 else a[:, None] * np.ones_like(m)
  mu = _masked_mean(a, m)
  return math.sqrt(np.sum(m * (a - mu) ** 2) / max(np.sum(m), 1.0))


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "rl"`."""
  summary = RLTrainer(config, workdir).run()
  if "eval_accuracy" in summary and jax.process_index() == 0:
    before = summary.get("initial_eval_accuracy")
    algo = config.rl.algorithm
    n = config.rl.eval_examples
    print(f"{algo} held-out accuracy (greedy): before {before:.1%}, after "
          f"{summary['eval_accuracy']:.1%} ({n} problems never seen in training)"
          if before is not None else f"{algo} held-out accuracy (greedy): "
          f"{summary['eval_accuracy']:.1%}", flush=True)
    if "eval_sampled_accuracy" in summary:
      b = summary.get("initial_eval_sampled_accuracy")
      print(f"{algo} held-out accuracy (sampled at temperature {config.rl.temperature}, "
            f"{config.rl.eval_samples} per problem): "
            + (f"before {b:.1%}, after " if b is not None else "")
            + f"{summary['eval_sampled_accuracy']:.1%}", flush=True)
  return summary
