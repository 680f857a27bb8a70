"""Built-in synthetic tasks, generated deterministically in memory (nothing to download).

"arithmetic" (SFT): records {"prompt": "12+45=", "completion": "57"}; as pairwise preference
records {"prompt": "12+45=", "chosen": "57", "rejected": "51"} (one digit of the answer
changed: a near miss).

"preference" (pairwise, listwise or rated preference records): the prompt is a "word" of distinct
letters, e.g. "kbqe=", responses are strings of distinct letters, e.g. "xkaeb", and the hidden
ground-truth score is `true_score(prompt, response)`: how many of the prompt's letters the response
contains (here 3: "k", "b" and "e"). See PreferenceSource.

Both: record i of a split is a pure function of (seed, split, i, options). Train and eval are
disjoint by construction: every prompt is assigned to exactly one split by a stable hash of the
prompt, and each split only keeps its own prompts (rejection sampling), so no eval prompt ever
appears in training.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Task name -> the record kinds it can make (the first is its default).
SYNTHETIC_TASKS = {"arithmetic": ("sft", "pairwise"), "preference": ("pairwise", "listwise", "rated", "sft")}
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _in_eval(prompt: str, eval_fraction: float) -> bool:
  h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
  return h / 2.0**64 < eval_fraction


def _check_split(split: str, eval_fraction: float) -> None:
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")


class ArithmeticSource:
  """Random-access source of `num_records` arithmetic problems for one split.

  Args:
    seed: generation seed.
    split: "train" or "eval".
    max_digits: operands have 1..max_digits digits (uniform over 0..10**max_digits-1).
    ops: string of operators drawn from "+-*".
    num_records: nominal length of the source.
    eval_fraction: fraction of all problems that belong to the eval split.
    kind: "sft" ({"prompt", "completion"}) or "pairwise" ({"prompt", "chosen": the answer,
      "rejected": the answer with one digit replaced by another}).
  """

  def __init__(self, seed: int = 0, split: str = "train", *, max_digits: int = 2,
               ops: str = "+", num_records: int = 1_000_000, eval_fraction: float = 0.1,
               kind: str = "sft"):
    _check_split(split, eval_fraction)
    if kind not in SYNTHETIC_TASKS["arithmetic"]:
      raise ValueError(f"kind must be one of {SYNTHETIC_TASKS['arithmetic']}, got {kind!r}")
    self.kind = kind
    bad = set(ops) - set(_OPS)
    if not ops or bad:
      raise ValueError(f"arithmetic ops must be a non-empty string of '+-*', got {ops!r}")
    if max_digits < 1:
      raise ValueError(f"max_digits must be >= 1, got {max_digits}")
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
    if self.kind == "sft":
      return {"prompt": prompt, "completion": answer}
    rng = np.random.default_rng([self.seed, int(i), 1])
    pos = int(rng.integers(len(answer) - answer.startswith("-")) + answer.startswith("-"))
    digit = str((int(answer[pos]) + int(rng.integers(1, 10))) % 10)
    if pos == 0 and digit == "0" and len(answer) > 1:  # no leading zero
      digit = str(int(rng.integers(1, 10)))
      digit = digit if digit != answer[0] else str(int(digit) % 9 + 1)
    return {"prompt": prompt, "chosen": answer, "rejected": answer[:pos] + digit + answer[pos + 1:]}


def arithmetic_eval_examples(n: int, seed: int = 0, *, max_digits: int = 2,
                             ops: str = "+") -> list[tuple[str, str]]:
  """`n` held-out (prompt, answer) pairs from the eval split (never seen in training)."""
  src = ArithmeticSource(seed, "eval", max_digits=max_digits, ops=ops)
  return [src.problem(i) for i in range(n)]


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PROMPT_END = "="


def true_score(prompt: str, response: str) -> int:
  """Hidden ground truth of the "preference" task: how many distinct letters of the prompt's word
  occur in the response. E.g. true_score("kbqe=", "xkaeb") == 3 ("k", "e", "b").

  Repeating a letter earns nothing: generated responses never repeat one, so a reward model
  that learned to count occurrences can be over-optimised against this gold score (by a policy
  that repeats letters), while the gold score stays honest.
  """
  word = set(prompt.removesuffix(_PROMPT_END)) & set(_LETTERS)
  return len(word & set(response))


class PreferenceSource:
  """Random-access source of synthetic preference records with a known scoring rule.

  Prompt: `prompt_len` distinct random letters and "=", e.g. "kbqe=". Response: `min_len` to
  `max_len` distinct letters. A response is made by drawing its number of "hits" h (prompt
  letters it contains) uniformly from 0..min(prompt_len, min_len), its length n uniformly from
  min_len..max_len independently of h, then h letters from the prompt and n-h from the other
  letters, shuffled. Its score is true_score(prompt, response) == h, so length carries no
  information about the score, unless `length_bias`.

  Why a small transformer can learn it (the decision is local): a response letter that also
  occurs earlier (necessarily in the prompt, since no letter repeats within the prompt or within
  a response) is a hit: one attention head matching equal tokens finds it, and the last token
  can sum the hits with a second attention layer.

  Records by `kind`:
    "pairwise": {"prompt", "chosen", "rejected"}; the two scores differ by at least `min_gap`
                and chosen has the higher one.
    "listwise": {"prompt", "responses": [num_responses strings], "scores": [true scores]}.
    "rated":    {"prompt", "response", "scores": {"score": true score, "length": characters}}.
    "sft":      {"prompt", "completion": one response, "score": its true score}: a base policy
                for RL on this task (configs/overoptimization.py) imitates responses whose
                score is uniform over 0..max_hits.

  Args:
    seed: generation seed.
    split: "train" or "eval" (disjoint prompts, see the module docstring).
    kind: "pairwise", "listwise", "rated" or "sft".
    prompt_len, min_len, max_len: word and response lengths (in letters).
    min_gap: minimum score difference of a pair (pairwise).
    num_responses: responses per listwise record.
    length_bias: pairwise: the chosen response is always strictly longer than the rejected one;
      listwise: lengths are sorted so that a higher score never has a shorter response. Scores
      are unchanged, so a reward model can fit this data by length alone (the length-bias probe).
    num_records: nominal length of the source.
    eval_fraction: fraction of all prompts that belong to the eval split.
    hits: "uniform" (above: h uniform over 0..min(prompt_len, min_len), independent of the
      length) or "by_length" (each response draws its length, then h uniform over
      0..min(prompt_len, length): short responses are covered too; the gold reward model of
      configs/overoptimization.py sees every length a policy can produce).
  """

  def __init__(self, seed: int = 0, split: str = "train", *, kind: str = "pairwise",
               prompt_len: int = 4, min_len: int = 4, max_len: int = 8, min_gap: int = 1,
               num_responses: int = 4, length_bias: bool = False,
               num_records: int = 1_000_000, eval_fraction: float = 0.1,
               hits: str = "uniform"):
    _check_split(split, eval_fraction)
    if kind not in SYNTHETIC_TASKS["preference"]:
      raise ValueError(f"kind must be one of {SYNTHETIC_TASKS['preference']}, got {kind!r}")
    if not 1 <= prompt_len <= 13:
      raise ValueError(f"prompt_len must be in 1..13, got {prompt_len}")
    if not 1 <= min_len <= max_len <= len(_LETTERS) - prompt_len:
      raise ValueError(f"need 1 <= min_len <= max_len <= {len(_LETTERS) - prompt_len} (letters "
                       f"not in the prompt), got min_len={min_len}, max_len={max_len}")
    if hits not in ("uniform", "by_length"):
      raise ValueError(f"hits must be 'uniform' or 'by_length', got {hits!r}")
    if hits == "by_length" and length_bias:
      raise ValueError("hits='by_length' and length_bias cannot be combined")
    self.hits = hits
    self.max_hits = min(prompt_len, min_len if hits == "uniform" else max_len)
    if not 1 <= min_gap <= self.max_hits:
      raise ValueError(f"min_gap must be in 1..{self.max_hits} (the largest score), got {min_gap}")
    if num_responses < 2:
      raise ValueError(f"num_responses must be >= 2, got {num_responses}")
    if length_bias and kind in ("rated", "sft"):
      raise ValueError(f"length_bias applies to pairwise and listwise records, not {kind} ones")
    if length_bias and min_len == max_len:
      raise ValueError("length_bias needs min_len < max_len")
    self.seed, self.split, self.kind = seed, split, kind
    self.prompt_len, self.min_len, self.max_len = prompt_len, min_len, max_len
    self.min_gap = min_gap
    self.num_responses, self.length_bias = num_responses, length_bias
    self.num_records, self.eval_fraction = num_records, eval_fraction

  def __len__(self) -> int:
    return self.num_records

  def where(self, i: int) -> str:
    return f"synthetic preference ({self.split}, seed {self.seed}) record {i}"

  def _prompt(self, rng: np.random.Generator) -> str:
    want_eval = self.split == "eval"
    while True:  # Rejection: keep only prompts hashed into this split.
      word = "".join(rng.choice(list(_LETTERS), size=self.prompt_len, replace=False))
      prompt = word + _PROMPT_END
      if _in_eval(prompt, self.eval_fraction) == want_eval:
        return prompt

  def _response(self, rng: np.random.Generator, prompt: str, hits: int, length: int) -> str:
    word = prompt.removesuffix(_PROMPT_END)
    others = [c for c in _LETTERS if c not in word]
    letters = list(rng.choice(list(word), size=hits, replace=False))
    letters += list(rng.choice(others, size=length - hits, replace=False))
    return "".join(letters[j] for j in rng.permutation(length))

  def _lengths(self, rng: np.random.Generator, size: int) -> list[int]:
    return [int(n) for n in rng.integers(self.min_len, self.max_len + 1, size=size)]

  def example(self, i: int) -> tuple[str, list[str], list[int]]:
    """(prompt, responses, true scores) behind record i: 2 responses (chosen first) for pairwise,
    `num_responses` for listwise, 1 for rated."""
    k = {"pairwise": 2, "listwise": self.num_responses, "rated": 1, "sft": 1}[self.kind]
    rng = np.random.default_rng([self.seed, int(i)])
    prompt = self._prompt(rng)
    hits = [int(h) for h in rng.integers(0, self.max_hits + 1, size=k)]
    if self.kind == "pairwise":
      while abs(hits[0] - hits[1]) < self.min_gap:
        hits = [int(h) for h in rng.integers(0, self.max_hits + 1, size=2)]
      hits.sort(reverse=True)  # chosen first
    lengths = self._lengths(rng, k)
    if self.hits == "by_length":  # each response: its length, then hits in 0..min(P, length)
      while True:
        lengths = self._lengths(rng, k)
        hits = [int(rng.integers(0, min(self.prompt_len, n) + 1)) for n in lengths]
        if self.kind != "pairwise" or abs(hits[0] - hits[1]) >= self.min_gap:
          break
      if self.kind == "pairwise" and hits[0] < hits[1]:
        hits, lengths = hits[::-1], lengths[::-1]
    if self.length_bias:
      while k == 2 and lengths[0] == lengths[1]:
        lengths = self._lengths(rng, 2)
      ranked = sorted(lengths, reverse=True)  # Longest to the best (ties: either).
      for slot, j in enumerate(sorted(range(k), key=lambda j: -hits[j])):
        lengths[j] = ranked[slot]
    responses = [self._response(rng, prompt, h, n) for h, n in zip(hits, lengths)]
    return prompt, responses, hits

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.num_records:
      raise IndexError(f"index {i} out of range for {self.num_records} records")
    prompt, responses, scores = self.example(i)
    if self.kind == "pairwise":
      return {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    if self.kind == "listwise":
      return {"prompt": prompt, "responses": responses, "scores": [float(s) for s in scores]}
    if self.kind == "sft":
      return {"prompt": prompt, "completion": responses[0], "score": float(scores[0])}
    return {"prompt": prompt, "response": responses[0],
            "scores": {"score": float(scores[0]), "length": float(len(responses[0]))}}


def preference_eval_examples(n: int, seed: int = 0, *, k: int = 4, **options
                             ) -> list[tuple[str, list[str], list[int]]]:
  """`n` held-out (prompt, k responses, true scores) from the eval split of the "preference"
  task (prompts never seen in training), for listwise / best-of-k evaluation. `options` are
  PreferenceSource's (prompt_len, min_len, max_len, length_bias, eval_fraction, ...)."""
  src = PreferenceSource(seed, "eval", kind="listwise", num_responses=k, **options)
  return [src.example(i) for i in range(n)]


def synthetic_source(name: str, *, seed: int, split: str, kind: str | None = None, options=None):
  """The built-in synthetic source `name` (see SYNTHETIC_TASKS) for `split`, making `kind`
  records (None: the task's default); `options` are its constructor's keyword arguments."""
  if name not in SYNTHETIC_TASKS:
    raise ValueError(f"unknown synthetic task {name!r}; built-in tasks: {tuple(SYNTHETIC_TASKS)}")
  kinds = SYNTHETIC_TASKS[name]
  kind = kind or kinds[0]
  if kind not in kinds:
    raise ValueError(f"synthetic task {name!r} makes {'/'.join(kinds)} records, not {kind} "
                     f"records; choose another data.synthetic")
  options = dict(options or {})
  if name == "arithmetic":
    return ArithmeticSource(seed, split, kind=kind, **options)
  return PreferenceSource(seed, split, kind=kind, **options)
