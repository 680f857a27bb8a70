"""Log-prob-derived rewards (METHODS.md 7.1, 7.3, 7.4, 7.7) as `config.rl.rewards` entries.

Host reward functions over the scorers of `alignjax.rewards.logprob`, each scoring every row of
a call in one scorer call:

    dpo_implicit  beta * [lp(y|x; policy) - lp(y|x; ref)]                     (7.1)
    cdr           lp(y | c+x; strong) - lp(y | c+x; weak)                     (7.3)
    flr           mean_F+ lp(f|x,y; model) - mean_F- lp(f|x,y; model)         (7.4)
    genrm_yes     sigmoid(lse z[yes] - lse z[no]) of a judge's verdict token  (7.7)

Every model param names a LOCAL directory: an alignjax run workdir (its `config.json` says
how to build the model and its tokenizer; parameters from the latest checkpoint in
`checkpoints/`) or a Hugging Face causal-LM directory (`config.json` + `*.safetensors` +
`tokenizer.json`). Nothing is downloaded. Each path is loaded once per process (`_CACHE`),
sharded over all devices (`fsdp`), like `alignjax.rewards.model`.

Rows are built as the RL trainer builds its training rows: the prompt record goes through
`alignjax.sampling.task.encode_prompt` with the scoring model's own tokenizer (its chat
template with the generation prompt when it has one, `chat_template="auto"`; a record whose
`prompt` is empty is read from `fields["messages"]`), and the completion is
`encode(completion) + [eos]` (no eos when `fields["truncated"]` says the sample hit
max_new_tokens, as in the trainer). Rows whose text the tokenizer cannot encode, or whose
prompt has no tokens, are unscorable (None).

`sar` (7.5) is not registered: it needs the current policy, which a host reward never sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from alignjax.rewards.registry import ParamError, column, register

_CACHE: dict[str, "Loaded"] = {}
_MESH: list = []          # [(mesh, rules)] once created
_WARNED: set[str] = set()

FLR_POSITIVE = ("Thanks, that answers my question.",
                "Great, that is exactly what I needed.",
                "Perfect, thank you for the clear explanation.",
                "That is correct, thanks for the help!")
FLR_NEGATIVE = ("That is not what I asked for.",
                "That is wrong, please try again.",
                "This does not answer my question.",
                "Your answer is confusing and unhelpful.")
GENRM_TEMPLATE = ("Question:\n{prompt}\n\nResponse:\n{completion}\n\n"
                  "Is the response correct and helpful? Answer yes or no.")
_MARK = "@@ALIGNJAX_FOLLOWUP@@"
_MARK_A = "@@ALIGNJAX_RESPONSE@@"


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A loaded scoring model: the NNX Transformer (LM head), its tokenizer, mesh and rules."""
  model: Any
  tokenizer: Any
  mesh: Any
  rules: Any
  kind: str          # "alignjax" | "hf"
  path: str


# ---------------------------------------------------------------------------- loading


def _key(path: str) -> str:
  return os.path.realpath(os.path.expanduser(path))


def _read_config(path: str) -> dict:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{path}: neither an alignjax run workdir (config.json + "
                            "checkpoints/) nor a Hugging Face causal-LM directory "
                            "(config.json + *.safetensors + tokenizer.json).")
  with open(cfg_file) as f:
    return json.load(f)


def _is_run_config(raw: dict) -> bool:
  return "task" in raw and isinstance(raw.get("model"), dict)


def _mesh_and_rules():
  if not _MESH:
    from alignjax import parallel  # noqa: PLC0415 (jax-heavy imports only when used)
    _MESH.append((parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}),
                  parallel.rules_from_config({})))
  return _MESH[0]


def _run_tokenizer(run_cfg):
  from alignjax.trainers import common  # noqa: PLC0415
  return common.build_tokenizer(run_cfg)


