"""Reward-function registry, config parsing and batch scoring (METHODS.md section 4).

A reward function is a host (non-jit) function scoring a batch of N sampled completions:

    @registry.register("my_reward")
    def my_reward(prompts, completions, fields, *, scale=1.0):
      return [scale * len(c) for c in completions]   # N floats; None or NaN = unscorable

`fields` holds every dataset field of each sample's record as a list aligned with `prompts`
(e.g. fields["answer"][i]), plus the reserved keys the RL trainer supplies (RESERVED_FIELDS):
  length          completion token count (int)
  truncated       the sample hit max_new_tokens without EOS (bool)
  group           prompt index b of sample b*G+g (int)
  max_new_tokens  the sampling budget (int; a scalar or a list)
Hyper-parameters are keyword-only with defaults; `config.rl.rewards` sets them (`parse_rewards`).
`score` runs the configured functions and returns float32 values [N,K] with NaN = unscorable.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import math
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

RESERVED_FIELDS = ("length", "truncated", "group", "max_new_tokens")
# Modules whose import registers the built-in rewards (imported lazily: they import us).
_BUILTIN_MODULES = ("alignjax.rewards.math", "alignjax.rewards.basic", "alignjax.rewards.model",
                    "alignjax.rewards.text", "alignjax.rewards.logprob_rewards")
_SPEC_KEYS = ("name", "weight", "params", "alias")
_REGISTRY: dict[str, "Entry"] = {}
_WARNED: set[str] = set()


class ParamError(ValueError):
  """A bad hyper-parameter value; `param` names it (parse_rewards prefixes the config key)."""

  def __init__(self, param: str, msg: str):
    super().__init__(f"{param}: {msg}")
    self.param, self.msg = param, msg


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered reward. `grouped`: its value depends on the other samples of the same prompt
  (score() retries it per group, not per item). `check(params)` raises ParamError on bad values."""
  name: str
  fn: Callable
  grouped: bool = False
  check: Callable[[dict], None] | None = None


def register(name: str, *, grouped: bool = False, check: Callable[[dict], None] | None = None):
  """Decorator: registers the reward `fn` under `name`; returns `fn` unchanged."""

  def wrap(fn):
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise ValueError(f"Reward {name!r} is already registered (by "
                       f"{_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__qualname__}).")
    _REGISTRY[name] = Entry(name, fn, grouped, check)
    return fn

  return wrap


def _load_builtins():
  for module in _BUILTIN_MODULES:
    importlib.import_module(module)


def names() -> list[str]:
  """Sorted registered reward names."""
  _load_builtins()
  return sorted(_REGISTRY)


def get(name: str) -> Entry:
  """The `Entry` registered under `name`; ValueError listing the registered names otherwise."""
  _load_builtins()
  if name not in _REGISTRY:
    raise ValueError(f"Unknown reward {name!r}. Registered rewards: {', '.join(names())}.")
  return _REGISTRY[name]


def _keyword_params(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
  params = inspect.signature(fn).parameters.values()
  kw = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
  return kw, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def defaults(name: str) -> dict:
  """Keyword-only hyper-parameters of reward `name` and their defaults."""
  kw, _ = _keyword_params(get(name).fn)
  return {k: p.default for k, p in kw.items() if p.default is not inspect.Parameter.empty}


# ---------------------------------------------------------------------------- field helpers


def column(fields: collections.abc.Mapping, key: str, n: int, *, who: str) -> list:
  """fields[key] as a list of length n (a scalar is broadcast); ValueError if it is missing."""
  if key not in fields:
    raise ValueError(f"{who} needs fields[{key!r}], which this batch lacks (fields: "
                     f"{', '.join(sorted(fields)) or 'none'}).")
  value = fields[key]
  if _is_column(value):
    if len(value) != n:
      raise ValueError(f"{who}: fields[{key!r}] has {len(value)} entries for {n} samples.")
    return list(value)
  return [value] * n


def _is_column(value) -> bool:
  return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim >= 1)


def _as_float(x) -> float:
  """None / NaN / +-inf -> NaN, a number -> float; TypeError for anything else."""
  if x is None:
    return math.nan
  if isinstance(x, (str, bytes)) or not isinstance(x, (int, float, np.number, np.bool_)):
    raise TypeError(f"{type(x).__name__} {x!r} is not a number")
  x = float(x)
  return x if math.isfinite(x) else math.nan


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """One configured reward: `name` labels its column and metrics (the alias, else the registered
  name), `reward` is the registered name, `params` its keyword arguments."""
  name: str
  reward: str
  fn: Callable
  weight: float = 1.0
  params: dict = dataclasses.field(default_factory=dict)
  grouped: bool = False

  def __call__(self, prompts, completions, fields):
    return self.fn(prompts, completions, fields, **self.params)


