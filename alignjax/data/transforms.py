"""Record-level data transforms, relabeling and curation (METHODS section 5).

Host-side functions over raw record dicts, the schema `records.validate_preference` reads
(pairwise: "prompt", "chosen", "rejected"; listwise: "prompt", "responses", "scores" or
"ranking"; strings or message lists; extra keys kept). They run as plain Python over lists
and as grain transforms:

  one-to-many   reward_augmented, pairs_from_list, master_key_records
                -> grain.experimental.FlatMapTransform classes RewardAugmented, PairsFromList,
                   MasterKeyRecords (`MapDataset.apply(...)`), or `flat_apply(fn, records)`
  filters       strength_keep (per record: `ds.filter(functools.partial(strength_keep, ...))`)
  whole-dataset strength_filter, master_key_negatives (lists -> (records, counts))
  mixing        real_data_mix (iterator), real_data_mix_dataset (grain MapDataset)
  arrays        pair_indices, luce_curate, luce_probabilities (numpy, host; outputs vary in size)

Provenance: every derived record is a copy of its input (so "id" and all other fields are
kept, except those the transform replaces) plus
  "source_id"  the input's "source_id" if set, else its "id", else its position in the input
               list when known (else None). Not the batch key `source_id` of preference.py,
               which indexes the "source" vocabulary; the pipeline ignores this field.
  "transform"  a tag such as "reward_augmented:1" or "pairs_from_list:0>2", appended with
               "|" to the input's own "transform" when transforms are chained.
One input gives several outputs with the same "id": ("id", "transform") is unique.

Errors on bad records are `records.RecordError`s that name the record (position and/or id),
the field and what to do; bad arguments raise ValueError.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import grain
import numpy as np

from alignjax.data import records as records_lib
from alignjax.data.records import RecordError
from alignjax.losses.ensemble import FLIP, MARGIN, SMOOTH

DEFAULT_SCORE_TEMPLATE = "target score: {score}"
PLACEMENTS = ("system", "prefix", "suffix")
PAIR_MODES = ("best_worst", "all_pairs", "best_vs_random")
STRENGTH_MODES = ("threshold", "drop_quantile", "quantile", "snr", "route")
# Fields that describe how much `chosen` beats `rejected` (pref_strength, scaled BT, labels).
PAIR_ANNOTATIONS = ("margin", "margin_std", "strength", "strength_route", "strength_flipped",
                    "gap", "label")
LISTWISE_FIELDS = ("responses", "scores", "ranking", "order")
# Master keys of *One Token to Fool LLM-as-a-Judge* (METHODS section 5) ...
MASTER_KEYS = (":", ".", "Thought process:", "Let's solve this problem step by step.",
               "Solution")
# ... and translations of them (zh, ja, es, fr, de).
TRANSLATED_MASTER_KEYS = ("解", "思考过程：", "让我们一步一步地解决这个问题。", "かいせつ",
                          "解答", "Respuesta", "Solución", "Processus de réflexion :",
                          "Lösung")
DEFAULT_KEYS = MASTER_KEYS + TRANSLATED_MASTER_KEYS
JUDGE_FIELDS = {"prompt": "prompt", "reference": "reference", "response": "response",
                "label": "label"}
TRANSFORM_HINT = "fix or drop the record before this transform"


# --- helpers ---------------------------------------------------------------------------------

def _where(record: Any, index: int | None) -> str:
  rid = record.get("id") if isinstance(record, dict) else None
  if index is not None and rid is not None:
    return f"record {index} (id {rid!r})"
  if index is not None:
    return f"record {index}"
  return f"record id {rid!r}" if rid is not None else "record (no id)"


def _check_dict(record: Any, where: str) -> None:
  if not isinstance(record, dict):
    raise RecordError(where, None, f"expected a record dict, got {records_lib._type_name(record)}",
                      TRANSFORM_HINT)


def _validated(record: Any, where: str, kind: str) -> dict[str, Any]:
  """validate_preference with a hint that fits transforms (not data.skip_malformed)."""
  _check_dict(record, where)
  try:
    return records_lib.validate_preference(record, where, kind=kind)
  except RecordError as e:
    raise RecordError(e.where, e.field, e.problem, TRANSFORM_HINT) from None


def _number(record: dict, field: str, where: str, hint: str) -> float:
  if record.get(field) is None:
    raise RecordError(where, field, "missing", hint)
  try:
    return records_lib._number(record[field], field, where)
  except RecordError as e:
    raise RecordError(e.where, e.field, e.problem, hint) from None


def _derived(record: dict, index: int | None, tag: str, drop: Iterable[str] = (),
             **fields) -> dict[str, Any]:
  """A copy of `record` without `drop`, with `fields` and the provenance fields set."""
  out = {k: v for k, v in record.items() if k not in drop}
  out.update(fields)
  source = record.get("source_id")
  out["source_id"] = source if source is not None else record.get("id", index)
  prev = record.get("transform")
  out["transform"] = f"{prev}|{tag}" if prev else tag
  return out


def _canonical(score: float) -> int | float:
  """8.0 -> 8, 7.5 -> 7.5: the same text whether a score was read as int or float."""
  score = float(score)
  return int(score) if score.is_integer() else score


def _record_rng(seed: int, record: dict) -> np.random.Generator:
  """A generator that depends only on `seed` and the record (its "id", else its content), so a
  record gets the same draws wherever it sits and however the pipeline is sharded."""
  key = (f"id:{record['id']}" if record.get("id") is not None
         else json.dumps(record, sort_keys=True, default=str))
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return np.random.default_rng([int(seed), int.from_bytes(digest, "little")])


def flat_apply(fn: Callable[..., list[dict]], records: Iterable[dict], **kwargs
               ) -> Iterator[dict]:
  """Generator: `fn(record, index=i, **kwargs)` for every record in order, flattened.

  E.g. `list(flat_apply(reward_augmented, records, where="prefix"))`. Positions `i` name the
  records in errors and stand in for a missing "id" in "source_id".
  """
  for i, record in enumerate(records):
    yield from fn(record, index=i, **kwargs)


# --- reward_augmented ------------------------------------------------------------------------

def condition_prompt(prompt: str | list[dict[str, str]], score: float, *,
                     template: str = DEFAULT_SCORE_TEMPLATE, where: str = "system",
                     sep: str = "\n") -> str | list[dict[str, str]]:
  """The prompt conditioned on a target score: the line `template.format(score=score)` put in.

  Part of `reward_augmented` (*Reward-Augmented Data Enhances Direct Preference Alignment of
  LLMs*). At inference, condition on the highest score of the training data (s_max) with the
  same template, placement and separator. Integral scores print without ".0" (8.0 -> "8").
    where="system"  messages: appended (after `sep`) to a leading system message, or a new
                    system message in front; a string prompt: as "prefix"
    where="prefix"  line + sep + prompt (messages: of the first user message)
    where="suffix"  prompt + sep + line (messages: of the last user message)
  """
  if where not in PLACEMENTS:
    raise ValueError(f"condition_prompt: where must be one of {PLACEMENTS}, got {where!r}")
  try:
    line = template.format(score=_canonical(score))
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"condition_prompt: template {template!r} does not format with a score "
                     f"({e!r}); use one field named {{score}}") from None
  if isinstance(prompt, str):
    return prompt + sep + line if where == "suffix" else line + sep + prompt
  if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and
                                             "content" in m for m in prompt):
    raise ValueError(f"condition_prompt: prompt must be a string or a list of "
                     f"{{'role', 'content'}} messages, got {type(prompt).__name__}")
  msgs = [dict(m) for m in prompt]
  if where == "system":
    if msgs and msgs[0]["role"] == "system":
      msgs[0]["content"] = msgs[0]["content"] + sep + line
    else:
      msgs.insert(0, {"role": "system", "content": line})
    return msgs
  users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
  if not users:
    raise ValueError("condition_prompt: the prompt has no user message; use where='system'")
  i = users[0] if where == "prefix" else users[-1]
  c = msgs[i]["content"]
  msgs[i]["content"] = line + sep + c if where == "prefix" else c + sep + line
  return msgs


def reward_augmented(record: dict, *, template: str = DEFAULT_SCORE_TEMPLATE,
                     where: str = "system", sep: str = "\n",
                     score_fields: tuple[str, str] = ("score_chosen", "score_rejected"),
                     index: int | None = None) -> list[dict]:
  """Reward-augmented pairs: one scored pair -> two goal-conditioned pairs.

  Method id `reward_augmented`, *Reward-Augmented Data Enhances Direct Preference Alignment of
  LLMs*. A pairwise record (x, y_w, y_l) with scores s_w, s_l (`score_fields`, by default
  UltraFeedback's "score_chosen"/"score_rejected") gives
    (cond(x, s_w), chosen y_w, rejected y_l)   transform "reward_augmented:0"
    (cond(x, s_l), chosen y_l, rejected y_w)   transform "reward_augmented:1", only if s_w != s_l
  with cond = `condition_prompt(x, s, template=, where=, sep=)` and the score fields set to the
  new chosen/rejected scores. The prompt is made explicit (a conversational pair without
  "prompt" gets its implicit one) and repeated prompt messages are removed from the responses.
  Pair annotations (margin, margin_std, strength, strength_route, strength_flipped, gap, label)
  are dropped: they describe the unconditioned pair. A record labelled as a tie or as
  "rejected is better" (label 0 / -1) is an error.
  """
  loc = _where(record, index)
  _check_dict(record, loc)
  hint = "add the chosen and rejected scores, or set score_fields= to their field names"
  s_w, s_l = (_number(record, f, loc, hint) for f in score_fields)
  if record.get("label") not in (None, 1, 1.0):
    raise RecordError(loc, "label", f"reward_augmented needs chosen preferred (label 1 or "
                      f"absent), got {record['label']!r}", "swap or drop such pairs first")
  norm = _validated(record, loc, "pairwise")
  y_w, y_l = norm["responses"]
  f_w, f_l = score_fields
  out = [_derived(record, index, "reward_augmented:0", PAIR_ANNOTATIONS,
                  prompt=condition_prompt(norm["prompt"], s_w, template=template, where=where,
                                          sep=sep),
                  chosen=y_w, rejected=y_l, **{f_w: record[f_w], f_l: record[f_l]})]
  if s_w != s_l:
    out.append(_derived(record, index, "reward_augmented:1", PAIR_ANNOTATIONS,
                        prompt=condition_prompt(norm["prompt"], s_l, template=template,
                                                where=where, sep=sep),
                        chosen=y_l, rejected=y_w, **{f_w: record[f_l], f_l: record[f_w]}))
  return out


class RewardAugmented(grain.experimental.FlatMapTransform):
  """grain FlatMapTransform of `reward_augmented` (max_fan_out 2), e.g.
  `ds.apply(RewardAugmented(where="prefix"))`. On a MapDataset the unused slot is None, which
  `to_iter_dataset()` / iteration skip."""

  max_fan_out = 2

  def __init__(self, **kwargs):
    self.kwargs = kwargs

  def flat_map(self, record):
    return reward_augmented(record, **self.kwargs)


# --- pairs_from_list -------------------------------------------------------------------------

class PairIndices(NamedTuple):
  rows: np.ndarray   # int32 [P]: the row (prompt) of each pair
  pairs: np.ndarray  # int32 [P,2]: (chosen, rejected) column indices
  gap: np.ndarray    # float32 [P]: s[chosen] - s[rejected] > min_gap


def _check_pair_args(mode: str, min_gap: float, max_pairs: int | None) -> None:
  if mode not in PAIR_MODES:
    raise ValueError(f"pairs_from_list: unknown mode {mode!r}; expected one of {PAIR_MODES}")
  if not min_gap >= 0:
    raise ValueError(f"pairs_from_list: min_gap must be >= 0 (ties never make a pair), got "
                     f"{min_gap}")
  if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int)
                                or max_pairs < 1):
    raise ValueError(f"pairs_from_list: max_pairs must be None or an int >= 1, got {max_pairs!r}")


def _row_pairs(s: Sequence[float], valid: Sequence[bool], mode: str, min_gap: float,
               max_pairs: int | None, rng: np.random.Generator | None
               ) -> list[tuple[int, int, float]]:
  """(chosen, rejected, gap) of one row; rank = stable best-first order (ties: lower index)."""
  order = sorted((k for k in range(len(s)) if valid[k]), key=lambda k: -s[k])
  if len(order) < 2:
    return []
  best = order[0]
  if mode == "best_worst":
    worst = order[-1]
    gap = s[best] - s[worst]
    return [] if best == worst or gap <= min_gap else [(best, worst, gap)]
  if mode == "all_pairs":
    cands = [(order[a], order[b], s[order[a]] - s[order[b]])
             for a in range(len(order)) for b in range(a + 1, len(order))
             if s[order[a]] - s[order[b]] > min_gap]
    if max_pairs is not None and len(cands) > max_pairs:  # the largest gaps, ties by rank
      keep = sorted(sorted(range(len(cands)), key=lambda t: -cands[t][2])[:max_pairs])
      cands = [cands[t] for t in keep]
    return cands
  others = sorted(k for k in order[1:] if s[best] - s[k] > min_gap)  # best_vs_random
  if not others:
    return []
  picks = rng.choice(len(others), size=min(max_pairs or 1, len(others)), replace=False)
  return [(best, others[t], s[best] - s[others[t]]) for t in sorted(picks)]


def pair_indices(s, valid=None, *, mode: str = "best_worst", min_gap: float = 0.0,
                 max_pairs: int | None = None, seed: int = 0) -> PairIndices:
  """Preference pairs from K scored responses per prompt: `s [N,K]`, `valid [N,K]` ->
  `PairIndices(rows [P], pairs [P,2], gap [P])`, rows in order.

  Method id `pairs_from_list` (all pairs as in *Training language models to follow
  instructions with human feedback*). Responses are ranked by a stable best-first sort, so
  equal scores go to the lower index (it ranks higher). A pair needs gap > min_gap (>= 0).
    best_worst      (best, worst) per row; the row is dropped if gap <= min_gap or best == worst
    all_pairs       every (i, j), i ranked above j, with s_i - s_j > min_gap, in rank order;
                    `max_pairs` keeps the largest gaps of a row (ties by rank order)
    best_vs_random  (best, j), j drawn uniformly from the valid j with s_best - s_j > min_gap
                    (`max_pairs` draws, without replacement; default 1); seeded by `seed`
  The gap feeds `gapo`, `dpo_dynamic_beta` and `bt_margin`. Host numpy (P varies).
  """
  _check_pair_args(mode, min_gap, max_pairs)
  s_NxK = np.asarray(s, np.float64)
  if s_NxK.ndim != 2:
    raise ValueError(f"pair_indices: s must be [N,K], got shape {s_NxK.shape}")
  v_NxK = np.ones(s_NxK.shape, bool) if valid is None else np.asarray(valid) > 0
  if v_NxK.shape != s_NxK.shape:
    raise ValueError(f"pair_indices: valid has shape {v_NxK.shape}, s has {s_NxK.shape}")
  bad = np.argwhere(v_NxK & ~np.isfinite(s_NxK))
  if bad.size:
    n, k = bad[0]
    raise ValueError(f"pair_indices: s[{n}, {k}] = {s_NxK[n, k]} is valid but not finite; fix "
                     "the score or set valid[n, k] = 0")
  rng = np.random.default_rng(seed)
  rows, pairs, gaps = [], [], []
  for n in range(s_NxK.shape[0]):
    for i, j, g in _row_pairs(s_NxK[n].tolist(), v_NxK[n].tolist(), mode, min_gap, max_pairs,
                              rng):
      rows.append(n)
      pairs.append((i, j))
      gaps.append(g)
  return PairIndices(np.asarray(rows, np.int32), np.asarray(pairs, np.int32).reshape(-1, 2),
                     np.asarray(gaps, np.float32))


def pairs_from_list(record: dict, *, mode: str = "best_worst", min_gap: float = 0.0,
                    max_pairs: int | None = None, seed: int = 0, margin_field: str | None = None,
                    index: int | None = None) -> list[dict]:
  """Pairwise records from one listwise record ("responses" with "scores" or "ranking").

  Method id `pairs_from_list`; the pair choice is `pair_indices` on the record's scores (from a
  ranking: n - rank), ties to the lower index. Each pair (i, j) is a copy of the record without
  responses/scores/ranking, with the explicit prompt, "chosen" = responses[i], "rejected" =
  responses[j], "score_chosen", "score_rejected", "gap" = s_i - s_j, "pair" = [i, j] and
  transform "pairs_from_list:i>j". `margin_field` (e.g. "margin", which the pipeline puts in
  the batch for `bt_margin`) also gets the gap; off by default because score units differ from
  reward units. best_vs_random draws depend only on `seed` and the record ("id", else content).
  No pair (ties, one response, gap <= min_gap) gives [].
  """
  _check_pair_args(mode, min_gap, max_pairs)
  loc = _where(record, index)
  norm = _validated(record, loc, "listwise")
  s, resp = norm["scores"], norm["responses"]
  rng = _record_rng(seed, record) if mode == "best_vs_random" else None
  out = []
  for i, j, g in _row_pairs(s, [True] * len(s), mode, min_gap, max_pairs, rng):
    extra = {margin_field: g} if margin_field else {}
    out.append(_derived(record, index, f"pairs_from_list:{i}>{j}", LISTWISE_FIELDS,
                        prompt=norm["prompt"], chosen=resp[i], rejected=resp[j],
                        score_chosen=s[i], score_rejected=s[j], gap=g, pair=[i, j], **extra))
  return out


class PairsFromList(grain.experimental.FlatMapTransform):
  """grain FlatMapTransform of `pairs_from_list`. max_fan_out: 1 (best_worst), max_pairs or 1
  (best_vs_random), all_pairs: max_pairs, else C(max_responses, 2) (pass `max_responses`, the
  most responses a record has)."""

  def __init__(self, *, max_responses: int | None = None, **kwargs):
    mode, max_pairs = kwargs.get("mode", "best_worst"), kwargs.get("max_pairs")
    _check_pair_args(mode, kwargs.get("min_gap", 0.0), max_pairs)
    if mode == "best_worst":
      self.max_fan_out = 1
    elif mode == "best_vs_random" or max_pairs is not None:
      self.max_fan_out = max_pairs or 1
    elif max_responses is None:
      raise ValueError("PairsFromList(mode='all_pairs') needs max_pairs or max_responses (to "
                       "bound grain's max_fan_out)")
    else:
      self.max_fan_out = max(1, max_responses * (max_responses - 1) // 2)
    self.kwargs = kwargs

  def flat_map(self, record):
    return pairs_from_list(record, **self.kwargs)


# --- strength_filter -------------------------------------------------------------------------

def _strength_values(record: dict, where: str, field: str, sigma_field: str | None
                     ) -> tuple[float, float | None]:
  hint = ("run the pref_strength task first (it writes margin and margin_std), or set "
          "field=/sigma_field= to the fields that hold them")
  _check_dict(record, where)
  mu = _number(record, field, where, hint)
  sigma = None if sigma_field is None else _number(record, sigma_field, where, hint)
  return mu, sigma


def strength_keep(record: dict, *, field: str = "margin", tau_keep: float = 0.0,
                  mode: str = "threshold", sigma_field: str = "margin_std",
                  index: int | None = None) -> bool:
  """Per-record predicate of `strength_filter` for threshold/snr, e.g.
  `ds.filter(functools.partial(strength_keep, tau_keep=0.5))`.
    threshold  mu >= tau_keep        (mu = record[field])
    snr        mu / (sigma + 1e-6) >= tau_keep   (sigma = record[sigma_field])
  """
  if mode not in ("threshold", "snr"):
    raise ValueError(f"strength_keep: mode must be 'threshold' or 'snr' (drop_quantile needs "
                     f"the whole dataset: use strength_filter), got {mode!r}")
  mu, sigma = _strength_values(record, _where(record, index), field,
                               sigma_field if mode == "snr" else None)
  return mu >= tau_keep if mode == "threshold" else mu / (sigma + 1e-6) >= tau_keep


def strength_filter(records: Sequence[dict], *, field: str = "margin", tau_keep: float = 0.0,
                    mode: str = "threshold", q: float = 0.1, sigma_field: str = "margin_std",
                    delta: float = 0.0, tau_flip: float = 0.0,
                    route_field: str = "strength_route") -> tuple[list[dict], dict[str, Any]]:
  """Filters (or routes) pairs annotated with preference strength: -> (kept records, counts).

  Method id `strength_filter`, *Secrets of RLHF in Large Language Models Part II: Reward
  Modeling*; the record-level form of `losses.ensemble.strength_filter`/`route`. mu =
  record[field] ("margin", which the pref_strength task writes), sigma = record[sigma_field]
  ("margin_std").
    threshold      keep mu >= tau_keep (default 0)
    drop_quantile  drop the lowest fraction q: keep mu >= quantile(mu, q) (linear
                   interpolation, over all records; ties at the threshold are kept).
                   "quantile" is the same (the array function's name)
    snr            keep mu / (sigma + 1e-6) >= tau_keep
    route          keep all, copies with record[route_field] = 0 flip (mu < -tau_flip),
                   1 smooth (|mu| <= delta), 2 margin (otherwise), for the secrets2 recipe
  Kept records are the input dicts (not copies), in order. counts: {"total", "kept",
  "dropped", "threshold"} (route: {"total", "kept", "flip", "smooth", "margin"}).
  """
  if mode not in STRENGTH_MODES:
    raise ValueError(f"strength_filter: unknown mode {mode!r}; expected one of {STRENGTH_MODES}")
  if mode in ("drop_quantile", "quantile") and not 0.0 <= q <= 1.0:
    raise ValueError(f"strength_filter: q is the fraction to drop, in [0, 1]; got {q}")
  records = list(records)
  vals = [_strength_values(r, _where(r, i), field, sigma_field if mode == "snr" else None)
          for i, r in enumerate(records)]
  mu = np.asarray([v[0] for v in vals], np.float64)
  if mode == "route":
    code = np.where(mu < -tau_flip, FLIP, np.where(np.abs(mu) <= delta, SMOOTH, MARGIN))
    out = [{**r, route_field: int(c)} for r, c in zip(records, code)]
    return out, {"total": len(out), "kept": len(out), "flip": int((code == FLIP).sum()),
                 "smooth": int((code == SMOOTH).sum()), "margin": int((code == MARGIN).sum())}
  if mode == "snr":
    keep = mu / (np.asarray([v[1] for v in vals], np.float64) + 1e-6) >= tau_keep
    threshold = tau_keep
  elif mode == "threshold":
    keep, threshold = mu >= tau_keep, tau_keep
  else:
    threshold = float(np.quantile(mu, q)) if mu.size else math.nan
    keep = mu >= threshold
  kept = [r for r, k in zip(records, keep) if k]
  return kept, {"total": len(records), "kept": len(kept), "dropped": len(records) - len(kept),
                "threshold": float(threshold)}


# --- master_key_negatives --------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?](?=\s)|[。！？]|\n")


def first_sentence(text: str) -> str:
  """The first sentence: up to the first ".", "!" or "?" followed by whitespace, "。", "！",
  "？" or newline (a heuristic: "3.5" does not end a sentence, "e.g. " does)."""
  t = text.lstrip()
  m = _SENTENCE_END.search(t)
  if m is None:
    return t.rstrip()
  return t[:m.start() if m.group() == "\n" else m.end()].rstrip()


def _judge_fields(record: Any, where: str, fields: Mapping[str, str]) -> None:
  _check_dict(record, where)
  hint = "fix or drop the record, or set fields= to the record's field names"
  p = record.get(fields["prompt"])
  if not (isinstance(p, str) or (isinstance(p, list) and p)):
    raise RecordError(where, fields["prompt"], "expected the question as a string or a message "
                      f"list, got {records_lib._type_name(p)}", hint)
  for key in ("reference", "response"):
    v = record.get(fields[key])
    if not isinstance(v, str):
      raise RecordError(where, fields[key], f"expected a string, got "
                        f"{records_lib._type_name(v)}", hint)


def _truncated(record: dict, fields: Mapping[str, str]) -> str | None:
  """The response's first sentence, or None if that is the whole response, empty, or contains
  the reference answer (then it may be a correct answer, not a negative)."""
  resp, ref = record[fields["response"]], record[fields["reference"]].strip()
  t = first_sentence(resp)
  if not t or t == resp.strip() or (ref and ref in t):
    return None
  return t


def _check_keys(keys: Sequence[str]) -> tuple[str, ...]:
  keys = tuple(keys)
  if not keys or not all(isinstance(k, str) for k in keys):
    raise ValueError("master_key_negatives: keys must be a non-empty sequence of strings")
  return keys


def _negative(record: dict, index: int | None, fields: Mapping[str, str], response: str,
              key: str | None, label: Any) -> dict:
  kind = "master_key" if key is not None else "first_sentence"
  return _derived(record, index, f"master_key_negatives:{kind}",
                  **{fields["response"]: response, fields["label"]: label, "master_key": key})


def master_key_records(record: dict, *, keys: Sequence[str] = DEFAULT_KEYS,
                       truncate_first_sentence: bool = True, negative_label: Any = "NO",
                       fields: Mapping[str, str] | None = None,
                       index: int | None = None) -> list[dict]:
  """Every master-key negative of one judge record: (q, ref, m, NO) for each key m, then the
  first-sentence truncation of its response (if it is a proper, non-empty prefix not containing
  the reference). For the judge probe (`eval.master_key_probe`) or a grain FlatMap.
  Method id `master_key_negatives`, *One Token to Fool LLM-as-a-Judge*; see there."""
  fields = {**JUDGE_FIELDS, **(fields or {})}
  keys = _check_keys(keys)
  _judge_fields(record, _where(record, index), fields)
  out = [_negative(record, index, fields, k, k, negative_label) for k in keys]
  t = _truncated(record, fields) if truncate_first_sentence else None
  if t is not None:
    out.append(_negative(record, index, fields, t, None, negative_label))
  return out


def master_key_negatives(records: Sequence[dict], *, keys: Sequence[str] = DEFAULT_KEYS,
                         truncate_first_sentence: bool = True, truncate_share: float = 0.5,
                         rate: float = 0.15, seed: int = 0, negative_label: Any = "NO",
                         fields: Mapping[str, str] | None = None
                         ) -> tuple[list[dict], dict[str, Any]]:
  """Adds master-key negatives to reference-based judge data: -> (records + negatives, counts).

  Method id `master_key_negatives`, *One Token to Fool LLM-as-a-Judge*. Judge records are
  (q, ref, resp, label) in `fields` (default "prompt", "reference", "response", "label"). A
  negative is a copy of a record drawn uniformly (seeded) with the response replaced by
    a master key m (drawn uniformly from `keys`; default: ":", ".", "Thought process:",
      "Let's solve this problem step by step.", "Solution" and translations), or
    with probability `truncate_share` (if `truncate_first_sentence`) the record's response cut
      to its first sentence (`first_sentence`); a record whose truncation is the whole
      response, empty or contains the reference gets a key instead,
  and label `negative_label` ("NO"), plus "master_key" (the key, or None) and provenance.
  round(n * rate / (1 - rate)) negatives are added, so they are `rate` of the output (the
  paper's 10-20%). The input records come first, unchanged; the negatives follow (the train
  pipeline shuffles). Other fields are copied: drop any that describe the original response.
  counts: {"records", "added", "master_key", "first_sentence", "share"}.
  """
  fields = {**JUDGE_FIELDS, **(fields or {})}
  keys = _check_keys(keys)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"master_key_negatives: rate is the share of negatives in the output, in "
                     f"[0, 1); got {rate}")
  if not 0.0 <= truncate_share <= 1.0:
    raise ValueError(f"master_key_negatives: truncate_share must be in [0, 1], got "
                     f"{truncate_share}")
  records = list(records)
  for i, r in enumerate(records):
    _judge_fields(r, _where(r, i), fields)
  n = len(records)
  n_add = round(n * rate / (1.0 - rate)) if n else 0
  rng = np.random.default_rng(seed)
  src = rng.choice(n, size=n_add, replace=n_add > n) if n_add else np.zeros(0, int)
  u, key_idx = rng.random(n_add), rng.integers(len(keys), size=n_add)
  negatives, n_trunc = [], 0
  for i, uu, k in zip(src.tolist(), u.tolist(), key_idx.tolist()):
    t = (_truncated(records[i], fields)
         if truncate_first_sentence and uu < truncate_share else None)
    if t is not None:
      n_trunc += 1
      negatives.append(_negative(records[i], i, fields, t, None, negative_label))
    else:
      negatives.append(_negative(records[i], i, fields, keys[k], keys[k], negative_label))
  out = records + negatives
  return out, {"records": n, "added": n_add, "master_key": n_add - n_trunc,
               "first_sentence": n_trunc, "share": n_add / len(out) if out else 0.0}


class MasterKeyRecords(grain.experimental.FlatMapTransform):
  """grain FlatMapTransform of `master_key_records` (max_fan_out = len(keys) + 1)."""

  def __init__(self, **kwargs):
    self.max_fan_out = len(_check_keys(kwargs.get("keys", DEFAULT_KEYS))) + 1
    self.kwargs = kwargs

  def flat_map(self, record):
    return master_key_records(record, **self.kwargs)


# --- real_data_mix and Luce curation ---------------------------------------------------------

def _check_lam(lam: float) -> None:
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"real_data_mix: lam is the probability of a real record, in [0, 1]; got "
                     f"{lam}")


def _tag(element: Any, tag_field: str | None, name: str) -> Any:
  if tag_field is None or not isinstance(element, dict):
    return element
  return {**element, tag_field: name}


def real_data_mix(real: Iterable[Any], synthetic: Iterable[Any], *, lam: float = 0.25,
                  seed: int = 0, num_draws: int | None = None,
                  tag_field: str | None = "mix_source") -> Iterator[Any]:
  """Iterator mixing real and curated synthetic data: each draw is the next real record with
  probability `lam`, else the next synthetic one.

  Method id `real_data_mix`, *Self-Consuming Generative Models with Curated Data Provably
  Optimize Human Preferences*. Default lam = 0.25 (proposed); any lam > 0 keeps the
  self-consuming loop stable. Stops after `num_draws` draws or when the drawn source runs out
  (so the rate stays lam). Dict records are copied with record[tag_field] = "real" or
  "synthetic" (tag_field=None: passed through). Draws come from numpy default_rng(seed), the
  same ones `real_data_mix_dataset` uses. Log the reward shift between rounds: the loop
  amplifies reward-model bias.
  """
  _check_lam(lam)
  rng = np.random.default_rng(seed)
  sources = (("real", iter(real)), ("synthetic", iter(synthetic)))
  drawn = 0
  while num_draws is None or drawn < num_draws:
    name, it = sources[0] if rng.random() < lam else sources[1]
    try:
      element = next(it)
    except StopIteration:
      return
    drawn += 1
    yield _tag(element, tag_field, name)


class _MixLookup:
  """Element i of real_data_mix_dataset (picklable for grain worker processes)."""

  def __init__(self, real, synthetic, is_real, position, tag_field):
    self.real, self.synthetic, self.tag_field = real, synthetic, tag_field
    self.is_real, self.position = is_real, position

  def __call__(self, i: int):
    src, name = (self.real, "real") if self.is_real[i] else (self.synthetic, "synthetic")
    return _tag(src[int(self.position[i]) % len(src)], self.tag_field, name)


def real_data_mix_dataset(real: Sequence[Any], synthetic: Sequence[Any], *, lam: float = 0.25,
                          seed: int = 0, length: int | None = None,
                          tag_field: str | None = "mix_source") -> grain.MapDataset:
  """`real_data_mix` as a random-access grain MapDataset of `length` elements (default
  len(real) + len(synthetic)) over random-access `real`/`synthetic` (lists, grain sources or
  MapDatasets). Element i is real with probability lam (draw i of default_rng(seed)); the k-th
  real (synthetic) element is real[k % len(real)] (wrapping around), so up to the first
  exhaustion it equals `real_data_mix` over the same sequences. Chain .shuffle(), .repeat(),
  .map() as usual."""
  _check_lam(lam)
  length = len(real) + len(synthetic) if length is None else int(length)
  is_real = np.random.default_rng(seed).random(length) < lam
  n_real = int(is_real.sum())
  for name, src, needed in (("real", real, n_real), ("synthetic", synthetic, length - n_real)):
    if needed and not len(src):
      raise ValueError(f"real_data_mix_dataset: {needed} draws pick the {name} data, which is "
                       "empty; give records or set lam to 0 or 1")
  position = np.where(is_real, np.cumsum(is_real) - 1, np.cumsum(~is_real) - 1)
  return grain.MapDataset.range(length).map(_MixLookup(real, synthetic, is_real, position,
                                                       tag_field))


def _luce_scores(scores, tau: float) -> np.ndarray:
  if not tau >= 0:
    raise ValueError(f"luce_curate: tau must be >= 0 (0 = argmax), got {tau}")
  r = np.asarray(scores, np.float64)
  if r.ndim not in (1, 2) or r.shape[-1] == 0:
    raise ValueError(f"luce_curate: scores must be [K] or [N,K] with K >= 1, got shape {r.shape}")
  r = np.where(np.isnan(r), -np.inf, r)  # NaN never chosen
  dead = np.all(np.isneginf(r), axis=-1)
  if np.any(dead):
    row = int(np.argmax(np.atleast_1d(dead)))
    raise ValueError(f"luce_curate: {'row ' + str(row) + ' of ' if r.ndim == 2 else ''}scores "
                     "has no finite score (all NaN or -inf); drop it first")
  return r


def luce_probabilities(scores, *, tau: float = 1.0) -> np.ndarray:
  """softmax(r / tau) over the last axis (NaN scores get 0); tau = 0: one-hot at the argmax
  (lowest index on ties)."""
  r = _luce_scores(scores, tau)
  if tau == 0:
    return np.eye(r.shape[-1])[np.argmax(r, axis=-1)]
  z = r / tau
  p = np.exp(z - np.max(z, axis=-1, keepdims=True))
  return p / p.sum(axis=-1, keepdims=True)


def luce_curate(scores, *, tau: float = 1.0, rng: np.random.Generator | int | None = None):
  """Luce-choice curation: picks one of K samples with probability softmax(r / tau).

  Curation step of `real_data_mix`, *Self-Consuming Generative Models with Curated Data
  Provably Optimize Human Preferences*. `scores [K]` -> an int, `[N,K]` -> int64 [N] (one
  uniform draw per row). tau = 0 is the argmax with ties to the lowest index (`raft_select`
  top-1); small tau > 0 approaches it but splits ties at random. NaN scores are never picked.
  `rng`: a numpy Generator, an int seed, or None (fresh entropy).
  """
  p = luce_probabilities(scores, tau=tau)
  p2 = np.atleast_2d(p)
  if tau == 0:
    idx = np.argmax(p2, axis=-1)
  else:
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    c = np.cumsum(p2, axis=-1)
    c /= c[:, -1:]                       # exactly 1 at the end, so u < 1 always lands
    u = gen.random(p2.shape[0])
    idx = np.sum(c <= u[:, None], axis=-1)  # first k with c_k > u: p_k > 0
  return int(idx[0]) if p.ndim == 1 else idx.astype(np.int64)


__all__ = [
    "DEFAULT_KEYS", "DEFAULT_SCORE_TEMPLATE", "MASTER_KEYS", "TRANSLATED_MASTER_KEYS",
    "MasterKeyRecords", "PairIndices", "PairsFromList", "RewardAugmented", "condition_prompt",
    "first_sentence", "flat_apply", "luce_curate", "luce_probabilities", "master_key_negatives",
    "master_key_records", "pair_indices", "pairs_from_list", "real_data_mix",
    "real_data_mix_dataset", "reward_augmented", "strength_filter", "strength_keep",
]
