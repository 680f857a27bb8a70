"""Hugging Face checkpoint import/export against the transformers reference fixtures.

The fixtures (third_party/hf_fixtures, see its README) hold tiny random Llama / Qwen2 / Qwen3
checkpoints and the float32 logits HF transformers computes for them, so every comparison
here is against an independent implementation or against the original files on disk.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax import parallel
from alignjax.models import hf
from alignjax.models.transformer import rope_inv_freq

FAMILIES = ("llama", "qwen2", "qwen3")


# ------------------------------------------------------------------------------ helpers
def model_dir(fixtures_dir, name):
  return os.path.join(fixtures_dir, name)


def params_of(model) -> dict[str, np.ndarray]:
  """{path: host array} of every parameter (gathers sharded arrays)."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat, _ = jax.tree_util.tree_flatten_with_path(pure)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def read_tensors(path: str) -> dict[str, tuple[str, np.ndarray]]:
  """{tensor name: (file name, array)} of every safetensors file in a checkpoint dir."""
  out = {}
  for fname in sorted(os.listdir(path)):
    if fname.endswith(".safetensors"):
      for name, value in load_file(os.path.join(path, fname)).items():
        assert name not in out, f"{name} stored twice"
        out[name] = (fname, value)
  return out


def assert_bit_identical(a: np.ndarray, b: np.ndarray, what: str):
  assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  assert a.tobytes() == b.tobytes(), f"{what} differs"


def reference(fixtures_dir, name):
  ref = np.load(os.path.join(model_dir(fixtures_dir, name), "reference.npz"))
  return ref["input_ids"], ref["attention_mask"], ref["logits"]


def forward(model, ids, mask):
  return np.asarray(jax.jit(lambda m, t, s: m(t, None, s))(model, jnp.asarray(ids),
                                                           jnp.asarray(mask)))


@pytest.fixture(scope="module")
def loaded():
  """One float32 load per family (shared: loading is the expensive part)."""
  fixtures = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "third_party", "hf_fixtures")
  return {name: hf.load_hf_model(model_dir(fixtures, name)) for name in FAMILIES}


# ------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(loaded, fixtures_dir, name):
  ids, mask, ref_logits = reference(fixtures_dir, name)
  assert mask[1].sum() == 11 and not mask[1, 11:].any()  # the fixture really is padded
  logits = forward(loaded[name], ids, mask)
  assert logits.dtype == np.float32 and logits.shape == ref_logits.shape
  valid = mask.astype(bool)
  np.testing.assert_allclose(logits[valid], ref_logits[valid], rtol=0, atol=1e-4)
  # Sanity: the comparison is not trivial (logits are O(1), not all ~0).
  assert np.abs(ref_logits[valid]).max() > 1.0


def test_loaded_config_matches_fixture(loaded):
  llama, qwen2, qwen3 = loaded["llama"].cfg, loaded["qwen2"].cfg, loaded["qwen3"].cfg
  assert (llama.family, llama.tie_embeddings, llama.qkv_bias, llama.qk_norm) == (
      "llama", False, False, False)
  assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_theta == 5e5
  assert (qwen2.family, qwen2.tie_embeddings, qwen2.qkv_bias, qwen2.qk_norm) == (
      "qwen2", True, True, False)
  assert (qwen3.family, qwen3.tie_embeddings, qwen3.qk_norm, qwen3.head_dim) == (
      "qwen3", False, True, 32)
  for cfg in (llama, qwen2, qwen3):
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (64, 4, 2, 384)


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", FAMILIES)
def test_export_like_reproduces_files_bit_for_bit(loaded, fixtures_dir, tmp_path, name):
  src = model_dir(fixtures_dir, name)
  out = str(tmp_path / "export")
  hf.save_hf_model(loaded[name], out, like=src)

  # Same safetensors file names, same index weight_map (if sharded).
  src_files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
  out_files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert out_files == src_files
  src_index = os.path.join(src, hf.INDEX_FILE)
  if os.path.exists(src_index):
    with open(src_index) as f, open(os.path.join(out, hf.INDEX_FILE)) as g:
      assert json.load(g)["weight_map"] == json.load(f)["weight_map"]
  else:
    assert not os.path.exists(os.path.join(out, hf.INDEX_FILE))

  # Every tensor equal bit-for-bit, in the same file, nothing extra or missing.
  original, exported = read_tensors(src), read_tensors(out)
  assert sorted(exported) == sorted(original)
  for tname, (fname, value) in original.items():
    assert exported[tname][0] == fname, tname
    assert_bit_identical(exported[tname][1], value, tname)

  # The exported config describes the same model; tokenizer files travel along.
  with open(os.path.join(out, "config.json")) as f:
    exported_cfg = json.load(f)
  assert hf.config_from_hf(exported_cfg) == loaded[name].cfg
  assert exported_cfg["model_type"] == name
  for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert os.path.exists(os.path.join(out, extra))
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-export")]


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reimport_round_trips_exactly(loaded, fixtures_dir, tmp_path, name):
  out = str(tmp_path / "export")
  hf.save_hf_model(loaded[name], out, like=model_dir(fixtures_dir, name))
  again = hf.load_hf_model(out)
  assert again.cfg == loaded[name].cfg
  before, after = params_of(loaded[name]), params_of(again)
  assert sorted(after) == sorted(before)
  for path, value in before.items():
    assert_bit_identical(after[path], value, path)


