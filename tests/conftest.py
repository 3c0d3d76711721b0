"""Test session setup: 8 virtual CPU devices for the sharding tests, quiet logs."""

import os

# Must happen before jax is imported anywhere: the sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests compile many identical programs from fresh function objects; a persistent cache
# lets later tests (and later runs) reuse them.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
