"""The dpo and ref_logps tasks: plumbing against a naive computation, sharding, references."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import parallel
from alignjax.data import synthetic
from alignjax.data.records import RecordError
from alignjax.trainers import dpo, ref_logps

from tests import rm_helpers

SINGLE = rm_helpers.SINGLE


def config(arg="steps=3,batch=8", **overrides):
  c = rm_helpers.config_file("dpo.py", arg)
  c.train.progress_bar = False
  c.train.peak_flops_per_device = 1e9
  c.train.eval_steps = 2
  c.train.log_every = 1
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def write_records(path, n, seed=0, split="train", **extra):
  """Synthetic pairwise records as JSONL, with extra fields from callables of the index."""
  src = synthetic.PreferenceSource(seed, split)
  with open(path, "w") as f:
    for i in range(n):
      r = src[i]
      r.update({k: fn(i, r) for k, fn in extra.items()})
      f.write(json.dumps(r) + "\n")
  return str(path)


def file_config(tmp_path, arg="steps=3,batch=8", n=32, **extra):
  os.makedirs(tmp_path, exist_ok=True)
  c = config(arg)
  c.data.synthetic = ""
  c.data.train_files = write_records(tmp_path / "train.jsonl", n, **extra)
  c.data.eval_files = write_records(tmp_path / "eval.jsonl", 16, split="eval", **extra)
  return c


def _state(task, mesh=None, frozen_fn=None):
  mesh = mesh or parallel.make_mesh(SINGLE, jax.devices()[:1])
  with parallel.use_mesh(mesh):
    model = task.build_model(mesh, parallel.DEFAULT_RULES)
    frozen = task.build_frozen(model, mesh, parallel.DEFAULT_RULES) if task.build_frozen else None
    if frozen is not None and frozen_fn is not None:
      frozen = frozen_fn(frozen)
  return model, frozen, mesh


def _shrink(frozen):
  return jax.tree.map(lambda x: x * 0.9, frozen)


def _naive_sums(model, batch):
  """Summed response log-probs [B, K] from full logits (numpy float64)."""
  b, k, l = batch["tokens"].shape
  t = batch["tokens"].reshape(b * k, l)
  logits = np.asarray(model(jnp.asarray(t), jnp.asarray(batch["positions"].reshape(b * k, l)),
                            jnp.asarray(batch["segment_ids"].reshape(b * k, l))), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                         ) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp[:, :-1], t[:, 1:, None], -1)[..., 0]
  mask = batch["response_mask"].reshape(b * k, l)[:, 1:]
  return (picked * mask).sum(-1).reshape(b, k), mask.sum(-1).reshape(b, k)


def test_loss_fn_matches_a_naive_computation():
  c = config("steps=1,batch=8")
  task = dpo.build_task(c)
  model, frozen, _ = _state(task, frozen_fn=_shrink)
  batch = next(task.train_iter())
  loss_sum, denom, m = jax.jit(task.loss_fn)(model, batch, frozen)
  p, n = _naive_sums(model, batch)
  q, _ = _naive_sums(nnx.merge(nnx.graphdef(model), frozen), batch)
  beta = 0.1
  d = beta * ((p[:, 0] - q[:, 0]) - (p[:, 1] - q[:, 1]))
  np.testing.assert_allclose(loss_sum / denom, np.mean(np.logaddexp(0, -d)), rtol=1e-5)
  assert denom == 8
  np.testing.assert_allclose(m["margin"], d.sum(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["accuracy"], np.sum(d > 0), atol=1e-6)
  np.testing.assert_allclose(m["logp_chosen"], p[:, 0].sum(), rtol=1e-5)
  np.testing.assert_allclose(m["ranking_acc"], np.sum(p[:, 0] > p[:, 1]))
  np.testing.assert_allclose(m["ranking_acc_norm"],
                             np.sum(p[:, 0] / n[:, 0] > p[:, 1] / n[:, 1]))
  # alpha = .99: IRA = 1[q_w - q_l + log(99)/beta > 0]; gap = IRA - RA.
  ira = np.sum(q[:, 0] - q[:, 1] + np.log(99) / beta > 0)
  np.testing.assert_allclose(m["idealized_ranking_acc"], ira)
  np.testing.assert_allclose(m["alignment_gap"], ira - np.sum(p[:, 0] > p[:, 1]))
  # The evaluation module's numpy functions give the same rates.
  from alignjax.evaluation import metrics as ev
  ra = ev.ranking_acc(p[:, 0], p[:, 1], n[:, 0], n[:, 1])
  assert ra["accuracy"] == m["ranking_acc"] / 8 and ra["accuracy_norm"] == m["ranking_acc_norm"] / 8
  gap = ev.alignment_gap(p[:, 0], p[:, 1], q[:, 0], q[:, 1], 0.99, beta=beta)
  np.testing.assert_allclose(gap["gap"], m["alignment_gap"] / 8)
  np.testing.assert_allclose(gap["idealized_ranking_acc"], ira / 8)


def test_sharded_dpo_step_equals_single_device():
  task = dpo.build_task(config("steps=2,batch=16"))
  rm_helpers.assert_sharded_steps_match(
      task, [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1},
             {"data": 8, "fsdp": 1, "tensor": 1}], frozen_fn=_shrink)


def test_sharded_kto_and_listwise_steps_equal_single_device():
  for loss, data in (("kto", "arithmetic"), ("rank_dpo", "letters")):
    task = dpo.build_task(config(f"steps=2,batch=16,loss={loss},task={data}"))
    rm_helpers.assert_sharded_steps_match(task, [{"data": 2, "fsdp": 2, "tensor": 2}],
                                          frozen_fn=_shrink)


def test_label_orientation_and_ties(tmp_path):
  """A record labelled -1 equals the swapped record; a tie (label 0) adds nothing."""
  swap = lambda r: {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
  base = [synthetic.PreferenceSource(0, "train")[i] for i in range(8)]
  variants = {"plain": base,
              "flipped": [{**swap(r), "label": -1} if i % 2 else r for i, r in enumerate(base)],
              "tie": base[:7] + [{**base[7], "label": 0}]}
  out = {}
  for name, records in variants.items():
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    c = config("steps=1,batch=8")
    c.data.synthetic, c.data.train_files, c.data.shuffle = "", str(path), False
    task = dpo.build_task(c)
    model, frozen, _ = _state(task, frozen_fn=_shrink)
    out[name] = jax.device_get(jax.jit(task.loss_fn)(model, next(task.train_iter()), frozen))
  np.testing.assert_allclose(out["flipped"][0], out["plain"][0], rtol=1e-6)
  np.testing.assert_allclose(out["flipped"][2]["margin"], out["plain"][2]["margin"], rtol=1e-5)
  assert out["tie"][1] == 7 and out["tie"][2]["num_pairs"] == 7


def test_precomputed_reference_equals_live(tmp_path):
  c = file_config(tmp_path, "steps=1,batch=8", n=16)
  ref_cfg = rm_helpers.config_file("ref_logps.py")   # the reference = the policy's init
  ref_cfg.data = c.data
  ref_cfg.ref_logps.batch_size = 5   # not a divisor: the padded last batch
  summary = ref_logps.run(ref_cfg, str(tmp_path / "ref"))
  assert summary["num_train"] == 16 and summary["num_eval"] == 16
  rows = [json.loads(line) for line in open(summary["train_file"])]
  assert {"ref_chosen_logps", "ref_rejected_logps", "prompt", "chosen"} <= set(rows[0])
  assert not os.path.exists(summary["train_file"] + ".tmp")
  live_task = dpo.build_task(c)
  pre = file_config(tmp_path, "steps=1,batch=8,reference=precomputed", n=16)
  pre.data.train_files, pre.data.eval_files = summary["train_file"], summary["eval_file"]
  pre_task = dpo.build_task(pre)
  assert pre_task.build_frozen is None
  model, frozen, _ = _state(live_task)
  batch_live = next(live_task.train_iter())
  batch_pre = next(pre_task.train_iter())
  a = jax.device_get(jax.jit(live_task.loss_fn)(model, batch_live, frozen))
  b = jax.device_get(jax.jit(pre_task.loss_fn)(model, batch_pre))
  np.testing.assert_allclose(b[0], a[0], rtol=1e-5)
  for k in ("margin", "ranking_acc", "idealized_ranking_acc"):
    np.testing.assert_allclose(b[2][k], a[2][k], rtol=1e-4, atol=1e-5)


def test_reference_free_loss_runs_without_a_reference(tmp_path):
  c = config("steps=2,batch=8,loss=simpo,beta=2.0")
  task = dpo.build_task(c)
  assert task.build_frozen is None and dpo.reference_mode(c) == "none"
  summary = dpo.run(c, str(tmp_path))
  assert np.isfinite(summary["loss"]) and "eval_accuracy" in summary


@pytest.mark.parametrize("loss", ["dpo_sigmoid+rpo", "kto", "adpo", "ipo"])
def test_variants_train(tmp_path, loss):
  data = "letters" if loss == "adpo" else "arithmetic"   # adpo: listwise records
  summary = dpo.run(config(f"steps=2,batch=8,loss={loss},task={data}"), str(tmp_path))
  assert np.isfinite(summary["loss"]) and np.isfinite(summary["eval_loss"])
  if loss == "dpo_sigmoid+rpo":
    assert "loss_rpo" in summary and "rpo_nll" in summary


def test_losses_reading_record_fields(tmp_path):
  extra = dict(score_chosen=lambda i, r: 2.0 + i % 3, score_rejected=lambda i, r: 1.0,
               consistency=lambda i, r: 0.8, reference_sample=lambda i, r: r["rejected"][::-1])
  for loss in ("dpo_dynamic_beta", "gapo", "cream", "selm"):
    c = file_config(tmp_path / loss, f"steps=1,batch=8,loss={loss}", **extra)
    task = dpo.build_task(c)
    batch = next(task.train_iter())
    model, frozen, _ = _state(task, frozen_fn=_shrink)
    loss_sum, denom, m = jax.device_get(jax.jit(task.loss_fn)(model, batch, frozen))
    assert np.isfinite(loss_sum) and denom > 0, loss
    if loss == "selm":
      assert batch["tokens"].shape[1] == 3 and np.isfinite(m["y0_ratio"])
  # A record without the field is an error naming the file, line and field.
  c = file_config(tmp_path / "bad", "steps=1,batch=8,loss=cream")
  with pytest.raises(RecordError, match=r"train.jsonl line \d+, field 'consistency': missing"):
    next(dpo.build_task(c).train_iter())


def test_config_errors():
  with pytest.raises(ValueError, match="kto's z0"):
    dpo.build_task(config("loss=kto,reference=precomputed"))
  with pytest.raises(ValueError, match="not a DPO-family loss"):
    dpo.build_task(config("loss=bt"))
  c = config()
  c.dpo.weights = (1.0, 2.0)
  with pytest.raises(ValueError, match="dpo.weights"):
    dpo.build_task(c)
  c = config()
  c.dpo.reference = "none"
  with pytest.raises(ValueError, match="needs reference"):
    dpo.build_task(c)
  with pytest.raises(ValueError, match="ref_update_steps"):
    dpo.build_task(config("reference=precomputed,ref_update_steps=5"))
  with pytest.raises(ValueError, match="per-token"):
    dpo.build_task(config("loss=t_reg,reference=precomputed"))


def test_dynamic_anchor_and_resume(tmp_path):
  """ref_update_steps=2, alpha=.5: the reference mixes in the policy at steps 2 and 4; the
  reference is checkpointed, so 2 steps + resume gives the losses of 4 steps in one go."""
  def run(workdir, steps, resume_from=None):
    c = config(f"steps={steps},batch=8,ref_update_steps=2")
    c.dpo.ref_update_alpha = 0.5
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0  # same lr whatever steps
    c.checkpoint.every = 2
    c.train.eval_steps = 0
    return dpo.run(c, str(workdir))

  def losses(workdir):
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  run(tmp_path / "a", 4)
  run(tmp_path / "b", 2)
  run(tmp_path / "b", 4)
  a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
  for s in (1, 2, 3, 4):
    np.testing.assert_allclose(b[s], a[s], rtol=1e-6)
  # The update rule itself.
  upd = dpo.make_update_frozen(config("ref_update_steps=2"))
  p, f = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
  assert float(upd(jnp.int32(1), p, f)["w"][0]) == 0.0
  assert float(upd(jnp.int32(2), p, f)["w"][0]) == 1.0


def test_mismatched_rows():
  """Row i of the KL batch is prompt i + chosen response of i - 1."""
  task = dpo.build_task(config("steps=1,batch=4,loss=kto"))
  batch = next(task.train_iter())
  t, r = batch["tokens"][:, 0], batch["response_mask"][:, 0]
  for i in range(4):
    j = (i - 1) % 4
    p = int(np.nonzero(r[i])[0][0])
    resp = t[j, r[j] > 0]
    n = p + resp.size
    np.testing.assert_array_equal(batch["kl_tokens"][i, :n], np.concatenate([t[i, :p], resp]))
    assert batch["kl_response_mask"][i].sum() == resp.size


@pytest.mark.parametrize("loss", ["dft", "asft"])
def test_sft_dft_and_asft_match_full_logits(tmp_path, loss):
  """The sft task's DFT / ASFT objectives equal a float64 computation from full logits; a
  short run trains."""
  from alignjax.trainers import sft as sft_trainer
  c = rm_helpers.config_file("default.py", "only=sft,steps=2,batch=8")
  c.sft.loss, c.sft.eval_examples = loss, 0
  c.train.progress_bar, c.train.peak_flops_per_device, c.train.eval_steps = False, 1e9, 1
  task = sft_trainer.build_task(c)
  model, frozen, _ = _state(task, frozen_fn=_shrink)
  assert (frozen is None) == (loss == "dft")
  batch = next(task.train_iter())
  args = (model, batch) if frozen is None else (model, batch, frozen)
  loss_sum, denom, m = jax.device_get(jax.jit(task.loss_fn)(*args))
  log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(
      np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  t = batch["tokens"]
  lp_all = log_softmax(np.asarray(model(t, batch["positions"], batch["segment_ids"]),
                                  np.float64))[:, :-1]
  lp = np.take_along_axis(lp_all, t[:, 1:, None], -1)[..., 0]
  mask = batch["loss_mask"][:, 1:]
  per_token = -np.exp(lp) * lp
  if loss == "asft":
    ref = nnx.merge(nnx.graphdef(model), frozen)
    lq = log_softmax(np.asarray(ref(t, batch["positions"], batch["segment_ids"]),
                                np.float64))[:, :-1]
    per_token = per_token + 0.1 * (np.exp(lq) * (lq - lp_all)).sum(-1)
  np.testing.assert_allclose(loss_sum / denom, (per_token * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["nll"], -(lp * mask).sum(), rtol=1e-5)
  summary = sft_trainer.run(c, str(tmp_path))
  assert np.isfinite(summary["loss"])


def _naive_token_logps(model, batch):
  """Per-row response-aligned token log-probs [B, K, L-1] and masks, float64 numpy."""
  b, k, l = batch["tokens"].shape
  flat = lambda x: np.asarray(x).reshape(b * k, l)
  t = flat(batch["tokens"])
  z = np.asarray(model(t, flat(batch["positions"]), flat(batch["segment_ids"])), np.float64)
  z = z - z.max(-1, keepdims=True)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  picked = np.take_along_axis(lp[:, :-1], t[:, 1:, None], -1)[..., 0]
  rmask = flat(batch["response_mask"])
  out, mask = np.zeros((b * k, l)), np.zeros((b * k, l))
  for r in range(b * k):
    resp = np.nonzero(rmask[r])[0]
    out[r, :resp.size] = picked[r, resp - 1]
    mask[r, :resp.size] = 1
  return out.reshape(b, k, l), mask.reshape(b, k, l)


def test_t_reg_token_rewards_from_contrast_prompts():
  """t_reg: rows 2-5 are chosen/rejected under the 'better'/'worse' prompts; the loss equals
  METHODS' formula computed in numpy from full logits (token rewards by the reference)."""
  c = config("steps=1,batch=4,loss=t_reg")
  c.data.seq_len = 64   # room for the instructions (else the prompt is cut from the left)
  task = dpo.build_task(c)
  assert tuple(c.data.contrast_instructions) == (c.dpo.treg_better, c.dpo.treg_worse)
  batch = next(task.train_iter())
  assert batch["tokens"].shape[1] == 6
  model, frozen, _ = _state(task, frozen_fn=_shrink)
  loss_sum, denom, m = jax.device_get(jax.jit(task.loss_fn)(model, batch, frozen))
  lp, mask = _naive_token_logps(model, batch)
  lq, _ = _naive_token_logps(nnx.merge(nnx.graphdef(model), frozen), batch)
  beta, alpha = 0.1, 1.0
  ell = (lp - lq) * mask
  d = beta * (ell[:, 0].sum(-1) - ell[:, 1].sum(-1))
  both = mask[:, 2:4] * mask[:, 4:6]
  rt = (lq[:, 2:4] - lq[:, 4:6]) * both
  sig = lambda x: 1 / (1 + np.exp(-x))
  r_c = (mask[:, 0] * 2 * sig(rt[:, 0]) * ell[:, 0]).sum(-1)
  r_r = (mask[:, 1] * 2 * sig(-rt[:, 1]) * ell[:, 1]).sum(-1)
  want = np.logaddexp(0, -d) + alpha * np.logaddexp(0, -beta * (r_c - r_r))
  np.testing.assert_allclose(loss_sum / denom, want.mean(), rtol=1e-4)
  # The contrast prompt is the instruction, a blank line, then the prompt.
  from alignjax.data.tokenizer import CharTokenizer
  text = CharTokenizer().decode(batch["tokens"][0, 2][batch["segment_ids"][0, 2] > 0])
  assert text.startswith(c.dpo.treg_better + "\n\n") and "=" in text


def test_pairs_from_list_feed_score_based_losses(tmp_path):
  """data.pairs_from_list turns the synthetic lists into best/worst pairs whose scores feed
  dpo_dynamic_beta (score_chosen / score_rejected written by the transform)."""
  c = config("steps=2,batch=8,task=letters,loss=dpo_dynamic_beta")
  c.data.pairs_from_list = "best_worst"
  task = dpo.build_task(c)
  batch = next(task.train_iter())
  assert batch["tokens"].shape[1] == 2
  assert np.all(batch["score_chosen"] > batch["score_rejected"])
  summary = dpo.run(c, str(tmp_path))
  assert np.isfinite(summary["loss"]) and 0 < summary["beta"]
