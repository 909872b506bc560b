"""Auxiliary sets for the purification defences: GIC's calibration (gic.py)."""

from .gic import Calibration, GicParams, calibrate

__all__ = ["Calibration", "GicParams", "calibrate"]
