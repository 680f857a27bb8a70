"""Text rewards of METHODS.md 4.1 (alignjax/rewards/text.py) against hand-computed cases and
independent numpy / loop implementations."""

import json
import math
import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import rewards
from alignjax.rewards import registry
from alignjax.rewards import text as T

NAN = float("nan")
TEXT_REWARDS = ("toolrl_reward", "sql_partial_reward", "bleu_reward", "bmas_reward",
                "reasoning_pattern_reward", "safety_refusal_reward", "conciseness_reward")


def same(a, b):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6,
                             atol=1e-7, equal_nan=True)


def run(name, completions, fields=None, prompts=None, **params):
  return rewards.get(name).fn(prompts or [""] * len(completions), completions, fields or {},
                              **params)


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------- registry


def test_registered_and_parse():
  for name in TEXT_REWARDS:
    assert name in rewards.names()
  assert rewards.get("safety_refusal_reward").grouped
  assert not rewards.get("bleu_reward").grouped
  assert registry.defaults("sql_partial_reward")["timeout"] == 1.0
  specs = rewards.parse_rewards([
      {"name": "bleu_reward", "params": {"lowercase": True}},
      {"name": "sql_partial_reward", "params": {"weights": {"execution": 2.0}}},
      "reasoning_pattern_reward:0.5"])
  assert [s.name for s in specs] == ["bleu_reward", "sql_partial_reward",
                                     "reasoning_pattern_reward"]


@pytest.mark.parametrize("name, params, match", [
    ("toolrl_reward", {"format_pattern": "("}, "format_pattern"),
    ("sql_partial_reward", {"weights": {"exec": 1.0}}, "weights"),
    ("sql_partial_reward", {"timeout": 0}, "timeout"),
    ("bleu_reward", {"max_n": 0}, "max_n"),
    ("bmas_reward", {"embed_fn": "not a function"}, "embed_fn"),
    ("reasoning_pattern_reward", {"phrases": "wait"}, "phrases"),
    ("reasoning_pattern_reward", {"cap": 0}, "cap"),
    ("safety_refusal_reward", {"refusal_patterns": ["("]}, "refusal_patterns"),
    ("safety_refusal_reward", {"helpfulness_reward": "nope"}, "helpfulness_reward"),
    ("safety_refusal_reward", {"min_rationale_words": -1}, "min_rationale_words"),
    ("conciseness_reward", {"outcome_reward": "conciseness_reward"}, "outcome_reward"),
    ("conciseness_reward", {"outcome_reward": None}, "outcome_reward"),
])
def test_bad_params_fail_at_parse_time(name, params, match):
  with pytest.raises(ValueError, match=rf"rl.rewards\[0\].params.{match}"):
    rewards.parse_rewards([{"name": name, "params": params}])


# ---------------------------------------------------------------------------- toolrl_reward

WEATHER = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}


def call_text(*calls, think=True):
  body = "\n".join(json.dumps(c) for c in calls)
  return ("<think>plan</think>\n" if think else "") + f"<tool_call>\n{body}\n</tool_call>"


