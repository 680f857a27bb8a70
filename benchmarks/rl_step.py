"""Where an RL step's time goes: generation, scoring, old/reference log-probs (and values),
advantages, and the update, with tokens/s for each, measured in one run on this machine.

  python benchmarks/rl_step.py                                   # tiny preset, GRPO
  python benchmarks/rl_step.py --preset 100m --prompts 4 --group 4 --max-new-tokens 32
  python benchmarks/rl_step.py --algorithm ppo --kl 0.04

The model is randomly initialised (seed 0) unless --checkpoint names an SFT run; the task is
the built-in arithmetic one (math_reward) with --max-new-tokens per completion and no early
stop forced, so random weights generate about max_new_tokens tokens. The first --warmup
steps (compilation) are dropped; the table gives the mean over the remaining --steps.

Columns: seconds per step of each phase and its share; tokens/s = generated tokens / generation
time, completion tokens / log-prob time (one forward each for old and reference log-probs),
completion tokens / update time (forward + backward + optimizer, all epochs).
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignjax import configlib  # noqa: E402
from alignjax import parallel  # noqa: E402
from alignjax.trainers import rl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--algorithm", default="grpo")
  p.add_argument("--checkpoint", default="")
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--kl", type=float, default=0.04, help="rl.kl_coef (needs a reference forward)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  a = p.parse_args()
  c = configlib.load_config_file(
      os.path.join(HERE, "..", "configs", "grpo.py"),
      f"algorithm={a.algorithm},preset={a.preset},prompts={a.prompts},group={a.group},"
      f"max_new_tokens={a.max_new_tokens},kl={a.kl},eval_examples=0,"
      f"steps={a.steps + a.warmup},checkpoint={a.checkpoint}")
  c.train.progress_bar = False
  trainer = rl.RLTrainer(c, tempfile.mkdtemp(prefix="rl_bench_"))
  rows = []
  with parallel.use_mesh(trainer.mesh, trainer.rules):
    state = trainer.build()
    for step in range(a.steps + a.warmup):
      arrays, host, m = trainer.rollout(state, step)
      arrays = trainer.prepare(state, arrays, host, m, step)
      state = trainer.update(state, arrays, step, m)
      m["gen_tokens"] = float(host["lengths"].sum())
      m["completion_tokens"] = float(arrays["mask"].sum())
      if step >= a.warmup:
        rows.append(m)
  mean = lambda k: float(np.mean([r[k] for r in rows]))
  phases = [("generation", "time_generate", "gen_tokens"),
            ("scoring", "time_score", None),
            ("old/ref log-probs" + (" + values" if trainer.r["critic"] else ""),
             "time_logprobs", "completion_tokens"),
            ("advantages", "time_advantages", None),
            ("update", "time_update", "completion_tokens")]
  total = sum(mean(k) for _, k, _ in phases)
  n = trainer.cfg.num_params()
  print(f"RL step split: {a.algorithm}, preset {a.preset} ({n / 1e6:.2f}M parameters), "
        f"{a.prompts} prompts x {a.group} samples, <= {a.max_new_tokens} new tokens, "
        f"kl_coef {a.kl}; mean of {a.steps} steps after {a.warmup} warm-up")
  print("| phase | s/step | share | tokens/s |\n| --- | --- | --- | --- |")
  for name, k, tok in phases:
    tps = f"{mean(tok) / max(mean(k), 1e-9):.0f}" if tok else "-"
    print(f"| {name} | {mean(k):.3f} | {mean(k) / total:.0%} | {tps} |")
  print(f"| total | {total:.3f} | 100% | {mean('completion_tokens') / total:.0f} |")


if __name__ == "__main__":
  main()
