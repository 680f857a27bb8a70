"""Task pref_strength: ensemble preference strength written back into the records."""

import json

import jax
import numpy as np
import pytest

from alignjax import parallel, tasks
from alignjax.data.tokenizer import CharTokenizer
from alignjax.trainers import common, reward_model
from tests.rm_helpers import config_file, train_reward_model


def test_strength_mu_sigma_filter_and_flip(tmp_path):
  rm = train_reward_model(tmp_path / "ens", "steps=5,batch=16,ensemble=3")

  c = config_file("pref_strength.py", f"checkpoints={tmp_path}/ens,records=48")
  plain = tasks.run_task(c, str(tmp_path / "plain"))
  rows = [json.loads(l) for l in open(plain["output"])]
  assert len(rows) == 48 and all({"margin", "margin_std", "strength_route"} <= set(r) for r in rows)

  # Independent recomputation: score each pair with every member, mean and std (ddof 0).
  tok = CharTokenizer()
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = reward_model.load_trained(rm, str(tmp_path / "ens"), common.model_config(
      rm, tok.vocab_size), mesh)
  from alignjax.data import preference as pref
  d = []
  for r in rows[:8]:
    rec = {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]}
    prompt, resp = pref.encode_preference(rec, tok)
    batch, _ = pref.preference_rows(prompt, resp, seq_len=16, pad_id=tok.pad_id)
    out = np.asarray(model(batch["tokens"], batch["positions"], batch["segment_ids"]))[..., 0]
    d.append(out[0] - out[1])                         # [E]
  d = np.array(d)
  np.testing.assert_allclose([r["margin"] for r in rows[:8]], d.mean(1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose([r["margin_std"] for r in rows[:8]], d.std(1), rtol=1e-4,
                             atol=1e-5)

  c.strength.flip = True
  c.strength.filter = "threshold"
  c.strength.tau_keep = float(np.median(plain["mu"]))
  flipped = tasks.run_task(c, str(tmp_path / "flip"))
  kept = [json.loads(l) for l in open(flipped["output"])]
  # Flipped first (|mu| for mu < 0), then kept where the flipped mu >= tau_keep.
  want = np.abs(plain["mu"]) >= c.strength.tau_keep
  assert flipped["num_kept"] == len(kept) == int(want.sum())
  assert all(r["margin"] >= 0 for r in kept)  # flipped pairs carry the positive strength
  by_prompt = {(r["prompt"], r["chosen"]): r for r in rows}
  for r in kept:
    if r["strength_flipped"]:
      orig = by_prompt[(r["prompt"], r["rejected"])]  # the original chosen is now rejected
      assert orig["margin"] < 0 and r["margin"] == pytest.approx(-orig["margin"])
