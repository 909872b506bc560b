"""On a machine without CUDA the clustering path never imports a GPU library (DESIGN.md section 5)."""

import json
import subprocess
import sys

import pytest
import torch

GPU_MODULES = ("cuml", "cupy", "cudf", "rmm", "pylibraft", "triton")

SCRIPT = f"""
import json, sys
import numpy as np
from backdoor_engine import cluster
X = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
cluster.knn(X, 5, backend="faiss")
cluster.knn(X, 5, backend="torch")
cluster.knn_search(X, X[:10], 3)
result = cluster.hdbscan(X, min_cluster_size=20)
cluster.cut_single_linkage(result.single_linkage, 1.0, 20)
cluster.dbscan(X, eps=0.5)
roots = {{name.split(".")[0] for name in sys.modules}}
lazy = sorted(roots & {{"umap", "pynndescent", "openTSNE"}})
cluster.tsne(X, perplexity=5.0, random_state=0)
roots = {{name.split(".")[0] for name in sys.modules}}
print(json.dumps({{
    "gpu": sorted(roots & set({GPU_MODULES!r})),
    "lazy": lazy,
    "cuml_backend": "backdoor_engine.cluster.cuml_backend" in sys.modules,
    "gpu_backends": sorted({{name for names in cluster.available_backends().values() for name in names}}
                           & {{"cuml"}}),
}}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cpu_path_imports_no_gpu_library():
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert seen["gpu"] == []
    assert seen["cuml_backend"] is False
    assert seen["gpu_backends"] == []
    # umap-learn JIT-compiles on import, openTSNE pulls in pynndescent (numba) when it fits: only a
    # umap or tsne call may pay for them.
    assert seen["lazy"] == []
