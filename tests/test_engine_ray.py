"""The Ray Data executor on a local Ray cluster: the same features, skips and store as the local executor."""

import io
import tarfile

import numpy as np
import pytest

from backdoor_engine.data import TarShardSource, load_fashion_mnist, write_tar_shards
from backdoor_engine.engine import FeatureStore, extract_features
from backdoor_engine.engine.ray_executor import extract_features_ray
from backdoor_engine.models import Normalisation, build_model
from backdoor_engine.models.checkpoint import load_checkpoint, save_checkpoint

ray = pytest.importorskip("ray")  # the optional extra; the test extra installs it, so CI runs this


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_actors_extract_what_the_local_executor_extracts_and_share_its_store(tmp_path, local_ray):
    import torch

    data = load_fashion_mnist("train").subset(np.arange(300))
    write_tar_shards(data, tmp_path / "shards", shard_size=120)
    with tarfile.open(tmp_path / "shards" / "shard-000001.tar", "a") as tar:  # one corrupt sample mid-chunk
        for name, payload in (("corrupt.png", b"\x89PNG broken"), ("corrupt.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=10, in_channels=1, input_size=28)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    normalisation = Normalisation((0.286,), (0.353,))
    save_checkpoint(tmp_path / "m.pt", model, arch="small_resnet", num_classes=10, in_channels=1, input_size=28,
                    normalisation=normalisation)
    model, _ = load_checkpoint(tmp_path / "m.pt")
    source = TarShardSource(tmp_path / "shards")
    settings = {"chunk_size": 64, "batch_size": 32, "capture": ("bn_minima", "logits"), "progress": False}

    remote = extract_features_ray(tmp_path / "m.pt", source, store=tmp_path / "ray", actors=2, **settings)
    local = extract_features(model, source, normalisation, store=tmp_path / "local", **settings)
    assert remote.metadata["executor"] == "ray" and len(remote) == 300 and len(source) == 301
    assert [sample_id for sample_id, _ in remote.metadata["skipped"]] == ["shard-000001.tar/corrupt"]
    assert np.array_equal(remote.ids, local.ids) and np.array_equal(remote.y, data.y)
    assert remote.metadata["skipped"] == local.metadata["skipped"]
    for name in ("bn_minima", "logits"):
        assert np.allclose(getattr(remote, name), getattr(local, name), rtol=1e-5, atol=1e-5), name
    manifest = FeatureStore.open(tmp_path / "ray")
    assert manifest.provenance == FeatureStore.open(tmp_path / "local").provenance
    # The same store header: a store finished by Ray is a finished store for the local executor.
    again = extract_features(model, source, normalisation, store=tmp_path / "ray", **settings)
    assert again.metadata["extracted_samples"] == 0
