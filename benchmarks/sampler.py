"""Greedy decode throughput of alignjax's KV-cache sampler, side by side with Hugging Face
transformers `generate` on the same weights, in one run on this CPU.

  python benchmarks/sampler.py                                  # alignjax only
  python benchmarks/sampler.py --peer-python /path/to/venv-with-torch-transformers/bin/python

Models: each preset (default `tiny` and `100m`), randomly initialised by alignjax (seed 0),
float32, exported with `alignjax.models.hf.save_hf_model`; the peer
(benchmarks/peers/hf_generate.py, run in --peer-python after alignjax's measurements of that
preset, never at the same time) loads that checkpoint, so both sides hold identical weights.

Work: the first b of a fixed set of random prompts (token ids in [1, vocab), lengths drawn in
[prompt_len / 2, prompt_len], left-padded with pad id 0 to prompt_len on both sides), greedy
(alignjax `SamplingConfig(temperature=0)`, no stop ids; HF `do_sample=False`, no eos,
`min_new_tokens = max_new_tokens`, `use_cache=True`, attention_mask), so every row generates
exactly T tokens on both sides. alignjax: `Sampler(model, pad_id=0)`: one jitted program per
shape (prefill + `lax.while_loop` decode over a preallocated [rows, P + bucket(T)] cache; rows
are padded to --row-multiple, the Sampler's default 8, so batch 1 computes 8 rows). HF:
`model.generate` with sdpa attention and its growing DynamicCache, torch with --threads
threads (XLA uses the same cores).

Timing: wall time of whole generate calls (host to host), so tokens/s includes the prompt
prefill on both sides:
  tok/s        = b * T / time(T)
  decode tok/s = b * (T - T1) / (time(T) - time(T1))   (per-token decode cost, prefill and
                 per-call overhead cancelled; T1 = --short-tokens, by default the smallest
                 length in the same alignjax generation bucket as T, so both of alignjax's
                 programs have the same cache shape)
alignjax: the first call of each program compiles; compile s = time of the first call for T
minus the steady time (median of the following calls); "(reused)" when the batch runs the
program of an earlier batch (same padded row count). The T1 program traces to the same XLA
computation as T's (max_new_tokens is a runtime argument), so XLA's cache serves it. Steady
times: median of up to --repeats calls, fewer once a measurement would pass --budget seconds
(the first timed call always runs). HF: one untimed warm-up call per batch, then the same.

Agreement: the fraction of generated tokens (all b rows x T) identical between alignjax and HF,
and the mean length of the rows' common prefix as a fraction of T (greedy on random weights
has near-ties, so float32 rounding differences can flip a token; after the first difference
the row continues from a different context, so late positions diverge more).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignjax.models import hf  # noqa: E402
from alignjax.models.presets import get_preset  # noqa: E402
from alignjax.models.transformer import init_model  # noqa: E402
from alignjax.sampling.sampler import GEN_BUCKETS, Sampler, SamplingConfig, bucket  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "hf_generate.py")
PAD_ID = 0


def default_short(t: int) -> int | None:
  """The smallest generation length in T's generation bucket (at least T / 2); None if < 2
  tokens apart from T."""
  b = bucket(t, GEN_BUCKETS)
  below = max([x for x in GEN_BUCKETS if x < b], default=0)
  short = max(below + 1, t // 2)
  return short if t - short >= 2 else None


def make_prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, n)
  lengths[0] = prompt_len
  return [rng.integers(1, vocab, int(n_)).tolist() for n_ in lengths]


def timed_calls(fn, repeats: int, budget: float) -> list[float]:
  """Times up to `repeats` calls of fn (at least one), stopping before the budget is passed."""
  times, used = [], 0.0
  while len(times) < repeats:
    t = time.perf_counter()
    fn()
    s = time.perf_counter() - t
    times.append(s)
    used += s
    if used + s > budget:
      break
  return times


def bench_alignjax(sampler, prompts, batches, lengths, args):
  """{b: {"seconds": {T: median s}, "compile": {T: s}, "tokens": [b, T_long]}}."""
  out = {}
  for b in batches:
    res = {"seconds": {}, "compile": {}, "calls": {}, "new_program": {}}
    for t in lengths:
      before = sampler.num_compiles
      cfg = SamplingConfig(max_new_tokens=t, temperature=0.0, seed=0)
      run = lambda: sampler.generate(prompts[:b], cfg)  # noqa: E731 (returns host numpy)
      start = time.perf_counter()
      samples = run()
      first = time.perf_counter() - start
      assert samples.tokens.shape == (b, t) and (samples.lengths == t).all()
      times = timed_calls(run, args.repeats, args.budget)
      res["seconds"][t] = statistics.median(times)
      res["compile"][t] = max(first - res["seconds"][t], 0.0)
      res["calls"][t] = len(times)
      res["new_program"][t] = sampler.num_compiles > before
      if t == max(lengths):
        res["tokens"] = samples.tokens
    out[b] = res
  return out


def bench_peer(args, model_dir, prompts, batches, lengths):
  spec = dict(model_dir=model_dir, prompts=prompts[:max(batches)], batches=batches,
              lengths=lengths, repeats=args.repeats, budget=args.budget, pad_id=PAD_ID,
              threads=args.threads)
  proc = subprocess.run([args.peer_python, PEER, json.dumps(spec)], capture_output=True,
                        text=True)
  if proc.returncode:
    sys.exit(f"peer failed:\n{proc.stderr[-4000:]}")
  res = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
  out = {int(b): {"seconds": {int(t): s for t, s in r["seconds"].items()},
                  "tokens": np.asarray(r["tokens"], np.int32), "warmup": r["warmup"]}
         for b, r in res["results"].items()}
  return out, res


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(fraction of identical tokens, mean common-prefix length / T)."""
  same = a == b
  prefix = np.where(same.all(1), a.shape[1], np.argmin(same, axis=1))
  return float(same.mean()), float(prefix.mean() / a.shape[1])


