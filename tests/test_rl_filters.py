"""DAPO extras and sample selection (METHODS.md §3.5, §3.6, §5) against numpy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rl import filters
from tests.rl_helpers import groups as valid_groups, run

B, G = 7, 4


def random_rewards(seed=0):
  rng = np.random.default_rng(seed)
  r = rng.integers(0, 3, size=(B, G)).astype(float)  # many ties
  r[0] = [1, 1, 1, 1]             # no signal
  r[1] = [np.nan, 1, np.nan, 0]   # two valid, different
  r[2] = [np.nan, .5, np.nan, np.nan]  # singleton
  r[3] = np.nan                   # all unscorable
  r[4] = [2, np.nan, 2, 0]        # ties at the top and NaN
  r[5] = [.2, .2, .2, .2] if seed else [0, 1, 1, 0]
  return r


@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_sampling_filter(seed):
  r = random_rewards(seed)
  keep_std = np.array([x.size >= 2 and x.std() > 0 for _, _, x in valid_groups(r)])
  np.testing.assert_array_equal(run(filters.dynamic_sampling_filter, r), keep_std)
  singles = keep_std | np.array([x.size == 1 for _, _, x in valid_groups(r)])
  np.testing.assert_array_equal(run(filters.dynamic_sampling_filter, r, keep_singletons=True),
                                singles)
  for lo, hi in ((0.0, 1.0), (0.2, 2.0)):
    keep = np.array([x.size > 0 and lo + 1e-6 < x.mean() < hi - 1e-6
                     for _, _, x in valid_groups(r)])
    np.testing.assert_array_equal(
        run(filters.dynamic_sampling_filter, r, mode="mean_band", lo=lo, hi=hi), keep)
  # OpenRLHF's 1e-6 margin: a mean just inside (lo, hi) is still dropped.
  edge = np.array([[4e-7, 0, 0, 0], [1e-5, 0, 0, 0]])
  np.testing.assert_array_equal(run(filters.dynamic_sampling_filter, edge, mode="mean_band"),
                                [False, True])
  # Rewards of 1e6 that differ by 1 still carry signal; equal ones do not.
  big = np.array([[1e6, 1e6 + 1, 1e6, 1e6], [1e6 + .1] * 4])
  np.testing.assert_array_equal(run(filters.dynamic_sampling_filter, big), [True, False])
  with pytest.raises(ValueError, match="mode"):
    filters.dynamic_sampling_filter(r, mode="band")


def test_overlong_penalties():
  lengths = np.arange(0, 30, dtype=float)
  max_len, cache = 20, 8

  def soft(L):  # DAPO Eq. 13
    if L <= max_len - cache:
      return 0.0
    return (max_len - cache - L) / cache if L <= max_len else -1.0

  np.testing.assert_allclose(
      run(filters.overlong_soft_penalty, lengths, max_len=max_len, cache_len=cache),
      [soft(L) for L in lengths], atol=1e-7)
  buf = run(filters.overlong_buffer_penalty, lengths, max_len=max_len, buffer_len=cache,
            factor=.5)
  np.testing.assert_allclose(buf, [min(-(L - (max_len - cache)) / cache * .5, 0) for L in lengths],
                             atol=1e-7)
  inside = lengths <= max_len
  np.testing.assert_allclose(buf[inside], .5 * np.array([soft(L) for L in lengths[inside]]),
                             atol=1e-7)
  with pytest.raises(ValueError, match="cache_len"):
    filters.overlong_soft_penalty(lengths, max_len=4, cache_len=8)


def test_truncation_mask():
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
  out = run(filters.truncation_mask, mask, np.array([True, False, True]))
  np.testing.assert_array_equal(out, mask * np.array([1, 0, 1])[:, None])
  assert out.dtype == np.float32
  out = filters.truncation_mask(mask.astype(bool), np.array([0, 1, 1]))
  assert out.dtype == jnp.bool_ and not out[0].any() and out[1].all()


def np_raft(r, k=1, tau=None, eos=None):
  w = np.zeros(r.shape)
  valid = np.isfinite(r) if eos is None else np.isfinite(r) & eos.reshape(r.shape)
  for i in range(r.shape[0]):
    cand = [j for j in range(r.shape[1]) if valid[i, j]]
    cand.sort(key=lambda j: (-r[i, j], j))
    for j in cand[:k]:
      if tau is None or r[i, j] >= tau:
        w[i, j] = 1
  return w.ravel()


@pytest.mark.parametrize("seed", [0, 1])
def test_raft_weights_and_select(seed):
  r = random_rewards(seed)
  for kw in ({}, {"k": 2}, {"k": 3, "tau": 1.0}):
    ref = np_raft(r, **kw)
    w = run(filters.raft_weights, r, **kw)
    np.testing.assert_array_equal(w, ref, err_msg=str(kw))
    np.testing.assert_array_equal(filters.raft_select(r, **kw), np.flatnonzero(ref))
  assert np.all(np.sum(run(filters.raft_weights, r).reshape(B, G), axis=1)
                == (np.isfinite(r).sum(1) > 0))
  # All-tied group: index 0 (k=1) or skipped; samples without EOS are never selected.
  np.testing.assert_array_equal(filters.raft_select(r[:1]), [0])
  assert filters.raft_select(r[:1], skip_ties=True).size == 0
  eos = np.ones(B * G, bool)
  eos[[0, 5, 13]] = False
  np.testing.assert_array_equal(filters.raft_select(r, k=2, has_eos=eos),
                                np.flatnonzero(np_raft(r, k=2, eos=eos)))


@pytest.mark.parametrize("seed", [0, 1])
def test_online_dpo_pairs(seed):
  r = random_rewards(seed)
  r[6] = [.3, .9, -.2, .9] if seed else [5., -1, -1, 2]
  chosen, rejected, valid = run(filters.online_dpo_pairs, r)
  for i, v, x in valid_groups(r):
    ok = x.size >= 2 and x.max() > x.min()
    assert valid[i] == ok, i
    if ok:
      assert chosen[i] == v[np.argmax(x)] and rejected[i] == v[np.argmin(x)]
      assert r[i, chosen[i]] == x.max() and r[i, rejected[i]] == x.min()
    else:
      assert chosen[i] == rejected[i] == 0
  assert chosen.dtype == rejected.dtype == np.int32
  _, _, valid_gap = run(filters.online_dpo_pairs, r, min_gap=1.0)
  gaps = np.array([x.max() - x.min() if x.size >= 2 else 0 for _, _, x in valid_groups(r)])
  np.testing.assert_array_equal(valid_gap, valid & (gaps > 1.0))
