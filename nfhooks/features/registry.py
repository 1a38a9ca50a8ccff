"""The features, in their fixed order: the order the compiler asks them for mark fields (so
the mark layout never moves: tests/unit/test_feature_golden.py), builds their rules, and the
engine starts them (stopped in reverse). A new feature is one entry here."""

from __future__ import annotations

from .base import Feature
from .nat import NatFeature
from .offload import OffloadFeature
from .routeshape import RouteShapeFeature
from .sets import SetsFeature

__all__ = ["FEATURES", "Feature"]

#: Stateless feature objects; their per-engine state is what ``runtime()`` returns.
FEATURES: tuple[Feature, ...] = (NatFeature(), OffloadFeature(), RouteShapeFeature(), SetsFeature())
