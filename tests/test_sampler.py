"""The KV-cache sampler: consistency with the full forward (greedy and teacher-forced
log-probs), controls, stops, bucketing, and the sharded mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import parallel
from alignjax.models.presets import get_preset
from alignjax.models.transformer import init_model
from alignjax.sampling import greedy_generate
from alignjax.sampling.sampler import (GEN_BUCKETS, Sampler, SamplingConfig, bucket,
                                       filter_logits, row_bucket)

PAD = 0
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                                       23, 24, 25, 26, 27]]


def _model(mesh=None, family="tiny"):
  # A large init scale makes a random model's continuations vary (not one repeated token).
  cfg = get_preset(family, vocab_size=64, init_std=0.5)
  if mesh is None:
    return init_model(cfg, 0)
  return parallel.create_sharded(lambda: init_model(cfg, 0), mesh)


@pytest.fixture(scope="module")
def model():
  return _model()


def _teacher_forced(model, prompt, completion):
  seq = jnp.asarray([list(prompt) + list(completion)])
  logp = np.asarray(jax.nn.log_softmax(model(seq)[0].astype(jnp.float32), -1), np.float64)
  return np.array([logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion)]), logp


def test_greedy_with_cache_equals_full_recompute(model):
  out = Sampler(model, pad_id=PAD).generate(PROMPTS, SamplingConfig(max_new_tokens=12,
                                                                    temperature=0.0))
  want = greedy_generate(model, PROMPTS, max_new_tokens=12, pad_id=PAD)
  assert out.tokens.tolist() == want
  assert len({tuple(r) for r in want}) == 3 and len(set(want[0])) > 2  # not degenerate
  assert np.all(out.lengths == 12) and np.all(out.truncated)
  np.testing.assert_array_equal(out.logprobs, 0.0)                    # greedy: log 1


@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=10, temperature=1.0, n=3, seed=1),
                                 SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20,
                                                top_p=0.9, min_p=0.02, n=2, seed=2)])
def test_logprobs_match_a_teacher_forced_forward(model, cfg):
  out = Sampler(model, pad_id=PAD).generate(PROMPTS, cfg)
  assert out.tokens.shape == (3 * cfg.n, 10)
  np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(3), cfg.n))
  for r in range(len(out.tokens)):
    prompt, comp = PROMPTS[out.prompt_index[r]], out.tokens[r, :out.lengths[r]].tolist()
    tf, logp = _teacher_forced(model, prompt, comp)
    np.testing.assert_allclose(out.model_logprobs[r, :len(comp)], tf, atol=1e-4)
    # The sampling distribution: temperature, then the filters, renormalised (numpy).
    for i, tok in enumerate(comp):
      z = logp[len(prompt) - 1 + i] / cfg.temperature
      keep = np.ones_like(z, bool)
      if cfg.top_k:
        keep &= z >= np.sort(z)[-cfg.top_k]
      zk = np.where(keep, z, -np.inf)
      p = np.exp(zk - zk.max()) / np.exp(zk - zk.max()).sum()
      order = np.argsort(-p)
      before = np.cumsum(p[order]) - p[order]
      keep_p = np.zeros_like(keep)
      keep_p[order[before < cfg.top_p]] = True
      keep &= keep_p
      zk = np.where(keep, z, -np.inf)
      p = np.exp(zk - zk.max()) / np.exp(zk - zk.max()).sum()
      keep &= p >= cfg.min_p * p.max()
      assert keep[tok], (r, i)
      zk = np.where(keep, z, -np.inf)
      want = zk[tok] - zk.max() - np.log(np.exp(zk - zk.max()).sum())
      np.testing.assert_allclose(out.logprobs[r, i], want, atol=1e-4)


def test_stops_lengths_truncation_and_padding(model):
  free = Sampler(model, pad_id=PAD).generate(PROMPTS, SamplingConfig(max_new_tokens=8,
                                                                     temperature=0.0))
  stop = int(free.tokens[0, 3])                      # row 0 stops at its 4th token
  out = Sampler(model, pad_id=PAD).generate(PROMPTS, SamplingConfig(
      max_new_tokens=8, temperature=0.0, stop_ids=(stop,)))
  for r in range(3):
    row = free.tokens[r].tolist()
    n = row.index(stop) + 1 if stop in row else 8
    assert out.lengths[r] == n and out.truncated[r] == (stop not in row)
    assert out.tokens[r, :n].tolist() == row[:n]
    assert np.all(out.tokens[r, n:] == PAD) and np.all(out.model_logprobs[r, n:] == 0.0)
  assert out.lengths[0] == 4 and not out.truncated[0]
  assert out.completions()[0] == free.tokens[0, :4].tolist()


def test_seed_n_and_filters(model):
  s = Sampler(model, pad_id=PAD)
  cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n=4, seed=3)
  a, b = s.generate(PROMPTS, cfg), s.generate(PROMPTS, cfg)
  np.testing.assert_array_equal(a.tokens, b.tokens)                  # reproducible
  c = s.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=1.0, n=4, seed=4))
  assert not np.array_equal(a.tokens, c.tokens)
  assert len({tuple(r) for r in a.tokens[:4]}) > 1                   # n samples differ
  greedy = s.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.0))
  top1 = s.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=1.5, top_k=1, n=2))
  np.testing.assert_array_equal(top1.tokens[::2], greedy.tokens)
  np.testing.assert_array_equal(top1.logprobs, 0.0)                  # one token left: log 1


def test_filter_logits_against_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 50)).astype(np.float32) * 3
  out = np.asarray(filter_logits(jnp.asarray(z), top_k=7))
  assert np.all(np.isfinite(out).sum(-1) == 7)
  assert np.all(np.isfinite(out) == (z >= np.sort(z, -1)[:, -7:-6]))
  out = np.asarray(filter_logits(jnp.asarray(z), top_p=0.5))
  for row, o in zip(z, out):
    p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    order = np.argsort(-p)
    k = np.searchsorted(np.cumsum(p[order]), 0.5) + 1               # smallest set reaching .5
    assert set(np.nonzero(np.isfinite(o))[0]) == set(order[:k])
  out = np.asarray(filter_logits(jnp.asarray(z), min_p=0.1))
  p = np.exp(z - z.max(-1, keepdims=True))
  np.testing.assert_array_equal(np.isfinite(out), p >= 0.1 * p.max(-1, keepdims=True))


def test_logits_processor_hook(model):
  """A processor that bans the greedy choice changes it; it sees the step and the tokens."""
  s = Sampler(model, pad_id=PAD)
  greedy = s.generate(PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0.0))
  banned = int(greedy.tokens[0, 0])
  seen = []

  def ban(logits, step, generated):
    seen.append((step.shape, generated.shape))
    return logits.at[:, banned].set(-jnp.inf)

  out = s.generate(PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0.0), processor=ban)
  assert not np.any(out.tokens == banned) and seen[0] == ((), (4, 8))  # 3 rows -> 4
  # The model log-probs stay those of the unmodified model.
  tf, _ = _teacher_forced(model, PROMPTS[0], out.tokens[0].tolist())
  np.testing.assert_allclose(out.model_logprobs[0], tf, atol=1e-4)


def test_bucketing_bounds_compiles(model):
  s = Sampler(model, pad_id=PAD)
  cfg = SamplingConfig(max_new_tokens=5, temperature=0.0)
  s.generate([[1, 2, 3]], cfg)
  s.generate([[1, 2, 3, 4, 5, 6, 7]], cfg)                           # same prompt bucket (16)
  s.generate([[1, 2]], SamplingConfig(max_new_tokens=7, temperature=0.0))  # same gen bucket
  assert s.num_compiles == 1
  s.generate([list(range(1, 21))], cfg)                              # prompt bucket 32
  assert s.num_compiles == 2
  assert bucket(5, GEN_BUCKETS) == 8 and bucket(9000, GEN_BUCKETS) == 16384
  assert [row_bucket(n) for n in (1, 2, 3, 5, 64, 65, 200)] == [1, 2, 4, 8, 64, 128, 256]


def test_sharded_sampler_equals_single_device(model):
  """On an 8-device mesh (batch over data x fsdp, kv heads over tensor) the sampler gives
  the single-device tokens and log-probs."""
  cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=5)
  want = Sampler(model, pad_id=PAD).generate(PROMPTS, cfg)
  for sizes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}):
    mesh = parallel.make_mesh(sizes)
    sharded = _model(mesh)
    s = Sampler(sharded, pad_id=PAD)
    assert s.mesh is mesh or dict(s.mesh.shape) == dict(mesh.shape)
    got = s.generate(PROMPTS, cfg)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.model_logprobs, want.model_logprobs, atol=1e-4)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    greedy = s.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert greedy.tokens.tolist() == greedy_generate(sharded, PROMPTS, max_new_tokens=8,
                                                     pad_id=PAD)


def test_config_errors(model):
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    Sampler(model, pad_id=PAD).generate([[1], []], SamplingConfig(max_new_tokens=2))


def test_sync_reuses_programs_and_follows_new_weights(model):
  s = Sampler(model, pad_id=PAD)
  cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
  before = s.generate(PROMPTS, cfg)
  other = init_model(model.cfg, 7)
  got = s.sync(other).generate(PROMPTS, cfg)
  assert s.num_compiles == 1
  assert got.tokens.tolist() == greedy_generate(other, PROMPTS, max_new_tokens=6, pad_id=PAD)
  assert got.tokens.tolist() != before.tokens.tolist()
  with pytest.raises(ValueError, match="structure differs"):
    s.sync(init_model(dataclasses.replace(model.cfg, num_layers=1)))
