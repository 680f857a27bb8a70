"""Peer measurement for benchmarks/sampler.py: greedy `generate` in Hugging Face transformers
(PyTorch, CPU, float32, sdpa attention, KV cache) on a checkpoint exported by alignjax.

argv: one JSON object {model_dir, prompts (list of token-id lists; a batch of b uses the
first b), batches, lengths (generation lengths, e.g. [short, long]), repeats, budget
(seconds: stop repeating a measurement once the next call would pass it), pad_id, threads}.
Prints one JSON line: {"results": {str(batch): {"seconds": {str(T): median seconds},
"warmup": seconds of the untimed warm-up call, "tokens": the longest length's generated
tokens [b, T]}}, "torch", "transformers", "threads"}.

Each call: `model.generate(input_ids [b, P] left-padded with pad_id, attention_mask,
GenerationConfig(do_sample=False, max_new_tokens=T, min_new_tokens=T, eos_token_id=None,
pad_token_id=pad_id, use_cache=True))` under `torch.inference_mode()`: one prefill forward
over the prompts, then T - 1 single-token decode forwards on transformers' DynamicCache
(it grows with the sequence). With no eos every row generates exactly T tokens (checked).
"""

import json
import statistics
import sys
import time

import torch
import transformers


def left_pad(prompts, pad_id):
  p = max(len(x) for x in prompts)
  ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), p), dtype=torch.long)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
    mask[i, p - len(x):] = 1
  return ids, mask


def main():
  spec = json.loads(sys.argv[1])
  torch.set_num_threads(int(spec["threads"]))
  torch.manual_seed(0)
  transformers.logging.set_verbosity_error()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
  pad_id = int(spec["pad_id"])
  lengths = [int(t) for t in spec["lengths"]]
  budget = float(spec["budget"])
  results = {}
  for b in spec["batches"]:
    ids, mask = left_pad(spec["prompts"][:b], pad_id)

    def run(t):
      gen = transformers.GenerationConfig(
          do_sample=False, max_new_tokens=t, min_new_tokens=t, eos_token_id=None,
          bos_token_id=None, pad_token_id=pad_id, use_cache=True)
      start = time.perf_counter()
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
      seconds = time.perf_counter() - start
      new = out[:, ids.shape[1]:]
      if new.shape != (b, t):
        raise SystemExit(f"generate returned {tuple(new.shape)} new tokens, expected {(b, t)}")
      return seconds, new

    warm, _ = run(lengths[0])  # untimed warm-up (first-call allocations, kernel selection)
    seconds, tokens = {}, None
    for t in lengths:
      times, used = [], 0.0
      while len(times) < spec["repeats"]:
        s, new = run(t)
        times.append(s)
        used += s
        if used + s > budget:
          break
      seconds[str(t)] = statistics.median(times)
      if t == max(lengths):
        tokens = new.tolist()
    results[str(b)] = {"seconds": seconds, "tokens": tokens, "warmup": warm}
  print(json.dumps({"results": results, "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
