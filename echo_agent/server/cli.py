"""``echo-agent serve``: run the web service with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EchoInputError, MissingExtraError


def serve_command(
    host: str = "127.0.0.1",
    port: int = 8000,
    db: str | os.PathLike[str] = "echo-agent.sqlite",
    reload: bool = False,
    *,
    max_upload_mb: float = 20.0,
    checkpointer_url: str | None = None,
    log_level: str = "info",
    allowed_hosts: tuple[str, ...] = (),
    tokens_file: str | os.PathLike[str] | None = None,
) -> int:
    """Serve the page and the JSON API until interrupted; return the exit code.

    Args:
        host: interface to listen on (``0.0.0.0`` exposes the service to the network: that needs
            ``tokens_file``, and a TLS-terminating proxy in front).
        port: TCP port.
        db: SQLite file for runs and checkpoints; uploaded images go to ``<db without suffix>.images/``.
        reload: restart on code changes (development only).
        max_upload_mb: largest accepted upload.
        checkpointer_url: ``postgresql://...`` to keep LangGraph checkpoints in Postgres.
        log_level: uvicorn's log level.
        allowed_hosts: more host names to answer to (see ``create_app``); a non-loopback ``host``
            is added automatically.
        tokens_file: ``reviewer:token`` lines (:func:`echo_agent.server.app.load_tokens`); every API
            call then needs a token and reviews are recorded under its reviewer. Required when
            ``host`` is not a loopback address.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("uvicorn", "serve", "echo-agent serve") from exc
    if not 0 < port < 65536:
        raise EchoInputError(f"port must be between 1 and 65535, got {port}")
    db_path = Path(db).expanduser().resolve()
    if db_path.is_dir():
        raise EchoInputError(f"--db {str(db_path)!r} is a folder; give a file path such as runs.sqlite")
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not loopback and tokens_file is None:
        raise EchoInputError(
            f"--host {host} exposes the service beyond this machine: give --tokens-file (lines 'reviewer:token') "
            "so every call is authenticated, or keep the default 127.0.0.1"
        )
    from .app import load_tokens

    tokens = load_tokens(tokens_file) if tokens_file is not None else None
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        allowed_hosts = (*allowed_hosts, host)
    if reload:
        # uvicorn's reloader imports the app in a child process, so the settings travel as env vars.
        os.environ["ECHO_AGENT_SERVE_DB"] = str(db_path)
        os.environ["ECHO_AGENT_SERVE_MAX_UPLOAD_MB"] = str(max_upload_mb)
        if checkpointer_url:
            os.environ["ECHO_AGENT_SERVE_CHECKPOINTER_URL"] = checkpointer_url
        if allowed_hosts:
            os.environ["ECHO_AGENT_SERVE_ALLOWED_HOSTS"] = ",".join(allowed_hosts)
        if tokens_file is not None:
            os.environ["ECHO_AGENT_SERVE_TOKENS_FILE"] = str(Path(tokens_file).expanduser().resolve())
        uvicorn.run("echo_agent.server.app:app_from_env", factory=True, host=host, port=port, reload=True,
                    log_level=log_level)
        return 0
    from .app import create_app

    app = create_app(db_path=db_path, max_upload_mb=max_upload_mb, checkpointer_url=checkpointer_url,
                     allowed_hosts=allowed_hosts, auth_tokens=tokens)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return 0


__all__ = ["serve_command"]
