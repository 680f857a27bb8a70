"""Rule-based rewards: `format_reward`, `length_penalty` (METHODS.md 4.1), `exact_match` and
`letters_score` (the synthetic preference task's ground truth)."""

from __future__ import annotations

import math
import re
from typing import Sequence

from alignjax.rewards import registry
from alignjax.rewards.math import gold_texts

DEFAULT_FORMAT = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
LENGTH_MODES = ("linear", "group")


# ---------------------------------------------------------------------------- format_reward


def _check_format(params: dict) -> None:
  try:
    re.compile(params["pattern"], re.DOTALL)
  except (re.error, TypeError) as e:
    raise registry.ParamError("pattern",
                              f"not a valid regex ({e}): {params['pattern']!r}") from None


@registry.register("format_reward", check=_check_format)
def format_reward(prompts: Sequence[str], completions: Sequence[str], fields, *,
                  pattern: str = DEFAULT_FORMAT) -> list[float]:
  """Format reward (METHODS.md 4.1 `format_reward`, standard; DeepSeek-R1 style tags).

  1.0 if the whole completion matches `pattern` (`re.fullmatch`, DOTALL), else 0.0. The default
  asks for `<think>...</think>` then `<answer>...</answer>` and nothing else (no trailing space).
  """
  _check_format({"pattern": pattern})
  regex = re.compile(pattern, re.DOTALL)
  return [float(isinstance(c, str) and regex.fullmatch(c) is not None) for c in completions]


# ---------------------------------------------------------------------------- length_penalty


def _check_length(params: dict) -> None:
  if params["mode"] not in LENGTH_MODES:
    raise registry.ParamError("mode", f"must be one of {LENGTH_MODES}, got {params['mode']!r}")
  if not isinstance(params["coef"], (int, float)):
    raise registry.ParamError("coef", f"must be a number, got {params['coef']!r}")
  lmax, l0 = params["lmax"], params["l0"]
  if not isinstance(l0, (int, float)) or l0 < 0:
    raise registry.ParamError("l0", f"must be a number >= 0, got {l0!r}")
  if lmax is not None and (not isinstance(lmax, (int, float)) or lmax <= l0):
    raise registry.ParamError("lmax", f"must be None (fields['max_new_tokens']) or a number "
                              f"> l0={l0}, got {lmax!r}")
  if params["correct_reward"] == "length_penalty":
    raise registry.ParamError("correct_reward", "cannot be length_penalty itself")


def _length(x) -> float:
  return math.nan if x is None else float(x)


def _correctness(prompts, completions, fields, n, correct_field, correct_reward, correct_params,
                 threshold) -> list[float]:
  """1.0 / 0.0 / NaN per sample, from fields[correct_field] or the reward `correct_reward`."""
  if correct_field is not None:
    raw = registry.column(fields, correct_field, n, who="length_penalty(mode='group')")
  else:
    raw = list(registry.get(correct_reward).fn(prompts, completions, fields,
                                                **(correct_params or {})))
    if len(raw) != n:
      raise ValueError(f"length_penalty: correct_reward {correct_reward!r} returned {len(raw)} "
                       f"values for {n} samples.")
  vals = [math.nan if v is None else float(v) for v in raw]
  return [v if math.isnan(v) else float(v >= threshold) for v in vals]


@registry.register("length_penalty", grouped=True, check=_check_length)
def length_penalty(prompts: Sequence[str], completions: Sequence[str], fields, *,
                   mode: str = "linear", coef: float = 1.0, l0: float = 0,
                   lmax: float | None = None,
                   correct_field: str | None = None, correct_reward: str = "math_reward",
                   correct_params: dict | None = None, threshold: float = 0.5) -> list[float]:
  """Length penalty (METHODS.md 4.1 `length_penalty`). L = fields["length"] (completion tokens).

  mode="linear" (proposed): `-coef * max(0, L-l0) / (lmax-l0)`, lmax defaulting to
    fields["max_new_tokens"]; 0 up to l0 tokens, -coef at lmax (below -coef beyond it).
  mode="group" (Kimi k1.5, recalled - verify): per prompt group b = fields["group"],
    `lam = .5 - (L-Lmin_b)/(Lmax_b-Lmin_b)`; `coef*lam` if correct, `coef*min(0, lam)` if wrong,
    0 if all lengths of the group are equal. Correct means value >= threshold of
    fields[correct_field] if set, else of the registered reward `correct_reward` (called with
    `correct_params`); unknown correctness gives NaN.
  A sample without a length is unscorable (NaN).
  """
  _check_length(dict(mode=mode, coef=coef, l0=l0, lmax=lmax, correct_reward=correct_reward))
  n = len(completions)
  lengths = [_length(x) for x in registry.column(fields, "length", n, who="length_penalty")]
  if mode == "linear":
    if lmax is None:
      caps = registry.column(fields, "max_new_tokens", n, who="length_penalty(lmax=None)")
    else:
      caps = [lmax] * n
    out = []
    for length, cap in zip(lengths, caps):
      if math.isnan(length):
        out.append(math.nan)
        continue
      if cap is None or float(cap) <= l0:
        raise ValueError(f"length_penalty: lmax (max_new_tokens) must exceed l0={l0}, got {cap}.")
      out.append(-coef * max(0.0, length - l0) / (float(cap) - l0))
    return out
  groups = registry.column(fields, "group", n, who="length_penalty(mode='group')")
  correct = _correctness(prompts, completions, fields, n, correct_field, correct_reward,
                         correct_params, threshold)
  bounds: dict = {}
  for g, length in zip(groups, lengths):
    if not math.isnan(length):
      lo, hi = bounds.get(g, (length, length))
      bounds[g] = (min(lo, length), max(hi, length))
  out = []
  for g, length, c in zip(groups, lengths, correct):
    if math.isnan(length):
      out.append(math.nan)
      continue
    lo, hi = bounds[g]
    if hi == lo:
      out.append(0.0)
    elif math.isnan(c):
      out.append(math.nan)
    else:
      lam = 0.5 - (length - lo) / (hi - lo)
      out.append(coef * (lam if c else min(0.0, lam)))
  return out


# ---------------------------------------------------------------------------- exact_match


@registry.register("exact_match")
def exact_match(prompts: Sequence[str], completions: Sequence[str], fields, *,
                answer_field: str = "answer") -> list[float]:
  """Exact match (standard baseline; no METHODS.md id: the strict form of 4.1 `math_reward`).

  1.0 if `completion.strip() == str(gold).strip()`, else 0.0; NaN if the gold is missing. Gold
  lookup as in `math_reward` ("answer", then "completion", then "solution" for the default
  answer_field); a list gold matches any entry."""
  out = []
  for c, gold in zip(completions, gold_texts(fields, len(completions), answer_field,
                                             who="exact_match")):
    golds = [str(g).strip() for g in (gold if isinstance(gold, (list, tuple)) else [gold])
             if g is not None and not (isinstance(g, float) and math.isnan(g))]
    out.append(float(str(c).strip() in golds) if golds else math.nan)
  return out


# ---------------------------------------------------------------------------- letters_score


@registry.register("letters_score")
def letters_score(prompts: Sequence[str], completions: Sequence[str], fields) -> list[float]:
  """The hidden ground truth of the built-in synthetic preference ("letters") task: how many
  distinct letters of the prompt's word occur in the completion
  (`alignjax.data.synthetic.true_score`; repeats earn nothing). The gold measuring stick of
  configs/overoptimization.py; no METHODS.md id."""
  from alignjax.data.synthetic import true_score  # noqa: PLC0415
  return [float(true_score(p, c)) for p, c in zip(prompts, completions)]
