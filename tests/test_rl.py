"""The RL trainer (task=rl): array layout, the loss against a float64 full-logits computation,
exactness across micro-batches and meshes, unscorable rewards, dynamic sampling, resume, and
each shipped config running at tiny size."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import configlib, parallel
from alignjax.models.presets import get_preset
from alignjax.models.transformer import init_model
from alignjax.rewards import registry as reward_registry
from alignjax.trainers import loop
from alignjax.trainers import rl
from alignjax.trainers.optim import make_optimizer
from tests import rm_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 0


def test_sequences_layout():
  arr = rl.sequences([[5, 6, 7], [8]], np.array([[1, 2, 0], [3, 0, 0]]), np.array([2, 1]), PAD)
  p = arr["tokens"].shape[1] - 3
  assert arr["tokens"][0, p - 3:].tolist() == [5, 6, 7, 1, 2, 0]
  assert arr["tokens"][1, p - 1:].tolist() == [8, 3, 0, 0]
  assert arr["mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
  assert arr["positions"][0, p - 3:p + 2].tolist() == [0, 1, 2, 3, 4]
  assert arr["positions"][1, p - 1:p + 1].tolist() == [0, 1]
  assert arr["segment_ids"][1].tolist() == [0] * (p - 1) + [1, 1, 0, 0]


def _resolved(**kw):
  c = rl.rl_config("grpo")
  for k, v in kw.items():
    c[k] = v
  return rl.resolve(c)


def _batch(model, rng, n=4, t=5):
  prompts = [list(rng.integers(1, 60, size=int(rng.integers(2, 6)))) for _ in range(n)]
  toks = rng.integers(1, 60, size=(n, t))
  lengths = np.array([5, 3, 4, 1])[:n]
  arr = rl.sequences(prompts, toks, lengths, PAD)
  arr["old"] = (rng.normal(size=(n, t)) * 0.3 - 4.0).astype(np.float32)
  arr["ref"] = (rng.normal(size=(n, t)) * 0.3 - 4.0).astype(np.float32)
  arr["A"] = rng.normal(size=(n,)).astype(np.float32)
  return arr


def _full_logp(model, arr, temperature):
  logits = np.asarray(model(jnp.asarray(arr["tokens"]), jnp.asarray(arr["positions"]),
                            jnp.asarray(arr["segment_ids"])), np.float64) / temperature
  t = arr["completion"].shape[1]
  p = arr["tokens"].shape[1] - t
  z = logits[:, p - 1:p - 1 + t]
  lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
  logp_all = z - lse[..., None]
  logp = np.take_along_axis(logp_all, arr["completion"][..., None], -1)[..., 0]
  ent = -np.sum(np.exp(logp_all) * logp_all, -1)
  return logp, ent


def test_loss_matches_float64_full_logits():
  """PPO-clip (.2/.28), seq-mean-token-mean, k3 KL in the loss, entropy bonus, temperature."""
  model = init_model(get_preset("tiny", vocab_size=64, init_std=0.3), 0)
  rng = np.random.default_rng(0)
  arr = _batch(model, rng)
  logp, ent = _full_logp(model, arr, 0.7)
  arr["old"] = (logp + rng.normal(size=logp.shape) * 0.3).astype(np.float32)
  arr["ref"] = (logp + rng.normal(size=logp.shape) * 0.3).astype(np.float32)
  r = _resolved(kl_coef=0.1, entropy_coef=0.01, policy_loss_params={"eps_hi": 0.28})
  fn = rl.make_loss_fn(r, temperature=0.7, chunk_size=4, vocab_chunk_size=None, grad_accum=1)
  trainer = object.__new__(rl.RLTrainer)
  trainer.r = r
  arr.update(trainer._denominators(arr))
  loss, denom, metrics = fn(model, {k: jnp.asarray(v) for k, v in arr.items()},
                            {"kl_coef": jnp.float32(0.1)})
  m = arr["mask"].astype(np.float64)
  a = arr["A"][:, None].astype(np.float64)
  rho = np.exp(logp - arr["old"])
  l = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.28))
  x = arr["ref"] - logp
  k3 = np.exp(x) - x - 1
  seq = lambda v: np.sum(np.sum(v * m, 1) / np.maximum(m.sum(1), 1)) / np.sum(m.sum(1) > 0)
  want = seq(l) + 0.1 * seq(k3) - 0.01 * seq(ent)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  assert float(denom) == 1.0
  np.testing.assert_allclose(float(metrics["entropy"]), np.sum(ent * m) / m.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), np.sum(k3 * m) / m.sum(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean"])
def test_step_exact_across_microbatches_and_mesh(mode):
  """One optimizer step: grad_accum 1 on one device == grad_accum 4 == sharded on (2,2,2)."""
  cfg = get_preset("tiny", vocab_size=64, init_std=0.3)
  rng = np.random.default_rng(1)
  r = _resolved(aggregation=mode, kl_coef=0.05)
  trainer = object.__new__(rl.RLTrainer)
  trainer.r = r
  arrays = [_batch(None, rng) for _ in range(2)]
  arr = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
  arr.update(trainer._denominators(arr))
  cc = configlib.optimizer_config()
  cc.name, cc.learning_rate, cc.schedule = "sgd", 1.0, "constant"  # params move by -grad
  tx, sched = make_optimizer(cc, 10)

  def run(mesh, ga):
    fn = rl.make_loss_fn(r, temperature=1.0, chunk_size=8, vocab_chunk_size=None, grad_accum=ga)
    with parallel.use_mesh(mesh):
      model = parallel.create_sharded(lambda: init_model(cfg, 0), mesh)
      gd, params = nnx.split(model)
      state = loop.init_state(params, tx, mesh, None, 0, {"kl_coef": jnp.float32(0.05)})
      step = jax.jit(loop.make_train_step(gd, fn, tx, sched, ga))
      state, m = step(state, rl.place(arr, mesh, None))
      return jax.device_get(state.params), jax.device_get(m)

  single = parallel.make_mesh(rm_helpers.SINGLE, jax.devices()[:1])
  p1, m1 = run(single, 1)
  for mesh, ga in ((single, 4), (parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 2)):
    p2, m2 = run(mesh, ga)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m2["kl"], m1["kl"], rtol=1e-4, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-7), p1, p2)


def _config(tmp, algorithm="grpo", steps=2, file="grpo.py", **rl_kw):
  arg = f"steps={steps},prompts=4,group=4,max_new_tokens=4,eval_examples=8"
  if file == "grpo.py":
    arg = f"algorithm={algorithm}," + arg
  c = configlib.load_config_file(os.path.join(REPO, "configs", file), arg)
  c.train.progress_bar = False
  c.train.log_every = 1
  c.rl.eval_samples = 0
  for k, v in rl_kw.items():
    c.rl[k] = v
  return c


@pytest.mark.parametrize("file,algorithm", [("grpo.py", "grpo"), ("ppo.py", "ppo"),
                                            ("rloo.py", "rloo"), ("raft.py", "raft"),
                                            ("grpo.py", "online_dpo")])
def test_configs_run_at_tiny_size(tmp_path, file, algorithm):
  c = _config(tmp_path, algorithm, steps=1, file=file)
  assert c.rl.algorithm == algorithm
  summary = rl.RLTrainer(c, str(tmp_path)).run()
  assert np.isfinite(summary["loss"]) and "eval_accuracy" in summary
  assert summary["num_compiles_sampler"] <= 2   # rollouts + greedy evaluation
  if algorithm == "ppo":
    assert np.isfinite(summary["value_loss"])


_CALLS = []


@reward_registry.register("_test_flaky_reward")
def _flaky(prompts, completions, fields):
  _CALLS.append(len(prompts))
  if len(prompts) > 1:
    raise RuntimeError("batch failure")
  g = fields["group"][0]
  return [float("nan") if g == 0 else (1.0 if len(completions[0]) % 2 else 0.0)]


def test_unscorable_rewards_get_zero_advantage(tmp_path):
  trainer = rl.RLTrainer(_config(tmp_path, rewards="_test_flaky_reward"), str(tmp_path))
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    arrays, host, metrics = trainer.rollout(state, 0)
    arrays = trainer.prepare(state, arrays, host, metrics)
  assert metrics["num_unscorable/_test_flaky_reward"] == 4     # group 0: 4 samples
  assert np.all(np.isnan(host["rewards"][0]))
  np.testing.assert_array_equal(arrays["A"][:4], 0.0)
  r = host["rewards"][1:]
  mu, sd = r.mean(1, keepdims=True), r.std(1, ddof=1, keepdims=True)
  want = np.where(sd > 0, (r - mu) / (sd + 1e-6), 0.0)
  np.testing.assert_allclose(arrays["A"][4:], want.reshape(-1), rtol=1e-5, atol=1e-6)


def test_dynamic_sampling_drops_flat_groups(tmp_path):
  c = _config(tmp_path, "dapo")
  c.rl.max_gen_batches = 2
  trainer = rl.RLTrainer(c, str(tmp_path))
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    arrays, host, metrics = trainer.rollout(state, 0)
  rew = host["rewards"]
  kept = int(metrics["num_kept_groups"])
  assert all(np.nanstd(rew[i]) > 0 for i in range(min(kept, 4)))
  # Padding groups (if too few were kept) carry no tokens.
  assert arrays["mask"][kept * 4:].sum() == 0


def test_resume_continues_exactly(tmp_path):
  full = rl.RLTrainer(_config(tmp_path, steps=2, eval_examples=0), str(tmp_path / "a")).run()
  c = _config(tmp_path, steps=2, eval_examples=0)
  c.checkpoint.every = 1
  part = _config(tmp_path, steps=1, eval_examples=0)
  part.checkpoint.every = 1
  rl.RLTrainer(part, str(tmp_path / "b")).run()
  resumed = rl.RLTrainer(c, str(tmp_path / "b")).run()
  for k in ("loss", "reward", "entropy"):
    np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5)


def test_bad_config_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match="config.rl.algorithm"):
    rl.check_config(_config(tmp_path, algorithm="nope"))
  with pytest.raises(ValueError, match="config.rl.policy_loss_params.bogus"):
    rl.check_config(_config(tmp_path, policy_loss_params={"bogus": 1}))
  with pytest.raises(ValueError, match="rl.rewards"):
    rl.check_config(_config(tmp_path, rewards="no_such_reward"))
  with pytest.raises(ValueError, match="mini_batches"):
    rl.check_config(_config(tmp_path, mini_batches=3))
  bad = _config(tmp_path, "online_dpo")
  bad.train.grad_accum = 2
  with pytest.raises(ValueError, match="grad_accum = 1"):
    rl.check_config(bad)


def test_reward_model_reward_scores_like_the_model(tmp_path):
  """`reward_model` (a trained RM run as a reward function) equals the RM's own forward on
  prompt + completion + eos rows, and an RL step runs with it."""
  from alignjax.data import preference as pref_data
  from alignjax.evaluation import rm as rm_eval
  rm_helpers.train_reward_model(tmp_path / "rm", "steps=3,batch=8")
  spec = reward_registry.make_spec("reward_model", params={"path": str(tmp_path / "rm")})
  prompts, completions = ["abcd", "dcba", "ab"], ["aab", "dd", ""]
  got = spec(prompts, completions, {})
  # The reference: the run loaded again on one device, a jitted forward of hand-built rows.
  tok = __import__("alignjax.rewards.model", fromlist=["_load"])._load(str(tmp_path / "rm"))[0]
  mesh = parallel.make_mesh(rm_helpers.SINGLE, jax.devices()[:1])
  with parallel.use_mesh(mesh):
    model, run_cfg = rm_eval.load_reward_model(str(tmp_path / "rm"), tok, mesh, None)
    forward = nnx.jit(lambda m, t, p, s: m(t, p, s))
    for p, c, g in zip(prompts, completions, got):
      row = pref_data.preference_rows(tok.encode(p, add_bos=tok.add_bos_token),
                                      [tok.encode(c) + [tok.eos_id]], seq_len=512,
                                      pad_id=tok.pad_id)[0]
      out = forward(model, *(jnp.asarray(row[k]) for k in ("tokens", "positions",
                                                          "segment_ids")))
      want = rm_eval._scalar(np.asarray(out), run_cfg)[0]
      np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="path"):
    reward_registry.make_spec("reward_model", params={"path": str(tmp_path / "missing")})


def test_prepare_kl_in_reward_and_gdpo(tmp_path):
  """RLOO with the KL penalty in the reward: A = rloo(r - beta sum_t m k1(old - ref)); GDPO
  gets one column per reward function and their weights."""
  rewards = [{"name": "format_reward", "params": {"pattern": r"[0-9+=].*"}},
             {"name": "exact_match", "weight": 0.5}]
  c = _config(tmp_path, "rloo", rewards=rewards, kl_in_reward_coef=0.1)
  trainer = rl.RLTrainer(c, str(tmp_path))
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    noisy = jax.tree.map(lambda x: x * 1.05, state.frozen["ref"])   # ref != policy
    state = state.replace(frozen=dict(state.frozen, ref=noisy))
    arrays, host, metrics = trainer.rollout(state, 0)
    arrays = trainer.prepare(state, arrays, host, metrics)
    m = arrays["mask"]
    r = host["rewards"] - 0.1 * np.sum(m * (arrays["old"] - arrays["ref"]), 1).reshape(4, 4)
    want = (r - (r.sum(1, keepdims=True) - r) / 3).reshape(-1)
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(arrays["A"], want, rtol=1e-4, atol=1e-5)
    assert host["columns"].shape == (4, 4, 2)
    np.testing.assert_allclose(host["weights"], [1.0, 0.5])
    trainer.r["advantage"], trainer.r["kl_in_reward_coef"] = "gdpo_adv", 0.0
    arrays = trainer.prepare(state, arrays, host, metrics)
    from alignjax.rl import advantages as adv_lib
    want = adv_lib.gdpo_adv(jnp.asarray(host["columns"]), weights=(1.0, 0.5))
    np.testing.assert_allclose(arrays["A"], np.asarray(want), rtol=1e-5, atol=1e-6)
    # ReMax: the baseline is the reward of a greedy rollout of each prompt; on every
    # completion token A = r - b (token rewards on the last token, no KL).
    trainer.r["advantage"] = "remax_adv"
    arrays = trainer.prepare(state, arrays, host, metrics)
    records = host["prompts"][::4]
    _, greedy = trainer._generate(state, records, 0, 7, 1, temperature=0.0)
    base = trainer._score(records, greedy, 1)[0]
    want = (host["rewards"] - base[:, None]).reshape(-1)
    assert np.abs(want).max() > 1e-3
    m = arrays["mask"]
    np.testing.assert_allclose(arrays["A"][:, 0][m[:, 0] > 0], want[m[:, 0] > 0], rtol=1e-5,
                               atol=1e-6)


def test_reward_transforms_pipeline(tmp_path):
  """rl.reward_transforms: lsc_transform against reference-policy samples (cached per prompt),
  then pareto_select as loss weights; the result equals the formulas on the scored columns."""
  rewards = [{"name": "length_penalty", "params": {"lmax": 4}},
             {"name": "format_reward", "weight": 0.5, "params": {"pattern": r"\d+"}}]
  c = _config(tmp_path, rewards=rewards, ref_reward_samples=2,
              reward_transforms=[{"name": "lsc_transform"}, "pareto_select"])
  trainer = rl.RLTrainer(c, str(tmp_path))
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    arrays, host, metrics = trainer.rollout(state, 0)
  cols = host["columns"].reshape(16, 2)
  ref = np.stack([trainer._ref_rewards[rec["prompt"]] for rec in host["prompts"]])  # [16,2,2]
  assert ref.shape == (16, 2, 2) and len(trainer._ref_rewards) == 4
  u = -np.logaddexp(0.0, -(cols - np.nanmean(ref, 1)))
  want = np.where(np.isnan(u), 0.0, u).sum(1)
  np.testing.assert_allclose(host["rewards"].reshape(-1), want, rtol=1e-5, atol=1e-6)
  # pareto front within each group (on the columns): rows off the front carry no tokens
  for i in range(16):
    grp = range(i // 4 * 4, i // 4 * 4 + 4)
    dominated = any(np.all(cols[j] >= cols[i]) and np.any(cols[j] > cols[i]) for j in grp)
    assert (arrays["mask"][i].sum() == 0) == dominated or host["lengths"][i] == 0
  with pytest.raises(ValueError, match="reward_transforms"):
    rl.check_config(_config(tmp_path, reward_transforms="dense_segment_reward"))


_SEEN = []


@reward_registry.register("_test_record_completions")
def _record(prompts, completions, fields):
  _SEEN.extend(completions)
  return [0.0] * len(completions)


def test_dataset_reset_starts(tmp_path):
  """rl.dataset_reset = 1: each prompt starts at x + y_w[:h] (one h per group), rewards see
  y_w[:h] + the completion, and only generated tokens carry loss."""
  chosen = "123456789"
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": chosen}) + "\n"
                          for i in range(8)))
  c = _config(tmp_path, rewards="_test_record_completions", dataset_reset=1.0)
  c.data.synthetic = ""
  c.data.train_files = str(path)
  trainer = rl.RLTrainer(c, str(tmp_path))
  _SEEN.clear()
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    arrays, host, metrics = trainer.rollout(state, 0)
  g = c.rl.group_size
  assert len(_SEEN) == 4 * g and 0.0 < metrics["dataset_reset_frac"] <= 1.0
  tok = trainer.tok
  p = arrays["tokens"].shape[1] - arrays["completion"].shape[1]
  for b in range(4):
    texts = _SEEN[b * g:(b + 1) * g]
    gen = [tok.decode([t for t in arrays["completion"][i] if t != tok.eos_id])
           for i in range(b * g, (b + 1) * g)]
    h = len(texts[0]) - len(gen[0])
    assert chosen.startswith(texts[0][:h])
    for text, gtext in zip(texts, gen):        # the whole group shares the start (x, h)
      assert text == chosen[:h] + gtext
    prompt_ids = [t for t in arrays["tokens"][b * g, :p] if t != tok.pad_id]
    assert tok.decode(prompt_ids).endswith("=" + chosen[:h])
  np.testing.assert_array_equal(arrays["mask"].sum(1), host["lengths"])
  with pytest.raises(ValueError, match="dataset_reset"):
    rl.check_config(_config(tmp_path, dataset_reset=1.5))


@reward_registry.register("_test_char_code_reward")
def _char_code(prompts, completions, fields):
  return [(sum(map(ord, c)) % 97) / 97 for c in completions]


def test_transform_states_and_reference_rewards_resume(tmp_path):
  """Stateful transforms (median_norm's running medians, incl. NaN for an unseen dataset) and
  the cached reference rewards are checkpointed: a resumed run equals an uninterrupted one."""
  kw = dict(rewards="_test_char_code_reward",
            reward_transforms=[{"name": "median_norm", "params": {"num_datasets": 2}},
                               {"name": "par_transform"}],
            eval_examples=0)
  full_t = rl.RLTrainer(_config(tmp_path, steps=2, **kw), str(tmp_path / "a"))
  full = full_t.run()
  part = _config(tmp_path, steps=1, **kw)
  part.checkpoint.every = 1
  rl.RLTrainer(part, str(tmp_path / "b")).run()
  c = _config(tmp_path, steps=2, **kw)
  c.checkpoint.every = 1
  res_t = rl.RLTrainer(c, str(tmp_path / "b"))
  resumed = res_t.run()
  med_full = np.asarray(full_t.transform_states[0]["median"])
  assert np.isnan(med_full[1]) and np.isfinite(med_full[0])
  np.testing.assert_allclose(np.asarray(res_t.transform_states[0]["median"]), med_full,
                             rtol=1e-6)
  assert res_t._ref_rewards.keys() == full_t._ref_rewards.keys()
  for k in ("reward", "loss"):
    np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5)
