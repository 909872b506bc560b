"""Probes, single-pass extraction and the resumable feature store (DESIGN.md section 1)."""

from backdoor_engine.engine.extract import extract_features
from backdoor_engine.engine.feature_set import CAPTURES, FeatureSet
from backdoor_engine.engine.feature_store import FeatureStore
from backdoor_engine.engine.fingerprint import model_fingerprint
from backdoor_engine.engine.layout import FeatureLayout
from backdoor_engine.engine.probes import ActivationProbes

__all__ = [
    "CAPTURES", "ActivationProbes", "FeatureLayout", "FeatureSet", "FeatureStore",
    "extract_features", "model_fingerprint",
]
