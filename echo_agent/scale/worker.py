"""The engine-neutral batch worker: one agent per worker process, chunks of items in, journal
records out. Used by the Ray engine (as a Ray Data actor) and the process-pool engine.

Items travel as JSON strings (absolute image paths), records come back as JSON strings, so nothing
but plain text crosses the process boundary.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..batch import BatchItem, BatchSummary, _record, open_journal, run_batch
from ..config import AgentFactory
from ..errors import EchoInputError


def _encode_item(item: BatchItem) -> str:
    image = Path(item.image)
    return json.dumps({
        "id": item.id,
        # Workers do not share the driver's working directory: relative paths are made absolute.
        "image": str(image if image.is_absolute() else image.resolve()),
        "organ": item.organ,
        "context": item.context,
        "truth": item.truth,
    })


def _decode_item(text: str) -> BatchItem:
    d = json.loads(text)
    return BatchItem(id=d["id"], image=Path(d["image"]), organ=d["organ"], context=d["context"], truth=d["truth"])


class EchoBatchWorker:
    """One agent per worker, chunks of items in, journal records out (a Ray Data actor, or the
    per-process worker of the process-pool engine).

    Args:
        agent_factory: an :class:`~echo_agent.config.AgentFactory` called with no arguments, once, in
            the worker (e.g. ``functools.partial(EchoAgent.from_config, config)``); it returns an
            :class:`~echo_agent.EchoAgent` or anything with its ``batch`` method. Default: the
            packaged agent.
        overlays / fhir: folders (absolute, reachable by the worker) as in ``run_batch``.
    """

    def __init__(self, agent_factory: AgentFactory | None, overlays: str | None, fhir: str | None) -> None:
        if agent_factory is None:
            from ..agent import EchoAgent

            agent_factory = EchoAgent.from_config
        self.agent = agent_factory()
        self.overlays = overlays
        self.fhir = fhir
        self._scratch = Path(tempfile.mkdtemp(prefix="echo-batch-"))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        items = [_decode_item(str(s)) for s in batch["item"]]
        records: dict[str, dict[str, Any]] = {}
        # run_batch on a scratch journal makes exactly the records the local engine makes; the
        # driver's journal stays the single source of truth.
        scratch = self._scratch / f"{uuid.uuid4().hex}.jsonl"
        try:
            run_batch(
                items, scratch, agent=self.agent, overlays=self.overlays, fhir=self.fhir,
                chunk_size=len(items), on_item=lambda it, rec: records.__setitem__(it.id, rec), progress=False,
            )
        except Exception as exc:  # a chunk that fails as a whole is recorded per item; the run goes on
            for it in items:
                records.setdefault(it.id, _record(it, exc, 0.0, None, None, None))
        finally:
            scratch.unlink(missing_ok=True)
        return {"id": [it.id for it in items], "record": [json.dumps(records[it.id]) for it in items]}

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_scratch", ""), ignore_errors=True)


def open_pool_run(
    items: Sequence[BatchItem], out: str | Path, *, workers: int, chunk_size: int,
    overlays: str | Path | None, fhir: str | Path | None,
) -> tuple[Path, list[BatchItem], BatchSummary, list[str | None]]:
    """Check a pool engine's arguments and open its journal: ``(out, todo, summary, folders)``, with
    the overlay / FHIR folders made absolute for the workers."""
    if workers < 1:
        raise EchoInputError(f"workers must be at least 1, got {workers}")
    if chunk_size < 1:
        raise EchoInputError(f"chunk_size must be at least 1, got {chunk_size}")
    out = Path(out)
    todo, summary = open_journal(items, out, overlays=overlays, fhir=fhir)
    folders = [str(Path(d).resolve()) if d is not None else None for d in (overlays, fhir)]
    return out, todo, summary, folders


__all__ = ["AgentFactory", "EchoBatchWorker", "open_pool_run"]
