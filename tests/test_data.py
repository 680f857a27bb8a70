"""alignjax.data: records, sources, the SFT grain pipeline, synthetic tasks."""

import json

import grain
import numpy as np
import pytest

from alignjax import data

TOK = data.CharTokenizer()
KEYS = {"tokens": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
        "positions": np.int32}


def _records(n, start=0):
  return [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(start, start + n)]


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _cfg(files="", **kw):
  cfg = data.default_data_config()
  cfg.train_files = files
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def _iter(cfg, seq_len=16, batch=4, seed=0, pi=0, pc=1, **kw):
  return data.make_sft_iterator(cfg, TOK, seq_len=seq_len, global_batch_size=batch, seed=seed,
                                process_index=pi, process_count=pc, **kw)


def _segments(batch):
  """Yields (tokens, loss_mask) of every segment of every row."""
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      assert idx.size and np.all(np.diff(idx) == 1), "segment not contiguous"
      np.testing.assert_array_equal(batch["positions"][r, idx], np.arange(idx.size))
      yield batch["tokens"][r, idx], batch["loss_mask"][r, idx]


def _check_format(batch, rows, seq_len):
  assert set(batch) == set(KEYS)
  for k, dtype in KEYS.items():
    assert batch[k].shape == (rows, seq_len) and batch[k].dtype == dtype, k
  pad = batch["segment_ids"] == 0
  assert np.all(batch["tokens"][pad] == TOK.pad_id)
  assert np.all(batch["loss_mask"][pad] == 0) and np.all(batch["positions"][pad] == 0)
  assert np.all(batch["loss_mask"][batch["positions"] == 0] == 0)  # first token of segments


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


# --- records -------------------------------------------------------------------------------


def test_validate_sft_forms():
  assert data.validate_sft({"prompt": "a", "completion": "b", "id": 3}, "w") == {
      "prompt": "a", "completion": "b"}
  msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a", "extra": 1}]
  out = data.validate_sft({"messages": msgs}, "w")
  assert out["completion_start"] == 0 and out["messages"][2] == {"role": "assistant",
                                                                  "content": "a"}
  out = data.validate_sft({"prompt": msgs[:2], "completion": msgs[2:]}, "w")
  assert out["completion_start"] == 2 and len(out["messages"]) == 3


@pytest.mark.parametrize("record, field, text", [
    ({"prompt": "a"}, "completion", "missing"),
    ({"prompt": "a", "completion": 3}, "completion", "got int"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "completion",
     "two strings or two message lists"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "got 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "messages[1].content", "missing"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "got null"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant message"),
    ({"prompt": [{"role": "user", "content": "x"}],
      "completion": [{"role": "user", "content": "y"}]}, "completion[0].role", "'assistant'"),
    ([1, 2], None, "expected a JSON object"),
])
def test_validate_sft_errors(record, field, text):
  with pytest.raises(data.RecordError) as e:
    data.validate_sft(record, "f.jsonl line 7")
  msg = str(e.value)
  assert msg.startswith("f.jsonl line 7") and text in msg and "skip_malformed" in msg
  assert e.value.field == field
  if field:
    assert f"field '{field}'" in msg


# --- sources -------------------------------------------------------------------------------


