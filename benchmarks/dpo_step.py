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

Timing: back-to-back steps in blocks, alternating sides: --rounds rounds of [alignjax block,
peer block] (the peer process stays alive, idle while alignjax runs, and vice versa; never
both at once). Each block is --warmup untimed steps (re-warming after the other side ran; the
very first alignjax one includes compilation) then --steps timed steps; a side's ms/step is
the median of its timed steps over all rounds. Blocks (not single alternating steps) because
a step that follows an idle pause runs measurably slower here, more so for alignjax; rounds so
that a drift in machine load hits both sides alike. Optimisation continues across blocks:
every step of a side is one more AdamW step on the same batch.
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


class AlignjaxDPO:
  """The `dpo` task's train step on a 1-device mesh; `step()` runs one and returns (seconds,
  loss, metrics)."""

  def __init__(self, args, cfg, batch, export_dir):
    config = dpo_task_config(args)
    self.mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    rules = parallel.DEFAULT_RULES
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    with parallel.use_mesh(self.mesh):
      model = parallel.create_sharded(lambda: init_model(cfg, 0), self.mesh)
      hf.save_hf_model(model, export_dir)  # the peer's initial weights (before donation)
      frozen = dpo.build_reference_state(config, cfg, model, self.mesh, rules)
      graphdef, params = nnx.split(model)
      self.state = loop.init_state(params, tx, self.mesh, rules, 0, frozen)
      self._step = jax.jit(loop.make_train_step(graphdef, dpo.make_loss_fn(config), tx,
                                                lambda s: args.lr), donate_argnums=0)
      self.batch = parallel.shard_batch(batch, self.mesh)

  def step(self):
    with parallel.use_mesh(self.mesh):
      t = time.perf_counter()
      self.state, m = self._step(self.state, self.batch)
      loss = float(m["loss"])  # blocks until the step is done
      return time.perf_counter() - t, loss, m


