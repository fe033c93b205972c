"""Batch runs on a local pool of worker processes: the same resumable JSONL journal as
:func:`echo_agent.batch.run_batch`, with the images spread over ``workers`` processes.

One process runs one graph at a time, and most of a graph's work holds Python's GIL, so a single
process uses about one core. This engine starts ``workers`` processes (``spawn``: safe with the
threads of ONNX Runtime and the captioner), builds one agent in each (detectors loaded once per
process) and hands them chunks of items; each chunk goes through
:func:`echo_agent.batch.diagnose_chunk` inside the worker, the function the local engine uses, so a
record is exactly the one the local engine writes. The calling process is the journal's only
writer, appending each record as its chunk comes back. Killed and started again, the run finishes
what is missing.

Start-up costs a few seconds (each process imports the library and loads its models), so it pays
off from a few hundred images; ``docs/benchmarks.md`` has the measured rates. No extra is needed.

A worker that dies (killed, out of memory, a crash in native code) breaks the pool: the chunks that
were in flight are then retried one item at a time in a fresh pool, and an item that breaks a pool
on its own is recorded as an error. The other items are not lost.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.util
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ..batch import BatchItem, BatchSummary, _record, journal_writer
from ..errors import EchoError
from .worker import AgentFactory, EchoBatchWorker, _encode_item, open_pool_run

_WORKER: EchoBatchWorker | None = None

#: How many times a broken pool is replaced before the remaining items are recorded as errors.
MAX_POOL_RESTARTS = 8


class WorkerCrashedError(EchoError):
    """A worker process died while it held this item (killed, out of memory, a native crash)."""


class WorkerStartError(EchoError):
    """The agent could not be built in a worker process (the factory raised)."""


_START_ERROR: str | None = None


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Make this (worker) process end when ``parent_pid`` does, even if the parent is SIGKILLed and
    never shuts its pool down: on Linux the kernel sends SIGTERM at the parent's death
    (``PR_SET_PDEATHSIG``); everywhere, a daemon thread notices the parent is gone (this process is
    re-parented) and exits within ``poll_s``."""
    import os
    import signal
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)  # the driver is gone: nobody will read this worker's results

    if os.getppid() != parent_pid:  # already orphaned before the watch could start
        os._exit(1)
    threading.Thread(target=watch, name="echo-exit-with-parent", daemon=True).start()


def _init_worker(agent_factory: AgentFactory | None, overlays: str | None, fhir: str | None,
                 parent_pid: int | None = None) -> None:
    global _WORKER, _START_ERROR
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    try:
        _WORKER = EchoBatchWorker(agent_factory, overlays, fhir)
        # its scratch folder goes when the process exits (the pool's workers exit normally)
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(_WORKER._scratch, True), exitpriority=10)
    except Exception as exc:  # noqa: BLE001 - reported per item by _run_chunk, not as a dead pool
        _START_ERROR = f"building the agent in a worker process failed: {type(exc).__name__}: {exc}"


def _run_chunk(encoded: list[str]) -> list[str]:
    if _WORKER is None:
        raise WorkerStartError(_START_ERROR or "the worker process has no agent")
    return list(_WORKER({"item": encoded})["record"])


