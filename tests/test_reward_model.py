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
from alignjax.models.transformer import init_model
from alignjax.trainers import loop, reward_model

from tests import rm_helpers

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
    "loss=bt_center", "loss=bt_margin", "loss=bt_smooth", "loss=bt_ties",
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
  c = config(f"steps=3,batch=8,loss={name}", eval_steps=0)
  c.data.seq_len = 16
  summary = reward_model.run(c, str(tmp_path))
  assert len(losses(tmp_path)) == 3 and np.isfinite(summary["loss"])


def assert_sharded_steps_match(c, meshes):
  rm_helpers.assert_sharded_steps_match(reward_model.build_task(c), meshes)


def test_sharded_step_equals_single_device():
  assert_sharded_steps_match(config("steps=2,batch=16,head=mlp,ensemble=2"),
                             [{"data": 2, "fsdp": 2, "tensor": 2},
                              {"data": 1, "fsdp": 8, "tensor": 1}])


def test_trained_model_exports_and_reloads_identically(tmp_path):
  c = config("steps=20,batch=16")  # also the plain `bt` run of the pairwise variants above
  summary = reward_model.run(c, str(tmp_path / "run"))
  assert np.isfinite(summary["loss"]) and 0.0 <= summary["eval_accuracy"] <= 1.0
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
  # A new run can start from the trained reward model (backbone and head).
  c.reward.checkpoint = str(tmp_path / "run")
  again = reward_model.build_reward_model(c, cfg, mesh, parallel.DEFAULT_RULES)
  for x, y in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(trained))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ helpers for file data


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def file_config(path, arg="steps=3,batch=8", **train):
  """A config that trains on `path` (no synthetic data, hence no eval split)."""
  c = config(arg, **train)
  c.data.synthetic = ""
  c.data.train_files = path
  c.data.seq_len = 24
  return c


def metric_rows(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "loss" in r]


def single_device_mesh():
  return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _word(rng, n):
  return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), n, replace=False))


HELPSTEER = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def helpsteer_rows(n=24, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    scores = {a: int(rng.integers(0, 5)) for a in HELPSTEER}
    if i % 4 == 0:
      scores["verbosity"] = None  # a missing label: target_mask 0
    if i % 2:
      rows.append({"prompt": _word(rng, 5) + "=", "response": _word(rng, 6), "scores": scores})
    else:  # HelpSteer2's flat layout: the attributes as top-level fields
      rows.append({"prompt": _word(rng, 5) + "=", "response": _word(rng, 6), **scores})
  return rows


# ------------------------------------------------------------------ rated data


def test_rated_jsonl_trains(tmp_path):
  path = write_jsonl(tmp_path / "rated.jsonl", helpsteer_rows())
  c = file_config(path, "steps=3,batch=8,loss=rm_regression")
  c.data.attributes = HELPSTEER
  c.data.shuffle = False
  c.reward.num_outputs = len(HELPSTEER)
  c.reward.attribute_weights = ()
  batch = next(reward_model.build_task(c).train_iter())
  assert batch["tokens"].shape == (8, 1, 24)
  assert batch["targets"].shape == batch["target_mask"].shape == (8, 5)
  assert batch["target_mask"][0, -1] == 0 and batch["target_mask"][1, -1] == 1
  summary = reward_model.run(c, str(tmp_path / "run"))
  ls = losses(tmp_path / "run")
  assert len(ls) == 3 and all(np.isfinite(ls)) and summary["num_labels"] > 0
  # No reward.attribute_weights: the scalar reward is helpfulness only (METHODS rm_regression).
  assert reward_model.attribute_weights(c) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_rated_synthetic_trains(tmp_path):
  c = config("steps=3,batch=8,loss=rm_regression", eval_steps=0)
  assert tuple(c.data.attributes) == ("score", "length") and c.reward.num_outputs == 2
  reward_model.run(c, str(tmp_path))
  ls = losses(tmp_path)
  assert len(ls) == 3 and all(np.isfinite(ls))


def test_rated_needs_one_output_per_attribute():
  c = config("steps=3,batch=8,loss=rm_regression")
  c.reward.num_outputs = 1
  with pytest.raises(ValueError, match=r"reward.num_outputs=1 but data.attributes has 2"):
    reward_model.make_loss_fn(c)


# ------------------------------------------------------------------ bt_plus_regression


def test_bt_plus_regression_trains_on_rated_pairs(tmp_path):
  c = config("steps=3,batch=8,loss=bt_plus_regression", eval_steps=0)
  batch = next(reward_model.build_task(c).train_iter())
  assert batch["tokens"].shape[1] == 2 and batch["scores"].shape == (8, 2)
  reward_model.run(c, str(tmp_path))
  rows = metric_rows(tmp_path)
  assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["regression"] > 0 for r in rows)
  c.data.max_responses = 4
  with pytest.raises(ValueError, match="data.max_responses=2"):
    reward_model.make_loss_fn(c)


