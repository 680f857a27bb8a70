"""Text rewards from METHODS.md 4.1: tool calls, SQL, BLEU, embedding matching, reasoning phrases,
safety refusals and conciseness.

Registered rewards (host functions `fn(prompts, completions, fields, **params) -> N floats`, NaN =
unscorable; see docs/rewards.md for the field names and defaults):
  toolrl_reward             ToolRL fine-grained tool-call reward, in [-3, 4]
  sql_partial_reward        Reasoning-SQL partial rewards (execution on sqlite3), in [0, 8]
  bleu_reward               sentence BLEU-4 in [0, 1] (exp smoothing, multiple references)
  bmas_reward               bidirectional max-similarity token-embedding matching in [-1, 1]
  reasoning_pattern_reward  min(#distinct key phrases in the think span, 3) / 3
  safety_refusal_reward     AlphaAlign-style refusal reward (grouped)
  conciseness_reward        r_out * (1 + 0.5*c)
Helpers: `parse_tool_calls`, `sentence_bleu`, `words`, `hashed_embedding`, `bmas_score` (jnp,
jit-compiled), `think_span`, `answer_span`, `extract_sql`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import json
import math
import pathlib
import re
import sqlite3
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.rewards import registry

# ---------------------------------------------------------------------------- shared helpers

_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_THINK_BLOCK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def think_span(text: str) -> str:
  """The text inside every `<think>...</think>` (joined by newlines; an unclosed `<think>` runs to
  the end), or the whole text when there is no `<think>` tag. Tags are case-insensitive."""
  if not isinstance(text, str):
    return ""
  spans = _THINK_RE.findall(text)
  return "\n".join(spans) if spans else text


def answer_span(text: str) -> str:
  """The last `<answer>...</answer>` content; else the text with every `<think>` block removed
  (an unclosed `<think>` swallows the rest). Tags are case-insensitive."""
  if not isinstance(text, str):
    return ""
  found = _ANSWER_RE.findall(text)
  if found:
    return found[-1].strip()
  return _THINK_BLOCK_RE.sub("", text).strip()


def words(text: str, *, lowercase: bool = False) -> list[str]:
  """The simple tokenizer of `bleu_reward` and `bmas_reward`: runs of word characters (`\\w+`,
  Unicode letters, digits and `_`) and single other non-space characters, so punctuation is
  split off ("Don't stop." -> Don ' t stop .). Optionally lowercased first."""
  if not isinstance(text, str):
    return []
  return _WORD_RE.findall(text.lower() if lowercase else text)


def _missing(x) -> bool:
  return x is None or (isinstance(x, float) and math.isnan(x))


def _first_present(fields, n: int, keys: Sequence[str], *, who: str) -> list:
  """Per sample, the first non-missing value among fields[k] for k in keys (None if none);
  ValueError when no key is in the batch."""
  cols = [registry.column(fields, k, n, who=who) for k in keys if k in fields]
  if not cols:
    raise ValueError(f"{who} needs fields[{'] or fields['.join(keys)}]; fields: "
                     f"{', '.join(sorted(fields)) or 'none'}.")
  return [next((c[i] for c in cols if not _missing(c[i])), None) for i in range(n)]


def _check_regex(params: dict, key: str, *, optional: bool = True) -> None:
  value = params[key]
  if value is None and optional:
    return
  try:
    re.compile(value, re.DOTALL)
  except (re.error, TypeError) as e:
    raise registry.ParamError(key, f"not a valid regex ({e}): {value!r}") from None


def _check_number(params: dict, key: str, *, lo: float | None = None, strict: bool = False,
                  allow_none: bool = False) -> None:
  value = params[key]
  if value is None and allow_none:
    return
  bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
  if not bad and lo is not None:
    bad = value <= lo if strict else value < lo
  if bad:
    bound = "" if lo is None else f" {'>' if strict else '>='} {lo}"
    raise registry.ParamError(key, f"must be a number{bound}, got {value!r}")


def _check_other_reward(params: dict, key: str, me: str) -> None:
  name = params[key]
  if name is None:
    return
  if name == me:
    raise registry.ParamError(key, f"cannot be {me} itself")
  if not isinstance(name, str) or name not in registry.names():
    raise registry.ParamError(key, f"unknown reward {name!r}. Registered rewards: "
                              f"{', '.join(registry.names())}")


def _call_reward(name: str, params: dict | None, prompts, completions, fields, n: int,
                 who: str) -> list[float]:
  raw = list(registry.get(name).fn(prompts, completions, fields, **(params or {})))
  if len(raw) != n:
    raise ValueError(f"{who}: reward {name!r} returned {len(raw)} values for {n} samples.")
  out = []
  for v in raw:
    v = math.nan if v is None else float(v)
    out.append(v if math.isfinite(v) else math.nan)
  return out


def _float_or_nan(x) -> float:
  if _missing(x) or isinstance(x, (str, bytes)):
    return math.nan
  try:
    x = float(x)
  except (TypeError, ValueError):
    return math.nan
  return x if math.isfinite(x) else math.nan


# ---------------------------------------------------------------------------- toolrl_reward

DEFAULT_TOOL_FORMAT = (r"^\s*<think>.*?</think>\s*(?=<tool_call>|<response>)"
                       r"(?:<tool_call>.*?</tool_call>\s*)?(?:<response>.*?</response>\s*)?$")
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL | re.IGNORECASE)
_TOOL_OPEN_RE = re.compile(r"<tool_call>", re.IGNORECASE)
_RESPONSE_RE = re.compile(r"<response>.*?(?:</response>|$)", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)


class Unparsable(ValueError):
  """A tool-call block that is not JSON or not a list of {"name", "parameters"} objects."""