def _plain(x):
  """ConfigDict -> dict (recursively through lists); other values unchanged."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, collections.abc.Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(_plain(v) for v in x)
  return x


def make_spec(name: str, *, weight: float = 1.0, params: dict | None = None,
              alias: str | None = None, where: str = "reward") -> RewardSpec:
  """A validated RewardSpec; errors name the config key `where` (e.g. 'rl.rewards[1]')."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}.name: expected a reward name, got {name!r}. "
                     f"Registered rewards: {', '.join(names())}.")
  if name not in names():
    raise ValueError(f"{where}.name: unknown reward {name!r}. "
                     f"Registered rewards: {', '.join(names())}.")
  entry = get(name)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
    raise ValueError(f"{where}.weight: expected a finite number, got {weight!r}.")
  params = _plain(params) if params is not None else {}
  if not isinstance(params, collections.abc.Mapping):
    raise ValueError(f"{where}.params: expected a dict of keyword arguments, got {params!r}.")
  kw, var_kw = _keyword_params(entry.fn)
  if not var_kw:
    for key in params:
      if key not in kw:
        raise ValueError(f"{where}.params.{key}: {name} has no parameter {key!r}. Valid "
                         f"parameters: {', '.join(kw) or 'none'}.")
  missing = [k for k, p in kw.items() if p.default is inspect.Parameter.empty and k not in params]
  if missing:
    raise ValueError(f"{where}.params: {name} needs {', '.join(missing)}.")
  if entry.check is not None:
    try:
      entry.check({**defaults(name), **params})
    except ParamError as e:
      raise ValueError(f"{where}.params.{e.param}: {e.msg}") from None
  if alias is not None and (not isinstance(alias, str) or not alias):
    raise ValueError(f"{where}.alias: expected a non-empty string, got {alias!r}.")
  return RewardSpec(alias or name, name, entry.fn, float(weight), dict(params), entry.grouped)


def parse_rewards(config, *, key: str = "rl.rewards") -> list[RewardSpec]:
  """RewardSpecs from a config value (`config.rl.rewards`), which is one of:
    "math_reward,format_reward:0.5"        names with optional ":weight" (default 1), default
                                           params (a string fits a command-line override);
    [{"name": "math_reward", "weight": 1.0, "params": {...}, "alias": "acc"}, "format_reward"]
                                           weight (1.0), params ({}), alias (name) optional.
  `alias` names the column and metrics (needed to use one reward twice). Unknown names, keys or
  params raise ValueError naming the config key (e.g. `rl.rewards[1].params.foo`) and the choices.
  """
  config = _plain(config)
  if config is None:
    return []
  if isinstance(config, RewardSpec):
    config = [config]
  if isinstance(config, str):
    config = [s.strip() for s in config.split(",") if s.strip()]
  if not isinstance(config, (list, tuple)):
    raise ValueError(f"{key}: expected a comma-separated string or a list of reward entries, "
                     f"got {config!r}.")
  specs = []
  for i, item in enumerate(config):
    where = f"{key}[{i}]"
    if isinstance(item, RewardSpec):
      spec = item
    elif isinstance(item, str):
      name, _, weight = item.strip().partition(":")
      try:
        weight = float(weight) if weight.strip() else 1.0
      except ValueError:
        raise ValueError(f"{where}: expected 'name' or 'name:weight', got {item!r}.") from None
      spec = make_spec(name.strip(), weight=weight, where=where)
    elif isinstance(item, collections.abc.Mapping):
      for k in item:
        if k not in _SPEC_KEYS:
          raise ValueError(f"{where}.{k}: unknown key; a reward entry takes "
                           f"{', '.join(_SPEC_KEYS)}.")
      if "name" not in item:
        raise ValueError(f"{where}: missing 'name'. Registered rewards: {', '.join(names())}.")
      spec = make_spec(item["name"], weight=item.get("weight", 1.0), params=item.get("params"),
                       alias=item.get("alias"), where=where)
    else:
      raise ValueError(f"{where}: expected a reward name or a dict with keys "
                       f"{', '.join(_SPEC_KEYS)}, got {item!r}.")
    if spec.name in [s.name for s in specs]:
      raise ValueError(f"{where}: reward {spec.name!r} appears twice; give one an 'alias'.")
    specs.append(spec)
  return specs


