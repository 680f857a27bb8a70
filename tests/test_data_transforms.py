"""alignjax.data.transforms: record-level transforms of METHODS section 5."""

import functools

import grain
import numpy as np
import pytest

from alignjax.data import records as records_lib
from alignjax.data import transforms as T
from alignjax.data.records import RecordError
from alignjax.losses import ensemble


def _msg(role, content):
  return {"role": role, "content": content}


def _pair(**kw):
  rec = {"id": "p1", "prompt": "2+3=", "chosen": "5", "rejected": "6", "score_chosen": 9,
         "score_rejected": 2}
  rec.update(kw)
  return rec


# --- condition_prompt / reward_augmented ----------------------------------------------------

def test_condition_prompt_placements():
  assert T.condition_prompt("Q", 8.0) == "target score: 8\nQ"      # 8.0 prints as 8
  assert T.condition_prompt("Q", 7.5, where="prefix") == "target score: 7.5\nQ"
  assert T.condition_prompt("Q", 3, where="suffix", sep=" | ") == "Q | target score: 3"
  assert T.condition_prompt("Q", 3, template="[{score:.1f}]") == "[3.0]\nQ"
  conv = [_msg("user", "a"), _msg("assistant", "b"), _msg("user", "c")]
  assert T.condition_prompt(conv, 5) == [_msg("system", "target score: 5")] + conv
  sys = [_msg("system", "Be brief.")] + conv
  assert T.condition_prompt(sys, 5)[0] == _msg("system", "Be brief.\ntarget score: 5")
  assert T.condition_prompt(conv, 5, where="prefix")[0]["content"] == "target score: 5\na"
  out = T.condition_prompt(conv, 5, where="suffix")
  assert out[2]["content"] == "c\ntarget score: 5" and out[0]["content"] == "a"
  assert conv[2]["content"] == "c"  # input not modified
  with pytest.raises(ValueError, match="no user message"):
    T.condition_prompt([_msg("system", "s")], 1, where="prefix")
  with pytest.raises(ValueError, match="where must be one of"):
    T.condition_prompt("Q", 1, where="middle")
  with pytest.raises(ValueError, match="one field named"):
    T.condition_prompt("Q", 1, template="{target}")


def test_reward_augmented_two_pairs():
  rec = _pair(margin=1.5, margin_std=0.2, source="uf", extra=[1])
  out = T.reward_augmented(rec)
  assert out == [
      {"id": "p1", "prompt": "target score: 9\n2+3=", "chosen": "5", "rejected": "6",
       "score_chosen": 9, "score_rejected": 2, "source": "uf", "extra": [1],
       "source_id": "p1", "transform": "reward_augmented:0"},
      {"id": "p1", "prompt": "target score: 2\n2+3=", "chosen": "6", "rejected": "5",
       "score_chosen": 2, "score_rejected": 9, "source": "uf", "extra": [1],
       "source_id": "p1", "transform": "reward_augmented:1"}]
  for r in out:  # pipeline-ready
    records_lib.validate_preference(r, "x", kind="pairwise")
  assert "margin" in rec  # input not modified


def test_reward_augmented_ties_conversational_and_chaining():
  assert len(T.reward_augmented(_pair(score_chosen=4, score_rejected=4.0))) == 1
  conv = {"chosen": [_msg("user", "hi"), _msg("assistant", "hello")],
          "rejected": [_msg("user", "hi"), _msg("assistant", "go")],
          "score_chosen": 5, "score_rejected": 1, "transform": "earlier"}
  out = T.reward_augmented(conv, where="suffix", index=3)
  assert out[0]["prompt"] == [_msg("user", "hi\ntarget score: 5")]
  assert out[0]["chosen"] == [_msg("assistant", "hello")]
  assert out[1]["chosen"] == [_msg("assistant", "go")]
  assert out[1]["source_id"] == 3 and out[1]["transform"] == "earlier|reward_augmented:1"
  custom = {"prompt": "q", "chosen": "a", "rejected": "b", "r_a": 1, "r_b": 0}
  out = T.reward_augmented(custom, score_fields=("r_a", "r_b"))
  assert out[1]["r_a"] == 0 and out[1]["r_b"] == 1 and out[1]["source_id"] is None