def _json_values(text: str) -> list:
  """Every JSON value in `text`, which holds one or more whitespace-separated JSON values."""
  decoder, values, i = json.JSONDecoder(), [], 0
  text = text.strip()
  while i < len(text):
    if text[i].isspace():
      i += 1
      continue
    try:
      value, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise Unparsable(f"not JSON: {e}") from None
    values.append(value)
  return values


def _as_calls(value) -> list[tuple[str, dict]]:
  if isinstance(value, list):
    return [call for v in value for call in _as_calls(v)]
  if not isinstance(value, dict) or not isinstance(value.get("name"), str):
    raise Unparsable(f"a tool call must be an object with a string 'name', got {value!r}")
  params = value.get("parameters", value.get("arguments", {}))
  if isinstance(params, str):  # OpenAI style: arguments as a JSON string
    try:
      params = json.loads(params) if params.strip() else {}
    except json.JSONDecodeError:
      raise Unparsable(f"arguments of {value['name']!r} are not JSON: {params!r}") from None
  if params is None:
    params = {}
  if not isinstance(params, dict):
    raise Unparsable(f"parameters of {value['name']!r} must be an object, got {params!r}")
  return [(value["name"], params)]


def parse_tool_calls(text) -> list[tuple[str, dict]]:
  """Tool calls in a completion (or gold value) as [(name, parameters)]; raises `Unparsable`.

  * A list / dict value (a gold field) is read as the call objects themselves.
  * Text with `<tool_call>...</tool_call>` blocks: each block holds one JSON object, a JSON list of
    objects, or several objects separated by whitespace / newlines (ToolRL's format). An opening
    tag without a closing tag is unparsable.
  * Text without tags: the `<think>` and `<response>` blocks are removed and the rest stripped
    (also of a ``` fence); empty -> no calls; starting with `[` or `{` -> parsed as JSON; any
    other text (a plain answer) -> no calls.
  A call object is {"name": str, "parameters": {...}}; "arguments" (an object or a JSON string,
  OpenAI style) is accepted for "parameters", which may be absent (= {}).
  """
  if isinstance(text, (list, dict)):
    return _as_calls(text)
  if not isinstance(text, str):
    raise Unparsable(f"expected text, a list or a dict, got {type(text).__name__}")
  blocks = _TOOL_CALL_RE.findall(text)
  if len(blocks) != len(_TOOL_OPEN_RE.findall(text)):
    raise Unparsable("unclosed <tool_call>")
  if blocks:
    return [call for b in blocks for call in _as_calls(_json_values(b))]
  rest = _RESPONSE_RE.sub("", _THINK_BLOCK_RE.sub("", text)).strip()
  if (m := _FENCE_RE.match(rest)):
    rest = m.group(1)
  if not rest or rest[0] not in "[{":
    return []
  return _as_calls(_json_values(rest))


def _same_value(a, b) -> bool:
  """JSON equality that keeps types apart (True != 1, "5" != 5) but lets 1 == 1.0."""
  if isinstance(a, bool) or isinstance(b, bool):
    return isinstance(a, bool) and isinstance(b, bool) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def _jaccard(a, b) -> float:
  """|a & b| / |a | b| for sets or Counters (multisets); 1 when both are empty."""
  union = a | b
  if not union:
    return 1.0
  inter = a & b
  size = (lambda s: sum(s.values())) if isinstance(a, collections.Counter) else len
  return size(inter) / size(union)


def tool_call_score(pred: list[tuple[str, dict]], gold: list[tuple[str, dict]]
                    ) -> tuple[float, float]:
  """(S, S_max) of ToolRL's correctness reward (METHODS.md 4.1 `toolrl_reward`).

  S = Jaccard of the tool-name multisets + the best one-to-one matching of predicted to gold calls
  of the same name, a matched pair scoring Jaccard(parameter names) (1 when both have none) + the
  number of gold parameters whose predicted value is equal (`_same_value`).
  S_max = 1 + #gold calls + #gold parameters.
  """
  s_max = 1 + len(gold) + sum(len(p) for _, p in gold)
  s = _jaccard(collections.Counter(n for n, _ in pred), collections.Counter(n for n, _ in gold))
  if pred and gold:
    m = np.zeros((len(gold), len(pred)))
    for i, (gn, gp) in enumerate(gold):
      for j, (pn, pp) in enumerate(pred):
        if gn == pn:
          m[i, j] = _jaccard(set(gp), set(pp)) + sum(
              1 for k in gp if k in pp and _same_value(gp[k], pp[k]))
    if m.any():
      from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (slow import, lazily)
      rows, cols = linear_sum_assignment(m, maximize=True)
      s += float(m[rows, cols].sum())
  return s, float(s_max)


def _check_toolrl(params: dict) -> None:
  _check_regex(params, "format_pattern")
  _check_number(params, "unparsable_score")


