"""Reward functions, their registry and batch scoring, and reward combinators (METHODS.md 4).

See `docs/rewards.md`. Text rewards are host functions `fn(prompts, completions, fields, **params)`
returning N floats (None / NaN = unscorable); combinators are jittable jnp functions.
"""

from __future__ import annotations

from alignjax.rewards import registry
from alignjax.rewards.basic import exact_match, format_reward, length_penalty
from alignjax.rewards.combine import reward_whiten, weighted_sum
from alignjax.rewards.math import extract_answer, math_reward
from alignjax.rewards.registry import (RewardSpec, ScoreResult, get, names, parse_rewards,
                                       register, score)

__all__ = ["registry", "exact_match", "format_reward", "length_penalty", "reward_whiten",
           "weighted_sum", "extract_answer", "math_reward", "RewardSpec", "ScoreResult", "get",
           "names", "parse_rewards", "register", "score"]
