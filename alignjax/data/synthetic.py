"""Built-in synthetic SFT tasks, generated deterministically in memory (nothing to download).

"arithmetic": records {"prompt": "12+45=", "completion": "57"}. Record i of a split is a pure
function of (seed, split, i). Train and eval are disjoint by construction: every problem is
assigned to exactly one split by a stable hash of its prompt, and each split only keeps its own
problems (rejection sampling), so no eval prompt ever appears in training.
"""

from __future__ import annotations

import hashlib

import numpy as np

SYNTHETIC_TASKS = ("arithmetic",)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _in_eval(prompt: str, eval_fraction: float) -> bool:
  h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
  return h / 2.0**64 < eval_fraction


class ArithmeticSource:
  """Random-access source of `num_records` arithmetic problems for one split.

  Args:
    seed: generation seed.
    split: "train" or "eval".
    max_digits: operands have 1..max_digits digits (uniform over 0..10**max_digits-1).
    ops: string of operators drawn from "+-*".
    num_records: nominal length of the source.
    eval_fraction: fraction of all problems that belong to the eval split.
  """

  def __init__(self, seed: int = 0, split: str = "train", *, max_digits: int = 2,
               ops: str = "+", num_records: int = 1_000_000, eval_fraction: float = 0.1):
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    bad = set(ops) - set(_OPS)
    if not ops or bad:
      raise ValueError(f"arithmetic ops must be a non-empty string of '+-*', got {ops!r}")
    if max_digits < 1:
      raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    self.seed, self.split, self.max_digits, self.ops = seed, split, max_digits, ops
    self.num_records, self.eval_fraction = num_records, eval_fraction

  def __len__(self) -> int:
    return self.num_records

  def where(self, i: int) -> str:
    return f"synthetic arithmetic ({self.split}, seed {self.seed}) record {i}"

  def problem(self, i: int) -> tuple[str, str]:
    """(prompt, answer) of record i, e.g. ("12+45=", "57")."""
    rng = np.random.default_rng([self.seed, int(i)])
    want_eval = self.split == "eval"
    while True:  # Rejection: keep only problems hashed into this split.
      a, b = (int(x) for x in rng.integers(0, 10**self.max_digits, size=2))
      op = self.ops[int(rng.integers(len(self.ops)))]
      prompt = f"{a}{op}{b}="
      if _in_eval(prompt, self.eval_fraction) == want_eval:
        return prompt, str(_OPS[op](a, b))

  def __getitem__(self, i: int) -> dict[str, str]:
    if not 0 <= i < self.num_records:
      raise IndexError(f"index {i} out of range for {self.num_records} records")
    prompt, answer = self.problem(i)
    return {"prompt": prompt, "completion": answer}


def arithmetic_eval_examples(n: int, seed: int = 0, *, max_digits: int = 2,
                             ops: str = "+") -> list[tuple[str, str]]:
  """`n` held-out (prompt, answer) pairs from the eval split (never seen in training)."""
  src = ArithmeticSource(seed, "eval", max_digits=max_digits, ops=ops)
  return [src.problem(i) for i in range(n)]


def synthetic_source(name: str, *, seed: int, split: str, options=None):
  """The built-in synthetic source `name` ("arithmetic") for `split`; `options` are its kwargs."""
  if name != "arithmetic":
    raise ValueError(f"unknown synthetic task {name!r}; built-in tasks: {SYNTHETIC_TASKS}")
  return ArithmeticSource(seed, split, **dict(options or {}))
