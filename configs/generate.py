"""Generation (task `generate`): prompts from JSONL -> completions JSONL, KV-cache sampler.

python -m alignjax.main --config=configs/generate.py:checkpoint=/tmp/alignjax_default/sft \
    --workdir=/tmp/alignjax_generate

Default: 8 held-out arithmetic prompts (configs/data/generate_prompts.jsonl) with the
built-in tiny model and the character tokenizer (`:checkpoint=` an alignjax run, e.g. the
default pipeline's SFT stage, which answers them; empty: a random initialisation), greedy.
`:hf_path=DIR` samples from a local Hugging Face checkpoint with its tokenizer (chat
template applied when it has one). Args: `prompts`, `max_new_tokens`, `temperature`, `top_k`,
`top_p`, `min_p`, `n`, `seed`, `preset`. Writes <workdir>/generations.jsonl.
See docs/sampling.md.
"""

import os

from alignjax import configlib
from alignjax.sampling.task import generate_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  args = configlib.parse_arg(
      arg, prompts=os.path.join(_HERE, "data", "generate_prompts.jsonl"), checkpoint="",
      hf_path="", preset="tiny", max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0,
      min_p=0.0, n=1, seed=0)
  c = configlib.base_config("generate")
  c.model.preset = args.preset
  c.model.checkpoint = args.checkpoint
  c.model.hf_path = args.hf_path
  c.tokenizer.kind = "hf" if args.hf_path else "char"
  c.generate = generate_config()
  c.generate.prompts_file = args.prompts
  for key in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "n", "seed"):
    c.generate[key] = getattr(args, key)
  return c
