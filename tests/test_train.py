"""The shared train loop: resumption, preemption, accumulation, metrics output, main binary."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from alignjax import main as main_lib
from alignjax.trainers import loop, sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
  from configs import default  # noqa: PLC0415 (configs/ is a plain directory on sys.path)
  c = default.get_config("only=sft,steps=12,batch=16")
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_steps = 1
  c.train.peak_flops_per_device = 1e9  # skip the start-up matmul measurement
  c.train.progress_bar = False
  c.checkpoint.every = 4
  c.sft.eval_examples = 4
  c.optimizer.warmup_steps = 2
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  monkeypatch.syspath_prepend(REPO)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_sigterm_equals_uninterrupted(tmp_path):
  config = tiny_config()
  full = tmp_path / "full"
  sft.run(config, str(full))

  # Interrupted run: SIGTERM arrives while the 6th batch is fetched; the loop finishes that
  # step, checkpoints and returns. A second call resumes from the checkpoint.
  split = tmp_path / "split"
  task = sft.build_task(config)
  make_iter = task.train_iter
  calls = {"n": 0}

  def killing_iter():
    it = make_iter()

    class Wrapped:
      def __next__(self):
        calls["n"] += 1
        if calls["n"] == 6:
          os.kill(os.getpid(), signal.SIGTERM)
        return next(it)

      # grain's Orbax handler saves a non-DatasetIterator's state as bytes.
      def get_state(self):
        return json.dumps(it.get_state()).encode()

      def set_state(self, state):
        it.set_state(json.loads(state))
    return Wrapped()

  task.train_iter = killing_iter
  first = loop.train(config, str(split), task)
  assert first["preempted_at"] == 6
  assert os.path.isdir(split / "checkpoints" / "6")
  second = sft.run(config, str(split))
  assert "preempted_at" not in second

  a, b = read_metrics(full), read_metrics(split)
  assert sorted(a) == list(range(1, 13)) and sorted(b) == sorted(a)
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)],
                             rtol=1e-6)


def test_grad_accumulation_matches_single_batch(tmp_path):
  config = tiny_config(num_steps=3)
  config.checkpoint.every = 100
  sft.run(config, str(tmp_path / "one"))
  config.train.grad_accum = 4
  sft.run(config, str(tmp_path / "four"))
  a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four")
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)


def test_metrics_written(tmp_path):
  config = tiny_config(num_steps=4)
  summary = sft.run(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  keys = set().union(*rows)
  for k in ("loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu", "eval_loss",
            "eval_accuracy", "initial_eval_accuracy", "entropy"):
    assert k in keys, k
  assert np.isfinite(summary["loss"]) and summary["tokens_per_sec"] > 0
  assert os.listdir(tmp_path / "tb"), "TensorBoard events missing"
  assert json.load(open(tmp_path / "config.json"))["task"] == "sft"
  # Keep-N: checkpoint.keep=3 of steps 4 (every=4) and the final one.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_learning_rate_schedule_logged(tmp_path):
  config = tiny_config(num_steps=4)
  config.optimizer.warmup_steps = 2
  sft.run(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  lr = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
  peak = config.optimizer.learning_rate
  # The lr of step s is schedule(s - 1): warm-up 0, peak/2, then cosine from peak.
  np.testing.assert_allclose([lr[1], lr[2], lr[3]], [0.0, peak / 2, peak], rtol=1e-6)


def test_unknown_task_is_an_error():
  config = tiny_config()
  config.unlock()
  config.task = "nope"
  with pytest.raises(ValueError, match="config.task='nope'"):
    main_lib.run_task(config, "/tmp/unused")


def _main(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "alignjax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_main_binary_runs_and_rejects_misspelt_override(tmp_path):
  ok = _main("--config=configs/default.py:only=sft,steps=3,batch=8", f"--workdir={tmp_path}",
             "--config.train.log_every=1", "--config.sft.eval_examples=2",
             "--config.train.peak_flops_per_device=1e9")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "held-out accuracy: before" in ok.stdout
  bad = _main("--config=configs/default.py:only=sft", f"--workdir={tmp_path}/b",
              "--config.optimizer.learnig_rate=1")
  assert bad.returncode != 0
  assert "learnig_rate" in bad.stderr
  bad_arg = _main("--config=configs/default.py:stpes=3", f"--workdir={tmp_path}/c")
  assert bad_arg.returncode != 0 and "stpes" in bad_arg.stderr


def test_sft_config_on_hf_fixture_and_jsonl(tmp_path):
  """configs/sft.py (tiny): HF checkpoint + tokenizer + chat templates + packing, end to end."""
  from configs import sft as sft_config
  c = sft_config.get_config("steps=4")
  c.train.log_every = 1
  c.train.progress_bar = False
  c.train.peak_flops_per_device = 1e9
  summary = sft.run(c, str(tmp_path))
  losses = read_metrics(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4]
  assert losses[4] < losses[1]
  assert np.isfinite(summary["eval_loss"]) and "initial_eval_loss" in summary


def test_model_from_alignjax_checkpoint(tmp_path):
  """model.checkpoint starts a run from another run's parameters (sharded on this mesh)."""
  first = tiny_config(num_steps=6)
  sft.run(first, str(tmp_path / "a"))
  second = tiny_config(num_steps=2)
  second.model.checkpoint = str(tmp_path / "a")
  second.mesh.data, second.mesh.fsdp, second.mesh.tensor = 2, 2, 2
  sft.run(second, str(tmp_path / "b"))
  a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
  # Step 1 of the second run sees trained parameters: its loss is far below a fresh start.
  assert b[1] < a[1] - 0.5
  with pytest.raises(FileNotFoundError, match="No alignjax checkpoint"):
    second.model.checkpoint = str(tmp_path / "nothing")
    sft.run(second, str(tmp_path / "c"))


def test_sigterm_to_main_saves_and_exits_143(tmp_path):
  """A real SIGTERM to the binary: checkpoint written, exit status 143, then resume."""
  import time
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  args = [sys.executable, "-m", "alignjax.main", "--config=configs/default.py:only=sft,steps=100000",
          f"--workdir={tmp_path}", "--config.train.log_every=1",
          "--config.train.progress_bar=False", "--config.sft.eval_examples=0",
          "--config.train.peak_flops_per_device=1e9", "--config.checkpoint.every=100000"]
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 5:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == main_lib.PREEMPTED_EXIT_CODE, out[-3000:]
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3
  assert "resume" in out


def test_crash_resume_from_older_checkpoint(tmp_path):
  """A crash after step 12 whose last durable checkpoint is step 4: the rerun redoes steps
  5-12 with the same losses, and metrics.jsonl keeps one row per step."""
  import shutil
  config = tiny_config()
  sft.run(config, str(tmp_path))
  before = read_metrics(tmp_path)
  for step in ("8", "12"):
    shutil.rmtree(tmp_path / "checkpoints" / step)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 13, "loss": 1')  # a torn line from the crash
  sft.run(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 13))
  assert sum("initial_eval_accuracy" in r for r in rows) == 1  # step 0 is kept on resume
  after = read_metrics(tmp_path)
  np.testing.assert_allclose([after[s] for s in steps], [before[s] for s in steps], rtol=1e-6)
