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


def test_label_consistent_sets_are_rebuilt_with_the_clean_model_the_checkpoint_records(bench, tmp_path):
    import numpy as np
    import torch

    from backdoor_engine.data.attacks import harness
    from backdoor_engine.data.dataset import make_dataset
    from backdoor_engine.errors import InputError
    from backdoor_engine.models.checkpoint import load_checkpoint, save_checkpoint
    from backdoor_engine.models.preprocess import Normalisation
    from backdoor_engine.models.registry import build_model

    rng = np.random.default_rng(0)
    train = make_dataset(rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), np.arange(40) % 4)
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=4, in_channels=1, input_size=12).eval()
    save_checkpoint(tmp_path / "clean.pt", model, arch="small_resnet", num_classes=4, in_channels=1, input_size=12,
                    normalisation=Normalisation((0.5,), (0.25,)))
    spec = harness.PoisonSpec(attack="label_consistent", mode="a2o", rate=0.1, target=0, seed=0,
                              params={"steps": 2})
    clean, clean_meta = load_checkpoint(tmp_path / "clean.pt")
    expected, _ = harness.poison(train, spec, clean_model=(clean, clean_meta["normalisation"]))
    meta = {"attack": spec.to_dict(), "clean_model": str(tmp_path / "clean.pt")}
    rebuilt, case, cover = bench.poisoned_with_cover(train, meta)
    assert case == ("label_consistent", "a2o") and not cover.any()
    hit = np.asarray(rebuilt.poison, bool)
    assert hit.sum() == 4 and (rebuilt.y[hit] == 0).all()
    np.testing.assert_array_equal(rebuilt.x, expected.x)  # the PGD step on the same model: the same images
    assert not np.array_equal(rebuilt.x[hit], train.x[hit])
    with pytest.raises(InputError, match="records no clean model"):
        bench.poisoned_with_cover(train, {"attack": spec.to_dict()})  # a checkpoint saved before it was kept
