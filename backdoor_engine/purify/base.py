"""The Repair interface: what every purification strategy declares and returns.

A strategy is one class in one file (plus one line in the registry, or an entry point in the group
`backdoor_engine.repairs` for a third-party package):

    class Retrain(Repair):
        name = "retrain"
        description = "FLARE(P): a fresh model of the suspect's architecture trained on the kept samples"
        Params = RetrainParams          # a dataclass made with backdoor_engine.params.param (provenance per field)
        uses_flags = REQUIRED           # the scan's flags: REQUIRED, OPTIONAL or UNUSED
        uses_aux = UNUSED               # a small clean auxiliary set (GIC-style): REQUIRED, OPTIONAL or UNUSED
        needs_arch = True               # builds a fresh model, so it must know the architecture's name
        uses_split = False              # True: `flags` arrives as the three-way split (below)
        needs_model = True              # False: trains from scratch, the suspect model may be None

        def repair(self, model, normalisation, dataset, flags, aux=None, *, params, arch, progress) -> Repaired: ...

`apply` is the one entry point callers use: it builds the params from the user's options, checks the
inputs against what the strategy declared (so a strategy's `repair` sees only valid, declared inputs)
and checks what comes back.

Flags come two ways: one bool per sample (a detector's flagged set), or the three-way split of
`detection` (CLEAN / UNCERTAIN / POISONED per sample, int8; FCT makes one, `report.reading.split_from_report`
reads one from any report). A strategy declaring `uses_split` receives the split (bools become POISONED /
CLEAN); the others receive bools (split == POISONED), so every strategy takes every report.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..detection import CLEAN, POISONED, UNCERTAIN
from ..errors import InputError
from ..params import build_params, choices_of, provenance_of

REQUIRED, OPTIONAL, UNUSED = "required", "optional", "unused"
USES = (REQUIRED, OPTIONAL, UNUSED)


@dataclass
class Repaired:
    """A repaired model (eval mode, CPU memory format) with the normalisation it expects, the per-epoch
    history and `config`: every setting the run used (the params plus what the strategy derived from
    its inputs), plain JSON-like values so it goes into the checkpoint's record as is."""

    model: object
    normalisation: object
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


