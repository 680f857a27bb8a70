"""Tokenizers: a local Hugging Face `tokenizer.json` directory, and a tiny character tokenizer.

Both share one interface:

    vocab_size, pad_id, eos_id, bos_id (or None), add_bos_token
    encode(text, add_bos=False) -> list[int]        # no special tokens except the optional bos
    decode(ids, skip_special_tokens=True) -> str
    apply_chat_template(messages, add_generation_prompt=False, **kw) -> str

Nothing is downloaded: `Tokenizer.from_dir` reads files from a local directory only.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]


def _token_str(value: Any) -> str | None:
  """A special token given as a string, or as an AddedToken dict with "content"."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:
    return value["content"]
  raise ValueError(f"special token must be a string or a dict with 'content', got {value!r}")


class _GenerationTag(jinja2.ext.Extension):
  """Accepts HF's `{% generation %}...{% endgeneration %}` blocks and renders their body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
  """Compiles a chat template the way Hugging Face transformers does (sandboxed jinja2)."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


class Tokenizer:
  """A Hugging Face fast tokenizer loaded from a local directory.

  The directory must hold `tokenizer.json` (read with the `tokenizers` library) and
  `tokenizer_config.json` (fields `chat_template`, `eos_token`, `pad_token`, `bos_token`,
  `add_bos_token`). A `chat_template.jinja` file, if present, overrides `chat_template`.
  """

  def __init__(self, tokenizer, config: dict[str, Any], *, chat_template: str | None = None,
               name: str = "<tokenizer>"):
    self._tok = tokenizer
    self.name = name
    self.config = config
    self.bos_token = _token_str(config.get("bos_token"))
    self.eos_token = _token_str(config.get("eos_token"))
    self.pad_token = _token_str(config.get("pad_token"))
    self.unk_token = _token_str(config.get("unk_token"))
    self.chat_template = chat_template
    self._compiled = None
    self.eos_id = self._required_id(self.eos_token, "eos_token")
    self.bos_id = self._required_id(self.bos_token, "bos_token") if self.bos_token else None
    # No pad token (e.g. Llama 3): pad with eos. Padding is always masked out by segment_ids=0.
    self.pad_id = self._required_id(self.pad_token, "pad_token") if self.pad_token else self.eos_id
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # Mirror HF: the post-processor of tokenizer.json decides.
      add_bos = self.bos_id is not None and (
          tokenizer.encode("", add_special_tokens=True).ids[:1] == [self.bos_id])
    self.add_bos_token = bool(add_bos) and self.bos_id is not None

  def _required_id(self, token: str | None, field: str) -> int:
    if token is None:
      raise ValueError(f"{self.name}: tokenizer_config.json has no '{field}'; set it to a token "
                       "string of the vocabulary.")
    idx = self._tok.token_to_id(token)
    if idx is None:
      raise ValueError(f"{self.name}: {field} {token!r} from tokenizer_config.json is not in the "
                       "vocabulary of tokenizer.json.")
    return idx

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads `tokenizer.json` + `tokenizer_config.json` from the local directory `path`."""
    import tokenizers  # Local import: CharTokenizer users need not have it.

    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"tokenizer directory {path!r} does not exist; expected a local directory holding "
          "tokenizer.json and tokenizer_config.json (as saved by Hugging Face "
          "`tokenizer.save_pretrained`). Nothing is downloaded.")
    files = {}
    for fname in ("tokenizer.json", "tokenizer_config.json"):
      files[fname] = os.path.join(path, fname)
      if not os.path.isfile(files[fname]):
        raise FileNotFoundError(
            f"{files[fname]} not found; a tokenizer directory must hold tokenizer.json and "
            "tokenizer_config.json (as saved by Hugging Face `tokenizer.save_pretrained`).")
    with open(files["tokenizer_config.json"], encoding="utf-8") as f:
      try:
        config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{files['tokenizer_config.json']}: invalid JSON: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # Named templates: [{"name": ..., "template": ...}].
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    tok = tokenizers.Tokenizer.from_file(files["tokenizer.json"])
    return cls(tok, config, chat_template=template, name=path)

  @property
  def vocab_size(self) -> int:
    """Number of ids, including added tokens (the model's embedding may be larger)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in the text are recognised, none are added
    except `bos_id` in front when `add_bos` is true."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise ValueError(f"{self.name}: add_bos=True but the tokenizer has no bos_token.")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                          **kwargs) -> str:
    """Renders `messages` with the tokenizer's jinja chat template (as HF transformers does)."""
    if not self.chat_template:
      raise ValueError(
          f"{self.name}: the tokenizer has no chat template; set 'chat_template' in "
          "tokenizer_config.json (or add a chat_template.jinja file) to use conversational "
          "records.")
    if self._compiled is None:
      self._compiled = compile_chat_template(self.chat_template)
    variables = dict(bos_token=self.bos_token, eos_token=self.eos_token,
                     pad_token=self.pad_token, unk_token=self.unk_token)
    variables.update(kwargs)
    return self._compiled.render(messages=list(messages),
                                 add_generation_prompt=add_generation_prompt, **variables)

  def __repr__(self):
    return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


DEFAULT_ALPHABET = "0123456789+-*= \n:abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
  """One id per character of a fixed alphabet; for the built-in synthetic tasks.

  Ids: pad=0, bos=1, eos=2, then the alphabet's characters in order from 3. The default
  alphabet is digits, `+-*=`, space, newline, `:` (used by the chat format) and a-z.
  """

  PAD, BOS, EOS = 0, 1, 2
  _SPECIALS = ("<pad>", "<bos>", "<eos>")

  def __init__(self, alphabet: str = DEFAULT_ALPHABET, *, add_bos_token: bool = True):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f"CharTokenizer alphabet has repeated characters: {alphabet!r}")
    self.alphabet = alphabet
    self._ids = {c: i + len(self._SPECIALS) for i, c in enumerate(alphabet)}
    self.add_bos_token = add_bos_token
    self.pad_id, self.bos_id, self.eos_id = self.PAD, self.BOS, self.EOS
    self.bos_token, self.eos_token, self.pad_token = "<bos>", "<eos>", "<pad>"

  @property
  def vocab_size(self) -> int:
    return len(self._SPECIALS) + len(self.alphabet)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    try:
      ids = [self._ids[c] for c in text]
    except KeyError as e:
      raise ValueError(f"CharTokenizer: character {e.args[0]!r} in {text!r} is not in the "
                       f"alphabet {self.alphabet!r}") from None
    return [self.BOS] + ids if add_bos else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i < len(self._SPECIALS):
        if not skip_special_tokens:
          out.append(self._SPECIALS[i])
      else:
        out.append(self.alphabet[i - len(self._SPECIALS)])
    return "".join(out)

  def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                          **kwargs) -> str:
    """Renders each message as `role: content\\n`; the generation prompt is `assistant: `."""
    del kwargs
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")

  def __repr__(self):
    return f"CharTokenizer(vocab_size={self.vocab_size})"
