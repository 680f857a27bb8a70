"""Log-prob rewards as `config.rl.rewards` entries (alignjax/rewards/logprob_rewards.py): each
registered reward, scored through the registry on models loaded from local paths (tiny alignjax
run workdirs and the HF fixtures), equals its definition computed independently from float64
full logits of the unpadded token sequence; bad paths name the param; models load once; an RL
step runs with `dpo_implicit` and logs it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import configlib, parallel
from alignjax.data.tokenizer import CharTokenizer, Tokenizer
from alignjax.models import hf
from alignjax.models.presets import get_preset
from alignjax.models.transformer import init_model
from alignjax.rewards import logprob_rewards as lr
from alignjax.rewards import registry
from alignjax.trainers import checkpoint, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "third_party", "hf_fixtures")
IM_SEP = "\n<|im_start|>user\n"   # the fixtures' template between an assistant eos and a user turn


def _make_run(workdir, seed):
  """A tiny alignjax SFT-run workdir (char tokenizer, `tiny` preset): config.json + one
  checkpoint of random weights (init_std 0.3, so log-probs differ visibly between seeds).
  Returns the model that was saved."""
  c = configlib.base_config("sft")
  c.model.preset, c.tokenizer.kind = "tiny", "char"
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2, sort_keys=True))
  cfg = get_preset("tiny", vocab_size=CharTokenizer().vocab_size, init_std=0.3)
  model = init_model(cfg, seed)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params = jax.tree.map(jnp.copy, nnx.state(model))   # init_state donates its input
  state = loop.init_state(params, optax.sgd(0.0), mesh, None, 0)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), c.checkpoint)
  ckpt.save(0, state, None, force=True)
  ckpt.wait()
  ckpt.close()
  return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lp_runs")
  return {name: (str(root / name), _make_run(str(root / name), seed))
          for name, seed in (("pol", 0), ("ref", 1))}


@pytest.fixture(scope="module")
def hf_models():
  return {d: hf.load_hf_model(os.path.join(FIX, d)) for d in ("llama", "qwen3")}


# ------------------------------------------------------------------- float64 references
_FWD = nnx.jit(lambda m, t: m(t))


def _full_logp_rows(model, rows):
  """float64 log_softmax of full logits [R, L, V] of unpadded rows (right-filled: causal, so
  the filler after a row does not change its logits)."""
  length = -(-max(len(r) for r in rows) // 64) * 64
  toks = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    toks[i, :len(r)] = r
  z = np.asarray(_FWD(model, jnp.asarray(toks)), np.float64)
  mx = z.max(-1, keepdims=True)
  return z - (np.log(np.exp(z - mx).sum(-1, keepdims=True)) + mx), z


def _sum_lp(model, contexts, targets):
  """sum_t log p(target_t | context, target_<t), float64, per row."""
  lp, _ = _full_logp_rows(model, [list(c) + list(t) for c, t in zip(contexts, targets)])
  return np.array([lp[i, np.arange(len(c) - 1, len(c) - 1 + len(t)), t].sum()
                   for i, (c, t) in enumerate(zip(contexts, targets))])


def _chat(tok, text):
  return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True))


def _score(entry, prompts, completions, fields=None):
  res = registry.score(registry.parse_rewards([entry]), prompts, completions, fields or {})
  return res.values[:, 0].astype(np.float64)


# ------------------------------------------------------------------------------ rewards
CHAR_PROMPTS = ["12+34=", "", "what is 5-3:"]   # row 1: a conversational record
CHAR_COMPS = ["46", "56 ok", ""]
CHAR_FIELDS = {"truncated": [False, True, False],
               "messages": [None, [{"role": "user", "content": "7*8="}], None]}


def test_dpo_implicit_equals_definition(runs):
  (pol_dir, pol), (ref_dir, ref) = runs["pol"], runs["ref"]
  tok = CharTokenizer()
  entry = {"name": "dpo_implicit", "params": {"policy": pol_dir, "ref": ref_dir, "beta": 0.5}}
  trunc = CHAR_FIELDS["truncated"]
  got = _score(entry, CHAR_PROMPTS, CHAR_COMPS, CHAR_FIELDS)
  xs = [tok.encode(p, add_bos=True) for p in CHAR_PROMPTS]
  xs[1] = tok.encode("user: 7*8=\nassistant: ")   # the char chat format, generation prompt
  ys = [tok.encode(c) + ([] if t else [tok.eos_id]) for c, t in zip(CHAR_COMPS, trunc)]
  want = 0.5 * (_sum_lp(pol, xs, ys) - _sum_lp(ref, xs, ys))
  assert np.abs(want).min() > 1e-3   # the two runs differ
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # loaded once per path; a second call reuses the cache (no reload)
  n_cached = len(lr._CACHE)
  orig, lr._build = lr._build, lambda path: pytest.fail(f"reloaded {path}")
  try:
    again = _score(entry, CHAR_PROMPTS, CHAR_COMPS, CHAR_FIELDS)
  finally:
    lr._build = orig
  np.testing.assert_array_equal(again, got)
  assert len(lr._CACHE) == n_cached and lr.load(pol_dir) is lr.load(pol_dir + "/")


def test_cdr_equals_definition(hf_models):
  tok = Tokenizer.from_dir(os.path.join(FIX, "qwen3"))
  prompts, comps = ["What is 2+2?", "Name a colour."], ["4", "Blue, like the sky."]
  prefix = "Be concise and correct. "
  entry = {"name": "cdr", "params": {"strong": os.path.join(FIX, "qwen3"),
                                     "weak": os.path.join(FIX, "llama"), "prefix": prefix}}
  got = _score(entry, prompts, comps)
  xs = [_chat(tok, prefix + p) for p in prompts]
  ys = [tok.encode(c) + [tok.eos_id] for c in comps]
  want = _sum_lp(hf_models["qwen3"], xs, ys) - _sum_lp(hf_models["llama"], xs, ys)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_flr_equals_definition(hf_models):
  path = os.path.join(FIX, "llama")
  tok = Tokenizer.from_dir(path)
  prompts, comps = ["What is 2+2?", "Say hi."], ["It is 4.", "Hi!"]
  got = _score({"name": "flr", "params": {"model": path}}, prompts, comps)
  pos, neg = lr.FLR_POSITIVE, lr.FLR_NEGATIVE
  assert len(pos) == len(neg) == 4
  fs = [tok.encode(IM_SEP + f) for f in pos + neg]
  want = []
  for p, c in zip(prompts, comps):
    ctx = _chat(tok, p) + tok.encode(c) + [tok.eos_id]
    lp = _sum_lp(hf_models["llama"], [ctx] * len(fs), fs)
    want.append(lp[:4].mean() - lp[4:].mean())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_genrm_yes_equals_definition(hf_models):
  path = os.path.join(FIX, "llama")
  tok = Tokenizer.from_dir(path)
  prompts, comps = ["What is 2+2?", "Capital of France?"], ["4", "Berlin"]
  template = "Q: {prompt}\nA: {completion}\nCorrect?"
  entry = {"name": "genrm_yes", "params": {"judge": path, "template": template,
                                           "yes": ["yes", "Yes"], "no": ["no", "No"]}}
  got = _score(entry, prompts, comps)
  yes = sorted({tok.encode(w)[0] for w in ("yes", "Yes")})
  no = sorted({tok.encode(w)[0] for w in ("no", "No")})
  rows = [_chat(tok, template.format(prompt=p, completion=c)) for p, c in zip(prompts, comps)]
  _, z = _full_logp_rows(hf_models["llama"], rows)
  lse = lambda v: v.max() + np.log(np.exp(v - v.max()).sum())
  want = [1 / (1 + np.exp(-(lse(z[i, len(r) - 1, yes]) - lse(z[i, len(r) - 1, no]))))
          for i, r in enumerate(rows)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- params
@pytest.mark.parametrize("name,param,others", [
    ("dpo_implicit", "policy", {"ref": "@run"}), ("dpo_implicit", "ref", {"policy": "@run"}),
    ("cdr", "strong", {"weak": "@run"}), ("cdr", "weak", {"strong": "@run"}),
    ("flr", "model", {}), ("genrm_yes", "judge", {})])
def test_missing_path_names_the_param(runs, tmp_path, name, param, others):
  others = {k: runs["pol"][0] if v == "@run" else v for k, v in others.items()}
  check = registry.get(name).check
  for bad in ("", str(tmp_path / "missing")):
    with pytest.raises(registry.ParamError) as e:
      check({**registry.defaults(name), **others, param: bad})
    assert e.value.param == param
  with pytest.raises(ValueError, match=rf"rl\.rewards\[0\]\.params\.{param}: .*not a directory"):
    registry.parse_rewards([{"name": name, "params": {**others,
                                                      param: str(tmp_path / "missing")}}])


def test_other_param_errors(runs, tmp_path):
  with pytest.raises(ValueError, match=r"params\.ref: .*tokenizer differs"):
    registry.parse_rewards([{"name": "dpo_implicit", "params": {
        "policy": runs["pol"][0], "ref": os.path.join(FIX, "llama")}}])
  with pytest.raises(ValueError, match=r"params\.template"):
    registry.parse_rewards([{"name": "genrm_yes", "params": {
        "judge": os.path.join(FIX, "llama"), "template": "no placeholders"}}])
  with pytest.raises(ValueError, match=r"params\.policy: .*no config\.json"):
    registry.parse_rewards([{"name": "dpo_implicit", "params": {
        "policy": str(tmp_path), "ref": runs["ref"][0]}}])
  assert "sar" not in registry.names()


# ------------------------------------------------------------------------------- RL run
def test_rl_step_with_dpo_implicit_reward(runs, tmp_path):
  from alignjax.trainers import rl
  c = configlib.load_config_file(os.path.join(REPO, "configs", "grpo.py"),
                                 "steps=1,prompts=4,group=2,max_new_tokens=4,eval_examples=0")
  c.train.progress_bar = False
  c.train.log_every = 1
  c.rl.eval_samples = 0
  c.rl.rewards = [{"name": "dpo_implicit",
                   "params": {"policy": runs["pol"][0], "ref": runs["ref"][0]}}]
  summary = rl.RLTrainer(c, str(tmp_path)).run()
  assert np.isfinite(summary["loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  vals = [r["reward/dpo_implicit"] for r in rows if "reward/dpo_implicit" in r]
  assert vals and all(np.isfinite(v) for v in vals)
