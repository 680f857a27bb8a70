"""eval_rm scores an alignjax reward_model run and its HF export identically."""

import os

import jax
import numpy as np
import pytest

from alignjax import configlib, parallel, tasks
from alignjax.data.tokenizer import CharTokenizer
from alignjax.models import reward
from alignjax.trainers import common, reward_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_alignjax_run_and_hf_export_score_the_same(tmp_path):
  rm = configlib.load_config_file(os.path.join(REPO, "configs", "reward_model.py"),
                                  "steps=20,batch=16")
  rm.train.progress_bar = False
  rm.train.eval_steps = 0
  rm.train.peak_flops_per_device = 1e9
  tasks.run_task(rm, str(tmp_path / "run"))
  tok = CharTokenizer()
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg = common.model_config(rm, tok.vocab_size)
  trained = reward_model.load_trained(rm, str(tmp_path / "run"), cfg, mesh)
  reward.save_hf_reward_model(trained, str(tmp_path / "hf"), pad_token_id=tok.pad_id)

  ev = configlib.load_config_file(os.path.join(REPO, "configs", "eval_rm.py"),
                                  f"checkpoints={tmp_path}/run+{tmp_path}/hf,examples=128")
  ev.eval_rm.max_lists = 32
  out = tasks.run_task(ev, str(tmp_path / "eval"))
  a, b = out["run"], out["hf"]
  assert a["pairwise"]["n"] == b["pairwise"]["n"] == 128
  assert a["pairwise"]["accuracy"] == b["pairwise"]["accuracy"]
  np.testing.assert_allclose(a["ece"]["ece"], b["ece"]["ece"], rtol=1e-6)
  assert os.path.exists(tmp_path / "eval" / "rm_compare.md")


def test_eval_rm_errors(tmp_path):
  ev = configlib.load_config_file(os.path.join(REPO, "configs", "eval_rm.py"))
  with pytest.raises(ValueError, match="checkpoints is empty"):
    tasks.run_task(ev, str(tmp_path))
  ev.eval_rm.checkpoints = (str(tmp_path / "missing"),)
  with pytest.raises(FileNotFoundError, match="neither an alignjax reward_model workdir"):
    tasks.run_task(ev, str(tmp_path))
