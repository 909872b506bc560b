"""Predictions and the two numbers every backdoor paper reports: benign accuracy and attack success rate."""

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import InputError
from .preprocess import Normalisation, check_images, to_model_input

ATTACK_MODES = ("a2o", "a2a", "ut")


def predict(model: nn.Module, x: np.ndarray, normalisation: Normalisation, *, batch_size: int = 256,
            progress: bool = False) -> np.ndarray:
    """Predicted class (int64) of each uint8 NHWC image, in eval mode without gradients.

    The model's train/eval mode is restored afterwards, so a training callback may call this.
    """
    check_images(x)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions = np.empty(len(x), dtype=np.int64)
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(x), batch_size), disable=not progress, desc="predict", unit="batch"):
                images = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
                logits = model(to_model_input(images, normalisation))
                predictions[start:start + len(images)] = logits.argmax(1).cpu().numpy()
    finally:
        model.train(was_training)
    return predictions


def check_same_length(name_a: str, a, name_b: str, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.shape != a.shape:
        raise InputError(f"{name_a} and {name_b} must be 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise InputError(f"{name_a} is empty: the rate of zero predictions is undefined")
    return a, b


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    pred, y = check_same_length("pred", pred, "y", y)
    return float(np.mean(pred == y))


def attack_success_rate(pred: np.ndarray, y_attack: np.ndarray | None, y_true: np.ndarray | None,
                        mode: str) -> float:
    """Share of triggered test images the attack wins: a2o/a2a: pred == y_attack; ut: pred != y_true.

    For a2o the caller passes triggered images whose true class is not the target.
    """
    if mode not in ATTACK_MODES:
        raise InputError(f"mode must be one of {', '.join(ATTACK_MODES)}, got {mode!r}")
    if mode == "ut":
        if y_true is None:
            raise InputError("y_true is required for the untargeted (ut) attack success rate")
        pred, y_true = check_same_length("pred", pred, "y_true", y_true)
        return float(np.mean(pred != y_true))
    if y_attack is None:
        raise InputError(f"y_attack is required for the {mode} attack success rate")
    pred, y_attack = check_same_length("pred", pred, "y_attack", y_attack)
    return float(np.mean(pred == y_attack))


def evaluate_model(model, normalisation, clean, spec=None, *, num_classes: int | None = None,
                   batch_size: int = 256, progress: bool = False, dummy_class: int | None = None) -> dict:
    """Benign accuracy on `clean`, and the attack success rate of `spec`'s trigger on it when given.

    dummy_class: the extra output of a model repaired by backdoor hiding (TRAP). A clean image predicted as
    it counts as an error; `dummy_rate_clean` / `dummy_rate_triggered` say how often clean and triggered
    images land there. The attack's classes are then the dummy's index (the data's classes), not the outputs.
    """
    from ..data.attacks.harness import triggered_test

    num_classes = dummy_class if dummy_class is not None else (num_classes or clean.num_classes)
    pred = predict(model, clean.x, normalisation, batch_size=batch_size, progress=progress)
    out = {"ba": float(accuracy(pred, clean.y)), "n_clean": int(len(clean))}
    if dummy_class is not None:
        out["dummy_rate_clean"] = float(np.mean(pred == dummy_class))
    if spec is not None:
        trig = triggered_test(clean, spec, num_classes=num_classes)
        pred_t = predict(model, trig.x, normalisation, batch_size=batch_size, progress=progress)
        out["asr"] = float(attack_success_rate(pred_t, trig.y_attack, trig.y_true, spec.mode))
        out["n_triggered"] = int(len(trig.y_attack))
        if dummy_class is not None:
            out["dummy_rate_triggered"] = float(np.mean(pred_t == dummy_class))
    return out
