"""Runs of the web service: a small SQLite index of runs and their events, and the live runs.

The LangGraph checkpointer holds each run's graph state (that is what lets a paused review resume
after a restart); this index holds what the page shows — the run's status, upload metadata and the
typed events it streamed — so a restarted server can replay them. Both live in the same SQLite
file by default (different tables).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from ..errors import EchoError, EchoInputError
from ..events import AgentEvent, DiagnosisEvent, ReviewRequestedEvent
from ..schemas import ClinicalContext, Diagnosis
from .models import Event, RunStatus

log = logging.getLogger(__name__)

_EVENT = TypeAdapter(Event)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS echo_runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    filename TEXT,
    organ TEXT,
    context TEXT,
    image TEXT,
    diagnosis TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS echo_run_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunNotFound(EchoInputError):
    """No run has this id (HTTP 404)."""


class StorageBusyError(EchoError):
    """The run database stayed locked or busy through every retry (HTTP 503: try again later)."""


def is_transient_storage_error(exc: BaseException) -> bool:
    """SQLite's "database is locked" / "busy": another connection holds the lock; worth retrying."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


#: How long storage operations keep retrying a locked database (seconds, exponential backoff).
STORAGE_RETRY_S = 60.0


async def with_storage_retries(op: Any, *, what: str, on_retry: Any = None, retry_s: float | None = None) -> Any:
    """``await op()``, retried with exponential backoff (0.2 s .. 2 s) while it fails with a transient
    SQLite lock, for at most ``retry_s`` (default :data:`STORAGE_RETRY_S`); then :class:`StorageBusyError`.
    ``on_retry()`` runs before each new attempt (e.g. a rollback of the failed transaction)."""
    from tenacity import AsyncRetrying, RetryError, retry_if_exception, stop_after_delay, wait_exponential

    limit = STORAGE_RETRY_S if retry_s is None else retry_s
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient_storage_error), stop=stop_after_delay(limit),
            wait=wait_exponential(multiplier=0.2, max=2.0), reraise=False,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.warning("%s: the run database was locked; retrying (attempt %d)", what,
                                attempt.retry_state.attempt_number)
                    if on_retry is not None:
                        await on_retry()
                return await op()
    except RetryError as exc:
        raise StorageBusyError(
            f"{what}: the run database stayed locked for {limit:.0f} s; nothing was changed, try again shortly"
        ) from exc.last_attempt.exception()
    raise AssertionError("unreachable")  # pragma: no cover


async def roll_back_unfinished_write(conn: Any, lock: asyncio.Lock | None = None, *, wait_s: float = 10.0) -> bool:
    """Before an aiosqlite connection closes: roll back a transaction a cancelled write left open.

    A stop can cancel a write between its statement and its commit. If a cursor of the connection
    is still alive, half-way through a read (a cancelled frame in a reference cycle keeps it), then
    closing the connection does not end that transaction: SQLite keeps the connection's write lock
    until the garbage collector frees the cursor, and a server started on the same file finds the
    database locked. ``lock`` is the owner's write lock; holding it means no write is in progress,
    so only a transaction nobody will commit is undone (if it stays taken ``wait_s`` seconds, the
    connection is left as it is). Returns whether a transaction was rolled back.
    """
    if lock is not None:
        try:
            await asyncio.wait_for(lock.acquire(), wait_s)
        except asyncio.TimeoutError:
            log.warning("a database write was still running after %.0f s at shutdown; closing anyway", wait_s)
            return False
    try:
        if conn is None or not conn.in_transaction:
            return False
        log.warning("a write was stopped before its commit; rolling it back before closing the database")
        await conn.rollback()
        return True
    except (ValueError, sqlite3.Error):  # already closed, or nothing left to undo
        return False
    finally:
        if lock is not None:
            lock.release()


class RunConflict(EchoInputError):
    """The run is not in a state that allows the operation, e.g. a review of a finished run (HTTP 409)."""