def test_jsonl_source_and_open_source(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", _records(3))
  (tmp_path / "b.jsonl").write_text("\n" + json.dumps(_records(1, 10)[0]) + "\n\n")
  src = data.JsonlSource(a)
  assert len(src) == 3 and src[1] == _records(3)[1] and src.where(2).endswith("a.jsonl line 3")
  for spec in (str(tmp_path / "*.jsonl"), [a, str(tmp_path / "b.jsonl")],
               f"{a},{tmp_path / 'b.jsonl'}"):
    src = data.open_source(spec)
    assert len(src) == 4 and src[3]["prompt"] == "10+10="
    assert src.where(3).endswith("b.jsonl line 2")  # blank lines keep real line numbers
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    data.open_source([a, str(tmp_path / "missing.jsonl")])
  with pytest.raises(FileNotFoundError, match="matches no file"):
    data.open_source(str(tmp_path / "*.parquet"))
  with pytest.raises(ValueError, match="set data.format"):
    data.open_source(_write_jsonl(tmp_path / "c.txt", _records(1)))
  assert len(data.open_source(str(tmp_path / "c.txt"), format="jsonl")) == 1


def test_parquet_source(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = _records(8) + [{"prompt": "1+1=", "completion": None}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
  src = data.open_source(str(tmp_path / "d.parquet"))
  assert len(src) == 9 and src[2] == rows[2]
  it = _iter(_cfg(str(tmp_path / "d.parquet"), shuffle=False), batch=8, num_epochs=1)
  b = next(it)
  assert TOK.decode(b["tokens"][3]) == "3+3=6"
  with pytest.raises(data.RecordError, match=r"d.parquet row 9, field 'completion'"):
    next(it)


def test_array_record_source(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "d.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for r in _records(5):
    writer.write(json.dumps(r).encode())
  writer.close()
  src = data.open_source(path)
  assert len(src) == 5 and src[4] == _records(5)[4] and src.where(0).endswith("record 1")


# --- the SFT pipeline ----------------------------------------------------------------------


def test_default_config_keys():
  cfg = data.default_data_config()
  assert set(cfg) == {"seq_len", "batch_size", "train_files", "eval_files", "format",
                      "packing", "truncation", "skip_malformed", "shuffle", "synthetic",
                      "arithmetic"}
  assert (cfg.format, cfg.packing, cfg.truncation, cfg.skip_malformed, cfg.shuffle,
          cfg.synthetic) == ("auto", False, "right", False, True, "")


@pytest.mark.parametrize("packing", [False, True])
def test_masks_only_on_completion(tmp_path, packing):
  rows = _records(12)
  f = _write_jsonl(tmp_path / "d.jsonl", rows)
  rows_per_batch = 1 if packing else 2  # batch 1: no packed remainder is dropped
  it = _iter(_cfg(f, packing=packing, shuffle=False), seq_len=24, batch=rows_per_batch,
             num_epochs=1)
  seen = []
  for b in it:
    _check_format(b, rows_per_batch, 24)
    for tokens, mask in _segments(b):
      text = TOK.decode(tokens)
      prompt, completion = text.split("=")
      assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
      assert TOK.decode(tokens[mask > 0], skip_special_tokens=False) == completion + "<eos>"
      assert set(mask.tolist()) <= {0.0, 1.0}
      seen.append(text)
  assert sorted(seen) == sorted(r["prompt"] + r["completion"] for r in rows)


def test_padding_rows(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "completion": "3"}])
  b = next(_iter(_cfg(f), seq_len=10, batch=2))
  np.testing.assert_array_equal(b["tokens"][0], [1] + TOK.encode("1+2=3") + [2, 0, 0, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * 7 + [0] * 3)
  np.testing.assert_array_equal(b["positions"][0], list(range(7)) + [0] * 3)
  np.testing.assert_array_equal(b["loss_mask"][0], [0] * 5 + [1, 1] + [0] * 3)


def test_packing_keeps_every_token(tmp_path):
  rows = [{"prompt": "1" * (i % 7), "completion": "2" * (1 + i % 5)} for i in range(30)]
  f = _write_jsonl(tmp_path / "d.jsonl", rows)
  cfg = _cfg(f, packing=True, shuffle=False)
  batches = list(_iter(cfg, seq_len=20, batch=1, num_epochs=1))
  want = sorted(tuple(data.tokenize_sft(r, TOK)[0]) for r in rows)
  got = sorted(tuple(t) for b in batches for t, _ in _segments(b))
  assert got == want
  assert len(batches) < len(rows)  # rows really hold several documents
  assert max(b["segment_ids"].max() for b in batches) > 2
  b = next(_iter(cfg, seq_len=20, batch=4))
  _check_format(b, 4, 20)


def test_truncation(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12345=", "completion": "6789"}])
  full = [1] + TOK.encode("12345=6789") + [2]
  it = _iter(_cfg(f), seq_len=8, batch=1)
  b = next(it)
  np.testing.assert_array_equal(b["tokens"][0], full[:8])
  np.testing.assert_array_equal(b["loss_mask"][0], [0] * 7 + [1])
  assert it.stats.truncated >= 1 and it.stats.examples >= 1
  b = next(_iter(_cfg(f, truncation="left"), seq_len=8, batch=1))
  np.testing.assert_array_equal(b["tokens"][0], full[-8:])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 1, 1, 1, 1, 1])
  with pytest.raises(data.RecordError, match="d.jsonl line 1: 12 tokens exceed seq_len=8"):
    next(_iter(_cfg(f, truncation="error"), seq_len=8, batch=1))
  with pytest.raises(ValueError, match="data.truncation"):
    _iter(_cfg(f, truncation="middle"))


def test_seed_determinism_and_epochs(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", _records(20))
  cfg = _cfg(f)
  take = lambda seed: [next(it) for it in [_iter(cfg, seed=seed)] for _ in range(10)]
  a, b, c = take(0), take(0), take(1)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  # Each epoch (5 batches of 4) covers every record once, reshuffled per epoch.
  texts = [TOK.decode(t) for x in a for t in x["tokens"]]
  everything = sorted(r["prompt"] + r["completion"] for r in _records(20))
  assert sorted(texts[:20]) == sorted(texts[20:]) == everything
  assert texts[:20] != texts[20:]


def test_per_host_sharding(tmp_path):
  f = _write_jsonl(tmp_path / "d.jsonl", _records(24))
  cfg = _cfg(f)
  hosts = []
  for pi in range(2):
    it = _iter(cfg, batch=4, pi=pi, pc=2, num_epochs=1)
    batches = list(it)
    assert len(batches) == 6 and batches[0]["tokens"].shape == (2, 16)
    hosts.append([TOK.decode(t) for b in batches for t in b["tokens"]])
  assert not set(hosts[0]) & set(hosts[1])
  assert sorted(hosts[0] + hosts[1]) == sorted(r["prompt"] + r["completion"] for r in _records(24))
  with pytest.raises(ValueError, match="not divisible"):
    _iter(cfg, batch=5, pc=2)


@pytest.mark.parametrize("packing", [False, True])
def test_state_restore(tmp_path, packing):
  f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1" * (i % 9), "completion": str(i)}
                                          for i in range(40)])
  cfg = _cfg(f, packing=packing)
  it = _iter(cfg, seq_len=24, batch=2)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must be JSON-serialisable (grain checkpoint)
  want = [next(it) for _ in range(30)]  # crosses epoch boundaries
  it2 = _iter(cfg, seq_len=24, batch=2)
  it2.set_state(state)
  _assert_batches_equal(want, [next(it2) for _ in range(30)])


def test_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  cfg = _cfg(synthetic="arithmetic", packing=True)
  it = _iter(cfg, seq_len=32)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  it2 = _iter(cfg, seq_len=32)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  _assert_batches_equal(want, [next(it2) for _ in range(4)])
  mngr.close()


@pytest.mark.parametrize("line, field, text", [
    ('{"prompt": "1+1=", "completion": "2"', None, "invalid JSON"),
    ('{"prompt": "1+1="}', "completion", "missing"),
    ('{"prompt": "1+1=", "completion": 2}', "completion", "got int"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
     "messages[1].role", "got 'bot'"),
])
def test_malformed_jsonl(tmp_path, line, field, text):
  rows = _records(2) + [line] + _records(3, 2)
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


def test_conversational_records(tmp_path):
  rows = [
      {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2"},
                    {"role": "assistant", "content": "3"}, {"role": "user", "content": "2+2"},
                    {"role": "assistant", "content": "4"}]},
      {"prompt": [{"role": "user", "content": "5+5"}, {"role": "assistant", "content": "10"},
                  {"role": "user", "content": "1+1"}],
       "completion": [{"role": "assistant", "content": "2"}]},
  ]
  f = _write_jsonl(tmp_path / "c.jsonl", rows)
  b = next(_iter(_cfg(f, shuffle=False), seq_len=80, batch=2, num_epochs=1))
  _check_format(b, 2, 80)
  t0, m0 = b["tokens"][0], b["loss_mask"][0]
  assert TOK.decode(t0) == "system: add\nuser: 1+2\nassistant: 3\nuser: 2+2\nassistant: 4\n"
  assert TOK.decode(t0[m0 > 0]) == "3\n4\n"
  t1, m1 = b["tokens"][1], b["loss_mask"][1]
  assert TOK.decode(t1[m1 > 0]) == "2\n"