def _build(path: str) -> Loaded:
  """Loads the model and tokenizer at `path` (no cache; see `load`)."""
  import ml_collections  # noqa: PLC0415
  from alignjax import parallel  # noqa: PLC0415
  from alignjax.data.tokenizer import Tokenizer  # noqa: PLC0415
  from alignjax.models import hf  # noqa: PLC0415
  from alignjax.trainers import common  # noqa: PLC0415
  raw = _read_config(path)
  mesh, rules = _mesh_and_rules()
  if _is_run_config(raw):
    run_cfg = ml_collections.ConfigDict(raw)
    task = run_cfg.get("task")
    if task == "reward_model":
      raise ValueError(f"{path}: a reward_model run has no LM head; score it with the "
                       "`reward_model` reward instead.")
    tokenizer = _run_tokenizer(run_cfg)
    cfg = common.model_config(run_cfg, tokenizer.vocab_size)
    run_cfg.model.checkpoint = path        # this run's own parameters, latest step
    run_cfg.model.checkpoint_step = -1
    with parallel.use_mesh(mesh, rules):
      if task == "rl" and _rl_has_critic(run_cfg):
        model = _restore_rl_policy(path, cfg, mesh, rules)
      else:
        model = common.build_model(run_cfg, cfg, mesh, rules)
    return Loaded(model, tokenizer, mesh, rules, "alignjax", path)
  if any(a.endswith("ForSequenceClassification") for a in raw.get("architectures", [])):
    raise ValueError(f"{path}: a *ForSequenceClassification checkpoint has no LM head; score "
                     "it with the `reward_model` reward instead.")
  tokenizer = Tokenizer.from_dir(path)
  with parallel.use_mesh(mesh, rules):
    model = hf.load_hf_model(path, mesh, rules, lm_head=True)
  return Loaded(model, tokenizer, mesh, rules, "hf", path)


def _rl_has_critic(run_cfg) -> bool:
  from alignjax.trainers import rl  # noqa: PLC0415
  try:
    return bool(rl.resolve(run_cfg.rl)["critic"])
  except Exception:  # pylint: disable=broad-except
    return False


def _restore_rl_policy(path, cfg, mesh, rules):
  """The policy half of an RL run whose checkpoint holds policy + critic (PPO)."""
  from flax import nnx  # noqa: PLC0415
  from alignjax import parallel  # noqa: PLC0415
  from alignjax.models.transformer import init_model  # noqa: PLC0415
  from alignjax.trainers import checkpoint  # noqa: PLC0415
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg, 0)))
  target = parallel.abstract_with_shardings(abstract, mesh, rules)
  return nnx.merge(graphdef, checkpoint.restore_params(path, {"policy": target})["policy"])


def load(path: str) -> Loaded:
  """The model and tokenizer at `path`, loaded once per process (cached by real path)."""
  key = _key(path)
  if key not in _CACHE:
    _CACHE[key] = _build(key)
    logging.info("log-prob reward: loaded %s (%s)", key, _CACHE[key].kind)
  return _CACHE[key]


def tokenizer_for(path: str):
  """The tokenizer of the model at `path`, without loading the model (cheap; for checks)."""
  key = _key(path)
  if key in _CACHE:
    return _CACHE[key].tokenizer
  raw = _read_config(key)
  if _is_run_config(raw):
    import ml_collections  # noqa: PLC0415
    return _run_tokenizer(ml_collections.ConfigDict(raw))
  from alignjax.data.tokenizer import Tokenizer  # noqa: PLC0415
  return Tokenizer.from_dir(key)


# ---------------------------------------------------------------------------- checks


def _check_path(params: dict, name: str, what: str) -> None:
  path = params.get(name, "")
  if not path or not isinstance(path, str):
    raise ParamError(name, f"give the {what}: a local alignjax run workdir or a Hugging Face "
                     "causal-LM directory")
  if not os.path.isdir(os.path.expanduser(path)):
    raise ParamError(name, f"{path!r} is not a directory")
  if not os.path.exists(os.path.join(os.path.expanduser(path), "config.json")):
    raise ParamError(name, f"{path!r} has no config.json: neither an alignjax run workdir nor a "
                     "Hugging Face causal-LM directory")


def _same_tokenizer(params: dict, a: str, b: str) -> None:
  """ParamError(b) if the models at params[a] and params[b] do not share a tokenizer (the
  rows are tokenised once, with a's tokenizer)."""
  toks = {}
  for name in (a, b):
    try:
      toks[name] = tokenizer_for(params[name])
    except Exception as e:  # pylint: disable=broad-except
      raise ParamError(name, f"cannot read its tokenizer: {type(e).__name__}: {e}") from None
  ta, tb = toks[a], toks[b]
  fields = ("vocab_size", "eos_id", "pad_id", "bos_id", "add_bos_token")
  diff = [f for f in fields if getattr(ta, f, None) != getattr(tb, f, None)]
  if type(ta) is not type(tb) or getattr(ta, "chat_template", None) != getattr(
      tb, "chat_template", None):
    diff.append("kind/chat_template")
  if diff:
    raise ParamError(b, f"its tokenizer differs from {a}'s ({', '.join(diff)}); both models "
                     "must share the tokenizer and the chat template")


