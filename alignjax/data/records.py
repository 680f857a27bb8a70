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

from typing import Any, Sequence

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


# --- preference records ----------------------------------------------------------------------

PREFERENCE_KINDS = ("pairwise", "listwise", "rated")
LABELS = (1, 0, -1)  # chosen better, tie, rejected better
METADATA_FIELDS = ("source", "user_id", "subset", "language")


def _number(value: Any, field: str, where: str, lo: float | None = None,
            hi: float | None = None) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RecordError(where, field, f"expected a number, got {_type_name(value)}")
  value = float(value)
  if value != value or value in (float("inf"), float("-inf")):
    raise RecordError(where, field, f"expected a finite number, got {value}")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise RecordError(where, field, f"expected a number in [{lo:g}, {hi:g}], got {value:g}")
  return value


def _common_prefix(conversations: list[list[dict[str, str]]]) -> int:
  """Length of the longest common message prefix, leaving every conversation >= 1 message."""
  k = min(len(c) for c in conversations) - 1
  for i in range(k):
    if any(c[i] != conversations[0][i] for c in conversations[1:]):
      return i
  return k


def _prompt_and_responses(record: dict[str, Any], names: list[str], values: list[Any],
                          where: str) -> tuple[str | list[dict[str, str]], list[Any]]:
  """Validates a prompt and its responses (fields `names`): all strings, or all message lists.

  Conversational responses may repeat the prompt's messages in front (TRL style); they are
  removed. Without a `prompt`, the prompt is the responses' longest common message prefix.
  Every response message must have role 'assistant'.
  """
  prompt = record.get("prompt")
  if all(isinstance(v, str) for v in values):
    if not isinstance(prompt, str):
      raise RecordError(where, "prompt", "missing; text responses need a string 'prompt'" if
                        prompt is None else f"expected a string (the responses are strings), "
                        f"got {_type_name(prompt)}")
    return prompt, list(values)
  for name, v in zip(names, values):
    if not isinstance(v, (str, list)):
      raise RecordError(where, name, f"expected a string or a list of messages, got "
                        f"{_type_name(v)}")
  if not all(isinstance(v, list) for v in values):
    raise RecordError(where, names[1], f"'{names[0]}' is a {_type_name(values[0])} but "
                      f"'{names[1]}' is a {_type_name(values[1])}; use strings or message lists "
                      "throughout")
  convs = [_messages(v, name, where) for name, v in zip(names, values)]
  if prompt is None:
    k = _common_prefix(convs) if len(convs) > 1 else 0
    prompt_msgs, responses = convs[0][:k], [c[k:] for c in convs]
  elif isinstance(prompt, list):
    prompt_msgs = _messages(prompt, "prompt", where)
    n = len(prompt_msgs)
    responses = [c[n:] if len(c) > n and c[:n] == prompt_msgs else c for c in convs]
  else:
    raise RecordError(where, "prompt", f"expected a list of messages (the responses are message "
                      f"lists), got {_type_name(prompt)}")
  for name, (offset, resp) in zip(names, ((len(c) - len(r), r) for c, r in zip(convs, responses))):
    for i, m in enumerate(resp):
      if m["role"] != "assistant":
        raise RecordError(where, f"{name}[{offset + i}].role", f"response messages after the "
                          f"prompt must have role 'assistant', got {m['role']!r}")
  return prompt_msgs, responses


def _metadata(record: dict[str, Any], where: str) -> dict[str, Any]:
  out = {"context": None}
  for key in ("principle", "context"):
    if record.get(key) is not None:
      if not isinstance(record[key], str):
        raise RecordError(where, key, f"expected a string, got {_type_name(record[key])}")
      if out["context"] is not None:
        raise RecordError(where, key, "both 'principle' and 'context' are set; give one")
      out["context"] = record[key]
  for key in METADATA_FIELDS:
    value = record.get(key)
    if key == "user_id" and isinstance(value, int) and not isinstance(value, bool):
      value = str(value)
    if value is not None and not isinstance(value, str):
      raise RecordError(where, key, f"expected a string, got {_type_name(value)}")
    out[key] = value
  return out


def best_first(scores: Sequence[float]) -> list[int]:
  """Indices best-first; equal scores keep index order (stable)."""
  return sorted(range(len(scores)), key=lambda i: -scores[i])


