"""Two processes on localhost (gloo CPU collectives, 4 devices each) train like one process
with 8 devices, each reading only its own data shard, and resume from a shared checkpoint."""

import collections
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.multihost_config import config, dpo_config, record_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(workdir, steps, tmp, task="sft"):
  port = _free_port()
  outs = [os.path.join(tmp, f"{task}_p{i}_{steps}.npz") for i in range(2)]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), str(i), "2",
       str(port), str(workdir), str(steps), outs[i], task],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return [np.load(o) for o in outs]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_match_one_process_and_resume(tmp_path):
  # Reference: this process, 8 devices, 8 steps.
  from alignjax.trainers import sft
  with record_batches() as single:
    sft.run(config(8), str(tmp_path / "single"))

  # Two processes: 6 steps (checkpoints at 3 and 6), then a second launch resumes to 8.
  multi = tmp_path / "multi"
  first = _run_two(multi, 6, tmp_path)
  assert all(int(r["devices"]) == 8 and int(r["local"]) == 4 for r in first)
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]
  data_files = sorted(f for f in os.listdir(multi / "checkpoints" / "6" / "data")
                      if f.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  second = _run_two(multi, 8, tmp_path)

  # Each process fed 8 of the 16 rows of each global batch; the two halves are disjoint and
  # together are exactly the rows the single process used at that step.
  host_batches = [np.concatenate([first[i]["tokens"], second[i]["tokens"]]) for i in range(2)]
  assert host_batches[0].shape == (8, 8, 24)
  for step in range(8):
    rows0 = {tuple(r) for r in host_batches[0][step]}
    rows1 = {tuple(r) for r in host_batches[1][step]}
    assert not rows0 & rows1, f"step {step}: processes read the same records"
    want = collections.Counter(tuple(r) for r in single[step])
    assert collections.Counter(list(map(tuple, host_batches[0][step])) +
                               list(map(tuple, host_batches[1][step]))) == want

  rows = [json.loads(l) for l in open(multi / "metrics.jsonl")]
  accuracies = [r[k] for r in rows for k in ("initial_eval_accuracy", "eval_accuracy") if k in r]
  assert len(accuracies) == 3 and all(0 <= a <= 1 for a in accuracies)  # steps 0, 6 and 8
  assert all(r["mfu"] > 0 for r in rows if "mfu" in r)

  a, b = _losses(tmp_path / "single"), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)],
                             rtol=1e-5)


def test_dpo_two_processes_match_one_process_and_resume(tmp_path):
  """DPO with a moving reference (the loop's frozen state) across 2 processes: 3 steps, a
  checkpoint, a relaunch to 5 steps; the losses equal one process's 5 uninterrupted steps."""
  from alignjax.trainers import dpo
  dpo.run(dpo_config(5), str(tmp_path / "single"))
  multi = tmp_path / "multi"
  _run_two(multi, 3, tmp_path, "dpo")
  _run_two(multi, 5, tmp_path, "dpo")
  a, b = _losses(tmp_path / "single"), _losses(multi)
  assert sorted(b) == list(range(1, 6))
  np.testing.assert_allclose([b[s] for s in range(1, 6)], [a[s] for s in range(1, 6)],
                             rtol=1e-5)


def test_rl_two_processes_match_one_process_and_resume(tmp_path):
  """GRPO (rollouts from the sampler, old / reference log-probs, 4 optimizer steps per RL
  step): 2 processes x 4 devices, 2 steps then a relaunch to 3, equal 1 process x 8 devices."""
  from alignjax.trainers import rl
  from tests.multihost_config import rl_config
  rl.run(rl_config(3), str(tmp_path / "single"))
  multi = tmp_path / "multi"
  _run_two(multi, 2, tmp_path, task="rl")
  _run_two(multi, 3, tmp_path, task="rl")
  single, two = _losses(tmp_path / "single"), _losses(multi)
  assert sorted(two) == [1, 2, 3]
  for step in (1, 2, 3):
    np.testing.assert_allclose(two[step], single[step], rtol=1e-4, atol=1e-7)
