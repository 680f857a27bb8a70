"""Tests run on CPU with 8 simulated devices (set before jax is imported)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA compilation cache shared by the test workers and the processes they spawn:
# many tests compile the same tiny-model programs (the cache keys include the jax version and
# the program, so entries never go stale). Set JAX_COMPILATION_CACHE_DIR to override.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"alignjax-test-jax-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "third_party", "hf_fixtures")


@pytest.fixture
def fixtures_dir():
  return FIXTURES