def _check_number(params: dict, name: str) -> None:
  v = params.get(name)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ParamError(name, f"expected a finite number, got {v!r}")


def _check_mode(params: dict) -> None:
  mode = params.get("chat_template", "auto")
  if mode not in ("auto", "always", "never"):
    raise ParamError("chat_template", f"expected auto | always | never, got {mode!r}")


def _check_texts(params: dict, name: str) -> list[str]:
  v = params.get(name)
  texts = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
  if not texts or not all(isinstance(t, str) and t for t in texts):
    raise ParamError(name, f"expected a non-empty string or list of non-empty strings, got {v!r}")
  return texts


def _check_dpo(params: dict) -> None:
  _check_path(params, "policy", "policy model")
  _check_path(params, "ref", "reference model")
  _check_number(params, "beta")
  _check_mode(params)
  _same_tokenizer(params, "policy", "ref")


def _check_cdr(params: dict) -> None:
  _check_path(params, "strong", "strong model")
  _check_path(params, "weak", "weak model")
  if not isinstance(params.get("prefix", ""), str):
    raise ParamError("prefix", f"expected a string (criteria text), got {params['prefix']!r}")
  _check_mode(params)
  _same_tokenizer(params, "strong", "weak")


def _check_flr(params: dict) -> None:
  _check_path(params, "model", "follow-up model")
  _check_texts(params, "positive")
  _check_texts(params, "negative")
  mpt = params.get("max_prompt_tokens", 0)
  if isinstance(mpt, bool) or not isinstance(mpt, int) or mpt < 0:
    raise ParamError("max_prompt_tokens", f"expected an int >= 0 (0: no limit), got {mpt!r}")
  _check_mode(params)


def _check_genrm(params: dict) -> None:
  _check_path(params, "judge", "judge model")
  t = params.get("template")
  if not isinstance(t, str):
    raise ParamError("template", f"expected a format string, got {t!r}")
  if "{prompt}" not in t or "{completion}" not in t:
    raise ParamError("template", "must contain {prompt} and {completion}")
  try:
    t.format(prompt="x", completion="y")
  except (KeyError, IndexError, ValueError) as e:
    raise ParamError("template", f"not a valid format string with only {{prompt}} and "
                     f"{{completion}}: {e!r}") from None
  yes, no = _check_texts(params, "yes"), _check_texts(params, "no")
  if set(yes) & set(no):
    raise ParamError("no", f"the yes words {yes} and no words {no} overlap")
  _check_number(params, "temperature")
  if params["temperature"] <= 0:
    raise ParamError("temperature", f"expected > 0, got {params['temperature']!r}")
  _check_mode(params)


# ---------------------------------------------------------------------------- rows


def _records(prompts: Sequence[str], fields) -> list[dict]:
  """Prompt records as the RL trainer encodes them: {"prompt"} or, for an empty prompt with a
  `messages` field, {"messages"}."""
  n = len(prompts)
  msgs = fields.get("messages") if fields else None
  msgs = column(fields, "messages", n, who="log-prob reward") if msgs is not None else [None] * n
  out = []
  for p, m in zip(prompts, msgs):
    if not p and isinstance(m, (list, tuple)) and m:
      out.append({"messages": [dict(x) for x in m]})
    else:
      out.append({"prompt": p or ""})
  return out


def _with_prefix(record: dict, prefix: str) -> dict:
  """`prefix + x`: the criteria text before the prompt (inside the first user message of a
  conversation, so a chat template wraps both)."""
  if not prefix:
    return record
  if "messages" in record:
    msgs = [dict(m) for m in record["messages"]]
    for m in msgs:
      if m.get("role") == "user":
        m["content"] = prefix + str(m.get("content", ""))
        break
    else:
      msgs.insert(0, {"role": "user", "content": prefix})
    return {"messages": msgs}
  return {"prompt": prefix + record["prompt"]}


def _encode_prompt(record: dict, tokenizer, mode: str) -> list[int]:
  from alignjax.sampling.task import encode_prompt  # noqa: PLC0415
  return list(encode_prompt(record, tokenizer, mode))


def _truncated(fields, n: int) -> list[bool]:
  if not fields or "truncated" not in fields:
    return [False] * n
  return [bool(t) for t in column(fields, "truncated", n, who="log-prob reward")]