@dataclass
class RunRecord:
    """One row of the run index."""

    run_id: str
    status: RunStatus
    created_at: str
    updated_at: str
    filename: str | None = None
    organ: str | None = None
    context: dict[str, Any] | None = None
    image: dict[str, Any] | None = None
    diagnosis: dict[str, Any] | None = None
    error: str | None = None

    @property
    def label(self) -> str | None:
        return (self.diagnosis or {}).get("label")


class RunIndex:
    """Async SQLite table of runs and their events (``aiosqlite``, WAL mode)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        import aiosqlite

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await aiosqlite.connect(str(self.path), timeout=30)
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.executescript(_SCHEMA)
        await self._conn.commit()

    async def close(self) -> None:
        if self._conn is not None:
            await roll_back_unfinished_write(self._conn, self._lock)
            await self._conn.close()
            self._conn = None

    async def _write(self, what: str, sql: str, args: tuple[Any, ...]) -> Any:
        """One statement and its commit, as a unit: a locked database is retried with backoff
        (the failed transaction rolled back first, so the connection is never left half-way)."""

        async def op() -> Any:
            async with self._lock:
                try:
                    cur = await self._conn.execute(sql, args)
                    await self._conn.commit()
                    return cur
                except BaseException:
                    await self._rollback()
                    raise

        return await with_storage_retries(op, what=what)

    async def _rollback(self) -> None:
        try:
            await self._conn.rollback()
        except Exception:  # noqa: BLE001 - nothing more to undo
            pass

    async def _read(self, what: str, sql: str, args: Any, one: bool) -> Any:
        async def op() -> Any:
            async with self._lock:
                cur = await self._conn.execute(sql, args)
                return await (cur.fetchone() if one else cur.fetchall())

        return await with_storage_retries(op, what=what)

    async def create(self, rec: RunRecord) -> None:
        await self._write(
            "saving the run", "INSERT INTO echo_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.run_id, rec.status, rec.created_at, rec.updated_at, rec.filename, rec.organ,
             _dump(rec.context), _dump(rec.image), _dump(rec.diagnosis), rec.error),
        )

    async def update(self, run_id: str, **fields: Any) -> None:
        cols = {k: (_dump(v) if k in ("context", "image", "diagnosis") else v) for k, v in fields.items()}
        cols["updated_at"] = _now()
        sets = ", ".join(f"{k} = ?" for k in cols)
        await self._write("updating the run", f"UPDATE echo_runs SET {sets} WHERE run_id = ?", (*cols.values(), run_id))

    async def add_event(self, run_id: str, seq: int, event: AgentEvent) -> None:
        await self._write(
            "saving an event", "INSERT OR REPLACE INTO echo_run_events VALUES (?, ?, ?)",
            (run_id, seq, json.dumps(event.model_dump(mode="json"))),
        )

    async def get(self, run_id: str) -> RunRecord:
        row = await self._read("reading the run", "SELECT * FROM echo_runs WHERE run_id = ?", (run_id,), one=True)
        if row is None:
            raise RunNotFound(f"there is no run {run_id!r}; start one with POST /api/runs")
        return _record(row)

    async def events(self, run_id: str, since: int = 0) -> list[AgentEvent]:
        rows = await self._read(
            "reading events", "SELECT event FROM echo_run_events WHERE run_id = ? AND seq >= ? ORDER BY seq",
            (run_id, since), one=False,
        )
        return [_EVENT.validate_python(json.loads(r[0])) for r in rows]

    async def list(self, status: str | None = None, limit: int = 50) -> list[RunRecord]:
        q, args = "SELECT * FROM echo_runs", []
        if status:
            q += " WHERE status = ?"
            args.append(status)
        q += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(limit)
        rows = await self._read("listing runs", q, args, one=False)
        return [_record(r) for r in rows]

    async def mark_abandoned(self) -> int:
        """Runs left 'running' by a stopped server cannot continue: mark them failed."""
        cur = await self._write(
            "marking abandoned runs", "UPDATE echo_runs SET status = 'error', updated_at = ?, error = ? WHERE status = 'running'",
            (_now(), "the server stopped while this run was in progress; upload the image again"),
        )
        return cur.rowcount


def _dump(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _record(row: Any) -> RunRecord:
    run_id, status, created, updated, filename, organ, context, image, diagnosis, error = row
    return RunRecord(
        run_id=run_id, status=status, created_at=created, updated_at=updated, filename=filename, organ=organ,
        context=json.loads(context) if context else None, image=json.loads(image) if image else None,
        diagnosis=json.loads(diagnosis) if diagnosis else None, error=error,
    )


@dataclass
class _Live:
    """A run in progress in this process: its events so far and a condition to wait for more."""

    events: list[AgentEvent] = field(default_factory=list)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[Any] | None = None


class RunManager:
    """Starts runs in the background, records their events, and resumes them with a review.

    Args:
        agent: an :class:`~echo_agent.EchoAgent` built with ``review=True`` and an async-capable
            checkpointer (its graph is driven with ``astream``/``aget_state``).
        index: the run index.
    """

    def __init__(self, agent: Any, index: RunIndex) -> None:
        self.agent = agent
        self.index = index
        self._live: dict[str, _Live] = {}
        self._review_locks: dict[str, asyncio.Lock] = {}

    # -- starting ------------------------------------------------------------------------------------
    async def start(
        self, loaded: Any, *, filename: str | None, organ: str | None, context: ClinicalContext | None
    ) -> RunRecord:
        """Record a new run for an already validated image and start the agent on it."""
        run_id = uuid.uuid4().hex
        ref = await asyncio.to_thread(loaded.to_ref, self.agent.toolkit.get_store())  # hashes and writes a PNG
        now = _now()
        rec = RunRecord(
            run_id=run_id, status="running", created_at=now, updated_at=now, filename=filename, organ=organ,
            context=context.model_dump(exclude_none=True) if context is not None else None,
            image={"id": ref["id"], "width": ref["width"], "height": ref["height"],
                   "source_kind": ref.get("source_kind")},
        )
        await self.index.create(rec)
        live = self._live[run_id] = _Live()
        live.task = asyncio.create_task(self._execute(run_id, loaded, organ, context), name=f"echo-run-{run_id}")
        return rec

    async def _execute(self, run_id: str, loaded: Any, organ: str | None, context: ClinicalContext | None) -> None:
        live = self._live[run_id]
        paused: Diagnosis | None = None
        final: Diagnosis | None = None
        try:
            async for ev in self.agent.astream(loaded, organ=organ, context=context, thread_id=run_id):
                if ev.type == "perceived":
                    await self.index.update(run_id, organ=ev.organ)
                if isinstance(ev, ReviewRequestedEvent):
                    paused = ev.diagnosis
                elif isinstance(ev, DiagnosisEvent):
                    final = ev.diagnosis
                await self._record(run_id, live, ev)
            if paused is not None:
                await self.index.update(run_id, status="pending-review", diagnosis=paused.model_dump(mode="json"))
            elif final is not None:
                await self.index.update(run_id, status="done", diagnosis=final.model_dump(mode="json"))
            else:
                await self.index.update(run_id, status="error", error="the run ended without a diagnosis")
        except asyncio.CancelledError:
            await self.index.update(run_id, status="error", error="the server stopped while this run was in progress")
            raise
        except EchoError as exc:
            await self.index.update(run_id, status="error", error=str(exc))
        except Exception as exc:  # a bug or a backend failure: keep the server up, show what happened
            log.exception("run %s failed", run_id)
            await self.index.update(run_id, status="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            async with live.cond:
                live.task = None
                live.cond.notify_all()
            self._live.pop(run_id, None)

    async def _record(self, run_id: str, live: _Live | None, ev: AgentEvent) -> None:
        seq = len(live.events) if live is not None else len(await self.index.events(run_id))
        await self.index.add_event(run_id, seq, ev)
        if live is not None:
            async with live.cond:
                live.events.append(ev)
                live.cond.notify_all()

    # -- reading -------------------------------------------------------------------------------------
    def is_live(self, run_id: str) -> bool:
        return run_id in self._live

    async def events_since(self, run_id: str, since: int) -> tuple[list[AgentEvent], bool]:
        """Events with index >= ``since`` and whether more may come."""
        live = self._live.get(run_id)
        if live is not None:
            return live.events[since:], True
        return await self.index.events(run_id, since), False

    async def wait(self, run_id: str, seen: int, timeout: float) -> bool:
        """Wait until the run has more than ``seen`` events or has finished; False if ``timeout`` passed first."""
        live = self._live.get(run_id)
        if live is None:
            return True
        async with live.cond:
            try:
                await asyncio.wait_for(
                    live.cond.wait_for(lambda: len(live.events) > seen or live.task is None), timeout
                )
            except asyncio.TimeoutError:
                return False
        return True

    async def wait_until_settled(self, run_id: str) -> None:
        """Wait for a running run to pause for review, finish or fail."""
        live = self._live.get(run_id)
        task = live.task if live is not None else None
        if task is not None:
            await asyncio.shield(task)

    # -- review --------------------------------------------------------------------------------------
    async def review(self, run_id: str, decision: Any) -> Diagnosis:
        """Resume a paused run with a :class:`~echo_agent.graph.ReviewDecision`; return the final Diagnosis."""
        if not decision.reviewer:
            raise EchoInputError("a review needs a reviewer id; fill in 'reviewer'")
        lock = self._review_locks.setdefault(run_id, asyncio.Lock())
        async with lock:
            # A locked database is retried as a whole: each attempt starts from what the checkpointer
            # holds, so a review is applied once or not at all.
            return await with_storage_retries(lambda: self._review_once(run_id, decision), what="applying the review")

    async def _review_once(self, run_id: str, decision: Any) -> Diagnosis:
        rec = await self.index.get(run_id)
        done_review = ((rec.diagnosis or {}).get("review") or {}) if rec.status == "done" else {}
        if done_review and done_review.get("reviewer") == decision.reviewer and done_review.get("action") == decision.action:
            return Diagnosis.model_validate(rec.diagnosis)  # a client retrying the review it already made
        if rec.status != "pending-review":
            raise RunConflict(f"run {run_id} is {rec.status}, not waiting for review; only a paused run can be reviewed")
        config = {"configurable": {"thread_id": run_id}}
        snapshot = await self.agent.graph.aget_state(config)
        if not snapshot.next:
            applied = (snapshot.values or {}).get("diagnosis") or {}
            review = applied.get("review") or {}
            if review:
                # The graph took a review but the index did not record it (storage failed in between):
                # finish the bookkeeping instead of leaving the run stuck in 'pending-review'.
                final = Diagnosis.model_validate(applied)
                await self.index.update(run_id, status="done", diagnosis=final.model_dump(mode="json"))
                if review.get("reviewer") == decision.reviewer and review.get("action") == decision.action:
                    return final  # the same review again (a client retry): answered, applied once
                raise RunConflict(f"run {run_id} was already reviewed by {review.get('reviewer')!r} ({review.get('action')})")
            raise RunConflict(
                f"run {run_id} has no paused graph state in the checkpointer (was the database replaced?)"
            )
        events = await self.index.events(run_id)
        seen = len(events)
        final: Diagnosis | None = None
        # astream_resume dry-runs the decision first (an invalid one must never reach the graph)
        # and emits the same typed events as EchoAgent.stream.
        async for ev in self.agent.astream_resume(
            run_id, decision.model_dump(exclude_none=True), first_step=max((e.step for e in events), default=-1) + 1
        ):
            await self.index.add_event(run_id, seen, ev)
            seen += 1
            if isinstance(ev, DiagnosisEvent):
                final = ev.diagnosis
        if final is None:
            values = (await self.agent.graph.aget_state(config)).values
            final = Diagnosis.model_validate(values["diagnosis"])
        await self.index.update(run_id, status="done", diagnosis=final.model_dump(mode="json"))
        return final

    # -- lifecycle -----------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        tasks = [lv.task for lv in self._live.values() if lv.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