def test_export_without_like_shards_by_size(loaded, fixtures_dir, tmp_path):
  model = loaded["llama"]  # untied: includes lm_head
  max_bytes = 64 * 1024
  out = str(tmp_path / "sharded")
  hf.save_hf_model(model, out, max_shard_bytes=max_bytes)

  with open(os.path.join(out, hf.INDEX_FILE)) as f:
    index = json.load(f)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 1 and hf.SINGLE_FILE not in shards
  assert sorted(set(index["weight_map"].values())) == shards
  n = len(shards)
  assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

  tensors = read_tensors(out)
  original = read_tensors(model_dir(fixtures_dir, "llama"))
  assert sorted(tensors) == sorted(original) == sorted(index["weight_map"])
  for tname, (fname, value) in tensors.items():
    assert index["weight_map"][tname] == fname  # the index tells the truth
    assert_bit_identical(value, original[tname][1], tname)
  assert index["metadata"]["total_size"] == sum(v.nbytes for _, v in tensors.values())
  # No shard exceeds the limit unless it holds a single tensor bigger than the limit.
  for shard in shards:
    members = [v for fn, v in tensors.values() if fn == shard]
    assert len(members) == 1 or sum(v.nbytes for v in members) <= max_bytes, shard

  again = hf.load_hf_model(out)
  before, after = params_of(model), params_of(again)
  for path, value in before.items():
    assert_bit_identical(after[path], value, path)


def test_export_single_file_without_like(loaded, tmp_path):
  out = str(tmp_path / "single")
  hf.save_hf_model(loaded["qwen3"], out)
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == [hf.SINGLE_FILE]
  assert not os.path.exists(os.path.join(out, hf.INDEX_FILE))
  after = params_of(hf.load_hf_model(out))
  for path, value in params_of(loaded["qwen3"]).items():
    assert_bit_identical(after[path], value, path)


