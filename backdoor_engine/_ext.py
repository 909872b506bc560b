"""Loads the optional compiled extension backdoor_engine._C (built from csrc/ by setup.py)."""

import functools
import importlib
import warnings
from types import ModuleType


@functools.cache  # a missing extension is reported once per process, not on every kernel call
def load_extension() -> ModuleType | None:
    """The compiled extension module, or None (with a one-time warning) when it is not built."""
    try:
        return importlib.import_module("backdoor_engine._C")
    except ImportError as error:
        warnings.warn(
            f"backdoor-engine: compiled extension backdoor_engine._C is not available ({error}); "
            "using the slower PyTorch path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
