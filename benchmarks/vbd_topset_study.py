"""VBD stage 2's limit on all-to-all poisoning: how many poisoned samples a class's top set can hold at all.

Trains VBD's stage 1 (the engine's own `train_poison_models`, official settings, the same split and seed as a
`Vbd(seed=...)` fit) and, after every epoch of every simple model, ranks each class's detection-split samples that
the last epoch predicts as the class by that epoch's probability, as stage 2 does, counting the poisoned among the
top `top_n`. Prints one JSON line per set: per class, the most poisoned any (model, epoch) top set held, and the
counts under the official (last-epoch) and `rank_accuracy` rankings.
Ground truth only describes the sets here; nothing in the engine reads it.

    python benchmarks/vbd_topset_study.py d6-random-a2a d7-grid-a2a d5-square-a2a badnets-a2a-grid badnets-a2a-square
"""

import argparse
import json
import time

import numpy as np

from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.methods.vbd import Inputs, VbdParams, predict_probabilities, stratified_split, train_poison_models
from backdoor_engine.models.preprocess import fit_normalisation
from bench_vbd_detection import CASES, case_spec, subset
from vbd_dev_study import SETS, dev_set, dev_train, set_seed


def poisoned_set(name: str):
    """(x, y, poison, seed) as vbd_dev_study.py (development and held-out names) or bench_vbd_detection.py (10k,
    seed 0) build it."""
    if name in SETS:
        seed = set_seed(name)
        data, poison = dev_set(name, dev_train(seed))
        return data.x, data.y, poison, seed
    data, _ = harness.poison(subset(load_fashion_mnist("train"), 10000, 0), case_spec(name, 0.1, 0, 0))
    return data.x, data.y, data.poison.astype(bool), 0


def top_poisoned(probabilities: np.ndarray, last: np.ndarray, y: np.ndarray, poison: np.ndarray, label: int,
                 top_n: int) -> int:
    """Poisoned samples among the `top_n` of `label` (labelled and last-epoch-predicted as it), ranked by
    `probabilities`."""
    members = np.flatnonzero((y == label) & (last.argmax(1) == label))
    top = members[np.argsort(-probabilities[members, label], kind="stable")[:top_n]]
    return int(poison[top].sum())


def study(name: str, rank_accuracy: float) -> dict:
    x, y, poison, seed = poisoned_set(name)
    params = VbdParams(seed=seed, rank_accuracy=None)
    inputs = Inputs(x, fit_normalisation(x))
    train_index, detect_index = stratified_split(y, params.poison_train_fraction, np.random.default_rng(seed))
    seen: list[list[np.ndarray]] = [[] for _ in params.poison_archs]  # [model][epoch] detection-split probabilities

    def record(epoch, models):
        for m, model in enumerate(models):
            seen[m].append(predict_probabilities(model, inputs, detect_index))

    train_poison_models(params.poison_archs, inputs, y, train_index, num_classes=10, params=params,
                        detect_index=detect_index, epoch_end=record)
    yd, pd, classes = y[detect_index], poison[detect_index], range(10)
    # Per model, the epoch whose probabilities rank_accuracy ranks by (the last when none reaches it).
    reached = [next((e for e, p in enumerate(epochs[:-1]) if (p.argmax(1) == yd).mean() >= rank_accuracy),
                    len(epochs) - 1) for epochs in seen]
    best, official, ranked = [], [], []
    for label in classes:
        counts = [[top_poisoned(p, epochs[-1], yd, pd, label, params.top_n) for p in epochs] for epochs in seen]
        best.append(max(max(c) for c in counts))
        official.append([c[-1] for c in counts])
        ranked.append([c[e] for c, e in zip(counts, reached)])
    return dict(set=name, poisoned_in_split=[int(pd[yd == k].sum()) for k in classes], best_top=best,
                official_top=official, rank_accuracy=rank_accuracy, ranked_top=ranked, archs=list(params.poison_archs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", choices=list(SETS) + list(CASES))
    parser.add_argument("--rank-accuracy", type=float, default=0.8)
    args = parser.parse_args()
    for name in args.sets:
        started = time.time()
        print(json.dumps({**study(name, args.rank_accuracy), "s": round(time.time() - started)}), flush=True)