def test_reward_augmented_errors_name_record_and_field():
  with pytest.raises(RecordError, match=r"record 7 \(id 'p1'\), field 'score_rejected': "
                     r"missing; add the chosen"):
    T.reward_augmented(_pair(score_rejected=None), index=7)
  with pytest.raises(RecordError, match="field 'score_chosen': expected a number"):
    T.reward_augmented(_pair(score_chosen="high"))
  with pytest.raises(RecordError, match="field 'label'.*swap or drop"):
    T.reward_augmented(_pair(label=-1))
  with pytest.raises(RecordError, match="record id 'p1', field 'rejected': missing"):
    T.reward_augmented({k: v for k, v in _pair().items() if k != "rejected"})
  assert list(T.flat_apply(T.reward_augmented, [])) == []


# --- pair_indices / pairs_from_list ----------------------------------------------------------

def test_pair_indices_modes_and_ties():
  s = np.array([[1.0, 3.0, 3.0, 0.0],    # best 1 (tie with 2 -> lower index), worst 3
                [2.0, 2.0, 2.0, 2.0],    # all tied: dropped
                [0.5, 9.0, 0.5, 5.0]])   # worst: tie 0/2 -> 2 ranks last (stable order)
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
  bw = T.pair_indices(s, valid)
  np.testing.assert_array_equal(bw.rows, [0, 2])
  np.testing.assert_array_equal(bw.pairs, [[1, 3], [1, 2]])
  np.testing.assert_allclose(bw.gap, [3.0, 8.5])
  assert bw.pairs.dtype == np.int32 and bw.gap.dtype == np.float32
  # min_gap: the row is dropped when gap <= min_gap.
  np.testing.assert_array_equal(T.pair_indices(s, valid, min_gap=3.0).rows, [2])

  ap = T.pair_indices(s[:1], mode="all_pairs")  # rank order 1, 2, 0, 3; the tie 1-2 is no pair
  np.testing.assert_array_equal(ap.pairs, [[1, 0], [1, 3], [2, 0], [2, 3], [0, 3]])
  np.testing.assert_allclose(ap.gap, [2, 3, 2, 3, 1])
  capped = T.pair_indices(s[:1], mode="all_pairs", max_pairs=3)  # largest gaps, ties by rank
  np.testing.assert_array_equal(capped.pairs, [[1, 0], [1, 3], [2, 3]])
  assert T.pair_indices(s[:1], mode="all_pairs", min_gap=2.0).pairs.tolist() == [[1, 3], [2, 3]]

  empty = T.pair_indices(np.zeros((0, 4)))
  assert empty.rows.shape == (0,) and empty.pairs.shape == (0, 2) and empty.gap.shape == (0,)
  assert T.pair_indices([[1.0, 2.0]], [[1, 0]]).rows.size == 0  # one valid response
  with pytest.raises(ValueError, match=r"s\[0, 1\] = nan is valid"):
    T.pair_indices([[1.0, np.nan]])
  with pytest.raises(ValueError, match="min_gap must be >= 0"):
    T.pair_indices(s, min_gap=-1)
  with pytest.raises(ValueError, match="unknown mode"):
    T.pair_indices(s, mode="best")


def test_pair_indices_best_vs_random_seeded():
  s = np.tile([[5.0, 1.0, 2.0, 3.0, 5.0]], (200, 1))  # best 0; 4 ties with it: never rejected
  a = T.pair_indices(s, mode="best_vs_random", seed=3)
  b = T.pair_indices(s, mode="best_vs_random", seed=3)
  np.testing.assert_array_equal(a.pairs, b.pairs)
  assert set(a.pairs[:, 0]) == {0} and set(a.pairs[:, 1]) == {1, 2, 3}
  assert not np.array_equal(a.pairs, T.pair_indices(s, mode="best_vs_random", seed=4).pairs)
  two = T.pair_indices(s[:1], mode="best_vs_random", max_pairs=2)
  assert two.pairs.shape == (2, 2) and len(set(two.pairs[:, 1])) == 2
  assert T.pair_indices(s[:1], mode="best_vs_random", min_gap=3.5).pairs.tolist() == [[0, 1]]