def validate_preference(record: Any, where: str, *, kind: str,
                        attributes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Checks a preference record of `kind` and returns its normalised form.

  Accepted records (other top-level keys are ignored):
    pairwise: {"prompt": str, "chosen": str, "rejected": str}, or conversational: "chosen" and
              "rejected" message lists, "prompt" a message list or absent (then the longest
              common message prefix of chosen and rejected); chosen/rejected may repeat the
              prompt's messages in front (TRL). Optional: "margin" (number), "strength"
              (number in [-3, 3]), "label" (1, 0 = tie, -1 = rejected is better).
    listwise: {"prompt", "responses": [str or message list, >= 2], "ranking": [indices,
              best first]} or "scores": [numbers, higher is better] instead of "ranking".
    rated:    {"prompt", "response", "scores": {attribute: number or null}}, or the attributes
              as top-level fields (when there is no "scores").
    Any kind: "principle" or "context" (str), "source", "user_id" (str or int), "subset",
              "language" (str).

  Returns {"prompt": str | messages, "responses": [str | messages], "context": str | None,
  "source", "user_id", "subset", "language": str | None, plus by kind:
    pairwise: "margin" (default 0), "strength" (default 1), "label" (default 1) as floats;
    listwise: "scores" [n] floats (from a ranking: n - rank) and "order" [n] best-first
              (ties keep index order);
    rated:    "targets" [len(attributes)] floats or None where absent}.
  A pair with chosen == rejected is valid (the pipeline counts it).

  Raises:
    RecordError naming `where`, the field and what to do.
  """
  if kind not in PREFERENCE_KINDS:
    raise ValueError(f"kind must be one of {PREFERENCE_KINDS}, got {kind!r}")
  if not isinstance(record, dict):
    raise RecordError(where, None, f"expected a JSON object, got {_type_name(record)}")
  names = {"pairwise": ["chosen", "rejected"], "listwise": ["responses"],
           "rated": ["response"]}[kind]
  for key in names:
    if key not in record:
      raise RecordError(where, key, f"missing; a {kind} record needs "
                        f"{', '.join(repr(n) for n in names)}")
  out = _metadata(record, where)
  if kind == "listwise":
    values = record["responses"]
    if not isinstance(values, list) or len(values) < 2:
      raise RecordError(where, "responses", f"expected a list of at least 2 responses, got "
                        f"{_type_name(values)}" + (f" of length {len(values)}"
                                                   if isinstance(values, list) else ""))
    names = [f"responses[{i}]" for i in range(len(values))]
  else:
    values = [record[n] for n in names]
  out["prompt"], out["responses"] = _prompt_and_responses(record, names, values, where)

  if kind == "pairwise":
    m, s, y = record.get("margin"), record.get("strength"), record.get("label")
    out["margin"] = 0.0 if m is None else _number(m, "margin", where)
    out["strength"] = 1.0 if s is None else _number(s, "strength", where, -3.0, 3.0)
    out["label"] = 1.0 if y is None else _number(y, "label", where)
    if out["label"] not in LABELS:
      raise RecordError(where, "label", f"expected 1 (chosen better), 0 (tie) or -1 (rejected "
                        f"better), got {y!r}")
  elif kind == "listwise":
    n = len(values)
    ranking, scores = record.get("ranking"), record.get("scores")
    if (ranking is None) == (scores is None):
      raise RecordError(where, "ranking", "a listwise record needs exactly one of 'ranking' "
                        "(indices best first) and 'scores' (higher is better)")
    if ranking is not None:
      if (not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int)
                                               for i in ranking)
          or sorted(ranking) != list(range(n))):
        raise RecordError(where, "ranking", f"expected a permutation of 0..{n - 1} (response "
                          f"indices, best first), got {ranking!r}")
      out["order"] = list(ranking)
      out["scores"] = [0.0] * n
      for rank, i in enumerate(ranking):
        out["scores"][i] = float(n - rank)
    else:
      if not isinstance(scores, list) or len(scores) != n:
        raise RecordError(where, "scores", f"expected a list of {n} numbers (one per response), "
                          f"got {_type_name(scores)}" + (f" of length {len(scores)}"
                                                         if isinstance(scores, list) else ""))
      out["scores"] = [_number(v, f"scores[{i}]", where) for i, v in enumerate(scores)]
      out["order"] = best_first(out["scores"])
  else:
    scores = record.get("scores")
    if scores is not None and not isinstance(scores, dict):
      raise RecordError(where, "scores", f"expected an object {{attribute: number}}, got "
                        f"{_type_name(scores)}")
    table, prefix = (scores, "scores.") if scores is not None else (record, "")
    out["targets"] = [None if table.get(a) is None else _number(table[a], prefix + a, where)
                      for a in attributes]
    if attributes and all(t is None for t in out["targets"]):
      raise RecordError(where, "scores", f"no score for any of the attributes "
                        f"{', '.join(attributes)} (data.attributes)")
  return out
