"""Supervised fine-tuning loss: masked next-token cross-entropy."""

from __future__ import annotations

import chex
import jax.numpy as jnp


def sft_cross_entropy(logprobs_BxL, mask_BxL):
  """Negative log-likelihood of the completion tokens.

  loss_sum = -sum_t mask_t * log p(y_t);  denominator = sum_t mask_t.
  Returns `(loss_sum, denominator, metrics)`: the caller divides the sums accumulated over
  micro-batches and devices, so gradient accumulation and data parallelism are exact.
  The mean loss (token-level average, as in TRL's SFTTrainer) is loss_sum / denominator.
  """
  chex.assert_equal_shape([logprobs_BxL, mask_BxL])
  mask = mask_BxL.astype(jnp.float32)
  loss_sum = -jnp.sum(logprobs_BxL * mask)
  denom = jnp.sum(mask)
  metrics = {"nll_sum": loss_sum, "num_tokens": denom}
  return loss_sum, denom, metrics