def rates(seconds: dict, b: int, t: int, t1: int | None) -> tuple[float, float | None]:
  tps = b * t / seconds[t]
  if t1 is None or seconds[t] <= seconds[t1]:
    return tps, None
  return tps, b * (t - t1) / (seconds[t] - seconds[t1])


def fmt(x, spec="{:9.1f}", width=9):
  return spec.format(x) if x is not None else "n/a".rjust(width)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--presets", default="tiny,100m")
  p.add_argument("--batches", default="1,8,64")
  p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row (T)")
  p.add_argument("--short-tokens", type=int, default=0,
                 help="T1 for decode tok/s (default: smallest length in T's generation bucket;"
                      " -1: skip)")
  p.add_argument("--prompt-len", type=int, default=32, help="longest prompt (P)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (max)")
  p.add_argument("--budget", type=float, default=30.0,
                 help="seconds per measurement after which no further repeat starts")
  p.add_argument("--row-multiple", type=int, default=64, help="Sampler(row_multiple=...)")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
  p.add_argument("--peer-python", default="", help="python with torch + transformers")
  args = p.parse_args()
  presets = [x for x in args.presets.split(",") if x]
  batches = [int(x) for x in args.batches.split(",") if x]
  t = args.new_tokens
  t1 = (None if args.short_tokens < 0 else
        args.short_tokens if args.short_tokens else default_short(t))
  if t1 is not None and not 1 <= t1 < t:
    sys.exit(f"--short-tokens must be in [1, {t}) (or -1)")
  lengths = [t] if t1 is None else [t, t1]  # T first: its first call is the real compile
  print(f"alignjax on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} cores; greedy, float32, prompts of {args.prompt_len // 2}.."
        f"{args.prompt_len} random tokens left-padded to {args.prompt_len}, T = {t} new tokens "
        f"per row (no stop ids), Sampler row multiple {args.row_multiple}")
  print("tok/s = b*T/time(T), prefill included on both sides" +
        (f"; decode tok/s = b*(T-T1)/(time(T)-time(T1)), T1 = {t1}" if t1 else "") +
        f"; times = median of <= {args.repeats} calls (budget {args.budget:g} s)")
  rows, peer_info = [], None
  tmp = tempfile.mkdtemp(prefix="sampler_bench_")
  try:
    for name in presets:
      cfg = get_preset(name)
      model = init_model(cfg, 0)
      model_dir = os.path.join(tmp, name)
      hf.save_hf_model(model, model_dir)
      prompts = make_prompts(max(batches), args.prompt_len, cfg.vocab_size, seed=0)
      sampler = Sampler(model, pad_id=PAD_ID, row_multiple=args.row_multiple)
      print(f"[{name}: {cfg.num_params() / 1e6:.1f}M parameters ({cfg.family}, "
            f"{cfg.num_layers} layers, d {cfg.hidden_size}, vocab {cfg.vocab_size})]",
            flush=True)
      aj = bench_alignjax(sampler, prompts, batches, lengths, args)
      peer = None
      if args.peer_python:
        peer, peer_info = bench_peer(args, model_dir, prompts, batches, lengths)
      for b in batches:
        a_tps, a_dec = rates(aj[b]["seconds"], b, t, t1)
        compiled = (f"{aj[b]['compile'][t]:9.2f}" if aj[b]["new_program"][t]
                    else f"{'(reused)':>9}")
        row = dict(preset=name, b=b, a_tps=a_tps, a_dec=a_dec, compile=compiled,
                   a_ms=aj[b]["seconds"][t] * 1e3, calls=aj[b]["calls"][t])
        if peer:
          h_tps, h_dec = rates(peer[b]["seconds"], b, t, t1)
          same, prefix = agreement(aj[b]["tokens"], peer[b]["tokens"])
          row.update(h_tps=h_tps, h_dec=h_dec, h_ms=peer[b]["seconds"][t] * 1e3, same=same,
                     prefix=prefix, ratio=a_tps / h_tps,
                     dec_ratio=(a_dec / h_dec if a_dec and h_dec else None))
        rows.append(row)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  if peer_info:
    print(f"HF: torch {peer_info['torch']}, transformers {peer_info['transformers']}, "
          f"{peer_info['threads']} threads, sdpa, DynamicCache")
  head = (f"{'preset':>6} {'batch':>5} | {'aj ms':>8} {'aj tok/s':>9} {'HF ms':>8} {'HF tok/s':>9}"
          f" {'ratio':>6} | {'aj dec/s':>9} {'HF dec/s':>9} {'ratio':>6} | {'compile s':>9}"
          f" | {'same tok':>8} {'prefix':>6}")
  print(head)
  print("-" * len(head))
  for r in rows:
    peer_cols = (f"{r['h_ms']:8.1f} {r['h_tps']:9.1f} {r['ratio']:5.2f}x" if "h_tps" in r
                 else f"{'':8} {'':9} {'':6}")
    dec_cols = (f"{fmt(r['a_dec'])} {fmt(r.get('h_dec'))} "
                f"{fmt(r.get('dec_ratio'), '{:5.2f}x', 6)}")
    agree = (f"{r['same']:8.1%} {r['prefix']:6.1%}" if "same" in r else "")
    print(f"{r['preset']:>6} {r['b']:5d} | {r['a_ms']:8.1f} {r['a_tps']:9.1f} {peer_cols} | "
          f"{dec_cols} | {r['compile']} | {agree}")
  if peer_info:
    summary = ", ".join(
        f"{r['preset']} b{r['b']} {r['ratio']:.2f}x" +
        (f" (decode {r['dec_ratio']:.2f}x)" if r.get("dec_ratio") else "") for r in rows)
    print(f"alignjax / HF tok/s: {summary}")


if __name__ == "__main__":
  main()