# ------------------------------------------------------------------ bt_ties, learned


def tie_rows(n=32, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    row = {"prompt": _word(rng, 4) + "=", "chosen": _word(rng, 5), "rejected": _word(rng, 5)}
    if i % 3 == 0:
      row["label"] = 0
    elif i % 7 == 0:
      row["label"] = -1
    rows.append(row)
  return rows


@pytest.mark.parametrize("mode,name", [("rao_kupper", "theta_raw"), ("davidson", "kappa")])
def test_bt_ties_learns_its_tie_parameter(tmp_path, mode, name):
  path = write_jsonl(tmp_path / "ties.jsonl", tie_rows())
  c = file_config(path, "steps=3,batch=16,loss=bt_ties")
  c.loss.params.mode = mode
  c.loss.params[name] = 0.25
  task = reward_model.build_task(c)
  mesh = single_device_mesh()
  with parallel.use_mesh(mesh):
    model = task.build_model(mesh, parallel.DEFAULT_RULES)
    assert float(model.head.tie_param[...]) == 0.25
    graphdef, params = nnx.split(model)
    lr = 0.05
    tx = optax.sgd(lr)  # the first update is -lr * gradient
    state = loop.init_state(params, tx, mesh, parallel.DEFAULT_RULES, 0)
    step = jax.jit(loop.make_train_step(graphdef, task.loss_fn, tx, lambda s: lr))
    it = task.train_iter()
    values = [0.25]
    for _ in range(3):
      batch = next(it)
      state, metrics = step(state, batch)
      values.append(float(state.params["head"]["tie_param"][...]))
      assert np.isfinite(metrics["loss"]) and metrics["num_ties"] > 0
  gradient = (values[0] - values[1]) / lr
  assert abs(gradient) > 1e-4
  assert abs(values[-1] - 0.25) > 1e-3
  # "half" has no parameter.
  c.loss.params.mode = "half"
  assert reward_model.head_config(c).tie_init is None


# ------------------------------------------------------------------ MORE


def more_rows(n=48, seed=0):
  """Two sources: `clean` pairs follow the synthetic rule, `noisy` ones are half flipped."""
  from alignjax.data.synthetic import PreferenceSource
  src = PreferenceSource(seed, "train", kind="pairwise")
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    rec = src[i]
    rec = {k: rec[k] for k in ("prompt", "chosen", "rejected")}
    if i % 2:
      rec["source"] = "noisy"
      if rng.random() < 0.5:
        rec["chosen"], rec["rejected"] = rec["rejected"], rec["chosen"]
    else:
      rec["source"] = "clean"
    rows.append(rec)
  return rows


def test_more_weights_sources_on_the_simplex(tmp_path):
  path = write_jsonl(tmp_path / "two_sources.jsonl", more_rows())
  c = file_config(path, "steps=3,batch=16,loss=bt_weighted")
  c.data.seq_len = 16
  c.data.sources = ("clean", "noisy")
  c.loss.more = True
  reward_model.run(c, str(tmp_path / "run"))
  rows = metric_rows(tmp_path / "run")
  assert len(rows) == 3
  for r in rows:
    assert 0 <= r["more_lam_0"] <= 1 and 0 <= r["more_lam_1"] <= 1
    assert abs(r["more_lam_0"] + r["more_lam_1"] - 1) < 1e-5 and np.isfinite(r["loss"])
  # Step 1's weights are those of the initial model on the first batch. For a linear head they
  # are analytic: g_s = mean_{i in s} -sig(-d_i) (h_c,i - h_r,i); lam_1 = the S = 2 closed form.
  batch = next(reward_model.build_task(c).train_iter())
  cfg = reward_model.common.model_config(c, CharTokenizer().vocab_size)
  model = reward.RewardModel(  # as build_reward_model makes it, unsharded
      init_model(cfg, c.model.init_seed, lm_head=False),
      reward.RewardHead(cfg.hidden_size, reward_model.head_config(c), init_std=cfg.init_std,
                        rngs=nnx.Rngs(params=c.model.init_seed + 1)))
  tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
  h = np.asarray(model.features(tokens, batch["positions"].reshape(tokens.shape),
                                batch["segment_ids"].reshape(tokens.shape))).reshape(16, 2, -1)
  w = np.asarray(model.head.kernel[...])[0, :, 0]
  dh = h[:, 0] - h[:, 1]
  coef = -1.0 / (1.0 + np.exp(dh @ w))
  g = np.stack([np.mean((coef[:, None] * dh)[batch["source_id"] == s], 0) for s in (0, 1)])
  lam_0 = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1]) ** 2), 0, 1)
  np.testing.assert_allclose([rows[0]["more_lam_0"], rows[0]["more_lam_1"]],
                             [lam_0, 1 - lam_0], rtol=1e-3, atol=1e-4)
  c.data.sources = ("clean",)
  with pytest.raises(ValueError, match="at least 2 sources"):
    reward_model.make_loss_fn(c)


