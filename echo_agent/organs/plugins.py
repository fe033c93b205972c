"""Registering what plug-in packages expose through entry points (organs, dataset centers)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any


def register_plugins(eps: Iterable[Any], kind: type, register: Callable[[Any], Any], what: str) -> None:
    """Load each entry point of ``eps`` and ``register`` what it exposes: an instance of ``kind``, a
    list or tuple of them, or a zero-argument callable returning either. A plug-in that fails to load
    or register is skipped with a warning naming it, so a broken plug-in never takes the others down."""
    for ep in eps:
        try:
            obj = ep.load()
            obj = obj() if callable(obj) and not isinstance(obj, kind) else obj
            for item in obj if isinstance(obj, (list, tuple)) else [obj]:
                register(item)
        except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported, not raised
            warnings.warn(f"{what} plug-in {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=3)


__all__ = ["register_plugins"]