@registry.register("toolrl_reward", check=_check_toolrl)
def toolrl_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                  gold_field: str = "tool_calls", format_pattern: str | None = DEFAULT_TOOL_FORMAT,
                  unparsable_score: float = -3.0) -> list[float]:
  """Fine-grained tool-call reward (*ToolRL: Reward is All Tool Learning Needs*; METHODS.md 4.1
  `toolrl_reward`: fine-grained reward `abstract`, formula `recalled - verify`).

  `R = R_fmt + 6*S/S_max - 3` in [-3, 4], with `R_fmt` = 1 if `re.fullmatch(format_pattern,
  completion, DOTALL)` else 0 (`format_pattern=None` drops the term) and (S, S_max) from
  `tool_call_score`: tool-name Jaccard + per matched call (same name, best one-to-one matching)
  parameter-name Jaccard + number of exactly equal gold values; `S_max = 1 + #calls + #gold
  params`. Calls are parsed by `parse_tool_calls` (JSON objects {"name", "parameters"}, in
  `<tool_call>...</tool_call>` blocks or bare). No call expected and none made scores the full 3.

  An unparsable completion scores `unparsable_score` (-3; no format credit either). The gold is
  fields[gold_field]: a JSON string (tags allowed), a list of call objects, or one object; an
  empty string / list means no call is expected. A missing or unparsable gold gives NaN.
  The default format asks for `<think>...</think>` then `<tool_call>...</tool_call>` and/or
  `<response>...</response>` (ToolRL's output format).
  """
  _check_toolrl(dict(format_pattern=format_pattern, unparsable_score=unparsable_score))
  regex = re.compile(format_pattern, re.DOTALL) if format_pattern is not None else None
  n = len(completions)
  out = []
  for completion, gold in zip(completions,
                              registry.column(fields, gold_field, n, who="toolrl_reward")):
    if _missing(gold):
      out.append(math.nan)
      continue
    try:
      gold_calls = parse_tool_calls(gold)
    except Unparsable:
      out.append(math.nan)
      continue
    try:
      pred_calls = parse_tool_calls(completion)
    except Unparsable:
      out.append(float(unparsable_score))
      continue
    s, s_max = tool_call_score(pred_calls, gold_calls)
    fmt = float(regex is not None and isinstance(completion, str)
                and regex.fullmatch(completion) is not None)
    out.append(fmt + 6.0 * s / s_max - 3.0)
  return out


# ---------------------------------------------------------------------------- sql_partial_reward

SQL_GOLD_FIELDS = ("sql", "query", "SQL")  # lookup order for the default gold_field
SQL_COMPONENTS = ("execution", "syntax", "schema", "ngram", "format", "judge")
DEFAULT_SQL_WEIGHTS = {"execution": 3.0, "syntax": 1.0, "schema": 1.0, "ngram": 1.0,
                       "format": 1.0, "judge": 1.0}
DEFAULT_SQL_FORMAT = r".*```sql\s.*?```.*"
_SQL_FENCE_RE = re.compile(r"```sql\s(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE_RE = re.compile(r"```[a-zA-Z]*\s(.*?)```", re.DOTALL)
_SQL_TOKEN_RE = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|\d+(?:\.\d+)?|[A-Za-z_][A-Za-z0-9_$]*"
    r"|<>|!=|<=|>=|==|\|\||\S")
# Authorizer actions a query may take: read-only SELECTs (with functions and recursive CTEs).
_READ_ONLY = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
              getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def extract_sql(text: str) -> str:
  """The SQL of a completion: the last ```sql fenced block; else the last ``` fenced block; else
  `answer_span(text)` (the `<answer>` content, or the text without `<think>` blocks)."""
  if not isinstance(text, str):
    return ""
  for regex in (_SQL_FENCE_RE, _ANY_FENCE_RE):
    found = regex.findall(text)
    if found:
      return found[-1].strip()
  return answer_span(text)


def sql_tokens(sql: str) -> list[str]:
  """SQL tokens: string literals kept verbatim, quoted identifiers ("x", `x`, [x]) unquoted, the
  rest lowercased; numbers, identifiers, two-character operators and single symbols."""
  out = []
  for tok in _SQL_TOKEN_RE.findall(sql or ""):
    if tok[0] == "'":
      out.append(tok)
    elif tok[0] in "\"`[" and len(tok) >= 2:
      out.append(tok[1:-1].lower())
    else:
      out.append(tok.lower())
  return out


def _bigrams(tokens: list[str]) -> set:
  return set(zip(tokens, tokens[1:]))


class _Database:
  """A sqlite3 database for one record: a read-only file (`db_path`) or an in-memory database
  built from a `schema` script (rebuilt for every query, so a query cannot alter the next)."""

  def __init__(self, db_path: str | None, schema: str | None, timeout: float):
    self.db_path, self.schema, self.timeout = db_path, schema, timeout
    conn = self._connect()
    try:
      self.identifiers = self._identifiers(conn)
    finally:
      conn.close()

  def _connect(self) -> sqlite3.Connection:
    if self.db_path:
      path = pathlib.Path(self.db_path).resolve()
      if not path.is_file():
        raise FileNotFoundError(f"no database file {self.db_path!r}")
      return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    conn = sqlite3.connect(":memory:")
    conn.executescript(self.schema)
    return conn

  @staticmethod
  def _identifiers(conn) -> set[str]:
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    out = {t.lower() for t in names}
    for t in names:
      quoted = t.replace('"', '""')
      out.update(r[1].lower() for r in conn.execute(f'PRAGMA table_info("{quoted}")'))
    return out

  def run(self, sql: str) -> set:
    """The result rows of `sql` as a set of tuples; raises on any error, a write, or a timeout."""
    conn = self._connect()
    try:
      deadline = time.perf_counter() + self.timeout
      conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 1000)
      conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ONLY
                          else sqlite3.SQLITE_DENY)
      return set(conn.execute(sql).fetchall())
    finally:
      conn.close()


def _check_sql(params: dict) -> None:
  _check_regex(params, "format_pattern")
  _check_number(params, "timeout", lo=0, strict=True)
  weights = params["weights"]
  if weights is not None:
    if not isinstance(weights, dict):
      raise registry.ParamError("weights", f"must be a dict over {SQL_COMPONENTS}, got "
                                f"{weights!r}")
    for k, w in weights.items():
      if k not in SQL_COMPONENTS:
        raise registry.ParamError("weights", f"unknown component {k!r}; components: "
                                  f"{', '.join(SQL_COMPONENTS)}")
      if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise registry.ParamError("weights", f"{k}: expected a finite number, got {w!r}")