def run_batch_processes(
    items: Sequence[BatchItem],
    out: str | Path,
    *,
    workers: int = 2,
    overlays: str | Path | None = None,
    fhir: str | Path | None = None,
    agent_factory: AgentFactory | None = None,
    chunk_size: int = 16,
    on_item: Callable[[BatchItem, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Run the agent over ``items`` in ``workers`` local processes, appending to the journal ``out``.

    Same journal, resume and error semantics as :func:`echo_agent.batch.run_batch`.

    Args:
        items: from :func:`echo_agent.batch.collect_inputs`.
        out: the JSONL journal (written by this process only); finished items are skipped.
        workers: worker processes, each with its own agent (use the number of cores).
        overlays / fhir: folders for overlay PNGs / FHIR DiagnosticReports, written by the workers.
        agent_factory: zero-argument callable building the agent in each worker (default: the
            packaged agent, ``EchoAgent.from_config()``; for a config of your own,
            ``functools.partial(EchoAgent.from_config, config)``); it is pickled to the workers, so it must be importable by name (a
            module-level function or a ``functools.partial`` of one) and must not capture live models.
        chunk_size: items per ``agent.batch`` call in a worker (one batched detector pass each);
            lowered when there are too few items for every worker to get some.
        on_item: callback after each journal line, in this process.
        progress: show a progress bar.

    Example::

        from echo_agent.batch import collect_inputs
        from echo_agent.scale.process_engine import run_batch_processes
        summary = run_batch_processes(collect_inputs("scans/", organ="breast"), "results.jsonl", workers=2)
    """
    out, todo, summary, folders = open_pool_run(
        items, out, workers=workers, chunk_size=chunk_size, overlays=overlays, fhir=fhir)
    if not todo:
        return summary
    chunk_size = max(1, min(chunk_size, -(-len(todo) // workers)))
    # (chunk, isolated): an isolated chunk is a single item retried after a worker died; it runs
    # alone, so that if the pool breaks again the item is known to be the cause
    pending: deque[tuple[list[BatchItem], bool]] = deque(
        (todo[i : i + chunk_size], False) for i in range(0, len(todo), chunk_size)
    )
    with journal_writer(out, summary, len(items), on_item, progress) as write:
        # workers exit when this process does, even killed with SIGKILL (exit_with_parent)
        _run_pool(pending, write, workers=workers, initargs=(agent_factory, *folders, os.getpid()))
    return summary


def _run_pool(
    pending: deque[tuple[list[BatchItem], bool]], write: Callable[[BatchItem, dict[str, Any]], None], *,
    workers: int, initargs: tuple[Any, ...],
) -> None:
    """Hand the pending chunks to worker processes and write every item's record (see module doc)."""
    ctx = multiprocessing.get_context("spawn")

    def crashed(it: BatchItem, why: str) -> None:
        write(it, _record(it, WorkerCrashedError(why), 0.0, None, None, None))

    restarts = 0
    while pending:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=initargs)
        running: dict[Future[list[str]], tuple[list[BatchItem], bool]] = {}
        broken: list[tuple[list[BatchItem], bool]] = []
        try:
            while pending or running:
                # keep every worker busy with one chunk queued behind it, no more (bounded memory,
                # and little to redo when the run is killed); an isolated chunk runs alone
                while pending and not broken and len(running) < 2 * workers:
                    if (pending[0][1] and running) or any(iso for _, iso in running.values()):
                        break
                    chunk, isolated = pending.popleft()
                    running[pool.submit(_run_chunk, [_encode_item(it) for it in chunk])] = (chunk, isolated)
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    chunk, isolated = running.pop(fut)
                    try:
                        records = [json.loads(r) for r in fut.result()]
                    except BrokenProcessPool:
                        broken.append((chunk, isolated))
                        continue
                    except Exception as exc:  # noqa: BLE001 - e.g. the factory failed: per item, run goes on
                        records = [_record(it, exc, 0.0, None, None, None) for it in chunk]
                    for it, rec in zip(chunk, records, strict=True):
                        write(it, rec)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if not broken:
            continue
        restarts += 1
        if restarts > MAX_POOL_RESTARTS:
            for chunk, _ in [*broken, *pending]:
                for it in chunk:
                    crashed(it, f"worker processes kept dying ({restarts} pools); this image was not processed")
            pending.clear()
            break
        retry: list[tuple[list[BatchItem], bool]] = []
        for chunk, isolated in broken:
            if isolated:  # it broke a pool while running alone: it is the cause; not retried again
                crashed(chunk[0], "the worker process died while processing this image")
            else:  # which item did it is unknown: retry each alone, before the rest
                retry += [([it], True) for it in chunk]
        pending.extendleft(reversed(retry))


__all__ = ["MAX_POOL_RESTARTS", "WorkerCrashedError", "WorkerStartError", "run_batch_processes"]
