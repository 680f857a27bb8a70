"""The preference grain pipeline: pairwise, listwise or rated records -> fixed-shape batches.

Every example is K rows of prompt + response: K = 2 for pairwise (row 0 chosen, row 1 rejected),
K = data.max_responses for listwise, K = 1 for rated. Batch format (numpy, per host, B =
global_batch_size // process_count, L = seq_len):

  tokens        int32   [B,K,L]  prompt + response, right-padded with tokenizer.pad_id
  segment_ids   int32   [B,K,L]  1 on real tokens, 0 on padding
  positions     int32   [B,K,L]  0, 1, 2, ... on real tokens, 0 on padding
  response_mask float32 [B,K,L]  1 on response tokens (incl. the eos / end of turn), else 0
  length        int32   [B,K]    response tokens per row (= response_mask.sum(-1))
  example_mask  float32 [B]      1 for a real example, 0 for a filler row of a finite pass
  source_id, user_id, subset_id, language_id  int32 [B]  ids in iterator.vocabularies
  pairwise:  margin [B] (default 0), strength [B] (default 1), label [B] (1, 0 tie, -1;
             default 1), all float32
  listwise:  valid float32 [B,K], scores float32 [B,K] (0 where invalid), order int32 [B,K]
             (indices best first, padded with the worst valid index), n int32 [B]
  rated:     targets float32 [B,A], target_mask float32 [B,A], A = len(data.attributes)
  data.extra_fields: one float32 array per named record field: [B] for a number, [B,K] for a
             list of numbers (one per response; e.g. precomputed reference log-probs)
  data.extra_responses (pairwise): more response rows after chosen and rejected, one per
             named record field holding a response (e.g. a reference sample for SELM); the
             example then has K = 2 + len(extra_responses) rows
  data.contrast_instructions (pairwise): for each instruction, two more rows: chosen and
             rejected under the prompt rewritten by data.contrast_template (T-REG's
             "revise better/worse" prompts), after the extra responses
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from alignjax.data import records as records_lib
from alignjax.data import sft as sft_lib
from alignjax.data import sources as sources_lib
from alignjax.data.records import PREFERENCE_KINDS, RecordError

TRUNCATIONS = ("right", "error")
DEFAULT_CONTEXT_TEMPLATE = "{context}\n\n{prompt}"
# Record field -> (config key of its vocabulary, batch key of its id).
VOCAB_FIELDS = {"source": ("sources", "source_id"), "user_id": ("users", "user_id"),
                "subset": ("subsets", "subset_id"), "language": ("languages", "language_id")}
# Fields whose empty vocabulary is read from the eval files (for evaluation grouping).
_SCANNED_FIELDS = ("subset", "language")


def default_preference_data_config() -> ml_collections.ConfigDict:
  """Data config of the preference pipeline with every key set (see docs/data.md): the SFT keys
  except `packing` and `arithmetic`, plus the preference keys."""
  cfg = sft_lib.default_data_config()
  del cfg["packing"], cfg["arithmetic"]
  cfg.update(dict(
      context_template=DEFAULT_CONTEXT_TEMPLATE,  # how "context"/"principle" joins the prompt
      min_response_tokens=8,   # truncation keeps at least this many tokens of each response
      max_responses=4,         # K of listwise batches
      truncate_lists=False,    # listwise: keep the best max_responses (True) or raise (False)
      attributes=(),           # rated: attribute names, the order of `targets`
      sources=(),              # vocabulary of "source" (empty: every source_id is 0)
      users=(),                # vocabulary of "user_id" (empty: every user_id is 0)
      subsets=(),              # vocabulary of "subset" (empty: eval split reads it from files)
      languages=(),            # vocabulary of "language" (same as subsets)
      extra_fields=(),         # numeric record fields copied into the batch (see above)
      extra_responses=(),      # pairwise: record fields holding extra responses (extra rows)
      pairs_from_list="",      # pairwise from listwise records: best_worst | all_pairs |
                               # best_vs_random ("": off; data/transforms.py)
      pairs_min_gap=0.0,       # pairs_from_list: keep pairs with score gap > this
      pairs_max=0,             # pairs_from_list: pairs per list (0: no cap)
      reward_augmented=False,  # pairs -> two score-conditioned pairs (data/transforms.py)
      reward_augmented_template="target score: {score}",
      strength_filter="",      # keep pairs by pref_strength's margin: threshold | snr ("": off)
      strength_tau=0.0,        # ... keep mu >= tau (threshold) or mu / sigma >= tau (snr)
      contrast_instructions=(),  # pairwise: rows of chosen/rejected under rewritten prompts
      contrast_template="{instruction}\n\n{prompt}",  # how an instruction rewrites a prompt
      preference=dict(prompt_len=4, min_len=4, max_len=8, min_gap=1, num_responses=4,
                      length_bias=False, num_records=1_000_000, eval_fraction=0.1,
                      hits="uniform"),
  ))
  return cfg


@dataclasses.dataclass
class PreferenceStats(sft_lib.Counters):
  """Counters of one preference pipeline (see sft.Counters for when they are updated)."""

  examples: int = 0           # records turned into examples
  truncated: int = 0          # of which had a prompt or response cut to fit seq_len
  skipped_malformed: int = 0  # records skipped with data.skip_malformed=True
  identical_pairs: int = 0    # pairwise records whose chosen equals rejected (kept)
  truncated_lists: int = 0    # listwise records cut to data.max_responses (truncate_lists)
  empty_lists: int = 0        # records that gave no pair (pairs_from_list, strength_filter)


def _response_names(kind: str, n: int) -> list[str]:
  return {"pairwise": ["chosen", "rejected"], "rated": ["response"]}.get(
      kind, [f"responses[{i}]" for i in range(n)])


def _with_context(prompt, context: str | None, template: str, where: str):
  """The prompt with `context` put in by `template` (for messages: into the first user turn)."""
  if context is None:
    return prompt
  if isinstance(prompt, str):
    return template.format(context=context, prompt=prompt)
  for i, m in enumerate(prompt):
    if m["role"] == "user":
      return prompt[:i] + [{**m, "content": template.format(context=context,
                                                            prompt=m["content"])}] + prompt[i + 1:]
  raise RecordError(where, "context", "the prompt has no user message to put the context in")


def encode_preference(record: dict[str, Any], tokenizer, where: str = "<record>", *,
                      context_template: str = DEFAULT_CONTEXT_TEMPLATE,
                      names: Sequence[str] | None = None) -> tuple[list[int], list[list[int]]]:
  """Token ids (prompt, [response, ...]) of a normalised record (records.validate_preference),
  untruncated. The model reads prompt + response.

  Plain text: prompt = encode(prompt) (bos in front if tokenizer.add_bos_token), response =
  encode(response) + [eos]. Conversational: prompt = render(prompt, add_generation_prompt=True),
  response = render(prompt + response) minus that prefix (no extra eos: the template ends the
  turn). A template that does not render incrementally raises a RecordError.
  """
  prompt = _with_context(record["prompt"], record.get("context"), context_template, where)
  responses = record["responses"]
  if isinstance(prompt, str):
    return (tokenizer.encode(prompt, add_bos=tokenizer.add_bos_token),
            [tokenizer.encode(r) + [tokenizer.eos_id] for r in responses])
  head = sft_lib.render_chat(tokenizer, prompt, where, add_generation_prompt=True)
  names = names or _response_names("listwise", len(responses))
  out = []
  for name, resp in zip(names, responses):
    full = sft_lib.render_chat(tokenizer, prompt + resp, where)
    if not full.startswith(head):
      raise RecordError(where, name, "the chat template does not render this conversation "
                        "incrementally (the prompt with the generation prompt is not a prefix "
                        "of prompt + response rendered)", "fix the record or the template")
    out.append(tokenizer.encode(full[len(head):]))
  return tokenizer.encode(head), out


def preference_rows(prompt: Sequence[int], responses: Sequence[Sequence[int]], *, seq_len: int,
                    pad_id: int, num_rows: int | None = None, min_response_tokens: int = 8,
                    truncation: str = "right", where: str = "<record>"
                    ) -> tuple[dict[str, np.ndarray], bool]:
  """Rows prompt + response (one per response, then `num_rows - len(responses)` empty rows).

  Returns ({"tokens", "segment_ids", "positions", "response_mask": [R, seq_len],
  "length": [R]}, truncated). All rows share the same prompt tokens. When prompt + the longest
  response exceeds seq_len: with truncation "error" a RecordError is raised; with "right" the
  prompt is cut from the left (keeping its end) until the responses have room for
  min(longest, min_response_tokens) tokens, then the responses are cut from the right. The prompt
  keeps at least one token. response_mask is 0 at position 0 (nothing predicts that token).
  """
  num_rows = len(responses) if num_rows is None else num_rows
  p, r_max = len(prompt), max(len(r) for r in responses)
  truncated = p + r_max > seq_len
  if truncated:
    if truncation == "error":
      raise RecordError(where, None, f"{p + r_max} tokens (prompt {p} + longest response "
                        f"{r_max}) exceed seq_len={seq_len}",
                        "shorten it, or set data.truncation='right'")
    room = min(max(seq_len - p, min(r_max, min_response_tokens)), seq_len - min(p, 1))
    prompt = prompt[p - min(p, seq_len - room):]
  rows = dict(tokens=np.full((num_rows, seq_len), pad_id, np.int32),
              segment_ids=np.zeros((num_rows, seq_len), np.int32),
              positions=np.zeros((num_rows, seq_len), np.int32),
              response_mask=np.zeros((num_rows, seq_len), np.float32),
              length=np.zeros((num_rows,), np.int32))
  p = len(prompt)
  for k, resp in enumerate(responses):
    ids = list(prompt) + list(resp[:seq_len - p])
    n = len(ids)
    rows["tokens"][k, :n] = ids
    rows["segment_ids"][k, :n] = 1
    rows["positions"][k, :n] = np.arange(n)
    rows["response_mask"][k, max(p, 1):n] = 1.0
    rows["length"][k] = n - max(p, 1)
  return rows, truncated


class _PreferenceExample:
  """build(record, where) -> one example (a dict of fixed-shape arrays, see module docstring)."""

  def __init__(self, data_cfg, tokenizer, *, kind: str, seq_len: int,
               vocabularies: dict[str, tuple[str, ...]], stats: PreferenceStats):
    self.tokenizer, self.kind, self.seq_len, self.stats = tokenizer, kind, seq_len, stats
    self.template = data_cfg.get("context_template", DEFAULT_CONTEXT_TEMPLATE)
    self.min_response_tokens = int(data_cfg.get("min_response_tokens", 8))
    self.truncation = data_cfg.get("truncation", "right")
    self.attributes = tuple(data_cfg.get("attributes", ()))
    self.max_responses = int(data_cfg.get("max_responses", 4))
    self.truncate_lists = bool(data_cfg.get("truncate_lists", False))
    self.extra_fields = tuple(data_cfg.get("extra_fields", ()))
    self.extra_responses = tuple(data_cfg.get("extra_responses", ())) if kind == "pairwise" else ()
    self.contrasts = tuple(data_cfg.get("contrast_instructions", ())) if kind == "pairwise" \
        else ()
    self.contrast_template = data_cfg.get("contrast_template", "{instruction}\n\n{prompt}")
    self.rows = {"pairwise": 2 + len(self.extra_responses) + 2 * len(self.contrasts),
                 "listwise": self.max_responses, "rated": 1}[kind]
    self.vocab_ids = {f: {v: i for i, v in enumerate(vocab)} for f, vocab in vocabularies.items()}

  def _ids(self, record: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    out = {}
    for field, (cfg_key, batch_key) in VOCAB_FIELDS.items():
      ids = self.vocab_ids[field]
      value = record[field] if record[field] is not None else ""
      if ids and value not in ids:
        names = ", ".join(repr(v) for v in list(ids)[:8]) + (", ..." if len(ids) > 8 else "")
        raise RecordError(where, field, ("missing" if value == "" else f"{value!r} is not in "
                          f"data.{cfg_key}") + f" (data.{cfg_key} = {names})",
                          f"add it to data.{cfg_key} (or empty data.{cfg_key} to give every "
                          f"record id 0), fix the record, or set data.skip_malformed=True to "
                          "skip (and count) such records")
      out[batch_key] = np.int32(ids.get(value, 0))
    return out

  def _keep_best(self, record: dict[str, Any], where: str) -> dict[str, Any]:
    """Listwise: the best max_responses responses (in their original order), or an error."""
    n = len(record["responses"])
    if n <= self.max_responses:
      return record
    if not self.truncate_lists:
      raise RecordError(where, "responses", f"{n} responses exceed data.max_responses="
                        f"{self.max_responses}", "raise data.max_responses, or set "
                        "data.truncate_lists=True to keep the best ones (counted)")
    keep = sorted(record["order"][:self.max_responses])
    scores = [record["scores"][i] for i in keep]
    return {**record, "responses": [record["responses"][i] for i in keep], "scores": scores,
            "order": records_lib.best_first(scores)}

  def __call__(self, raw: Any, where: str) -> dict[str, np.ndarray]:
    record = records_lib.validate_preference(raw, where, kind=self.kind,
                                             attributes=self.attributes)
    num_responses = len(record["responses"])
    if self.kind == "listwise":
      record = self._keep_best(record, where)
    ids = self._ids(record, where)
    names = _response_names(self.kind, len(record["responses"]))
    if self.extra_responses:
      record = dict(record, responses=list(record["responses"]) + [
          _extra_response(raw, f, record["responses"][0], where) for f in self.extra_responses])
      names = names + list(self.extra_responses)
    n = len(record["responses"])
    prompt, responses = encode_preference(record, self.tokenizer, where,
                                          context_template=self.template, names=names)
    example, truncated = preference_rows(
        prompt, responses, seq_len=self.seq_len, pad_id=self.tokenizer.pad_id,
        num_rows=self.rows - 2 * len(self.contrasts), min_response_tokens=self.min_response_tokens,
        truncation=self.truncation, where=where)
    for instruction in self.contrasts:
      pair = dict(record, responses=record["responses"][:2], prompt=contrast_prompt(
          record["prompt"], instruction, self.contrast_template))
      c_prompt, c_responses = encode_preference(pair, self.tokenizer, where,
                                                context_template=self.template,
                                                names=names[:2])
      rows, _ = preference_rows(c_prompt, c_responses, seq_len=self.seq_len,
                                pad_id=self.tokenizer.pad_id, num_rows=2,
                                min_response_tokens=self.min_response_tokens,
                                truncation=self.truncation, where=where)
      example = {k: np.concatenate([v, rows[k]]) for k, v in example.items()}
    self.stats.add(truncated=int(truncated), truncated_lists=int(n < num_responses))
    example.update(ids, example_mask=np.float32(1.0))
    for field in self.extra_fields:
      example[field] = _extra_number(raw, field, n, self.rows, where)
    if self.kind == "pairwise":
      if record["responses"][0] == record["responses"][1]:
        self.stats.add(identical_pairs=1)
      example.update({k: np.float32(record[k]) for k in ("margin", "strength", "label")})
    elif self.kind == "listwise":
      k = self.rows
      example["valid"] = (np.arange(k) < n).astype(np.float32)
      example["scores"] = np.zeros(k, np.float32)
      example["scores"][:n] = record["scores"]
      example["order"] = np.full(k, record["order"][-1], np.int32)
      example["order"][:n] = record["order"]
      example["n"] = np.int32(n)
    else:
      targets = record["targets"]
      example["targets"] = np.asarray([t or 0.0 for t in targets], np.float32)
      example["target_mask"] = np.asarray([t is not None for t in targets], np.float32)
    return example


def contrast_prompt(prompt, instruction: str, template: str = "{instruction}\n\n{prompt}"):
  """`prompt` rewritten with `instruction`: a string through `template`; a message list gets
  the instruction as (or in front of) its system message."""
  if isinstance(prompt, str):
    return template.format(instruction=instruction, prompt=prompt)
  if prompt and prompt[0].get("role") == "system":
    first = dict(prompt[0], content=f"{instruction}\n\n{prompt[0]['content']}")
    return [first] + list(prompt[1:])
  return [{"role": "system", "content": instruction}] + list(prompt)


_EXTRA_HINT = ("add it to every record (data.extra_fields / data.extra_responses names it; "
               "reference log-probs come from the ref_logps task), or remove it from the config")


def _extra_response(raw: dict, field: str, like, where: str):
  """The response in record field `field` (same form as chosen: text or a message list)."""
  value = raw.get(field)
  if value is None:
    raise RecordError(where, field, "missing", _EXTRA_HINT)
  if isinstance(like, str) != isinstance(value, str):
    form = "a string" if isinstance(like, str) else "a message list"
    raise RecordError(where, field, f"expected {form} like the chosen response, got "
                      f"{type(value).__name__}", "store it in the same form as chosen")
  return value


def _extra_number(raw: dict, field: str, n: int, rows: int, where: str) -> np.ndarray:
  """Record field `field` as float32: a number -> scalar, a list of n numbers -> [rows]."""
  value = raw.get(field)
  if value is None:
    raise RecordError(where, field, "missing", _EXTRA_HINT)
  if isinstance(value, list):
    if len(value) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  for v in value):
      raise RecordError(where, field, f"expected a number or a list of {n} numbers (one per "
                        f"response), got {value!r}"[:300], "fix the record")
    out = np.zeros(rows, np.float32)
    out[:n] = value
    return out
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RecordError(where, field, f"expected a number, got {type(value).__name__}",
                      "fix the record")
  return np.float32(value)


class _ExpandRecords(grain.experimental.FlatMapTransform):
  """Record index -> [(where, record), ...] after the record-level transforms of the data
  config (pairs_from_list, reward_augmented); a malformed record raises a RecordError, or is
  skipped and counted with data.skip_malformed."""

  def __init__(self, source, fns, max_fan_out: int, skip_malformed: bool, stats):
    self.source, self.fns, self.max_fan_out = source, fns, max_fan_out
    self.skip_malformed, self.stats = skip_malformed, stats

  def flat_map(self, index):
    where = self.source.where(index)
    try:
      records = [self.source[index]]
      for fn in self.fns:
        records = [out for r in records for out in fn(r, index=index)]
    except RecordError:
      if not self.skip_malformed:
        raise
      self.stats.add(skipped_malformed=1)
      return []
    self.stats.add(empty_lists=int(not records))  # no pair, or filtered out
    return [(where if len(records) == 1 else f"{where} (pair {k})", r)
            for k, r in enumerate(records)]


class _BuildExpanded:
  """(where, record) -> example, or None (an empty slot, or a skipped malformed record)."""

  def __init__(self, build, skip_malformed: bool, stats):
    self.build, self.skip_malformed, self.stats = build, skip_malformed, stats

  def __call__(self, item):
    if item is None:
      return None
    where, record = item
    return sft_lib.build_counted(self.build, lambda: record, where, self.skip_malformed,
                                 self.stats)


def record_transforms(data_cfg, kind: str) -> tuple[list, int, str]:
  """(record functions, max fan-out, record kind to read) for data.pairs_from_list,
  data.reward_augmented and data.strength_filter (pairwise batches only), in that order."""
  from alignjax.data import transforms  # noqa: PLC0415 (transforms imports this module's deps)
  mode = data_cfg.get("pairs_from_list", "")
  augment = bool(data_cfg.get("reward_augmented", False))
  if (mode or augment) and kind != "pairwise":
    raise ValueError("data.pairs_from_list / data.reward_augmented make pairwise batches; the "
                     f"task asked for {kind} batches.")
  strength = data_cfg.get("strength_filter", "")
  if strength and kind != "pairwise":
    raise ValueError("data.strength_filter keeps or drops pairs; the task asked for "
                     f"{kind} batches.")
  fns, fan_out = [], 1
  if mode:
    cap = int(data_cfg.get("pairs_max", 0)) or None
    fn = transforms.PairsFromList(mode=mode, min_gap=float(data_cfg.get("pairs_min_gap", 0.0)),
                                  max_pairs=cap, max_responses=int(data_cfg.get(
                                      "max_responses", 4)))
    fns.append(lambda r, index, fn=fn: transforms.pairs_from_list(r, index=index, **fn.kwargs))
    fan_out *= fn.max_fan_out
  if augment:
    template = data_cfg.get("reward_augmented_template", "target score: {score}")
    fns.append(lambda r, index: transforms.reward_augmented(r, template=template, index=index))
    fan_out *= 2
  if strength:
    tau = float(data_cfg.get("strength_tau", 0.0))
    fns.append(lambda r, index: [r] if transforms.strength_keep(
        r, tau_keep=tau, mode=strength, index=index) else [])
  return fns, fan_out, "listwise" if mode else kind


def _scan_vocabularies(source, fields: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """Sorted distinct string values of `fields` over all records ("" where a record lacks one);
  a field no record has gets ()."""
  seen = {f: set() for f in fields}
  for i in range(len(source)):
    try:
      record = source[i]
    except RecordError:
      continue  # Reported (or skipped) when the pipeline reaches it.
    if isinstance(record, dict):
      for f in fields:
        value = record.get(f, "")
        if isinstance(value, str) or value is None:  # Others raise when the pipeline gets there.
          seen[f].add(value or "")
  return {f: tuple(sorted(values)) if values - {""} else () for f, values in seen.items()}


def _check_config(data_cfg, kind: str, seq_len: int) -> None:
  if kind not in PREFERENCE_KINDS:
    raise ValueError(f"kind must be one of {PREFERENCE_KINDS}, got {kind!r}")
  truncation = data_cfg.get("truncation", "right")
  if truncation not in TRUNCATIONS:
    raise ValueError(f"data.truncation must be one of {TRUNCATIONS} for preference data (right: "
                     f"cut the prompt's start, then the responses' ends), got {truncation!r}")
  if data_cfg.get("packing", False):
    raise ValueError("data.packing is not supported for preference data; set it to False")
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  if int(data_cfg.get("min_response_tokens", 8)) < 1:
    raise ValueError("data.min_response_tokens must be >= 1")
  if kind == "listwise" and int(data_cfg.get("max_responses", 4)) < 2:
    raise ValueError("data.max_responses must be >= 2 for listwise data")
  if kind == "rated" and not data_cfg.get("attributes"):
    raise ValueError("rated preference data needs data.attributes, the names of the scores to "
                     "predict (e.g. ('helpfulness', 'correctness'))")
  template = data_cfg.get("context_template", DEFAULT_CONTEXT_TEMPLATE)
  try:
    template.format(context="", prompt="")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"data.context_template {template!r} is not a valid format string with "
                     f"the fields {{context}} and {{prompt}} ({e!r})") from None
  if "{context}" not in template or "{prompt}" not in template:
    raise ValueError(f"data.context_template {template!r} must contain {{context}} and "
                     "{prompt}")


def make_preference_dataset(data_cfg, tokenizer, *, kind: str, seq_len: int,
                            global_batch_size: int, seed: int, process_index: int | None = None,
                            process_count: int | None = None, split: str = "train",
                            num_epochs: int | None = None
                            ) -> tuple[grain.IterDataset, PreferenceStats,
                                       dict[str, tuple[str, ...]]]:
  """(grain IterDataset of this host's batches, its counters, its vocabularies).
  See make_preference_iterator."""
  process_index, process_count, per_host = sft_lib.host_batch_size(
      global_batch_size, process_index, process_count)
  _check_config(data_cfg, kind, seq_len)
  fns, fan_out, read_kind = record_transforms(data_cfg, kind)
  source = sft_lib.open_records(data_cfg, split=split, seed=seed, kind=read_kind)
  if len(source) == 0:
    raise ValueError(f"the {split} data has no records")
  vocabularies = {f: tuple(data_cfg.get(cfg_key, ())) for f, (cfg_key, _) in VOCAB_FIELDS.items()}
  scan = [f for f in _SCANNED_FIELDS if not vocabularies[f]]
  if scan and split == "eval" and isinstance(source, sources_lib.ConcatSource):
    vocabularies.update(_scan_vocabularies(source, scan))
  stats = PreferenceStats()
  ds = sft_lib.host_records(len(source), seed=seed,
                            shuffle=bool(data_cfg.get("shuffle", True)) and split == "train",
                            num_epochs=num_epochs, process_index=process_index,
                            process_count=process_count)
  build = _PreferenceExample(data_cfg, tokenizer, kind=kind, seq_len=seq_len,
                             vocabularies=vocabularies, stats=stats)
  skip = bool(data_cfg.get("skip_malformed", False))
  if fns:
    ds = ds.apply(_ExpandRecords(source, fns, fan_out, skip, stats))
    ds = ds.map(_BuildExpanded(build, skip, stats))
  else:
    ds = ds.map(sft_lib.RecordMap(source, build, stats=stats, skip_malformed=skip))
  it_ds = ds.to_iter_dataset(sft_lib.READ_OPTIONS).filter(sft_lib.not_none)
  batches = sft_lib.batch_examples(it_ds, per_host, num_epochs=num_epochs,
                                   pad_id=tokenizer.pad_id)
  return batches, stats, vocabularies


def make_preference_iterator(data_cfg, tokenizer, *, kind: str, seq_len: int,
                             global_batch_size: int, seed: int, process_index: int | None = None,
                             process_count: int | None = None, split: str = "train",
                             num_epochs: int | None = None) -> grain.DatasetIterator:
  """This host's iterator of preference batches of `kind` ("pairwise", "listwise" or "rated");
  see the module docstring for the batch format.

  Order and checkpointing are those of make_sft_iterator: records shuffled globally from `seed`
  (train split, data.shuffle), repeated `num_epochs` times (None = forever), host
  `process_index` takes every `process_count`-th; get_state()/set_state() and
  grain.checkpoint.CheckpointSave/CheckpointRestore work. A finite pass keeps every example and
  fills its last batch with rows whose example_mask is 0.

  Attributes: `iterator.stats` (PreferenceStats) and `iterator.vocabularies`, a dict from
  "source", "user_id", "subset", "language" to the tuple of names that `source_id`, `user_id`,
  `subset_id`, `language_id` index (() when every id is 0).
  """
  ds, stats, vocabularies = make_preference_dataset(
      data_cfg, tokenizer, kind=kind, seq_len=seq_len, global_batch_size=global_batch_size,
      seed=seed, process_index=process_index, process_count=process_count, split=split,
      num_epochs=num_epochs)
  iterator = iter(ds)
  iterator.stats = stats
  iterator.vocabularies = vocabularies
  return iterator
