"""Task `pipeline` and the default config's stages; eval_rm flags a length-biased RM."""

import json
import os

import pytest

from alignjax import configlib, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(c, steps):
  c.train.num_steps = steps
  c.train.log_every = steps
  c.train.eval_every = 0
  c.train.eval_steps = 1
  c.train.progress_bar = False
  c.train.peak_flops_per_device = 1e9
  return c


def test_default_pipeline_stages_and_length_bias_flag(tmp_path):
  c = configlib.load_config_file(os.path.join(REPO, "configs", "default.py"),
                                 "steps=3,rm_steps=250")
  assert c.stages == ("sft", "grpo", "dpo", "reward_model", "reward_model_length_biased",
                      "eval_rm")
  _quiet(c.sft, 3)
  c.sft.sft.eval_examples = 2
  _quiet(c.grpo, 1)  # starts from {workdir}/sft
  c.grpo.rl.num_prompts, c.grpo.rl.group_size, c.grpo.rl.eval_examples = 4, 4, 4
  c.grpo.rl.eval_samples = 0
  _quiet(c.dpo, 2)   # starts from {workdir}/sft
  _quiet(c.reward_model, 3)
  # The biased reward model: trained long enough to learn "longer is better".
  _quiet(c.reward_model_length_biased, 250)
  c.reward_model_length_biased.model.checkpoint = "{workdir}/sft"  # a stage links to another
  c.eval_rm.eval_rm.max_examples = 256
  c.eval_rm.eval_rm.max_lists = 64
  results = tasks.run_task(c, str(tmp_path))
  assert set(results) == set(c.stages)
  assert 0.0 <= results["dpo"]["eval_accuracy"] <= 1.0
  assert 0.0 <= results["grpo"]["eval_accuracy"] <= 1.0
  ev = results["eval_rm"]
  assert ev["reward_model_length_biased"]["length_bias"]["flag"]["flag"] is True
  for name in ("reward_model", "reward_model_length_biased"):
    files = os.listdir(tmp_path / "eval_rm" / name)
    assert {"rm_eval.json", "rm_eval.md", "rm_eval_hist.png", "rm_eval_length.png"} <= set(files)
  compare = json.load(open(tmp_path / "eval_rm" / "rm_compare.json"))
  assert "reward_model_length_biased" in json.dumps(compare)


def test_pipeline_errors():
  c = configlib.load_config_file(os.path.join(REPO, "configs", "default.py"))
  c.unlock()
  c.stages = ("sft", "nope")
  with pytest.raises(ValueError, match="'nope'"):
    tasks.run_task(c, "/tmp/unused_pipeline")
  with pytest.raises(ValueError, match="only='x'"):
    configlib.load_config_file(os.path.join(REPO, "configs", "default.py"), "only=x")
