"""Task `generate`: prompts from JSONL -> completions JSONL, with the KV-cache sampler.

Input records (`generate.prompts_file`, JSONL): {"prompt": str} or {"messages": [{"role",
"content"}, ...]} (rendered with the tokenizer's chat template and its generation prompt),
optionally "id". A plain prompt goes through the chat template as one user message when
`generate.chat_template` is "always", or "auto" with a Hugging Face tokenizer that defines a
template; else it is encoded as is (with bos if the tokenizer adds one).

Output (`generate.output`, default `<workdir>/generations.jsonl`; written to a temporary
file and renamed when complete), one line per sample: {"id", "index" (the prompt's line
number - 1), "sample" (0..n-1), "prompt", "completion" (decoded, without the stop token),
"finish_reason" ("stop" | "length"), "num_tokens", "tokens", "logprobs" (sampling
distribution), "model_logprobs" (unmodified model)}.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging

from alignjax import parallel
from alignjax.data import sft as sft_lib
from alignjax.data.records import RecordError
from alignjax.data.tokenizer import CharTokenizer
from alignjax.sampling.sampler import Sampler, SamplingConfig
from alignjax.trainers import common

CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def generate_config() -> ml_collections.ConfigDict:
  """`config.generate`: input, output and the sampling controls."""
  return ml_collections.ConfigDict(dict(
      prompts_file="",          # JSONL of {"prompt"} or {"messages"} records
      output="",                # default: <workdir>/generations.jsonl
      max_new_tokens=64,
      temperature=1.0,          # 0: greedy
      top_k=0,
      top_p=1.0,
      min_p=0.0,
      n=1,                      # samples per prompt
      seed=0,
      stop_ids=(),              # besides the tokenizer's eos
      batch_size=32,            # prompts per sampler call
      chat_template="auto",     # auto | always | never (see the module docstring)
  ))


def _read_prompts(path: str) -> list[dict]:
  if not path:
    raise ValueError("config.generate.prompts_file is empty; name a JSONL file of "
                     '{"prompt": ...} or {"messages": [...]} records.')
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.generate.prompts_file={path!r} does not exist.")
  records = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {i}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(where, None, f"invalid JSON ({e})", "fix the line") from None
      if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str)
                                              or isinstance(record.get("messages"), list)):
        raise RecordError(where, "prompt", "expected an object with a string 'prompt' or a "
                          "'messages' list", "fix the record")
      records.append(dict(record, _where=where, _index=i - 1))
  if not records:
    raise ValueError(f"config.generate.prompts_file={path!r} has no records.")
  return records


def encode_prompt(record: dict, tokenizer, mode: str) -> list[int]:
  """Token ids of one prompt record (see the module docstring)."""
  where = record.get("_where", "<record>")
  messages = record.get("messages")
  use_template = messages is not None or mode == "always" or (
      mode == "auto" and not isinstance(tokenizer, CharTokenizer)
      and bool(getattr(tokenizer, "chat_template", None)))
  if use_template:
    messages = messages if messages is not None else [{"role": "user",
                                                       "content": record["prompt"]}]
    text = sft_lib.render_chat(tokenizer, messages, where, add_generation_prompt=True)
    return tokenizer.encode(text)
  return tokenizer.encode(record["prompt"], add_bos=tokenizer.add_bos_token)


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "generate"`."""
  gc = config.generate
  if gc.chat_template not in CHAT_TEMPLATE_MODES:
    raise ValueError(f"config.generate.chat_template={gc.chat_template!r}; expected one of "
                     f"{CHAT_TEMPLATE_MODES}.")
  records = _read_prompts(gc.prompts_file)
  tokenizer = common.build_tokenizer(config)
  cfg = common.model_config(config, tokenizer.vocab_size)
  prompts = [encode_prompt(r, tokenizer, gc.chat_template) for r in records]
  stop = tuple(int(x) for x in gc.stop_ids) + (
      (tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
  scfg = SamplingConfig(max_new_tokens=gc.max_new_tokens, temperature=gc.temperature,
                        top_k=gc.top_k, top_p=gc.top_p, min_p=gc.min_p, n=gc.n, seed=gc.seed,
                        stop_ids=stop)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = parallel.rules_from_config(config.sharding_rules.to_dict())
  out_path = gc.output or os.path.join(workdir, "generations.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  summary = {"num_prompts": len(records), "num_samples": 0, "num_truncated": 0,
             "output": out_path}
  with parallel.use_mesh(mesh, rules):
    model = common.build_model(config, cfg, mesh, rules)
    sampler = Sampler(model, pad_id=tokenizer.pad_id, mesh=mesh, rules=rules)
    lines = []
    for start in range(0, len(records), gc.batch_size):
      chunk = records[start:start + gc.batch_size]
      out = sampler.generate(prompts[start:start + gc.batch_size],
                             SamplingConfig(**{**scfg.__dict__, "seed": gc.seed + start}))
      for r in range(len(out.tokens)):
        rec = chunk[out.prompt_index[r]]
        n = int(out.lengths[r])
        toks = out.tokens[r, :n].tolist()
        stopped = not out.truncated[r]
        text_ids = toks[:-1] if stopped else toks
        lines.append(json.dumps({
            "id": rec.get("id"), "index": rec["_index"], "sample": r % gc.n,
            "prompt": rec.get("prompt", rec.get("messages")),
            "completion": tokenizer.decode(text_ids),
            "finish_reason": "stop" if stopped else "length", "num_tokens": n,
            "tokens": toks, "logprobs": [round(float(x), 6) for x in out.logprobs[r, :n]],
            "model_logprobs": [round(float(x), 6) for x in out.model_logprobs[r, :n]]}))
        summary["num_truncated"] += int(not stopped)
      summary["num_samples"] = len(lines)
  summary["num_compiles"] = sampler.num_compiles
  if jax.process_index() == 0:
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(tmp, out_path)
    print(f"generated {summary['num_samples']} completions of {len(records)} prompts "
          f"({summary['num_truncated']} hit max_new_tokens; {sampler.num_compiles} compiled "
          f"program(s)): {out_path}", flush=True)
  logging.info("generate: %s", summary)
  return summary
