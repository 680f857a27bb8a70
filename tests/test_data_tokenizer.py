"""alignjax.data.Tokenizer against Hugging Face reference ids / chat templates (third_party)."""

import json
import os
import shutil

import numpy as np
import pytest

from alignjax import data

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "third_party", "hf_fixtures")
REFERENCE = os.path.join(FIXTURES, "tokenizer_reference.json")
TOKENIZER_DIRS = ["", "llama", "qwen2", "qwen3"]

pytestmark = pytest.mark.skipif(not os.path.isfile(REFERENCE),
                                reason="third_party/hf_fixtures not generated")


@pytest.fixture(scope="module")
def ref():
  with open(REFERENCE, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module", params=TOKENIZER_DIRS)
def tok(request):
  return data.Tokenizer.from_dir(os.path.join(FIXTURES, request.param))


def test_special_ids(tok, ref):
  assert tok.vocab_size == ref["vocab_size"]
  assert tok.eos_id == ref["eos_token_id"]
  assert tok.pad_id == ref["pad_token_id"]
  assert tok.bos_id == ref["bos_token_id"]
  assert not tok.add_bos_token
  for token, idx in ref["special_tokens"].items():
    assert tok.encode(token) == [idx]


def test_encode_decode_match_reference(tok, ref):
  assert ref["encode_kwargs"] == {"add_special_tokens": False}
  for e in ref["encodings"]:
    assert tok.encode(e["text"]) == e["ids"], e["text"]
    assert tok.decode(e["ids"], skip_special_tokens=False) == e["decoded"]
    if e["roundtrip"]:
      assert e["decoded"] == e["text"]
  inline = [e for e in ref["encodings"] if "<|im_start|>" in e["text"]][0]
  assert "<|im_start|>" not in tok.decode(inline["ids"])  # skip_special_tokens=True default


def test_chat_template_matches_reference(tok, ref):
  assert ref["chat_template"]
  for case in ref["chat_template"]:
    text = tok.apply_chat_template(case["messages"],
                                   add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"], case["name"]
    assert tok.encode(text) == case["ids"], case["name"]


def test_conversational_masks_with_chatml(tok, ref):
  """Only assistant turns (content + <|im_end|>\\n) carry loss."""
  case = [c for c in ref["chat_template"] if c["messages"][-1]["role"] == "assistant"][0]
  record = data.validate_sft({"messages": case["messages"]}, "t")
  tokens, mask = data.tokenize_sft(record, tok)
  assert tokens.tolist() == case["ids"]  # Piecewise encoding == encoding the full render.
  answer = case["messages"][-1]["content"] + "<|im_end|>\n"
  assert tok.decode(tokens[mask > 0], skip_special_tokens=False) == answer


def test_multi_turn_masks(tok):
  msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  tokens, mask = data.tokenize_sft(data.validate_sft({"messages": msgs}, "t"), tok)
  assert tok.decode(tokens[mask > 0], skip_special_tokens=False) == (
      "2<|im_end|>\n4<|im_end|>\n")
  # TRL conversational prompt/completion: assistant turns inside the prompt are context.
  rec = data.validate_sft({"prompt": msgs[:3], "completion": msgs[3:]}, "t")
  tokens2, mask2 = data.tokenize_sft(rec, tok)
  np.testing.assert_array_equal(tokens, tokens2)
  assert tok.decode(tokens2[mask2 > 0], skip_special_tokens=False) == "4<|im_end|>\n"


def _copy_fixture(tmp_path, config_update=None):
  d = tmp_path / "tok"
  d.mkdir()
  shutil.copy(os.path.join(FIXTURES, "tokenizer.json"), d / "tokenizer.json")
  with open(os.path.join(FIXTURES, "tokenizer_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(config_update or {})
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return d


def test_missing_directory_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*tokenizer.json"):
    data.Tokenizer.from_dir(tmp_path / "nope")
  d = _copy_fixture(tmp_path)
  os.remove(d / "tokenizer_config.json")
  with pytest.raises(FileNotFoundError, match=r"tokenizer_config.json not found"):
    data.Tokenizer.from_dir(d)


def test_no_chat_template(tmp_path):
  tok = data.Tokenizer.from_dir(_copy_fixture(tmp_path, {"chat_template": None}))
  with pytest.raises(ValueError, match="no chat template; set 'chat_template'"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_token_dicts_bos_and_template_features(tmp_path):
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
              "{{ raise_exception('no tools') }}{% endif %}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% else %}"
              "{{ m['content'] }}{% endif %}{% endfor %}")
  d = _copy_fixture(tmp_path, {"bos_token": {"content": "<|endoftext|>", "special": True},
                               "eos_token": {"content": "<|im_end|>"}, "pad_token": None,
                               "add_bos_token": True, "chat_template": template})
  tok = data.Tokenizer.from_dir(d)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (381, 383, 383)  # pad falls back to eos
  assert tok.add_bos_token and tok.encode("a", add_bos=True)[0] == 381
  msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  assert tok.apply_chat_template(msgs) == '<|endoftext|>q"a"'
  with pytest.raises(Exception, match="no tools"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_char_tokenizer():
  tok = data.CharTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 3 + len(data.tokenizer.DEFAULT_ALPHABET) < 64
  ids = tok.encode("12+3=15", add_bos=True)
  assert ids[0] == 1 and tok.decode(ids + [2, 0]) == "12+3=15"
  assert tok.decode([1, 4, 2], skip_special_tokens=False) == "<bos>1<eos>"
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                 add_generation_prompt=True) == "user: hi\nassistant: "
  with pytest.raises(ValueError, match="not in the alphabet"):
    tok.encode("A")


def test_non_incremental_template_is_a_record_error(tmp_path):
  """Templates that render earlier assistant turns differently (e.g. Qwen3 dropping <think>)."""
  template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
              "[old]{% endif %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}")
  tok = data.Tokenizer.from_dir(_copy_fixture(tmp_path, {"chat_template": template}))
  one = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  tokens, mask = data.tokenize_sft(data.validate_sft({"messages": one}, "w"), tok)
  assert tok.decode(tokens[mask > 0]) == "a;"
  two = one + [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
  with pytest.raises(data.RecordError, match=r"w, field 'messages\[1\]'.*incrementally"):
    data.tokenize_sft(data.validate_sft({"messages": two}, "w"), tok, "w")
