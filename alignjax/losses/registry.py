"""Loss registry: maps a config name (`config.loss.name`) to a pure loss function.

Adding a loss is one decorator line next to the function:

    @registry.register("bt", "pairwise")
    def bt(r_c, r_r, *, mask=None): ...

`kind` tells the trainer which inputs the loss takes (see `docs/losses.md`):
  pairwise  `fn(r_c [B], r_r [B], *, ...)`           scalar rewards of chosen / rejected
  listwise  `fn(scores [B,K], ..., *, ...)`          K scored candidates per prompt
  rated     `fn(...)` on per-response rating targets (regression heads)
  gpm       `fn(v_c [B,2k], v_r [B,2k], *, ...)`     preference embeddings
  dpo       `fn(pc, pr, qc, qr, ..., *, beta, ...)`  paired policy log-probs (DPO family); the
            positional names say which inputs the trainer computes (docs/dpo.md: INPUTS)
  unpaired  `fn(u, desirable, z0, *, ...)`            KTO-style single completions
  policy_list `fn(l, l_ref, g, valid, *, ...)`        K scored completions per prompt [B,K]
  token     `fn(lp, mask, ..., *, ...)`               per-token SFT-style objectives [B,T]
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable

KINDS = ("pairwise", "listwise", "rated", "gpm", "dpo", "unpaired", "policy_list", "token")
# Modules whose import registers the built-in losses (imported lazily: they import us).
_BUILTIN_MODULES = ("alignjax.losses.reward", "alignjax.losses.dpo", "alignjax.losses.kto",
                    "alignjax.losses.ranked", "alignjax.losses.token")
_REGISTRY: dict[str, "Entry"] = {}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  fn: Callable
  kind: str


def register(name: str, kind: str):
  """Decorator: registers `fn` under `name`; returns `fn` unchanged."""
  if kind not in KINDS:
    raise ValueError(f"Loss {name!r}: unknown kind {kind!r}; expected one of {KINDS}.")

  def wrap(fn):
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise ValueError(f"Loss {name!r} is already registered (by "
                       f"{_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__qualname__}).")
    _REGISTRY[name] = Entry(name, fn, kind)
    return fn

  return wrap


def _load_builtins():
  for module in _BUILTIN_MODULES:
    importlib.import_module(module)


def names(kind: str | None = None) -> list[str]:
  """Sorted registered names, optionally only those of one kind."""
  _load_builtins()
  if kind is not None and kind not in KINDS:
    raise ValueError(f"Unknown loss kind {kind!r}; expected one of {KINDS}.")
  return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def get(name: str) -> Entry:
  """The `Entry(name, fn, kind)` registered under `name`; ValueError if there is none."""
  _load_builtins()
  if name not in _REGISTRY:
    raise ValueError(f"Unknown loss {name!r}. Registered losses: {', '.join(names())}.")
  return _REGISTRY[name]


def defaults(name: str) -> dict:
  """Keyword-only hyper-parameter defaults of `name` that are plain Python scalars or strings.

  Used to build the locked `config.loss.params` section. Keyword-only arguments without a
  default (per-example arrays such as `mu` or `labels`, which come from the batch), with a
  `None` default, or `mask` are left out.
  """
  params = inspect.signature(get(name).fn).parameters.values()
  return {p.name: p.default for p in params
          if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "mask"
          and isinstance(p.default, (bool, int, float, str))}