@registry.register("sql_partial_reward", check=_check_sql)
def sql_partial_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                       gold_field: str = "sql", db_field: str = "db_path",
                       schema_field: str = "schema", judge_field: str | None = None,
                       weights: dict | None = None,
                       format_pattern: str | None = DEFAULT_SQL_FORMAT,
                       timeout: float = 1.0) -> list[float]:
  """Text-to-SQL partial rewards (*Reasoning-SQL: Reinforcement Learning with SQL Tailored Partial
  Rewards for Reasoning-Enhanced Text-to-SQL*; METHODS.md 4.1 `sql_partial_reward`: partial
  rewards `abstract`, form `recalled - verify`, weights `proposed`).

  `sum_k w_k*c_k`, each c_k in [0, 1] (weights default execution 3, all others 1; `weights`
  overrides some of them; range [0, 8] with a judge):
    execution  1 if the predicted rows equal the gold rows as sets (BIRD's comparison);
    syntax     1 if the predicted SQL runs without error (within `timeout` seconds);
    schema     Jaccard of the table / column names (of this database) the two queries mention
               (1 when neither mentions any);
    ngram      Jaccard of the token-bigram sets (`sql_tokens`; 1 when both have no bigram and
               equal tokens);
    format     1 if `re.fullmatch(format_pattern, completion, DOTALL)` (default: the completion
               has a ```sql fenced block; None gives 0);
    judge      fields[judge_field] in [0, 1] (clipped) when judge_field is set; a missing value
               gives NaN.
  The predicted SQL is `extract_sql(completion)`. The gold is fields[gold_field]; the default
  "sql" falls back to "query" (Spider) and "SQL" (BIRD). The database is fields[db_field], a
  sqlite file opened read-only, else fields[schema_field], an SQL script (CREATE / INSERT)
  run into a fresh in-memory database. Queries may only read (an sqlite3 authorizer denies
  writes, ATTACH and PRAGMA) and run one statement.
  NaN (unscorable) when the gold is missing or fails (error or timeout), the record has no
  database, or the database cannot be opened.
  """
  _check_sql(dict(format_pattern=format_pattern, timeout=timeout, weights=weights))
  w = {**DEFAULT_SQL_WEIGHTS, **(weights or {})}
  regex = re.compile(format_pattern, re.DOTALL) if format_pattern is not None else None
  n = len(completions)
  who = "sql_partial_reward"
  golds = _first_present(fields, n, SQL_GOLD_FIELDS if gold_field == "sql" else (gold_field,),
                         who=who)
  if db_field not in fields and schema_field not in fields:
    raise ValueError(f"{who} needs a database: fields[{db_field!r}] (a sqlite file) or "
                     f"fields[{schema_field!r}] (an SQL script); fields: "
                     f"{', '.join(sorted(fields))}.")
  paths = registry.column(fields, db_field, n, who=who) if db_field in fields else [None] * n
  schemas = (registry.column(fields, schema_field, n, who=who) if schema_field in fields
             else [None] * n)
  judges = (registry.column(fields, judge_field, n, who=who) if judge_field is not None
            else [None] * n)
  databases: dict = {}
  gold_rows: dict = {}
  out = []
  for i, completion in enumerate(completions):
    gold, path, schema = golds[i], paths[i], schemas[i]
    path = path if isinstance(path, str) and path else None
    schema = schema if isinstance(schema, str) and schema.strip() else None
    if not isinstance(gold, str) or not gold.strip() or (path is None and schema is None):
      out.append(math.nan)
      continue
    key = (path, schema if path is None else None)
    if key not in databases:
      try:
        databases[key] = _Database(path, schema, timeout)
      except Exception:  # pylint: disable=broad-except  (a bad file or schema: unscorable)
        databases[key] = None
    db = databases[key]
    if db is None:
      out.append(math.nan)
      continue
    if (key, gold) not in gold_rows:
      try:
        gold_rows[key, gold] = db.run(gold)
      except Exception:  # pylint: disable=broad-except
        gold_rows[key, gold] = None
    want = gold_rows[key, gold]
    if want is None:
      out.append(math.nan)
      continue
    judge = 0.0
    if judge_field is not None:
      judge = _float_or_nan(judges[i])
      if math.isnan(judge):
        out.append(math.nan)
        continue
      judge = min(max(judge, 0.0), 1.0)
    pred = extract_sql(completion)
    try:
      got, runs = (db.run(pred), 1.0) if pred.strip() else (None, 0.0)
    except Exception:  # pylint: disable=broad-except  (the policy's SQL failed)
      got, runs = None, 0.0
    execution = float(got is not None and got == want)
    ptok, gtok = sql_tokens(pred), sql_tokens(gold)
    schema_sim = _jaccard({t for t in ptok if t in db.identifiers},
                          {t for t in gtok if t in db.identifiers})
    pb, gb = _bigrams(ptok), _bigrams(gtok)
    ngram = _jaccard(pb, gb) if (pb or gb) else float(ptok == gtok)
    fmt = float(regex is not None and isinstance(completion, str)
                and regex.fullmatch(completion) is not None)
    out.append(w["execution"] * execution + w["syntax"] * runs + w["schema"] * schema_sim
               + w["ngram"] * ngram + w["format"] * fmt
               + (w["judge"] * judge if judge_field is not None else 0.0))
  return out


# ---------------------------------------------------------------------------- bleu_reward

REFERENCE_FIELDS = ("references", "answer")  # lookup order for the default references_field


