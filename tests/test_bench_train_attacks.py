"""benchmarks/train_attacks.py's training fit: the share of clean and of poisoned training images the model
predicts as their training label."""

import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.data.attacks import harness
from backdoor_engine.data.dataset import make_dataset
from backdoor_engine.models.preprocess import Normalisation
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def train_attacks():
    return load_benchmark("train_attacks")


class Constant(nn.Module):
    """Predicts class `label` for every image."""

    def __init__(self, label: int, classes: int = 3):
        super().__init__()
        self.bias = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), classes).float())

    def forward(self, x):
        return self.bias.expand(len(x), -1)


def test_training_fit_counts_clean_and_poisoned_images_predicted_as_their_label(train_attacks):
    x = np.zeros((6, 4, 4, 1), np.uint8)
    y = np.array([0, 0, 1, 1, 0, 1])
    poison = np.array([0, 0, 0, 1, 1, 1], np.uint8)
    fit = train_attacks.training_fit(Constant(0), Normalisation((0.0,), (1.0,)), make_dataset(x, y, poison=poison),
                                     poison.astype(bool))
    assert fit == {"fit_clean": round(2 / 3, 4), "fit_poison": round(1 / 3, 4)}


def test_training_fit_of_a_set_without_poison_has_no_poison_share(train_attacks):
    x = np.zeros((4, 4, 4, 1), np.uint8)
    fit = train_attacks.training_fit(Constant(1), Normalisation((0.0,), (1.0,)),
                                     make_dataset(x, np.array([1, 1, 1, 2])), np.zeros(4, bool))
    assert fit == {"fit_clean": 0.75, "fit_poison": None}


@pytest.mark.parametrize("attack, params, needed", [
    ("iad", [], True),                                    # the generator is trained from the clean classifier
    ("iad", ["generator=runs/iad-trigger.npz"], False),   # a built generator needs no clean model
    ("lf", ["trigger_path=lf.npz"], False),
    ("siba", ["k=50"], True),                             # another parameter does not name the trigger
    ("label_consistent", [], True),                       # its PGD step runs at poisoning time
    ("badnets", [], False),
])
def test_a_clean_model_is_trained_only_when_the_attack_still_needs_one(train_attacks, attack, params, needed):
    args = train_attacks.argparse.Namespace(param=params, lc_steps=100)
    assert harness.needs_clean_model(attack, train_attacks.case_params(attack, args)) is needed
