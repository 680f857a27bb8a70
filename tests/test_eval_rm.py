"""eval_rm scores an alignjax reward_model run and its HF export identically."""

import os

import jax
import numpy as np
import pytest

from alignjax import parallel, tasks
from alignjax.data.tokenizer import CharTokenizer
from alignjax.models import reward
from alignjax.trainers import common, reward_model
from tests.rm_helpers import config_file, train_reward_model


def test_alignjax_run_and_hf_export_score_the_same(tmp_path):
  rm = train_reward_model(tmp_path / "run")
  tok = CharTokenizer()
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg = common.model_config(rm, tok.vocab_size)
  trained = reward_model.load_trained(rm, str(tmp_path / "run"), cfg, mesh)
  reward.save_hf_reward_model(trained, str(tmp_path / "hf"), pad_token_id=tok.pad_id)

  ev = config_file("eval_rm.py", f"checkpoints={tmp_path}/run+{tmp_path}/hf,examples=128")
  ev.eval_rm.max_lists = 32
  out = tasks.run_task(ev, str(tmp_path / "eval"))
  a, b = out["run"], out["hf"]
  assert a["pairwise"]["n"] == b["pairwise"]["n"] == 128
  assert a["pairwise"]["accuracy"] == b["pairwise"]["accuracy"]
  np.testing.assert_allclose(a["ece"]["ece"], b["ece"]["ece"], rtol=1e-6)
  assert os.path.exists(tmp_path / "eval" / "rm_compare.md")


def test_eval_rm_errors(tmp_path):
  ev = config_file("eval_rm.py")
  with pytest.raises(ValueError, match="checkpoints is empty"):
    tasks.run_task(ev, str(tmp_path))
  ev.eval_rm.checkpoints = (str(tmp_path / "missing"),)
  with pytest.raises(FileNotFoundError, match="neither an alignjax reward_model workdir"):
    tasks.run_task(ev, str(tmp_path))


def test_listwise_subset_and_language_metrics(tmp_path):
  import json
  train_reward_model(tmp_path / "run", "steps=5,batch=16")
  rows = []
  for i in range(40):
    rows.append({"prompt": "abcd=", "chosen": "abcx" if i % 2 else "abyz",
                 "rejected": "wxyz", "subset": ["alpacaeval-easy", "donotanswer"][i % 2],
                 "language": ["en", "de"][(i // 2) % 2]})
  path = tmp_path / "eval.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ev = config_file("eval_rm.py", f"checkpoints={tmp_path}/run")
  ev.data.synthetic = ""
  ev.data.eval_files = str(path)
  ev.data.batch_size = 8
  ev.eval_rm.listwise = False
  ev.eval_rm.probes = ("offtopic",)
  res = tasks.run_task(ev, str(tmp_path / "eval"))["run"]
  assert set(res["pairwise"]["groups"]) == {"alpacaeval-easy", "donotanswer"}
  assert res["pairwise"]["n"] == 40
  assert set(res["rb_score"]["sections"]) >= {"Chat", "Safety"}
  assert set(res["by_language"]["languages"]) == {"en", "de"}


def test_listwise_metrics_against_brute_force():
  from alignjax.evaluation import rm as rm_eval
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(6, 4))
  scores = np.array([[3, 2, 1, 0], [1, 3, 2, 0], [2, 2, 1, 0], [0, 1, 2, 3], [3, 0, 1, 2],
                     [1, 0, 0, 0]], np.float32)
  order = np.argsort(-scores, axis=1, kind="stable")
  lists = {"valid": np.ones((6, 4), np.float32), "scores": scores, "order": order}
  lists["valid"][5, 2:] = 0
  out = rm_eval.listwise_metrics(rewards, lists)
  hits, n = 0, 0
  for p in range(6):
    valid = lists["valid"][p] > 0
    top = scores[p][valid].max()
    if (scores[p][valid] == top).sum() > 1:
      continue  # tied best answer: left out
    b = int(np.argmax(np.where(valid, scores[p], -np.inf)))
    others = [rewards[p, j] for j in range(4) if valid[j] and j != b]
    n += 1
    hits += rewards[p, b] > max(others)
  assert out["best_of_k"]["n"] == n == 5
  assert out["best_of_k"]["accuracy"] == pytest.approx(hits / n)
  assert out["kendall_tau"]["n"] == 5  # rows with all four answers valid


def test_contrast_consistency_from_files(tmp_path):
  import json
  from alignjax.evaluation import metrics
  rm = train_reward_model(tmp_path / "run", "steps=5,batch=16")
  rows = [{"prompt_1": "abcd=", "response_1": "abcx", "prompt_2": "wxyz=", "response_2": "wxya"},
          {"prompt_1": "mnop=", "response_1": "mnqr", "prompt_2": "efgh=", "response_2": "efij"}]
  path = tmp_path / "contrast.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ev = config_file("eval_rm.py", f"checkpoints={tmp_path}/run,examples=64")
  ev.eval_rm.contrast_files = str(path)
  res = tasks.run_task(ev, str(tmp_path / "eval"))["run"]
  # Independent: score r(I_a, R_b) directly with the trained model.
  tok = CharTokenizer()
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = reward_model.load_trained(rm, str(tmp_path / "run"), common.model_config(
      rm, tok.vocab_size), mesh)
  from alignjax.data import preference as pref
  S = np.zeros((2, 2, 2))
  for i, r in enumerate(rows):
    for a in (1, 2):
      prompt, resp = pref.encode_preference(
          {"prompt": r[f"prompt_{a}"], "responses": [r["response_1"], r["response_2"]]}, tok)
      batch, _ = pref.preference_rows(prompt, resp, seq_len=16, pad_id=tok.pad_id)
      S[i, a - 1] = np.asarray(model(batch["tokens"], batch["positions"],
                                     batch["segment_ids"]))[:, 0, 0]
  want = metrics.contrast_consistency(S)
  assert res["contrast"]["n"] == 2
  assert res["contrast"]["per_comparison"] == want["per_comparison"]
  assert res["contrast"]["per_example"] == want["per_example"]
