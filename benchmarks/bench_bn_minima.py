"""Times the BN-minima backends on one realistic BatchNorm input; prints one JSON object.

    python benchmarks/bench_bn_minima.py [--n 256 --channels 64 --size 32 --dtype float32 --reps 5]

Backends: the compiled kernel ("cpp"), the torch closed form ("torch"), and the official FLARE
computation (bn_minima_reference: full log-density tensor, then min) in float32 and float64.
Each time is the median of --reps runs after one warm-up run, for NCHW and channels_last inputs.
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import backdoor_engine
from backdoor_engine._ext import load_extension
from backdoor_engine.kernels import bn_minima, bn_minima_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_seconds(run, reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="H = W")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(args.channels, generator=generator)
    var = torch.rand(args.channels, generator=generator) + 0.1
    noise = torch.randn(args.n, args.channels, args.size, args.size, generator=generator)
    activation = (mean[:, None, None] + var.sqrt()[:, None, None] * noise).to(DTYPES[args.dtype])
    eps = 1e-5

    extension = load_extension()
    backends = {
        "torch": lambda x: bn_minima(x, mean, var, eps, backend="torch"),
        "reference_float32": lambda x: bn_minima_reference(x, mean, var, eps, dtype=torch.float32),
        "reference_float64": lambda x: bn_minima_reference(x, mean, var, eps),
    }
    if extension is not None:
        backends["cpp"] = lambda x: bn_minima(x, mean, var, eps, backend="cpp")

    layouts = {}
    for layout_name, memory_format in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = activation.contiguous(memory_format=memory_format)
        exact = bn_minima_reference(x, mean, var, eps)
        seconds = {name: median_seconds(lambda: run(x), args.reps) for name, run in backends.items()}
        layouts[layout_name] = {
            "seconds": seconds,
            "input_gb_per_s": {name: x.nbytes / s / 1e9 for name, s in seconds.items()},
            "speedup_vs_cpp": {name: s / seconds["cpp"] for name, s in seconds.items()} if "cpp" in seconds else None,
            "max_abs_error_vs_float64": {
                name: float((run(x).double() - exact).abs().max()) for name, run in backends.items()
            },
        }

    print(json.dumps({
        "benchmark": "bn_minima",
        "shape": [args.n, args.channels, args.size, args.size],
        "dtype": args.dtype,
        "reps": args.reps,
        "statistic": "median seconds after one warm-up",
        "layouts": layouts,
        "threads": {
            "torch": torch.get_num_threads(),
            "cpp_openmp": extension.max_threads() if extension is not None else None,
        },
        "versions": {
            "backdoor_engine": backdoor_engine.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "compiled_extension": extension is not None,
            "machine": platform.machine(),
        },
    }, indent=2))


if __name__ == "__main__":
    main()