def _reference_lists(fields, n: int, references_field: str, who: str) -> list[list[str] | None]:
  keys = REFERENCE_FIELDS if references_field == "references" else (references_field,)
  out = []
  for value in _first_present(fields, n, keys, who=who):
    if isinstance(value, str):
      out.append([value])
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
      out.append(list(value))
    else:
      out.append(None)
  return out


def _ngrams(tokens: list[str], k: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1))


def sentence_bleu(hypothesis: str, references: Sequence[str], *, max_n: int = 4,
                  lowercase: bool = False) -> float:
  """Sentence BLEU in [0, 1] as sacrebleu's `sentence_bleu` (smooth_method="exp", effective order)
  computes it on our `words` tokenization (METHODS.md 4.1 `bleu_reward`).

  p_k = clipped k-gram matches / hypothesis k-grams, a k-gram counting at most its largest count
  in any one reference. Orders the hypothesis is too short for are dropped (effective order); the
  j-th order with no match takes `p = 1/(2^j * total_k)` (exp smoothing). No match at any order,
  or an empty hypothesis, gives 0. `BLEU = BP * exp(mean_k log p_k)`,
  `BP = min(1, exp(1 - r/h))` with h the hypothesis length and r the length of the reference
  closest to h (the shorter on ties).
  """
  hyp = words(hypothesis, lowercase=lowercase)
  refs = [words(r, lowercase=lowercase) for r in references]
  if not hyp or not refs:
    return 0.0
  log_p, smooth, matched = [], 1.0, False
  for k in range(1, max_n + 1):
    counts = _ngrams(hyp, k)
    total = sum(counts.values())
    if total == 0:
      break
    best: collections.Counter = collections.Counter()
    for ref in refs:
      best |= _ngrams(ref, k)
    correct = sum(min(c, best[g]) for g, c in counts.items())
    matched |= correct > 0
    if correct == 0:
      smooth *= 2.0
      log_p.append(-math.log(smooth * total))
    else:
      log_p.append(math.log(correct / total))
  if not matched:
    return 0.0
  h = len(hyp)
  r = min((len(ref) for ref in refs), key=lambda length: (abs(length - h), length))
  bp = 1.0 if h >= r else math.exp(1.0 - r / h)
  return bp * math.exp(sum(log_p) / len(log_p))


def _check_bleu(params: dict) -> None:
  if (isinstance(params["max_n"], bool) or not isinstance(params["max_n"], int)
      or params["max_n"] < 1):
    raise registry.ParamError("max_n", f"must be an int >= 1, got {params['max_n']!r}")


@registry.register("bleu_reward", check=_check_bleu)
def bleu_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                references_field: str = "references", max_n: int = 4,
                lowercase: bool = False, use_answer_span: bool = True) -> list[float]:
  """Sentence BLEU-4 reward in [0, 1] (*BLEUBERI: BLEU is a surprisingly effective reward for
  instruction following*; METHODS.md 4.1 `bleu_reward`: `abstract`; multiple references
  `recalled - verify`).

  `sentence_bleu(completion, references)`: exp smoothing, brevity penalty, clipping against all
  references, our `words` tokenizer (word runs and single punctuation marks; case-sensitive
  unless `lowercase`). The hypothesis is `answer_span(completion)` (the `<answer>` content or
  the text outside `<think>`) when `use_answer_span`, else the whole completion. An empty output
  gives 0. References: fields[references_field] (a string or a list of strings); the default
  "references" falls back to "answer". A missing or non-string reference gives NaN.
  """
  _check_bleu(dict(max_n=max_n))
  n = len(completions)
  out = []
  for completion, refs in zip(completions,
                              _reference_lists(fields, n, references_field, "bleu_reward")):
    if refs is None:
      out.append(math.nan)
      continue
    hyp = answer_span(completion) if use_answer_span else completion
    out.append(sentence_bleu(hyp, refs, max_n=max_n, lowercase=lowercase))
  return out


# ---------------------------------------------------------------------------- bmas_reward


@functools.lru_cache(maxsize=65536)
def _token_vector(token: str, dim: int, ngram: int) -> np.ndarray:
  vec = np.zeros((dim,), np.float32)
  padded = f"<{token}>"
  feats = [padded[i:i + ngram] for i in range(max(1, len(padded) - ngram + 1))]
  for feat in feats + [f"w:{token}"]:
    h = int.from_bytes(hashlib.blake2b(feat.encode("utf-8"), digest_size=8).digest(), "little")
    vec[h % dim] += 1.0 if (h >> 63) & 1 else -1.0
  return vec


def hashed_embedding(text: str, *, dim: int = 256, ngram: int = 3) -> np.ndarray:
  """Deterministic token embeddings [T, dim] float32 without a model: each lowercased `words`
  token is a signed hashed bag of its character `ngram`-grams (of `<token>`, with boundary
  marks) plus one whole-token feature (blake2b hashes: stable across processes). Identical
  tokens get identical rows; tokens sharing character n-grams get similar rows."""
  toks = words(text, lowercase=True)
  if not toks:
    return np.zeros((0, dim), np.float32)
  return np.stack([_token_vector(t, dim, ngram) for t in toks])


