"""`benchmarks/torch_reference.py` (the PyTorch CoRe step), loaded the one way all its users do.

The script lives in the source checkout, outside the installed package, and imports torch,
diffusers and transformers. The bench (`--vs-torch`) and the parity tests load it with
`load_torch_reference()`: by path from this checkout, whatever the working directory and
sys.path, once per process (as module `core_jax_torch_reference`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TORCH_REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_reference.py"
MODULE_NAME = "core_jax_torch_reference"


def load_torch_reference() -> ModuleType:
    """The module `benchmarks/torch_reference.py` of this source checkout."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    if not TORCH_REFERENCE.exists():
        raise FileNotFoundError(
            f"{TORCH_REFERENCE} is missing: the PyTorch reference is in a source checkout of "
            "core-jax (with torch, diffusers and transformers installed), not in the package"
        )
    spec = importlib.util.spec_from_file_location(MODULE_NAME, TORCH_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return module