# ------------------------------------------------------------------------------ sharded
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_load_onto_fsdp_mesh(loaded, fixtures_dir, name):
  assert jax.device_count() == 8
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  model = hf.load_hf_model(model_dir(fixtures_dir, name), mesh=mesh)

  embed = model.embed[...]
  assert embed.shape == (384, 64)
  assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  shards = embed.addressable_shards
  assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices())
  for s in shards:
    assert s.data.shape == (384, 8) and s.data.size * 8 == embed.size
  q = model.layers[0].attn.q_proj[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
  assert model.layers[0].input_norm.scale[...].sharding.spec == jax.sharding.PartitionSpec(
      None)
  # Shards assemble to the very same values as the single-device load.
  sharded = params_of(model)
  for path, value in params_of(loaded[name]).items():
    assert_bit_identical(sharded[path], value, path)

  ids, mask, ref_logits = reference(fixtures_dir, name)
  with parallel.use_mesh(mesh):
    logits = forward(model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(logits[valid], ref_logits[valid], rtol=0, atol=1e-4)
  np.testing.assert_allclose(logits, forward(loaded[name], ids, mask), rtol=0, atol=5e-5)


# ------------------------------------------------------------------------------ errors
def copy_fixture(fixtures_dir, name, tmp_path):
  dst = str(tmp_path / name)
  shutil.copytree(model_dir(fixtures_dir, name), dst)
  return dst


def test_missing_config_json(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "llama", tmp_path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf_model(path)


def test_missing_weights(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "llama", tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError) as e:
    hf.load_hf_model(path)
  assert path in str(e.value) and "model.safetensors" in str(e.value)


def test_unsupported_model_type(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "llama", tmp_path)
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["model_type"] = "gpt2"
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError) as e:
    hf.load_hf_model(path)
  assert "gpt2" in str(e.value) and cfg_path in str(e.value)


def test_invalid_config_json(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "qwen3", tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"model_type": "qwen3",\n  oops}')
  with pytest.raises(ValueError, match="config.json:2"):
    hf.load_hf_model(path)


def test_missing_tensor_single_file(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "llama", tmp_path)
  fname = os.path.join(path, "model.safetensors")
  tensors = load_file(fname)
  missing = "model.layers.1.mlp.up_proj.weight"
  del tensors[missing]
  save_file(tensors, fname, metadata={"format": "pt"})
  with pytest.raises(KeyError) as e:
    hf.load_hf_model(path)
  assert missing in str(e.value) and path in str(e.value)


def test_missing_tensor_in_index(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "qwen2", tmp_path)
  index_path = os.path.join(path, hf.INDEX_FILE)
  with open(index_path) as f:
    index = json.load(f)
  missing = "model.layers.0.self_attn.k_proj.bias"
  del index["weight_map"][missing]
  with open(index_path, "w") as f:
    json.dump(index, f)
  with pytest.raises(KeyError) as e:
    hf.load_hf_model(path)
  assert missing in str(e.value) and path in str(e.value)


def _drop_from_shard(fixtures_dir, tmp_path):
  """Qwen2 copy whose shard 2 lacks a tensor that the index still lists there."""
  path = copy_fixture(fixtures_dir, "qwen2", tmp_path)
  shard = os.path.join(path, "model-00002-of-00003.safetensors")
  missing = "model.layers.0.mlp.up_proj.weight"
  tensors = load_file(shard)
  del tensors[missing]
  save_file(tensors, shard, metadata={"format": "pt"})
  return path, shard, missing


def test_missing_tensor_in_shard_names_file_and_tensor(fixtures_dir, tmp_path):
  path, shard, missing = _drop_from_shard(fixtures_dir, tmp_path)
  with pytest.raises(KeyError) as e:
    hf.load_hf_model(path)
  assert missing in str(e.value) and os.path.basename(shard) in str(e.value)


def test_shape_mismatch_names_file_and_tensor(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "qwen3", tmp_path)
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 128
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError) as e:
    hf.load_hf_model(path)
  assert "mlp.gate_proj.weight" in str(e.value) and "model.safetensors" in str(e.value)


# ------------------------------------------------------------------------------ config keys
def _v4(cfg: dict, scaling_key: str | None) -> dict:
  """The transformers v4 spelling of a v5 config: top-level rope_theta + rope_scaling."""
  cfg = dict(cfg)
  rope = dict(cfg.pop("rope_parameters"))
  cfg["rope_theta"] = rope.pop("rope_theta")
  kind = rope.pop("rope_type")
  if kind == "default":
    cfg["rope_scaling"] = None
  else:
    cfg["rope_scaling"] = dict(rope, **{scaling_key: kind})
  return cfg


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scaling_key", ["type", "rope_type"])
def test_config_from_hf_legacy_rope_keys(fixtures_dir, name, scaling_key):
  with open(os.path.join(model_dir(fixtures_dir, name), "config.json")) as f:
    v5 = json.load(f)
  v4 = _v4(v5, scaling_key)
  assert "rope_parameters" not in v4 and "rope_theta" in v4
  new, old = hf.config_from_hf(v5), hf.config_from_hf(v4)
  np.testing.assert_array_equal(np.asarray(rope_inv_freq(old)), np.asarray(rope_inv_freq(new)))
  assert old == new
  if name == "llama":
    assert old.rope_theta == 5e5 and old.rope_scaling["factor"] == 8.0
    # Llama-3 scaling really changes frequencies (so the comparison above is meaningful).
    plain = np.asarray(rope_inv_freq(old.replace(rope_scaling=None)))
    assert not np.allclose(np.asarray(rope_inv_freq(old)), plain)
  else:
    assert old.rope_scaling is None and old.rope_theta == 1e6


def test_config_from_hf_legacy_linear_and_defaults():
  base = dict(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=4)
  cfg = hf.config_from_hf(dict(base, rope_theta=1234.0,
                               rope_scaling={"type": "linear", "factor": 2.0}))
  v5 = hf.config_from_hf(dict(base, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                     "rope_theta": 1234.0}))
  assert cfg == v5 and cfg.rope_theta == 1234.0
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)),
                             1.0 / 1234.0 ** (np.arange(0, 8, 2) / 8) / 2.0, rtol=1e-6)
  # Absent keys: no rope at all -> theta 1e4, kv heads = heads, head_dim = hidden/heads.
  plain = hf.config_from_hf(base)
  assert (plain.rope_theta, plain.rope_scaling, plain.num_kv_heads, plain.head_dim) == (
      10000.0, None, 4, 8)


