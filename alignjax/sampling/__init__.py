"""Generation from alignjax models: the KV-cache sampler (`sampler`) and a full-recompute
greedy decoder for short evaluations (`greedy`)."""

from alignjax.sampling.greedy import greedy_generate, left_pad
from alignjax.sampling.sampler import (Sampler, SamplingConfig, Samples, filter_logits,
                                       generate)

__all__ = ["greedy_generate", "left_pad", "Sampler", "SamplingConfig", "Samples",
           "filter_logits", "generate"]