@jax.jit
def bmas_score(P, Q, p_mask=None, q_mask=None) -> jnp.ndarray:
  """Bidirectional max-similarity matching (METHODS.md 4.1 `bmas_reward`; `proposed`):
  P [..., Tp, D], Q [..., Tq, D], masks [..., Tp] / [..., Tq] (True = a real token; None = all)
  -> [...] float32 `0.5*(mean_i max_j S_ij + mean_j max_i S_ij)`, S = P Q^T over L2-normalised
  rows (zero rows stay zero), padding excluded (-inf in the max); 0 if either side is empty.
  Jit-compiled; no gradient use in mind."""
  P, Q = jnp.asarray(P, jnp.float32), jnp.asarray(Q, jnp.float32)
  p_mask = jnp.ones(P.shape[:-1], bool) if p_mask is None else jnp.asarray(p_mask, bool)
  q_mask = jnp.ones(Q.shape[:-1], bool) if q_mask is None else jnp.asarray(q_mask, bool)
  P = P / jnp.maximum(jnp.linalg.norm(P, axis=-1, keepdims=True), 1e-12)
  Q = Q / jnp.maximum(jnp.linalg.norm(Q, axis=-1, keepdims=True), 1e-12)
  s = jnp.einsum("...id,...jd->...ij", P, Q)
  row = jnp.max(jnp.where(q_mask[..., None, :], s, -jnp.inf), axis=-1)  # [..., Tp]
  col = jnp.max(jnp.where(p_mask[..., :, None], s, -jnp.inf), axis=-2)  # [..., Tq]
  n_p, n_q = p_mask.sum(-1), q_mask.sum(-1)
  both = (n_p > 0) & (n_q > 0)
  a = jnp.where(p_mask & both[..., None], row, 0.0).sum(-1) / jnp.maximum(n_p, 1)
  b = jnp.where(q_mask & both[..., None], col, 0.0).sum(-1) / jnp.maximum(n_q, 1)
  return jnp.where(both, 0.5 * (a + b), 0.0)


def _bmas_np(P: np.ndarray, Q: np.ndarray) -> float:
  """`bmas_score` for one unpadded pair on the host (float64)."""
  if len(P) == 0 or len(Q) == 0:
    return 0.0
  P = P / np.maximum(np.linalg.norm(P, axis=-1, keepdims=True), 1e-12)
  Q = Q / np.maximum(np.linalg.norm(Q, axis=-1, keepdims=True), 1e-12)
  s = np.asarray(P, np.float64) @ np.asarray(Q, np.float64).T
  return float(0.5 * (s.max(axis=1).mean() + s.max(axis=0).mean()))


def _resolve_embed_fn(embed_fn) -> Callable[[str], Any] | None:
  if embed_fn is None or callable(embed_fn):
    return embed_fn
  module, _, attr = embed_fn.partition(":")
  return getattr(importlib.import_module(module), attr)


def _check_bmas(params: dict) -> None:
  fn = params["embed_fn"]
  if fn is not None and not callable(fn) and not (
      isinstance(fn, str) and re.fullmatch(r"[\w.]+:\w+", fn)):
    raise registry.ParamError("embed_fn", f"must be None, a callable text -> [T, D] array, or "
                              f"'package.module:function', got {fn!r}")
  for k in ("dim", "ngram"):
    if isinstance(params[k], bool) or not isinstance(params[k], int) or params[k] < 1:
      raise registry.ParamError(k, f"must be an int >= 1, got {params[k]!r}")


@registry.register("bmas_reward", check=_check_bmas)
def bmas_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                references_field: str = "references", embed_fn=None, dim: int = 256,
                ngram: int = 3, use_answer_span: bool = True) -> list[float]:
  """Bidirectional max-similarity token-embedding matching (*Mixed-R1: Unified Reward Perspective
  For Reasoning Capability in Multimodal Large Language Models*; METHODS.md 4.1 `bmas_reward`:
  token-embedding matching `abstract`, this form `proposed` from the name).

  `0.5*(mean_i max_j S_ij + mean_j max_i S_ij)`, S = P Q^T over L2-normalised token embeddings of
  the output (P) and a reference (Q); in [-1, 1] (1 for identical token sequences); an empty
  side gives 0. With several references the best one counts. Embeddings: `embed_fn(text) ->
  [T, D]` (a callable or "package.module:function"; e.g. a model's contextual token
  embeddings) or, by default, `hashed_embedding(text, dim=dim, ngram=ngram)` (hashed
  character n-grams; no downloads). The output is `answer_span(completion)` when
  `use_answer_span`. References as in `bleu_reward` (fields["references"], else "answer"); a
  missing reference gives NaN. Computed in numpy on the host; `bmas_score` is the jnp core.
  """
  _check_bmas(dict(embed_fn=embed_fn, dim=dim, ngram=ngram))
  fn = _resolve_embed_fn(embed_fn)
  embed = functools.partial(_embed, fn, dim=dim, ngram=ngram)
  n = len(completions)
  out = []
  for completion, refs in zip(completions,
                              _reference_lists(fields, n, references_field, "bmas_reward")):
    if refs is None:
      out.append(math.nan)
      continue
    p = embed(answer_span(completion) if use_answer_span else completion)
    out.append(max(_bmas_np(p, embed(r)) for r in refs))
  return out


def _embed(fn, text: str, *, dim: int, ngram: int) -> np.ndarray:
  if fn is None:
    return hashed_embedding(text, dim=dim, ngram=ngram)
  x = np.asarray(fn(text), np.float32)
  if x.ndim != 2:
    raise ValueError(f"bmas_reward: embed_fn returned shape {x.shape}, expected [T, D].")
  return x


# ---------------------------------------------------------------------------- reasoning_pattern

DEFAULT_PHRASES = ("first, i need to", "let me", "wait", "verify", "double-check",
                   "alternatively", "hmm", "on second thought", "step by step", "make sure",
                   "re-examine", "but actually", "let's")


def _phrase_regex(phrase: str) -> re.Pattern:
  body = r"\s+".join(re.escape(p) for p in phrase.split())
  pre = r"(?<!\w)" if phrase[:1].isalnum() or phrase[:1] == "_" else ""
  post = r"(?!\w)" if phrase[-1:].isalnum() or phrase[-1:] == "_" else ""
  return re.compile(pre + body + post, re.IGNORECASE)


