"""Parameters with provenance: every numeric or categorical default says where it comes from.

A method's (detector's, repair strategy's) options are a dataclass whose fields are made with `param`:

    @dataclass(frozen=True)
    class UnlearnRelearnParams:
        lr: float = param(1e-4, "official code: D-BR unlearn_relearn.py")
        schedule: str = param("constant", "official code: D-BR", choices=("constant", "cosine"))
        batch_size: int = param(128, "ours", reason="the trainer's default; D-BR uses 128 too")

A provenance text starts with "paper", "official code" or "ours"; an "ours" default must say why
(`reason=`, or text after "ours"), since nobody else vouches for it. `provenance_of` reads the texts back
(report.json and --help show them), `build_params` turns user options (CLI --param, API **params) into
an instance, refusing unknown names and values outside `choices` by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from .errors import InputError

PROVENANCE_KINDS = ("paper", "official code", "ours")
_KEY = "provenance"


def _provenance_text(provenance: str, reason: str | None) -> str:
    if not isinstance(provenance, str) or not provenance.strip():
        raise TypeError(f"provenance must be a non-empty string starting with one of {PROVENANCE_KINDS}")
    text = provenance.strip() if reason is None else f"{provenance.strip()}: {reason.strip()}"
    kind = next((k for k in PROVENANCE_KINDS if text == k or text.startswith((k + ":", k + " ", k + ","))), None)
    if kind is None:
        raise TypeError(f"provenance {provenance!r} must start with one of {', '.join(PROVENANCE_KINDS)}")
    if kind == "ours" and not text[len("ours"):].strip(" :,-"):
        raise TypeError("an 'ours' default needs a reason (reason=... or 'ours: why'): nobody else vouches for it")
    return text


def param(default, provenance: str, *, reason: str | None = None, choices: Iterable | None = None):
    """A dataclass field with `default` and where that default comes from.

    provenance: "paper[: where]", "official code[: file]" or "ours: why" (or "ours" with `reason`).
    choices: the allowed values (matched case-insensitively for strings, kept in their listed spelling).
    Mutable defaults (list, dict, set) are copied per instance.
    """
    text = _provenance_text(provenance, reason)
    allowed = None if choices is None else tuple(choices)
    if allowed is not None and default not in allowed:
        raise TypeError(f"default {default!r} is not among its own choices {allowed}")
    metadata = {_KEY: text, "choices": allowed}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def provenance_of(params_class) -> dict[str, str]:
    """{field name: provenance text} of a params dataclass (class or instance), in field order.

    Raises TypeError naming any field not made with `param` (a default without provenance).
    """
    if not dataclasses.is_dataclass(params_class):
        raise TypeError(f"{params_class!r} is not a dataclass")
    out, missing = {}, []
    for f in dataclasses.fields(params_class):
        if _KEY in f.metadata:
            out[f.name] = f.metadata[_KEY]
        else:
            missing.append(f.name)
    if missing:
        name = getattr(params_class, "__name__", type(params_class).__name__)
        raise TypeError(f"{name}: field(s) {', '.join(missing)} have no provenance; declare them with param()")
    return out


def choices_of(params_class) -> dict[str, tuple]:
    """{field name: allowed values} for the fields that declare choices."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(params_class)
            if f.metadata.get("choices") is not None}


def _coerce(name: str, value, default, choices: tuple | None, owner: str):
    """`value` in the type of the field's default (int -> float, integral float -> int) and among `choices`."""
    if choices is not None:
        exact = [c for c in choices if type(c) is type(value) and c == value]  # True is not 1 here
        if exact:
            return exact[0]
        if isinstance(value, str):
            folded = {str(c).lower(): c for c in choices}
            if value.strip().lower() in folded:
                return folded[value.strip().lower()]
        raise InputError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InputError(f"{owner}: {name} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{owner}: {name} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"{owner}: {name} must be a number, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise InputError(f"{owner}: {name} must be a string, got {value!r}")
    return value  # None or container defaults: the class's own checks (__post_init__) judge the value


def build_params(params_class, given: Mapping | None, owner: str):
    """An instance of `params_class` from the user's options `given` ({name: value}).

    Unknown names raise InputError listing the known ones; values are coerced to the type of the field's
    default and checked against its `choices`, each error naming `owner` and the field.
    """
    fields = {f.name: f for f in dataclasses.fields(params_class) if f.init}
    given = dict(given or {})
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise InputError(f"{owner}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(fields) or 'none'}")
    values = {}
    for name, value in given.items():
        f = fields[name]
        if value is None and "None" in str(f.type):  # an optional field switched off (e.g. null = official)
            values[name] = None
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        values[name] = _coerce(name, value, default, f.metadata.get("choices"), owner)
        _check_finite(name, values[name], owner)
    return params_class(**values)


def _check_finite(name: str, value, owner: str) -> None:
    """NaN and inf are refused for every number, also inside lists: `xi=NaN` compares false with everything, so
    a range check in __post_init__ lets it through and the method runs for minutes on it. (JSON reads NaN,
    Infinity and -Infinity, so --param can give them.)"""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{owner}: {name} must be a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(name, item, owner)
