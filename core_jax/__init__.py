"""core-jax: context-regularized personalization of text-to-image diffusion models in JAX/Flax."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchNotice(_logging.Filter):
    """transformers logs 'PyTorch was not found. Models won't be available...' when it is
    imported without torch. core-jax uses only its tokenizers (and, in tests and metrics, its
    models where torch is installed), so on a JAX-only install that line is noise. Installed
    here, before any core_jax module imports transformers; every other line passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_NoTorchNotice())