def _completion_tokens(text: str, tokenizer, truncated: bool) -> list[int]:
  """The RL trainer's completion row: the tokens, then eos unless the sample was truncated."""
  return list(tokenizer.encode(text)) + ([] if truncated else [tokenizer.eos_id])


def _rows(name, prompts, completions, fields, tokenizer, mode, prefix=""):
  """(indices of scorable rows, prompt tokens, completion tokens); a row whose text cannot be
  encoded or whose prompt has no tokens is left out (unscorable)."""
  n = len(prompts)
  trunc = _truncated(fields, n)
  idx, xs, ys = [], [], []
  for i, (rec, c) in enumerate(zip(_records(prompts, fields), completions)):
    try:
      x = _encode_prompt(_with_prefix(rec, prefix), tokenizer, mode)
      y = _completion_tokens(c, tokenizer, trunc[i])
    except Exception as e:  # pylint: disable=broad-except
      _warn(name, f"row {i} cannot be tokenised ({type(e).__name__}: {e}); unscorable")
      continue
    if not x:
      _warn(name, f"row {i} has an empty prompt (no tokens); unscorable")
      continue
    idx.append(i)
    xs.append(x)
    ys.append(y)
  return idx, xs, ys


def _warn(name: str, msg: str) -> None:
  if name not in _WARNED:
    _WARNED.add(name)
    logging.warning("reward %r: %s (logged once per reward).", name, msg)


def _scatter(n: int, idx: list[int], values) -> list[float | None]:
  out: list[float | None] = [None] * n
  for i, v in zip(idx, np.asarray(values, np.float64).reshape(-1).tolist()):
    out[i] = v
  return out


def _run(loaded: Loaded, fn, *args, **kw):
  import jax  # noqa: PLC0415
  from alignjax import parallel  # noqa: PLC0415
  with parallel.use_mesh(loaded.mesh, loaded.rules):
    return np.asarray(jax.device_get(fn(*args, **kw)))


def _texts(v) -> list[str]:
  return [v] if isinstance(v, str) else [str(t) for t in v]


# ---------------------------------------------------------------------------- rewards


@register("dpo_implicit", check=_check_dpo)
def dpo_implicit(prompts: Sequence[str], completions: Sequence[str], fields, *,
                 policy: str = "", ref: str = "", beta: float = 0.1,
                 chat_template: str = "auto") -> list[float | None]:
  """7.1 r = beta * [lp(y|x; policy) - lp(y|x; ref)] (summed over the completion's tokens,
  eos included). Offset by beta*log Z(x): compare within a prompt. Rows are tokenised with the
  policy's tokenizer (the reference must share it)."""
  from alignjax.rewards import logprob as lpr  # noqa: PLC0415
  pol, rf = load(policy), load(ref)
  idx, xs, ys = _rows("dpo_implicit", prompts, completions, fields, pol.tokenizer, chat_template)
  if not idx:
    return [None] * len(prompts)
  r = _run(pol, lpr.score_dpo_implicit, pol.model, rf.model, xs, ys,
           pad_id=pol.tokenizer.pad_id, beta=float(beta))
  return _scatter(len(prompts), idx, r)


@register("cdr", check=_check_cdr)
def cdr(prompts: Sequence[str], completions: Sequence[str], fields, *, strong: str = "",
        weak: str = "", prefix: str = "", chat_template: str = "auto") -> list[float | None]:
  """7.3 r = lp(y | c+x; strong) - lp(y | c+x; weak), c = `prefix` (criteria / exemplar text
  put before the prompt text, inside the user turn when templated)."""
  from alignjax.rewards import logprob as lpr  # noqa: PLC0415
  s, w = load(strong), load(weak)
  idx, xs, ys = _rows("cdr", prompts, completions, fields, s.tokenizer, chat_template,
                      prefix=prefix)
  if not idx:
    return [None] * len(prompts)
  r = _run(s, lpr.score_cdr, s.model, w.model, xs, ys, pad_id=s.tokenizer.pad_id)
  return _scatter(len(prompts), idx, r)


