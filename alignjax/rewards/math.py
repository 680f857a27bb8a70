"""Verifiable math reward (METHODS.md 4.1 `math_reward`, standard; GSM8K / MATH answer checking).

Answer extraction, in order (`extract_answer`):
  1. the last brace-balanced `\\boxed{...}` or `\\fbox{...}` (unclosed ones are skipped; if every
     marker is unclosed there is no answer);
  2. GSM8K: the last `####\\s*(-?[\\d,]*\\.?\\d+)`;
  3. extension (`fallback="last_number"`, the default), when neither marker is present: the whole
     text if it is a number (e.g. "-\\frac{1}{2}"), else the last number in it (integer, decimal,
     thousands commas, `a/b`), so bare answers such as the arithmetic task's "46" are read.
Answers are compared as exact Fractions, then as floats within `abs_tol + rel_tol*|g|` (only when
one side is not an integer: two integers must be equal), then as normalised strings.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Sequence

from alignjax.rewards import registry

FALLBACKS = ("last_number", "none")
GOLD_FIELDS = ("answer", "completion", "solution")  # lookup order for the default answer_field
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_LAST_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*(?:\d+))?")
_DEC_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?[\d.]+)\}\{([+-]?[\d.]+)\}")
_FRAC_SHORT_RE = re.compile(r"([+-]?)\\frac(\d)(\d)")
_SLASH_RE = re.compile(r"([+-]?[\d.]+)/([+-]?[\d.]+)")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_UNIT_TAIL_RE = re.compile(r"^(.*?[\d}])\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}$")
_UNIT_WORD_RE = re.compile(r"^([+-]?[\d.,/]+)\s*[a-zA-Z]+(?:\s+[a-zA-Z]+)?\.?$")


# ---------------------------------------------------------------------------- extraction


def _boxed(text: str) -> tuple[bool, str | None]:
  """(marker present, content of the last balanced \\boxed{} / \\fbox{})."""
  starts = {m.end() - 1 for m in _BOX_RE.finditer(text)}  # positions of the markers' "{"
  if not starts:
    return False, None
  stack, best = [], None  # one linear pass: the closed marker that opens last wins
  for j, c in enumerate(text):
    if c == "{":
      stack.append(j)
    elif c == "}" and stack:
      start = stack.pop()
      if start in starts and (best is None or start > best[0]):
        best = (start, j)
  return True, (text[best[0] + 1:best[1]] if best else None)


def extract_answer(text: str, *, fallback: str = "last_number") -> str | None:
  """The final answer in `text` (see the module docstring for the order), or None.

  E.g. "so \\boxed{\\frac{1}{2}}." -> "\\frac{1}{2}"; "... #### 1,234" -> "1,234"; "46" -> "46".
  """
  if fallback not in FALLBACKS:
    raise registry.ParamError("fallback", f"must be one of {FALLBACKS}, got {fallback!r}")
  if not isinstance(text, str):
    return None
  has_box, boxed = _boxed(text)
  if has_box:
    return boxed.strip() if boxed is not None else None
  found = _GSM_RE.findall(text)
  if found:
    return found[-1]
  if fallback == "last_number":
    if parse_number(normalize(text)) is not None:  # the whole text is a number: "-\\frac{1}{2}"
      return text.strip()
    found = _LAST_NUM_RE.findall(text)
    return found[-1].replace(" ", "") if found else None
  return None


# ---------------------------------------------------------------------------- normalisation


def normalize(s: str) -> str:
  """Canonical string form of an answer: no `$`, spacing macros, `\\left`/`\\right`, `^\\circ`,
  `%`, thousands commas, `\\text{}` wrappers or trailing units, leading `x=`, trailing `.`, spaces.
  """
  s = s.strip().replace("$", "")
  for macro in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\left", "\\right", "^{\\circ}", "^\\circ",
                "\\%", "%", "\\displaystyle"):
    s = s.replace(macro, "" if macro != "\\ " else " ")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip()
  while (m := _UNIT_TAIL_RE.match(s)):  # "5\text{ cm}" -> "5"
    s = m.group(1).strip()
  s = _TEXT_RE.sub(lambda m: m.group(1), s).strip()  # "\text{(B)}" -> "(B)"
  s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 3" -> "3"
  if (m := _UNIT_WORD_RE.match(s)):  # "5 apples" -> "5"
    s = m.group(1)
  s = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", s)
  s = s.rstrip(".").strip()
  while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
    s = s[1:-1].strip()
  return re.sub(r"\s+", "", s)


def _balanced(s: str) -> bool:
  depth = 0
  for c in s:
    depth += {"{": 1, "}": -1}.get(c, 0)
    if depth < 0:
      return False
  return depth == 0


def _dec(s: str) -> Fraction | None:
  if not _DEC_RE.fullmatch(s):
    return None
  try:
    return Fraction(s)
  except (ValueError, ZeroDivisionError):  # e.g. more digits than int() converts
    return None


def parse_number(s: str) -> Fraction | None:
  """A normalised answer as a Fraction: integers, decimals, `a/b`, `\\frac{a}{b}`, `\\frac12`,
  with an optional sign; None for anything else (and for a zero denominator)."""
  if (x := _dec(s)) is not None:
    return x
  for regex in (_FRAC_RE, _FRAC_SHORT_RE):
    if (m := regex.fullmatch(s)):
      a, b = _dec(m.group(2)), _dec(m.group(3))
      if a is None or not b:
        return None
      return (-1 if m.group(1) == "-" else 1) * a / b
  if (m := _SLASH_RE.fullmatch(s)):
    a, b = _dec(m.group(1)), _dec(m.group(2))
    return a / b if a is not None and b else None
  return None


def answers_match(pred: str, gold: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
  """Equal as Fractions; or, unless both are integers, as floats within abs_tol + rel_tol*|g|;
  or as normalised strings."""
  p, g = normalize(pred), normalize(gold)
  if not g:
    return False
  x, y = parse_number(p), parse_number(g)
  if x is not None and y is not None:
    if x == y:
      return True
    if x.denominator == 1 and y.denominator == 1:
      return False
    try:
      return abs(float(x) - float(y)) <= abs_tol + rel_tol * abs(float(y))
    except OverflowError:
      return False
  return p == g


# ---------------------------------------------------------------------------- gold answers


def gold_texts(fields, n: int, answer_field: str, *, who: str) -> list:
  """Per-sample gold values: fields[answer_field]; for the default "answer" the first present of
  GOLD_FIELDS ("answer", then "completion", then "solution"), per sample (None when absent)."""
  keys = GOLD_FIELDS if answer_field == "answer" else (answer_field,)
  cols = [registry.column(fields, k, n, who=who) for k in keys if k in fields]
  if not cols:
    raise ValueError(f"{who} needs a gold answer in fields[{'] or fields['.join(keys)}] "
                     f"(answer_field={answer_field!r}); fields: {', '.join(sorted(fields))}.")
  return [next((c[i] for c in cols if not _missing(c[i])), None) for i in range(n)]


def _missing(x) -> bool:
  return x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str)
                                                                     and not x.strip())


def gold_answer(gold) -> str | None:
  """The answer in a gold value: the boxed / `####` answer when the text has one, else the whole
  stripped text; numbers are formatted with str(); None when missing or a marker is unclosed."""
  if _missing(gold):
    return None
  if isinstance(gold, (int, float, Fraction)) and not isinstance(gold, bool):
    return str(gold)
  if not isinstance(gold, str):
    return None
  if _BOX_RE.search(gold) or _GSM_RE.search(gold):
    return extract_answer(gold, fallback="none")
  return gold.strip()


def _check(params: dict) -> None:
  if params["fallback"] not in FALLBACKS:
    raise registry.ParamError("fallback", f"must be one of {FALLBACKS}, got "
                              f"{params['fallback']!r}")
  for k in ("rel_tol", "abs_tol"):
    if not isinstance(params[k], (int, float)) or params[k] < 0:
      raise registry.ParamError(k, f"must be a number >= 0, got {params[k]!r}")


@registry.register("math_reward", check=_check)
def math_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                answer_field: str = "answer", fallback: str = "last_number",
                rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> list[float]:
  """Math answer correctness (METHODS.md 4.1 `math_reward`, standard).

  1.0 if the extracted answer equals the gold answer (`answers_match`), 0.0 if it differs or no
  answer is found, NaN (unscorable) if the gold is missing or unparsable. A gold value may be a
  list of acceptable answers (any match scores 1).

  Args:
    answer_field: dataset field with the gold answer; the default "answer" falls back to
      "completion" (SFT records, e.g. the arithmetic task) and then "solution" (MATH).
    fallback: "last_number" (the last number when there is no \\boxed{} / ####; our extension)
      or "none".
    rel_tol, abs_tol: float tolerance `abs_tol + rel_tol*|g|` (not used between two integers).
  """
  _check(dict(fallback=fallback, rel_tol=rel_tol, abs_tol=abs_tol))
  n = len(completions)
  out = []
  for completion, gold in zip(completions, gold_texts(fields, n, answer_field, who="math_reward")):
    golds = [gold_answer(g) for g in (gold if isinstance(gold, (list, tuple)) else [gold])]
    golds = [g for g in golds if g is not None and normalize(g)]
    if not golds:
      out.append(math.nan)
      continue
    pred = extract_answer(completion, fallback=fallback)
    ok = pred is not None and any(answers_match(pred, g, rel_tol=rel_tol, abs_tol=abs_tol)
                                  for g in golds)
    out.append(float(ok))
  return out
