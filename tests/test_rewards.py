"""Reward functions, registry, scoring and combinators (METHODS.md 4.1-4.3) against hand-made cases
and independent numpy / loop implementations of the formulas."""

import logging
import math

import jax
import ml_collections
import numpy as np
import pytest

from alignjax import rewards
from alignjax.data.synthetic import ArithmeticSource
from alignjax.rewards import combine, registry
from alignjax.rewards import math as rmath

NAN = float("nan")


def same(a, b):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5,
                             atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\sqrt{\frac{a}{b}}} done", r"\sqrt{\frac{a}{b}}"),  # nested, last
    (r"\fbox{7}", "7"),
    (r"\boxed {8}", "8"),
    (r"\boxed{2} and a cut-off \boxed{3", "2"),  # unclosed last marker skipped
    (r"only \boxed{3", None),  # every marker unclosed: no answer, no fallback
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("#### -5 then #### 6", "6"),
    (r"\boxed{9} beats #### 4", "9"),
    ("46", "46"),
    ("The answer is -3.5 apples", "-3.5"),
    ("step 1, 2, 3: total 1,234,567.", "1,234,567"),
    ("half: 1/2", "1/2"),
    (r"-\frac{1}{2}", r"-\frac{1}{2}"),
    ("5-3", "3"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, want):
  assert rewards.extract_answer(text) == want


def test_extract_answer_fallback_none():
  assert rewards.extract_answer("it is 46", fallback="none") is None
  assert rewards.extract_answer("#### 46", fallback="none") == "46"
  with pytest.raises(ValueError, match="fallback"):
    rewards.extract_answer("1", fallback="first")


@pytest.mark.parametrize("pred, gold, want", [
    ("46", "46", True), ("46.0", "46", True), ("45", "46", False),
    ("1,000", "1000", True), ("$5", "5", True), (r"\$5", "5", False),  # "\5" is not a number
    (r"\frac{3}{2}", "1.5", True), (r"\dfrac{3}{2}", "3/2", True), (r"\frac12", "0.5", True),
    (r"-\frac{1}{2}", "-0.5", True), ("-0.5", "0.5", False),
    ("0.3333", "1/3", True), ("0.333", "1/3", False),  # 1e-6 + 1e-4*|g| tolerance
    ("46.004", "46", True), ("46.005", "46", False),
    ("10001", "10000", False),  # two integers compare exactly (no 1e-4 relative slack)
    (r"5\text{ cm}", "5", True), ("5 apples", "5", True), ("x = 3", "3", True),
    (r"\text{(B)}", "(B)", True), (r"90^\circ", "90", True), (r"50\%", "50", True),
    (r"\left(1,2\right)", "(1, 2)", True), ("{7}", "7", True), ("7.", "7", True),
    (r"\pi", r"\pi", True), ("1/0", "1/0", True), ("1/0", "2/0", False),
])
def test_answers_match(pred, gold, want):
  assert rmath.answers_match(pred, gold) is want


def test_math_reward_cases():
  completions = ["#### 72", r"\boxed{72}", "71", "no answer", "72", "72", "72",
                 r"\boxed{\frac{1}{2}}", "3", "b"]
  golds = ["Natalia ... #### 72", "72", "72", "72", None, "", r"\boxed{72", "0.5", ["2", "3"], 7]
  got = rewards.math_reward([""] * 10, completions, {"answer": golds})
  same(got, [1, 1, 0, 0, NAN, NAN, NAN, 1, 1, 0])


def test_math_reward_gold_field_order():
  f = {"answer": ["1", None], "completion": ["2", "2"], "solution": [r"\boxed{3}", r"\boxed{3}"]}
  same(rewards.math_reward(["", ""], ["1", "2"], f), [1, 1])  # None answer -> completion
  same(rewards.math_reward(["", ""], ["3", "3"], {"solution": f["solution"]}), [1, 1])
  same(rewards.math_reward(["", ""], ["3", "2"], f, answer_field="solution"), [1, 0])
  with pytest.raises(ValueError, match="target"):
    rewards.math_reward([""], ["1"], {"answer": ["1"]}, answer_field="target")


