"""SFT record schemas and their validation.

Accepted SFT records (extra top-level keys such as "id" are ignored):

  prompt/completion, plain text:   {"prompt": str, "completion": str}
  conversational:                  {"messages": [{"role": "system"|"user"|"assistant",
                                                  "content": str}, ...]}
  conversational prompt/completion {"prompt": [message, ...], "completion": [message, ...]}
  (as in TRL):

`validate_sft` returns one of two normalised forms:

  {"prompt": str, "completion": str}
  {"messages": [{"role", "content"}, ...], "completion_start": int}
      assistant messages at index >= completion_start are trained on (loss), the rest is context.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
SKIP_HINT = "fix the record, or set data.skip_malformed=True to skip (and count) such records"


class RecordError(ValueError):
  """A malformed data record; the message names file, line/row, field and what to do."""

  def __init__(self, where: str, field: str | None, problem: str, hint: str = SKIP_HINT):
    self.where, self.field, self.problem = where, field, problem
    at = f"{where}, field '{field}'" if field else where
    super().__init__(f"{at}: {problem}; {hint}.")


def _type_name(x: Any) -> str:
  return "null" if x is None else type(x).__name__


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise RecordError(where, field, f"expected a non-empty list of messages, got "
                      f"{_type_name(value)}" + (" (empty)" if value == [] else ""))
  out = []
  for i, m in enumerate(value):
    f = f"{field}[{i}]"
    if not isinstance(m, dict):
      raise RecordError(where, f, f"expected a message object {{\"role\", \"content\"}}, got "
                        f"{_type_name(m)}")
    for key in ("role", "content"):
      if key not in m:
        raise RecordError(where, f"{f}.{key}", "missing")
    if m["role"] not in ROLES:
      raise RecordError(where, f"{f}.role", f"expected one of {', '.join(ROLES)}, got "
                        f"{m['role']!r}")
    if not isinstance(m["content"], str):
      raise RecordError(where, f"{f}.content", f"expected a string, got "
                        f"{_type_name(m['content'])}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def validate_sft(record: Any, where: str) -> dict[str, Any]:
  """Checks an SFT record and returns its normalised form (see module docstring).

  Args:
    record: the decoded record (a dict).
    where: its location for error messages, e.g. "data/train.jsonl line 17".
  Raises:
    RecordError naming `where`, the field and what to do.
  """
  if not isinstance(record, dict):
    raise RecordError(where, None, f"expected a JSON object, got {_type_name(record)}")
  if "messages" in record:
    msgs = _messages(record["messages"], "messages", where)
    if not any(m["role"] == "assistant" for m in msgs):
      raise RecordError(where, "messages", "has no assistant message, so nothing to train on")
    return {"messages": msgs, "completion_start": 0}
  for key in ("prompt", "completion"):
    if key not in record:
      raise RecordError(where, key, "missing; an SFT record needs 'prompt' and 'completion' "
                        "(strings or message lists) or 'messages'")
  prompt, completion = record["prompt"], record["completion"]
  if isinstance(prompt, str) and isinstance(completion, str):
    return {"prompt": prompt, "completion": completion}
  if isinstance(prompt, list) and isinstance(completion, list):
    p = _messages(prompt, "prompt", where)
    c = _messages(completion, "completion", where)
    for i, m in enumerate(c):
      if m["role"] != "assistant":
        raise RecordError(where, f"completion[{i}].role", f"completion messages must have role "
                          f"'assistant', got {m['role']!r}")
    return {"messages": p + c, "completion_start": len(p)}
  for key, value in (("prompt", prompt), ("completion", completion)):
    if not isinstance(value, (str, list)):
      raise RecordError(where, key, f"expected a string or a list of messages, got "
                        f"{_type_name(value)}")
  raise RecordError(where, "completion", f"'prompt' is a {_type_name(prompt)} but 'completion' "
                    f"is a {_type_name(completion)}; use two strings or two message lists")
