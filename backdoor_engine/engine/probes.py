"""Probes: hooks that read what detectors need during the model's own forward pass.

FLARE's feature is read at the input of every BatchNorm2d by a forward pre-hook that computes the
per-channel BN minima (`kernels.bn_minima`) and returns nothing, so the model computes exactly what
it computes without probes: no module is swapped and the model is not copied (the official code
deep-copies it and replaces every BN). The official code fixes eps at 1e-5, BatchNorm2d's default;
we use each module's own `eps`, the variance its normalisation really uses.

Penultimate features and logits come from the same pass: the input and output of the classifier
head (`head` on the reference models, any module name on others).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from backdoor_engine.engine.feature_set import CAPTURES
from backdoor_engine.engine.layout import FeatureLayout
from backdoor_engine.errors import InputError
from backdoor_engine.kernels import BN_MINIMA_BACKENDS, bn_minima_for_layer


def check_capture(capture: Iterable[str]) -> tuple[str, ...]:
    """`capture` as a tuple in CAPTURES order; InputError on unknown, repeated or no names."""
    if isinstance(capture, str):
        capture = (capture,)
    names = list(capture)
    unknown = [name for name in names if name not in CAPTURES]
    if unknown or not names or len(set(names)) != len(names):
        raise InputError(f"capture must name each of {CAPTURES} at most once and at least one, got {tuple(names)}")
    return tuple(name for name in CAPTURES if name in names)


class ActivationProbes:
    """Context manager: attaches the hooks on enter and removes them on exit, also after an error.

        with ActivationProbes(model, capture=("bn_minima", "logits")) as probes:
            model(images)
            batch = probes.collect()   # {"bn_minima": [N, sum C] float32, "logits": [N, K] float32}

    Every BatchNorm2d must run exactly once per forward pass (a shared or skipped BN would make
    the columns ambiguous); collect() checks it and resets for the next batch.
    """

    def __init__(self, model: nn.Module, *, capture: Iterable[str] = ("bn_minima",), head: str = "head",
                 backend: str = "auto"):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch nn.Module, got {type(model).__name__}")
        if backend not in BN_MINIMA_BACKENDS:
            raise InputError(f"backend must be one of {BN_MINIMA_BACKENDS}, got {backend!r}")
        self.capture = check_capture(capture)
        self.backend = backend
        self._model = model
        self._norms = _batchnorm_layers(model) if "bn_minima" in self.capture else []
        self.layout = FeatureLayout(tuple(name for name, _ in self._norms),
                                    tuple(bn.num_features for _, bn in self._norms)) if self._norms else None
        wants_head = "penultimate" in self.capture or "logits" in self.capture
        self.head_name = head
        self._head = _named_module(model, head) if wants_head else None
        self._handles = []
        self._reset()

    def __enter__(self) -> ActivationProbes:
        self._reset()
        for index, (name, norm) in enumerate(self._norms):
            layer_minima = bn_minima_for_layer(norm.running_mean, norm.running_var, norm.eps, backend=self.backend)
            self._handles.append(norm.register_forward_pre_hook(self._minima_hook(index, name, layer_minima)))
        if self._head is not None:
            self._handles.append(self._head.register_forward_hook(self._head_hook))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset()

    def collect(self) -> dict[str, torch.Tensor]:
        """What the last forward pass captured, each [N, columns] float32 on the model's device."""
        if not self._handles:
            raise InputError("collect() needs the probes attached: use them as a context manager")
        captured = {}
        if self._norms:
            missing = [name for (name, _), value in zip(self._norms, self._minima) if value is None]
            if missing:
                raise InputError(f"BatchNorm2d layer(s) {missing} did not run in the forward pass; "
                                 "FLARE reads every BatchNorm2d of the model once per pass")
            minima = torch.cat(self._minima, dim=1)
            # One check for all layers (per layer it cost more than the kernel on small batches).
            finite = torch.isfinite(minima).all(dim=0)
            if not bool(finite.all()):
                name = self.layout.layer_of_column(int((~finite).nonzero()[0, 0]))
                raise InputError(f"BatchNorm2d {name!r}: the BN-minima feature is NaN or infinite (its input "
                                 "holds NaN/inf or activations too far from the running statistics for float32)")
            captured["bn_minima"] = minima
        if self._head is not None:
            if self._head_io is None:
                raise InputError(f"head module {self.head_name!r} did not run in the forward pass")
            penultimate, logits = self._head_io
            if "penultimate" in self.capture:
                captured["penultimate"] = penultimate
            if "logits" in self.capture:
                captured["logits"] = logits
        self._reset()
        return captured

    def _reset(self) -> None:
        self._minima = [None] * len(self._norms)
        self._head_io = None

    def _minima_hook(self, index: int, name: str, layer_minima):
        def hook(module: nn.BatchNorm2d, args: tuple) -> None:
            if self._minima[index] is not None:
                raise InputError(f"BatchNorm2d {name!r} ran twice in one forward pass; FLARE needs each "
                                 "BatchNorm2d to run once (a shared module would mix two activations)")
            self._minima[index] = layer_minima(args[0])
        return hook

    def _head_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self._head_io is not None:
            raise InputError(f"head module {self.head_name!r} ran twice in one forward pass")
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise InputError(f"head module {self.head_name!r} must take and return one tensor")
        # Copies: the model may reuse these buffers in place after the head has run.
        self._head_io = (_as_rows(args[0]).clone(), _as_rows(output).clone())


def _batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    norms = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    if not norms:
        raise InputError(f"FLARE needs BatchNorm2d layers (it reads their running statistics), but this "
                         f"{type(model).__name__} has none")
    for name, norm in norms:
        if norm.running_mean is None or norm.running_var is None:
            raise InputError(f"BatchNorm2d {name!r} keeps no running statistics (track_running_stats=False); "
                             "FLARE needs them")
    return norms


def _named_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        linears = [module_name for module_name, module in modules.items() if isinstance(module, nn.Linear)]
        raise InputError(f"head {name!r} is not a submodule of this {type(model).__name__}; "
                         f"its Linear modules are {linears}")
    return modules[name]


def _as_rows(values: torch.Tensor) -> torch.Tensor:
    return values.detach().flatten(1).float()
