"""Test session setup: 8 virtual CPU devices for the sharding tests, quiet logs."""

import os

# Must happen before jax is imported anywhere: the sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
