"""Sharding on 8 simulated CPU devices: the SFT loss and its gradients are the same on every
mesh as on one device; parameters are created directly in their shards; mesh and rule
helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import parallel
from alignjax.losses.logprobs import shift_targets, token_logprobs
from alignjax.losses.sft import sft_cross_entropy
from alignjax.models.config import ModelConfig
from alignjax.models.transformer import init_model

# With the default rules on the (data, fsdp, tensor) = (2, 2, 2) mesh every matrix is sharded
# on both fsdp and tensor: embed [V=256 tensor, D=64 fsdp], lm_head [D fsdp, V tensor],
# q/o [D fsdp, N=4 tensor, H], k/v [D fsdp, K=2 tensor, H], q/k/v biases [N|K tensor, H],
# gate/up [D fsdp, F=128 tensor], down [F tensor, D fsdp]; RMSNorm scales are replicated.
# On (1, 8, 1) every matrix is split 8 ways along D=64 (biases and norms replicated);
# on (8, 1, 1) all parameters are replicated and only the batch is split.
CFG = ModelConfig(family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                  qk_norm=True, tie_embeddings=False, rope_theta=1e4, init_std=0.2)
SEED = 3
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]
LARGE = ("embed", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
         "down_proj")


def make_batch(b=8, l=24, seed=0):
  """Rows mixing one full sequence, two packed sequences, and right padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, l)).astype(np.int32)
  segments = np.zeros((b, l), np.int32)
  positions = np.zeros((b, l), np.int32)
  for r in range(b):
    cut = int(rng.integers(5, l - 5))
    end = l if r % 3 == 0 else int(rng.integers(cut + 2, l + 1))
    segments[r, :cut], segments[r, cut:end] = 1, 2
    positions[r, :cut], positions[r, cut:end] = np.arange(cut), np.arange(end - cut)
    if r % 2:  # a single sequence (with padding) instead of two packed ones
      segments[r, :end], positions[r, :end] = 1, np.arange(end)
  loss_mask = rng.integers(0, 2, (b, l)).astype(np.int32) * (segments > 0)
  loss_mask[positions == 0] = 0  # never predict a sequence's first token from another one
  return dict(tokens=tokens, positions=positions, segment_ids=segments, loss_mask=loss_mask)


def sft_loss(model, batch):
  h = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets, mask = shift_targets(batch["tokens"], batch["loss_mask"])
  lp = token_logprobs(h, model.unembedding(), targets, chunk_size=8)
  loss_sum, denom, _ = sft_cross_entropy(lp, mask)
  return loss_sum / denom


def loss_and_grads(model, batch):
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def f(params, batch):
    return jax.value_and_grad(lambda p: sft_loss(nnx.merge(graphdef, p), batch))(params)

  return f(params, batch)


def flat(tree) -> dict[str, jax.Array]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))
  return {jax.tree_util.keystr(p): v for p, v in leaves}


@pytest.fixture(scope="module")
def single_device():
  """Loss and gradients of the unsharded model on one device (no mesh)."""
  # Initialised under jit (eager init differs from jit init in the last bit of a few values).
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(CFG, SEED)))
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(init_model(CFG, SEED)))())
  assert len(model.embed[...].devices()) == 1
  batch = make_batch()
  loss, grads = loss_and_grads(model, {k: jnp.asarray(v) for k, v in batch.items()})
  return (flat(nnx.state(model, nnx.Param)), float(loss),
          {k: np.asarray(v) for k, v in flat(grads).items()})


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grads_match_single_device(single_device, shape):
  params0, loss0, grads0 = single_device
  assert np.isfinite(loss0) and loss0 > 0
  assert all(np.abs(g).max() > 0 for g in grads0.values())  # every parameter is exercised
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))
  model = parallel.create_sharded(lambda: init_model(CFG, SEED), mesh)
  params = flat(nnx.state(model, nnx.Param))
  # Created directly sharded, with the same values as the single-device init.
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(params0[k]), err_msg=k)
  batch = parallel.shard_batch(make_batch(), mesh)
  assert batch["tokens"].sharding.spec == parallel.batch_sharding(mesh).spec
  with parallel.use_mesh(mesh):
    loss, grads = loss_and_grads(model, batch)
  np.testing.assert_allclose(float(loss), loss0, rtol=1e-5)
  grads = flat(grads)
  assert sorted(grads) == sorted(grads0)
  for k, g in grads.items():
    np.testing.assert_allclose(np.asarray(g), grads0[k], rtol=1e-5, atol=1e-6, err_msg=k)

  # The mesh really shards: check where the parameters live.
  if shape == (2, 2, 2):
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers[0].attn.q_proj[...].sharding.spec == P("fsdp", "tensor", None)
    assert model.layers[0].attn.q_bias[...].sharding.spec == P("tensor", None)
    for k, v in params.items():
      if any(name in k for name in LARGE):  # split over fsdp x tensor = 4 ways
        assert v.addressable_shards[0].data.size * 4 == v.size, k
  elif shape == (8, 1, 1):
    for k, v in params.items():
      assert v.sharding.is_fully_replicated, k


