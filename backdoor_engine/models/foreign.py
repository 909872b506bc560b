"""Models users trained themselves: a torchvision or timm architecture plus a state-dict file.

    load_model("runs/model.pt")                                       our checkpoint (models/checkpoint.py)
    load_model("torchvision:resnet50", weights="resnet50.safetensors")  any torchvision classifier
    load_model("timm:resnet50", weights="model.pt", input_size=192)     any timm model (the timm extra)

The architecture is built with `weights=None` / `pretrained=False`: nothing is ever downloaded. The
weights come from a `.safetensors` file or a `.pt`/`.pth` read with `torch.load(weights_only=True)`
(a plain state dict or {"state_dict": ...}); a file that needs unpickling is refused, like our own
checkpoints (a model under scan is untrusted). The number of classes is read from the weights (the
classifier head's weight), the head itself found generically: the last nn.Linear in module order,
checked to produce the model's output on one image of the input size.

FLARE reads BatchNorm2d running statistics: ResNets, MobileNets, EfficientNets, RegNets, DenseNets and
VGG-BN have them; ConvNeXt, ViT and Swin normalise with LayerNorm and cannot be scanned by FLARE
(the probes say so when extraction starts; meta["batchnorm2d_layers"] tells it earlier).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .checkpoint import check_finite_weights, load_checkpoint, load_weights_only
from .preprocess import Normalisation
from .registry import image_size_pair

LIBRARIES = ("torchvision", "timm")
# torchvision's default preprocessing for its ImageNet classifiers, on the [0, 1] pixel scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
# Prefixes a training wrapper adds to every key: DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_foreign_spec(spec) -> bool:
    """True for "torchvision:NAME" / "timm:NAME", False for a checkpoint path."""
    return isinstance(spec, str) and spec.partition(":")[0] in LIBRARIES and ":" in spec


def load_model(spec: str | os.PathLike, *, weights: str | os.PathLike | None = None,
               input_size: int | Sequence[int] | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> tuple[nn.Module, dict]:
    """The model (CPU, eval mode) and its meta: arch, num_classes, in_channels, input_size [H, W],
    normalisation (a Normalisation), head (dotted name of the classifier nn.Linear), source (where it
    came from, plain types) and batchnorm2d_layers.

    spec: a backdoor-engine checkpoint path (it carries its own weights, size and normalisation, so
    the other arguments must be None), or "torchvision:NAME" / "timm:NAME". For those, weights is
    the state-dict file; None gives a randomly initialised model (seeded: for benchmarks, never for a
    scan). input_size (int or (H, W)) defaults to 224 (timm: the model's own default); mean and std
    (1 or 3 values on the [0, 1] pixel scale) default to the ImageNet statistics (timm: the model's).
    """
    if not is_foreign_spec(spec):
        given = [flag for flag, value in (("weights", weights), ("input_size", input_size), ("mean", mean),
                                          ("std", std)) if value is not None]
        if given:
            raise InputError(f"{spec} is taken as a backdoor-engine checkpoint, which carries its own weights, "
                             f"input size and normalisation; {', '.join(given)} apply to torchvision:NAME and "
                             "timm:NAME models only")
        model, meta = load_checkpoint(spec)
        return model, {**meta, "head": "head", "source": {"kind": "checkpoint", "path": os.fspath(spec)},
                       "batchnorm2d_layers": _count_batchnorm2d(model)}
    library, _, name = spec.partition(":")
    if not name:
        raise InputError(f"--model {spec!r} names no architecture: write {library}:NAME, e.g. {library}:resnet50")
    build, defaults, version = _torchvision_builder(name) if library == "torchvision" else _timm_builder(name)
    state = None if weights is None else read_state_dict(weights)
    height, width = image_size_pair(defaults["input_size"] if input_size is None else input_size)
    normalisation = _normalisation(defaults["mean"] if mean is None else mean,
                                   defaults["std"] if std is None else std)

    # The skeleton only names the head: built on the meta device, it costs no memory and no init.
    head = _classifier_head(_build_skeleton(build), spec)
    if state is not None:
        if f"{head}.weight" not in state:
            raise InputError(f"{weights}: no {head}.weight, the classifier head of {spec}; is this a state dict "
                             f"of {spec}? Its first keys: {list(state)[:5]}")
        num_classes = int(state[f"{head}.weight"].shape[0])
    else:
        num_classes = defaults["num_classes"]
    if num_classes < 2:
        raise InputError(f"{weights}: the head {head} has {num_classes} output(s); a classifier needs >= 2 classes")
    # Seeded so a random model (weights=None, benchmarks) is the same every run; the global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(num_classes)
    if state is not None:
        _load_strictly(model, state, weights, spec)
    model.eval()
    _check_head_gives_output(model, head, spec, (height, width))
    source = {"kind": library, "name": name, "library_version": version,
              "weights": None if weights is None else os.fspath(weights)}
    return model, {"arch": spec, "num_classes": num_classes, "in_channels": 3, "input_size": [height, width],
                   "normalisation": normalisation, "head": head, "source": source,
                   "batchnorm2d_layers": _count_batchnorm2d(model)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or of a `.pt`/`.pth` holding a state dict (plain or under
    "state_dict"), without unpickling anything; wrapper prefixes ("module.", "_orig_mod.") removed;
    every floating tensor checked finite."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        state = _read_torch_state(path)
    else:
        raise InputError(f"weights file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}, "
                         f"got {suffix or 'no suffix'!r}")
    if not state:
        raise InputError(f"weights file {path} holds no tensors")
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    check_finite_weights(state, f"weights file {path}")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise InputError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        return dict(load_file(path, device="cpu"))
    except Exception as error:  # SafetensorError, OSError, ... for a truncated or foreign file
        raise InputError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None


def _read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    payload = load_weights_only(path, kind="torch file", advice=" (a whole pickled model?); save "
                                "model.state_dict() instead, or use safetensors")
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items()):
        found = sorted(map(str, payload))[:8] if isinstance(payload, Mapping) else type(payload).__name__
        raise InputError(f"{path} is not a state dict: expected {{name: tensor}} or "
                         f"{{'state_dict': {{name: tensor}}}}, got {found}")
    return dict(payload)


def _load_strictly(model: nn.Module, state: dict[str, torch.Tensor], weights, spec: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise InputError(f"{weights} does not match {spec}: {len(missing)} missing key(s) {_few(missing)}, "
                         f"{len(unexpected)} unexpected key(s) {_few(unexpected)}")
    wrong = [f"{key} {tuple(state[key].shape)} (model {tuple(value.shape)})"
             for key, value in expected.items() if state[key].shape != value.shape]
    if wrong:
        raise InputError(f"{weights} does not match {spec}: tensor shapes differ: {_few(wrong)}")
    model.load_state_dict(state, strict=True)


def _few(items: list[str], count: int = 5) -> str:
    return str(items[:count])[:-1] + (", ...]" if len(items) > count else "]")


def _normalisation(mean, std) -> Normalisation:
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if any(abs(v) > 1.0 for v in mean) or any(v > 1.0 for v in std):
        # The common slip: ImageNet statistics on the 0-255 scale (123.675, ...).
        raise InputError(f"mean and std are on the [0, 1] pixel scale (e.g. ImageNet {IMAGENET_MEAN} / "
                         f"{IMAGENET_STD}), got {mean} / {std}; divide 0-255 values by 255")
    if len(mean) == 1 and len(std) in (1, 3):
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"mean and std need 1 or 3 values each for an RGB model, got {len(mean)} and {len(std)}")
    return Normalisation(mean, std)


def _classifier_head(model: nn.Module, spec: str) -> str:
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise InputError(f"{spec} has no nn.Linear classifier head; backdoor-engine reads the number of classes, "
                         "penultimate features and logits from one")
    return linears[-1]


def _check_head_gives_output(model: nn.Module, head: str, spec: str, size: tuple[int, int]) -> None:
    """One image through the model: the input size must suit the architecture, and the head's output
    must be the model's output (else the logits and penultimate captures would read the wrong module)."""
    seen = []
    handle = dict(model.named_modules())[head].register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, 3, *size))
    except RuntimeError as error:
        raise InputError(f"{spec} cannot run on {size[0]}x{size[1]} images ({str(error).splitlines()[0]}); "
                         "give another --input-size") from None
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(output, torch.Tensor) or not torch.equal(seen[0], output):
        raise InputError(f"{spec}: the last nn.Linear ({head!r}) does not produce the model's output, so the "
                         "logits cannot be read from it; such a model is not supported")