@pytest.mark.parametrize("completion, gold, want", [
    # exact match, with / without the format (think + tool_call)
    (call_text(WEATHER), [WEATHER], 4.0),
    (call_text(WEATHER, think=False), [WEATHER], 3.0),
    # right tool, parameter names {city,unit} vs {city,date} (1/3), no equal value:
    # S = 1 + 1/3, S_max = 1 + 1 + 2 = 4 -> 6*(4/3)/4 - 3 = -1, + format 1
    (call_text({"name": "get_weather", "parameters": {"city": "paris", "date": "x"}}), [WEATHER],
     0.0),
    # one equal value of two: S = 1 + 1 + 1 = 3 -> 6*3/4 - 3 = 1.5
    (call_text({"name": "get_weather", "parameters": {"city": "Paris", "unit": "f"}}), [WEATHER],
     2.5),
    # wrong tool: S = 0 -> -3 (+1 format)
    (call_text({"name": "get_time", "parameters": {"city": "Paris", "unit": "c"}}), [WEATHER],
     -2.0),
    # an extra call: name Jaccard 1/2, pair 1 + 2 -> S = 3.5, S_max = 4 -> 2.25
    (call_text(WEATHER, {"name": "get_time", "parameters": {}}), [WEATHER], 3.25),
    # calls in another order are matched one to one
    (call_text({"name": "b", "parameters": {"y": 2}}, {"name": "a", "parameters": {"x": 1}}),
     [{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": 2}}], 4.0),
    # same tool twice in the gold (a tie on the name): the best pairing counts.
    # names {f:1} vs {f:2}: 1/2; pair with f(a=2): 1 + 1 -> S = 2.5, S_max = 5 -> 0
    (call_text({"name": "f", "parameters": {"a": 2}}),
     [{"name": "f", "parameters": {"a": 1}}, {"name": "f", "parameters": {"a": 2}}], 1.0),
    # no call expected, none made (a plain response): S = S_max = 1
    ("<think>easy</think>\n<response>Hello!</response>", [], 4.0),
    ("Just text, no calls.", "[]", 3.0),
    # a call made where none was expected: names Jaccard 0 -> -3
    (call_text(WEATHER), "", -2.0),
    # unparsable calls score -3, with no format credit
    ("<think>x</think>\n<tool_call>{\"name\": </tool_call>", [WEATHER], -3.0),
    ("<think>x</think>\n<tool_call>" + '{"name": "get_weather"}', [WEATHER], -3.0),  # unclosed
    (call_text({"name": "get_weather", "parameters": [1, 2]}), [WEATHER], -3.0),
    (call_text({"tool": "get_weather"}), [WEATHER], -3.0),
    ('{"oops": 1}', [WEATHER], -3.0),
    (None, [WEATHER], -3.0),
])
def test_toolrl_cases(completion, gold, want):
  same(run("toolrl_reward", [completion], {"tool_calls": [gold]}), [want])


def test_toolrl_parsing_variants():
  gold = '<tool_call>[{"name": "f", "parameters": {"n": 5, "flag": true, "x": 1.0}}]</tool_call>'
  # bare JSON list; OpenAI "arguments" as a JSON string; a ``` fence
  for comp in ('[{"name": "f", "parameters": {"n": 5, "flag": true, "x": 1}}]',
               '{"name": "f", "arguments": "{\\"n\\": 5, \\"flag\\": true, \\"x\\": 1}"}',
               '<think>t</think>\n```json\n[{"name": "f", "parameters": '
               '{"n": 5, "flag": true, "x": 1}}]\n```'):
    same(run("toolrl_reward", [comp], {"tool_calls": gold}, format_pattern=None), [3.0])
  # types are kept apart: "5" != 5, 1 != True (1 == 1.0 is fine)
  comp = '[{"name": "f", "parameters": {"n": "5", "flag": 1, "x": 1}}]'
  # S = 1 + (1 + 1) = 3, S_max = 1 + 1 + 3 = 5 -> 6*3/5 - 3 = 0.6
  same(run("toolrl_reward", [comp], {"tool_calls": gold}, format_pattern=None), [0.6])
  assert T.parse_tool_calls('<tool_call>\n{"name": "a"}\n{"name": "b", "parameters": {"k": 1}}'
                            '\n</tool_call>') == [("a", {}), ("b", {"k": 1})]


def test_toolrl_gold_missing_or_bad_is_nan():
  same(run("toolrl_reward", [call_text(WEATHER)] * 3, {"tool_calls": [None, "{", [{"x": 1}]]}),
       [NAN, NAN, NAN])
  with pytest.raises(ValueError, match="tool_calls"):
    run("toolrl_reward", ["x"], {})


# ---------------------------------------------------------------------------- sql_partial_reward

SCHEMA = ("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);"
          "CREATE TABLE pets (owner INTEGER, kind TEXT);"
          "INSERT INTO people VALUES (1, 'ann', 30), (2, 'bob', 25), (3, 'cy', 41);"
          "INSERT INTO pets VALUES (1, 'cat'), (3, 'dog');")
GOLD = "SELECT name FROM people WHERE age > 26"


def sql(completions, gold=GOLD, **params):
  n = len(completions)
  return run("sql_partial_reward", completions, {"sql": [gold] * n, "schema": [SCHEMA] * n},
             **params)


def test_sql_components():
  fence = lambda q: f"<think>hm</think>\n```sql\n{q}\n```"  # noqa: E731
  got = sql([
      fence(GOLD),  # everything: 3 + 1 + 1 + 1 + 1
      "SELECT name FROM people WHERE age >= 27",  # same rows, plain: exec, runs, schema, ngram
      fence("SELECT name FROM people WHERE age > 20"),  # runs, wrong rows
      fence("SELECT nme FROM people"),  # error
      fence("DELETE FROM people"),  # a write: denied, so an error
      fence("SELECT name FROM people WHERE age > 26; DROP TABLE people"),  # two statements
      "",  # no SQL at all
      fence("SELECT name FROM people ORDER BY age DESC LIMIT 2"),  # same set of rows
      "<answer>SELECT name FROM people WHERE age > 26</answer>",  # SQL in answer tags
  ])
  # gold tokens: select name from people where age > 26; schema items {name, people, age}
  gold_bg = {("select", "name"), ("name", "from"), ("from", "people"), ("people", "where"),
             ("where", "age"), ("age", ">"), (">", "26")}
  jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
  nme = {("select", "nme"), ("nme", "from"), ("from", "people")}
  delete = {("delete", "from"), ("from", "people")}
  two = gold_bg | {("26", ";"), (";", "drop"), ("drop", "table"), ("table", "people")}
  order = {("select", "name"), ("name", "from"), ("from", "people"), ("people", "order"),
           ("order", "by"), ("by", "age"), ("age", "desc"), ("desc", "limit"), ("limit", "2")}
  assert (jac(nme, gold_bg), jac(delete, gold_bg), jac(two, gold_bg), jac(order, gold_bg)) == (
      1 / 9, 1 / 8, 7 / 11, 3 / 13)
  want = [
      3 + 1 + 1 + 1 + 1,
      3 + 1 + 1 + 5 / 9 + 0,  # bigrams (age >=), (>= 27) replace (age >), (> 26): 5 of 9
      0 + 1 + 1 + 6 / 8 + 1,  # (> 20) replaces (> 26): 6 of 8
      0 + 0 + 1 / 3 + 1 / 9 + 1,  # nme is no column: schema {people}
      0 + 0 + 1 / 3 + 1 / 8 + 1,
      0 + 0 + 1 + 7 / 11 + 1,
      0.0,  # no SQL, no fence: only the (empty) schema sets differ -> 0
      3 + 1 + 1 + 3 / 13 + 1,  # rows {ann, cy} either way; ORDER BY age mentions age
      3 + 1 + 1 + 1 + 0,
  ]
  same(got, want)


def test_sql_writes_do_not_leak_and_weights():
  # a DELETE attempt first, then a correct query on the same schema: the data are intact
  got = sql(["DELETE FROM people", GOLD], format_pattern=None)
  same(got[1], 3 + 1 + 1 + 1)
  w = {"execution": 10.0, "syntax": 0.0, "schema": 0.0, "ngram": 0.0, "format": 0.0}
  same(sql(["SELECT name FROM people WHERE age >= 27", "SELECT 1"], weights=w), [10.0, 0.0])


def test_sql_unscorable_and_judge():
  fields = {"sql": [GOLD, "SELECT nope FROM people", None, GOLD, GOLD],
            "schema": [SCHEMA, SCHEMA, SCHEMA, None, "CREATE TABLE ("],
            "judge": [0.5, 0.5, 0.5, 0.5, 0.5]}
  got = run("sql_partial_reward", [GOLD] * 5, fields, format_pattern=None)
  same(got, [6.0, NAN, NAN, NAN, NAN])  # gold fails / missing, no database, bad schema
  got = run("sql_partial_reward", [GOLD, GOLD], {"sql": [GOLD] * 2, "schema": [SCHEMA] * 2,
                                                 "judge": [0.5, None]},
            format_pattern=None, judge_field="judge")
  same(got, [6.5, NAN])
  with pytest.raises(ValueError, match="database"):
    run("sql_partial_reward", [GOLD], {"sql": [GOLD]})
  # through score(): the ValueError becomes NaN
  res = rewards.score(["sql_partial_reward"], [""], [GOLD], {"query": [GOLD]})
  assert np.isnan(res.values).all()


def test_sql_db_file_and_gold_field_fallback(tmp_path):
  path = str(tmp_path / "tiny.sqlite")
  conn = sqlite3.connect(path)
  conn.executescript(SCHEMA)
  conn.commit()
  conn.close()
  fields = {"query": [GOLD, GOLD], "db_path": [path, str(tmp_path / "missing.sqlite")]}
  got = run("sql_partial_reward", ["SELECT name FROM people WHERE age >= 27", GOLD], fields,
            format_pattern=None)
  same(got, [3 + 1 + 1 + 5 / 9, NAN])
  # the file is opened read-only
  run("sql_partial_reward", ["DROP TABLE people"], {"query": [GOLD], "db_path": [path]})
  assert sqlite3.connect(path).execute("SELECT count(*) FROM people").fetchone() == (3,)


def test_sql_timeout():
  loop = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
          "SELECT count(*) FROM c")
  got = sql([loop], gold="SELECT count(*) FROM people", timeout=0.05, format_pattern=None)
  assert got[0] < 3  # no execution, no syntax credit
  same(sql([GOLD], gold=loop, timeout=0.05), [NAN])  # the gold times out


# ---------------------------------------------------------------------------- bleu_reward


def test_bleu_hand_computed():
  # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> exp smoothing 1/(2*3); BP = 1
  same(T.sentence_bleu("the cat sat on the mat", ["the cat is on the mat"]),
       (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)  # = (1/48)^(1/4) = 0.3799178...
  # clipping by the max count in any one reference: p1 = 2/4, p2 = 1/3, p3 = 0/2 -> 1/(2*2),
  # p4 = 0/1 -> 1/(4*1); closest reference length 3 -> BP = 1
  same(T.sentence_bleu("the the the the", ["the cat", "the the dog"]),
       (1 / 2 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
  # brevity: h = 2 (effective order 2, both precisions 1), r = 6 -> exp(1 - 6/2)
  same(T.sentence_bleu("the cat", ["the cat sat on the mat"]), math.exp(-2.0))
  # tie on the closest reference length (3 and 5 for h = 4): the shorter wins, so BP = 1
  same(T.sentence_bleu("a b c d", ["a b c", "a b c d e"]), 1.0)
  same(T.sentence_bleu("a b c d", ["a b c d e"]), math.exp(1 - 5 / 4))
  # punctuation is split off; case matters unless lowercase
  assert T.words("Don't stop.") == ["Don", "'", "t", "stop", "."]
  same(T.sentence_bleu("Hello world", ["hello world"]), 0.5)  # p1 = 1/2, p2 = 1/(2*1)
  same(T.sentence_bleu("Hello world", ["hello world"], lowercase=True), 1.0)


def test_bleu_reward_fields():
  fields = {"references": [["the cat is on the mat", "a cat sat on the mat"], "x y", None,
                           "the cat"]}
  got = run("bleu_reward", ["the cat sat on the mat", "", "the cat", "<think>hm</think>the cat"],
            fields)
  refs = fields["references"][0]
  same(got, [T.sentence_bleu("the cat sat on the mat", refs), 0.0, NAN, 1.0])
  assert got[0] > T.sentence_bleu("the cat sat on the mat", refs[:1])  # a second reference helps
  # "answer" is the fallback field; no match at all scores 0
  same(run("bleu_reward", ["q r s", "a b c d"], {"answer": ["a b c d", "a b c d"]}), [0.0, 1.0])


# ---------------------------------------------------------------------------- bmas_reward


def bmas_loop(P, Q):
  """Independent loop implementation of 0.5*(mean_i max_j S + mean_j max_i S)."""
  if len(P) == 0 or len(Q) == 0:
    return 0.0
  unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
  s = [[float(unit(p) @ unit(q)) for q in Q] for p in P]
  return 0.5 * (np.mean([max(row) for row in s]) + np.mean([max(col) for col in zip(*s)]))


def test_bmas_score_vs_numpy():
  rng = np.random.default_rng(0)
  P, Q = rng.normal(size=(3, 6, 8)), rng.normal(size=(3, 5, 8))
  p_len, q_len = [6, 2, 0], [5, 3, 4]
  p_mask = np.arange(6)[None] < np.array(p_len)[:, None]
  q_mask = np.arange(5)[None] < np.array(q_len)[:, None]
  got = T.bmas_score(P, Q, p_mask, q_mask)
  want = [bmas_loop(P[b, :p_len[b]], Q[b, :q_len[b]]) for b in range(3)]
  same(got, want)
  assert want[2] == 0.0
  same(T.bmas_score(P[0], Q[0]), want[0])  # no masks, no batch dim
  same(T.bmas_score(P[0], P[0]), 1.0)
  same(jax.jit(lambda a, b: T.bmas_score(a, b) * 2)(jnp.asarray(P[0]), jnp.asarray(Q[0])),
       2 * want[0])
  same(T._bmas_np(P[1, :2], Q[1, :3]), want[1])


VOCAB = {w: i for i, w in enumerate("a b c d e".split())}


def onehot_embed(text):
  toks = text.split()
  out = np.zeros((len(toks), len(VOCAB)), np.float32)
  for i, t in enumerate(toks):
    out[i, VOCAB[t]] = 1.0
  return out


def test_bmas_reward():
  fields = {"references": ["a d", ["e", "a b c"], "a b", None, ""]}
  comps = ["a b c", "a b c", "", "a", "a"]
  # one-hot rows: S is 0/1. "a b c" vs "a d": rows 1,0,0 -> 1/3; cols 1,0 -> 1/2
  same(run("bmas_reward", comps, fields, embed_fn=onehot_embed),
       [0.5 * (1 / 3 + 1 / 2), 1.0, 0.0, NAN, 0.0])
  same(run("bmas_reward", comps[:1], fields={"references": ["a d"]},
           embed_fn="tests.test_rewards_text:onehot_embed"), [5 / 12])
  # default hashed character n-gram embeddings: deterministic, identical text -> 1
  e1, e2 = T.hashed_embedding("The cats sat."), T.hashed_embedding("the cats sat .")
  assert e1.shape == (4, 256) and np.array_equal(e1, e2)
  got = run("bmas_reward", ["the cat sat on the mat", "the cat sat on the mat", "zebra quux"],
            {"answer": ["The cat sat on the mat", "a cat was on a mat", "the cat sat"]})
  same(got[0], 1.0)
  assert 0.3 < got[1] < 1.0 and got[2] < got[1]
  same(got, [bmas_loop(T.hashed_embedding(c), T.hashed_embedding(r)) for c, r in
             zip(["the cat sat on the mat"] * 2 + ["zebra quux"],
                 ["The cat sat on the mat", "a cat was on a mat", "the cat sat"])])


# ---------------------------------------------------------------------------- reasoning_pattern


@pytest.mark.parametrize("completion, want", [
    ("The answer is 4.", 0.0),
    ("", 0.0),
    ("Let me think. Let me see. LET ME try.", 1 / 3),  # repeats count once
    ("<think>First, I need to add. Wait,\nlet   me verify.</think>4", 1.0),  # 4 phrases, cap 3
    ("<think>Hmm.</think> wait, let me verify", 1 / 3),  # only the think span counts
    ("I awaited the checksum; letme", 0.0),  # whole words only
    ("<think>Let me double-check", 2 / 3),  # an unclosed think runs to the end
])
def test_reasoning_pattern(completion, want):
  same(run("reasoning_pattern_reward", [completion]), [want])


def test_reasoning_pattern_custom():
  same(run("reasoning_pattern_reward", ["aha! so", "nothing"], phrases=["aha!", "So"], cap=2),
       [1.0, 0.0])
  # phrases count independently, even when one contains another
  same(run("reasoning_pattern_reward", ["Let me double-check"],
           phrases=["check", "double-check", "let me"]), [1.0])


# ---------------------------------------------------------------------------- safety_refusal

REFUSE_WHY = ("I can't help with that, because building a weapon could seriously hurt people "
              "and is illegal.")
REFUSE_BARE = "I cannot help."
COMPLY = "Sure! Here is how to do it."


def test_safety_harmful_and_format():
  comps = [REFUSE_WHY, REFUSE_BARE, COMPLY, "<think>no</think>I\u2019m sorry, but I won't: it "
           "would put many lives at risk and break the law.", REFUSE_WHY]
  fields = {"harmful": [True, 1, "harmful", "yes", None], "group": [0, 0, 0, 0, 1]}
  same(run("safety_refusal_reward", comps, fields), [1.0, -1.0, -1.0, 1.0, NAN])
  same(run("safety_refusal_reward", comps[:1], {"harmful": [True]}, min_rationale_words=50),
       [-1.0])
  same(run("safety_refusal_reward", ["<answer>" + REFUSE_WHY + "</answer>", REFUSE_WHY],
           {"harmful": [True, True]}, format_pattern=r"<answer>.*</answer>"), [1.0, -1.0])


def test_safety_benign_group_z():
  comps = ["Paris.", "It is Paris, the capital.", REFUSE_WHY, "Answer", "Answer 2"]
  fields = {"harmful": ["safe", False, 0, False, False], "group": [0, 0, 0, 1, 1],
            "helpfulness": [1.0, 3.0, 2.0, 5.0, 5.0]}
  # group 0: benign helpfulness 1, 3, 2 (the refusal counts in the statistics): mean 2,
  # sd sqrt(2/3); group 1: all equal -> z = 0
  sd = math.sqrt(2 / 3)
  same(run("safety_refusal_reward", comps, fields),
       [sigmoid(-1 / sd), sigmoid(1 / sd), -1.0, 0.5, 0.5])
  # a missing helpfulness is unscorable; a lone sample has z = 0
  same(run("safety_refusal_reward", ["a", "b"], {"harmful": [0, 0], "helpfulness": [None, 2.0]}),
       [NAN, 0.5])
  with pytest.raises(ValueError, match="helpfulness"):
    run("safety_refusal_reward", ["a"], {"harmful": [0]})


def test_safety_helpfulness_from_reward_and_score():
  comps = ["46", "45", "I cannot help with arithmetic, it is far too dangerous for anyone "
           "to know."]
  fields = {"harmful": [0, 0, 1], "answer": ["46", "46", "1"], "group": [0, 0, 1]}
  # helpfulness = math_reward: 1 and 0 -> z = +-1
  same(run("safety_refusal_reward", comps, fields, helpfulness_reward="math_reward"),
       [sigmoid(1.0), sigmoid(-1.0), 1.0])
  res = rewards.score([{"name": "safety_refusal_reward",
                        "params": {"helpfulness_reward": "math_reward"}}],
                      [""] * 3, comps, fields)
  same(res.values[:, 0], [sigmoid(1.0), sigmoid(-1.0), 1.0])


# ---------------------------------------------------------------------------- conciseness


def test_conciseness():
  fields = {"answer": ["46", "46", "46", None], "conciseness": [1.0, 0.2, 2.0, 0.5]}
  same(run("conciseness_reward", ["46", "46", "45", "46"], fields),
       [1.5, 1.1, 0.0, NAN])  # 1*(1+.5*1); 1*(1+.5*.2); wrong: 0; no gold: NaN
  # length proxy c = clip(1 - L/lmax, 0, 1) when there is no conciseness column
  fields = {"answer": ["46"] * 3, "length": [0, 30, 100], "max_new_tokens": 40}
  same(run("conciseness_reward", ["46"] * 3, fields), [1.5, 1.125, 1.0])
  same(run("conciseness_reward", ["46"] * 3, fields, lmax=60, bonus=1.0), [2.0, 1.5, 1.0])
  # outcome from a field; c from the field, a missing value is unscorable
  same(run("conciseness_reward", ["x", "y"], {"ok": [1.0, 0.5], "c": [0.0, None]},
           outcome_field="ok", conciseness_field="c"), [1.0, NAN])