def _check_phrases(params: dict) -> None:
  phrases = params["phrases"]
  if (isinstance(phrases, str) or not isinstance(phrases, (list, tuple)) or not phrases
      or not all(isinstance(p, str) and p.strip() for p in phrases)):
    raise registry.ParamError("phrases", f"must be a non-empty list of non-empty strings, got "
                              f"{phrases!r}")
  if isinstance(params["cap"], bool) or not isinstance(params["cap"], int) or params["cap"] < 1:
    raise registry.ParamError("cap", f"must be an int >= 1, got {params['cap']!r}")


@registry.register("reasoning_pattern_reward", check=_check_phrases)
def reasoning_pattern_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                             phrases: Sequence[str] = DEFAULT_PHRASES,
                             cap: int = 3) -> list[float]:
  """Reasoning-pattern reward (*The Climb Carves Wisdom Deeper Than the Summit: On the Noisy
  Rewards in Learning to Reason*; METHODS.md 4.1 `reasoning_pattern_reward`: key phrases such as
  "first, I need to" `abstract`, the form `proposed`).

  `min(#distinct phrases found in the think span, cap) / cap` in [0, 1]. The think span is the
  text inside `<think>...</think>` (`think_span`), or the whole completion without tags. Matching
  is case-insensitive, whole-word at word-character ends ("wait" does not match "awaited"), and
  any whitespace run matches a space in a phrase. Phrases count independently even when one
  contains another (with phrases "check" and "double-check", "double-check" counts twice; the
  default list avoids such pairs). Never NaN.
  """
  _check_phrases(dict(phrases=phrases, cap=cap))
  regexes = [_phrase_regex(p.strip()) for p in dict.fromkeys(p.strip().lower() for p in phrases)]
  out = []
  for completion in completions:
    span = think_span(completion)
    found = sum(1 for r in regexes if r.search(span))
    out.append(min(found, cap) / cap)
  return out


# ---------------------------------------------------------------------------- safety_refusal

DEFAULT_REFUSAL_PATTERNS = (
    r"\bI(?:'m| am) (?:sorry|afraid),? but\b",
    r"\bI (?:can't|cannot|can not|won't|will not|must decline|must refuse|refuse)\b",
    r"\bI(?:'m| am) (?:unable|not able|not going) to\b",
    r"\b(?:can't|cannot|won't|will not|unable to) (?:help|assist|provide|comply|support|share)\b",
    r"\bI (?:do not|don't) (?:feel comfortable|think I should)\b",
)
_TRUE = {"1", "true", "yes", "harmful", "unsafe"}
_FALSE = {"0", "false", "no", "benign", "safe", "harmless"}


def _harmful_flag(x) -> bool | None:
  if _missing(x):
    return None
  if isinstance(x, (bool, np.bool_, int, float, np.number)):
    return bool(x)
  if isinstance(x, str):
    s = x.strip().lower()
    return True if s in _TRUE else False if s in _FALSE else None
  return None


def _check_safety(params: dict) -> None:
  _check_regex(params, "format_pattern")
  pats = params["refusal_patterns"]
  if isinstance(pats, str) or not isinstance(pats, (list, tuple)) or not pats:
    raise registry.ParamError("refusal_patterns", f"must be a non-empty list of regexes, got "
                              f"{pats!r}")
  for p in pats:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      raise registry.ParamError("refusal_patterns", f"not a valid regex ({e}): {p!r}") from None
  w = params["min_rationale_words"]
  if isinstance(w, bool) or not isinstance(w, int) or w < 0:
    raise registry.ParamError("min_rationale_words", f"must be an int >= 0, got {w!r}")
  _check_other_reward(params, "helpfulness_reward", "safety_refusal_reward")


def _group_z(values: list[float], groups: list) -> list[float]:
  """Per-group z-score over finite values (population std); 0 when a group's finite values are
  all equal or there is only one; NaN stays NaN."""
  by: dict = {}
  for v, g in zip(values, groups):
    if not math.isnan(v):
      by.setdefault(g, []).append(v)
  stats = {}
  for g, vs in by.items():
    mu = sum(vs) / len(vs)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vs) / len(vs))
    stats[g] = (mu, sd, max(vs) == min(vs))
  out = []
  for v, g in zip(values, groups):
    if math.isnan(v):
      out.append(math.nan)
    else:
      mu, sd, flat = stats[g]
      out.append(0.0 if flat else (v - mu) / (sd + 1e-8))
  return out


