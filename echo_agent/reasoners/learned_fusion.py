"""Deprecated location: the learned fusion moved to :mod:`echo_agent.fusion` (this module re-exports it)."""

from __future__ import annotations

import warnings

from ..fusion.diagnosis import PRESENCE_CONFLICT_MIN, presence_conflict
from ..fusion.evidence import (
    class_score,
    classifications,
    lesion_probability,
    merged_candidates,
    region_classification,
    whole_image_classification,
)
from ..fusion.learned import *  # noqa: F403
from ..fusion.learned import __all__ as _learned_all

warnings.warn("echo_agent.reasoners.learned_fusion moved to echo_agent.fusion; import from there",
              DeprecationWarning, stacklevel=2)

__all__ = [*_learned_all, "PRESENCE_CONFLICT_MIN", "class_score", "classifications", "lesion_probability",
           "merged_candidates", "presence_conflict", "region_classification", "whole_image_classification"]
