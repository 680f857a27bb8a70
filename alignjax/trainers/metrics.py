"""Metrics to a progress bar, `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`);
the measured peak FLOP rate used for model FLOPs utilisation."""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.models.config import to_dtype


def local_metrics_dir(workdir: str) -> str:
  """`workdir` itself if local; for a remote workdir (gs://...), whose checkpoints Orbax
  writes directly, metrics go to /tmp/alignjax_metrics/<last path component>."""
  if "://" not in workdir:
    return workdir
  return os.path.join("/tmp/alignjax_metrics", workdir.rstrip("/").rsplit("/", 1)[-1])


def _drop_rows_after(path: str, step: int) -> None:
  """On resume from `step`, forget rows of steps after it (a crashed run logged them; they
  are about to be recomputed), so metrics.jsonl has one row set per step. A run starting
  from scratch (step 0) in a reused workdir starts a fresh file."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if step > 0 and json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError):  # a torn last line from a crash
      pass
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


class MetricWriter:
  """Writes scalar metrics from process 0 only; other processes are silent."""

  def __init__(self, workdir: str, total: int, initial: int = 0, progress_bar: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = self._bar = None
    if not self.active:
      return
    workdir = local_metrics_dir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, initial)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # TensorBoard output is optional
      self._tb = None
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")
    self._last = initial

  def write(self, step: int, metrics: dict) -> None:
    if not self.active or not metrics:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(max(step - self._last, 0))
      self._last = max(step, self._last)
      shown = {k: f"{v:.4g}" for k, v in clean.items()
               if k in ("loss", "eval_loss", "grad_norm", "tokens_per_sec", "mfu")
               or "accuracy" in k}
      self._bar.set_postfix(shown, refresh=True)
    else:
      print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in clean.items()), flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


@functools.lru_cache(maxsize=None)
def measure_peak_flops(dtype: str = "float32", n: int | None = None, repeats: int = 3) -> float:
  """Measured matmul FLOP/s per device: all local devices run an [n,n]x[n,n] matmul at once.

  This is the denominator of MFU when `train.peak_flops_per_device` is 0; set that key to the
  vendor peak (e.g. 197e12 for a TPU v5e chip in bf16) to report MFU against the datasheet.
  """
  devices = jax.local_devices()
  n = n or (1024 if devices[0].platform == "cpu" else 8192)
  dt = to_dtype(dtype)
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  x = jax.device_put(jnp.ones((len(devices), n, n), dt), sharding)
  f = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a))
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best