class Peer:
  """benchmarks/peers/trl_dpo_step.py as a subprocess that runs one step per request."""

  def __init__(self, args, spec, log_path):
    self.log_path = log_path
    self.log = open(log_path, "w")  # a file, not a pipe: stderr can never fill up and block
    self.proc = subprocess.Popen([args.peer_python, PEER, json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    while line and not line.startswith("{"):  # skip anything a library printed
      line = self.proc.stdout.readline()
    if not line:
      self.proc.kill()
      self.proc.wait()
      with open(self.log_path) as f:
        sys.exit(f"peer failed:\n{f.read()[-4000:]}")
    return json.loads(line)

  def request(self, what: str) -> dict:
    self.proc.stdin.write(what + "\n")
    self.proc.stdin.flush()
    return self._read()

  def step(self):
    r = self.request("step")
    return r["seconds"], r["loss"]

  def close(self) -> dict:
    out = self.request("done")
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()
    return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="100m")
  p.add_argument("--batch", type=int, default=2, help="pairs per step (B)")
  p.add_argument("--length", type=int, default=256, help="tokens per row (L)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per block")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps at the start of each block (the first compiles)")
  p.add_argument("--rounds", type=int, default=2,
                 help="rounds of [alignjax block, peer block]; ms/step = median of all timed")
  p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (TRL's default)")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--peer-python", default="",
                 help="python with torch + transformers (+ trl) for the side-by-side peer")
  args = p.parse_args()
  if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
    sys.exit("--warmup, --steps and --rounds must be >= 1 (the first step compiles).")
  cfg = get_preset(args.preset)
  batch = batch_for(args, cfg.vocab_size)
  tokens = args.batch * 2 * args.length
  print(f"model {args.preset}: {cfg.num_params() / 1e6:.1f}M parameters, float32; {args.batch} "
        f"pairs x 2 rows x {args.length} tokens (prompt {args.length // 4}, chosen response "
        f"{int(batch['length'][0, 0])}, rejected {int(batch['length'][0, 1])} + "
        f"{args.length // 8} padding); sigmoid DPO beta {args.beta}, live reference = initial "
        f"policy, AdamW lr {args.lr:g} wd {args.weight_decay:g}, no clipping; alignjax on "
        f"{jax.devices()[0].platform} x1 device")
  print(f"tokens/s = {args.batch} x 2 x {args.length} = {tokens} tokens per step / step time "
        f"(padding included, reference forward not counted again); {args.rounds} round(s) of "
        f"{args.warmup} warm-up + {args.steps} timed steps" +
        (" per side, alignjax block then peer block" if args.peer_python else "") +
        "; ms/step = median of the timed steps")
  tmp = tempfile.mkdtemp(prefix="dpo_step_")
  peer = None
  try:
    export = os.path.join(tmp, "model")
    np.savez(os.path.join(tmp, "batch.npz"), **batch)
    ours = AlignjaxDPO(args, cfg, batch, export)
    if args.peer_python:
      peer = Peer(args, {"model_dir": export, "batch": os.path.join(tmp, "batch.npz"),
                         "lr": args.lr, "weight_decay": args.weight_decay, "beta": args.beta},
                  os.path.join(tmp, "peer.log"))
    times, losses, ptimes, plosses, first = [], [], [], [], None
    for _ in range(args.rounds):
      for i in range(args.warmup + args.steps):
        t, loss, m = ours.step()
        losses.append(loss)
        if first is None:
          first = {k: float(m[k]) for k in ("logp_chosen", "logp_rejected")}
          compile_s = t
        if i >= args.warmup:
          times.append(t)
      for i in range(args.warmup + args.steps) if peer else ():
        t, loss = peer.step()
        plosses.append(loss)
        if len(plosses) == 1:
          peer_first_s = t
        if i >= args.warmup:
          ptimes.append(t)
    pinfo = peer.close() if peer else None
  finally:
    if peer and peer.proc.poll() is None:
      peer.proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)

  sec = float(np.median(times))
  tps = tokens / sec
  print(f"alignjax          : {sec * 1e3:9.1f} ms/step  {tps:8.1f} tokens/s  "
        f"(first step incl. compile {compile_s:.1f} s)")
  if peer:
    psec = float(np.median(ptimes))
    ptps = tokens / psec
    print(f"HF + TRL (torch)  : {psec * 1e3:9.1f} ms/step  {ptps:8.1f} tokens/s  "
          f"(first step {peer_first_s:.1f} s; torch {pinfo['torch']}, transformers "
          f"{pinfo['transformers']}, trl {pinfo['trl']}, {pinfo['threads']} threads)")
    print(f"peer loss: {pinfo['loss_impl']}")
    print("timed steps (ms): alignjax " + " ".join(f"{x * 1e3:.0f}" for x in times) +
          "\n                  peer     " + " ".join(f"{x * 1e3:.0f}" for x in ptimes))

  # Agreement: the same weights and batch give the same summed log-probs and, with policy ==
  # reference, loss log 2 at step 1; after one AdamW step the losses agree loosely (Adam's
  # first update ~ lr * sign(g) amplifies float noise in near-zero gradient entries).
  print(f"step-1 loss (log 2 = {math.log(2):.6f}): alignjax {losses[0]:.6f}" +
        (f"  peer {plosses[0]:.6f}" if peer else ""))
  print(f"step-1 mean summed log-probs chosen / rejected: alignjax {first['logp_chosen']:.3f} / "
        f"{first['logp_rejected']:.3f}" + (f"  peer {pinfo['logp_chosen']:.3f} / "
                                           f"{pinfo['logp_rejected']:.3f}" if peer else ""))
  print(f"loss after 1 step: alignjax {losses[1]:.6f}" +
        (f"  peer {plosses[1]:.6f}  (|diff| {abs(losses[1] - plosses[1]):.2e})" if peer else ""))
  print("losses per step: alignjax " + " ".join(f"{x:.5f}" for x in losses) +
        ("\n                 peer     " + " ".join(f"{x:.5f}" for x in plosses) if peer else ""))
  if peer:
    ok0 = abs(losses[0] - math.log(2)) < 1e-4 and abs(plosses[0] - math.log(2)) < 1e-4
    ok1 = abs(losses[1] - plosses[1]) < 1e-2 + 1e-2 * abs(plosses[1])
    print(f"agreement: step-1 loss = log 2 on both: {'yes' if ok0 else 'NO'}; loss after one "
          f"step within 1e-2 (+1% rel): {'yes' if ok1 else 'NO'}")
    speed = psec / sec
    print(f"ratio: alignjax is {speed:.2f}x faster" if speed >= 1 else
          f"ratio: alignjax is {speed:.2f}x faster (i.e. {1 / speed:.2f}x slower)")


if __name__ == "__main__":
  main()