class Repair(ABC):
    """A purification strategy; subclasses set the class attributes below and implement `repair`."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown in `purify --help`
    Params: ClassVar[type]
    uses_flags: ClassVar[str] = REQUIRED
    uses_aux: ClassVar[str] = UNUSED
    needs_arch: ClassVar[bool] = False
    uses_split: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True

    @abstractmethod
    def repair(self, model, normalisation, dataset, flags: np.ndarray | None, aux=None, *, params, arch: str | None,
               progress: bool) -> Repaired:
        """Repair `model` (never modified in place; None for a strategy that does not need it) given the
        dataset it was trained on, the scan's per-sample `flags` (bool, or the int8 split with `uses_split`)
        and `aux` (a clean Dataset), as declared."""

    def params(self, given: Mapping | None = None):
        """The strategy's Params from user options; unknown names and bad choices raise InputError."""
        return build_params(self.Params, given, f"purify strategy {self.name!r}")

    def apply(self, model, normalisation, dataset, flags=None, aux=None, *, params: Mapping | None = None,
              arch: str | None = None, progress: bool = True) -> Repaired:
        """Check the inputs against what the strategy declared, run `repair`, check its result."""
        built = self.params(params)
        self.check_declared(has_flags=flags is not None, has_aux=aux is not None, has_arch=bool(arch),
                            has_model=model is not None)
        flags = self._check_flags(dataset, flags)
        if aux is not None and tuple(aux.image_shape) != tuple(dataset.image_shape):
            raise InputError(f"aux images are {tuple(aux.image_shape)} but the dataset's are "
                             f"{tuple(dataset.image_shape)}")
        result = self.repair(model, normalisation, dataset, flags, aux, params=built, arch=arch, progress=progress)
        if not isinstance(result, Repaired):
            raise TypeError(f"purify strategy {self.name!r} returned {type(result).__name__}, not Repaired")
        return result

    def check_declared(self, *, has_flags: bool, has_aux: bool, has_arch: bool, has_model: bool = True) -> None:
        """InputError unless the inputs given are the ones the strategy declared (callers check this before
        loading anything heavy; `apply` checks it again)."""
        if not has_flags and self.uses_flags == REQUIRED:
            raise InputError(f"purify strategy {self.name!r} works from a scan's flags (flags / --report)")
        if has_flags and self.uses_flags == UNUSED:
            raise InputError(f"purify strategy {self.name!r} does not use a scan's flags; drop flags / --report")
        if not has_aux and self.uses_aux == REQUIRED:
            raise InputError(f"purify strategy {self.name!r} needs a small clean auxiliary set (aux / --aux SOURCE)")
        if has_aux and self.uses_aux == UNUSED:
            raise InputError(f"purify strategy {self.name!r} takes no auxiliary clean set; drop aux / --aux")
        if not has_model and self.needs_model:
            raise InputError(f"purify strategy {self.name!r} repairs the suspect model: give it (model / --model)")
        if not has_arch and self.needs_arch:
            raise InputError(f"purify strategy {self.name!r} trains a fresh model: give the suspect model's "
                             "architecture name (arch=, recorded in its checkpoint)")

    @classmethod
    def describe(cls) -> str:
        """Its --help text: description, inputs, and every parameter with its default and provenance."""
        choices = choices_of(cls.Params)
        uses = ([f"flags {cls.uses_flags}" + (" (three-way split)" if cls.uses_split else ""), f"aux {cls.uses_aux}"]
                + (["fresh model of the suspect's arch"] if cls.needs_arch else [])
                + ([] if cls.needs_model else ["no suspect model"]))
        lines = [f"{cls.name}: {cls.description}", f"  inputs: {', '.join(uses)}"]
        defaults = dataclasses.asdict(cls.Params())
        for name, provenance in provenance_of(cls.Params).items():
            allowed = f"one of {'|'.join(map(str, choices[name]))}; " if name in choices else ""
            lines.append(f"  {name}={defaults[name]!r} ({allowed}{provenance})")
        return "\n".join(lines)

    def _check_flags(self, dataset, flags):
        if flags is None:
            return None
        flags = np.asarray(flags)
        split_like = np.issubdtype(flags.dtype, np.integer) and np.isin(flags, (CLEAN, UNCERTAIN, POISONED)).all()
        if flags.shape != (len(dataset),) or not (flags.dtype == bool or split_like):
            raise InputError(f"flags: expected {len(dataset)} booleans or a three-way split (0 clean, 1 uncertain, "
                             f"2 poisoned; one per sample), got {flags.dtype} {flags.shape}")
        if flags.dtype == bool:
            return np.where(flags, POISONED, CLEAN).astype(np.int8) if self.uses_split else flags
        return flags.astype(np.int8) if self.uses_split else flags == POISONED


def check_repair_class(cls) -> None:
    """Raise TypeError unless `cls` is a complete Repair: name, one-line description, a params
    dataclass with provenance on every field, valid declarations, `repair` implemented."""
    where = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Repair)):
        raise TypeError(f"{where} is not a subclass of backdoor_engine.purify.base.Repair")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{where}: name must be a non-empty string")
    description = getattr(cls, "description", None)
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        raise TypeError(f"{where}: description must be one non-empty line")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        raise TypeError(f"{where}: Params must be a dataclass")
    provenance_of(params)
    for attribute in ("uses_split", "needs_model", "needs_arch"):
        if not isinstance(getattr(cls, attribute), bool):
            raise TypeError(f"{where}: {attribute} must be a bool")
    for attribute in ("uses_flags", "uses_aux"):
        if getattr(cls, attribute) not in USES:
            raise TypeError(f"{where}: {attribute} must be one of {USES}, got {getattr(cls, attribute)!r}")
    if getattr(cls, "__abstractmethods__", None):
        raise TypeError(f"{where}: {', '.join(sorted(cls.__abstractmethods__))} not implemented")
