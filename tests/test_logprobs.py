"""Chunked (sequence x vocabulary) token log-probs, entropies and KL vs the full-logits path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.losses.logprobs import (masked_entropy_mean, sequence_logprobs, token_kl,
                                      token_logprobs)

TOL = dict(rtol=1e-5, atol=1e-5)


def data(b, l, d, v, seed=0, scale=1.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  h = (scale * rng.standard_normal((b, l, d))).astype(dtype)
  w = (rng.standard_normal((d, v)) / np.sqrt(d)).astype(dtype) * 3
  t = rng.integers(0, v, (b, l)).astype(np.int32)
  return jnp.asarray(h), jnp.asarray(w), jnp.asarray(t)


def naive(h, w, t, temperature=1.0):
  """Full [B,L,V] float32 logits: (log p(target), entropy)."""
  logits = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32) / temperature
  lsm = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(lsm, t[..., None], axis=-1)[..., 0]
  return lp, -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)


def naive_kl(hp, wp, hq, wq, temperature=1.0):
  lp = jax.nn.log_softmax(hp @ wp / temperature, axis=-1)
  lq = jax.nn.log_softmax(hq @ wq / temperature, axis=-1)
  return jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1)


def chunked(h, w, t, **kw):
  return token_logprobs(h, w, t, with_entropy=True, **kw)


# (b, l, d, v, chunk, vocab_chunk, temperature): L not divisible by chunk, V not divisible by
# the vocab chunk, one vocab chunk, vocab chunk of 1 column, chunk > L, temperature != 1.
CASES = [
    (2, 13, 16, 50, 4, 16, 1.0),
    (2, 13, 16, 50, 13, None, 0.7),
    (1, 9, 8, 37, 64, 5, 1.3),
    (3, 8, 12, 64, 3, 16, 1.0),
    (2, 5, 8, 11, 2, 1, 2.0),
    (2, 6, 8, 40, 6, 39, 1.0),  # last vocab chunk = all but one column already covered
]


@pytest.mark.parametrize("b,l,d,v,chunk,vchunk,temp", CASES)
def test_values_and_grads_match_naive(b, l, d, v, chunk, vchunk, temp):
  h, w, t = data(b, l, d, v)
  rng = np.random.default_rng(1)
  c_lp = jnp.asarray(rng.standard_normal((b, l)), jnp.float32)  # arbitrary cotangents
  c_ent = jnp.asarray(rng.standard_normal((b, l)), jnp.float32)

  def loss(fn):
    def f(h, w, temp):
      lp, ent = fn(h, w, temp)
      return jnp.sum(c_lp * lp) + jnp.sum(c_ent * ent), (lp, ent)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  kw = dict(chunk_size=chunk, vocab_chunk_size=vchunk)
  (_, (lp, ent)), g = loss(lambda h, w, T: chunked(h, w, t, temperature=T, **kw))(h, w, temp)
  (_, (lp0, ent0)), g0 = loss(lambda h, w, T: naive(h, w, t, T))(h, w, temp)
  assert lp.shape == ent.shape == (b, l) and lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, lp0, **TOL)
  np.testing.assert_allclose(ent, ent0, **TOL)
  for name, x, x0 in zip(["dh", "dw", "dtemp"], g, g0):
    np.testing.assert_allclose(x, x0, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(x0).max()),
                               err_msg=name)


def test_logprob_only_grads_and_default_chunks():
  """Without entropy (the training path) and with default vocab chunking (V > 8192)."""
  h, w, t = data(1, 5, 8, 9000, seed=3)
  f = jax.jit(jax.value_and_grad(lambda h, w: token_logprobs(h, w, t, chunk_size=2).sum(),
                                 argnums=(0, 1)))
  f0 = jax.jit(jax.value_and_grad(lambda h, w: naive(h, w, t)[0].sum(), argnums=(0, 1)))
  (v, (dh, dw)), (v0, (dh0, dw0)) = f(h, w), f0(h, w)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  np.testing.assert_allclose(dh, dh0, **TOL)
  np.testing.assert_allclose(dw, dw0, **TOL)


def test_grad_of_single_output_and_frozen_inputs():
  """Zero cotangents (entropy only as a metric) and frozen W/h use the pruned backward."""
  h, w, t = data(2, 7, 8, 30, seed=4)
  kw = dict(chunk_size=3, vocab_chunk_size=8)
  only_lp = jax.jit(jax.grad(lambda h: chunked(h, w, t, **kw)[0].sum()))(h)
  np.testing.assert_allclose(only_lp, jax.grad(lambda h: naive(h, w, t)[0].sum())(h), **TOL)
  only_ent = jax.jit(jax.grad(lambda w: chunked(h, w, t, **kw)[1].sum()))(w)
  np.testing.assert_allclose(only_ent, jax.grad(lambda w: naive(h, w, t)[1].sum())(w), **TOL)
  # Higher-level transforms: vmap over an extra axis and jit-of-grad agree with the naive path.
  hh = jnp.stack([h, 2 * h])
  got = jax.jit(jax.vmap(jax.grad(lambda h: token_logprobs(h, w, t, **kw).sum())))(hh)
  want = jax.vmap(jax.grad(lambda h: naive(h, w, t)[0].sum()))(hh)
  np.testing.assert_allclose(got, want, **TOL)


def test_extreme_logits_finite():
  h, w, t = data(2, 6, 8, 27, seed=5, scale=1e3)
  kw = dict(chunk_size=4, vocab_chunk_size=8)
  f = jax.jit(jax.value_and_grad(
      lambda h, w: sum(jnp.sum(x) for x in chunked(h, w, t, **kw)), argnums=(0, 1)))
  total, (dh, dw) = f(h, w)
  lp, ent = jax.jit(lambda h, w: chunked(h, w, t, **kw))(h, w)
  lp0, ent0 = naive(h, w, t)
  for x in (total, dh, dw, lp, ent):
    assert np.isfinite(np.asarray(x)).all()
  assert (np.asarray(lp) <= 0).all() and (np.asarray(ent) >= -1e-3).all()
  scale = np.abs(np.asarray(h @ w)).max()
  assert scale > 1e3
  np.testing.assert_allclose(lp, lp0, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(ent, ent0, rtol=1e-4, atol=1e-4)


def test_bf16_inputs():
  h, w, t = data(2, 9, 16, 45, seed=6, dtype=np.float32)
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  kw = dict(chunk_size=4, vocab_chunk_size=16)
  lp, ent = jax.jit(lambda h, w: chunked(h, w, t, **kw))(hb, wb)
  assert lp.dtype == ent.dtype == jnp.float32
  # Same bf16 inputs, float32 accumulation on both sides.
  lp0, ent0 = naive(hb, wb, t)
  np.testing.assert_allclose(lp, lp0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ent0, rtol=1e-5, atol=1e-5)
  dh, dw = jax.jit(jax.grad(lambda h, w: token_logprobs(h, w, t, **kw).sum(),
                            argnums=(0, 1)))(hb, wb)
  dh0, dw0 = jax.grad(lambda h, w: naive(h.astype(jnp.float32), w.astype(jnp.float32),
                                         t)[0].sum(), argnums=(0, 1))(hb, wb)
  assert dh.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dh, np.float32), dh0, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float32), dw0, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk,vchunk,temp", [(3, 7, 1.0), (8, None, 0.8)])
def test_token_kl_matches_naive(chunk, vchunk, temp):
  hp, wp, _ = data(2, 7, 8, 30, seed=7)
  hq, wq, _ = data(2, 7, 8, 30, seed=8)
  kw = dict(chunk_size=chunk, vocab_chunk_size=vchunk, temperature=temp)
  kl = jax.jit(lambda *a: token_kl(*a, **kw))(hp, wp, hq, wq)
  kl0 = naive_kl(hp, wp, hq, wq, temp)
  assert kl.shape == (2, 7) and (np.asarray(kl) >= 0).all()
  np.testing.assert_allclose(kl, kl0, **TOL)
  np.testing.assert_allclose(jax.jit(lambda *a: token_kl(*a, **kw))(hp, wp, hp, wp), 0.0,
                             atol=1e-5)
  c = jnp.asarray(np.random.default_rng(9).standard_normal((2, 7)), jnp.float32)

  # Policy side only (reference under stop_gradient), then both sides.
  def p_only(fn):
    return jax.jit(jax.grad(
        lambda hp, wp: jnp.sum(c * fn(hp, wp, jax.lax.stop_gradient(hq), wq)),
        argnums=(0, 1)))(hp, wp)
  got = p_only(lambda *a: token_kl(*a, **kw))
  want = p_only(lambda *a: naive_kl(*a, temp))
  for x, x0 in zip(got, want):
    np.testing.assert_allclose(x, x0, **TOL)
  grad_all = lambda fn: jax.jit(jax.grad(  # noqa: E731
      lambda *a: jnp.sum(c * fn(*a[:4], a[4])), argnums=(0, 1, 2, 3, 4)))
  got = grad_all(lambda hp, wp, hq, wq, T: token_kl(hp, wp, hq, wq, chunk_size=chunk,
                                                      vocab_chunk_size=vchunk, temperature=T))
  got = got(hp, wp, hq, wq, temp)
  want = grad_all(naive_kl)(hp, wp, hq, wq, temp)
  for name, x, x0 in zip(["dhp", "dwp", "dhq", "dwq"], got, want):
    np.testing.assert_allclose(x, x0, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(x0).max()),
                               err_msg=name)
  # d/dT sums B*L*V cancelling terms: both float32 paths are ~3e-5 (relative) off float64.
  np.testing.assert_allclose(got[4], want[4], rtol=1e-4)


def test_sequence_reductions():
  lp = jnp.asarray([[-1.0, -2.0, -jnp.inf], [-0.5, jnp.nan, -1.5]])
  mask = jnp.asarray([[1, 1, 0], [0, 0, 0]])
  out = sequence_logprobs(lp, mask)
  np.testing.assert_allclose(out["sum"], [-3.0, 0.0])
  np.testing.assert_allclose(out["mean"], [-1.5, 0.0])
  np.testing.assert_allclose(out["count"], [2.0, 0.0])
  g = jax.grad(lambda x: sequence_logprobs(x, mask)["mean"].sum())(jnp.zeros((2, 3)))
  np.testing.assert_allclose(g, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
  ent = jnp.asarray([[1.0, 3.0, jnp.nan], [2.0, 0.0, 0.0]])
  np.testing.assert_allclose(masked_entropy_mean(ent, jnp.asarray([[1, 1, 0], [1, 0, 0]])), 2.0)
  np.testing.assert_allclose(masked_entropy_mean(ent, jnp.zeros((2, 3))), 0.0)


def test_peak_memory_independent_of_vocab():
  """The compiled backward keeps O(block) temporaries: temp bytes do not grow with V x L."""
  b, l, d, chunk, vchunk = 1, 64, 16, 16, 256

  def temp_bytes(v, fn):
    h = jax.ShapeDtypeStruct((b, l, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((b, l), jnp.int32)
    f = jax.jit(jax.value_and_grad(lambda h, w, t: fn(h, w, t).sum(), argnums=(0, 1)))
    return f.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes

  chunked_fn = lambda h, w, t: token_logprobs(h, w, t, chunk_size=chunk,  # noqa: E731
                                              vocab_chunk_size=vchunk)
  small, big = temp_bytes(2048, chunked_fn), temp_bytes(16384, chunked_fn)
  naive_big = temp_bytes(16384, lambda h, w, t: naive(h, w, t)[0])
  full_logits = b * l * 16384 * 4
  # Growth with V is at most the float32 dW accumulator (D x V), never B x L x V.
  assert big - small <= 4 * d * (16384 - 2048) + 64 * 1024, (small, big)
  assert big < full_logits < naive_big, (big, full_logits, naive_big)
