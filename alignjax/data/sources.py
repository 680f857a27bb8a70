"""Random-access record sources: JSONL, Parquet, ArrayRecord (JSON bytes), and their concatenation.

Every source has `len(src)`, `src[i] -> dict` (raw, unvalidated record) and
`src.where(i) -> str` (e.g. "data/train.jsonl line 17") for error messages.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from typing import Any, Sequence

import numpy as np

from alignjax.data.records import RecordError

FORMATS = ("auto", "jsonl", "parquet", "array_record")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
               ".array_record": "array_record", ".arrayrecord": "array_record"}


class JsonlSource:
  """One JSON object per line. Blank lines are skipped; line numbers are the file's (1-based)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    starts, lines = [], []
    with open(self.path, "rb") as f:  # One scan for the byte offset of every non-blank line.
      pos = 0
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          starts.append(pos)
          lines.append(lineno)
        pos += len(line)
    self._starts = np.asarray(starts + [pos], dtype=np.int64)
    self._lines = np.asarray(lines, dtype=np.int64)
    self._fd = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._lines)

  def where(self, i: int) -> str:
    return f"{self.path} line {int(self._lines[i])}"

  def __getitem__(self, i: int) -> Any:
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = open(self.path, "rb")  # Closed when the source is garbage collected.
    start, end = int(self._starts[i]), int(self._starts[i + 1])
    raw = os.pread(self._fd.fileno(), end - start, start)  # Positional read: safe across threads.
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(self.where(i), None, f"invalid JSON ({e})") from None

  def __getstate__(self):  # Picklable for multiprocessing: reopen the file lazily.
    state = self.__dict__.copy()
    state["_fd"], state["_lock"] = None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class ParquetSource:
  """Rows of a Parquet file as dicts (memory-mapped with pyarrow). Rows are 1-based in errors."""

  def __init__(self, path: str):
    import pyarrow.parquet as pq
    self.path = os.fspath(path)
    self._table = pq.read_table(self.path, memory_map=True)

  def __len__(self) -> int:
    return self._table.num_rows

  def where(self, i: int) -> str:
    return f"{self.path} row {i + 1}"

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._table.slice(i, 1).to_pylist()[0]


class ArrayRecordSource:
  """ArrayRecord file whose records are UTF-8 JSON bytes. Records are 1-based in errors."""

  def __init__(self, path: str):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self.path = os.fspath(path)
    self._src = ArrayRecordDataSource([self.path])

  def __len__(self) -> int:
    return len(self._src)

  def where(self, i: int) -> str:
    return f"{self.path} record {i + 1}"

  def __getitem__(self, i: int) -> Any:
    try:
      return json.loads(self._src[i])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(self.where(i), None, f"invalid JSON ({e})") from None


class ConcatSource:
  """Concatenation of sources, in order."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def _locate(self, i: int) -> tuple[Any, int]:
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} records")
    k = bisect.bisect_right(self._ends, i)
    return self.sources[k], i - (self._ends[k - 1] if k else 0)

  def where(self, i: int) -> str:
    src, j = self._locate(i)
    return src.where(j)

  def __getitem__(self, i: int) -> Any:
    src, j = self._locate(i)
    return src[j]


_SOURCES = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource}


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """A path, a glob, a comma-separated string of those, or a list of those -> sorted file list."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [p.strip() for p in os.fspath(paths).split(",") if p.strip()]
  files = []
  for p in paths:
    p = os.fspath(p)
    if glob.has_magic(p):
      matched = sorted(glob.glob(p))
      if not matched:
        raise FileNotFoundError(f"data file pattern {p!r} matches no file")
      files.extend(matched)
    elif not os.path.isfile(p):
      raise FileNotFoundError(f"data file {p!r} does not exist")
    else:
      files.append(p)
  if not files:
    raise ValueError("no data files given")
  return files


def open_source(paths: str | Sequence[str], format: str = "auto") -> ConcatSource:
  """Opens files (path, glob, comma-separated string or list) as one random-access source.

  `format` is "auto" (by extension: .jsonl/.json/.ndjson, .parquet, .array_record) or one of
  "jsonl", "parquet", "array_record" for all files.
  """
  if format not in FORMATS:
    raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
  sources = []
  for f in expand_paths(paths):
    fmt = format
    if fmt == "auto":
      fmt = _EXTENSIONS.get(os.path.splitext(f)[1].lower())
      if fmt is None:
        raise ValueError(f"cannot tell the format of {f!r} from its extension (known: "
                         f"{', '.join(_EXTENSIONS)}); set data.format")
    sources.append(_SOURCES[fmt](f))
  return ConcatSource(sources)