def test_fsdp_holds_one_eighth_of_each_large_param():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  model = parallel.create_sharded(lambda: init_model(CFG, SEED), mesh)
  params = flat(nnx.state(model, nnx.Param))
  large = [k for k in params if any(name in k for name in LARGE)]
  # 2 top-level matrices + 7 per layer.
  assert len(large) == 2 + 7 * CFG.num_layers
  # Created directly in shards: each device's buffer of the embedding is [V, D/8].
  for s in model.embed[...].addressable_shards:
    assert s.data.shape == (CFG.vocab_size, CFG.hidden_size // 8)
  for k, v in params.items():
    shards = v.addressable_shards
    assert len(shards) == 8 and len({s.device for s in shards}) == 8
    if k in large:
      for s in shards:
        assert s.data.size * 8 == v.size, k
      assert "fsdp" in jax.tree.leaves(tuple(v.sharding.spec)), k
    else:  # norms and biases
      assert any(t in k for t in ("scale", "bias")), k
      assert v.sharding.is_fully_replicated, k
      for s in shards:
        assert s.data.size == v.size


# ------------------------------------------------------------------------------ mesh helpers
def test_mesh_shape_inference():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert parallel.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
  assert parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert parallel.mesh_shape({"tensor": -1}) == (1, 1, jax.device_count())
  assert parallel.mesh_shape({"data": 1, "fsdp": 1, "tensor": -1}, 1) == (1, 1, 1)


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.mesh_shape({"data": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="has 4 devices but 8"):
    parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError):
    parallel.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})


def test_make_mesh():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == parallel.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
  assert mesh.devices.size == 2


def test_logical_to_spec():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = lambda names, shape, rules=None: parallel.logical_to_spec(names, shape, mesh, rules)
  assert spec(("vocab", "embed"), (256, 64)) == P("tensor", "fsdp")
  assert spec(("vocab", "embed"), (255, 64)) == P(None, "fsdp")  # 255 % 2: replicated
  assert spec(("vocab", "embed"), None) == P("tensor", "fsdp")  # no shape: no divisibility
  assert spec(("batch", "length"), (8, 5)) == P(("data", "fsdp"), None)
  assert spec(("batch", "length"), (2, 5)) == P("data", None)  # fsdp would not divide 2
  assert spec(("batch", "length"), (3, 5)) == P(None, None)
  assert spec((None, "norm"), (4, 4)) == P(None, None)
  # An axis already used by an earlier dimension is dropped.
  rules = {"a": ("fsdp",), "b": ("fsdp", "tensor")}
  assert spec(("a", "b"), (4, 4), rules) == P("fsdp", "tensor")
  assert spec(("b", "a"), (4, 4), rules) == P(("fsdp", "tensor"), None)
  with pytest.raises(KeyError, match="nonexistent"):
    spec(("nonexistent",), (4,))
  # Size-1 mesh axes are dropped.
  fsdp = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  assert parallel.logical_to_spec(("vocab", "embed"), (256, 64), fsdp) == P(None, "fsdp")
  assert parallel.logical_to_spec(("batch",), (8,), fsdp) == P("fsdp")
  assert parallel.logical_to_spec(("embed", "mlp"), (12, 128), fsdp) == P(None, None)


def test_rules_from_config():
  rules = parallel.rules_from_config({"mlp": "fsdp", "vocab": None, "embed": ["data", "fsdp"],
                                      "length": ""})
  assert rules["mlp"] == ("fsdp",)
  assert rules["vocab"] == ()
  assert rules["embed"] == ("data", "fsdp")
  assert rules["length"] == ()
  assert rules["heads"] == parallel.DEFAULT_RULES["heads"]  # untouched
  assert parallel.rules_from_config(None) == parallel.DEFAULT_RULES
  with pytest.raises(ValueError, match="model"):
    parallel.rules_from_config({"mlp": "model"})
  with pytest.raises(ValueError, match="sharding_rules.embed"):
    parallel.rules_from_config({"embed": ["fsdp", "pipeline"]})


def test_custom_rules_shard_params_differently():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  rules = parallel.rules_from_config({"embed": None, "mlp": "fsdp", "vocab": "fsdp"})
  model = parallel.create_sharded(lambda: init_model(CFG, SEED), mesh, rules)
  assert model.embed[...].sharding.spec == P("fsdp", None)
  assert model.layers[0].mlp.gate_proj[...].sharding.spec == P(None, "fsdp")
  assert model.layers[0].attn.q_proj[...].sharding.spec == P(None, None, None)


def test_batch_sharding_and_shard_batch():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert parallel.batch_sharding(mesh, ndim=3).spec == P(("data", "fsdp"), None, None)
  data = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  assert parallel.batch_sharding(data).spec == P("data", None)
  x = np.arange(8 * 3).reshape(8, 3)
  out = parallel.shard_batch({"x": x, "y": np.arange(8)}, mesh)
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  assert out["y"].sharding.spec == P(("data", "fsdp"))
  rows = sorted(tuple(np.asarray(s.data)[:, 0]) for s in out["x"].addressable_shards)
  assert rows == sorted([(0, 3)] * 2 + [(6, 9)] * 2 + [(12, 15)] * 2 + [(18, 21)] * 2)


def test_constrain_is_noop_outside_use_mesh():
  x = jnp.ones((4, 4))
  assert parallel.constrain(x, ("batch", "embed")) is x
