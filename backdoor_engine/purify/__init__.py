"""Repairs after detection: one file per strategy (the Repair interface is in base.py), registered here.

  retrain          FLARE(P): train a fresh model on the samples a detector kept
  unlearn-relearn  FLARE(R): per epoch, gradient ascent on the flagged samples, then CE on the kept
  d-br             D-BR: the same loop on a three-way split (poisoned part / clean part, uncertain left out)
  d-st             D-ST: secure training from scratch, SS-CTL encoder then a head with MCE loss
  backdoor-hiding  TRAP: flagged samples relabelled as a dummy class, only the head retrained (K+1 outputs)
  ft               fine-tuning on a small clean auxiliary set (BackdoorBenchER)
  ft-sam           the same with (adaptive) sharpness-aware minimisation
  fst              feature shift tuning: a re-initialised head pushed away from the old one
  anp              adversarial neuron pruning of BatchNorm channels, learned on the auxiliary set
  sau              shared adversarial unlearning on the auxiliary set (reference: the frozen suspect model)
  npd              a neural polarizer layer trained on the auxiliary set inside the frozen suspect model

A new strategy is one file with its Repair subclass plus one line in REPAIRS. A third-party package
registers one through the entry point group `backdoor_engine.repairs` (name = the strategy's name,
value = "package.module:Class"); plugins are imported on first need, and one that fails to import or is
incomplete is reported by name (`broken_repairs`, and the error of `get_repair`) instead of breaking the CLI.
"""

from __future__ import annotations

import importlib.metadata

from ..errors import InputError
from .base import OPTIONAL, REQUIRED, UNUSED, Repair, Repaired, check_repair_class
from .retrain import Retrain, RetrainParams, retrain_on_kept
from .unlearn_relearn import UnlearnRelearn, UnlearnRelearnParams, unlearn_relearn, unlearn_relearn_config
from .d_br import DBr
from .d_st import DSt
from .backdoor_hiding import BackdoorHiding
from .finetune import Finetune
from .ft_sam import FtSam
from .fst import Fst
from .anp import Anp
from .sau import Sau
from .npd import Npd

ENTRY_POINT_GROUP = "backdoor_engine.repairs"

REPAIRS: dict[str, type[Repair]] = {cls.name: cls for cls in (Retrain, UnlearnRelearn, DBr, DSt, BackdoorHiding,
                                                                    Finetune, FtSam, Fst, Anp, Sau, Npd)}
for _cls in REPAIRS.values():
    check_repair_class(_cls)  # a built-in missing provenance fails at import, not in a user's run

# name -> class for the plugins that loaded, name -> "what failed" for the others; None until first needed.
_PLUGINS: dict[str, type[Repair]] | None = None
_BROKEN: dict[str, str] = {}


def _plugins() -> dict[str, type[Repair]]:
    global _PLUGINS, _BROKEN
    if _PLUGINS is None:
        loaded, broken = {}, {}
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name in REPAIRS or entry.name in loaded:
                broken[entry.name] = f"{entry.value}: the name is already registered"
                continue
            try:
                cls = entry.load()
                check_repair_class(cls)
                if cls.name != entry.name:
                    raise TypeError(f"the entry point is named {entry.name!r} but the class's name is {cls.name!r}")
            except Exception as error:  # a plugin's import can fail in any way; report it, keep the rest usable
                broken[entry.name] = f"{entry.value}: {type(error).__name__}: {error}"
            else:
                loaded[entry.name] = cls
        _PLUGINS, _BROKEN = loaded, broken
    return _PLUGINS


def available_repairs() -> list[str]:
    """Names of the built-in and the successfully loaded plugin strategies, sorted."""
    return sorted({**REPAIRS, **_plugins()})


def broken_repairs() -> dict[str, str]:
    """Plugin strategies that could not be loaded: name -> entry point and error."""
    _plugins()
    return dict(_BROKEN)


def get_repair(name: str) -> Repair:
    """The strategy registered as `name`, ready to `apply`; unknown or broken names raise InputError."""
    cls = REPAIRS.get(name) or _plugins().get(name)
    if cls is not None:
        return cls()
    if name in _BROKEN:
        raise InputError(f"purify strategy {name!r} is a plugin that failed to load ({_BROKEN[name]})")
    raise InputError(f"unknown purify strategy {name!r}; registered: {', '.join(available_repairs())}")


__all__ = ["ENTRY_POINT_GROUP", "OPTIONAL", "REPAIRS", "REQUIRED", "UNUSED", "Repair", "Repaired", "Retrain",
           "RetrainParams", "UnlearnRelearn", "UnlearnRelearnParams", "available_repairs", "broken_repairs",
           "check_repair_class", "get_repair", "retrain_on_kept", "unlearn_relearn", "unlearn_relearn_config"]