def test_synthetic_arithmetic():
  src = data.ArithmeticSource(0, "train")
  for i in range(50):
    r = src[i]
    a, b = r["prompt"][:-1].split("+")
    assert int(a) + int(b) == int(r["completion"]) and int(a) < 100 and int(b) < 100
  assert src[7] == data.ArithmeticSource(0, "train")[7] != data.ArithmeticSource(1, "train")[7]
  evals = data.arithmetic_eval_examples(200, seed=0)
  assert evals == data.arithmetic_eval_examples(200, seed=0)
  train_prompts = {src[i]["prompt"] for i in range(3000)}
  assert not train_prompts & {p for p, _ in evals}
  ops = data.ArithmeticSource(3, "train", max_digits=3, ops="+-*")
  assert {r["prompt"][-1] for r in map(ops.__getitem__, range(50))} == {"="}
  for i in range(50):
    p, ans = ops.problem(i)
    assert str(eval(p[:-1])) == ans  # pylint: disable=eval-used
  it = _iter(_cfg(synthetic="arithmetic"), seq_len=16, batch=8)
  b = next(it)
  _check_format(b, 8, 16)
  ev = next(_iter(_cfg(synthetic="arithmetic"), seq_len=16, batch=8, split="eval"))
  assert TOK.decode(ev["tokens"][0]) == "".join(data.arithmetic_eval_examples(1, seed=0)[0])
  with pytest.raises(ValueError, match="unknown synthetic task"):
    _iter(_cfg(synthetic="sorting"))


def test_missing_files_config():
  with pytest.raises(ValueError, match="data.train_files is empty"):
    _iter(_cfg(""))
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    _iter(_cfg("/nonexistent/nope.jsonl"))


def test_process_defaults_from_jax():
  it = data.make_sft_iterator(_cfg(synthetic="arithmetic"), TOK, seq_len=16, global_batch_size=2,
                              seed=0)
  assert next(it)["tokens"].shape == (2, 16)  # jax.process_count() == 1 here


@pytest.mark.parametrize("packing", [False, True])
def test_finite_pass_keeps_every_example(tmp_path, packing):
  """num_epochs=1 (evaluation): no example is dropped; the last batch is filled with padding."""
  rows = _records(10)
  cfg = _cfg(_write_jsonl(tmp_path / "d.jsonl", rows), packing=packing, shuffle=False)
  batches = list(_iter(cfg, seq_len=16, batch=4, num_epochs=1))
  for b in batches:
    _check_format(b, 4, 16)
  completions = sorted(TOK.decode(t[m > 0]) for b in batches for t, m in _segments(b))
  assert completions == sorted(r["completion"] for r in rows)
  if not packing:
    assert len(batches) == 3 and np.all(batches[-1]["segment_ids"][2:] == 0)
