"""Token log-probs from hidden states: chunked (sequence x vocabulary) vs full logits.

For each vocabulary size, compiles value_and_grad (w.r.t. h and W) of sum(log p(targets)) for
the naive path (full [B,L,V] float32 logits + log_softmax) and for
`alignjax.losses.logprobs.token_logprobs`, and reports XLA's compiled memory analysis and
the median step time:

  python benchmarks/logprobs.py                                # B=1 L=512 D=896 (Qwen2.5-0.5B)
  python benchmarks/logprobs.py --batch 2 --length 1024 --vocabs 32000,151936

temp = compiled.memory_analysis().temp_size_in_bytes (scratch XLA allocates for the step);
peak = temp + arguments + outputs - aliased. Arguments/outputs (h, W, dh, dW) grow with V
through W and dW on both paths; the question is whether the scratch grows with B x L x V.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignjax.losses.logprobs import token_logprobs  # noqa: E402

MIB = 2**20


def naive_logprobs(h, w, t):
  logits = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)
  lsm = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(lsm, t[..., None], axis=-1)[..., 0]


def compile_step(fn, h, w, t):
  step = jax.jit(jax.value_and_grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = step.lower(h, w, t).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  mem = {"temp": ma.temp_size_in_bytes, "args": ma.argument_size_in_bytes,
         "out": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
  mem["peak"] = mem["temp"] + mem["args"] + mem["out"] - mem["alias"]
  return compiled, mem, compile_s


def time_step(compiled, args, repeats: int):
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--dim", type=int, default=896, help="hidden size (896 = Qwen2.5-0.5B)")
  p.add_argument("--vocabs", default="32000,65536,128256,151936")
  p.add_argument("--chunk", type=int, default=1024, help="sequence chunk (positions)")
  p.add_argument("--vocab-chunk", type=int, default=8192, help="vocabulary chunk (columns)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
  p.add_argument("--skip-naive-above", type=int, default=0,
                 help="only compile (no timing) the naive path for V above this (0: time all)")
  p.add_argument("--check", action="store_true", help="also compare values/grads (max abs diff)")
  args = p.parse_args()

  b, l, d = args.batch, args.length, args.dim
  dtype = jnp.dtype(args.dtype)
  vocabs = [int(v) for v in args.vocabs.split(",")]
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} B={b} L={l} D={d} "
        f"dtype={dtype.name} chunk={args.chunk} vocab_chunk={args.vocab_chunk} "
        f"repeats={args.repeats}")

  def chunked(h, w, t):
    return token_logprobs(h, w, t, chunk_size=args.chunk, vocab_chunk_size=args.vocab_chunk)

  header = (f"{'V':>7} | {'logits MiB':>10} | {'naive temp':>10} {'peak':>8} | "
            f"{'chunk temp':>10} {'peak':>8} | {'temp x':>7} | {'naive ms':>9} "
            f"{'chunk ms':>9} | {'speed x':>7}")
  print("(memory in MiB; 'logits MiB' = one [B,L,V] float32 array; 'temp x' = naive temp / "
        "chunked temp; 'speed x' = naive ms / chunked ms)")
  print(header)
  print("-" * len(header))
  rows = []
  rng = np.random.default_rng(0)
  for v in vocabs:
    h = jnp.asarray(rng.standard_normal((b, l, d), np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d), dtype)
    t = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
    c_comp, c_mem, _ = compile_step(chunked, h, w, t)
    n_comp, n_mem, _ = compile_step(naive_logprobs, h, w, t)
    c_ms = time_step(c_comp, (h, w, t), args.repeats)
    timed_naive = not args.skip_naive_above or v <= args.skip_naive_above
    n_ms = time_step(n_comp, (h, w, t), args.repeats) if timed_naive else float("nan")
    if args.check:
      (cv, (cdh, cdw)), (nv, (ndh, ndw)) = c_comp(h, w, t), n_comp(h, w, t)
      print(f"  check V={v}: |dvalue|={abs(float(cv) - float(nv)):.2e} "
            f"max|ddh|={float(jnp.abs(cdh - ndh).max()):.2e} "
            f"max|ddW|={float(jnp.abs(cdw - ndw).max()):.2e}")
    rows.append((v, n_mem, c_mem))
    logits_mib = b * l * v * 4 / MIB
    print(f"{v:>7} | {logits_mib:>10.1f} | {n_mem['temp'] / MIB:>10.1f} "
          f"{n_mem['peak'] / MIB:>8.1f} | {c_mem['temp'] / MIB:>10.1f} "
          f"{c_mem['peak'] / MIB:>8.1f} | {n_mem['temp'] / max(c_mem['temp'], 1):>7.1f} | "
          f"{n_ms:>9.1f} {c_ms:>9.1f} | {n_ms / c_ms:>7.2f}", flush=True)
    del h, w, t, c_comp, n_comp

  if len(rows) > 1:
    (v0, n0, c0), (v1, n1, c1) = rows[0], rows[-1]
    dv = v1 - v0
    n_slope, c_slope = (n1["temp"] - n0["temp"]) / dv, (c1["temp"] - c0["temp"]) / dv
    print(f"temp growth per extra vocab column ({v0} -> {v1}): naive {n_slope:,.0f} B "
          f"(= {n_slope / (b * l * 4):.1f} x B*L*4, grows with vocab x length); chunked "
          f"{c_slope:,.0f} B (= {c_slope / (b * l * 4):.2f} x B*L*4, = "
          f"{c_slope / (d * 4):.2f} x D*4: at most the float32 dW accumulator, flat in B*L)")


if __name__ == "__main__":
  main()
