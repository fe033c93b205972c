"""The engine-neutral batch worker: one agent per worker process, chunks of items in, journal
records out. Used by the Ray engine (as a Ray Data actor) and the process-pool engine.

Items travel as JSON strings (absolute image paths), records come back as JSON strings, so nothing
but plain text crosses the process boundary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..batch import BatchItem, BatchSummary, _record, diagnose_chunk, open_journal
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

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        items = [_decode_item(str(s)) for s in batch["item"]]
        # The same records the local engine makes; the driver's journal stays the single source of truth.
        try:
            records = diagnose_chunk(self.agent, items, overlays=self.overlays, fhir=self.fhir)
        except Exception as exc:  # a chunk that fails as a whole is recorded per item; the run goes on
            records = [_record(it, exc, 0.0, None, None, None) for it in items]
        return {"id": [it.id for it in items], "record": [json.dumps(r) for r in records]}


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