def test_config_to_hf_round_trip(loaded):
  for name in FAMILIES:
    cfg = loaded[name].cfg
    out = hf.config_to_hf(cfg, {"rope_theta": 1.0, "rope_scaling": {"type": "x"},
                                "eos_token_id": 7})
    assert "rope_theta" not in out and "rope_scaling" not in out  # legacy keys replaced
    assert out["eos_token_id"] == 7 and out["model_type"] == name
    assert hf.config_from_hf(out) == cfg


def _edit_config(path, **changes):
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  return cfg_path


def test_unused_tensors_are_an_error(fixtures_dir, tmp_path):
  """A tensor the architecture would ignore (e.g. an o_proj bias) must not load silently."""
  path = copy_fixture(fixtures_dir, "llama", tmp_path)
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, f, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="o_proj.bias"):
    hf.load_hf_model(path)


def test_attention_bias_and_unknown_rope_are_rejected(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "llama", tmp_path)
  cfg_path = _edit_config(path, attention_bias=True)
  with pytest.raises(ValueError, match="attention_bias"):
    hf.load_hf_model(path)
  _edit_config(path, attention_bias=False,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(ValueError, match="yarn"):
    hf.load_hf_model(path)
  assert os.path.exists(cfg_path)


def test_export_keeps_v4_torch_dtype_in_step(fixtures_dir, tmp_path):
  path = copy_fixture(fixtures_dir, "qwen3", tmp_path)
  _edit_config(path, torch_dtype="float32")
  model = hf.load_hf_model(path)
  out = str(tmp_path / "bf16")
  hf.save_hf_model(model, out, like=path, dtype="bfloat16")
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
  assert load_file(os.path.join(out, "model.safetensors"))["lm_head.weight"].dtype.name == \
      "bfloat16"


# ------------------------------------------------------------------------------ reward models
def test_hf_reward_model_parity_and_round_trip(fixtures_dir, tmp_path):
  """LlamaForSequenceClassification scores (transformers) = alignjax linear-head reward model;
  export -> re-import is bit-exact and reproduces the original tensors."""
  from alignjax.models import reward
  d = os.path.join(fixtures_dir, "llama_rm")
  ref = np.load(os.path.join(d, "reference.npz"))
  model = reward.load_hf_reward_model(d)
  scores = np.asarray(model(ref["input_ids"], segment_ids_BxL=ref["attention_mask"]))
  assert scores.shape == (2, 1, 1)
  np.testing.assert_allclose(scores[:, 0], ref["scores"], rtol=0, atol=1e-4)
  out = str(tmp_path / "rm")
  reward.save_hf_reward_model(model, out, like=d)
  again = reward.load_hf_reward_model(out)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  orig, new = load_file(os.path.join(d, "model.safetensors")), load_file(
      os.path.join(out, "model.safetensors"))
  assert set(orig) == set(new) and "score.weight" in new and "lm_head.weight" not in new
  for k in orig:
    np.testing.assert_array_equal(orig[k], new[k])
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1


def test_reward_backbone_from_causal_lm_ignores_lm_head(fixtures_dir):
  m = hf.load_hf_model(model_dir(fixtures_dir, "llama"), lm_head=False)
  assert not hasattr(m, "lm_head")
  full = hf.load_hf_model(model_dir(fixtures_dir, "llama"))
  np.testing.assert_array_equal(np.asarray(m.embed[...]), np.asarray(full.embed[...]))