def test_pairs_from_list_records():
  rec = {"id": "L1", "prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 4, 2],
         "subset": "chat"}
  (out,) = T.pairs_from_list(rec)
  assert out == {"id": "L1", "prompt": "q", "subset": "chat", "chosen": "b", "rejected": "a",
                 "score_chosen": 4.0, "score_rejected": 1.0, "gap": 3.0, "pair": [1, 0],
                 "source_id": "L1", "transform": "pairs_from_list:1>0"}
  records_lib.validate_preference(out, "x", kind="pairwise")
  allp = T.pairs_from_list(rec, mode="all_pairs", margin_field="margin")
  assert [r["pair"] for r in allp] == [[1, 2], [1, 0], [2, 0]]
  assert [r["margin"] for r in allp] == [r["gap"] for r in allp] == [2.0, 3.0, 1.0]
  ranked = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
  (r,) = T.pairs_from_list(ranked, index=5)
  assert (r["chosen"], r["rejected"], r["gap"], r["source_id"]) == ("c", "b", 2.0, 5)
  assert T.pairs_from_list({"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}) == []
  with pytest.raises(RecordError, match=r"record 2, field 'scores': expected a list of 3"):
    T.pairs_from_list({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1]}, index=2)


def test_pairs_from_list_best_vs_random_depends_on_seed_and_record_only():
  recs = [{"id": f"r{i}", "prompt": "q", "responses": list("abcdef"),
           "scores": [9, 1, 2, 3, 4, 5]} for i in range(40)]
  a = list(T.flat_apply(T.pairs_from_list, recs, mode="best_vs_random", seed=1))
  b = list(T.flat_apply(T.pairs_from_list, recs[::-1], mode="best_vs_random", seed=1))[::-1]
  assert [r["rejected"] for r in a] == [r["rejected"] for r in b]  # order-independent
  assert {r["rejected"] for r in a} == set("bcdef")
  c = list(T.flat_apply(T.pairs_from_list, recs, mode="best_vs_random", seed=2))
  assert [r["rejected"] for r in a] != [r["rejected"] for r in c]


# --- strength_filter -------------------------------------------------------------------------

def _strength_records(mu, sigma=None):
  sigma = sigma if sigma is not None else [1.0] * len(mu)
  return [{"id": i, "prompt": "q", "chosen": "a", "rejected": "b", "margin": m,
           "margin_std": s} for i, (m, s) in enumerate(zip(mu, sigma))]


def test_strength_filter_modes():
  mu = [0.5, -0.2, 0.0, 2.0, 1.0, -1.0, 0.5, 3.0, 0.1, 0.2]
  recs = _strength_records(mu, sigma=[0.1, 1, 1, 4, 0.1, 1, 2, 1, 0.1, 1])
  kept, counts = T.strength_filter(recs)
  assert [r["id"] for r in kept] == [0, 2, 3, 4, 6, 7, 8, 9] and kept[0] is recs[0]
  assert counts == {"total": 10, "kept": 8, "dropped": 2, "threshold": 0.0}
  kept, _ = T.strength_filter(recs, tau_keep=0.5)
  assert [r["id"] for r in kept] == [0, 3, 4, 6, 7]
  kept, counts = T.strength_filter(recs, mode="drop_quantile", q=0.25)
  want = np.asarray(ensemble.strength_filter(np.asarray(mu), mode="quantile", q=0.25))
  assert [r["id"] for r in kept] == list(np.flatnonzero(want))
  assert counts["threshold"] == pytest.approx(np.quantile(mu, 0.25))
  assert T.strength_filter(recs, mode="quantile", q=0.25)[0] == kept
  kept, _ = T.strength_filter(recs, mode="snr", tau_keep=1.0)  # mu / (sigma + 1e-6) >= 1
  assert [r["id"] for r in kept] == [0, 4, 7]  # 0.1 / (0.1 + 1e-6) < 1
  routed, counts = T.strength_filter(recs, mode="route", delta=0.15, tau_flip=0.1)
  want = np.asarray(ensemble.route(np.asarray(mu, np.float32), delta=0.15, tau_flip=0.1))
  assert [r["strength_route"] for r in routed] == want.tolist()
  assert counts == {"total": 10, "kept": 10, "flip": 2, "smooth": 2, "margin": 6}
  assert "strength_route" not in recs[0]
  assert T.strength_filter([], mode="drop_quantile")[0] == []
  assert T.strength_filter([])[1]["total"] == 0


def test_strength_keep_and_errors():
  recs = _strength_records([0.5, -0.1])
  assert [T.strength_keep(r) for r in recs] == [True, False]
  assert not T.strength_keep(recs[0], mode="snr", tau_keep=1.0)
  with pytest.raises(ValueError, match="needs the whole dataset"):
    T.strength_keep(recs[0], mode="drop_quantile")
  bad = recs + [{"id": "z", "prompt": "q", "chosen": "a", "rejected": "b"}]
  with pytest.raises(RecordError, match=r"record 2 \(id 'z'\), field 'margin': missing; run the "
                     "pref_strength task first"):
    T.strength_filter(bad)
  with pytest.raises(RecordError, match="field 'margin_std': missing"):
    T.strength_filter([{"margin": 1.0}], mode="snr")
  with pytest.raises(ValueError, match="unknown mode"):
    T.strength_filter(recs, mode="top")
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    T.strength_filter(recs, mode="drop_quantile", q=10)


# --- master_key_negatives --------------------------------------------------------------------

def test_first_sentence():
  assert T.first_sentence("  Let x be 3.5 units. Then y.") == "Let x be 3.5 units."
  assert T.first_sentence("Is it? Yes") == "Is it?"
  assert T.first_sentence("Step one\nStep two") == "Step one"
  assert T.first_sentence("解：设x。所以") == "解：设x。"
  assert T.first_sentence("no end") == "no end"


def _judge(n=10):
  return [{"id": f"j{i}", "prompt": f"What is {i}+{i}?", "reference": str(2 * i),
           "response": f"We add the numbers. The sum is {2 * i}.", "label": "YES",
           "source": "math"} for i in range(n)]


def test_master_key_records_probe():
  rec = _judge(3)[2]
  out = T.master_key_records(rec, keys=(":", "Solution"))
  assert [r["response"] for r in out] == [":", "Solution", "We add the numbers."]
  assert [r["master_key"] for r in out] == [":", "Solution", None]
  assert all(r["label"] == "NO" and r["source_id"] == "j2" and r["prompt"] == rec["prompt"]
             and r["reference"] == "4" and r["source"] == "math" for r in out)
  assert out[2]["transform"] == "master_key_negatives:first_sentence"
  # A first sentence holding the reference may be a correct answer: no truncation.
  leaky = dict(rec, response="The answer is 4. Because 2+2=4.")
  assert len(T.master_key_records(leaky, keys=(":",))) == 1
  one = dict(rec, response="Four.")  # the first sentence is the whole response
  assert len(T.master_key_records(one, keys=(":",), truncate_first_sentence=True)) == 1
  assert len(T.master_key_records(rec, truncate_first_sentence=False)) == len(T.DEFAULT_KEYS)
  assert set(T.MASTER_KEYS) <= set(T.DEFAULT_KEYS) and len(T.TRANSLATED_MASTER_KEYS) >= 5


def test_master_key_negatives_rate_and_determinism():
  recs = _judge(100)
  out, counts = T.master_key_negatives(recs, rate=0.15, seed=0)
  assert out[:100] == recs
  neg = out[100:]
  assert counts["added"] == len(neg) == round(100 * 0.15 / 0.85) == 18
  assert counts["share"] == pytest.approx(18 / 118)
  assert counts["master_key"] + counts["first_sentence"] == 18 and counts["first_sentence"] > 0
  assert all(r["label"] == "NO" for r in neg)
  assert all(r["response"] in T.DEFAULT_KEYS for r in neg if r["master_key"] is not None)
  assert all(r["response"] == "We add the numbers." for r in neg if r["master_key"] is None)
  assert all(r["source_id"] == r["id"] for r in neg)
  assert T.master_key_negatives(recs, rate=0.15, seed=0)[0] == out
  assert T.master_key_negatives(recs, rate=0.15, seed=1)[0] != out
  only_keys, c = T.master_key_negatives(recs, truncate_first_sentence=False, rate=0.2)
  assert c["first_sentence"] == 0 and c["added"] == 25
  assert T.master_key_negatives([]) == ([], {"records": 0, "added": 0, "master_key": 0,
                                             "first_sentence": 0, "share": 0.0})
  renamed = [{"q": r["prompt"], "ref": r["reference"], "a": r["response"], "y": 1}
             for r in recs[:10]]
  out, c = T.master_key_negatives(renamed, rate=0.5, negative_label=0,
                                  fields={"prompt": "q", "reference": "ref", "response": "a",
                                          "label": "y"})
  assert c["added"] == 10 and all(r["y"] == 0 for r in out[10:])
  assert out[10]["source_id"] == int(out[10]["source_id"])  # no id: the position


def test_master_key_negatives_errors():
  recs = _judge(3)
  recs[1] = dict(recs[1], reference=None)
  with pytest.raises(RecordError, match=r"record 1 \(id 'j1'\), field 'reference': expected a "
                     "string, got null; fix or drop"):
    T.master_key_negatives(recs)
  with pytest.raises(ValueError, match="rate is the share"):
    T.master_key_negatives(_judge(3), rate=1.0)
  with pytest.raises(ValueError, match="non-empty sequence"):
    T.master_key_negatives(_judge(3), keys=())


# --- real_data_mix / luce_curate -------------------------------------------------------------

def test_real_data_mix_rate_and_determinism():
  real = [{"id": f"r{i}"} for i in range(20000)]
  synth = [{"id": f"s{i}"} for i in range(20000)]
  out = list(T.real_data_mix(real, synth, lam=0.25, seed=0, num_draws=20000))
  assert len(out) == 20000
  frac = np.mean([r["mix_source"] == "real" for r in out])
  assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 20000)
  assert [r["id"] for r in out if r["mix_source"] == "real"][:3] == ["r0", "r1", "r2"]
  assert out == list(T.real_data_mix(real, synth, lam=0.25, seed=0, num_draws=20000))
  assert out != list(T.real_data_mix(real, synth, lam=0.25, seed=1, num_draws=20000))
  assert "mix_source" not in real[0]
  # Stops when the drawn source runs out; lam 0 / 1 use one source only.
  few = list(T.real_data_mix(real[:5], iter(synth), lam=0.5, seed=0))
  assert sum(r["mix_source"] == "real" for r in few) == 5
  assert all(r["mix_source"] == "synthetic" for r in T.real_data_mix([], synth[:50], lam=0.0))
  assert list(T.real_data_mix([1, 2], [3], lam=1.0, tag_field=None)) == [1, 2]
  assert list(T.real_data_mix([], [])) == []
  with pytest.raises(ValueError, match="lam is the probability"):
    list(T.real_data_mix(real, synth, lam=1.5))


