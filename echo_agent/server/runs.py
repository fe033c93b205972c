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
            await self._conn.close()
            self._conn = None

    async def create(self, rec: RunRecord) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT INTO echo_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.run_id, rec.status, rec.created_at, rec.updated_at, rec.filename, rec.organ,
                 _dump(rec.context), _dump(rec.image), _dump(rec.diagnosis), rec.error),
            )
            await self._conn.commit()

    async def update(self, run_id: str, **fields: Any) -> None:
        cols = {k: (_dump(v) if k in ("context", "image", "diagnosis") else v) for k, v in fields.items()}
        cols["updated_at"] = _now()
        sets = ", ".join(f"{k} = ?" for k in cols)
        async with self._lock:
            await self._conn.execute(f"UPDATE echo_runs SET {sets} WHERE run_id = ?", (*cols.values(), run_id))
            await self._conn.commit()

    async def add_event(self, run_id: str, seq: int, event: AgentEvent) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT OR REPLACE INTO echo_run_events VALUES (?, ?, ?)",
                (run_id, seq, json.dumps(event.model_dump(mode="json"))),
            )
            await self._conn.commit()

    async def get(self, run_id: str) -> RunRecord:
        async with self._lock:
            cur = await self._conn.execute("SELECT * FROM echo_runs WHERE run_id = ?", (run_id,))
            row = await cur.fetchone()
        if row is None:
            raise RunNotFound(f"there is no run {run_id!r}; start one with POST /api/runs")
        return _record(row)

    async def events(self, run_id: str, since: int = 0) -> list[AgentEvent]:
        async with self._lock:
            cur = await self._conn.execute(
                "SELECT event FROM echo_run_events WHERE run_id = ? AND seq >= ? ORDER BY seq", (run_id, since)
            )
            rows = await cur.fetchall()
        return [_EVENT.validate_python(json.loads(r[0])) for r in rows]

    async def list(self, status: str | None = None, limit: int = 50) -> list[RunRecord]:
        q, args = "SELECT * FROM echo_runs", []
        if status:
            q += " WHERE status = ?"
            args.append(status)
        q += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(limit)
        async with self._lock:
            cur = await self._conn.execute(q, args)
            rows = await cur.fetchall()
        return [_record(r) for r in rows]

    async def mark_abandoned(self) -> int:
        """Runs left 'running' by a stopped server cannot continue: mark them failed."""
        async with self._lock:
            cur = await self._conn.execute(
                "UPDATE echo_runs SET status = 'error', updated_at = ?, error = ? WHERE status = 'running'",
                (_now(), "the server stopped while this run was in progress; upload the image again"),
            )
            await self._conn.commit()
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
            rec = await self.index.get(run_id)
            if rec.status != "pending-review":
                raise RunConflict(f"run {run_id} is {rec.status}, not waiting for review; only a paused run can be reviewed")
            config = {"configurable": {"thread_id": run_id}}
            snapshot = await self.agent.graph.aget_state(config)
            if not snapshot.next:
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
