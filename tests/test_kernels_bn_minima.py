"""BN-minima backends against the float64 reference (FlashAttention / Triton-tutorial style)."""

import shutil
import sys
import warnings

import pytest
import torch
from kernel_tolerance import FLOAT32_EPS, assert_close_to_reference, batchnorm_input

from backdoor_engine import _ext
from backdoor_engine.errors import InputError
from backdoor_engine.kernels import bn_minima, bn_minima_for_layer, bn_minima_reference

SHAPES = [(1, 1, 1, 1), (2, 1, 4, 4), (3, 5, 7, 7), (2, 13, 1, 1), (4, 3, 1, 9), (5, 17, 11, 13), (8, 24, 16, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
BACKENDS = ["torch", "cpp"]


def require_extension():
    """The compiled extension: skip without a C++ toolchain, fail where it should have been built."""
    extension = _ext.load_extension()
    if extension is None:
        if shutil.which("cmake") and shutil.which("c++"):
            pytest.fail("cmake and c++ are installed but backdoor_engine._C is not built: run `pip install -e .`")
        pytest.skip("no C++ toolchain here, so no compiled extension")
    return extension


@pytest.fixture(autouse=True)
def cpp_cases_need_the_extension(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cpp":
        require_extension()


# The input is upcast exactly, so the precision at stake is the float32 output: the tolerance
# comes from torch's float32 computation for every input dtype (a float16 computation's error
# would hide a wrong decoding of float16 bits).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, dtype, layout, backend):
    x, mean, var = batchnorm_input(shape, dtype, layout)
    assert_close_to_reference(bn_minima(x, mean, var, 1e-5, backend=backend), x, mean, var, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_deviations_from_the_mean(dtype, layout, backend):
    # |z| up to ~1e4 on tiny variances: log-densities around -1e8, as triggers can produce.
    x, mean, var = batchnorm_input((3, 6, 5, 5), dtype, layout, seed=1, spread=3e3)
    tiny_var = var * 1e-4
    assert_close_to_reference(bn_minima(x, mean, tiny_var, 0.0, backend=backend), x, mean, tiny_var, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_decode_exactly(dtype, backend):
    info = torch.finfo(dtype)
    channels = [
        [info.smallest_normal / 4, info.smallest_normal / 8, -info.smallest_normal / 2, 0.0],  # subnormals
        [-0.0, 0.0, -0.0, -0.0],
        [info.max, -info.max, 1.0, -1.0],  # scaled by its variance below, so float32 holds the result
        [float("inf"), 1.0, 2.0, 3.0],
        [-1.0, float("-inf"), 2.0, 3.0],
    ]
    x = torch.tensor(channels, dtype=dtype).reshape(1, 5, 2, 2)
    mean = torch.zeros(5)
    var = torch.tensor([info.smallest_normal, 1.0, info.max, 1.0, 1.0], dtype=torch.float64) ** 2  # beyond float32
    out = bn_minima(x, mean, var, 0.0, backend=backend)
    exact = bn_minima_reference(x, mean, var, 0.0)
    assert torch.equal(out[0, 3:], torch.tensor([float("-inf")] * 2)), "an infinite activation has log-density -inf"
    assert torch.allclose(out.double()[0, :3], exact[0, :3], rtol=4 * FLOAT32_EPS, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("position", [(0, 0), (2, 3), (4, 6)], ids=["first", "middle", "last"])
def test_nan_activation_gives_nan_for_its_sample_and_channel_only(position, dtype, layout, backend):
    x, mean, var = batchnorm_input((3, 4, 5, 7), dtype, layout, seed=2)
    x[1, 2, position[0], position[1]] = float("nan")
    out = bn_minima(x, mean, var, 1e-5, backend=backend)
    nan_at = out.isnan().nonzero().tolist()
    assert nan_at == [[1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_features(backend):
    x, mean, var = batchnorm_input((0, 3, 4, 4), torch.float32, torch.contiguous_format)
    assert bn_minima(x, mean, var, 1e-5, backend=backend).shape == (0, 3)


def test_auto_handles_what_the_compiled_kernel_does_not():
    x, mean, var = batchnorm_input((4, 6, 8, 8), torch.float64, torch.contiguous_format)
    assert_close_to_reference(bn_minima(x, mean, var, 1e-5), x, mean, var, 1e-5)
    strided = batchnorm_input((4, 6, 8, 8), torch.float32, torch.contiguous_format)[0][:, ::2]
    assert_close_to_reference(bn_minima(strided, mean[:3], var[:3], 1e-5), strided, mean[:3], var[:3], 1e-5)


def test_cpp_backend_refuses_unsupported_input_by_name():
    x, mean, var = batchnorm_input((2, 6, 4, 4), torch.float32, torch.contiguous_format)
    with pytest.raises(InputError, match="neither NCHW-contiguous nor channels_last"):
        bn_minima(x[:, ::2], mean[:3], var[:3], 1e-5, backend="cpp")
    with pytest.raises(InputError, match="float32, float16 or bfloat16"):
        bn_minima(x.double(), mean, var, 1e-5, backend="cpp")


def test_gradient_tracking_input_is_accepted():
    x, mean, var = batchnorm_input((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    out = bn_minima(x.requires_grad_(), mean, var, 1e-5)
    assert_close_to_reference(out, x, mean, var, 1e-5)


BAD_INPUTS = [
    ("3-D x", lambda x, m, v: (x[0], m, v, 1e-5), r"\[N, C, H, W\], got .*shape \(3, 5, 5\)"),
    ("integer x", lambda x, m, v: (x.long(), m, v, 1e-5), "floating-point"),
    ("not a tensor", lambda x, m, v: (x.numpy(), m, v, 1e-5), "torch.Tensor, got ndarray"),
    ("no positions", lambda x, m, v: (x[:, :, :0], m, v, 1e-5), "at least one channel and one spatial position"),
    ("mean of other C", lambda x, m, v: (x, m[:2], v, 1e-5), r"running_mean must have shape \(3,\).*got \(2,\)"),
    ("var of other C", lambda x, m, v: (x, m, torch.ones(4), 1e-5), r"running_var must have shape \(3,\).*got \(4,\)"),
    ("negative var", lambda x, m, v: (x, m, torch.tensor([1.0, -0.5, 1.0]), 1e-5),
     "running_var must be >= 0, got -0.5 in channel 1"),
    ("NaN mean", lambda x, m, v: (x, torch.tensor([0.0, 0.0, float("nan")]), v, 1e-5),
     "running_mean must be finite.*channel 2"),
    ("zero variance", lambda x, m, v: (x, m, torch.tensor([1.0, 0.0, 1.0]), 0.0),
     r"running_var \+ eps must be > 0.*channel 1"),
    ("negative eps", lambda x, m, v: (x, m, v, -1e-5), "eps must be a finite number >= 0"),
]


@pytest.mark.parametrize("make_args,message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_input_error_naming_the_problem(make_args, message):
    x, mean, var = batchnorm_input((2, 3, 5, 5), torch.float32, torch.contiguous_format)
    with pytest.raises(InputError, match=message):
        bn_minima(*make_args(x, mean, var))


def test_unknown_backend_is_refused():
    x, mean, var = batchnorm_input((2, 3, 5, 5), torch.float32, torch.contiguous_format)
    with pytest.raises(InputError, match="backend must be one of .*got 'cuda'"):
        bn_minima(x, mean, var, 1e-5, backend="cuda")


@pytest.fixture
def extension_missing(monkeypatch):
    """This process as if backdoor_engine._C had not been built."""
    monkeypatch.setitem(sys.modules, "backdoor_engine._C", None)  # makes the import raise ImportError
    _ext.load_extension.cache_clear()
    yield
    _ext.load_extension.cache_clear()


def test_without_extension_auto_falls_back_to_torch_and_warns_once(extension_missing):
    x, mean, var = batchnorm_input((3, 5, 7, 7), torch.float32, torch.contiguous_format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = bn_minima(x, mean, var, 1e-5)
        second = bn_minima(x, mean, var, 1e-5)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "backdoor_engine._C is not available" in messages[0]
    assert "using the slower PyTorch path" in messages[0]
    assert torch.equal(first, second)
    assert_close_to_reference(first, x, mean, var, 1e-5)
    with pytest.raises(InputError, match="backend='cpp' cannot run this input: .*not available"):
        bn_minima(x, mean, var, 1e-5, backend="cpp")


def test_compiled_binding_checks_lengths_and_layout_itself():
    # The binding is callable directly, so it must not read past a short array or misread strides.
    extension = require_extension()
    x = torch.zeros(2, 3, 4, 4)
    mean, var = torch.zeros(3, dtype=torch.float64).numpy(), torch.ones(3, dtype=torch.float64).numpy()
    with pytest.raises(ValueError, match="3 entries"):
        extension.bn_minima(x.numpy(), mean[:2], var, 0.0, "float32")
    with pytest.raises(ValueError, match="NCHW-contiguous or channels_last"):
        extension.bn_minima(x[:, :, ::2].numpy(), mean, var, 0.0, "float32")
    with pytest.raises(ValueError, match="uint16"):
        extension.bn_minima(x.half().numpy(), mean, var, 0.0, "float16")


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_bound_kernel_gives_what_bn_minima_gives(dtype, layout, backend):
    if backend != "torch":
        require_extension()
    x, mean, var = batchnorm_input((5, 17, 11, 13), dtype, layout)
    layer_minima = bn_minima_for_layer(mean, var, 1e-5, backend=backend)
    torch.testing.assert_close(layer_minima(x), bn_minima(x, mean, var, 1e-5, backend=backend), rtol=0, atol=0)
    strided = x.transpose(2, 3)  # neither layout: the bound kernel hands it to bn_minima's own fallback
    if backend != "cpp":
        torch.testing.assert_close(layer_minima(strided), bn_minima(strided, mean, var, 1e-5), rtol=0, atol=0)


def test_layer_bound_kernel_checks_statistics_once_at_binding_and_shapes_per_call():
    x, mean, var = batchnorm_input((2, 3, 5, 5), torch.float32, torch.contiguous_format)
    with pytest.raises(InputError, match="running_var must be >= 0"):
        bn_minima_for_layer(mean, torch.tensor([1.0, -0.5, 1.0]), 1e-5)
    with pytest.raises(InputError, match="backend must be one of"):
        bn_minima_for_layer(mean, var, 1e-5, backend="cuda")
    with pytest.raises(InputError, match=r"running_mean must have shape \(4,\)"):
        bn_minima_for_layer(mean, var, 1e-5)(torch.zeros(2, 4, 5, 5))
