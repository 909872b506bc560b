"""Input checks shared by the clustering primitives: each failure names the argument and the problem."""

import numbers

import numpy as np
import torch

from backdoor_engine.errors import InputError


def feature_matrix(X, name: str = "X") -> np.ndarray:
    """X as a C-contiguous float32 [N, D] array with N, D >= 1 and every value finite (a torch
    tensor, on any device, is copied to the host)."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu()
    try:
        array = np.asarray(X)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{name} must be an array of shape [N, D], got {type(X).__name__}: {error}") from error
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} must have shape [N, D] with N, D >= 1, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise InputError(f"{name} must be finite, got {array[row, column]} at row {row}, column {column}")
    return array


def device_matrix(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """The checks of `feature_matrix` on a tensor where it is (a CUDA tensor stays on its GPU):
    a C-contiguous float32 [N, D] tensor."""
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{name} must have shape [N, D] with N, D >= 1, got shape {tuple(X.shape)}")
    if X.is_complex() or X.dtype == torch.bool:
        raise InputError(f"{name} must hold real numbers, got dtype {X.dtype}")
    tensor = X.detach().to(torch.float32).contiguous()
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        row, column = (int(i) for i in torch.nonzero(~finite)[0])
        raise InputError(f"{name} must be finite, got {tensor[row, column].item()} at row {row}, column {column}")
    return tensor


def integer(value, name: str, minimum: int, maximum: int | None = None) -> int:
    """value as an int in [minimum, maximum]; bools and non-integral numbers are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InputError(f"{name} must be {bound}, got {value}")
    return int(value)


def real(value, name: str, minimum: float | None = None) -> float:
    """value as a float that is not NaN and, when minimum is given, is >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or np.isnan(value):
        raise InputError(f"{name} must be a real number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return float(value)