def _count_batchnorm2d(model: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def _build_skeleton(build: Callable[[int], nn.Module]) -> nn.Module:
    try:
        with torch.device("meta"):
            return build(1000)
    except Exception:  # an init that reads values (.item()) cannot run on meta tensors: build for real
        with torch.random.fork_rng(devices=[]):
            return build(1000)


def _unknown(library: str, name: str, available: list[str]) -> InputError:
    close = difflib.get_close_matches(name, available, n=6, cutoff=0.5)
    hint = (f"close names: {', '.join(close)}" if close
            else f"{len(available)} are available, e.g. {', '.join(available[:6])}")
    return InputError(f"{library} has no classification model {name!r}; {hint}")


def _torchvision_builder(name: str):
    torchvision = _import_torchvision()
    from torchvision import models

    available = sorted(models.list_models(module=models))  # classification models only
    if name not in available:
        raise _unknown("torchvision", name, available)

    def build(num_classes: int) -> nn.Module:
        return models.get_model(name, weights=None, num_classes=num_classes)

    defaults = {"input_size": DEFAULT_INPUT_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 1000}
    return build, defaults, torchvision.__version__


def _timm_builder(name: str):
    try:
        _import_torchvision()  # timm imports torchvision
        import timm
    except ImportError:
        raise InputError("--model timm:NAME needs timm: pip install 'backdoor-engine[timm]'") from None
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    config = timm.get_pretrained_cfg(name)
    config = {} if config is None else config.to_dict()
    defaults = {"input_size": tuple(config.get("input_size", (3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE))[1:]),
                "mean": config.get("mean", IMAGENET_MEAN), "std": config.get("std", IMAGENET_STD),
                "num_classes": config.get("num_classes", 1000) or 1000}

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build, defaults, timm.__version__


_torchvision_ops_missing_warned = False


def _import_torchvision():
    """torchvision, also when its compiled operators cannot load with this torch.

    The torchvision wheel on PyPI is built for CUDA torch; beside a CPU-only torch its `_C` library
    does not load, and its import then stops at registering a fake kernel for `torchvision::nms`
    ("operator torchvision::nms does not exist"). Its classification models are plain Python and
    never call those operators, so we declare the operator names its import registers against and
    import again, with a warning: detection operators (nms, roi_align) stay unusable.
    """
    global _torchvision_ops_missing_warned
    try:
        import torchvision
        return torchvision
    except ImportError:
        raise InputError("--model torchvision:NAME needs torchvision, the release built for torch "
                         f"{torch.__version__}: pip install torchvision") from None
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        if not _has_schema(f"torchvision::{op}"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keep_alive.append(library)
    try:
        import torchvision
    except RuntimeError as error:
        raise InputError(f"torchvision does not import with torch {torch.__version__} ({error}); install the "
                         "torchvision release built for this torch (CPU torch: from PyTorch's CPU index)") from None
    if not _torchvision_ops_missing_warned:
        _torchvision_ops_missing_warned = True
        print(f"backdoor-engine: warning: torchvision {torchvision.__version__}'s compiled operators do not load with "
              f"torch {torch.__version__} (a CUDA torchvision beside a CPU torch?); its classification models are "
              "plain Python and are used without them", file=sys.stderr)
    return torchvision


_keep_alive: list = []  # the Library holding the declared operator names must outlive the import


def _has_schema(qualified: str) -> bool:
    namespace, _, op = qualified.partition("::")
    return hasattr(getattr(torch.ops, namespace), op)
