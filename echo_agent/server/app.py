"""The FastAPI application: a JSON API (with its OpenAPI schema at ``/openapi.json``) and the page.

::

    from echo_agent.server import create_app
    app = create_app(db_path="echo-agent.sqlite")        # uvicorn.run(app)

Each upload becomes a run (run id = LangGraph thread id) that the agent works on in the background
and that pauses for a human review before its Diagnosis is final. Runs are checkpointed in SQLite
(or Postgres), uploaded images are kept in a folder next to the database, so a paused review
survives a restart of the server.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from ..errors import (
    EchoError,
    EchoInputError,
    ImageTooLargeError,
    MissingExtraError,
    UnknownOrganError,
    UnreadableImageError,
    UnsupportedFormatError,
)

try:
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("fastapi", "serve", "the web service") from exc

from ..config import AgentFactory
from ..graph.review import ReviewDecision
from ..schemas import ClinicalContext, Diagnosis
from .models import ErrorBody, ImageInfo, OrganInfo, RunState, RunSummary
from .runs import (
    RunConflict,
    RunIndex,
    RunManager,
    RunNotFound,
    RunRecord,
    StorageBusyError,
    is_transient_storage_error,
    roll_back_unfinished_write,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: The server calls its :class:`~echo_agent.config.AgentFactory` as ``factory(checkpointer=..., store=...)``;
#: the agent must have ``review=True``, the given checkpointer, and a Toolkit whose store is ``store``
#: (``functools.partial(EchoAgent.from_config, AgentConfig(review=True, ...))`` does all three).

_ERRORS = {404: {"model": ErrorBody}, 409: {"model": ErrorBody},
           413: {"model": ErrorBody}, 415: {"model": ErrorBody}, 422: {"model": ErrorBody}}


def default_agent_factory(*, checkpointer: Any, store: Any) -> Any:
    """The packaged agent (embedded policy, packaged detectors, organ router) with review on."""
    from ..agent import EchoAgent
    from ..config import AgentConfig

    return EchoAgent.from_config(AgentConfig(review=True), checkpointer=checkpointer, store=store)


def status_for(exc: EchoError) -> int:
    """HTTP status of a library error: 413 too large, 415 not a supported image, 404/409 for runs,
    422 for any other invalid input, 500 otherwise."""
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, UnsupportedFormatError):
        return 415
    if isinstance(exc, RunNotFound):
        return 404
    if isinstance(exc, RunConflict):
        return 409
    if isinstance(exc, StorageBusyError):
        return 503
    if isinstance(exc, (EchoInputError, UnreadableImageError, UnknownOrganError)):
        return 422
    return 500


class BodyLimit:
    """ASGI middleware: POST bodies to ``paths`` may carry at most ``max_bytes`` (HTTP 413 above).

    Checks ``Content-Length`` first; then counts the body as it streams (chunked uploads have no
    length), and once over the limit stops passing it on (the app sees a disconnect) and answers
    413 in place of whatever the app would have answered."""

    def __init__(self, app: Any, *, paths: tuple[str, ...], max_bytes: int, upload_limit: int) -> None:
        self.app, self.paths, self.max_bytes, self.upload_limit = app, paths, max_bytes, upload_limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            await _error(413, _too_big(int(length), self.upload_limit), "ImageTooLargeError")(scope, receive, send)
            return
        seen = 0
        over = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not over:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over:
            await _error(413, _too_big(seen, self.upload_limit), "ImageTooLargeError")(scope, receive, send)


#: Host names the server answers to by default (DNS rebinding: a hostile page's own domain that
#: resolves to 127.0.0.1 sends its name in Host, and is refused).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

#: Headers on every response: no framing, no MIME sniffing, scripts and styles only from the server.
SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                 b"form-action 'self'; object-src 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def _host_name(value: str) -> str:
    """The host part of a Host / Origin authority, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuard:
    """ASGI middleware for the browser-facing server:

    * **Host check** — a request whose ``Host`` is not an allowed name gets 400 (defeats DNS
      rebinding of a loopback server);
    * **Origin check** — a state-changing request (POST, PUT, PATCH, DELETE) from a browser must come
      from the server's own origin: an ``Origin`` of another host:port, or ``Sec-Fetch-Site:
      cross-site`` without one, gets 403 (a page a reviewer visits cannot submit runs or reviews);
    * **security headers** (:data:`SECURITY_HEADERS`) on every response.
    """

    def __init__(self, app: Any, *, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = {_host_name(h) for h in allowed_hosts}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get(b"host", "")
        if "*" not in self.allowed and _host_name(host) not in self.allowed:
            await self._refuse(400, f"host {host[:100]!r} is not served here; use one of {sorted(self.allowed)} "
                                    "(echo-agent serve --allow-host NAME to add one)", "HostNotAllowed", scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            origin = headers.get(b"origin")
            if origin is not None and origin != "null":
                authority = origin.split("://", 1)[-1].rstrip("/")
                if authority.lower() != host.lower():
                    await self._refuse(403, "cross-origin request refused: state-changing requests must come from "
                                            "this server's own page", "CrossOriginRefused", scope, receive, send)
                    return
            elif origin == "null" or headers.get(b"sec-fetch-site") == "cross-site":
                await self._refuse(403, "cross-site request refused", "CrossOriginRefused", scope, receive, send)
                return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _refuse(status: int, detail: str, name: str, scope: Any, receive: Any, send: Any) -> None:
        response = _error(status, detail, name)
        response.headers.update({k.decode(): v.decode() for k, v in SECURITY_HEADERS})
        await response(scope, receive, send)


#: Cookie that carries a browser session's token (set by POST /api/session).
SESSION_COOKIE = "echo_token"
#: API paths open without a token (liveness, and exchanging a token for the session cookie).
OPEN_PATHS = ("/api/health", "/api/session")


class AuthGuard:
    """ASGI middleware: with tokens configured (``token -> reviewer id``), every ``/api/`` request but
    :data:`OPEN_PATHS` needs ``Authorization: Bearer <token>`` or the session cookie; else 401. The
    reviewer id of the token goes into ``scope["state"]["reviewer"]`` (reviews are recorded under it).
    The page itself (``/``, ``/static``) stays open: it holds no data and asks for the token."""

    def __init__(self, app: Any, *, tokens: dict[str, str]) -> None:
        self.app, self.tokens = app, dict(tokens)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or not path.startswith("/api/") or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        auth = headers.get(b"authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token is None:
            from http.cookies import SimpleCookie

            jar = SimpleCookie()
            try:
                jar.load(headers.get(b"cookie", ""))
            except Exception:  # noqa: BLE001 - a malformed cookie header is no token
                jar = SimpleCookie()
            token = jar[SESSION_COOKIE].value if SESSION_COOKIE in jar else None
        reviewer = reviewer_for_token(self.tokens, token)
        if reviewer is None:
            response = _error(401, "this server needs an access token: send 'Authorization: Bearer <token>', or "
                                   "enter it on the page", "Unauthorized")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["reviewer"] = reviewer
        await self.app(scope, receive, send)


def reviewer_for_token(tokens: dict[str, str], token: str | None) -> str | None:
    """The reviewer id of ``token`` (``None``: unknown), compared in constant time with every entry."""
    import hmac

    if not token:
        return None
    found = None
    for known, reviewer in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found = reviewer
    return found


def load_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """``token -> reviewer id`` from a file of ``reviewer:token`` lines (``#`` comments, blank lines
    ignored). Tokens must be at least 16 characters; reviewer ids non-empty and unique."""
    tokens: dict[str, str] = {}
    for n, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        reviewer, sep, token = line.partition(":")
        reviewer, token = reviewer.strip(), token.strip()
        if not sep or not reviewer or len(token) < 16:
            raise EchoInputError(f"{path}, line {n}: expected 'reviewer:token' with a token of at least 16 characters")
        if token in tokens or reviewer in tokens.values():
            raise EchoInputError(f"{path}, line {n}: duplicate reviewer or token")
        tokens[token] = reviewer
    if not tokens:
        raise EchoInputError(f"{path} names no 'reviewer:token' line")
    return tokens


def _error(status: int, detail: str, name: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "error": name}, status_code=status)


@asynccontextmanager
async def open_checkpointer(db_path: Path, checkpointer_url: str | None) -> AsyncIterator[Any]:
    """An async checkpointer: SQLite at ``db_path`` by default, or Postgres for a ``postgresql://`` URL."""
    if checkpointer_url and checkpointer_url.startswith(("postgres://", "postgresql://")):
        try:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        except ImportError as exc:
            raise MissingExtraError("langgraph-checkpoint-postgres", "postgres", "a Postgres checkpointer") from exc
        async with AsyncPostgresSaver.from_conn_string(checkpointer_url) as saver:
            await saver.setup()
            yield saver
        return
    if checkpointer_url:
        raise EchoInputError(
            f"checkpointer_url must be a postgresql:// URL, got {checkpointer_url!r}; leave it empty for SQLite"
        )
    try:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    except ImportError as exc:
        raise MissingExtraError("langgraph-checkpoint-sqlite", "serve", "the SQLite checkpointer") from exc
    async with AsyncSqliteSaver.from_conn_string(str(db_path)) as saver:
        await saver.setup()
        try:
            yield saver
        finally:  # a run stopped mid-checkpoint must not leave its write lock behind
            await roll_back_unfinished_write(saver.conn, saver.lock)


def create_app(
    agent_factory: AgentFactory | None = None,
    db_path: str | os.PathLike[str] = "echo-agent.sqlite",
    max_upload_mb: float = 20.0,
    *,
    image_dir: str | os.PathLike[str] | None = None,
    max_pixels: int = 12_000_000,  # imaging.io.DEFAULT_MAX_PIXELS (a test keeps them equal)
    allowed_hosts: Sequence[str] = (),
    checkpointer_url: str | None = None,
    max_concurrent_decodes: int = 2,
    auth_tokens: dict[str, str] | None = None,
) -> FastAPI:
    """Build the web service.

    Args:
        agent_factory: ``f(checkpointer=..., store=...) -> EchoAgent`` (default:
            :func:`default_agent_factory`). The agent must have ``review=True``, use the given
            checkpointer and a Toolkit whose image store is ``store``.
        db_path: SQLite file holding the run index and (by default) the LangGraph checkpoints.
        max_upload_mb: largest accepted upload (HTTP 413 above it).
        image_dir: folder of the uploaded images (default: ``<db_path without suffix>.images``).
        max_pixels: largest accepted width x height (HTTP 413 above it; checked before decoding).
        allowed_hosts: host names (as in the ``Host`` header, no port) the server answers to besides
            localhost / 127.0.0.1 / ::1, e.g. the name of a reverse proxy in front of it; ``"*"``
            turns the Host check off. Every other Host gets 400 (DNS rebinding).
        auth_tokens: ``token -> reviewer id`` (:func:`load_tokens` reads them from a file). With
            tokens, every API call needs one (bearer header, or the cookie POST /api/session sets
            for the page) and a review is recorded under the token's reviewer, whatever the body
            says. Without, the API is open (loopback use).
        max_concurrent_decodes: uploads decoded at the same time (the others wait): with the pixel
            limit, this bounds the memory that decoding can take (about 1 GB per 12 MP image through
            the agent, see docs/security.md).
        checkpointer_url: a ``postgresql://`` URL to keep checkpoints in Postgres instead of SQLite.

    Returns:
        A FastAPI app; its lifespan opens the database and builds the agent.
    """
    db = Path(db_path).expanduser()
    images = Path(image_dir).expanduser() if image_dir is not None else db.with_suffix(".images")
    factory = agent_factory or default_agent_factory
    max_bytes = int(max_upload_mb * 1024 * 1024)
    if max_concurrent_decodes < 1:
        raise ValueError(f"max_concurrent_decodes must be >= 1, got {max_concurrent_decodes}")
    import asyncio

    decode_slots = asyncio.Semaphore(max_concurrent_decodes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from ..imaging.store import ImageStore

        async with AsyncExitStack() as stack:
            db.parent.mkdir(parents=True, exist_ok=True)
            saver = await stack.enter_async_context(open_checkpointer(db, checkpointer_url))
            store = ImageStore(directory=images)
            agent = factory(checkpointer=saver, store=store)
            if not getattr(agent, "review", False):
                raise EchoError("the server's agent must be built with review=True (agent_factory ignored it)")
            if agent.checkpointer is not saver:
                raise EchoError("agent_factory must pass the given checkpointer to EchoAgent(checkpointer=...)")
            if agent.toolkit.get_store() is not store:
                raise EchoError("agent_factory must build the Toolkit with the given store (Toolkit(store=store))")
            index = RunIndex(db)
            await index.open()
            stack.push_async_callback(index.close)
            abandoned = await index.mark_abandoned()
            if abandoned:
                log.warning("%d run(s) were in progress when the server last stopped; marked as failed", abandoned)
            manager = RunManager(agent, index)
            stack.push_async_callback(manager.shutdown)
            app.state.manager = manager
            app.state.store = store
            yield

    app = FastAPI(
        title="echo-agent",
        version=_version(),
        summary="Ultrasound diagnosis agent with human review.",
        description="Upload an ultrasound image, watch the agent's steps, review its Diagnosis.",
        lifespan=lifespan,
    )

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input back, and an input such as NaN cannot be
        # written as JSON (the 422 became a 500): answer with where and why only.
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors, "error": "ValidationError"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Every error has the JSON shape, never a plain-text 500; a lock that outlived the retries
        # (raised outside the retried paths) is a 503 like StorageBusyError.
        if is_transient_storage_error(exc):
            return _error(503, "the run database is locked; try again shortly", "StorageBusyError")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("request %s failed: the disk is full (%s)", request.url.path, exc)
            return _error(507, "the server's disk is full; nothing was stored, try again later", "StorageFullError")
        log.exception("request %s failed", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server logged the details", type(exc).__name__)

    @app.exception_handler(EchoError)
    async def _echo_error(request: Request, exc: EchoError) -> JSONResponse:
        status = status_for(exc)
        if status == 500:
            log.error("request %s failed: %s", request.url.path, exc)
        return _error(status, str(exc), type(exc).__name__)

    # Oversized uploads are refused from their Content-Length before the body is read, and a body
    # without one (chunked) is counted while it streams: past the limit it is cut off (nothing more
    # reaches the multipart parser's temp files) and the answer is the same 413.
    app.add_middleware(BodyLimit, paths=("/api/runs",), max_bytes=max_bytes + 64 * 1024, upload_limit=max_bytes)
    if auth_tokens:
        app.add_middleware(AuthGuard, tokens=dict(auth_tokens))
    # added last, so it runs first: a refused host or origin never reaches the token check, the body
    # limit or the app
    app.add_middleware(RequestGuard, allowed_hosts=(*LOOPBACK_HOSTS, *(allowed_hosts or ())))

    def manager() -> RunManager:
        return app.state.manager

    async def state_of(rec: RunRecord) -> RunState:
        events, _ = await manager().events_since(rec.run_id, 0)
        return RunState(
            run_id=rec.run_id, status=rec.status, created_at=rec.created_at, updated_at=rec.updated_at,
            filename=rec.filename, organ=rec.organ, label=rec.label,
            context=ClinicalContext.model_validate(rec.context) if rec.context else None,
            image=ImageInfo.model_validate(rec.image) if rec.image else None,
            events=events, diagnosis=Diagnosis.model_validate(rec.diagnosis) if rec.diagnosis else None,
            error=rec.error,
            overlay_url=f"/api/runs/{rec.run_id}/overlay.png", events_url=f"/api/runs/{rec.run_id}/events",
            review_url=f"/api/runs/{rec.run_id}/review",
        )

    # -- API -------------------------------------------------------------------------------------------
    @app.post(
        "/api/runs", response_model=RunState, status_code=202, tags=["runs"],
        responses={200: {"model": RunState, "description": "mode=wait: the run paused for review or failed. "
                         "mode=stream: text/event-stream of the run's events.",
                         "content": {"text/event-stream": {}}}, **_ERRORS},
        summary="Upload an image and start a run",
    )
    async def create_run(
        file: Annotated[UploadFile, File(description="The image: PNG, JPEG, TIFF, BMP or DICOM.")],
        organ: Annotated[str | None, Form(description="breast | kidney | ... (default: routed).")] = None,
        age: Annotated[int | None, Form(ge=0, le=130)] = None,
        sex: Annotated[Literal["female", "male", "other"] | None, Form()] = None,
        symptoms: Annotated[str | None, Form()] = None,
        history: Annotated[str | None, Form()] = None,
        notes: Annotated[str | None, Form()] = None,
        frame: Annotated[int | None, Form(ge=0, description="Frame of a multi-frame DICOM/TIFF.")] = None,
        mode: Annotated[
            Literal["background", "wait", "stream"],
            Query(description="background: answer at once (202); wait: answer when the run pauses for "
                  "review or fails; stream: answer with the run's events as Server-Sent Events."),
        ] = "background",
    ) -> Any:
        """Validate the upload as the library does (format, size, pixel count, organ, clinical
        context), then start the agent. The run id is also the LangGraph thread id."""
        from ..agent import to_clinical
        from ..imaging import load_image
        from ..organs import get_organ

        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageTooLargeError(_too_big(len(data), max_bytes))
        if not data:
            raise EchoInputError("the uploaded file is empty; choose an image file")
        organ = (organ or "").strip() or None
        if organ is not None:
            get_organ(organ)
        fields = {"age": age, "sex": sex, "symptoms": symptoms, "history": history, "notes": notes}
        fields = {k: v for k, v in fields.items() if v not in (None, "")}
        context = to_clinical(fields) if fields else None
        if context is not None and context.is_empty():
            context = None
        async with decode_slots:  # at most max_concurrent_decodes images decoded at once
            loaded = await run_in_threadpool(load_image, data, frame=frame, max_pixels=max_pixels)
        rec = await manager().start(loaded, filename=file.filename, organ=organ, context=context)
        if mode == "wait":
            await manager().wait_until_settled(rec.run_id)
            rec = await manager().index.get(rec.run_id)
            return JSONResponse((await state_of(rec)).model_dump(mode="json"), status_code=200)
        if mode == "stream":
            return _sse_response(manager(), rec.run_id, 0, headers={"Location": f"/api/runs/{rec.run_id}"})
        return JSONResponse(
            (await state_of(rec)).model_dump(mode="json"), status_code=202,
            headers={"Location": f"/api/runs/{rec.run_id}"},
        )

    @app.get("/api/runs", response_model=list[RunSummary], tags=["runs"], summary="List recent runs")
    async def list_runs(
        status: Annotated[Literal["running", "pending-review", "done", "error"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[RunSummary]:
        """Newest first; ``status=pending-review`` lists the runs waiting for a reviewer."""
        recs = await manager().index.list(status, limit)
        return [
            RunSummary(run_id=r.run_id, status=r.status, created_at=r.created_at, updated_at=r.updated_at,
                       filename=r.filename, organ=r.organ, label=r.label)
            for r in recs
        ]

    @app.get("/api/runs/{run_id}", response_model=RunState, responses=_ERRORS, tags=["runs"],
             summary="A run's state")
    async def get_run(run_id: str) -> RunState:
        """Status, events so far, the Diagnosis (the agent's while pending review, the reviewed one
        when done) and the URLs of the overlay, the event stream and the review endpoint."""
        return await state_of(await manager().index.get(run_id))

    @app.get(
        "/api/runs/{run_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
        tags=["runs"], summary="The run's events as Server-Sent Events",
    )
    async def run_events(request: Request, run_id: str) -> StreamingResponse:
        """Each SSE message has ``id`` = event index, ``event`` = the event's ``type`` and ``data`` = the
        event JSON (:mod:`echo_agent.events`). Past events are replayed first (after
        ``Last-Event-ID`` when the client reconnects); a final ``end`` message carries the status."""
        await manager().index.get(run_id)
        last = request.headers.get("last-event-id", "")
        since = int(last) + 1 if last.strip().isdigit() else 0
        return _sse_response(manager(), run_id, since, request=request)

    @app.get("/api/runs/{run_id}/overlay.png", response_class=Response, responses={
        200: {"content": {"image/png": {}}}, **_ERRORS}, tags=["runs"], summary="The image with the boxes")
    async def overlay(run_id: str) -> Response:
        """The uploaded image with the Diagnosis findings drawn (before the Diagnosis: the detector's
        boxes so far)."""
        rec = await manager().index.get(run_id)
        if not rec.image:
            raise RunConflict(f"run {run_id} has no image")
        events, _ = await manager().events_since(run_id, 0)
        png = await run_in_threadpool(_render_overlay, app.state.store, rec, events)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/api/runs/{run_id}/review", response_model=Diagnosis, responses=_ERRORS, tags=["review"],
              summary="Accept, edit or reject the Diagnosis")
    async def review(run_id: str, decision: ReviewDecision, request: Request) -> Diagnosis:
        """Resume the paused run with the reviewer's decision. ``reviewer`` is required (with
        tokens, it is the token's reviewer, whatever the body says); ``edit`` changes ``label``,
        ``category`` and/or ``box`` (pixel ``[x1, y1, x2, y2]``); ``reject`` marks the Diagnosis
        indeterminate with the comment. The returned Diagnosis records who changed what in
        ``review``, next to the agent's ``original``."""
        authenticated = getattr(request.state, "reviewer", None)
        if authenticated:
            decision = decision.model_copy(update={"reviewer": authenticated})
        return await manager().review(run_id, decision)

    @app.post("/api/session", tags=["review"], summary="Exchange an access token for a session cookie")
    async def session(body: dict[str, str]) -> JSONResponse:
        """For the page: with a valid token, set an HttpOnly, SameSite=Strict cookie that carries it
        (the page's fetches and its event stream then authenticate); answer the reviewer id."""
        if not auth_tokens:
            return JSONResponse({"reviewer": None, "auth": False})
        token = str(body.get("token", ""))
        reviewer = reviewer_for_token(auth_tokens, token)
        if reviewer is None:
            return _error(401, "unknown access token", "Unauthorized")
        response = JSONResponse({"reviewer": reviewer, "auth": True})
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/api/schema/diagnosis", tags=["schema"], summary="JSON schema of a Diagnosis")
    async def diagnosis_schema() -> dict[str, Any]:
        return Diagnosis.json_schema()

    @app.get("/api/organs", response_model=list[OrganInfo], tags=["schema"], summary="Registered organs")
    async def organs() -> list[OrganInfo]:
        """Labels and categories a reviewer may choose for each organ."""
        from ..organs import list_organs

        out = []
        for s in list_organs():
            out.append(OrganInfo(name=s.name, display_name=s.display_name or s.name, labels=list(s.image_labels),
                                 category_system=s.category_system, categories=list(s.category_scale)))
        return out

    @app.get("/api/health", tags=["schema"], summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # -- page ------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _too_big(n: int, limit: int) -> str:
    return (f"the upload is {n / 1048576:.1f} MB, more than the {limit / 1048576:.0f} MB limit; "
            "send a smaller image (one frame, PNG or JPEG)")


def _render_overlay(store: Any, rec: RunRecord, events: list[Any]) -> bytes:
    from ..imaging import encode_png, render_overlay

    pixels = store.get(rec.image["id"])  # type: ignore[index]
    boxes: list[Any] = []
    title = None
    if rec.diagnosis:
        dx = Diagnosis.model_validate(rec.diagnosis)
        boxes = list(dx.findings)
        # After a review the agent's probability no longer describes the label; say who set it.
        said = f"{dx.review.action} by {dx.review.reviewer}" if dx.review else f"p={dx.probability:.2f}"
        title = f"{dx.label} ({said})" + (f"  {dx.category_system or ''} {dx.category}" if dx.category else "")
    else:
        reports = [e.evidence for e in events if e.type == "evidence" and e.evidence.kind == "detections"]
        if reports:
            boxes = list(reports[-1].detections)
    return encode_png(render_overlay(pixels, boxes, title=title))


def _sse(event: Any, seq: int) -> str:
    return f"id: {seq}\nevent: {event.type}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"


def _sse_response(
    manager: RunManager, run_id: str, since: int, *, request: Request | None = None,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        seq = since
        while True:
            events, live = await manager.events_since(run_id, seq)
            for ev in events:
                yield _sse(ev, seq)
                seq += 1
            if not live:
                rec = await manager.index.get(run_id)
                end = {"status": rec.status, "error": rec.error, "run_id": run_id}
                yield f"event: end\ndata: {json.dumps(end)}\n\n"
                return
            if request is not None and await request.is_disconnected():
                return
            if not await manager.wait(run_id, seq, timeout=15.0):
                yield ": keep-alive\n\n"  # keeps proxies from closing an idle stream

    return StreamingResponse(
        gen(), media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})},
    )


def _version() -> str:
    from .. import __version__

    return __version__


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` / ``--reload``: settings from ``ECHO_AGENT_SERVE_*``
    environment variables (DB, MAX_UPLOAD_MB, CHECKPOINTER_URL, ALLOWED_HOSTS comma-separated)."""
    return create_app(
        db_path=os.environ.get("ECHO_AGENT_SERVE_DB", "echo-agent.sqlite"),
        max_upload_mb=float(os.environ.get("ECHO_AGENT_SERVE_MAX_UPLOAD_MB", "20")),
        checkpointer_url=os.environ.get("ECHO_AGENT_SERVE_CHECKPOINTER_URL") or None,
        allowed_hosts=tuple(h for h in os.environ.get("ECHO_AGENT_SERVE_ALLOWED_HOSTS", "").split(",") if h.strip()),
        auth_tokens=load_tokens(os.environ["ECHO_AGENT_SERVE_TOKENS_FILE"]) if os.environ.get("ECHO_AGENT_SERVE_TOKENS_FILE") else None,
    )


__all__ = ["AgentFactory", "create_app", "default_agent_factory", "load_tokens", "status_for", "app_from_env"]
