"""The `overoptimization` experiment task end to end at toy size (one shaping method, to keep
the suite short: every method's wiring is checked below, and the RL trainer's curve rows,
transforms and resume in tests/test_overopt.py and tests/test_rl.py), and its config wiring."""

import json
import os

import pytest

from alignjax import configlib
from alignjax.experiments import overoptimization as X
from alignjax.rewards import shaping
from alignjax.trainers import rl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "overoptimization.py")


def test_method_rewards_and_config_checks():
  oc = X.overopt_config()
  paths = ["/p0", "/p1", "/p2"]
  for m in X.METHODS:
    rewards, transforms = X.method_rewards(m, paths, oc)
    assert all(r["name"] == "reward_model" for r in rewards)
    assert [r["alias"] for r in rewards] == (["proxy_0", "proxy_1", "proxy_2"]
                                           if m == "ensemble" else ["proxy_0"])
    names = [t["name"] for t in transforms]
    assert names == {"raw": [], "ensemble": ["ensemble_aggregate"], "lsc": ["lsc_transform"],
                     "par": ["par_transform"]}[m]
    shaping.parse_transforms(transforms)            # valid transform entries
  c = configlib.load_config_file(CONFIG, "")
  assert c.overopt.methods == X.METHODS and c.overopt.ensemble_size == 3
  assert c.gold.data.preference.hits == "by_length" and c.gold.data.preference.min_len == 1
  assert c.proxy.data.preference.hits == "uniform"
  rl.check_config(c.rl)                             # the RL stage config is valid
  bad = configlib.load_config_file(CONFIG, "methods=raw+nope")
  with pytest.raises(ValueError, match="config.overopt.methods"):
    X.check_config(bad)
  bad = configlib.load_config_file(CONFIG, "ensemble=1")
  with pytest.raises(ValueError, match="ensemble_size"):
    X.check_config(bad)
  with pytest.raises(ValueError, match="proxy="):
    configlib.load_config_file(CONFIG, "proxy=nope")


def test_overoptimization_runs_end_to_end(tmp_path):
  c = configlib.load_config_file(
      CONFIG, "sft_steps=6,gold_steps=6,proxy_steps=4,ensemble=2,rl_steps=2,curve_every=1,"
              "prompts=4,group=4,bon_samples=4,methods=lsc")
  for stage in (c.sft, c.gold, c.proxy, c.rl):
    stage.train.progress_bar = False
  c.gold.train.eval_steps = c.proxy.train.eval_steps = 1
  c.overopt.bon_prompts = 4
  c.rl.rl.curve_prompts = 4
  c.rl.rl.curve_samples = 2
  res = X.run(c, str(tmp_path))
  for m in ("lsc",):
    assert [r["step"] for r in res["rows"][m]] == [0, 1, 2]
    assert res["curves"][m]["steps"] == [0, 1, 2]
    assert res["rows"][m][0]["kl"] == 0.0
    for key in ("monitor/gold", "monitor/letters_score", "reward/proxy_0", "entropy"):
      assert key in res["rows"][m][0]
  assert set(res["bon"]) == {"raw", "ensemble"} and res["bon"]["raw"]["n"] == [1, 2, 4]
  assert set(res["rm_accuracy"]) == {"gold", "proxy_0", "proxy_1"}
  md = (tmp_path / "report.md").read_text()
  for text in ("## Best-of-N", "Selection by **ensemble**", "**lsc**", "report_rl.png",
               "## Reading"):
    assert text in md
  for name in ("bon", "rl", "collapse"):
    assert (tmp_path / f"report_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["curves"]["lsc"]["steps"] == [0, 1, 2]
