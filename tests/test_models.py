"""The Transformer against an independent float64 numpy forward pass, plus its invariants
(packing, padding, bf16, remat, parameter counts, logical axes) and the token log-prob /
SFT loss kernels against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import parallel
from alignjax.losses.logprobs import shift_targets, token_logprobs
from alignjax.losses.sft import sft_cross_entropy
from alignjax.models.config import ModelConfig
from alignjax.models.presets import PRESETS, get_preset
from alignjax.models.transformer import init_model, rope_inv_freq

# Llama-3.1 style scaling; with head_dim 16, theta 5e5 and original length 64 the 8
# frequencies fall in all three regimes (kept, smoothed, divided by the factor).
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)

CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         rope_theta=5e5, rope_scaling=LLAMA3_SCALING, rms_norm_eps=1e-5),
    "qwen3": ModelConfig(family="qwen3", vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=4, num_kv_heads=1, head_dim=24,
                         rope_theta=1e6, qk_norm=True, tie_embeddings=False),
    "qwen2": ModelConfig(family="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                         qkv_bias=True, tie_embeddings=True),
}


# ------------------------------------------------------------------------------ helpers
def make_model(cfg, seed: int = 0):
  """A model whose parameters are N(0, 0.2) (norm scales 1 + N(0, 0.2)), so that logits are
  O(1) and norm scales / biases actually matter (the default init has ones and zeros).
  Built from the abstract model: no eager initialisation (slow on CPU)."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  new = []
  for path, x in flat:
    r = 0.2 * rng.standard_normal(x.shape)
    if "scale" in jax.tree_util.keystr(path):
      r = 1.0 + r
    new.append(jnp.asarray(r, x.dtype))
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


