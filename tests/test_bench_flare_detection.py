"""benchmarks/bench_flare_detection.py's scanned set: the subset seed comes from the checkpoint's attack record."""

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_flare_detection")


def test_the_scanned_subset_is_the_one_the_checkpoint_records_and_another_seed_is_refused(bench):
    meta = {"attack": {"attack": "iad", "seed": 1}, "train_size": 10_000}
    assert bench.subset_seed(meta) == 1 and bench.subset_seed(meta, 1) == 1
    with pytest.raises(SystemExit, match="drawn with seed 1"):
        bench.subset_seed(meta, 0)  # the scan would read images the model never trained on
    assert bench.subset_seed({"train_size": 10_000}) == 0  # no record: 0, or the seed given
    assert bench.subset_seed({"attack": None}, 7) == 7
    assert bench.subset_seed({"attack": {"attack": "badnets"}}, 3) == 3
