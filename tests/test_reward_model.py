"""The reward-model task: every loss kind trains through the shared loop, a sharded step equals
the single-device step, and a trained model exports to HF and reloads with identical scores."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import parallel
from alignjax.data.tokenizer import CharTokenizer
from alignjax.models import reward
from alignjax.trainers import loop, reward_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  monkeypatch.syspath_prepend(REPO)


def config(arg="steps=3,batch=16", **train):
  from configs import reward_model as rm_config
  c = rm_config.get_config(arg)
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_steps = 1
  c.train.progress_bar = False
  c.train.peak_flops_per_device = 1e9
  for k, v in train.items():
    c.train[k] = v
  return c


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("arg", [
    "loss=bt", "loss=bt_center", "loss=bt_margin", "loss=bt_smooth", "loss=bt_ties",
    "head=mlp", "ensemble=3", "loss=gpm,head=gpm"])
def test_pairwise_variants_train(tmp_path, arg):
  c = config(f"steps=3,batch=16,{arg}")
  if "gpm" in arg:
    c.reward.num_outputs = 4
  summary = reward_model.run(c, str(tmp_path))
  ls = losses(tmp_path)
  assert len(ls) == 3 and all(np.isfinite(ls))
  assert 0.0 <= summary["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["plackett_luce", "ranknet", "ranklist"])
def test_listwise_losses_train(tmp_path, name):
  c = config(f"steps=3,batch=8,loss={name}")
  c.data.seq_len = 16
  summary = reward_model.run(c, str(tmp_path))
  assert len(losses(tmp_path)) == 3 and np.isfinite(summary["loss"])


def test_sharded_step_equals_single_device():
  c = config("steps=2,batch=16,head=mlp,ensemble=2")
  task = reward_model.build_task(c)
  batch = next(task.train_iter())
  # SGD: the updated parameters differ exactly as the gradients do (Adam's first step,
  # g / (|g| + eps), would amplify float noise in near-zero gradient entries).
  tx = optax.sgd(1.0)
  results = []
  for sizes in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
                {"data": 1, "fsdp": 8, "tensor": 1}):
    devices = jax.devices()[:1] if sizes["data"] * sizes["fsdp"] * sizes["tensor"] == 1 else None
    mesh = parallel.make_mesh(sizes, devices)
    with parallel.use_mesh(mesh):
      model = task.build_model(mesh, parallel.DEFAULT_RULES)
      graphdef, params = nnx.split(model)
      state = loop.init_state(params, tx, mesh, parallel.DEFAULT_RULES, 0)
      step = jax.jit(loop.make_train_step(graphdef, task.loss_fn, tx, lambda s: 1e-3))
      state, metrics = step(state, parallel.shard_batch(batch, mesh))
      results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m0, p0), rest = results[0], results[1:]
  for m, p in rest:
    np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], m0["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_trained_model_exports_and_reloads_identically(tmp_path):
  c = config("steps=20,batch=16")
  reward_model.run(c, str(tmp_path / "run"))
  tok = CharTokenizer()
  cfg = reward_model.common.model_config(c, tok.vocab_size)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  trained = reward_model.load_trained(c, str(tmp_path / "run"), cfg, mesh)
  out = str(tmp_path / "hf")
  reward.save_hf_reward_model(trained, out, pad_token_id=tok.pad_id)
  again = reward.load_hf_reward_model(out)
  batch = next(reward_model.build_task(c).eval_iter())
  tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
  seg = batch["segment_ids"].reshape(tokens.shape)
  a, b = np.asarray(trained(tokens, None, seg)), np.asarray(again(tokens, None, seg))
  np.testing.assert_array_equal(a, b)
  assert np.std(a) > 0
  cfg_json = json.load(open(os.path.join(out, "config.json")))
  assert cfg_json["pad_token_id"] == tok.pad_id and cfg_json["num_labels"] == 1