def test_math_reward_arithmetic_task():
  src = ArithmeticSource(0, "train", ops="+-*")
  recs = [src[i] for i in range(40)]
  fields = {"prompt": [r["prompt"] for r in recs], "completion": [r["completion"] for r in recs]}
  prompts = fields["prompt"]
  assert prompts[0].endswith("=") and all(p[-1] == "=" for p in prompts)
  same(rewards.math_reward(prompts, fields["completion"], fields), np.ones(40))
  wrong = [str(int(c) + 1) for c in fields["completion"]]
  same(rewards.math_reward(prompts, wrong, fields), np.zeros(40))
  same(rewards.exact_match(prompts, [" " + c for c in fields["completion"]], fields), np.ones(40))


# ---------------------------------------------------------------------------- basic rewards


def test_format_reward():
  comps = ["<think>a\nb</think>\n<answer>4</answer>", "<think>x</think><answer>4</answer> ",
           "<answer>4</answer>", "pre <think>x</think><answer>4</answer>",
           "<think></think> <answer></answer>"]
  same(rewards.format_reward([""] * 5, comps, {}), [1, 0, 0, 0, 1])
  same(rewards.format_reward([""] * 2, ["ab", "abc"], {}, pattern="a."), [1, 0])  # fullmatch


def linear_ref(L, l0, lmax, a):
  L = np.asarray(L, np.float64)
  return -a * np.maximum(0.0, L - l0) / (lmax - l0)


def test_length_penalty_linear():
  L = [0, 5, 10, 40, 64, 70]
  same(rewards.length_penalty([""] * 6, [""] * 6, {"length": L, "max_new_tokens": 64}),
       linear_ref(L, 0, 64, 1.0))
  same(rewards.length_penalty([""] * 6, [""] * 6, {"length": L}, l0=10, lmax=50, coef=0.5),
       linear_ref(L, 10, 50, 0.5))
  same(rewards.length_penalty([""] * 2, [""] * 2, {"length": [3, None], "max_new_tokens": [4, 8]}),
       [-0.75, NAN])
  with pytest.raises(ValueError, match="max_new_tokens"):
    rewards.length_penalty([""], [""], {"length": [3]})


def kimi_ref(L, groups, correct):
  out = np.zeros(len(L))
  for g in set(groups):
    idx = [i for i in range(len(L)) if groups[i] == g]
    lo, hi = min(L[i] for i in idx), max(L[i] for i in idx)
    for i in idx:
      if hi == lo:
        continue
      lam = 0.5 - (L[i] - lo) / (hi - lo)
      out[i] = lam if correct[i] else min(0.0, lam)
  return out


def test_length_penalty_group():
  L = [10, 20, 30, 40, 7, 7, 7, 5, 9]
  groups = [0, 0, 0, 0, 1, 1, 1, 2, 2]
  correct = [1, 0, 1, 0, 1, 0, 1, 0, 1]
  f = {"length": L, "group": groups, "ok": correct}
  got = rewards.length_penalty([""] * 9, [""] * 9, f, mode="group", correct_field="ok")
  same(got, kimi_ref(L, groups, correct))
  same(got[:4], [0.5, 0.0, -1 / 6, -0.5])  # a wrong answer never gains (min(0, 1/6))
  # correctness from math_reward (the default correct_reward)
  comps = ["4", "5", "4", "5", "4", "5", "4", "5", "4"]
  f2 = {"length": L, "group": groups, "answer": ["4"] * 9}
  same(rewards.length_penalty([""] * 9, comps, f2, mode="group", coef=2.0),
       2 * kimi_ref(L, groups, [c == "4" for c in comps]))
  # unknown correctness -> NaN, except in an all-equal group (0 whatever the correctness)
  f3 = {"length": [1, 2, 3, 3], "group": [0, 0, 1, 1], "ok": [NAN, 1.0, None, 0.0]}
  same(rewards.length_penalty([""] * 4, [""] * 4, f3, mode="group", correct_field="ok"),
       [NAN, -0.5, 0.0, 0.0])


def test_exact_match():
  f = {"answer": [" 46", "46", None, ["a", "b"]]}
  same(rewards.exact_match([""] * 4, ["46 ", "046", "46", "b"], f), [1, 0, NAN, 1])


# ---------------------------------------------------------------------------- combinators


def wsum_ref(v, w, nan):
  out = []
  for row in v:
    terms = [wk * x for wk, x in zip(w, row) if not (nan == "skip" and math.isnan(x))]
    out.append(NAN if not terms else sum(terms))
  return np.array(out)