def np_params(model) -> dict:
  return jax.tree.map(lambda x: np.asarray(x, np.float64),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def np_inv_freq(cfg) -> np.ndarray:
  """RoPE inverse frequencies, written from the Llama 3.1 reference (per frequency)."""
  h = cfg.head_dim
  inv = np.array([1.0 / cfg.rope_theta ** (2 * i / h) for i in range(h // 2)])
  sc = cfg.rope_scaling
  if not sc:
    return inv
  kind = sc.get("rope_type", sc.get("type"))
  if kind == "linear":
    return inv / sc["factor"]
  assert kind == "llama3"
  factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
  old = sc["original_max_position_embeddings"]
  out = []
  for f in inv:
    wavelen = 2 * math.pi / f
    if wavelen < old / hi:  # high frequency: kept
      out.append(f)
    elif wavelen > old / lo:  # low frequency: divided by the factor
      out.append(f / factor)
    else:  # in between: interpolate
      s = (old / wavelen - lo) / (hi - lo)
      out.append((1 - s) * f / factor + s * f)
  return np.array(out)


def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x_LxNxH, pos_L, inv):
  # float32 angles, as in HF and alignjax; rotation in float64.
  ang = (pos_L.astype(np.float32)[:, None] * inv.astype(np.float32)[None]).astype(np.float64)
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  half = x_LxNxH.shape[-1] // 2
  x1, x2 = x_LxNxH[..., :half], x_LxNxH[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_forward(cfg, p, tokens, positions=None, segments=None):
  """Logits [B,L,V] in float64 from the maths (one row, one head at a time)."""
  b, l = tokens.shape
  positions = np.broadcast_to(np.arange(l), (b, l)) if positions is None else positions
  segments = np.ones((b, l), int) if segments is None else segments
  inv = np_inv_freq(cfg)
  n, k, h, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
  out = []
  for r in range(b):
    x = p["embed"][tokens[r]]  # L,D
    seg, pos = segments[r], positions[r]
    allowed = np.zeros((l, l), bool)
    for i in range(l):
      for j in range(i + 1):
        allowed[i, j] = seg[i] != 0 and seg[j] == seg[i]
    for lp in p["layers"].values():
      a = lp["attn"]
      y = np_rms(x, lp["input_norm"]["scale"], eps)
      q = np.einsum("ld,dnh->lnh", y, a["q_proj"])
      kk = np.einsum("ld,dnh->lnh", y, a["k_proj"])
      v = np.einsum("ld,dnh->lnh", y, a["v_proj"])
      if cfg.qkv_bias:
        q, kk, v = q + a["q_bias"], kk + a["k_bias"], v + a["v_bias"]
      if cfg.qk_norm:
        q = np_rms(q, a["q_norm"]["scale"], eps)
        kk = np_rms(kk, a["k_norm"]["scale"], eps)
      q, kk = np_rope(q, pos, inv), np_rope(kk, pos, inv)
      heads = []
      for head in range(n):
        kv = head // (n // k)  # GQA: consecutive query heads share a KV head
        s = q[:, head] @ kk[:, kv].T / math.sqrt(h)
        s = np.where(allowed, s, -np.inf)
        s = s - np.where(allowed.any(-1), s.max(axis=-1), 0)[:, None]
        w = np.exp(s)
        w /= np.maximum(w.sum(axis=-1, keepdims=True), 1e-300)  # padded queries: zeros
        heads.append(w @ v[:, kv])
      attn = np.stack(heads, axis=1)  # L,N,H
      x = x + np.einsum("lnh,nhd->ld", attn, a["o_proj"])
      y = np_rms(x, lp["post_attn_norm"]["scale"], eps)
      m = lp["mlp"]
      x = x + (np_silu(y @ m["gate_proj"]) * (y @ m["up_proj"])) @ m["down_proj"]
    x = np_rms(x, p["final_norm"]["scale"], eps)
    head_w = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    out.append(x @ head_w)
  return np.stack(out)


@jax.jit
def run(model, tokens, positions, segments):
  return model(tokens, positions, segments)


@jax.jit
def run_default(model, tokens):
  return model(tokens)


def tokens_for(cfg, b, l, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, l)).astype(np.int32)


# ------------------------------------------------------------------------------ forward
def test_llama3_inv_freq_regimes():
  cfg = CONFIGS["llama"]
  got = np.asarray(rope_inv_freq(cfg))
  want = np_inv_freq(cfg)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = np_inv_freq(cfg.replace(rope_scaling=None))
  kept = np.isclose(want, plain)
  divided = np.isclose(want, plain / 8)
  assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three regimes
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg.replace(rope_scaling=None))), plain,
                             rtol=1e-6)
  lin = cfg.replace(rope_scaling={"type": "linear", "factor": 4.0})
  np.testing.assert_allclose(np.asarray(rope_inv_freq(lin)), plain / 4, rtol=1e-6)
  with pytest.raises(ValueError, match="yarn"):
    rope_inv_freq(cfg.replace(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_numpy_reference(name):
  cfg = CONFIGS[name]
  model = make_model(cfg)
  b, l = 2, 12
  tokens = tokens_for(cfg, b, l)
  # Row 1 starts at position 40 so that rotary angles are large; both rows fully valid.
  positions = np.stack([np.arange(l), 40 + np.arange(l)]).astype(np.int32)
  got = np.asarray(run(model, tokens, positions, np.ones((b, l), np.int32)))
  want = np_forward(cfg, np_params(model), tokens, positions)
  assert got.dtype == np.float32 and got.shape == (b, l, cfg.vocab_size)
  assert np.abs(want).max() > 1.0  # non-trivial logits
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # Defaults (positions 0..L-1, one segment) agree with the reference too.
  got0 = np.asarray(run_default(model, jnp.asarray(tokens)))
  np.testing.assert_allclose(got0, np_forward(cfg, np_params(model), tokens), rtol=0, atol=1e-5)


def test_reference_detects_wrong_kv_grouping():
  """Guards the reference itself: permuting KV heads must change the logits."""
  cfg = CONFIGS["llama"]
  model = make_model(cfg)
  tokens = tokens_for(cfg, 1, 8)
  p = np_params(model)
  base = np_forward(cfg, p, tokens)
  for lp in p["layers"].values():
    lp["attn"]["k_proj"] = lp["attn"]["k_proj"][:, ::-1]
  assert np.abs(np_forward(cfg, p, tokens) - base).max() > 1e-3


def test_packed_sequences_equal_separate_runs():
  cfg = CONFIGS["qwen3"]
  model = make_model(cfg)
  rng = np.random.default_rng(3)
  la, lb, l = 5, 7, 16
  a = rng.integers(0, cfg.vocab_size, la)
  b = rng.integers(0, cfg.vocab_size, lb)
  tokens = np.zeros((1, l), np.int32)
  tokens[0, :la], tokens[0, la:la + lb] = a, b
  tokens[0, la + lb:] = rng.integers(0, cfg.vocab_size, l - la - lb)  # padding junk
  segments = np.array([[1] * la + [2] * lb + [0] * (l - la - lb)], np.int32)
  positions = np.array([list(range(la)) + list(range(lb)) + [0] * (l - la - lb)], np.int32)
  packed = np.asarray(run(model, tokens, positions, segments))[0]
  alone_a = np.asarray(run_default(model, jnp.asarray(a[None].astype(np.int32))))[0]
  alone_b = np.asarray(run_default(model, jnp.asarray(b[None].astype(np.int32))))[0]
  np.testing.assert_allclose(packed[:la], alone_a, rtol=0, atol=1e-5)
  np.testing.assert_allclose(packed[la:la + lb], alone_b, rtol=0, atol=1e-5)
  # Without segment ids the second sequence would see the first: a different answer.
  unsegmented = np.asarray(run(model, tokens, positions, np.ones_like(segments)))[0]
  assert np.abs(unsegmented[la:la + lb] - alone_b).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_padding_does_not_affect_real_positions(name):
  cfg = CONFIGS[name]
  model = make_model(cfg)
  l, valid = 12, 8
  tokens = tokens_for(cfg, 2, l)
  tokens[1, :valid] = tokens[0, :valid]
  tokens[1, valid:] = (tokens[0, valid:] + 1) % cfg.vocab_size  # different pad contents
  segments = np.ones((2, l), np.int32)
  segments[:, valid:] = 0
  positions = np.broadcast_to(np.arange(l, dtype=np.int32), (2, l))
  out = np.asarray(run(model, tokens, positions, segments))
  np.testing.assert_array_equal(out[0, :valid], out[1, :valid])
  assert np.isfinite(out).all()  # fully masked padded queries stay finite
  short = np.asarray(run_default(model, jnp.asarray(tokens[:1, :valid])))[0]
  np.testing.assert_allclose(out[0, :valid], short, rtol=0, atol=1e-5)
  want = np_forward(cfg, np_params(model), tokens, positions, segments)
  np.testing.assert_allclose(out[:, :valid], want[:, :valid], rtol=0, atol=1e-5)


def test_left_padding_with_shifted_positions():
  cfg = CONFIGS["llama"]
  model = make_model(cfg)
  valid, pad = 6, 3
  tokens = tokens_for(cfg, 1, valid + pad)
  segments = np.array([[0] * pad + [1] * valid], np.int32)
  positions = np.array([[0] * pad + list(range(valid))], np.int32)
  out = np.asarray(run(model, tokens, positions, segments))[0, pad:]
  alone = np.asarray(run_default(model, jnp.asarray(tokens[:, pad:])))[0]
  np.testing.assert_allclose(out, alone, rtol=0, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
  cfg = CONFIGS["llama"].replace(vocab_size=256)
  f32 = make_model(cfg)
  bf16 = make_model(cfg.replace(dtype="bfloat16"))
  p32, p16 = nnx.state(f32, nnx.Param), nnx.state(bf16, nnx.Param)
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same float32 params
    assert b.dtype == jnp.float32
  tokens = tokens_for(cfg, 4, 32)
  ref = np.asarray(run_default(f32, jnp.asarray(tokens)))
  out = run_default(bf16, jnp.asarray(tokens))
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out).all()
  scale = np.abs(ref).max()
  err = np.abs(out - ref)
  assert err.max() < 0.1 * scale, (err.max(), scale)
  assert err.mean() < 0.02 * np.abs(ref).mean()
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9
  assert err.max() > 0  # really computed in lower precision
  h = jax.jit(lambda m, t: m.hidden(t))(bf16, jnp.asarray(tokens))
  assert h.dtype == jnp.bfloat16 and bf16.unembedding().dtype == jnp.bfloat16


def _sft_loss(model, tokens, segments, loss_mask):
  h = model.hidden(tokens, None, segments)
  targets, mask = shift_targets(tokens, loss_mask)
  lp = token_logprobs(h, model.unembedding(), targets)  # one chunk: cheap to compile
  loss_sum, denom, _ = sft_cross_entropy(lp, mask)
  return loss_sum / denom


def _loss_and_grads(cfg):
  model = make_model(cfg)
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(tokens_for(cfg, 2, 12))
  segments = jnp.asarray(np.array([[1] * 12, [1] * 9 + [0] * 3], np.int32))
  loss_mask = jnp.asarray(rng.integers(0, 2, (2, 12)) * (np.asarray(segments) > 0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def f(params):
    return _sft_loss(nnx.merge(graphdef, params, rest), tokens, segments, loss_mask)

  loss, grads = jax.value_and_grad(f)(params)
  # One checkpoint per block when remat is on; the chunked log-probs are a custom_vjp.
  jaxpr = str(jax.make_jaxpr(f)(params))
  assert jaxpr.count("remat") == (cfg.num_layers if cfg.remat != "none" else 0)
  assert "custom_vjp_call" in jaxpr
  return float(loss), jax.tree.map(np.asarray, grads)


def test_remat_gives_identical_loss_and_gradients():
  cfg = CONFIGS["qwen2"]
  loss, grads = _loss_and_grads(cfg)
  leaves = jax.tree.leaves(grads)
  assert all(np.abs(g).max() > 0 for g in leaves)  # every parameter gets a gradient
  for remat in ("full", "dots"):
    loss_r, grads_r = _loss_and_grads(cfg.replace(remat=remat))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), leaves):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # bit-identical on CPU today
  with pytest.raises(ValueError, match="remat"):
    cfg.replace(remat="some")


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    CONFIGS["llama"].replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="family"):
    CONFIGS["llama"].replace(family="gpt2")
  with pytest.raises(ValueError, match="dtype"):
    CONFIGS["llama"].replace(dtype="float8")
  with pytest.raises(ValueError, match="nope"):
    get_preset("nope")
  assert get_preset("tiny", vocab_size=100).vocab_size == 100


# ------------------------------------------------------------------------------ parameters
def _abstract_params(cfg):
  model = nnx.eval_shape(lambda: init_model(cfg))
  return nnx.state(model, nnx.Param)


def _count(cfg) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(_abstract_params(cfg)))


