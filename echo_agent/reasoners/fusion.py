"""Deprecated location: the evidence fusion moved to :mod:`echo_agent.fusion` (this module re-exports it)."""

from __future__ import annotations

import warnings

from ..fusion.diagnosis import *  # noqa: F403
from ..fusion.diagnosis import __all__ as _diagnosis_all
from ..fusion.evidence import collect, region_descriptors
from ..fusion.heuristic import HeuristicFusion

warnings.warn("echo_agent.reasoners.fusion moved to echo_agent.fusion; import from there",
              DeprecationWarning, stacklevel=2)

__all__ = [*_diagnosis_all, "HeuristicFusion", "collect", "region_descriptors"]
