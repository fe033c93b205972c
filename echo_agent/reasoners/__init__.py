"""Chat models that drive the graph, and the evidence fusion used by the reason node."""

from .fusion import Fusion, HeuristicFusion
from .policy import EmbeddedPolicy

__all__ = ["EmbeddedPolicy", "Fusion", "HeuristicFusion"]