def test_real_data_mix_dataset_matches_iterator():
  real = [{"id": f"r{i}"} for i in range(50)]
  synth = [{"id": f"s{i}"} for i in range(150)]
  ds = T.real_data_mix_dataset(real, synth, lam=0.25, seed=7)
  assert len(ds) == 200
  first = [ds[i] for i in range(60)]
  assert first == list(T.real_data_mix(real, synth, lam=0.25, seed=7, num_draws=60))
  big = T.real_data_mix_dataset(real, grain.MapDataset.source(synth), lam=0.25, seed=7,
                                length=4000)
  frac = np.mean([big[i]["mix_source"] == "real" for i in range(4000)])
  assert abs(frac - 0.25) < 0.03
  assert big[3999]["id"][0] in "rs"  # wraps around
  with pytest.raises(ValueError, match="the real data, which is empty"):
    T.real_data_mix_dataset([], synth, lam=0.5)


def test_luce_curate():
  assert T.luce_curate([1.0, 3.0, 3.0, 0.0], tau=0) == 1  # argmax, tie -> lowest index
  np.testing.assert_array_equal(T.luce_curate([[0, 2, 2], [5, 5, 1]], tau=0), [1, 0])
  assert T.luce_curate([np.nan, 1.0, 0.5], tau=0) == 1
  r = np.array([0.0, 1.0, 2.0, np.nan])
  p = T.luce_probabilities(r, tau=0.5)
  np.testing.assert_allclose(p, np.r_[np.exp([0, 2, 4]) / np.exp([0, 2, 4]).sum(), 0])
  picks = T.luce_curate(np.tile(r, (20000, 1)), tau=0.5, rng=0)
  assert picks.shape == (20000,) and 3 not in picks
  np.testing.assert_allclose(np.bincount(picks, minlength=4) / 20000, p, atol=0.015)
  np.testing.assert_array_equal(picks, T.luce_curate(np.tile(r, (20000, 1)), tau=0.5, rng=0))
  g = np.random.default_rng(1)
  assert isinstance(T.luce_curate(r, tau=1.0, rng=g), int)
  assert T.luce_curate([4.0], tau=1.0, rng=0) == 0
  with pytest.raises(ValueError, match="no finite score"):
    T.luce_curate([[1.0, 2.0], [np.nan, -np.inf]], tau=1.0)
  with pytest.raises(ValueError, match="tau must be >= 0"):
    T.luce_curate([1.0], tau=-1)


