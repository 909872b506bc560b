"""Dataset sources and the npz contract. Poisoning for evaluation lives in data.attacks (imported on demand)."""

from backdoor_engine.data.cifar import CLASS_NAMES as CIFAR10_CLASS_NAMES
from backdoor_engine.data.cifar import load_cifar10_binary, load_foolbox_cifar10_samples
from backdoor_engine.data.dataset import Dataset, load_npz, make_dataset, save_npz
from backdoor_engine.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASS_NAMES
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.data.folder_source import ImageFolderSource
from backdoor_engine.data.image_folder import ImageFolderResult, load_image_folder, write_image_folder
from backdoor_engine.data.source import ArraySource, Batch, Source, as_source
from backdoor_engine.data.sources import describe_sources, open_dataset, open_source, read_all
from backdoor_engine.data.tar_shards import TarShardSource, write_tar_shards

__all__ = [
    "ArraySource",
    "Batch",
    "CIFAR10_CLASS_NAMES",
    "FASHION_MNIST_CLASS_NAMES",
    "Dataset",
    "ImageFolderResult",
    "ImageFolderSource",
    "Source",
    "TarShardSource",
    "as_source",
    "describe_sources",
    "load_cifar10_binary",
    "load_fashion_mnist",
    "load_foolbox_cifar10_samples",
    "load_image_folder",
    "load_npz",
    "make_dataset",
    "open_dataset",
    "open_source",
    "read_all",
    "save_npz",
    "write_image_folder",
    "write_tar_shards",
]
