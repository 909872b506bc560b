"""Dataset sources, the npz contract and the dataset fingerprint; one module per source kind.

    source.py         the Source protocol, Batch, SourceRange/SourceRows, the PNG/JPEG decoder and
                      the channels/size rule shared by the file-based kinds
    dataset.py        Dataset and the npz contract; ArraySource (a Dataset as a source) and read_all
                      (a source read to the end, optionally into memory-mapped .npy files)
    image_folder.py   DIR/<class>/<image>.png|jpg, read and written
    tar_shards.py     WebDataset-style tar shards, read and written
    cifar.py          CIFAR-10 binary batches and the foolbox samples
    fashion_mnist.py  Fashion-MNIST from the Debian package
    open.py           open_source / open_dataset: the one place a spec string is resolved
    fingerprint.py    dataset_fingerprint (pixels) and content_digest (a streamed source's listing)

Poisoning for evaluation lives in data.attacks (imported on demand). Importing this package loads
neither torch nor backdoor_engine.engine.
"""

from backdoor_engine.data.cifar import CLASS_NAMES as CIFAR10_CLASS_NAMES
from backdoor_engine.data.cifar import load_cifar10_binary, load_foolbox_cifar10_samples
from backdoor_engine.data.dataset import ArraySource, Dataset, as_source, load_npz, make_dataset, read_all, save_npz
from backdoor_engine.data.dataset import MAX_CLASSES, check_labels
from backdoor_engine.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASS_NAMES
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.data.fingerprint import dataset_fingerprint
from backdoor_engine.data.image_folder import ImageFolderSource, write_image_folder
from backdoor_engine.data.open import describe_sources, open_dataset, open_source
from backdoor_engine.data.source import Batch, Source
from backdoor_engine.data.tar_shards import TarShardSource, write_tar_shards

__all__ = [
    "ArraySource",
    "Batch",
    "CIFAR10_CLASS_NAMES",
    "FASHION_MNIST_CLASS_NAMES",
    "MAX_CLASSES",
    "Dataset",
    "ImageFolderSource",
    "Source",
    "TarShardSource",
    "as_source",
    "check_labels",
    "dataset_fingerprint",
    "describe_sources",
    "load_cifar10_binary",
    "load_fashion_mnist",
    "load_foolbox_cifar10_samples",
    "load_npz",
    "make_dataset",
    "open_dataset",
    "open_source",
    "read_all",
    "save_npz",
    "write_image_folder",
    "write_tar_shards",
]
