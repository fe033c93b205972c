"""The process-pool batch engine: the same journal as the local engine, one agent per worker
process, per-item errors, resume, and no lost items when a worker process dies."""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path

import pytest
from _fakes import journal_lines, stable_record

from echo_agent.batch import collect_inputs, read_journal, run_batch
from echo_agent.scale import process_engine
from echo_agent.scale.process_engine import run_batch_processes


def fake_agent(marker_dir: str, die_on: str | None = None):
    """Agent factory run in each worker: the fake tool backends; one marker file per agent built.
    ``die_on``: the worker process exits abruptly when it meets an image whose name contains it."""
    from _fakes import fake_toolkit

    from echo_agent import EchoAgent

    Path(marker_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    agent = EchoAgent(toolkit=fake_toolkit(), organ="breast", router=None)
    if die_on:
        original = agent.batch

        def batch(images, **kw):
            if any(die_on in str(i) for i in images):
                os._exit(3)  # what an out-of-memory kill or a native crash looks like to the pool
            return original(images, **kw)

        agent.batch = batch
    return agent


def broken_factory():
    raise RuntimeError("no weights here")






def test_journal_matches_the_local_engine_one_agent_per_worker(batch_folder, tmp_path):
    items = collect_inputs(batch_folder, organ="breast")
    markers = tmp_path / "markers"
    markers.mkdir()
    local = run_batch(items, tmp_path / "local.jsonl", agent=fake_agent(str(tmp_path)),
                      overlays=tmp_path / "ov-local", progress=False)
    seen: list[str] = []
    summary = run_batch_processes(
        items, tmp_path / "proc.jsonl", workers=2, chunk_size=2, overlays=tmp_path / "ov-proc",
        fhir=tmp_path / "fhir-proc", agent_factory=functools.partial(fake_agent, str(markers)),
        on_item=lambda it, rec: seen.append(it.id), progress=False,
    )
    lines = journal_lines(tmp_path / "proc.jsonl")
    assert sorted(r["id"] for r in lines) == sorted(it.id for it in items) and sorted(seen) == sorted(it.id for it in items)
    local_by_id = read_journal(tmp_path / "local.jsonl")
    for rec in lines:
        assert stable_record(rec) == stable_record(local_by_id[rec["id"]]), rec["id"]
    assert (summary.total, summary.done_before, summary.ok, summary.errors) == (10, 0, local.ok, local.errors)
    assert summary.labels == local.labels and summary.ok == 9
    assert sorted(p.name for p in (tmp_path / "ov-proc").iterdir()) == sorted(p.name for p in (tmp_path / "ov-local").iterdir())
    assert len(list((tmp_path / "fhir-proc").glob("*.json"))) == 9
    made = [p.name.split("-")[0] for p in markers.iterdir()]
    assert len(made) == 2 and len(set(made)) == 2 and str(os.getpid()) not in made


def test_resume_skips_done_items_and_a_finished_journal_starts_no_workers(batch_folder, tmp_path):
    items = collect_inputs(batch_folder, organ="breast")
    markers = tmp_path / "markers"
    markers.mkdir()
    factory = functools.partial(fake_agent, str(markers))
    out = tmp_path / "run.jsonl"
    run_batch(items[:4], out, agent=fake_agent(str(tmp_path)), progress=False)
    before = out.read_bytes()
    with open(out, "ab") as f:  # a torn last line, as a kill in the middle of a write leaves it
        f.write(b'{"id": "synthetic_6.png", "status": "o')
    seen: list[str] = []
    second = run_batch_processes(items, out, workers=2, chunk_size=3, agent_factory=factory,
                                 on_item=lambda it, rec: seen.append(it.id), progress=False)
    assert second.done_before == 4 and second.processed == 6
    assert sorted(seen) == sorted(it.id for it in items[4:])
    data = out.read_bytes()
    assert data.startswith(before)
    ids = [r["id"] for r in journal_lines(out)]
    assert sorted(ids) == sorted(it.id for it in items) and len(ids) == len(set(ids))
    n_agents = len(list(markers.iterdir()))
    third = run_batch_processes(items, out, workers=2, agent_factory=factory, progress=False)
    assert third.processed == 0 and out.read_bytes() == data and len(list(markers.iterdir())) == n_agents


def test_a_dying_worker_costs_only_its_own_image(batch_folder, tmp_path):
    items = collect_inputs(batch_folder, organ="breast")
    markers = tmp_path / "markers"
    markers.mkdir()
    out = tmp_path / "crash.jsonl"
    summary = run_batch_processes(
        items, out, workers=2, chunk_size=3, progress=False,
        agent_factory=functools.partial(fake_agent, str(markers), die_on="synthetic_3"),
    )
    by_id = {r["id"]: r for r in journal_lines(out)}
    assert sorted(by_id) == sorted(it.id for it in items)  # every item once, none lost
    dead = by_id["synthetic_3.png"]
    assert dead["status"] == "error" and dead["error_type"] == "WorkerCrashedError"
    assert "died" in dead["error"]
    others = [r for k, r in by_id.items() if k not in ("synthetic_3.png", "zz_corrupt.png")]
    assert all(r["status"] == "ok" for r in others)  # the images that shared its chunk were retried
    assert by_id["zz_corrupt.png"]["status"] == "error" and by_id["zz_corrupt.png"]["error_type"] != "WorkerCrashedError"
    assert summary.errors == 2 and summary.ok == 8


def test_a_failing_agent_factory_is_reported_per_item(batch_folder, tmp_path):
    items = collect_inputs(batch_folder, organ="breast")[:3]
    out = tmp_path / "nofactory.jsonl"
    summary = run_batch_processes(items, out, workers=1, agent_factory=broken_factory, progress=False)
    recs = journal_lines(out)
    assert len(recs) == 3 and summary.errors == 3
    assert all(r["error_type"] == "WorkerStartError" and "no weights here" in r["error"] for r in recs)


def test_bad_arguments_raise_typed_errors(tmp_path):
    from echo_agent.errors import EchoInputError

    with pytest.raises(EchoInputError, match="workers"):
        run_batch_processes([], tmp_path / "x.jsonl", workers=0)
    with pytest.raises(EchoInputError, match="chunk_size"):
        run_batch_processes([], tmp_path / "x.jsonl", chunk_size=0)
    assert process_engine.MAX_POOL_RESTARTS >= 1


def slow_agent(marker_dir: str):
    """A fake-tool agent whose batches take a while, so a driver can be killed mid-run."""
    import time

    agent = fake_agent(marker_dir)
    original = agent.batch

    def batch(images, **kw):
        time.sleep(0.5)
        return original(images, **kw)

    agent.batch = batch
    return agent


def test_sigkilled_driver_leaves_no_worker_behind(batch_folder, tmp_path):
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    markers = tmp_path / "markers"
    markers.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import functools
        from echo_agent.batch import collect_inputs
        from echo_agent.scale.process_engine import run_batch_processes
        from test_process_engine import slow_agent
        if __name__ == "__main__":
            items = collect_inputs({str(batch_folder)!r}, organ="breast") * 1
            run_batch_processes(items, {str(tmp_path / 'r.jsonl')!r}, workers=2, chunk_size=1, progress=False,
                                agent_factory=functools.partial(slow_agent, {str(markers)!r}))
    """))
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.monotonic() + 90
        while len(list(markers.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = {int(p.name.split("-")[0]) for p in markers.iterdir()}
        assert len(pids) == 2, "the workers did not start"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)

        def alive(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            try:  # a zombie (exited, not yet reaped by init) counts as gone
                return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids), "worker processes outlived their killed driver"
    finally:
        if driver.poll() is None:
            driver.kill()
