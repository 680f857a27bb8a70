"""The SFT input pipeline (grain): records -> token ids + loss masks -> packed or padded batches.

Batch format: a dict of numpy arrays, each [per_host_batch, seq_len]:
  tokens      int32    input ids, padded with tokenizer.pad_id
  loss_mask   float32  1.0 where tokens[t] is a completion token to be predicted (by the model at
                       position t-1); 0.0 on prompt, padding and the first token of every segment.
                       The eos appended to a plain-text completion counts as completion.
  segment_ids int32    1, 2, 3, ... per packed document within a row; 0 on padding.
  positions   int32    0-based position within the token's own segment; 0 on padding.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import grain
import jinja2
import ml_collections
import numpy as np

from alignjax.data import records as records_lib
from alignjax.data import sources as sources_lib
from alignjax.data import synthetic as synthetic_lib
from alignjax.data.records import RecordError

TRUNCATIONS = ("right", "left", "error")
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def default_data_config() -> ml_collections.ConfigDict:
  """Data config with every key set (see docs/data.md)."""
  return ml_collections.ConfigDict(dict(
      seq_len=512,           # tokens per row
      batch_size=32,         # global rows per train step (split over processes)
      train_files="",        # path, glob, or comma-separated list of those
      eval_files="",
      format="auto",         # "auto" (by extension) | "jsonl" | "parquet" | "array_record"
      packing=False,         # pack several examples per row (first-fit) instead of padding
      truncation="right",    # "right" | "left" | "error" for examples longer than seq_len
      skip_malformed=False,  # False: raise RecordError; True: skip and count in iterator.stats
      shuffle=True,          # shuffle the training split (per epoch, from the seed)
      synthetic="",          # built-in synthetic task ("arithmetic") instead of files; "" = off
      arithmetic=dict(max_digits=2, ops="+", num_records=1_000_000, eval_fraction=0.1),
  ))


@dataclasses.dataclass
class Counters:
  """Base of a pipeline's counters (subclasses declare int fields), updated as records are read
  (including prefetch read-ahead and re-reads after `set_state`; not part of the checkpointed
  state). Thread-safe: grain reads ahead with several threads."""

  def __post_init__(self):
    self._lock = threading.Lock()

  def add(self, **counts: int) -> None:
    with self._lock:
      for k, v in counts.items():
        setattr(self, k, getattr(self, k) + v)

  def as_dict(self) -> dict[str, int]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class SFTStats(Counters):
  """Counters of one SFT pipeline (see Counters)."""

  examples: int = 0          # records tokenised
  truncated: int = 0         # of which were longer than seq_len and truncated
  skipped_malformed: int = 0  # records skipped with data.skip_malformed=True


def render_chat(tokenizer, messages, where: str, **kw) -> str:
  """`tokenizer.apply_chat_template(messages, **kw)`; template errors become RecordErrors."""
  try:
    return tokenizer.apply_chat_template(messages, **kw)
  except jinja2.TemplateError as e:
    raise RecordError(where, "messages", f"the chat template rejected this conversation: {e}",
                      "fix the conversation or the template") from None


def _chat_pieces(rec: dict[str, Any], tokenizer, where: str) -> list[tuple[str, bool]]:
  """Splits the rendered conversation into (text, is_completion) pieces.

  Each trained assistant message i spans render(messages[:i+1]) minus
  render(messages[:i], add_generation_prompt=True); both must be prefixes of the full render.
  """
  msgs, start = rec["messages"], rec["completion_start"]
  full = render_chat(tokenizer, msgs, where)
  pieces, pos = [], 0
  for i, m in enumerate(msgs):
    if i < start or m["role"] != "assistant":
      continue
    prefix = render_chat(tokenizer, msgs[:i], where, add_generation_prompt=True)
    upto = render_chat(tokenizer, msgs[:i + 1], where)
    if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
      raise RecordError(
          where, f"messages[{i}]", "the chat template does not render this conversation "
          "incrementally (the prefix up to this assistant message, with the generation prompt, "
          "is not a prefix of the full rendering; e.g. templates that drop reasoning from "
          "earlier turns)", "split the conversation into single-turn prompt/completion records")
    pieces += [(full[pos:len(prefix)], False), (full[len(prefix):len(upto)], True)]
    pos = len(upto)
  pieces.append((full[pos:], False))
  return [(t, c) for t, c in pieces if t]


def tokenize_sft(record: dict[str, Any], tokenizer, where: str = "<record>"
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises a normalised SFT record (see records.validate_sft).

  Returns (tokens int32 [L], loss_mask float32 [L]), untruncated. loss_mask[t] = 1 iff tokens[t]
  is a completion token; loss_mask[0] is always 0.
  Plain text: encode(prompt) (+bos if tokenizer.add_bos_token), then encode(completion) + [eos].
  Conversational: the chat template's rendering; only trained assistant turns get mask 1.
  """
  if "messages" in record:
    ids, mask = [], []
    for text, is_completion in _chat_pieces(record, tokenizer, where):
      piece = tokenizer.encode(text)
      ids += piece
      mask += [float(is_completion)] * len(piece)
  else:
    prompt = tokenizer.encode(record["prompt"], add_bos=tokenizer.add_bos_token)
    completion = tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
    ids = prompt + completion
    mask = [0.0] * len(prompt) + [1.0] * len(completion)
  tokens = np.asarray(ids, dtype=np.int32)
  loss_mask = np.asarray(mask, dtype=np.float32)
  if len(loss_mask):
    loss_mask[0] = 0.0  # Nothing predicts the first token of a segment.
  return tokens, loss_mask


