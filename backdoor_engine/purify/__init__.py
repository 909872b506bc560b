"""Repairs after detection: one file per strategy.

  retrain          FLARE(P): train a fresh model on the samples a detector kept
  unlearn_relearn  FLARE(R) / D-BR: per epoch, gradient ascent on the flagged samples, then CE on the kept
"""

from .retrain import retrain_on_kept
from .unlearn_relearn import UnlearnRelearnConfig, unlearn_relearn

STRATEGIES = ("retrain", "unlearn-relearn")

__all__ = ["STRATEGIES", "UnlearnRelearnConfig", "retrain_on_kept", "unlearn_relearn"]
