"""Learned rewards: scores of a trained reward model on (prompt, completion) text.

`reward_model` loads (once per path, then cached) an alignjax `reward_model` run's workdir or
a local Hugging Face `*ForSequenceClassification` directory, with its own tokenizer, and
scores `prompt + completion + eos` rows as the reward model was trained (data/preference.py);
ensembles and multi-attribute heads are combined as the run's config says
(`reward.aggregate`, `reward.attribute_weights`). No downloads: paths are local.

    config.rl.rewards = [{"name": "reward_model", "params": {"path": "/runs/rm"}}]
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from alignjax.rewards.registry import ParamError, register

_CACHE: dict = {}


def _check(params: dict) -> None:
  path = params.get("path", "")
  if not path:
    raise ParamError("path", "give the reward model: an alignjax reward_model workdir or a local "
                     "Hugging Face *ForSequenceClassification directory")
  if not os.path.isdir(path):
    raise ParamError("path", f"{path!r} is not a directory")


def _load(path: str):
  if path in _CACHE:
    return _CACHE[path]
  from alignjax import parallel  # noqa: PLC0415 (jax-heavy imports only when used)
  from alignjax.data.tokenizer import Tokenizer  # noqa: PLC0415
  from alignjax.evaluation import rm as rm_eval  # noqa: PLC0415
  from alignjax.trainers import common  # noqa: PLC0415
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = parallel.rules_from_config({})
  if rm_eval._is_hf_dir(path):  # noqa: SLF001
    tokenizer = Tokenizer.from_dir(path)
  else:
    import json  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415
    with open(os.path.join(path, "config.json")) as f:
      tokenizer = common.build_tokenizer(ml_collections.ConfigDict(json.load(f)))
  with parallel.use_mesh(mesh, rules):
    model, run_cfg = rm_eval.load_reward_model(path, tokenizer, mesh, rules)
  scorer = rm_eval._Scorer(model, mesh, rules, chunk=64)  # noqa: SLF001
  _CACHE[path] = (tokenizer, scorer, run_cfg, mesh, rules)
  return _CACHE[path]


@register("reward_model", check=_check)
def reward_model(prompts: Sequence[str], completions: Sequence[str], fields, *, path: str = "",
                 seq_len: int = 512) -> list[float]:
  """r = RM(prompt, completion): the scalar score of a trained reward model (Bradley-Terry
  and relatives, `reward_model` task; METHODS section 1). Rows longer than `seq_len` are
  truncated as in training (prompt cut from the left)."""
  from alignjax import parallel  # noqa: PLC0415
  from alignjax.data import preference as pref_data  # noqa: PLC0415
  from alignjax.evaluation import rm as rm_eval  # noqa: PLC0415
  tokenizer, scorer, run_cfg, mesh, rules = _load(path)
  encoded = []
  for prompt, completion in zip(prompts, completions):
    p = tokenizer.encode(prompt, add_bos=getattr(tokenizer, "add_bos_token", False))
    encoded.append((p, tokenizer.encode(completion) + [tokenizer.eos_id]))
  # Rows are as long as the longest (a power of two >= 16, at most seq_len): fewer padded
  # tokens, and few distinct shapes to compile.
  need = max((len(p) + len(r) for p, r in encoded), default=1)
  width = min(seq_len, max(16, 1 << (need - 1).bit_length()))
  rows = [pref_data.preference_rows(p, [r], seq_len=width, pad_id=tokenizer.pad_id)[0]
          for p, r in encoded]
  cat = {k: np.concatenate([row[k] for row in rows]) for k in ("tokens", "positions",
                                                                "segment_ids")}
  with parallel.use_mesh(mesh, rules):
    out = scorer(cat)
  return [float(x) for x in rm_eval._scalar(np.asarray(jax.device_get(out)), run_cfg)]  # noqa: SLF001