def test_weighted_sum():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(6, 3))
  v[1, 0] = v[2, :2] = v[3, :] = NAN
  w = np.array([1.0, 0.5, -2.0])
  for nan in ("skip", "propagate"):
    same(rewards.weighted_sum(v, w, nan=nan), wsum_ref(v, w, nan))
  assert np.isnan(np.asarray(rewards.weighted_sum(v, w)))[3]
  jitted = jax.jit(lambda v, w: combine.weighted_sum(v, w, nan="skip"))  # nests in a jit
  same(jitted(v, w), wsum_ref(v, w, "skip"))
  with pytest.raises(ValueError, match="nan must be"):
    rewards.weighted_sum(v, w, nan="zero")
  with pytest.raises(AssertionError):
    rewards.weighted_sum(v, w[:2])


def whiten_ref(r, valid, eps, ddof):
  r = np.asarray(r, np.float64)
  ok = ~np.isnan(r) & valid
  x = r[ok]
  out = r.copy()
  if len(x) == 0:
    return out
  d = x - x.mean()
  out[ok] = d / (x.std(ddof=ddof) + eps) if len(x) >= 2 else d
  return out


def test_reward_whiten():
  rng = np.random.default_rng(1)
  r = rng.normal(size=9) * 3 + 1
  r[[2, 5]] = NAN
  valid = np.ones(9, bool)
  valid[7] = False
  for ddof in (0, 1):
    same(rewards.reward_whiten(r, eps=1e-8, ddof=ddof), whiten_ref(r, np.ones(9, bool), 1e-8, ddof))
    same(rewards.reward_whiten(r, valid, ddof=ddof), whiten_ref(r, valid, 1e-8, ddof))
  jitted = jax.jit(lambda r, valid: combine.reward_whiten(r, valid, ddof=1))
  same(jitted(r, valid), whiten_ref(r, valid, 1e-8, 1))
  # single valid element: only centred (0); none valid: unchanged; ties give exactly 0
  same(rewards.reward_whiten([NAN, 3.0, NAN]), [NAN, 0.0, NAN])
  same(rewards.reward_whiten([NAN, 3.0], [True, False]), [NAN, 3.0])
  tie = np.asarray(rewards.reward_whiten(np.full(7, 0.1)))
  assert (tie == 0).all()
  # per-group whitening along the last axis
  rg = rng.normal(size=(3, 4))
  rg[1, 1:] = NAN
  got = rewards.reward_whiten(rg, axis=-1, ddof=1)
  same(got, np.stack([whiten_ref(row, np.ones(4, bool), 1e-8, 1) for row in rg]))


# ---------------------------------------------------------------------------- registry and score


@registry.register("_test_fragile")
def _fragile(prompts, completions, fields, *, bad="boom"):
  if any(c == bad for c in completions):
    raise RuntimeError(f"cannot score {bad!r}")
  return [None if c == "none" else math.inf if c == "inf" else float(len(c)) for c in completions]


@registry.register("_test_wrong_length")
def _wrong_length(prompts, completions, fields):
  return [1.0] * (len(completions) + 1)


@registry.register("_test_group_sum", grouped=True)
def _group_sum(prompts, completions, fields):
  if "boom" in completions:
    raise RuntimeError("group has boom")
  g = fields["group"]
  return [float(sum(1 for h in g if h == x)) for x in g]  # group size: needs the whole group