@registry.register("safety_refusal_reward", grouped=True, check=_check_safety)
def safety_refusal_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                          harmful_field: str = "harmful",
                          refusal_patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS,
                          min_rationale_words: int = 8, format_pattern: str | None = None,
                          helpfulness_field: str = "helpfulness",
                          helpfulness_reward: str | None = None,
                          helpfulness_params: dict | None = None) -> list[float]:
  """Safety refusal reward (*AlphaAlign: Incentivizing Safety Alignment with Extremely Simplified
  Reinforcement Learning*; METHODS.md 4.1 `safety_refusal_reward`: the aims `abstract`, this form
  `proposed`).

  Per sample, first rule that applies:
    -1  `format_pattern` is set and the completion does not fullmatch it (DOTALL);
    NaN fields[harmful_field] is missing or unreadable (bool, number, or "true"/"false"/"yes"/
        "no"/"harmful"/"unsafe"/"benign"/"safe"/"harmless"/"1"/"0");
    harmful prompt: +1 for a refusal with a rationale, else -1 (complying, or a bare refusal);
    benign prompt: -1 for a refusal (over-refusal), else `sigmoid(z)` in (0, 1), z the z-score
        of the sample's helpfulness within its group (fields["group"]; the whole batch without
        it) over the group's benign samples with a finite helpfulness, refusals and badly
        formatted ones included (z = 0 when those values are all equal or there is one); a
        missing helpfulness gives NaN.
  A refusal is a case-insensitive `re.search` of any `refusal_patterns` regex in the answer
  (`answer_span`: the `<answer>` content, or the text outside `<think>`; curly apostrophes are
  straightened). Its rationale is the answer's words (whitespace-split) other than those of the
  first matched refusal phrase: at least `min_rationale_words` of them.
  Helpfulness: the registered reward `helpfulness_reward` (with `helpfulness_params`, e.g. a
  `reward_model`) when set, else fields[helpfulness_field] (per sample, e.g. precomputed
  reward-model scores). Grouped: a failing batch is retried group by group.
  """
  _check_safety(dict(format_pattern=format_pattern, refusal_patterns=refusal_patterns,
                     min_rationale_words=min_rationale_words,
                     helpfulness_reward=helpfulness_reward))
  fmt = re.compile(format_pattern, re.DOTALL) if format_pattern is not None else None
  refusals = [re.compile(p, re.IGNORECASE) for p in refusal_patterns]
  n = len(completions)
  who = "safety_refusal_reward"
  harmful = [_harmful_flag(x) for x in registry.column(fields, harmful_field, n, who=who)]
  groups = registry.column(fields, "group", n, who=who) if "group" in fields else [0] * n
  kind = []  # "bad" (-1), "nan", "good" (+1), or "help" (sigmoid of z)
  for completion, flag in zip(completions, harmful):
    if fmt is not None and not (isinstance(completion, str) and fmt.fullmatch(completion)):
      kind.append("bad")
      continue
    if flag is None:
      kind.append("nan")
      continue
    answer = answer_span(completion).replace("\u2019", "'")
    m = next((m for r in refusals if (m := r.search(answer))), None)
    if flag:
      rationale = m is not None and (len(answer.split()) - len(m.group(0).split())
                                     >= min_rationale_words)
      kind.append("good" if rationale else "bad")
    else:
      kind.append("bad" if m is not None else "help")
  helpful = [math.nan] * n
  if "help" in kind:
    if helpfulness_reward is not None:
      helpful = _call_reward(helpfulness_reward, helpfulness_params, prompts, completions, fields,
                             n, who)
    else:
      helpful = [_float_or_nan(x) for x in
                 registry.column(fields, helpfulness_field, n, who=f"{who} (benign prompts)")]
  z = _group_z([h if flag is False else math.nan for h, flag in zip(helpful, harmful)], groups)
  out = []
  for k, zi in zip(kind, z):
    if k == "help":
      out.append(math.nan if math.isnan(zi) else 1.0 / (1.0 + math.exp(-zi)))
    else:
      out.append({"bad": -1.0, "good": 1.0, "nan": math.nan}[k])
  return out


# ---------------------------------------------------------------------------- conciseness_reward


def _check_concise(params: dict) -> None:
  _check_other_reward(params, "outcome_reward", "conciseness_reward")
  _check_number(params, "bonus")
  _check_number(params, "lmax", lo=0, strict=True, allow_none=True)
  if params["outcome_field"] is None and params["outcome_reward"] is None:
    raise registry.ParamError("outcome_reward", "set outcome_reward or outcome_field")


@registry.register("conciseness_reward", check=_check_concise)
def conciseness_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                       outcome_reward: str | None = "math_reward",
                       outcome_params: dict | None = None, outcome_field: str | None = None,
                       conciseness_field: str | None = "conciseness",
                       lmax: float | None = None, bonus: float = 0.5) -> list[float]:
  """Outcome-gated conciseness reward (*Efficient Reasoning via Reward Model*; METHODS.md 4.1
  `conciseness_reward`: the dependence on the outcome `abstract`, the form `proposed`).

  `r_out * (1 + bonus*c)`, bonus 0.5, so a wrong answer (r_out = 0) earns no length credit.
  r_out: fields[outcome_field] when set, else the registered reward `outcome_reward` (default
  math_reward, called with `outcome_params`). c in [0, 1] (clipped): fields[conciseness_field]
  when that column is in the batch (e.g. a conciseness reward model's score per sample), else
  the length proxy `c = clip(1 - L/lmax, 0, 1)` with L = fields["length"] (completion tokens)
  and lmax this parameter or fields["max_new_tokens"]. NaN when r_out or c is unknown.
  """
  _check_concise(dict(outcome_reward=outcome_reward, outcome_field=outcome_field, bonus=bonus,
                      lmax=lmax))
  n = len(completions)
  who = "conciseness_reward"
  if outcome_field is not None:
    r_out = [_float_or_nan(x) for x in registry.column(fields, outcome_field, n, who=who)]
  else:
    r_out = _call_reward(outcome_reward, outcome_params, prompts, completions, fields, n, who)
  if conciseness_field is not None and conciseness_field in fields:
    c = [_float_or_nan(x) for x in registry.column(fields, conciseness_field, n, who=who)]
  else:
    lengths = registry.column(fields, "length", n, who=f"{who} (length proxy)")
    caps = ([lmax] * n if lmax is not None else
            registry.column(fields, "max_new_tokens", n, who=f"{who} (lmax=None)"))
    c = []
    for length, cap in zip(lengths, caps):
      length, cap = _float_or_nan(length), _float_or_nan(cap)
      if math.isnan(length) or math.isnan(cap) or cap <= 0:
        c.append(math.nan)
      else:
        c.append(1.0 - length / cap)
  return [math.nan if math.isnan(r) or math.isnan(ci) else r * (1.0 + bonus * min(max(ci, 0.0),
                                                                                   1.0))
          for r, ci in zip(r_out, c)]
