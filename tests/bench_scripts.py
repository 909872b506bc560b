"""The benchmarks/ scripts as modules for their tests (they are scripts run from the repository, not a package)."""

import importlib.util
from pathlib import Path


def load_benchmark(name: str):
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
