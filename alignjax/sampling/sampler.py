"""KV-cache sampler for the NNX transformer: one jitted program per (rows, prompt bucket,
generation bucket) that prefills the padded prompts once and decodes in a `lax.while_loop`.

Layout. Prompts are left-padded to a bucketed length P; every row shares one slot timeline
(slot t holds the t-th token of the [B, P + T] buffer), so the cache is a preallocated
[B, P + T, K, H] per layer (batch over the data axes, kv heads over `tensor`). RoPE positions
count each row's real tokens only, so a row's tokens get the positions they would have
unpadded. A row stops at its first stop token (included in the output, counted in its
length); the loop exits when every row has stopped or after `max_new_tokens`.

Controls (`SamplingConfig`): greedy (`temperature = 0`), temperature, top-k, top-p, min-p,
`n` samples per prompt, a seed, stop ids, and a logits processor `fn(logits [B,V] float32,
step, generated [B,T]) -> logits`, applied before the temperature and the filters (e.g.
reward-guided decoding). Returned per sampled token: its log-prob under the sampling
distribution (after the processor, temperature and filters; 0 for greedy) and under the
unmodified model (log_softmax of the raw logits), both needed for importance correction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from alignjax import parallel

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
GEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. `temperature = 0` is greedy; `top_k = 0`, `top_p = 1` and `min_p = 0`
  switch those filters off. `stop_ids`: tokens that end a row (e.g. the tokenizer's eos)."""
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  n: int = 1
  seed: int = 0
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
    if self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
      raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, 0 <= min_p < 1; got top_k="
                       f"{self.top_k}, top_p={self.top_p}, min_p={self.min_p}")
    if self.n < 1:
      raise ValueError(f"n must be >= 1, got {self.n}")


@dataclasses.dataclass
class Samples:
  """Generated continuations, rows ordered prompt-major (`n` consecutive rows per prompt).

  tokens [N,T] int32 (pad_id after a row's end), logprobs [N,T] (sampling distribution),
  model_logprobs [N,T] (unmodified model), both 0 after the end; lengths [N] generated
  tokens including the stop token; truncated [N] True when no stop token came within
  max_new_tokens; prompt_index [N].
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  model_logprobs: np.ndarray
  lengths: np.ndarray
  truncated: np.ndarray
  prompt_index: np.ndarray

  def completions(self) -> list[list[int]]:
    """Each row's generated tokens (with its stop token, if any)."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (beyond the largest: the next multiple of it)."""
  for b in buckets:
    if n <= b:
      return b
  top = buckets[-1]
  return -(-n // top) * top


def row_bucket(n: int, multiple: int = 64) -> int:
  """Rows of a program: the next power of two up to `multiple`, then multiples of it (1, 2,
  4, ..., 64, 128, 192, ...), so small batches do not pay for padding rows and a run
  compiles a bounded number of programs."""
  if n <= multiple:
    return 1 << max(n - 1, 0).bit_length()
  return -(-n // multiple) * multiple


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> jax.Array:
  """Top-k, then top-p (the smallest set of most likely tokens whose mass reaches top_p;
  the most likely token always stays), then min-p (tokens with p >= min_p * p_max); removed
  tokens get -inf. Float32 [B,V] in and out."""
  neg = jnp.array(-jnp.inf, logits_BxV.dtype)
  if top_k > 0 and top_k < logits_BxV.shape[-1]:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p                       # first token always kept
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff, neg, logits_BxV)
  if min_p > 0.0:
    logp = jax.nn.log_softmax(logits_BxV, axis=-1)
    thresh = jnp.max(logp, axis=-1, keepdims=True) + math.log(min_p)
    logits_BxV = jnp.where(logp < thresh, neg, logits_BxV)
  return logits_BxV


def _choose(raw_BxV, key, step, generated_BxT, cfg: SamplingConfig, processor):
  """(token [B], log-prob under the sampling distribution [B])."""
  logits = raw_BxV if processor is None else processor(raw_BxV, step, generated_BxT)
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1])
  logits = filter_logits(logits / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         min_p=cfg.min_p)
  tok = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _pick(logp_BxV, tok_B):
  return jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]


