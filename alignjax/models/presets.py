"""Named model sizes: real architectures (weights come from a local HF checkpoint) and tiny
sizes for tests and CPU runs."""

from __future__ import annotations

from alignjax.models.config import ModelConfig

_LLAMA3_SCALING_32 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA3_SCALING_8 = dict(_LLAMA3_SCALING_32, factor=8.0)

_QWEN25 = dict(family="qwen2", qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
               max_position_embeddings=32768, head_dim=128)
_QWEN3 = dict(family="qwen3", qk_norm=True, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=40960, head_dim=128, vocab_size=151936)
_LLAMA = dict(family="llama", rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256,
              max_position_embeddings=131072)

PRESETS: dict[str, dict] = {
    # Qwen2.5
    "qwen2.5-0.5b": dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                         tie_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, tie_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4),
    # Llama 3.x
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, tie_embeddings=True,
                         rope_scaling=_LLAMA3_SCALING_32),
    "llama-3.2-3b": dict(_LLAMA, hidden_size=3072, intermediate_size=8192, num_layers=28,
                         num_heads=24, num_kv_heads=8, head_dim=128, tie_embeddings=True,
                         rope_scaling=_LLAMA3_SCALING_32),
    "llama-3.1-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128,
                         rope_scaling=_LLAMA3_SCALING_8),
    # Qwen3
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, tie_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28,
                       num_heads=16, num_kv_heads=8, tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8),
    # Sizes for CPU runs, tests and benchmarks (random init).
    "tiny": dict(family="qwen3", qk_norm=True, vocab_size=512, hidden_size=64,
                 intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 tie_embeddings=True, max_position_embeddings=2048),
    "tiny-llama": dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING_8,
                       original_max_position_embeddings=64)),
    "small": dict(family="qwen3", qk_norm=True, vocab_size=512, hidden_size=128,
                  intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=32, tie_embeddings=True),
    "100m": dict(family="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                 tie_embeddings=True),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """ModelConfig for a preset name, with field overrides (e.g. vocab_size, dtype)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)} "
                     "or load a Hugging Face checkpoint with model.hf_path.")
  return ModelConfig(**{**PRESETS[name], **overrides})