# Published totals of the HF checkpoints (model cards / safetensors headers).
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "llama-3.2-1b": 1_235_814_400,
             "qwen3-0.6b": 596_049_920}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_matches_actual_count(name):
  cfg = get_preset(name)
  n = _count(cfg)
  assert cfg.num_params() == n
  embed = cfg.vocab_size * cfg.hidden_size
  # Without the embedding table (an untied LM head is a matmul and stays counted).
  assert cfg.num_params(include_embedding=False) == n - embed
  if name in PUBLISHED:
    assert n == PUBLISHED[name]


def test_num_params_with_bias_and_untied_head():
  cfg = CONFIGS["qwen2"].replace(tie_embeddings=False, qk_norm=True)
  assert cfg.num_params() == _count(cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["tiny", "qwen2.5-0.5b"])
def test_every_param_has_logical_axes(name):
  cfg = CONFIGS[name] if name in CONFIGS else get_preset(name)
  variables = jax.tree.leaves(_abstract_params(cfg), is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert variables
  for var in variables:
    assert isinstance(var, nnx.Param)
    names = var.get_metadata().get("logical_axes")
    assert isinstance(names, tuple), var
    assert len(names) == len(var.get_value().shape)
    assert all(n in parallel.DEFAULT_RULES for n in names), names


# ------------------------------------------------------------------------------ kernels
def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])  # 13 = L; 4 does not divide L
def test_token_logprobs_match_full_log_softmax(chunk):
  rng = np.random.default_rng(0)
  b, l, d, v = 2, 13, 16, 50
  h = rng.standard_normal((b, l, d)).astype(np.float32)
  w = rng.standard_normal((d, v)).astype(np.float32)
  t = rng.integers(0, v, (b, l)).astype(np.int32)

  @jax.jit
  def f(h, w, t):
    lp, ent = token_logprobs(h, w, t, chunk_size=chunk, with_entropy=True)
    lp_t = token_logprobs(h, w, t, chunk_size=chunk, temperature=2.0)
    # Gradient w.r.t. h of the summed log-probs.
    g = jax.grad(lambda x: token_logprobs(x, w, t, chunk_size=chunk).sum())(h)
    return lp, ent, lp_t, g

  got, ent, got_t, g = jax.tree.map(np.asarray, f(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t)))
  logits = h.astype(np.float64) @ w.astype(np.float64)
  lsm = np_log_softmax(logits)
  want = np.take_along_axis(lsm, t[..., None], -1)[..., 0]
  assert got.shape == (b, l) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, -(np.exp(lsm) * lsm).sum(-1), rtol=1e-5, atol=1e-5)
  want_t = np.take_along_axis(np_log_softmax(logits / 2.0), t[..., None], -1)[..., 0]
  np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-5)
  want_g = (np.eye(v)[t] - np.exp(lsm)) @ w.T.astype(np.float64)  # d/dh (z_y - lse(z))
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-5)


