"""SFT train-step throughput: tokens/s and MFU of alignjax, and optionally of Hugging Face
transformers (PyTorch) on the same model, batch and optimizer, measured in one run.

  python benchmarks/train_step.py                      # alignjax only, preset 100m
  python benchmarks/train_step.py --peer-python /path/to/venv-with-torch/bin/python

MFU = analytic training FLOPs per token (6N + attention, see ModelConfig.flops_per_token)
x tokens/s / measured matmul peak of this machine (alignjax.trainers.metrics).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignjax import parallel  # noqa: E402
from alignjax.models import hf  # noqa: E402
from alignjax.models.presets import get_preset  # noqa: E402
from alignjax.models.transformer import init_model  # noqa: E402
from alignjax.trainers import loop, metrics, sft  # noqa: E402


def batch_for(args):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len), dtype=np.int32)
  return {"tokens": tokens, "loss_mask": np.ones_like(tokens, np.float32),
          "segment_ids": np.ones_like(tokens), "positions":
          np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), tokens.shape).copy()}


def bench_alignjax(args, cfg):
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  tx = optax.adamw(1e-4)
  with parallel.use_mesh(mesh):
    model = parallel.create_sharded(lambda: init_model(cfg, 0), mesh)
    graphdef, params = nnx.split(model)
    state = loop.init_state(params, tx, mesh, parallel.DEFAULT_RULES, 0)
    step = jax.jit(loop.make_train_step(graphdef, sft.make_loss_fn(args.chunk), tx,
                                        lambda s: 1e-4), donate_argnums=0)
    batch = parallel.shard_batch(batch_for(args), mesh)
    for _ in range(args.warmup):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  return float(np.median(times)), float(m["loss"])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="100m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--chunk", type=int, default=256, help="log-prob chunk length")
  p.add_argument("--peer-python", default="", help="python with torch + transformers")
  args = p.parse_args()
  cfg = get_preset(args.preset)
  args.vocab = cfg.vocab_size
  tokens = args.batch * args.seq_len
  flops = cfg.flops_per_token(args.seq_len)
  peak = metrics.measure_peak_flops("float32") * jax.device_count()
  print(f"model {args.preset}: {cfg.num_params() / 1e6:.1f}M parameters; batch "
        f"{args.batch}x{args.seq_len}; {jax.device_count()} {jax.devices()[0].platform} device(s);"
        f" measured peak {peak / 1e9:.1f} GFLOP/s")
  t, loss = bench_alignjax(args, cfg)
  tps = tokens / t
  print(f"alignjax      : {t * 1e3:8.1f} ms/step  {tps:9.1f} tokens/s  MFU {flops * tps / peak:6.1%}"
        f"  (loss {loss:.3f})")
  if args.peer_python:
    peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "hf_train_step.py")
    cfg_json = json.dumps(hf.config_to_hf(cfg))
    out = subprocess.run([args.peer_python, peer, cfg_json, str(args.batch), str(args.seq_len),
                          str(args.steps), str(args.warmup)], capture_output=True, text=True)
    if out.returncode:
      sys.exit(f"peer failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ptps = tokens / res["seconds"]
    print(f"HF transformers: {res['seconds'] * 1e3:8.1f} ms/step  {ptps:9.1f} tokens/s  MFU "
          f"{flops * ptps / peak:6.1%}  (torch {res['torch']}, transformers "
          f"{res['transformers']}, {res['threads']} threads)")
    print(f"ratio alignjax / HF tokens/s: {tps / ptps:.2f}x")


if __name__ == "__main__":
  main()
