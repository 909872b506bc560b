"""benchmarks/cover_floor.py: what the TPR / FPR targets cost where the target class's covers and own poison look
alike, from the poisoning's draw alone."""

import json

import numpy as np
import pytest
from bench_scripts import load_benchmark

from backdoor_engine.data import make_dataset
from backdoor_engine.data.attacks import harness


@pytest.fixture(scope="module")
def floor():
    return load_benchmark("cover_floor")


def test_the_floor_is_the_cover_share_the_needed_own_poison_drags_in(floor):
    # IAD subset seed 0 at 10%: 894 relabelled found at most, so 86 of the 106 own poison are needed (q = 0.811);
    # 0.811 of the 121 target covers is 98.2 false positives over 9,000 clean: 1.09%, the FPR FLARE measured there.
    r = floor.cover_floor(1000, 106, 121, 9000)
    assert r["share_needed"] == pytest.approx(86 / 106)
    assert r["fpr_floor"] == pytest.approx(86 / 106 * 121 / 9000) and not r["reachable"]
    # FPR 1% allows 90 covers, q = 90 / 121, so TPR <= (894 + 106 q) / 1000.
    assert r["tpr_ceiling"] == pytest.approx((894 + 106 * 90 / 121) / 1000)
    fewer = floor.cover_floor(1000, 101, 90, 9000)  # subset seed 8: in reach
    assert fewer["reachable"] and fewer["fpr_floor"] == pytest.approx(81 / 101 * 90 / 9000)
    assert fewer["tpr_ceiling"] == 1.0


def test_no_covers_or_no_own_poison_cost_nothing_and_bad_counts_are_refused(floor):
    none = floor.cover_floor(1000, 106, 0, 9000)
    assert none["fpr_floor"] == 0 and none["reachable"]
    r = floor.cover_floor(1000, 0, 200, 9000)  # every poison relabelled: TPR 98% needs none of the covers' group
    assert r["fpr_floor"] == 0 and r["tpr_ceiling"] == 1.0
    assert floor.cover_floor(1000, 10, 200, 9000)["fpr_floor"] == 0  # 990 relabelled already reach 98%
    with pytest.raises(ValueError, match="counts"):
        floor.cover_floor(100, 120, 5, 900)


def test_a_row_counts_the_target_class_draw_of_the_real_poisoning(floor):
    rng = np.random.default_rng(0)
    train = make_dataset(rng.integers(0, 256, (400, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(10), 40),
                         num_classes=10)
    spec = harness.PoisonSpec(attack="adaptive_patch", rate=0.1, seed=4)
    row = floor.row_for(train, spec, tpr=0.98, fpr=0.01)
    _, result = harness.poison(train, spec)
    own = result.mask & (train.y == 0)
    assert row["n_poison"] == 40 and row["n_cover"] == 80 and row["covers_carry"] == "same"
    assert row["n_own"] == own.sum() and row["n_target_covers"] == (result.cover & (train.y == 0)).sum()
    expected = floor.cover_floor(40, row["n_own"], row["n_target_covers"], 360)
    assert row["fpr_floor"] == pytest.approx(expected["fpr_floor"])
    json.dumps(row)  # one JSON line as written
    assert floor.summary([row])[2].startswith("| adaptive_patch | 0.1 | same | 1 |")
