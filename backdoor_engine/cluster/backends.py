"""The one table of clustering primitives x backends (DESIGN.md section 5), and the choice among them.

Each primitive lists its backends in the order backend="auto" tries them; an entry says which
module must be installed, whether it needs CUDA, and where its function lives. Functions are
loaded on first call and modules are only looked up (never imported) to judge availability, so a
GPU library is imported only by a call that runs on the GPU.
"""

import importlib
import importlib.util
from dataclasses import dataclass

import torch

from backdoor_engine.cluster.validation import device_matrix, feature_matrix
from backdoor_engine.errors import InputError

_HERE = "backdoor_engine.cluster"


@dataclass(frozen=True)
class Backend:
    """name: what a caller passes as backend=; module: the Python module it needs; cuda: whether it
    needs CUDA; function: "submodule:function" of this package that runs it."""

    name: str
    module: str
    cuda: bool
    function: str

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here, or None."""
        if self.cuda and not torch.cuda.is_available():
            return f"{self.name} needs CUDA, which is not available on this machine"
        if importlib.util.find_spec(self.module) is None:
            return f"{self.name} needs the Python module {self.module!r}, which is not installed"
        return None

    def matrix(self, X, name: str = "X"):
        """X checked as a float32 [N, D] matrix: a CUDA tensor stays on its GPU for a CUDA backend,
        everything else becomes a numpy array."""
        if self.cuda and isinstance(X, torch.Tensor) and X.is_cuda:
            return device_matrix(X, name)
        return feature_matrix(X, name)

    def __call__(self, *args, **kwargs):
        module, function = self.function.split(":")
        return getattr(importlib.import_module(f"{_HERE}.{module}"), function)(*args, **kwargs)


TABLE: dict[str, tuple[Backend, ...]] = {
    "umap": (
        Backend("cuml", "cuml", True, "cuml_backend:umap_cuml"),
        Backend("umap-learn", "umap", False, "umap_learn_backend:umap_learn"),
    ),
    # "hdbscan" is the library the official FLARE code uses.
    "hdbscan": (
        Backend("cuml", "cuml", True, "cuml_backend:hdbscan_cuml"),
        Backend("hdbscan", "hdbscan", False, "hdbscan_backend:hdbscan_library"),
    ),
    "tsne": (
        Backend("cuml", "cuml", True, "cuml_backend:tsne_cuml"),
        Backend("opentsne", "openTSNE", False, "tsne_opentsne:tsne_opentsne"),
    ),
    "dbscan": (
        Backend("cuml", "cuml", True, "cuml_backend:dbscan_cuml"),
        Backend("sklearn", "sklearn", False, "dbscan_sklearn:dbscan_sklearn"),
    ),
    # Exact self-kNN. torch (matmul + topk, on the GPU when CUDA is present) comes first on a GPU; on
    # the CPU faiss does, measured at least as fast (see cluster.knn), then torch again.
    "knn": (
        Backend("torch", "torch", True, "knn_torch:knn_torch"),
        Backend("faiss", "faiss", False, "knn_faiss:knn_faiss"),
        Backend("torch", "torch", False, "knn_torch:knn_torch"),
    ),
    # Queries against a reference set (assignment at scale): a faiss flat or IVF index, on the GPU
    # when a faiss GPU build and CUDA are present.
    "knn_search": (Backend("faiss", "faiss", False, "knn_faiss:FaissReference"),),
}


def choose(primitive: str, backend: str) -> Backend:
    """The entry that runs `primitive` for backend= "auto" or a name; InputError saying why not."""
    entries = TABLE[primitive]
    names = tuple(dict.fromkeys(entry.name for entry in entries))
    if backend != "auto" and backend not in names:
        raise InputError(f"{primitive} backend must be 'auto' or one of {names}, got {backend!r}")
    candidates = [entry for entry in entries if backend in ("auto", entry.name)]
    reasons = []
    for entry in candidates:
        reason = entry.unavailable_reason()
        if reason is None:
            return entry
        reasons.append(reason)
    if backend == "auto":
        raise InputError(f"no {primitive} backend is available: " + "; ".join(reasons))
    # A name listed twice (torch: GPU, then CPU) is unavailable only if its last entry is.
    raise InputError(f"{primitive} backend {backend!r} is unavailable: {reasons[-1]}")


def available_backends() -> dict[str, list[str]]:
    """For each primitive, the backends this machine can run, in the order "auto" tries them."""
    return {
        primitive: list(dict.fromkeys(entry.name for entry in entries if entry.unavailable_reason() is None))
        for primitive, entries in TABLE.items()
    }
