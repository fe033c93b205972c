"""Deprecated location: fitting the learned fusion moved to :mod:`echo_agent.training.fusion_fit`.

Names are resolved lazily (``reasoners`` sits below ``training`` in the package layers and does not
import it).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

warnings.warn("echo_agent.reasoners.fusion_training moved to echo_agent.training.fusion_fit; import from there",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    module = importlib.import_module("echo_agent.training.fusion_fit")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
