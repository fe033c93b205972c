"""Batch runs on Ray: the same resumable JSONL journal as :func:`echo_agent.batch.run_batch`, with the
images spread over a pool of Ray Data actors.

Each actor builds one agent (so each worker loads the detectors once) and turns chunks of items
into journal records with :func:`echo_agent.batch.diagnose_chunk`, the function the local engine
uses, so a record written by the Ray engine is the record the local engine would write. The driver
is the journal's only writer: it appends each record as it streams back (one fsync'd line per item),
skips what the journal already holds, and never writes an item twice. Killed at any point and started again, the run finishes what
is missing; items that were in flight on the workers are done again, nothing else is.

Cluster: with no Ray running in the process, :func:`run_batch_ray` connects to ``address`` (or the
``RAY_ADDRESS`` environment variable), else starts a local Ray instance for the run and stops it
afterwards. On a multi-machine cluster, the images and the ``overlays`` / ``fhir`` folders must be on
storage every worker can reach (the same absolute paths), and echo-agent must be installed in the
workers' environment. See ``docs/deployment.md``.

Ray is imported inside the functions (``pip install 'echo-agent[scale]'`` brings ``ray[data]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..batch import BatchItem, BatchSummary, journal_writer
from ..errors import MissingExtraError
from .worker import AgentFactory, EchoBatchWorker, _decode_item, _encode_item, open_pool_run  # noqa: F401 - re-exported


def _require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            "the Ray engine needs Ray Data; install it with pip install 'echo-agent[scale]' (or 'ray[data]')"
        ) from exc
    return ray


def run_batch_ray(
    items: Sequence[BatchItem],
    out: str | Path,
    *,
    workers: int = 2,
    overlays: str | Path | None = None,
    fhir: str | Path | None = None,
    agent_factory: AgentFactory | None = None,
    chunk_size: int = 4,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    on_item: Callable[[BatchItem, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Run the agent over ``items`` on a pool of Ray actors, appending to the journal ``out``.

    Same journal, resume and error semantics as :func:`echo_agent.batch.run_batch`.

    Args:
        items: from :func:`echo_agent.batch.collect_inputs`.
        out: the JSONL journal (written by this process only); finished items are skipped.
        workers: number of actors, each with its own agent (detectors loaded once per actor).
        overlays / fhir: folders for overlay PNGs / FHIR DiagnosticReports, written by the workers.
        agent_factory: zero-argument callable building the agent in each worker (default: the
            packaged agent, ``EchoAgent.from_config()``; for a config of your own,
            ``functools.partial(EchoAgent.from_config, config)``); it is pickled to the workers, so it
            must not capture live models. For an
            MLLM reasoner served by vLLM: ``functools.partial(EchoAgent.from_endpoint, url, model)``.
        chunk_size: items per actor call (one ``agent.batch`` per organ in the chunk); lowered when
            there are fewer than ``workers * chunk_size`` items so that every worker gets some.
        cpus_per_worker / gpus_per_worker: Ray resources reserved by each actor.
        address: Ray cluster to join (default: ``RAY_ADDRESS`` or a local instance for this run);
            ignored when Ray is already initialised in this process.
        on_item: callback after each journal line, on the driver.
        progress: show Ray Data's progress bars.

    Example::

        from echo_agent.batch import collect_inputs
        from echo_agent.scale.ray_engine import run_batch_ray
        summary = run_batch_ray(collect_inputs("scans/", organ="breast"), "results.jsonl", workers=4)
    """
    out, todo, summary, folders = open_pool_run(
        items, out, workers=workers, chunk_size=chunk_size, overlays=overlays, fhir=fhir)
    if not todo:
        return summary
    by_id = {it.id: it for it in todo}

    ray = _require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        target = address or os.environ.get("RAY_ADDRESS")
        if target:
            ray.init(address=target, log_to_driver=progress)
        else:  # a local instance for this run only
            ray.init(include_dashboard=False, log_to_driver=progress)
    try:
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = progress
        # Smaller chunks when there are few items, so that every worker gets some.
        chunk_size = max(1, min(chunk_size, -(-len(todo) // workers)))
        n_blocks = -(-len(todo) // chunk_size)
        ds = ray.data.from_items([{"item": _encode_item(it)} for it in todo], override_num_blocks=n_blocks)
        ds = ds.map_batches(
            EchoBatchWorker,
            fn_constructor_kwargs={"agent_factory": agent_factory, "overlays": folders[0], "fhir": folders[1]},
            batch_size=chunk_size, batch_format="numpy", compute=ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
        )
        written: set[str] = set()
        # Ray Data draws its own progress bars: none from the writer
        with journal_writer(out, summary, len(items), on_item) as write:
            for row in ds.iter_rows():
                rec = json.loads(row["record"])
                if rec["id"] in written:  # a retried Ray task may deliver an item again: one line per id
                    continue
                write(by_id[rec["id"]], rec)
                written.add(rec["id"])
    finally:
        if started_here:
            ray.shutdown()
    return summary


__all__ = ["EchoBatchWorker", "run_batch_ray"]