# ------------------------------------------------------------------ parameter-set ensembles


def test_ensemble_backbones_train_differ_and_shard(tmp_path):
  c = config("steps=3,batch=8,ensemble_backbones=2", eval_steps=0)
  summary = reward_model.run(c, str(tmp_path))
  assert len(losses(tmp_path)) == 3 and np.isfinite(summary["loss"])
  cfg = reward_model.common.model_config(c, CharTokenizer().vocab_size)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  trained = reward_model.load_trained(c, str(tmp_path), cfg, mesh)
  assert isinstance(trained, reward.RewardEnsemble)
  embed = trained.members.backbone.embed
  # The member axis is replicated; the rest shards like one model: 1/8 per device.
  assert embed.get_metadata()["logical_axes"] == (None, "vocab", "embed")
  assert embed.shape[0] == 2 and embed[...].addressable_shards[0].data.size * 8 == embed.size
  embed = np.asarray(embed[...])
  assert not np.allclose(embed[0], embed[1])  # different seeds
  batch = next(reward_model.build_task(c).train_iter())
  tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
  seg = batch["segment_ids"].reshape(tokens.shape)
  score = lambda m, t, s: m(t, None, s)
  out = np.asarray(score(trained, tokens, seg))
  assert out.shape == (16, 2, 1) and not np.allclose(out[:, 0], out[:, 1])
  # Member 1 alone gives the ensemble's second column.
  np.testing.assert_allclose(np.asarray(score(trained.member(1), tokens, seg))[:, 0],
                             out[:, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(reward_model.ensemble_rewards(out, c)),
                             out[:, :, 0].mean(1), rtol=1e-6)


def test_ensemble_backbones_sharded_step_equals_single_device():
  assert_sharded_steps_match(config("steps=2,batch=16,ensemble_backbones=2"),
                             [{"data": 2, "fsdp": 2, "tensor": 2}])


def test_ensemble_backbones_from_a_hf_causal_lm(fixtures_dir):
  from alignjax.data.tokenizer import Tokenizer
  from alignjax.models import hf
  path = os.path.join(fixtures_dir, "llama")
  c = config("steps=2,batch=8,ensemble_backbones=2")
  c.model.hf_path = path
  cfg = reward_model.common.model_config(c, Tokenizer.from_dir(path).vocab_size)
  mesh = single_device_mesh()
  model = reward_model.build_reward_model(c, cfg, mesh, parallel.DEFAULT_RULES)
  lm_embed = np.asarray(hf.load_hf_model(path, lm_head=False).embed[...])
  embed = model.members.backbone.embed
  assert embed.get_metadata()["logical_axes"] == (None, "vocab", "embed")
  np.testing.assert_array_equal(np.asarray(embed[...]), np.stack([lm_embed, lm_embed]))
  kernel = np.asarray(model.members.head.kernel[...])
  assert not np.allclose(kernel[0], kernel[1])  # the heads have different seeds


# ------------------------------------------------------------------ aggregation for scoring


@pytest.mark.parametrize("method,expected", [
    ("mean", [1.1, .05]), ("median", [1.2, .15]), ("min", [0, -.4]),
    ("mean_minus_std", [.37198901, -.21925824])])
def test_ensemble_rewards_aggregate(method, expected):
  c = config()
  c.reward.aggregate = method
  R = np.array([[1, .2], [2, -.4], [0, .1], [1.4, .3]])  # METHODS rm_ensemble golden [E, N]
  out = R.T[:, :, None]                                    # [N, E, A=1]
  np.testing.assert_allclose(reward_model.ensemble_rewards(out, c), expected, rtol=1e-6,
                             atol=1e-7)
  c.reward.num_outputs, c.reward.attribute_weights = 2, (0.5, 0.5)
  two = np.concatenate([out, 3 * out], axis=-1)            # outputs . w = 2 R
  np.testing.assert_allclose(reward_model.ensemble_rewards(two, c), 2 * np.array(expected),
                             rtol=1e-6, atol=1e-6)