def test_token_logprobs_finite_with_huge_hidden():
  rng = np.random.default_rng(1)
  h = (1e4 * rng.standard_normal((2, 7, 8))).astype(np.float32)
  w = rng.standard_normal((8, 20)).astype(np.float32)
  t = rng.integers(0, 20, (2, 7)).astype(np.int32)
  lp_and_grad = jax.jit(jax.value_and_grad(
      lambda x: token_logprobs(x, jnp.asarray(w), jnp.asarray(t), chunk_size=3).sum()))
  got = np.asarray(jax.jit(lambda x: token_logprobs(x, jnp.asarray(w), jnp.asarray(t),
                                                    chunk_size=3))(jnp.asarray(h)))
  assert np.isfinite(got).all() and (got <= 0).all()
  logits = h.astype(np.float64) @ w
  want = np.take_along_axis(np_log_softmax(logits), t[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
  assert np.abs(want).max() > 1e3  # some targets are very unlikely: a real stress test
  total, g = lp_and_grad(jnp.asarray(h))
  assert np.isfinite(float(total)) and np.isfinite(np.asarray(g)).all()


def test_shift_targets():
  tokens = jnp.asarray([[5, 6, 7, 8]])
  mask = jnp.asarray([[0, 1, 1, 0]])
  targets, m = shift_targets(tokens, mask)
  np.testing.assert_array_equal(np.asarray(targets), [[6, 7, 8, 0]])
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 0, 0]])
  assert m.dtype == jnp.float32


