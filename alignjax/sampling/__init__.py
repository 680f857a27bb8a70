"""Generation from alignjax models."""

from alignjax.sampling.greedy import greedy_generate, left_pad

__all__ = ["greedy_generate", "left_pad"]
