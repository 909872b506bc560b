"""Repairs after detection: one file per strategy.

  retrain          FLARE(P): train a fresh model on the samples a detector kept
  unlearn_relearn  FLARE(R) / D-BR: per epoch, gradient ascent on the flagged samples, then CE on the kept
"""

from .retrain import retrain_on_kept
from .unlearn_relearn import D_BR_DEFAULTS, unlearn_relearn, unlearn_relearn_config

__all__ = ["D_BR_DEFAULTS", "retrain_on_kept", "unlearn_relearn", "unlearn_relearn_config"]
