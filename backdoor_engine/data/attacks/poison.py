"""Build a poisoned training set and the triggered test set used for the attack success rate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoor_engine.errors import InputError

from .base import Attack, check_fraction, check_images
from .labels import attack_labels, check_class_setup, check_labels, check_mode


@dataclass(frozen=True)
class PoisonResult:
    """Poisoned set. ``mask``: payload samples (trigger + attack label, or for clean-label attacks
    trigger on target-class samples); ``cover``: samples with a trigger or warp noise that keep
    their true label; ``params``: JSON-serialisable description of how it was made."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    cover: np.ndarray
    params: dict


@dataclass(frozen=True)
class TriggeredSet:
    """Test-time triggered samples: ``index`` into the clean test set, the label the attacker
    wants (``y_attack``) and the true one. For ``ut`` count a success as prediction != y_true."""

    x: np.ndarray
    y_attack: np.ndarray
    y_true: np.ndarray
    index: np.ndarray


def _check_attack(attack) -> None:
    if not isinstance(attack, Attack):
        raise InputError(f"attack: expected an attack built by make_attack, got {type(attack).__name__}")


def _check_inputs(x, y, attack: Attack, mode: str, target: int, num_classes: int):
    _check_attack(attack)
    check_mode(mode)
    target, num_classes = check_class_setup(target, num_classes)
    check_images(x, attack.image_shape)
    y = check_labels(y, num_classes)
    if len(y) != len(x):
        raise InputError(f"y: expected {len(x)} labels (one per image), got {len(y)}")
    if attack.clean_label and mode != "a2o":
        raise InputError(f"mode: clean-label attack {attack.name!r} only supports 'a2o', got {mode!r}")
    return y, target, num_classes


def _stream_rngs(seed: int) -> tuple[np.random.Generator, ...]:
    """The four streams of one poisoning: which samples, their labels, their triggers, the covers' triggers."""
    return tuple(np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4))


def _draw(y: np.ndarray, attack: Attack, rate: float, target: int, rng: np.random.Generator):
    n_samples = len(y)
    n_payload = int(n_samples * rate)
    # BackdoorBox LC takes its rate relative to the target class; here rate is always a fraction
    # of the whole set so that rates mean the same thing across attacks.
    candidates = np.flatnonzero(y == target) if attack.clean_label else np.arange(n_samples)
    if n_payload > len(candidates):
        raise InputError(
            f"rate: {rate} asks for {n_payload} poisoned samples but target class {target} has only "
            f"{len(candidates)} samples for clean-label attack {attack.name!r}"
        )
    payload = np.sort(rng.permutation(candidates)[:n_payload])
    rest = np.setdiff1d(np.arange(n_samples), payload)
    n_cover = attack.cover_count(n_samples, rate)
    if n_cover > len(rest):
        raise InputError(
            f"rate: {rate} asks for {n_payload} poisoned and {n_cover} cover samples, "
            f"more than the {n_samples} available"
        )
    return payload, np.sort(rng.permutation(rest)[:n_cover])


def draw_samples(y, attack: Attack, *, rate: float, target: int = 0, num_classes: int, seed: int):
    """The payload and cover indices `poison_dataset` picks for the same labels, attack, rate, target and seed
    (the same random stream), without touching an image: what a poisoning will hit, known before it is built."""
    _check_attack(attack)
    target, num_classes = check_class_setup(target, num_classes)
    y = check_labels(y, num_classes)
    return _draw(y, attack, check_fraction(rate, "rate"), target, _stream_rngs(seed)[0])


def poison_dataset(
    x: np.ndarray,
    y: np.ndarray,
    attack: Attack,
    *,
    mode: str,
    rate: float,
    target: int = 0,
    num_classes: int,
    seed: int,
) -> PoisonResult:
    """Poison exactly ``int(N * rate)`` samples (BackdoorBox's count), drawn uniformly from all
    samples for dirty-label attacks and from the target class for clean-label ones, plus the
    attack's cover samples drawn from the rest. Inputs are not modified."""
    y, target, num_classes = _check_inputs(x, y, attack, mode, target, num_classes)
    rate = check_fraction(rate, "rate")
    choose_rng, label_rng, payload_rng, cover_rng = _stream_rngs(seed)
    n_samples = len(x)
    payload, cover = _draw(y, attack, rate, target, choose_rng)
    n_payload, n_cover = len(payload), len(cover)

    x_out = x.copy()
    y_out = y.copy()
    if n_payload:
        x_out[payload] = attack.apply(x[payload], train=True, labels=y[payload], rng=payload_rng)
        if not attack.clean_label:
            y_out[payload] = attack_labels(
                y[payload], mode, target=target, num_classes=num_classes, rng=label_rng
            )
    if n_cover:
        x_out[cover] = attack.apply_cover(x[cover], rng=cover_rng)
    mask = np.zeros(n_samples, dtype=bool)
    mask[payload] = True
    cover_mask = np.zeros(n_samples, dtype=bool)
    cover_mask[cover] = True
    params = {
        "attack": attack.describe(),
        "mode": mode,
        "rate": rate,
        "target": target,
        "num_classes": num_classes,
        "seed": int(seed),
        "n_poisoned": int(n_payload),
        "n_cover": int(n_cover),
    }
    return PoisonResult(x=x_out, y=y_out, mask=mask, cover=cover_mask, params=params)


def triggered_test_set(
    x: np.ndarray,
    y: np.ndarray,
    attack: Attack,
    *,
    mode: str,
    target: int = 0,
    num_classes: int,
    seed: int,
) -> TriggeredSet:
    """Test-time trigger on the samples that count for the attack success rate: for ``a2o`` (and
    every clean-label attack) those outside the target class (BackdoorBox's ASR_NoTarget), for
    ``a2a`` and ``ut`` all samples."""
    y, target, num_classes = _check_inputs(x, y, attack, mode, target, num_classes)
    label_rng, apply_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    index = np.flatnonzero(y != target) if mode == "a2o" else np.arange(len(x))
    x_triggered = attack.apply(x[index], train=False, labels=y[index], rng=apply_rng)
    y_attack = attack_labels(y[index], mode, target=target, num_classes=num_classes, rng=label_rng)
    return TriggeredSet(x=x_triggered, y_attack=y_attack, y_true=y[index], index=index)
