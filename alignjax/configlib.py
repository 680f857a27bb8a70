"""Config helpers: the `:key=value,...` argument of config files and shared config sections.

Every config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`.
Sections defined here (mesh, optimizer, train, checkpoint, distributed) are shared by all
tasks so that a key means the same thing everywhere.
"""

from __future__ import annotations

import ast
import os
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'size=tiny,steps=100' into a ConfigDict over `defaults`.

  Values are Python literals where possible (ints, floats, bools), else strings. An unknown
  key is an error naming the key and the known ones.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"Config argument {item!r} is not key=value (in {arg!r}).")
    key, value = item.split("=", 1)
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    out[key] = value
  return ml_collections.ConfigDict(out)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file given by path (relative paths: to the configs/ dir of
  the caller's file are the caller's job); lets one config file compose others."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(
      "alignjax_config_" + os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def model_config() -> ml_collections.ConfigDict:
  """`config.model`: a preset (random init) or a local Hugging Face checkpoint; parameters
  may instead come from an earlier alignjax run (`checkpoint`)."""
  return ml_collections.ConfigDict(dict(
      preset="tiny",        # name in alignjax.models.presets (ignored when hf_path is set)
      hf_path="",           # local dir with config.json + *.safetensors
      vocab_size=-1,        # -1: from the tokenizer (presets) or config.json (HF)
      dtype="float32",      # compute dtype: float32 | bfloat16
      param_dtype="float32",
      remat="none",         # none | full | dots
      init_seed=0,
      checkpoint="",        # alignjax workdir (or its checkpoints/) to take parameters from
      checkpoint_step=-1,   # -1: the latest step
  ))


def tokenizer_config() -> ml_collections.ConfigDict:
  """`config.tokenizer`: 'char' (built-in, synthetic tasks) or a local HF tokenizer dir."""
  return ml_collections.ConfigDict(dict(kind="hf", path=""))  # path "" -> model.hf_path


def optimizer_config() -> ml_collections.ConfigDict:
  """`config.optimizer`: AdamW with warm-up and a decay schedule."""
  return ml_collections.ConfigDict(dict(
      name="adamw",         # adamw | adam | sgd | lion
      learning_rate=1e-5,
      schedule="cosine",    # cosine | linear | constant
      warmup_steps=0,
      end_lr_ratio=0.0,     # final lr = learning_rate * end_lr_ratio
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,        # global-norm clipping; 0 disables
  ))


def train_config() -> ml_collections.ConfigDict:
  """`config.train`: loop cadence and measurement."""
  return ml_collections.ConfigDict(dict(
      num_steps=1000,
      grad_accum=1,               # micro-batches per step (batch_size is per step)
      log_every=10,
      eval_every=0,               # 0: only at the start and the end
      eval_steps=10,              # eval batches per evaluation
      peak_flops_per_device=0.0,  # 0: measured with a matmul at start-up
      logprob_chunk_size=1024,    # length chunk for token log-probs (no [B,L,V] f32 logits)
      logprob_vocab_chunk_size=0,  # vocabulary chunk within it (0: whole vocabulary)
      progress_bar=True,
  ))


def checkpoint_config() -> ml_collections.ConfigDict:
  """`config.checkpoint`: Orbax checkpoints in `<workdir>/checkpoints`."""
  return ml_collections.ConfigDict(dict(every=500, keep=3, resume=True, async_save=False))


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: device mesh sizes; one may be -1 (inferred)."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def distributed_config() -> ml_collections.ConfigDict:
  """`config.distributed`: multi-process start-up (see alignjax.parallel)."""
  return ml_collections.ConfigDict(dict(
      enable=False, coordinator_address="", num_processes=0, process_id=-1,
      cpu_collectives=""))


def sft_config() -> ml_collections.ConfigDict:
  """`config.sft`: held-out generation accuracy for synthetic tasks with known answers."""
  return ml_collections.ConfigDict(dict(
      eval_examples=0,    # greedy-decoded held-out problems per evaluation (0: none)
      max_new_tokens=0,   # 0: the longest answer + 1
      loss="nll",         # nll (cross-entropy) | dft | asft (losses/token.py)
      asft_lam=0.1,       # asft: weight of KL(pi_ref || pi)
      reference_checkpoint="",  # asft reference: an alignjax run (default: initial policy)
  ))


def sharding_rules_config() -> ml_collections.ConfigDict:
  """`config.sharding_rules`: logical axis -> tuple of mesh axes (alignjax.parallel).
  Override from the command line as `--config.sharding_rules.mlp="('fsdp',)"`."""
  from alignjax.parallel import DEFAULT_RULES  # noqa: PLC0415 (keeps configlib jax-free)
  return ml_collections.ConfigDict({k: tuple(v) for k, v in DEFAULT_RULES.items()})


def _ref_logps_config():
  from alignjax.trainers.ref_logps import ref_logps_config
  return ref_logps_config()


def _generate_config():
  from alignjax.sampling.task import generate_config
  return generate_config()


def _rl_config():
  from alignjax.trainers.rl import rl_config
  return rl_config()


_TASK_SECTIONS = {"sft": sft_config, "ref_logps": _ref_logps_config,
                  "generate": _generate_config, "rl": _rl_config}


def base_config(task: str) -> ml_collections.ConfigDict:
  """Shared sections, plus the task's own section (e.g. `sft`); the task file adds `data`."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.model = model_config()
  c.tokenizer = tokenizer_config()
  c.optimizer = optimizer_config()
  c.train = train_config()
  c.checkpoint = checkpoint_config()
  c.mesh = mesh_config()
  c.sharding_rules = sharding_rules_config()
  c.distributed = distributed_config()
  if task in _TASK_SECTIONS:
    c[task] = _TASK_SECTIONS[task]()
  return c