class RecordMap:
  """Map function: record index -> build(record, where), or None when the record is malformed
  and `skip_malformed` is set (counted in stats.skipped_malformed). Built records are counted in
  stats.examples; a RecordError raised by `build` names the record's location."""

  def __init__(self, source, build, *, skip_malformed: bool, stats: Counters):
    self.source, self.build, self.skip_malformed, self.stats = source, build, skip_malformed, stats

  def __call__(self, index: int):
    return build_counted(self.build, lambda: self.source[index], self.source.where(index),
                         self.skip_malformed, self.stats)


def build_counted(build, read, where: str, skip_malformed: bool, stats: Counters):
  """build(read(), where), counted in stats.examples; a RecordError (from reading or building)
  is raised, or (with `skip_malformed`) counted in stats.skipped_malformed and None returned."""
  try:
    example = build(read(), where)
  except RecordError:
    if not skip_malformed:
      raise
    stats.add(skipped_malformed=1)
    return None
  stats.add(examples=1)
  return example


class _SFTExample:
  """build(record, where) -> {"tokens", "loss_mask"}, truncated to seq_len."""

  def __init__(self, tokenizer, seq_len: int, truncation: str, stats: SFTStats):
    self.tokenizer, self.seq_len = tokenizer, seq_len
    self.truncation, self.stats = truncation, stats

  def __call__(self, raw: Any, where: str) -> dict[str, np.ndarray]:
    record = records_lib.validate_sft(raw, where)
    tokens, loss_mask = tokenize_sft(record, self.tokenizer, where)
    if len(tokens) > self.seq_len:
      if self.truncation == "error":
        raise RecordError(where, None, f"{len(tokens)} tokens exceed seq_len={self.seq_len}",
                          "shorten it, or set data.truncation to 'right' or 'left'")
      keep = slice(None, self.seq_len) if self.truncation == "right" else slice(-self.seq_len,
                                                                                None)
      tokens, loss_mask = tokens[keep], loss_mask[keep].copy()
      loss_mask[0] = 0.0
      self.stats.add(truncated=1)
    return {"tokens": tokens, "loss_mask": loss_mask}


def _pad(example: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  n = len(example["tokens"])
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = example["tokens"]
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[:n] = example["loss_mask"]
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:n] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[:n] = np.arange(n)
  return dict(tokens=tokens, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)


