"""The Triton BN-minima kernel on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).

Errors are bounded as for the cpp kernel (tests/kernel_tolerance.py). What only compiled code
shows (coalescing, denormal handling on the GPU) is checked where a GPU is present.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from kernel_tolerance import assert_close_to_reference, batchnorm_input

from backdoor_engine import kernels
from backdoor_engine.errors import InputError
from backdoor_engine.kernels import bn_minima

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: pip install -e '.[test]' brings it", allow_module_level=True)

# (2, 70, 3, 3): two channel blocks when channels_last; (2, 3, 33, 17), (1, 2, 33, 40): several H*W tiles.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 7), (2, 13, 1, 1), (2, 3, 33, 17), (2, 70, 3, 3), (1, 2, 33, 40)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYOUT_IDS = ["nchw", "channels_last"]
KERNEL_MODULE = "backdoor_engine.kernels.bn_minima_triton"


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """TRITON_INTERPRET=1 when the kernel module is first imported: that is when triton.jit reads it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert importlib.import_module(KERNEL_MODULE).INTERPRETED, f"{KERNEL_MODULE} was imported before this module"
        yield


def run_without_interpreter(script):
    """A fresh Python running script the way production does: Triton compiled, not interpreted."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], check=False, env=environment, capture_output=True, text=True
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, dtype, layout):
    x, mean, var = batchnorm_input(shape, dtype, layout)
    assert_close_to_reference(bn_minima(x, mean, var, 1e-5, backend="triton"), x, mean, var, 1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_deviations_from_the_mean(dtype, layout):
    # |z| up to ~1e4 on tiny variances: log-densities around -1e8, as triggers can produce.
    x, mean, var = batchnorm_input((3, 6, 5, 5), dtype, layout, seed=1, spread=3e3)
    tiny_var = var * 1e-4
    assert_close_to_reference(bn_minima(x, mean, tiny_var, 0.0, backend="triton"), x, mean, tiny_var, 0.0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "channel,position", [(0, (0, 0)), (69, (16, 20)), (66, (32, 39))], ids=["first", "middle", "last"]
)
def test_nan_activation_gives_nan_for_its_sample_and_channel_only(channel, position, dtype, layout):
    # 70 channels over 33x40 positions: the NaN sits in different channel blocks and H*W tiles.
    x, mean, var = batchnorm_input((2, 70, 33, 40), dtype, layout, seed=2)
    x[1, channel, position[0], position[1]] = float("nan")
    out = bn_minima(x, mean, var, 1e-5, backend="triton")
    assert out.isnan().nonzero().tolist() == [[1, channel]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_activation_gives_minus_infinity(dtype):
    x, mean, var = batchnorm_input((2, 3, 4, 4), dtype, torch.contiguous_format)
    x[0, 1, 2, 3], x[1, 2, 0, 0] = float("inf"), float("-inf")
    out = bn_minima(x, mean, var, 1e-5, backend="triton")
    assert out.isinf().nonzero().tolist() == [[0, 1], [1, 2]] and (out[out.isinf()] < 0).all()


def test_sample_and_channel_strides_are_read_in_place():
    x, mean, var = batchnorm_input((4, 12, 6, 5), torch.float32, torch.channels_last, seed=4)
    every, every_third = slice(None), slice(1, None, 3)
    views = ((x[::2], every), (x[:, every_third], every_third), (x[:, :, 2:], every), (x[..., 2:3], every))
    for view, channels in views:  # the last has W == 1, so its H stride walks the positions
        assert not (view.is_contiguous() or view.is_contiguous(memory_format=torch.channels_last))
        out = bn_minima(view, mean[channels], var[channels], 1e-5, backend="triton")
        assert_close_to_reference(out, view, mean[channels], var[channels], 1e-5)


def test_empty_batch_gives_empty_features():
    x, mean, var = batchnorm_input((0, 3, 4, 4), torch.float16, torch.channels_last)
    assert bn_minima(x, mean, var, 1e-5, backend="triton").shape == (0, 3)


def test_refuses_what_it_cannot_read_by_name():
    x, mean, var = batchnorm_input((2, 3, 6, 8), torch.float32, torch.contiguous_format)
    with pytest.raises(InputError, match="backend='triton' cannot run this input: .*not form one strided axis"):
        bn_minima(x[:, :, :, :5], mean, var, 1e-5, backend="triton")
    with pytest.raises(InputError, match="float32, float16 or bfloat16"):
        bn_minima(x.double(), mean, var, 1e-5, backend="triton")


def test_cpu_path_never_imports_triton_and_compiled_kernel_refuses_cpu_tensors():
    script = """
        import sys, warnings
        import torch
        from backdoor_engine.errors import InputError
        from backdoor_engine.kernels import bn_minima
        warnings.simplefilter("ignore")  # a missing compiled extension warns; beside the point here
        x, mean, var = torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3)
        for backend in ("auto", "torch"):
            bn_minima(x, mean, var, 1e-5, backend=backend)
            bn_minima(x.to(torch.bfloat16, memory_format=torch.channels_last), mean, var, 1e-5, backend=backend)
        assert "triton" not in sys.modules, "a CPU call imported triton"
        try:
            bn_minima(x, mean, var, 1e-5, backend="triton")
        except InputError as error:
            print(error)
        """
    result = run_without_interpreter(script)
    assert result.returncode == 0, result.stderr
    assert "backend='triton' cannot run this input: x is on cpu; the Triton kernel takes CUDA tensors" in result.stdout


@pytest.fixture
def triton_missing(monkeypatch):
    """This process as if triton were not installed."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, KERNEL_MODULE)
    kernels._triton_kernel_module.cache_clear()
    yield
    kernels._triton_kernel_module.cache_clear()


def test_without_triton_the_backend_is_refused_with_one_warning(triton_missing):
    x, mean, var = batchnorm_input((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(InputError, match="backend='triton' cannot run this input: triton is not installed"):
                bn_minima(x, mean, var, 1e-5, backend="triton")
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "triton is not available" in messages[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU")
def test_compiled_kernel_is_chosen_for_cuda_and_matches_the_torch_closed_form():
    script = """
        import torch
        from backdoor_engine.kernels import _choose_backend, bn_minima, bn_minima_torch
        eps32 = torch.finfo(torch.float32).eps
        mean, var = torch.randn(70, device="cuda"), torch.rand(70, device="cuda") + 1e-3
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                x = (torch.randn(5, 70, 33, 40, device="cuda") * 3).to(dtype).contiguous(memory_format=layout)
                x[4, 69, 32, 39] = float("nan")
                assert _choose_backend(x, "auto") == "triton"
                out, expected = bn_minima(x, mean, var, 1e-5), bn_minima_torch(x, mean, var, 1e-5)
                torch.testing.assert_close(out, expected, rtol=2 * eps32, atol=0, equal_nan=True)
                assert out.isnan().nonzero().tolist() == [[4, 69]]
        """
    result = run_without_interpreter(script)
    assert result.returncode == 0, result.stderr
