"""Detectors, one file each, and their registry.

Registering a built-in detector is one line in BUILTIN ("module:Class", imported on first use, so
listing the methods loads none of them). Another package registers its own through the entry point
group `backdoor_engine.detectors` (name = the method name, value = "module:Class"); a plugin that
fails to load is reported by name and left out, it does not break the command line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings

from ..errors import InputError
from .base import NEEDS, PIXELS, Detector, ReportParts, ScanData

ENTRY_POINT_GROUP = "backdoor_engine.detectors"

BUILTIN = {
    "flare": "backdoor_engine.methods.flare_sampled:SampledFlare",
    "vbd": "backdoor_engine.methods.vbd:Vbd",
    "ac": "backdoor_engine.methods.activation_clustering:ActivationClustering",
    "spectral": "backdoor_engine.methods.spectral:SpectralSignatures",
    "spectre": "backdoor_engine.methods.spectre:Spectre",
    "fct": "backdoor_engine.methods.fct:Fct",
    "trap": "backdoor_engine.methods.trap:Trap",
    "scale_up": "backdoor_engine.methods.scale_up:ScaleUp",
    "scale_up_clean": "backdoor_engine.methods.scale_up:ScaleUpClean",
    "ibd_psc": "backdoor_engine.methods.ibd_psc:IbdPsc",
    "strip": "backdoor_engine.methods.strip:Strip",
    "scan": "backdoor_engine.methods.scan_untangling:Scan",
}

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "NEEDS", "PIXELS", "Detector", "ReportParts", "ScanData",
           "available_detectors", "get_detector", "make_detector"]


def _load(target: str, origin: str) -> type[Detector]:
    module, _, attribute = target.partition(":")
    detector = getattr(importlib.import_module(module), attribute)
    if not (isinstance(detector, type) and issubclass(detector, Detector)):
        raise TypeError(f"{origin} {target!r} is not a backdoor_engine.methods.Detector subclass")
    return detector


def _plugins() -> dict[str, str]:
    found = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in BUILTIN:
            warnings.warn(f"backdoor-engine: plugin detector {entry.name!r} ({entry.value}) is ignored: the name "
                          "belongs to a built-in detector", RuntimeWarning, stacklevel=3)
        else:
            found[entry.name] = entry.value
    return found


def available_detectors() -> list[str]:
    """Registered method names: the built-ins, then the plugins that load."""
    names = list(BUILTIN)
    for name, target in sorted(_plugins().items()):
        try:
            _load(target, f"plugin detector {name!r}")
        except Exception as error:  # a broken plugin must not break the listing of the others
            warnings.warn(f"backdoor-engine: plugin detector {name!r} ({target}) cannot be loaded: {error}",
                          RuntimeWarning, stacklevel=2)
            continue
        names.append(name)
    return names


def get_detector(name: str) -> type[Detector]:
    """The detector class registered as `name`; InputError listing the registered ones otherwise."""
    if name in BUILTIN:
        return _load(BUILTIN[name], "built-in detector")
    plugins = _plugins()
    if name in plugins:
        try:
            return _load(plugins[name], f"plugin detector {name!r}")
        except Exception as error:
            raise InputError(f"plugin detector {name!r} ({plugins[name]}) cannot be loaded: {error}") from None
    raise InputError(f"unknown method {name!r}; registered: {', '.join(available_detectors())}")


def make_detector(name, params: dict | None = None, *, have_reference: bool = False):
    """`get_detector(name)(**params)`: parameters checked (names, types, choices) before any work. Several
    names ("flare,ac", a list, or "all": every registered detector, those needing a clean reference only when
    `have_reference`) make a `Consensus` of them, run from one pass."""
    from .consensus import Consensus, method_list

    names = method_list(name, available_detectors(), have_reference=have_reference)
    if names is not None:
        return Consensus(names, params)
    return get_detector(name)(**(params or {}))