# --- grain integration -----------------------------------------------------------------------

def test_transforms_in_grain_pipelines():
  pairs = [_pair(id=f"p{i}", score_chosen=i % 3, score_rejected=0) for i in range(6)]
  ds = (grain.MapDataset.source(pairs).apply(T.RewardAugmented(where="prefix"))
        .filter(functools.partial(T.strength_keep, field="score_chosen", tau_keep=1.0)))
  got = list(ds.to_iter_dataset())
  want = [r for r in T.flat_apply(T.reward_augmented, pairs, where="prefix")
          if r["score_chosen"] >= 1]
  assert got == want and len(got) == 4

  lists = [{"id": i, "prompt": "q", "responses": ["a", "b", "c"], "scores": [i, 2, 1]}
           for i in range(4)]
  it_ds = (grain.MapDataset.source(lists).shuffle(seed=0).to_iter_dataset()
           .apply(T.PairsFromList(mode="all_pairs", max_responses=3)))
  got = list(it_ds)
  want = list(T.flat_apply(T.pairs_from_list, lists, mode="all_pairs"))
  key = lambda r: (r["id"], r["transform"])  # noqa: E731
  assert sorted(map(key, got)) == sorted(map(key, want)) and len(got) == 3 + 2 + 2 + 3
  with pytest.raises(ValueError, match="max_responses"):
    T.PairsFromList(mode="all_pairs")

  probe = grain.MapDataset.source(_judge(2)).apply(T.MasterKeyRecords(keys=(":", ".")))
  assert len(list(probe)) == 6

  mixed = T.real_data_mix_dataset(lists, pairs, lam=0.5, seed=0).shuffle(seed=1).repeat(2)
  assert len(list(mixed)) == 20