def _sample_program(graphdef, state, tokens_BxP, valid_BxP, key, max_new, *, gen_len: int,
                    cfg: SamplingConfig, processor, pad_id: int):
  """The jitted sampler: prefill + while_loop decode (see the module docstring)."""
  model = nnx.merge(graphdef, state)
  b, p = tokens_BxP.shape
  s = p + gen_len
  tokens_BxP = parallel.constrain(tokens_BxP, ("batch", "length"))
  valid = valid_BxP.astype(bool)
  kv_valid = jnp.concatenate([valid, jnp.zeros((b, gen_len), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  cache = model.init_cache(b, s)
  h, cache = model.hidden_cached(tokens_BxP, positions, cache, 0, kv_valid)
  logits = model.logits(h[:, -1:])[:, 0].astype(jnp.float32)
  stop = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
  empty = jnp.sum(valid, axis=1) == 0                      # filler rows: done from the start
  carry = dict(i=jnp.int32(0), cache=cache, kv_valid=kv_valid, logits=logits, key=key,
               pos=jnp.sum(valid, axis=1).astype(jnp.int32), done=empty,
               tokens=jnp.full((b, gen_len), pad_id, jnp.int32),
               lp=jnp.zeros((b, gen_len), jnp.float32), mlp=jnp.zeros((b, gen_len), jnp.float32),
               lengths=jnp.zeros((b,), jnp.int32))

  def cond(c):
    return (c["i"] < max_new) & ~jnp.all(c["done"])

  def body(c):
    key, sub = jax.random.split(c["key"])
    raw = c["logits"]
    tok, lp = _choose(raw, sub, c["i"], c["tokens"], cfg, processor)
    mlp = _pick(jax.nn.log_softmax(raw, axis=-1), tok)
    live = ~c["done"]
    tok = jnp.where(live, tok, pad_id)
    i = c["i"]
    put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, axis=1)
    tokens = put(c["tokens"], tok)
    lp_buf = put(c["lp"], jnp.where(live, lp, 0.0))
    mlp_buf = put(c["mlp"], jnp.where(live, mlp, 0.0))
    kv_valid = jax.lax.dynamic_update_index_in_dim(c["kv_valid"], live, p + i, axis=1)
    h, cache = model.hidden_cached(tok[:, None], c["pos"][:, None], c["cache"], p + i, kv_valid)
    logits = model.logits(h)[:, 0].astype(jnp.float32)
    done = c["done"] | jnp.isin(tok, stop)
    return dict(i=i + 1, cache=cache, kv_valid=kv_valid, logits=logits, key=key,
                pos=c["pos"] + live.astype(jnp.int32), done=done, tokens=tokens, lp=lp_buf,
                mlp=mlp_buf, lengths=c["lengths"] + live.astype(jnp.int32))

  out = jax.lax.while_loop(cond, body, carry)
  stopped = jnp.any(jnp.isin(out["tokens"], stop) & (jnp.arange(gen_len) < out["lengths"][:, None]),
                    axis=1)
  return out["tokens"], out["lp"], out["mlp"], out["lengths"], ~stopped


class Sampler:
  """Samples from an NNX transformer on its mesh. One instance caches the compiled programs
  (one per rows x prompt bucket x generation bucket x config; rows from `row_bucket`, then
  rounded up to the data-parallel devices); `num_compiles` counts them.

    sampler = Sampler(model, pad_id=tok.pad_id)
    out = sampler.generate([[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=32,
                           temperature=0.7, top_p=0.9, n=4, stop_ids=(tok.eos_id,)))
  """

  def __init__(self, model, *, pad_id: int, mesh=None, rules=None,
               prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
               gen_buckets: Sequence[int] = GEN_BUCKETS, row_multiple: int = 64):
    self.graphdef, self.state = nnx.split(model)
    self.pad_id = pad_id
    leaf = jax.tree.leaves(self.state)[0]
    self.mesh = mesh if mesh is not None else getattr(leaf.sharding, "mesh", None)
    self.rules = rules
    self.prompt_buckets, self.gen_buckets = tuple(prompt_buckets), tuple(gen_buckets)
    self.row_multiple = row_multiple
    self._programs: dict = {}

  def sync(self, model) -> "Sampler":
    """Samples from `model`'s current weights from now on (same architecture and sharding,
    e.g. the policy after an optimizer step): the compiled programs are reused."""
    graphdef, self.state = nnx.split(model)
    if graphdef != self.graphdef:
      raise ValueError("Sampler.sync: the model's structure differs from the sampler's; "
                       "build a new Sampler for a different model.")
    return self

  @property
  def num_compiles(self) -> int:
    return len(self._programs)

  def _program(self, rows, p, t, cfg, processor):
    # max_new_tokens is a traced bound, the seed a traced key and n only sets `rows`: none
    # of them needs its own program.
    cfg = dataclasses.replace(cfg, max_new_tokens=t, seed=0, n=1)
    key = (rows, p, t, cfg, processor)
    if key not in self._programs:
      fn = functools.partial(_sample_program, gen_len=t, cfg=cfg, processor=processor,
                             pad_id=self.pad_id)
      self._programs[key] = jax.jit(fn, static_argnums=(0,))
      logging.info("sampler: compiling program %d (rows %d, prompt bucket %d, generation "
                   "bucket %d)", len(self._programs), rows, p, t)
    return self._programs[key]

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
               processor: LogitsProcessor | None = None) -> Samples:
    """Samples `cfg.n` continuations of each token-id prompt (every process passes the same
    prompts; the result is the same on every process)."""
    if not prompts:
      raise ValueError("generate: no prompts")
    n_rows = len(prompts) * cfg.n
    rows = row_bucket(n_rows, self.row_multiple)
    if self.mesh is not None:
      ways = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)
      rows = -(-rows // ways) * ways
    p = bucket(max(max(len(x) for x in prompts), 1), self.prompt_buckets)
    t = bucket(cfg.max_new_tokens, self.gen_buckets)
    tokens = np.full((rows, p), self.pad_id, np.int32)
    valid = np.zeros((rows, p), np.int32)
    for i, prompt in enumerate(prompts):
      if not len(prompt):
        raise ValueError(f"generate: prompt {i} is empty; give at least one token (e.g. bos)")
      for j in range(cfg.n):
        r = i * cfg.n + j
        tokens[r, p - len(prompt):] = prompt
        valid[r, p - len(prompt):] = 1
    key = jax.random.key(cfg.seed)
    program = self._program(rows, p, t, cfg, processor)
    if self.mesh is None:
      args = (jnp.asarray(tokens), jnp.asarray(valid))
      outs = program(self.graphdef, self.state, *args, key, jnp.int32(cfg.max_new_tokens))
    else:
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      place = lambda x: jax.make_array_from_process_local_data(replicated, x)
      with parallel.use_mesh(self.mesh, self.rules):
        outs = program(self.graphdef, self.state, place(tokens), place(valid), key,
                       jnp.int32(cfg.max_new_tokens))
      outs = multihost_utils.process_allgather(outs, tiled=True)
    toks, lp, mlp, lengths, truncated = (np.asarray(x)[:n_rows] for x in outs)
    t_out = cfg.max_new_tokens
    return Samples(tokens=toks[:, :t_out], logprobs=lp[:, :t_out], model_logprobs=mlp[:, :t_out],
                   lengths=lengths, truncated=truncated,
                   prompt_index=np.repeat(np.arange(len(prompts)), cfg.n))


def generate(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, pad_id: int,
             processor: LogitsProcessor | None = None) -> Samples:
  """One-off sampling (compiles each call's shapes; keep a `Sampler` to reuse programs)."""
  return Sampler(model, pad_id=pad_id).generate(prompts, cfg, processor)