def test_sft_cross_entropy_matches_numpy():
  rng = np.random.default_rng(2)
  lp = -rng.exponential(size=(3, 10)).astype(np.float32)
  mask = rng.integers(0, 2, (3, 10)).astype(np.float32)
  loss_sum, denom, metrics = sft_cross_entropy(jnp.asarray(lp), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss_sum), -(lp.astype(np.float64) * mask).sum(), rtol=1e-6)
  assert float(denom) == mask.sum()
  assert float(metrics["num_tokens"]) == mask.sum()
  np.testing.assert_allclose(float(metrics["nll_sum"]), float(loss_sum))
  # Integer / boolean masks work the same.
  assert float(sft_cross_entropy(jnp.asarray(lp), jnp.asarray(mask > 0))[0]) == float(loss_sum)


def test_sft_cross_entropy_all_zero_mask():
  lp = jnp.asarray(-np.arange(12, dtype=np.float32).reshape(2, 6))
  loss_sum, denom, metrics = sft_cross_entropy(lp, jnp.zeros((2, 6)))
  assert float(loss_sum) == 0.0 and float(denom) == 0.0
  assert all(np.isfinite(np.asarray(x)) for x in (loss_sum, denom, *metrics.values()))
  g = jax.grad(lambda x: sft_cross_entropy(x, jnp.zeros((2, 6)))[0])(lp)
  assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()


def test_sft_cross_entropy_checks_shapes():
  with pytest.raises(AssertionError):
    sft_cross_entropy(jnp.zeros((2, 5)), jnp.zeros((2, 4)))


def test_greedy_generate_on_unsharded_and_sharded_models():
  """The greedy evaluator runs on a plain model and on a mesh-sharded copy, with equal output."""
  from alignjax import parallel
  from alignjax.sampling import greedy_generate
  cfg = get_preset("tiny", vocab_size=64)
  prompts = [[3, 4, 5], [7], [9, 10, 11, 12, 13]]
  plain = greedy_generate(init_model(cfg, 1), prompts, max_new_tokens=4, pad_id=0)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = parallel.create_sharded(lambda: init_model(cfg, 1), mesh)
  assert greedy_generate(sharded, prompts, max_new_tokens=4, pad_id=0) == plain
  assert [len(x) for x in plain] == [4, 4, 4]
  # Left padding must not change a prompt's continuation.
  alone = greedy_generate(init_model(cfg, 1), [prompts[1]], max_new_tokens=4, pad_id=0)
  assert alone[0] == plain[1]