# ---------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class ScoreResult:
  """values [N,K] float32 (NaN = unscorable), column names [K], unscorable_counts [K] int32,
  weights [K] float32 (the configured weights, for `combine.weighted_sum`)."""
  values: np.ndarray
  names: tuple[str, ...]
  unscorable_counts: np.ndarray
  weights: np.ndarray

  def metrics(self) -> dict[str, float]:
    """`num_unscorable/<name>` (count) and `reward/<name>` (mean over scorable samples; NaN if
    there are none) per column."""
    out = {}
    for k, name in enumerate(self.names):
      col = self.values[:, k]
      ok = ~np.isnan(col)
      out[f"num_unscorable/{name}"] = int(self.unscorable_counts[k])
      out[f"reward/{name}"] = float(col[ok].mean()) if ok.any() else math.nan
    return out


def _column_of(spec: RewardSpec, out, n: int) -> np.ndarray:
  where = f"reward function {spec.name!r} ({spec.fn.__module__}.{spec.fn.__qualname__})"
  if isinstance(out, (str, bytes)) or not isinstance(out, (collections.abc.Sequence, np.ndarray)):
    raise ValueError(f"{where} returned {type(out).__name__}, expected a sequence of {n} floats "
                     f"(None or NaN for unscorable samples).")
  out = np.asarray(out, dtype=object).reshape(-1) if isinstance(out, np.ndarray) else list(out)
  if len(out) != n:
    raise ValueError(f"{where} returned {len(out)} values for a batch of {n} samples; it must "
                     f"return one float (or None) per completion.")
  try:
    return np.array([_as_float(x) for x in out], np.float32)
  except TypeError as e:
    raise ValueError(f"{where} returned a non-numeric value: {e}.") from None


def _take(x, idx: list[int], n: int):
  if _is_column(x) and len(x) == n:
    return [x[j] for j in idx]
  return x


def _units(spec: RewardSpec, fields: collections.abc.Mapping, n: int) -> list[list[int]]:
  """Index sets to retry one at a time: single items, or whole groups for grouped rewards."""
  if not (spec.grouped and "group" in fields):
    return [[i] for i in range(n)]
  groups: dict[Any, list[int]] = {}
  for i, g in enumerate(column(fields, "group", n, who=spec.name)):
    groups.setdefault(g, []).append(i)
  return list(groups.values())


def _call_isolated(spec, prompts, completions, fields, n) -> np.ndarray:
  """Scores `spec` unit by unit; units whose call raises become NaN."""
  out = np.full((n,), np.nan, np.float32)
  for idx in _units(spec, fields, n):
    sub = {k: _take(v, idx, n) for k, v in fields.items()}
    try:
      got = spec([prompts[j] for j in idx], [completions[j] for j in idx], sub)
    except Exception:  # pylint: disable=broad-except
      continue
    out[idx] = _column_of(spec, got, len(idx))
  return out


def score(specs, prompts: Sequence[str], completions: Sequence[str],
          fields: collections.abc.Mapping | None = None) -> ScoreResult:
  """Runs every reward of `specs` (RewardSpecs or anything `parse_rewards` accepts) on the batch.

  A function that raises on the batch is retried per item (per group if registered `grouped`),
  so only the failing items become NaN; the first exception of each function is logged once.
  None / NaN / inf returns become NaN. A return of the wrong length or type raises ValueError.
  """
  if not (isinstance(specs, (list, tuple)) and all(isinstance(s, RewardSpec) for s in specs)):
    specs = parse_rewards(specs)
  prompts, completions = list(prompts), list(completions)
  n = len(prompts)
  if len(completions) != n:
    raise ValueError(f"score: {n} prompts but {len(completions)} completions.")
  fields = dict(fields or {})
  for k, v in fields.items():
    if _is_column(v) and len(v) != n:
      raise ValueError(f"score: fields[{k!r}] has {len(v)} entries for {n} samples.")
  cols = []
  for spec in specs:
    try:
      out = spec(prompts, completions, fields)
    except Exception as e:  # pylint: disable=broad-except
      if spec.name not in _WARNED:
        _WARNED.add(spec.name)
        logging.warning("reward %r raised %s: %s; retrying item by item (failing items are "
                        "unscorable, NaN). Logged once per reward.", spec.name,
                        type(e).__name__, e)
      cols.append(_call_isolated(spec, prompts, completions, fields, n))
      continue
    cols.append(_column_of(spec, out, n))
  values = np.stack(cols, axis=1) if cols else np.zeros((n, 0), np.float32)
  return ScoreResult(values=values.astype(np.float32), names=tuple(s.name for s in specs),
                     unscorable_counts=np.isnan(values).sum(axis=0).astype(np.int32),
                     weights=np.array([s.weight for s in specs], np.float32))