def followup_tokens(tokenizer, texts: Sequence[str], mode: str) -> list[list[int]]:
  """Token lists of follow-up user turns, appended after prompt + completion (+ eos).

  With a chat template (as `encode_prompt` decides for `mode`): the template's text between
  the end of an assistant turn (its eos) and the content of the next user turn, then the
  follow-up (the separator tokenises the same before every follow-up, as it does when it ends
  in a newline or a special token, so its log-probs cancel in the positive-minus-negative
  difference). Without: the follow-up text."""
  from alignjax.data.tokenizer import CharTokenizer  # noqa: PLC0415
  use = mode == "always" or (mode == "auto" and not isinstance(tokenizer, CharTokenizer)
                             and bool(getattr(tokenizer, "chat_template", None)))
  sep = ""
  if use:
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _MARK_A},
            {"role": "user", "content": _MARK}]
    full = tokenizer.apply_chat_template(msgs)
    if _MARK_A not in full or _MARK not in full:
      raise ValueError("the chat template does not render a user turn after an assistant "
                       "turn; set chat_template='never' and put the separator in the follow-ups")
    sep = full.split(_MARK)[0].split(_MARK_A)[-1]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and sep.startswith(eos):   # the row already ends with eos
      sep = sep[len(eos):]
  return [list(tokenizer.encode(sep + t)) for t in texts]


@register("flr", check=_check_flr)
def flr(prompts: Sequence[str], completions: Sequence[str], fields, *, model: str = "",
        positive: Sequence[str] = FLR_POSITIVE, negative: Sequence[str] = FLR_NEGATIVE,
        max_prompt_tokens: int = 0, chat_template: str = "auto") -> list[float | None]:
  """7.4 s = mean_{f in positive} lp(f|x,y) - mean_{f in negative} lp(f|x,y): each user
  follow-up f is appended after prompt + completion + eos (after the template's turn
  separator when templated) and its log-probs summed (no length normalisation).
  `max_prompt_tokens` > 0 left-truncates x (never f)."""
  from alignjax.rewards import logprob as lpr  # noqa: PLC0415
  m = load(model)
  tok = m.tokenizer
  idx, xs, ys = _rows("flr", prompts, completions, fields, tok, chat_template)
  if not idx:
    return [None] * len(prompts)
  if max_prompt_tokens:
    xs = [x[-int(max_prompt_tokens):] for x in xs]
  pos = followup_tokens(tok, _texts(positive), chat_template)
  neg = followup_tokens(tok, _texts(negative), chat_template)
  r = _run(m, lpr.score_flr, m.model, xs, ys, pos, neg, pad_id=tok.pad_id)
  return _scatter(len(prompts), idx, r)


def _first_ids(tokenizer, words: Sequence[str]) -> list[int]:
  ids = []
  for w in words:
    toks = tokenizer.encode(w)
    if not toks:
      raise ValueError(f"{w!r} encodes to no tokens")
    if toks[0] not in ids:
      ids.append(int(toks[0]))
  return ids


@register("genrm_yes", check=_check_genrm)
def genrm_yes(prompts: Sequence[str], completions: Sequence[str], fields, *, judge: str = "",
              template: str = GENRM_TEMPLATE, yes: Sequence[str] | str = "yes",
              no: Sequence[str] | str = "no", temperature: float = 1.0,
              chat_template: str = "auto") -> list[float | None]:
  """7.7 p(yes) = sigmoid(lse z[Y] - lse z[N]) of the judge's next token after the judge
  prompt `template.format(prompt=x, completion=y)` (templated as a user turn with the
  generation prompt when the judge has a chat template); Y / N = the first token of each
  `yes` / `no` word (they must differ)."""
  from alignjax.rewards import logprob as lpr  # noqa: PLC0415
  m = load(judge)
  tok = m.tokenizer
  yes_ids, no_ids = _first_ids(tok, _texts(yes)), _first_ids(tok, _texts(no))
  if set(yes_ids) & set(no_ids):
    raise ValueError(f"the first tokens of yes {yes!r} ({yes_ids}) and no {no!r} ({no_ids}) "
                     "overlap")
  n = len(prompts)
  idx, rows = [], []
  for i, (rec, c) in enumerate(zip(_records(prompts, fields), completions)):
    x = rec["prompt"] if "prompt" in rec else _conversation_text(rec["messages"])
    try:
      row = _encode_prompt({"prompt": template.format(prompt=x, completion=c)}, tok,
                           chat_template)
    except Exception as e:  # pylint: disable=broad-except
      _warn("genrm_yes", f"row {i} cannot be tokenised ({type(e).__name__}: {e}); unscorable")
      continue
    if row:
      idx.append(i)
      rows.append(row)
  if not idx:
    return [None] * n
  r = _run(m, lpr.score_genrm_yes, m.model, rows, yes_ids, no_ids, pad_id=tok.pad_id,
           temperature=float(temperature))
  return _scatter(n, idx, r)


def _conversation_text(messages) -> str:
  """A conversational prompt as plain text for the judge template ("role: content" lines)."""
  return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)
