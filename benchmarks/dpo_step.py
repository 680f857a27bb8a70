"""DPO train-step time: alignjax vs Hugging Face transformers + TRL (PyTorch), one run.

  python benchmarks/dpo_step.py                                   # alignjax only, 100m
  python benchmarks/dpo_step.py --peer-python /path/to/venv-with-torch-transformers-trl/bin/python

One step = policy forward + backward and live-reference forward on B pairs (chosen and
rejected rows of L tokens each), sigmoid DPO loss (beta .1), AdamW update. The reference is
a frozen copy of the initial policy, so the first-step loss is log 2 = 0.6931 on both sides.

alignjax: the `dpo` task's own loss (`alignjax.trainers.dpo.make_loss_fn`, loss
`dpo_sigmoid`, reference "live" in `TrainState.frozen`) in `loop.make_train_step`, jit-compiled
with the state donated, on a 1-device CPU mesh, float32, `optax.adamw` (no clipping).

Peer (benchmarks/peers/trl_dpo_step.py, run in --peer-python): the same architecture and the
same initial weights in transformers (alignjax's initial parameters exported with
`alignjax.models.hf.save_hf_model`), float32, sdpa attention; policy and reference patched
with TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, as DPOTrainer does) and the
loss computed by TRL's own `DPOTrainer._compute_loss` (called unbound with a stand-in `self`,
as third_party/trl_fixtures/generate.py does): policy forward and no-grad reference forward on
[chosen; rejected] concatenated, summed completion log-probs, -logsigmoid(beta * margin), and
TRL's per-step metrics (which synchronise with `.item()`). Then `loss.backward()` and
`torch.optim.AdamW.step()` (no clipping). If TRL cannot be called that way the peer falls
back to plain transformers logits + log_softmax and the sigmoid DPO formula in torch; the
output says which ran.

The same fixed synthetic batch on both sides: B pairs x L tokens, one prompt of `L //
4` tokens shared by chosen and rejected, the chosen response filling the row, the rejected
response `L // 8` tokens shorter (right-padded). Convention: tokens/s = B x 2 x L / step
time (padded positions included; the reference forward is not counted again).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignjax import configlib, parallel  # noqa: E402
from alignjax.data.preference import default_preference_data_config  # noqa: E402
from alignjax.models import hf  # noqa: E402
from alignjax.models.presets import get_preset  # noqa: E402
from alignjax.models.transformer import init_model  # noqa: E402
from alignjax.trainers import dpo, loop  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "trl_dpo_step.py")


def batch_for(args, vocab: int) -> dict:
  """A preference batch in the format of alignjax/data/preference.py: [B, 2, L] rows."""
  b, l = args.batch, args.length
  prompt, short = l // 4, l // 8
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (b, 2, l), dtype=np.int32)
  tokens[:, 1, :prompt] = tokens[:, 0, :prompt]          # one prompt per pair
  real = np.ones((b, 2, l), np.int32)
  real[:, 1, l - short:] = 0                             # rejected: shorter, right-padded
  tokens = np.where(real > 0, tokens, 0).astype(np.int32)
  response = real.astype(np.float32)
  response[:, :, :prompt] = 0.0
  positions = np.where(real > 0, np.arange(l, dtype=np.int32), 0).astype(np.int32)
  return {"tokens": tokens, "segment_ids": real, "positions": positions,
          "response_mask": response, "length": response.sum(-1).astype(np.int32),
          "label": np.ones((b,), np.float32), "example_mask": np.ones((b,), np.float32)}


def dpo_task_config(args):
  c = configlib.base_config("dpo")
  c.dpo = dpo.dpo_config("dpo_sigmoid")
  c.dpo.beta = args.beta
  c.dpo.reference = "live"
  c.data = default_preference_data_config()
  c.data.seq_len = args.length
  c.data.batch_size = args.batch
  c.model.preset = args.preset
  dpo.prepare_data_config(c)
  dpo.check_config(c)
  return c


def bench_alignjax(args, cfg, batch, export_dir):
  config = dpo_task_config(args)
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
  rules = parallel.DEFAULT_RULES
  tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
  with parallel.use_mesh(mesh):
    model = parallel.create_sharded(lambda: init_model(cfg, 0), mesh)
    hf.save_hf_model(model, export_dir)  # the peer's initial weights (before donation)
    frozen = dpo.build_reference_state(config, cfg, model, mesh, rules)
    graphdef, params = nnx.split(model)
    state = loop.init_state(params, tx, mesh, rules, 0, frozen)
    step = jax.jit(loop.make_train_step(graphdef, dpo.make_loss_fn(config), tx,
                                        lambda s: args.lr), donate_argnums=0)
    dev_batch = parallel.shard_batch(batch, mesh)
    losses, first, times = [], None, []
    for _ in range(args.warmup + args.steps):
      t = time.perf_counter()
      state, m = step(state, dev_batch)
      loss = float(m["loss"])  # blocks
      times.append(time.perf_counter() - t)
      losses.append(loss)
      if first is None:
        first = {k: float(m[k]) for k in ("logp_chosen", "logp_rejected")}
  del state
  return {"seconds": float(np.median(times[args.warmup:])), "first": times[0],
          "losses": losses, "logp_chosen": first["logp_chosen"],
          "logp_rejected": first["logp_rejected"]}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="100m")
  p.add_argument("--batch", type=int, default=2, help="pairs per step (B)")
  p.add_argument("--length", type=int, default=256, help="tokens per row (L)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps first (incl. compile)")
  p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (TRL's default)")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--peer-python", default="",
                 help="python with torch + transformers (+ trl) for the side-by-side peer")
  args = p.parse_args()
  if args.warmup < 1 or args.steps < 1:
    sys.exit("--warmup and --steps must be >= 1 (the first step compiles).")
  cfg = get_preset(args.preset)
  batch = batch_for(args, cfg.vocab_size)
  tokens = args.batch * 2 * args.length
  print(f"model {args.preset}: {cfg.num_params() / 1e6:.1f}M parameters, float32; {args.batch} "
        f"pairs x 2 rows x {args.length} tokens (prompt {args.length // 4}, chosen response "
        f"{int(batch['length'][0, 0])}, rejected {int(batch['length'][0, 1])} + "
        f"{args.length // 8} padding); sigmoid DPO beta {args.beta}, live reference = initial "
        f"policy, AdamW lr {args.lr:g} wd {args.weight_decay:g}, no clipping; "
        f"{jax.devices()[0].platform} x1 device; median of {args.steps} steps after "
        f"{args.warmup} warm-up")
  print(f"tokens/s = {args.batch} x 2 x {args.length} = {tokens} tokens per step / step time "
        "(padding included, reference forward not counted again)")
  tmp = tempfile.mkdtemp(prefix="dpo_step_")
  try:
    export = os.path.join(tmp, "model")
    np.savez(os.path.join(tmp, "batch.npz"), **batch)
    ours = bench_alignjax(args, cfg, batch, export)
    tps = tokens / ours["seconds"]
    print(f"alignjax          : {ours['seconds'] * 1e3:9.1f} ms/step  {tps:8.1f} tokens/s  "
          f"(first step incl. compile {ours['first']:.1f} s)")
    peer = None
    if args.peer_python:
      spec = {"model_dir": export, "batch": os.path.join(tmp, "batch.npz"), "steps": args.steps,
              "warmup": args.warmup, "lr": args.lr, "weight_decay": args.weight_decay,
              "beta": args.beta}
      out = subprocess.run([args.peer_python, PEER, json.dumps(spec)], capture_output=True,
                           text=True)
      if out.returncode:
        sys.exit(f"peer failed:\n{out.stderr[-4000:]}")
      peer = json.loads(out.stdout.strip().splitlines()[-1])
      ptps = tokens / peer["seconds"]
      print(f"HF + TRL (torch)  : {peer['seconds'] * 1e3:9.1f} ms/step  {ptps:8.1f} tokens/s  "
            f"(first step {peer['first']:.1f} s; torch {peer['torch']}, transformers "
            f"{peer['transformers']}, trl {peer['trl']}, {peer['threads']} threads)")
      print(f"peer loss: {peer['loss_impl']}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  # Agreement: the same weights and batch give the same summed log-probs and, with policy ==
  # reference, loss log 2 at step 1; after one AdamW step the losses agree loosely (Adam's
  # first update ~ lr * sign(g) amplifies float noise in near-zero gradient entries).
  print(f"step-1 loss (log 2 = {math.log(2):.6f}): alignjax {ours['losses'][0]:.6f}" +
        (f"  peer {peer['losses'][0]:.6f}" if peer else ""))
  print(f"step-1 mean summed log-probs chosen / rejected: alignjax {ours['logp_chosen']:.3f} / "
        f"{ours['logp_rejected']:.3f}" + (f"  peer {peer['logp_chosen']:.3f} / "
                                          f"{peer['logp_rejected']:.3f}" if peer else ""))
  if len(ours["losses"]) > 1:
    print("loss after 1 step: alignjax " + f"{ours['losses'][1]:.6f}" +
          (f"  peer {peer['losses'][1]:.6f}  (|diff| "
           f"{abs(ours['losses'][1] - peer['losses'][1]):.2e})" if peer else ""))
    print("losses per step: alignjax " + " ".join(f"{x:.5f}" for x in ours["losses"]) +
          ("\n                 peer     " + " ".join(f"{x:.5f}" for x in peer["losses"])
           if peer else ""))
  if peer:
    ok0 = abs(ours["losses"][0] - math.log(2)) < 1e-4 and abs(peer["losses"][0] - math.log(2)) < 1e-4
    ok1 = abs(ours["losses"][1] - peer["losses"][1]) < 1e-2 + 1e-2 * abs(peer["losses"][1])
    print(f"agreement: step-1 loss = log 2 on both: {'yes' if ok0 else 'NO'}; loss after one "
          f"step within 1e-2 (+1% rel): {'yes' if ok1 else 'NO'}")
    speed = peer["seconds"] / ours["seconds"]
    print(f"ratio: alignjax is {speed:.2f}x faster" if speed >= 1 else
          f"ratio: alignjax is {speed:.2f}x faster (i.e. {1 / speed:.2f}x slower)")


if __name__ == "__main__":
  main()
