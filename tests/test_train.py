import numpy as np
import pytest
import torch

from backdoor_engine.errors import InputError
from backdoor_engine.models import Normalisation, TrainConfig, build_model, train_model
from backdoor_engine.models.train import batch_slices, make_scheduler


def tiny_data(count=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 12, 12, 1), dtype=np.uint8), rng.integers(0, 3, count).astype(np.int64)


def tiny_config(**overrides):
    # 64 images / batch 32: two SGD steps.
    return TrainConfig(**{"epochs": 1, "batch_size": 32, "progress": False, **overrides})


def train_tiny(**overrides):
    x, y = tiny_data()
    return train_model(x, y, arch="small_resnet", num_classes=3, config=tiny_config(**overrides))


def test_same_seed_gives_identical_weights():
    first, second = train_tiny(seed=3), train_tiny(seed=3)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.history[0]["loss"] == second.history[0]["loss"]


def test_different_seed_gives_different_weights():
    first, second = train_tiny(seed=3), train_tiny(seed=4)
    assert not torch.equal(first.model.head.weight, second.model.head.weight)


def test_training_changes_the_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    result = train_tiny(seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = build_model("small_resnet", num_classes=3, in_channels=1, input_size=12)
    assert not torch.equal(initial.head.weight, result.model.head.weight)


def test_result_model_history_and_callback():
    seen = []
    x, y = tiny_data()
    result = train_model(x, y, arch="small_resnet", num_classes=3, config=tiny_config(epochs=2),
                         callback=lambda epoch, model: seen.append((epoch, model.training)))
    assert seen == [(1, True), (2, True)]
    assert not result.model.training
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        assert set(row) == {"epoch", "loss", "train_acc", "seconds"}
        assert np.isfinite(row["loss"]) and 0 <= row["train_acc"] <= 1 and row["seconds"] > 0
    np.testing.assert_allclose(result.normalisation.mean, [x.mean() / 255])


def test_given_normalisation_is_used():
    x, y = tiny_data()
    norm = Normalisation((0.5,), (0.5,))
    result = train_model(x, y, arch="small_resnet", num_classes=3, config=tiny_config(), normalisation=norm)
    assert result.normalisation is norm


def test_cosine_schedule_anneals_to_zero():
    lrs = []
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.2)
    scheduler = make_scheduler(optimizer, TrainConfig(lr=0.2), total_steps=10)
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.2) and lrs == sorted(lrs, reverse=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_trailing_single_sample_batch_is_dropped():
    assert batch_slices(65, 32) == [slice(0, 32), slice(32, 64)]
    assert batch_slices(66, 32)[-1] == slice(64, 66)


@pytest.mark.parametrize("y,message", [
    (np.zeros(63, dtype=np.int64), "63 labels"),
    (np.full(64, 3, dtype=np.int64), r"\[0, 3\)"),
    (np.zeros(64, dtype=np.float32), "integer"),
])
def test_bad_labels_are_rejected(y, message):
    x, _ = tiny_data()
    with pytest.raises(InputError, match=message):
        train_model(x, y, arch="small_resnet", num_classes=3, config=tiny_config())


@pytest.mark.parametrize("overrides,field", [
    ({"epochs": 0}, "epochs"), ({"batch_size": 1}, "batch_size"), ({"lr": 0.0}, "lr"),
    ({"schedule": "step"}, "schedule"), ({"num_threads": 0}, "num_threads"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(InputError, match=field):
        TrainConfig(**overrides)


def test_num_threads_applies_during_training_only():
    before = torch.get_num_threads()
    during = []
    x, y = tiny_data()
    train_model(x, y, arch="small_resnet", num_classes=3, config=tiny_config(num_threads=1),
                callback=lambda epoch, model: during.append(torch.get_num_threads()))
    assert during == [1]
    assert torch.get_num_threads() == before
