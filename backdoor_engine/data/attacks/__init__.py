"""Poisoning toolkit: seeded backdoor attacks on uint8 N x H x W x C images, for evaluation.

    attack = make_attack("badnets", (32, 32, 3), seed=0)
    poisoned = poison_dataset(x, y, attack, mode="a2o", rate=0.1, num_classes=10, seed=0)
    test = triggered_test_set(x_test, y_test, attack, mode="a2o", num_classes=10, seed=0)
"""

from __future__ import annotations

from typing import Any

from backdoor_engine.errors import InputError

from .adaptive_blend import AdaptiveBlend
from .adaptive_patch import AdaptivePatch
from .badnets import BadNets
from .base import Attack, attack_fields
from .blend import Blend
from .iad import IAD
from .instagram_filter import InstagramFilter
from .issba import ISSBA
from .label_consistent import LabelConsistent
from .labels import MODES, attack_labels
from .low_frequency import LowFrequency
from .poison import PoisonResult, TriggeredSet, draw_samples, poison_dataset, triggered_test_set
from .siba import SIBA
from .sig import SIG
from .trojan import Trojan
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {
    attack.name: attack
    for attack in (BadNets, Blend, Trojan, WaNet, SIG, AdaptiveBlend, LabelConsistent)
    + (InstagramFilter, AdaptivePatch, LowFrequency)
    + (IAD, SIBA, ISSBA)
}
CLEAN_LABEL_ATTACKS = frozenset(name for name, attack in ATTACKS.items() if attack.clean_label)


def _attack_class(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise InputError(f"attack: expected one of {sorted(ATTACKS)}, got {name!r}")
    return ATTACKS[name]


def attack_param_names(name: str) -> dict[str, Any]:
    """Parameters of an attack (besides image_shape and seed) with their defaults."""
    return attack_fields(_attack_class(name))


def make_attack(name: str, image_shape: tuple[int, int, int], *, seed: int = 0, **params: Any) -> Attack:
    """Build an attack by name; unknown names or parameters raise InputError listing the valid ones."""
    attack_class = _attack_class(name)
    valid = attack_fields(attack_class)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise InputError(f"{name}: unknown parameter(s) {unknown}; valid: {sorted(valid)}")
    return attack_class(image_shape, seed, **params)


__all__ = [
    "ATTACKS",
    "CLEAN_LABEL_ATTACKS",
    "MODES",
    "AdaptiveBlend",
    "AdaptivePatch",
    "Attack",
    "BadNets",
    "Blend",
    "IAD",
    "ISSBA",
    "InstagramFilter",
    "LabelConsistent",
    "LowFrequency",
    "PoisonResult",
    "SIBA",
    "SIG",
    "TriggeredSet",
    "Trojan",
    "WaNet",
    "attack_labels",
    "attack_param_names",
    "draw_samples",
    "make_attack",
    "poison_dataset",
    "triggered_test_set",
]
