"""Session-wide test setup."""

import os

import numpy as np
import pytest
import torch

# Triton reads TRITON_INTERPRET when triton.language is first imported (its own @jit helpers, tl.max among them),
# and torch can import triton early (the optimisers' torch._dynamo import during training tests). On a machine
# without a GPU the Triton kernels can only run interpreted, so set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def untrained_scan_inputs():
    """300 random 28x28 images of 3 labels (the first 10 marked poisoned) and an untrained small ResNet: a scan's
    inputs, for tests of the plumbing rather than of detection quality."""
    import torch

    from backdoor_engine.data.dataset import make_dataset
    from backdoor_engine.models.preprocess import Normalisation
    from backdoor_engine.models.registry import build_model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 28, 28, 1), dtype=np.uint8)
    y = np.repeat(np.arange(3), 100)
    poison = np.zeros(300, np.int64)
    poison[:10] = 1
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=28).eval()
    return make_dataset(x, y, poison=poison), model, Normalisation((0.5,), (0.25,))