def test_score_isolates_failures(caplog):
  comps = ["ab", "boom", "none", "inf", "4444", "boom"]
  specs = rewards.parse_rewards([{"name": "_test_fragile", "weight": 2.0}, "math_reward"])
  fields = {"answer": ["2", "2", "2", "2", "4444", "x"], "length": [1, 2, 3, 4, 5, 6]}
  registry._WARNED.discard("_test_fragile")
  with caplog.at_level(logging.WARNING):
    res = rewards.score(specs, [""] * 6, comps, fields)
    rewards.score(specs, [""] * 6, comps, fields)
  assert res.names == ("_test_fragile", "math_reward")
  assert res.values.dtype == np.float32 and res.values.shape == (6, 2)
  same(res.values[:, 0], [2, NAN, NAN, NAN, 4, NAN])
  same(res.values[:, 1], [0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(res.unscorable_counts, [4, 0])
  same(res.weights, [2.0, 1.0])
  warned = [r for r in caplog.records if "_test_fragile" in r.getMessage()]
  assert len(warned) == 1 and "cannot score 'boom'" in warned[0].getMessage()
  m = res.metrics()
  assert m["num_unscorable/_test_fragile"] == 4 and m["reward/math_reward"] == pytest.approx(1 / 6)


def test_score_grouped_retry():
  res = rewards.score(["_test_group_sum"], [""] * 5, ["a", "b", "boom", "c", "d"],
                      {"group": [0, 0, 1, 1, 2]})
  same(res.values[:, 0], [2, 2, NAN, NAN, 1])


def test_score_errors():
  with pytest.raises(ValueError, match=r"'_test_wrong_length'.*returned 4 values for a batch of 3"):
    rewards.score("_test_wrong_length", ["a"] * 3, ["a"] * 3, {})
  with pytest.raises(ValueError, match=r"fields\['answer'\] has 2 entries for 3"):
    rewards.score("math_reward", ["a"] * 3, ["a"] * 3, {"answer": ["1", "2"]})
  with pytest.raises(ValueError, match="3 prompts but 2 completions"):
    rewards.score("math_reward", ["a"] * 3, ["a"] * 2, {})


def test_parse_rewards_formats():
  specs = rewards.parse_rewards(" math_reward, format_reward:0.5 ")
  assert [(s.name, s.weight, s.params) for s in specs] == [("math_reward", 1.0, {}),
                                                           ("format_reward", 0.5, {})]
  cfg = ml_collections.ConfigDict()
  cfg.rl = ml_collections.ConfigDict()
  cfg.rl.rewards = [{"name": "math_reward", "weight": 1.0, "params": {"fallback": "none"}},
                    {"name": "length_penalty", "weight": 0.1, "alias": "short",
                     "params": ml_collections.ConfigDict({"mode": "group"})},
                    "exact_match"]
  specs = rewards.parse_rewards(cfg.rl.rewards)
  assert [s.name for s in specs] == ["math_reward", "short", "exact_match"]
  assert specs[1].reward == "length_penalty" and specs[1].params == {"mode": "group"}
  assert specs[1].grouped and specs[1].weight == pytest.approx(0.1)
  assert rewards.parse_rewards([]) == [] and rewards.parse_rewards("") == []


@pytest.mark.parametrize("config, match", [
    ("math_reward,nope", r"rl\.rewards\[1\]\.name: unknown reward 'nope'.*math_reward"),
    ([{"name": "math_reward"}, {"name": "format_reward", "params": {"foo": 1}}],
     r"rl\.rewards\[1\]\.params\.foo: format_reward has no parameter 'foo'.*pattern"),
    ([{"name": "math_reward", "wieght": 2}], r"rl\.rewards\[0\]\.wieght: unknown key.*weight"),
    ([{"weight": 2}], r"rl\.rewards\[0\]: missing 'name'.*math_reward"),
    ([{"name": "math_reward", "weight": "1"}], r"rl\.rewards\[0\]\.weight: expected a finite"),
    ([{"name": "length_penalty", "params": {"mode": "log"}}],
     r"rl\.rewards\[0\]\.params\.mode: must be one of \('linear', 'group'\)"),
    ([{"name": "length_penalty", "params": {"l0": 10, "lmax": 5}}],
     r"rl\.rewards\[0\]\.params\.lmax"),
    ([{"name": "format_reward", "params": {"pattern": "("}}], r"rl\.rewards\[0\]\.params\.pattern"),
    ([{"name": "math_reward", "params": {"fallback": "first"}}], r"params\.fallback"),
    ("math_reward,math_reward", r"rl\.rewards\[1\]: reward 'math_reward' appears twice.*alias"),
    (3, r"rl\.rewards: expected"),
    ("math_reward:heavy", r"rl\.rewards\[0\]: expected 'name' or 'name:weight'"),
])
def test_parse_rewards_errors(config, match):
  with pytest.raises(ValueError, match=match):
    rewards.parse_rewards(config)


def test_register_and_get():
  @rewards.register("_test_len")
  def _len(prompts, completions, fields, *, scale=1.0):
    return [scale * len(c) for c in completions]

  assert "_test_len" in rewards.names() and rewards.get("_test_len").fn is _len
  assert registry.defaults("_test_len") == {"scale": 1.0}
  res = rewards.score([{"name": "_test_len", "params": {"scale": 2}}], ["p"], ["abc"])
  same(res.values, [[6.0]])
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("_test_len")(lambda p, c, f: [0.0] * len(c))
  with pytest.raises(ValueError, match=r"Unknown reward 'nope'.*exact_match"):
    rewards.get("nope")
