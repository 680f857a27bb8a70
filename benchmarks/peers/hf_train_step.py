"""Peer measurement for benchmarks/train_step.py: one HF transformers (PyTorch, CPU) train
step (forward, masked NLL, backward, AdamW) on a randomly initialised model.

argv: hf_config_json batch seq_len steps warmup. Prints one JSON line.
"""

import json
import sys
import time

import torch
import transformers


def main():
  cfg_json, batch, seq_len, steps, warmup = sys.argv[1:6]
  batch, seq_len, steps, warmup = int(batch), int(seq_len), int(steps), int(warmup)
  cfg = json.loads(cfg_json)
  cfg.pop("dtype", None)
  config = transformers.AutoConfig.for_model(**cfg)
  config._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.randint(0, cfg["vocab_size"], (batch, seq_len))

  def step():
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()

  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  times.sort()
  print(json.dumps({"seconds": times[len(times) // 2], "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
