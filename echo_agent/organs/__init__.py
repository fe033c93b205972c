"""The organ registry.

Built-in organs are ``breast`` and ``kidney``. A separate package adds an organ by exposing an
``OrganSpec`` (or a zero-argument callable returning one) under the entry-point group
``echo_agent.organs``::

    [project.entry-points."echo_agent.organs"]
    liver = "my_pkg.organs:LIVER"

or at run time with :func:`register_organ`. ``docs/plugins.md`` walks through a complete plug-in.
"""

from __future__ import annotations

import threading
from importlib.metadata import entry_points

from ..errors import UnknownOrganError
from .builtin import BREAST, KIDNEY, load_spec_yaml
from .plugins import register_plugins
from .spec import AppearanceRule, CategoryBand, OrganSpec, category_readout_index, resolve_asset

ENTRY_POINT_GROUP = "echo_agent.organs"

_lock = threading.RLock()
_registry: dict[str, OrganSpec] = {}
_entry_points_loaded = False


def register_organ(spec: OrganSpec, *, replace: bool = False) -> OrganSpec:
    """Add an organ to the registry (``replace=True`` to override an existing one)."""
    if not isinstance(spec, OrganSpec):
        raise TypeError(f"register_organ expects an OrganSpec, got {type(spec).__name__}")
    with _lock:
        if spec.name in _registry and not replace and _registry[spec.name] != spec:
            raise ValueError(
                f"organ {spec.name!r} is already registered; pass replace=True to override it"
            )
        _registry[spec.name] = spec
    return spec


def unregister_organ(name: str) -> None:
    """Remove an organ (mostly for tests)."""
    with _lock:
        _registry.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        register_plugins(entry_points(group=ENTRY_POINT_GROUP), OrganSpec, register_organ, "organ")


def get_organ(name: str) -> OrganSpec:
    """Look up a registered organ by name."""
    _load_entry_points()
    with _lock:
        try:
            return _registry[name]
        except KeyError:
            raise UnknownOrganError(
                f"organ {name!r} is not registered; known organs: {sorted(_registry)} "
                "(register one with echo_agent.register_organ)"
            ) from None


def list_organs() -> list[OrganSpec]:
    """All registered organs, built-ins first."""
    _load_entry_points()
    with _lock:
        return list(_registry.values())


register_organ(BREAST)
register_organ(KIDNEY)

__all__ = [
    "ENTRY_POINT_GROUP",
    "BREAST",
    "KIDNEY",
    "AppearanceRule",
    "CategoryBand",
    "OrganSpec",
    "category_readout_index",
    "get_organ",
    "list_organs",
    "load_spec_yaml",
    "register_organ",
    "resolve_asset",
    "unregister_organ",
]
