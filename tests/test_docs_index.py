"""docs/rewards_index.md lists every registered reward, transform and log-prob kernel, and its
config snippets name only registered entries with real parameters (no ghosts)."""

import ast
import importlib
import importlib.util
import os
import re

from alignjax.rewards import logprob, registry, shaping

INDEX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                     "rewards_index.md")

# Modules that register reward functions but may not be in registry's built-in list.
OPTIONAL_REWARD_MODULES = ("alignjax.rewards.logprob_rewards",)

# Names in logprob.__all__ that are not reward kernels: the model-side scorers (every name
# starting with "score_"; each kernel's row shows its scorer) and these pure helpers (log-prob
# and logit extraction, 7.6 probability / token spreading, 7.8 text stripping). Every other
# public name is a kernel and must be listed; a new helper goes here.
LOGPROB_HELPER_PREFIXES = ("score_",)
LOGPROB_HELPERS = {"sequence_logprobs_for", "verdict_logits", "p_from_logprobs", "spread_turns",
                   "strip_answer"}

SNIPPET = re.compile(r"`config\.rl\.(rewards|reward_transforms) = ([^`]*)`")


def _text():
  with open(INDEX, encoding="utf-8") as f:
    return f.read()


def _reward_names():
  for module in OPTIONAL_REWARD_MODULES:
    if importlib.util.find_spec(module) is not None:
      importlib.import_module(module)
  return [n for n in registry.names() if not n.startswith("_")]   # "_": registered by tests


def _backticked(text):
  return set(re.findall(r"`([^`\s]+)`", text))


def _kernels():
  return [n for n in logprob.__all__
          if not n.startswith(LOGPROB_HELPER_PREFIXES) and n not in LOGPROB_HELPERS]


def test_every_reward_transform_and_kernel_is_listed():
  listed = _backticked(_text())
  missing = {
      "reward functions (registry.names())": [n for n in _reward_names() if n not in listed],
      "transforms (shaping.names())": [n for n in shaping.names() if n not in listed],
      "log-prob kernels (logprob.__all__)": [n for n in _kernels() if n not in listed],
  }
  missing = {k: v for k, v in missing.items() if v}
  assert not missing, f"docs/rewards_index.md does not list (as `name`): {missing}"


def test_snippets_name_registered_entries_with_real_params():
  text = _text()
  rewards, transforms = set(_reward_names()), set(shaping.names())
  snippets = SNIPPET.findall(text)
  assert len(snippets) >= len(transforms)
  for kind, value in snippets:
    entries = ast.literal_eval(value)
    assert isinstance(entries, list) and entries, value
    for entry in entries:
      name = entry["name"]
      params = entry.get("params", {})
      if kind == "rewards":
        assert name in rewards, f"rl.rewards snippet names unregistered reward {name!r}"
        assert set(entry) <= {"name", "weight", "params", "alias"}, entry
        valid = set(registry.defaults(name))
      else:
        assert name in transforms, f"reward_transforms snippet names unknown transform {name!r}"
        assert set(entry) <= {"name", "params"}, entry
        shaping.parse_transforms([entry])  # also checks choice-valued params such as nan
        valid = set(shaping.defaults(name))
      bad = set(params) - valid
      assert not bad, f"{name}: no parameters {sorted(bad)} (valid: {sorted(valid)})"
  # Any other `"name": "X"` on the page must be registered too.
  for name in re.findall(r'"name":\s*"([^"]+)"', text):
    assert name in rewards | transforms, f"docs/rewards_index.md names unregistered {name!r}"


def test_call_snippets_use_real_functions():
  """`lpr.f(` and `tt.f(` calls on the page name public functions of those modules."""
  testtime = importlib.import_module("alignjax.testtime")
  text = _text()
  for prefix, module in (("lpr", logprob), ("tt", testtime)):
    for name in re.findall(rf"\b{prefix}\.(\w+)\(", text):
      assert hasattr(module, name) and not name.startswith("_"), f"{prefix}.{name}"
