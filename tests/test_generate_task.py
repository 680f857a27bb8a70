"""Task `generate`: JSONL prompts -> JSONL completions, on the tiny model and an HF checkpoint."""

import json
import os

import numpy as np
import pytest

from alignjax import tasks
from alignjax.data.records import RecordError
from alignjax.data.tokenizer import Tokenizer
from alignjax.models import hf
from alignjax.sampling import greedy_generate
from alignjax.sampling import task as gen_task
from tests import rm_helpers

QWEN2 = os.path.join(rm_helpers.REPO, "third_party", "hf_fixtures", "qwen2")


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "generations.jsonl"))]


def test_tiny_model_sampling(tmp_path):
  c = rm_helpers.config_file("generate.py", "temperature=1.0,n=3,max_new_tokens=5,seed=2")
  summary = tasks.run_task(c, str(tmp_path))
  rows = _rows(tmp_path)
  assert summary["num_prompts"] == 8 and len(rows) == summary["num_samples"] == 24
  assert [r["sample"] for r in rows[:3]] == [0, 1, 2] and rows[0]["id"] == "sum-0"
  for r in rows:
    assert r["num_tokens"] == len(r["tokens"]) == len(r["logprobs"]) <= 5
    assert r["finish_reason"] in ("stop", "length")
    assert (r["finish_reason"] == "stop") == (r["tokens"][-1] == 2)  # the char eos
    np.testing.assert_allclose(r["logprobs"], r["model_logprobs"], atol=1e-5)  # T=1, no filter
  assert not os.path.exists(tmp_path / "generations.jsonl.tmp")
  again = tasks.run_task(c, str(tmp_path / "again"))
  assert again["num_samples"] == 24 and _rows(tmp_path / "again") == rows  # seeded


def test_hf_checkpoint_with_chat_template_greedy(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "hello there"}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
  c = rm_helpers.config_file("generate.py", f"hf_path={QWEN2},max_new_tokens=6")
  c.generate.prompts_file = str(prompts)
  tasks.run_task(c, str(tmp_path))
  rows = _rows(tmp_path)
  tok = Tokenizer.from_dir(QWEN2)
  ids = [gen_task.encode_prompt(dict(json.loads(l), _where="x"), tok, "auto")
         for l in prompts.read_text().splitlines()]
  assert tok.decode(ids[0], skip_special_tokens=False) == tok.apply_chat_template(
      [{"role": "user", "content": "hello there"}], add_generation_prompt=True)
  model = hf.load_hf_model(QWEN2)
  want = greedy_generate(model, ids, max_new_tokens=6, pad_id=tok.pad_id)
  assert [r["tokens"] for r in rows] == [w[:r["num_tokens"]] for w, r in zip(want, rows)]
  # "never": the plain prompt is encoded as is.
  raw = gen_task.encode_prompt({"prompt": "hello there"}, tok, "never")
  assert raw == tok.encode("hello there", add_bos=tok.add_bos_token)


def test_errors(tmp_path):
  c = rm_helpers.config_file("generate.py")
  c.generate.prompts_file = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="prompts_file"):
    tasks.run_task(c, str(tmp_path))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"text": "x"}) + "\n")
  c.generate.prompts_file = str(bad)
  with pytest.raises(RecordError, match=r"bad.jsonl line 2, field 'prompt'"):
    tasks.run_task(c, str(tmp_path))
  c.generate.prompts_file, c.generate.chat_template = str(bad), "sometimes"
  with pytest.raises(ValueError, match="chat_template"):
    tasks.run_task(c, str(tmp_path))
