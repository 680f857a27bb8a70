"""Builders shared by tasks: tokenizer and model from the config."""

from __future__ import annotations

import json
import os

from flax import nnx

from alignjax import parallel
from alignjax.data.tokenizer import CharTokenizer, Tokenizer
from alignjax.models import hf
from alignjax.models.config import ModelConfig
from alignjax.models.presets import get_preset
from alignjax.models.transformer import init_model
from alignjax.trainers import checkpoint


def build_tokenizer(config):
  """`tokenizer.kind='char'`: the built-in character tokenizer (synthetic tasks);
  `'hf'`: tokenizer.json + tokenizer_config.json from `tokenizer.path` (default model.hf_path)."""
  kind = config.tokenizer.kind
  if kind == "char":
    return CharTokenizer()
  if kind == "hf":
    path = config.tokenizer.path or config.model.hf_path
    if not path:
      raise ValueError("config.tokenizer.path (or config.model.hf_path) must name a local "
                       "directory with tokenizer.json, or set config.tokenizer.kind='char'.")
    return Tokenizer.from_dir(path)
  raise ValueError(f"config.tokenizer.kind={kind!r}; expected 'hf' or 'char'.")


def _overrides(mc) -> dict:
  return dict(dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat)


def model_config(config, vocab_size: int) -> ModelConfig:
  """The ModelConfig a run will use (HF config.json or a preset, plus overrides)."""
  mc = config.model
  if mc.hf_path:
    with open(os.path.join(mc.hf_path, "config.json")) as f:
      return hf.config_from_hf(json.load(f), **_overrides(mc))
  vocab = mc.vocab_size if mc.vocab_size > 0 else vocab_size
  return get_preset(mc.preset, vocab_size=vocab, **_overrides(mc))


def build_model(config, cfg: ModelConfig, mesh, rules, lm_head: bool = True):
  """The model, created directly sharded: parameters from `model.checkpoint` (an alignjax
  run), else `model.hf_path`, else a random initialisation. `lm_head=False`: a backbone for
  reward and value models."""
  mc = config.model
  if mc.checkpoint:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg, 0, lm_head)))
    target = parallel.abstract_with_shardings(abstract, mesh, rules)
    step = mc.checkpoint_step if mc.checkpoint_step >= 0 else None
    return nnx.merge(graphdef, checkpoint.restore_params(mc.checkpoint, target, step))
  if mc.hf_path:
    return hf.load_hf_model(mc.hf_path, mesh, rules, lm_head=lm_head, **_overrides(mc))
  return parallel.create_sharded(lambda: init_model(cfg, mc.init_seed, lm_head), mesh, rules)


def reference_state(config, policy, mesh, rules, checkpoint_path: str = "", hf_path: str = "",
                    hf_key: str = "hf_path"):
  """A frozen reference's state (for Task.build_frozen): loaded from an alignjax run
  (`checkpoint_path`) or a local HF checkpoint (`hf_path`, named `hf_key` in errors), both of
  the policy's architecture; else a copy of the policy's current (initial) state. Sharded like
  the policy."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  state = nnx.state(policy)
  if checkpoint_path:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    return checkpoint.restore_params(checkpoint_path, target)
  if hf_path:
    ref_state = nnx.state(hf.load_hf_model(hf_path, mesh, rules, **_overrides(config.model)))
    if jax.tree.structure(ref_state) != jax.tree.structure(state):
      raise ValueError(f"{hf_key}={hf_path!r} has a different architecture from the policy; "
                       "the reference must match it.")
    return ref_state
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)(state)
