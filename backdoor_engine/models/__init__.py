"""Reference architectures, preprocessing, a seeded trainer, checkpoints and evaluation."""

from .augment import random_crop_flip
from .base import ImageClassifier
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import accuracy, attack_success_rate, predict
from .preprocess import Normalisation, check_images, fit_normalisation, to_model_input
from .registry import available_archs, build_model
from .train import TrainConfig, TrainResult, train_epoch, train_model

__all__ = [
    "ImageClassifier", "Normalisation", "TrainConfig", "TrainResult", "accuracy", "attack_success_rate",
    "available_archs", "build_model", "check_images", "fit_normalisation", "load_checkpoint", "predict",
    "random_crop_flip", "save_checkpoint", "to_model_input", "train_epoch", "train_model",
]
