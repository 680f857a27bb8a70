"""Hugging Face checkpoints: local `config.json` + `*.safetensors` <-> alignjax Transformer.

Import reads one tensor at a time on the host and places it with
`jax.make_array_from_callback`, so each device receives only its own shard (no device ever
holds a full copy of a sharded parameter). Export gathers one tensor at a time and writes the
HF layout (single file or sharded with `model.safetensors.index.json`) atomically.
Supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from alignjax import parallel
from alignjax.models.config import ModelConfig
from alignjax.models.transformer import Transformer

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: a Hugging Face checkpoint directory needs config.json and "
        "model.safetensors (or model.safetensors.index.json with its shards).")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from e


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a HF config dict (transformers v4 `rope_theta`/`rope_scaling` or v5
  `rope_parameters`)."""
  family = hf.get("model_type")
  if family not in _ARCH:
    raise ValueError(f"{where}: model_type={family!r} is not supported; "
                     f"alignjax loads {sorted(_ARCH)}.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
  if hf.get("mlp_bias"):
    raise ValueError(f"{where}: mlp_bias=true is not supported.")
  if hf.get("use_sliding_window"):
    raise ValueError(f"{where}: use_sliding_window=true is not supported.")
  rope = dict(hf.get("rope_parameters") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  if not rope and hf.get("rope_scaling"):
    rope = dict(hf["rope_scaling"])
  kind = rope.get("rope_type", rope.pop("type", "default"))  # drop the legacy v4 key
  scaling = None if kind == "default" else dict(rope, rope_type=kind)
  heads = hf["num_attention_heads"]
  if family != "qwen2" and hf.get("attention_bias"):
    raise ValueError(f"{where}: attention_bias=true ({family}, with an o_proj bias) is not "
                     "supported.")
  qkv_bias = family == "qwen2"
  fields = dict(
      family=family,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      qk_norm=family == "qwen3",
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
  """HF config dict (transformers v5 layout) for `cfg`, keeping unrelated keys of `base`."""
  hf = dict(base or {})
  for legacy in ("rope_theta", "rope_scaling"):
    hf.pop(legacy, None)
  rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  rope.update(cfg.rope_scaling or {})
  hf.update(
      architectures=[_ARCH[cfg.family]], model_type=cfg.family, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", dtype=cfg.param_dtype)
  if cfg.family != "qwen2":
    hf["attention_bias"] = cfg.qkv_bias
  return hf


def _param_map(cfg: ModelConfig, lm_head: bool = True) -> Iterator[tuple[tuple, str, Any, Any]]:
  """Yields (alignjax path, HF name, to_alignjax(np), to_hf(np)) for every parameter."""
  ident = (lambda w: w, lambda w: w)
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

  def in_proj(heads):  # HF [heads*h, d] <-> ours [d, heads, h]
    return (lambda w: w.T.reshape(d, heads, h), lambda w: w.reshape(d, heads * h).T)

  def bias(heads):
    return (lambda w: w.reshape(heads, h), lambda w: w.reshape(heads * h))

  transpose = (lambda w: w.T, lambda w: w.T)
  out_proj = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)
  yield ("embed",), "model.embed_tokens.weight", *ident
  yield ("final_norm", "scale"), "model.norm.weight", *ident
  if lm_head and not cfg.tie_embeddings:
    yield ("lm_head",), "lm_head.weight", *transpose
  for i in range(cfg.num_layers):
    p, a = ("layers", i), f"model.layers.{i}."
    yield (*p, "input_norm", "scale"), a + "input_layernorm.weight", *ident
    yield (*p, "post_attn_norm", "scale"), a + "post_attention_layernorm.weight", *ident
    for name, heads in (("q", n), ("k", k), ("v", k)):
      yield (*p, "attn", f"{name}_proj"), a + f"self_attn.{name}_proj.weight", *in_proj(heads)
      if cfg.qkv_bias:
        yield (*p, "attn", f"{name}_bias"), a + f"self_attn.{name}_proj.bias", *bias(heads)
    yield (*p, "attn", "o_proj"), a + "self_attn.o_proj.weight", *out_proj
    if cfg.qk_norm:
      yield (*p, "attn", "q_norm", "scale"), a + "self_attn.q_norm.weight", *ident
      yield (*p, "attn", "k_norm", "scale"), a + "self_attn.k_norm.weight", *ident
    for name in ("gate", "up", "down"):
      yield (*p, "mlp", f"{name}_proj"), a + f"mlp.{name}_proj.weight", *transpose


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from the index or the single file."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    return {k: os.path.join(path, v) for k, v in _read_json(index)["weight_map"].items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found.")
  with safe_open(single, framework="numpy") as f:
    return {k: single for k in f.keys()}


def _get(state, path):
  for p in path:
    state = state[p]
  return state


def read_config(path: str, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, raw config.json dict) of a local HF checkpoint directory."""
  where = os.path.join(path, "config.json")
  raw = _read_json(where)
  return config_from_hf(raw, where, **overrides), raw


def prefixed(mapping, prefix: tuple):
  """A parameter map whose alignjax paths sit under `prefix` (e.g. a reward backbone)."""
  for ours, name, to_ours, to_hf in mapping:
    yield (*prefix, *ours), name, to_ours, to_hf


def load_into(path: str, module_fn, mapping, mesh=None, rules=None,
              ignorable: frozenset = frozenset()):
  """Builds `module_fn()` abstractly and fills every parameter from the checkpoint at `path`
  through `mapping` (tuples from `_param_map`), placing shard by shard on `mesh`. Tensors in
  the checkpoint that nothing uses are an error (unless in `ignorable`)."""
  mapping = list(mapping)
  files = _weight_files(path)
  mesh = mesh or parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(nnx.eval_shape(module_fn))
  shardings = parallel.state_shardings(state, mesh, rules)
  expected = {name for _, name, _, _ in mapping}
  unused = sorted(n for n in files if n not in expected and n not in ignorable
                  and not n.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ValueError(f"{path}: tensors not used by this architecture and config: "
                     f"{unused[:5]}{' ...' if len(unused) > 5 else ''}; the checkpoint is not "
                     "supported as is.")
  handles: dict[str, Any] = {}
  try:
    for ours, name, to_ours, _ in mapping:
      if name not in files:
        raise KeyError(f"{path}: tensor {name!r} is missing from the checkpoint.")
      fname = files[name]
      if fname not in handles:
        handles[fname] = safe_open(fname, framework="numpy")
      if name not in handles[fname].keys():
        raise KeyError(f"{fname}: tensor {name!r} is listed in {INDEX_FILE} but missing from "
                       "this file; the checkpoint is incomplete or its index is stale.")
      var = _get(state, ours)
      value = to_ours(handles[fname].get_tensor(name))
      if value.shape != var.shape:
        raise ValueError(f"{fname}: tensor {name} has shape {value.shape} after conversion; "
                         f"the config implies {var.shape}.")
      value = value.astype(var.dtype)
      sharding = _get(shardings, ours).get_value()
      var.set_value(jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i]))
  finally:
    handles.clear()
  return nnx.merge(graphdef, state)


def load_hf_model(path: str, mesh=None, rules=None, lm_head: bool = True,
                  **overrides) -> Transformer:
  """Loads a local HF causal-LM checkpoint into a Transformer, sharded on `mesh` if given.

  `overrides` replace ModelConfig fields (e.g. dtype="bfloat16", remat="full").
  Parameters are cast to `param_dtype`. `lm_head=False` builds a backbone without the LM head
  (for reward and value models); the checkpoint's `lm_head.weight` is then ignored.
  """
  cfg, _ = read_config(path, **overrides)
  ignorable = frozenset({"lm_head.weight"}) if (cfg.tie_embeddings or not lm_head) else frozenset()
  return load_into(path, lambda: Transformer(cfg, rngs=nnx.Rngs(0), lm_head=lm_head),
                   _param_map(cfg, lm_head), mesh, rules, ignorable)


def gather_tensors(module, mapping, dtype: str | None = None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of `module`'s parameters (gathered across hosts)."""
  state = nnx.state(module)
  tensors = {}
  for ours, name, _, to_hf in mapping:
    value = _get(state, ours).get_value()
    value = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    if dtype:
      value = value.astype(np.dtype(jax.numpy.dtype(dtype)))
    tensors[name] = np.ascontiguousarray(to_hf(value))
  return tensors


def save_hf_model(model: Transformer, path: str, *, like: str | None = None,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model` as a HF causal-LM checkpoint directory (config.json + safetensors).

  `like`: a HF checkpoint dir whose config keys and shard layout (index weight_map) are
  reused, so import -> export reproduces the original layout. Otherwise tensors are split
  into shards of at most `max_shard_bytes`. `dtype` casts on export (default: param dtype).
  Only process 0 writes; the directory appears atomically (written to a temp dir, renamed).
  """
  base = _read_json(os.path.join(like, "config.json")) if like else {}
  tensors = gather_tensors(model, _param_map(model.cfg), dtype)
  write_checkpoint(path, tensors, config_to_hf(model.cfg, base), like=like, dtype=dtype,
                   max_shard_bytes=max_shard_bytes)


def write_checkpoint(path: str, tensors: dict[str, np.ndarray], hf_cfg: dict, *,
                     like: str | None = None, dtype: str | None = None,
                     max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes HF-named tensors and a config dict as a checkpoint directory (process 0 only,
  atomically). With `like`, its index layout is reused and its tokenizer files copied."""
  hf_cfg = dict(hf_cfg)
  if dtype:
    hf_cfg["dtype"] = dtype
  if "torch_dtype" in hf_cfg:  # a transformers v4 config: keep its key in step
    hf_cfg["torch_dtype"] = hf_cfg["dtype"]
  layout = None
  if like and os.path.exists(os.path.join(like, INDEX_FILE)):
    layout = _read_json(os.path.join(like, INDEX_FILE))["weight_map"]
    if set(layout) != set(tensors):
      layout = None  # a different set of tensors: lay out afresh
  if jax.process_index() != 0:
    return
  if layout is None:
    layout, size, shard = {}, 0, 0
    for name, t in tensors.items():
      if size and size + t.nbytes > max_shard_bytes:
        shard, size = shard + 1, 0
      layout[name], size = shard, size + t.nbytes
    n = max(layout.values()) + 1
    layout = {k: SINGLE_FILE if n == 1 else f"model-{v + 1:05d}-of-{n:05d}.safetensors"
              for k, v in layout.items()}
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
  try:
    for fname in sorted(set(layout.values())):
      save_file({k: tensors[k] for k in sorted(tensors) if layout[k] == fname},
                os.path.join(tmp, fname), metadata={"format": "pt"})
    if set(layout.values()) != {SINGLE_FILE}:
      total = sum(t.nbytes for t in tensors.values())
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {k: layout[k] for k in sorted(layout)}}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    if like:
      for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                    "chat_template.jinja", "special_tokens_map.json"):
        if os.path.exists(os.path.join(like, extra)):
          shutil.copy(os.path.join(like, extra), tmp)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
