"""alignjax.data: preference records, the preference pipeline, the synthetic preference task."""

import json
import os

import grain
import numpy as np
import pytest

from alignjax import data

TOK = data.CharTokenizer()
FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "third_party", "hf_fixtures")
COMMON = {"tokens": np.int32, "segment_ids": np.int32, "positions": np.int32,
          "response_mask": np.float32, "length": np.int32, "example_mask": np.float32,
          "source_id": np.int32, "user_id": np.int32, "subset_id": np.int32,
          "language_id": np.int32}
BY_KIND = {"pairwise": {"margin": np.float32, "strength": np.float32, "label": np.float32},
           "listwise": {"valid": np.float32, "scores": np.float32, "order": np.int32,
                        "n": np.int32},
           "rated": {"targets": np.float32, "target_mask": np.float32}}


def _msg(role, content):
  return {"role": role, "content": content}


def _pairs(n, start=0):
  return [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
          for i in range(start, start + n)]


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _cfg(files="", **kw):
  cfg = data.default_preference_data_config()
  cfg.train_files = files
  cfg.eval_files = files
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def _iter(cfg, kind="pairwise", seq_len=16, batch=4, seed=0, pi=0, pc=1, tok=TOK, **kw):
  return data.make_preference_iterator(cfg, tok, kind=kind, seq_len=seq_len,
                                       global_batch_size=batch, seed=seed, process_index=pi,
                                       process_count=pc, **kw)


def _check_format(batch, kind, rows, k, seq_len, num_attributes=0, tok=TOK):
  keys = {**COMMON, **BY_KIND[kind]}
  assert set(batch) == set(keys)
  shapes = {"tokens": (rows, k, seq_len), "segment_ids": (rows, k, seq_len),
            "positions": (rows, k, seq_len), "response_mask": (rows, k, seq_len),
            "length": (rows, k), "valid": (rows, k), "scores": (rows, k), "order": (rows, k),
            "targets": (rows, num_attributes), "target_mask": (rows, num_attributes)}
  for key, dtype in keys.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape == shapes.get(key, (rows,)), key
  pad = batch["segment_ids"] == 0
  assert np.all(batch["tokens"][pad] == tok.pad_id)
  assert np.all(batch["response_mask"][pad] == 0) and np.all(batch["positions"][pad] == 0)
  assert set(np.unique(batch["segment_ids"])) <= {0, 1}
  for r, j in np.ndindex(rows, k):  # real tokens are a prefix, positions count them
    n = int(batch["segment_ids"][r, j].sum())
    assert np.all(batch["segment_ids"][r, j, :n] == 1)
    np.testing.assert_array_equal(batch["positions"][r, j, :n], np.arange(n))
  np.testing.assert_array_equal(batch["length"], batch["response_mask"].sum(-1))