def _from_packed(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return dict(tokens=x["tokens"].astype(np.int32), loss_mask=x["loss_mask"].astype(np.float32),
              segment_ids=x["tokens_segment_ids"].astype(np.int32),
              positions=x["tokens_positions"].astype(np.int32))


def not_none(x) -> bool:
  return x is not None


def open_records(data_cfg, *, split: str, seed: int, kind: str):
  """The random-access record source of `split` ("train"/"eval"): data.{split}_files, or the
  synthetic task data.synthetic (its options are data.<task name>) making `kind` records."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  name = data_cfg.get("synthetic")
  if name:
    return synthetic_lib.synthetic_source(name, seed=seed, split=split, kind=kind,
                                          options=data_cfg.get(name))
  files = data_cfg.get(f"{split}_files")
  if not files:
    raise ValueError(f"data.{split}_files is empty; set it to a path, glob or comma-separated "
                     "list of .jsonl/.parquet/.array_record files, or set data.synthetic")
  return sources_lib.open_source(files, data_cfg.get("format", "auto"))


def open_sft_source(data_cfg, *, split: str = "train", seed: int = 0):
  """The random-access SFT record source of `split` ("train"/"eval"): files or a synthetic task."""
  return open_records(data_cfg, split=split, seed=seed, kind="sft")


def host_batch_size(global_batch_size: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
  """(process_index, process_count, rows per host); None means "ask jax". Checks divisibility."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the number of "
                     f"processes ({process_count}); choose a multiple of {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count, global_batch_size // process_count


def host_records(num_records: int, *, seed: int, shuffle: bool, num_epochs: int | None,
                 process_index: int, process_count: int) -> grain.MapDataset:
  """This host's record indices: the global order (shuffled per epoch from `seed` if `shuffle`,
  repeated `num_epochs` times, None = forever), every `process_count`-th from `process_index`."""
  ds = grain.MapDataset.range(num_records).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  return ds[process_index::process_count]  # This host's share of the global order.


def batch_examples(examples: grain.IterDataset, rows: int, *, num_epochs: int | None,
                   pad_id: int) -> grain.IterDataset:
  """Batches fixed-shape examples into `rows` rows. Training (num_epochs=None) drops the
  remainder; a finite pass keeps every example and fills the last batch with rows of zeros
  (`tokens` = pad_id), so masks (segment_ids, loss_mask, example_mask, ...) are 0 there."""
  if num_epochs is None:
    return examples.batch(rows, drop_remainder=True)
  batched = examples.batch(rows, drop_remainder=False)
  return batched.map(functools.partial(_fill_batch, rows=rows, pad_id=pad_id))


def make_sft_dataset(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int,
                     process_index: int | None = None, process_count: int | None = None,
                     split: str = "train", num_epochs: int | None = None
                     ) -> tuple[grain.IterDataset, SFTStats]:
  """The grain IterDataset of this host's batches, and its counters. See make_sft_iterator."""
  process_index, process_count, per_host = host_batch_size(global_batch_size, process_index,
                                                           process_count)
  truncation = data_cfg.get("truncation", "right")
  if truncation not in TRUNCATIONS:
    raise ValueError(f"data.truncation must be one of {TRUNCATIONS}, got {truncation!r}")
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")

  source = open_sft_source(data_cfg, split=split, seed=seed)
  if len(source) == 0:
    raise ValueError(f"the {split} data has no records")
  stats = SFTStats()
  ds = host_records(len(source), seed=seed,
                    shuffle=bool(data_cfg.get("shuffle", True)) and split == "train",
                    num_epochs=num_epochs, process_index=process_index,
                    process_count=process_count)
  ds = ds.map(RecordMap(source, _SFTExample(tokenizer, seq_len, truncation, stats),
                        skip_malformed=bool(data_cfg.get("skip_malformed", False)), stats=stats))
  it_ds = ds.to_iter_dataset(READ_OPTIONS).filter(not_none)
  if data_cfg.get("packing", False):
    it_ds = grain.experimental.FirstFitPackIterDataset(
        it_ds, length_struct={"tokens": seq_len, "loss_mask": seq_len}, num_packing_bins=per_host,
        seed=seed, shuffle_bins=False, meta_features=("loss_mask",),
        padding_struct={"tokens": tokenizer.pad_id, "loss_mask": 0.0}).map(_from_packed)
  else:
    it_ds = it_ds.map(functools.partial(_pad, seq_len=seq_len, pad_id=tokenizer.pad_id))
  return batch_examples(it_ds, per_host, num_epochs=num_epochs, pad_id=tokenizer.pad_id), stats


def _fill_batch(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads a partial batch to `rows` rows of zeros (`tokens`: pad_id)."""
  return {k: np.concatenate([v, np.full((rows - len(v),) + v.shape[1:],
                                        pad_id if k == "tokens" else 0, v.dtype)])
          for k, v in batch.items()}


def make_sft_iterator(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int,
                      process_index: int | None = None, process_count: int | None = None,
                      split: str = "train", num_epochs: int | None = None
                      ) -> grain.DatasetIterator:
  """This host's iterator of SFT batches (dicts of [global_batch_size // process_count, seq_len]
  arrays: tokens, loss_mask, segment_ids, positions — see the module docstring).

  Order: records are shuffled globally from `seed` (train split, data.shuffle), repeated
  `num_epochs` times (None = forever, reshuffled each epoch), and host `process_index` takes
  every `process_count`-th of them. The iterator supports get_state()/set_state() and
  grain.checkpoint.CheckpointSave/CheckpointRestore; `iterator.stats` is an SFTStats.
  """
  ds, stats = make_sft_dataset(data_cfg, tokenizer, seq_len=seq_len,
                               global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count,
                               split=split, num_epochs=num_epochs)
  iterator = iter(ds)
  iterator.stats = stats
  return iterator
