"""The web service: a FastAPI app with a JSON API, Server-Sent Events and a review page.

Needs the ``serve`` extra (``pip install 'echo-agent[serve]'``)::

    from echo_agent.server import create_app
    app = create_app(db_path="runs.sqlite")

or from the shell: ``echo-agent serve --db runs.sqlite``. See ``docs/serving.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .app import create_app


def __getattr__(name: str) -> Any:
    # FastAPI is imported only when the app is asked for, so the CLI can report a missing extra.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'echo_agent.server' has no attribute {name!r}")


__all__ = ["create_app"]