def _texts(batch, tok=TOK, skip_special_tokens=False):
  """(full text, response text) of every real row, as [rows][k] lists."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    row = []
    for j in range(batch["tokens"].shape[1]):
      t, m, s = batch["tokens"][r, j], batch["response_mask"][r, j], batch["segment_ids"][r, j]
      row.append((tok.decode(t[s > 0], skip_special_tokens),
                  tok.decode(t[m > 0], skip_special_tokens)))
    out.append(row)
  return out


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# --- records -------------------------------------------------------------------------------


def test_validate_pairwise_forms():
  out = data.validate_preference({"prompt": "p", "chosen": "a", "rejected": "b", "id": 1}, "w",
                                 kind="pairwise")
  assert out == {"prompt": "p", "responses": ["a", "b"], "context": None, "source": None,
                 "user_id": None, "subset": None, "language": None, "margin": 0.0,
                 "strength": 1.0, "label": 1.0}
  q, a, b = _msg("user", "q"), _msg("assistant", "a"), _msg("assistant", "b")
  sys_msg = _msg("system", "s")
  # TRL: no prompt, chosen/rejected hold the whole conversation with a shared prefix.
  out = data.validate_preference({"chosen": [sys_msg, q, a], "rejected": [sys_msg, q, b]}, "w",
                                 kind="pairwise")
  assert out["prompt"] == [sys_msg, q] and out["responses"] == [[a], [b]]
  # TRL: explicit prompt, and chosen repeating it in front.
  out = data.validate_preference({"prompt": [q], "chosen": [q, a], "rejected": [b]}, "w",
                                 kind="pairwise")
  assert out["prompt"] == [q] and out["responses"] == [[a], [b]]
  # Identical responses are valid (the shared prefix stops before the last message).
  out = data.validate_preference({"chosen": [q, a], "rejected": [q, a]}, "w", kind="pairwise")
  assert out["prompt"] == [q] and out["responses"] == [[a], [a]]
  out = data.validate_preference({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2,
                                  "strength": -2.5, "label": 0, "user_id": 7,
                                  "principle": "be brief"}, "w", kind="pairwise")
  assert (out["margin"], out["strength"], out["label"], out["user_id"], out["context"]) == (
      2.0, -2.5, 0.0, "7", "be brief")


def test_validate_listwise_and_rated():
  out = data.validate_preference({"prompt": "p", "responses": ["a", "b", "c"],
                                  "ranking": [2, 0, 1]}, "w", kind="listwise")
  assert out["order"] == [2, 0, 1] and out["scores"] == [2.0, 1.0, 3.0]
  out = data.validate_preference({"prompt": "p", "responses": ["a", "b", "c"],
                                  "scores": [1, 3, 3]}, "w", kind="listwise")
  assert out["order"] == [1, 2, 0] and out["scores"] == [1.0, 3.0, 3.0]  # ties: index order
  attrs = ("helpfulness", "verbosity")
  out = data.validate_preference({"prompt": "p", "response": "r",
                                  "scores": {"helpfulness": 3, "verbosity": None, "x": 1}}, "w",
                                 kind="rated", attributes=attrs)
  assert out["targets"] == [3.0, None]
  out = data.validate_preference({"prompt": "p", "response": "r", "verbosity": 1.5}, "w",
                                 kind="rated", attributes=attrs)
  assert out["targets"] == [None, 1.5]


PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize("kind, record, field, text", [
    ("pairwise", {"prompt": "1+1=", "chosen": "2"}, "rejected", "missing"),
    ("pairwise", {"chosen": "2", "rejected": "3"}, "prompt", "missing"),
    ("pairwise", {**PAIR, "chosen": 2}, "chosen", "got int"),
    ("pairwise", {**PAIR, "rejected": [_msg("assistant", "3")]}, "rejected",
     "strings or message lists"),
    ("pairwise", {**PAIR, "prompt": [_msg("user", "q")]}, "prompt", "expected a string"),
    ("pairwise", {"prompt": [_msg("user", "q")], "chosen": [_msg("user", "2")],
                  "rejected": [_msg("assistant", "3")]}, "chosen[0].role", "'assistant'"),
    ("pairwise", {"chosen": [_msg("user", "q"), _msg("bot", "2")],
                  "rejected": [_msg("user", "q"), _msg("assistant", "3")]}, "chosen[1].role",
     "got 'bot'"),
    ("pairwise", {**PAIR, "label": 2}, "label", "-1 (rejected better), got 2"),
    ("pairwise", {**PAIR, "label": "1"}, "label", "expected a number, got str"),
    ("pairwise", {**PAIR, "margin": True}, "margin", "expected a number, got bool"),
    ("pairwise", {**PAIR, "margin": float("nan")}, "margin", "finite"),
    ("pairwise", {**PAIR, "strength": 4}, "strength", "in [-3, 3]"),
    ("pairwise", {**PAIR, "source": 3}, "source", "expected a string"),
    ("pairwise", {**PAIR, "context": "c", "principle": "p"}, "context", "give one"),
    ("listwise", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking",
     "permutation of 0..1"),
    ("listwise", {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}, "ranking",
     "permutation"),
    ("listwise", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1],
                  "scores": [1, 2]}, "ranking", "exactly one"),
    ("listwise", {"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "scores",
     "list of 2 numbers"),
    ("listwise", {"prompt": "p", "responses": ["a"], "scores": [1]}, "responses",
     "at least 2"),
    ("listwise", {"prompt": "p", "responses": ["a", 5], "scores": [1, 2]}, "responses[1]",
     "got int"),
    ("rated", {"prompt": "p", "response": "r", "scores": {"helpfulness": "high"}},
     "scores.helpfulness", "expected a number"),
    ("rated", {"prompt": "p", "response": "r", "scores": [3]}, "scores", "expected an object"),
    ("rated", {"prompt": "p", "response": "r"}, "scores", "no score for any"),
    ("rated", [1], None, "expected a JSON object"),
])
def test_validate_preference_errors(kind, record, field, text):
  with pytest.raises(data.RecordError) as e:
    data.validate_preference(record, "f.jsonl line 7", kind=kind, attributes=("helpfulness",))
  msg = str(e.value)
  assert msg.startswith("f.jsonl line 7") and text in msg and "skip_malformed" in msg
  assert e.value.field == field
  if field:
    assert f"field '{field}'" in msg


# --- the pipeline --------------------------------------------------------------------------


def test_default_config():
  cfg = data.default_preference_data_config()
  assert "packing" not in cfg and "arithmetic" not in cfg
  assert (cfg.context_template, cfg.min_response_tokens, cfg.max_responses, cfg.truncate_lists,
          cfg.attributes, cfg.sources, cfg.users, cfg.subsets, cfg.languages, cfg.truncation) == (
              "{context}\n\n{prompt}", 8, 4, False, (), (), (), (), (), "right")
  assert cfg.preference.to_dict() == dict(prompt_len=4, min_len=4, max_len=8, min_gap=1,
                                          num_responses=4, length_bias=False,
                                          num_records=1_000_000, eval_fraction=0.1,
                                          hits="uniform")
  new = {"context_template", "min_response_tokens", "max_responses", "truncate_lists",
         "attributes", "sources", "users", "subsets", "languages", "preference",
         "extra_fields", "extra_responses", "contrast_instructions", "contrast_template",
         "pairs_from_list", "pairs_min_gap", "pairs_max", "reward_augmented",
         "reward_augmented_template", "strength_filter", "strength_tau"}
  assert set(cfg) == set(data.default_data_config()) - {"packing", "arithmetic"} | new


def test_pairwise_rows(tmp_path):
  rows = _pairs(10)
  f = _write_jsonl(tmp_path / "d.jsonl", rows)
  batches = list(_iter(_cfg(f, shuffle=False), seq_len=12, batch=4, num_epochs=1))
  assert len(batches) == 3
  seen = []
  for b in batches:
    _check_format(b, "pairwise", 4, 2, 12)
    for (chosen, c_resp), (rejected, r_resp) in _texts(b)[:int(b["example_mask"].sum())]:
      seen.append((chosen, rejected))
      assert c_resp == chosen.split("=")[1] and c_resp.endswith("<eos>")
      assert r_resp == rejected.split("=")[1] and r_resp.endswith("<eos>")
  assert seen == [(f"<bos>{r['prompt']}{r['chosen']}<eos>",
                   f"<bos>{r['prompt']}{r['rejected']}<eos>") for r in rows]
  b = batches[0]
  np.testing.assert_array_equal(b["tokens"][0, 0], [1] + TOK.encode("0+0=0") + [2] + [0] * 5)
  np.testing.assert_array_equal(b["response_mask"][0, 0], [0] * 5 + [1, 1] + [0] * 5)
  np.testing.assert_array_equal(b["length"][0], [2, 2])
  np.testing.assert_array_equal(batches[-1]["example_mask"], [1, 1, 0, 0])  # filler rows
  assert np.all(batches[-1]["segment_ids"][2:] == 0)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_conversational_pairs_hf_tokenizer(tmp_path, shared_prefix):
  tok = data.Tokenizer.from_dir(os.path.join(FIXTURES, "qwen2"))
  prompt = [_msg("system", "Be terse."), _msg("user", "What is 2+3?"),
            _msg("assistant", "5"), _msg("user", "And 4+4?")]
  chosen, rejected = [_msg("assistant", "8")], [_msg("assistant", "It is nine.")]
  if shared_prefix:  # TRL: no "prompt"; chosen/rejected repeat the conversation
    record = {"chosen": prompt + chosen, "rejected": prompt + rejected}
  else:
    record = {"prompt": prompt, "chosen": prompt + chosen, "rejected": rejected}
  f = _write_jsonl(tmp_path / "c.jsonl", [record])
  b = next(_iter(_cfg(f), seq_len=96, batch=1, tok=tok))
  _check_format(b, "pairwise", 1, 2, 96, tok=tok)
  head = tok.apply_chat_template(prompt, add_generation_prompt=True)
  for j, resp in enumerate([chosen, rejected]):
    full, response = _texts(b, tok)[0][j]
    assert full == tok.apply_chat_template(prompt + resp)
    assert response == "".join(full.rsplit(head, 1)) == resp[0]["content"] + "<|im_end|>\n"
    n_prompt = len(tok.encode(head))
    np.testing.assert_array_equal(b["tokens"][0, j, :n_prompt], tok.encode(head))
    assert b["response_mask"][0, j, :n_prompt].sum() == 0
  assert b["length"][0, 0] < b["length"][0, 1]


def test_optional_fields(tmp_path):
  rows = [{**PAIR, "margin": 0.5, "strength": 3, "label": -1, "source": "hh", "user_id": "u2",
           "subset": "chat", "language": "fr"},
          {**PAIR, "label": 0, "source": "uf", "user_id": 5, "subset": "math"},
          {**PAIR, "source": "hh", "user_id": "u1", "subset": "chat", "language": "en"}]
  f = _write_jsonl(tmp_path / "d.jsonl", rows)
  cfg = _cfg(f, shuffle=False, sources=("uf", "hh"), users=("u1", "u2", "5"))
  it = _iter(cfg, batch=3, split="eval", num_epochs=1)
  b = next(it)
  np.testing.assert_array_equal(b["margin"], [0.5, 0, 0])
  np.testing.assert_array_equal(b["strength"], [3, 1, 1])
  np.testing.assert_array_equal(b["label"], [-1, 0, 1])
  np.testing.assert_array_equal(b["source_id"], [1, 0, 1])
  np.testing.assert_array_equal(b["user_id"], [1, 2, 0])
  # Empty subsets/languages: read from the eval files (sorted; "" for records without one).
  assert it.vocabularies == {"source": ("uf", "hh"), "user_id": ("u1", "u2", "5"),
                             "subset": ("chat", "math"), "language": ("", "en", "fr")}
  np.testing.assert_array_equal(b["subset_id"], [0, 1, 0])
  np.testing.assert_array_equal(b["language_id"], [2, 0, 1])
  # Given vocabularies are used as they are; the train split reads nothing from the files.
  it = _iter(_cfg(f, shuffle=False, subsets=("math", "chat")), batch=3)
  b = next(it)
  np.testing.assert_array_equal(b["subset_id"], [1, 0, 1])
  np.testing.assert_array_equal(b["source_id"], [0, 0, 0])  # empty data.sources: all 0
  np.testing.assert_array_equal(b["language_id"], [0, 0, 0])
  assert it.vocabularies["language"] == () and it.vocabularies["source"] == ()
  with pytest.raises(data.RecordError, match=r"d.jsonl line 2, field 'source': 'uf' is not in "
                     r"data.sources \(data.sources = 'hh'\)"):
    list(_iter(_cfg(f, shuffle=False, sources=("hh",)), batch=1, num_epochs=1))
  with pytest.raises(data.RecordError, match=r"line 2, field 'language': missing"):
    list(_iter(_cfg(f, shuffle=False, languages=("en", "fr")), batch=1, num_epochs=1))


def test_context_template(tmp_path):
  rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "context": "add"},
          {"prompt": "2+2=", "chosen": "4", "rejected": "5", "principle": "be right"},
          {"prompt": [_msg("system", "s"), _msg("user", "3+3")],
           "chosen": [_msg("assistant", "6")], "rejected": [_msg("assistant", "7")],
           "context": "sum"}]
  f = _write_jsonl(tmp_path / "d.jsonl", rows)
  texts = _texts(next(_iter(_cfg(f, shuffle=False), seq_len=48, batch=3)))
  assert texts[0][0][0] == "<bos>add\n\n1+1=2<eos>" and texts[0][0][1] == "2<eos>"
  assert texts[1][1][0] == "<bos>be right\n\n2+2=5<eos>"
  assert texts[2][0][0] == "system: s\nuser: sum\n\n3+3\nassistant: 6\n"
  assert texts[2][0][1] == "6\n"
  cfg = _cfg(f, shuffle=False, context_template="{context}: {prompt}")
  assert _texts(next(_iter(cfg, seq_len=48, batch=3)))[0][0][0] == "<bos>add: 1+1=2<eos>"
  for bad in ("{prompt}", "{context} {prompt} {x}", "{context} {prompt"):
    with pytest.raises(ValueError, match="context_template"):
      _iter(_cfg(f, context_template=bad))


def test_truncation(tmp_path):
  # prompt: bos + 10 characters = 11 tokens; chosen 2 + eos = 3; rejected 7 + eos = 8.
  f = _write_jsonl(tmp_path / "d.jsonl", [
      {"prompt": "123456789=", "chosen": "12", "rejected": "1234567"}])
  it = _iter(_cfg(f, min_response_tokens=4), seq_len=12)
  b = next(it)
  # The prompt is cut from the left to leave room for 4 response tokens; then responses are cut.
  assert _texts(b)[0] == [("3456789=12<eos>", "12<eos>"), ("3456789=1234", "1234")]
  assert it.stats.truncated >= 1
  # Responses no longer than min_response_tokens stay whole: only the prompt gives way.
  b = next(_iter(_cfg(f, min_response_tokens=8), seq_len=12))
  assert _texts(b)[0] == [("789=12<eos>", "12<eos>"), ("789=1234567<eos>", "1234567<eos>")]
  # The prompt keeps at least one token.
  b = next(_iter(_cfg(f, min_response_tokens=100), seq_len=6))
  assert _texts(b)[0] == [("=12<eos>", "12<eos>"), ("=12345", "12345")]
  # A prompt that leaves room for min_response_tokens is kept whole.
  b = next(_iter(_cfg(f, min_response_tokens=2), seq_len=14))
  assert _texts(b)[0][1] == ("<bos>123456789=123", "123")
  it = _iter(_cfg(f), seq_len=20)
  next(it)
  assert it.stats.truncated == 0
  with pytest.raises(data.RecordError, match=r"d.jsonl line 1: 19 tokens \(prompt 11 \+ "
                     r"longest response 8\) exceed seq_len=12"):
    next(_iter(_cfg(f, truncation="error"), seq_len=12))
  with pytest.raises(ValueError, match="data.truncation"):
    _iter(_cfg(f, truncation="left"))


def test_preference_rows_rule():
  prompt, short, long = list(range(10, 20)), [1, 2], [1, 2, 3, 4, 5, 6, 7, 8]
  rows, truncated = data.preference_rows(prompt, [short, long], seq_len=12, pad_id=0,
                                         min_response_tokens=4)
  assert truncated
  np.testing.assert_array_equal(rows["tokens"][0], prompt[-8:] + short + [0, 0])
  np.testing.assert_array_equal(rows["tokens"][1], prompt[-8:] + long[:4])
  np.testing.assert_array_equal(rows["length"], [2, 4])
  # Responses no longer than min_response_tokens are kept whole (the prompt gives way).
  rows, _ = data.preference_rows(prompt, [short, long[:5]], seq_len=12, pad_id=0,
                                 min_response_tokens=8)
  np.testing.assert_array_equal(rows["tokens"][1], prompt[-7:] + long[:5])
  # A short prompt is kept whole; responses take the rest.
  rows, _ = data.preference_rows(prompt[:3], [long * 2], seq_len=12, pad_id=0,
                                 min_response_tokens=4)
  np.testing.assert_array_equal(rows["tokens"][0], prompt[:3] + (long * 2)[:9])
  # The prompt keeps at least one token; an empty prompt leaves position 0 unpredicted.
  rows, _ = data.preference_rows(prompt, [long * 2], seq_len=12, pad_id=0,
                                 min_response_tokens=100)
  np.testing.assert_array_equal(rows["tokens"][0], prompt[-1:] + (long * 2)[:11])
  rows, truncated = data.preference_rows([], [short], seq_len=4, pad_id=0, num_rows=3)
  assert not truncated and rows["tokens"].shape == (3, 4)
  np.testing.assert_array_equal(rows["response_mask"][0], [0, 1, 0, 0])
  assert rows["segment_ids"][1:].sum() == 0


@pytest.mark.parametrize("line, field, text", [
    ('{"prompt": "1+1=", "chosen": "2"', None, "invalid JSON"),
    ('{"prompt": "1+1=", "chosen": "2"}', "rejected", "missing"),
    ('{"prompt": "1+1=", "chosen": "2", "rejected": 3}', "rejected", "got int"),
    ('{"prompt": "1+1=", "chosen": "2", "rejected": "3", "label": 5}', "label", "got 5"),
])
def test_malformed_jsonl(tmp_path, line, field, text):
  rows = _pairs(2) + [line] + _pairs(3, 2)
  f = _write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(data.RecordError) as e:
    list(_iter(_cfg(f, shuffle=False), batch=1, num_epochs=1))
  msg = str(e.value)
  assert f"{f} line 3" in msg and text in msg and "skip_malformed" in msg
  if field:
    assert f"field '{field}'" in msg
  it = _iter(_cfg(f, shuffle=False, skip_malformed=True), batch=1, num_epochs=1)
  assert len(list(it)) == 5
  assert it.stats.skipped_malformed == 1 and it.stats.examples == 5


def test_malformed_listwise_file(tmp_path):
  rows = [{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
          {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]}]
  f = _write_jsonl(tmp_path / "l.jsonl", rows)
  with pytest.raises(data.RecordError, match=r"l.jsonl line 2, field 'ranking': expected a "
                     r"permutation of 0..2"):
    list(_iter(_cfg(f, shuffle=False), kind="listwise", batch=1, num_epochs=1))


def test_identical_pairs_counted(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", _pairs(3) + [{"prompt": "a", "chosen": "b",
                                                        "rejected": "b"}])
  it = _iter(_cfg(f), batch=4, num_epochs=1)
  b = next(it)
  assert it.stats.identical_pairs == 1 and it.stats.examples == 4
  assert b["example_mask"].sum() == 4


def test_listwise(tmp_path):
  rows = [{"prompt": "p=", "responses": ["a", "bb", "c"], "ranking": [0, 2, 1]},
          {"prompt": "q=", "responses": ["x", "y", "z", "w"], "scores": [0.5, 2, 2, -1]},
          {"prompt": "r=", "responses": ["a", "b", "c", "d", "e", "f"],
           "scores": [1, 6, 2, 5, 3, 4]}]
  f = _write_jsonl(tmp_path / "l.jsonl", rows)
  with pytest.raises(data.RecordError, match="6 responses exceed data.max_responses=4"):
    list(_iter(_cfg(f, shuffle=False), kind="listwise", batch=3, num_epochs=1))
  it = _iter(_cfg(f, shuffle=False, truncate_lists=True), kind="listwise", batch=4,
             num_epochs=1)
  b = next(it)
  _check_format(b, "listwise", 4, 4, 16)
  np.testing.assert_array_equal(b["n"], [3, 4, 4, 0])
  np.testing.assert_array_equal(b["valid"][:3], [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(b["scores"][0], [3, 1, 2, 0])  # from the ranking: n - rank
  np.testing.assert_array_equal(b["order"][0], [0, 2, 1, 1])  # padded with the worst valid
  np.testing.assert_array_equal(b["scores"][1], [0.5, 2, 2, -1])
  np.testing.assert_array_equal(b["order"][1], [1, 2, 0, 3])  # ties keep index order
  np.testing.assert_array_equal(b["scores"][2], [6, 5, 3, 4])  # the best 4, in record order
  np.testing.assert_array_equal(b["order"][2], [0, 1, 3, 2])
  texts = _texts(b)
  assert [r for _, r in texts[0]] == ["a<eos>", "bb<eos>", "c<eos>", ""]
  assert [t for t, _ in texts[2]] == [f"<bos>r={c}<eos>" for c in "bdef"]
  assert b["segment_ids"][0, 3].sum() == 0 and b["example_mask"][3] == 0
  assert it.stats.truncated_lists == 1


def test_rated(tmp_path):
  rows = [{"prompt": "p=", "response": "ab", "scores": {"helpfulness": 3, "verbosity": 1}},
          {"prompt": "q=", "response": "c", "helpfulness": 2.5, "coherence": 4},
          {"prompt": [_msg("user", "hi")], "response": [_msg("assistant", "yo")],
           "scores": {"verbosity": 0, "helpfulness": None}}]
  f = _write_jsonl(tmp_path / "r.jsonl", rows)
  with pytest.raises(ValueError, match="data.attributes"):
    _iter(_cfg(f), kind="rated")
  cfg = _cfg(f, shuffle=False, attributes=("helpfulness", "verbosity"))
  b = next(_iter(cfg, kind="rated", seq_len=24, batch=3))
  _check_format(b, "rated", 3, 1, 24, num_attributes=2)
  np.testing.assert_array_equal(b["targets"], [[3, 1], [2.5, 0], [0, 0]])
  np.testing.assert_array_equal(b["target_mask"], [[1, 1], [1, 0], [0, 1]])
  texts = _texts(b)
  assert texts[0][0] == ("<bos>p=ab<eos>", "ab<eos>")
  assert texts[2][0] == ("user: hi\nassistant: yo\n", "yo\n")


def test_seed_determinism_and_epochs(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", _pairs(20))
  cfg = _cfg(f)
  take = lambda seed: [next(it) for it in [_iter(cfg, seed=seed)] for _ in range(10)]
  a, b, c = take(0), take(0), take(1)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  chosen = [t for x in a for (t, _), _ in _texts(x)]
  everything = sorted(f"<bos>{r['prompt']}{r['chosen']}<eos>" for r in _pairs(20))
  assert sorted(chosen[:20]) == sorted(chosen[20:]) == everything
  assert chosen[:20] != chosen[20:]  # reshuffled per epoch


def test_per_host_sharding(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", _pairs(22))
  cfg = _cfg(f)
  hosts = []
  for pi in range(2):
    batches = list(_iter(cfg, batch=4, pi=pi, pc=2, num_epochs=1))
    assert len(batches) == 6 and batches[0]["tokens"].shape == (2, 2, 16)
    hosts.append([t for b in batches for ((t, _), _), m in zip(_texts(b), b["example_mask"])
                  if m])
  assert not set(hosts[0]) & set(hosts[1])
  assert sorted(hosts[0] + hosts[1]) == sorted(f"<bos>{r['prompt']}{r['chosen']}<eos>"
                                               for r in _pairs(22))
  with pytest.raises(ValueError, match="not divisible"):
    _iter(cfg, batch=5, pc=2)


@pytest.mark.parametrize("kind", ["pairwise", "listwise"])
def test_state_restore(kind):
  cfg = _cfg(synthetic="preference")
  cfg.preference.num_records = 50
  it = _iter(cfg, kind=kind, batch=4)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable (grain checkpoint)
  want = [next(it) for _ in range(30)]  # crosses epoch boundaries
  it2 = _iter(cfg, kind=kind, batch=4)
  it2.set_state(state)
  _assert_batches_equal(want, [next(it2) for _ in range(30)])


def test_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  cfg = _cfg(synthetic="preference")
  it = _iter(cfg)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  it2 = _iter(cfg)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  _assert_batches_equal(want, [next(it2) for _ in range(4)])
  mngr.close()


@pytest.mark.parametrize("kind", ["pairwise", "listwise", "rated"])
def test_finite_pass_keeps_every_example(kind):
  cfg = _cfg(synthetic="preference", attributes=("score",))
  cfg.preference.num_records = 11
  batches = list(_iter(cfg, kind=kind, batch=4, split="eval", num_epochs=1))
  assert len(batches) == 3
  k = {"pairwise": 2, "listwise": 4, "rated": 1}[kind]
  for b in batches:
    _check_format(b, kind, 4, k, 16, num_attributes=1)
  np.testing.assert_array_equal(batches[-1]["example_mask"], [1, 1, 1, 0])
  src = data.PreferenceSource(0, "eval", kind=kind, num_records=11)
  got = [t for b in batches for row, m in zip(_texts(b), b["example_mask"]) if m
         for t, _ in row if t]
  want = [f"<bos>{p}{r}<eos>" for i in range(11) for p, rs, _ in [src.example(i)] for r in rs]
  assert got == want


# --- the synthetic preference task ---------------------------------------------------------


def test_true_score():
  assert data.true_score("kbqe=", "xkaeb") == 3
  assert data.true_score("kbqe=", "xyz") == 0
  assert data.true_score("kbqe=", "kkkk") == 1  # repeats earn nothing


def test_synthetic_pairs():
  src = data.PreferenceSource(0, "train")
  lengths = []
  for i in range(2000):
    r = src[i]
    word = r["prompt"][:-1]
    assert r["prompt"].endswith("=") and len(set(word)) == len(word) == 4
    for resp in (r["chosen"], r["rejected"]):
      assert 4 <= len(resp) <= 8 and len(set(resp)) == len(resp) and resp.isalpha()
    assert data.true_score(r["prompt"], r["chosen"]) >= data.true_score(r["prompt"],
                                                                        r["rejected"]) + 1
    lengths.append(np.sign(len(r["chosen"]) - len(r["rejected"])))
  # Unbiased: length says nothing about which response is chosen.
  assert 0.35 < np.mean(np.array(lengths) > 0) < 0.45 and abs(np.mean(lengths)) < 0.05
  assert src[7] == data.PreferenceSource(0, "train")[7] != data.PreferenceSource(1, "train")[7]
  gap2 = data.PreferenceSource(0, "train", min_gap=2)
  assert all(data.true_score(r["prompt"], r["chosen"]) - data.true_score(r["prompt"],
             r["rejected"]) >= 2 for r in map(gap2.__getitem__, range(200)))


def test_synthetic_length_bias():
  src = data.PreferenceSource(0, "train", length_bias=True)
  for i in range(1000):
    r = src[i]
    assert len(r["chosen"]) > len(r["rejected"])
    assert data.true_score(r["prompt"], r["chosen"]) > data.true_score(r["prompt"],
                                                                       r["rejected"])
  lw = data.PreferenceSource(0, "train", kind="listwise", length_bias=True)
  for i in range(300):
    r = lw[i]
    by_score = sorted(zip(r["scores"], map(len, r["responses"])))
    assert all(a[1] <= b[1] for a, b in zip(by_score, by_score[1:]) if a[0] < b[0])
  with pytest.raises(ValueError, match="length_bias"):
    data.PreferenceSource(0, "train", kind="rated", length_bias=True)


def test_synthetic_split_disjoint_and_eval_examples():
  train = {data.PreferenceSource(s, "train")[i]["prompt"] for s in (0, 1) for i in range(3000)}
  evals = data.preference_eval_examples(300, seed=0, k=5)
  assert evals == data.preference_eval_examples(300, seed=0, k=5)
  assert not train & {p for p, _, _ in evals}
  for prompt, responses, scores in evals:
    assert len(responses) == 5 and scores == [data.true_score(prompt, r) for r in responses]
  lw = data.PreferenceSource(0, "eval", kind="listwise")[3]
  assert lw["scores"] == [data.true_score(lw["prompt"], r) for r in lw["responses"]]
  rated = data.PreferenceSource(0, "train", kind="rated")[3]
  assert rated["scores"] == {"score": data.true_score(rated["prompt"], rated["response"]),
                             "length": len(rated["response"])}


def test_synthetic_pipeline_and_kinds():
  cfg = _cfg(synthetic="preference")
  b = next(_iter(cfg, batch=8))
  _check_format(b, "pairwise", 8, 2, 16)
  for (chosen, c), (_, r) in _texts(b, skip_special_tokens=True):
    prompt = chosen[:chosen.index("=") + 1]
    assert data.true_score(prompt, c) > data.true_score(prompt, r)
  with pytest.raises(ValueError, match="makes sft/pairwise records, not listwise"):
    _iter(_cfg(synthetic="arithmetic"), kind="listwise")
  b = next(_iter(_cfg(synthetic="arithmetic"), batch=8))   # near-miss pairs
  for (chosen, c), (_, r) in _texts(b, skip_special_tokens=True):
    a, x = chosen[:chosen.index("=")].split("+")
    assert c == str(int(a) + int(x)) and r != c and len(r) == len(c)
  sft_cfg = data.default_data_config()
  sft_cfg.synthetic = "preference"
  # The letters task also makes SFT records (a base policy for RL on it).
  batch = next(data.make_sft_iterator(sft_cfg, TOK, seq_len=16, global_batch_size=2, seed=0,
                                      process_index=0, process_count=1))
  assert batch["tokens"].shape == (2, 16) and batch["loss_mask"].sum() > 0
  with pytest.raises(ValueError, match="unknown synthetic task"):
    _iter(_cfg(synthetic="sorting"))
  with pytest.raises(ValueError, match="kind must be one of"):
    _iter(cfg, kind="pointwise")
  with pytest.raises(ValueError, match="packing"):
    c = _cfg(synthetic="preference")
    c.packing = True
    _iter(c)


def test_pairs_from_list_and_reward_augmented_in_the_pipeline(tmp_path):
  """Listwise records become best/worst pairs (ties give none); reward_augmented then adds
  the score-conditioned reverse pair."""
  lists = [{"prompt": "ab=", "responses": ["x", "ab", "a"], "scores": [0, 2, 1]},
           {"prompt": "cd=", "responses": ["c", "d"], "scores": [1, 1]},       # tie: no pair
           {"prompt": "ef=", "responses": ["e", "f", "ef"], "scores": [1, 0, 2]}]
  f = _write_jsonl(tmp_path / "lists.jsonl", lists)
  cfg = _cfg(train_files=f, shuffle=False, pairs_from_list="best_worst")
  it = _iter(cfg, batch=2, num_epochs=1)
  texts = [t for b in it for t in _texts(b, skip_special_tokens=True)][:2]
  assert [(c, r) for (c, _), (r, _) in texts] == [("ab=ab", "ab=x"), ("ef=ef", "ef=f")]
  assert it.stats.empty_lists == 1 and it.stats.examples == 2
  cfg = _cfg(train_files=f, shuffle=False, pairs_from_list="all_pairs", reward_augmented=True)
  it = _iter(cfg, batch=2, num_epochs=1, seq_len=32)
  pairs = [(c, r) for b in it for (c, _), (r, _) in _texts(b, skip_special_tokens=True)
           if c]
  # 3 + 3 ordered pairs, each giving 2 conditioned pairs.
  assert len(pairs) == 12 and it.stats.examples == 12
  assert ("target score: 2\nab=ab", "target score: 2\nab=x") in pairs
  assert ("target score: 0\nab=x", "target score: 0\nab=ab") in pairs
  assert ("target score: 1\nab=a", "target score: 1\nab=ab") in pairs
  with pytest.raises(ValueError, match="pairwise batches"):
    _iter(_cfg(train_files=f, pairs_from_list="best_worst"), kind="listwise")


def test_strength_filter_in_the_pipeline(tmp_path):
  """data.strength_filter keeps the pairs whose pref_strength margin passes the threshold."""
  rows = [dict(r, margin=m, margin_std=0.5) for r, m in zip(_pairs(4), [1.0, -0.2, 0.3, 2.0])]
  f = _write_jsonl(tmp_path / "s.jsonl", rows)
  it = _iter(_cfg(train_files=f, shuffle=False, strength_filter="threshold", strength_tau=0.5),
             batch=2, num_epochs=1)
  kept = [b["margin"][b["example_mask"] > 0] for b in it]
  np.testing.assert_allclose(np.concatenate(kept), [1.0, 2.0])
  assert it.stats.empty_lists == 2
  it = _iter(_cfg(train_files=f, shuffle=False, strength_filter="snr", strength_tau=0.5),
             batch=2, num_epochs=1)
  np.testing.assert_allclose(np.concatenate([b["margin"][b["example_mask"] > 0] for b in it]),
                             [1.0, 0.3, 2.0])
