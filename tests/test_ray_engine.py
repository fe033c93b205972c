"""The Ray engine on a local Ray cluster started by the test: the same journal as the local engine,
one agent per actor, per-item errors, resume (also after the driver is SIGKILLed) without redoing,
losing or duplicating items."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[scale]')")

from _fakes import journal_lines, stable_record  # noqa: E402

from echo_agent.batch import collect_inputs, read_journal, run_batch  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def fake_agent(marker_dir: str, delay_s: float = 0.0):
    """Agent factory run inside each Ray worker: the fake tool backends; leaves one marker file per
    call so the test can count how many agents (detector loads) were made."""
    from _fakes import FakeDetector, fake_toolkit

    from echo_agent import EchoAgent

    Path(marker_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    toolkit = fake_toolkit()
    if delay_s:
        slow = FakeDetector()
        original = slow.detect

        def detect(image, **kw):
            time.sleep(delay_s)
            return original(image, **kw)

        slow.detect = detect
        toolkit.detectors["breast"] = slow
    return EchoAgent(toolkit=toolkit, organ="breast", router=None)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process by another test")
    # Short path: Ray puts unix sockets under it (107-character limit).
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)






def test_ray_journal_matches_local_engine(ray_cluster, batch_folder, tmp_path):
    from echo_agent.scale.ray_engine import run_batch_ray

    items = collect_inputs(batch_folder, organ="breast")
    local_markers = tmp_path / "local-markers"
    ray_markers = tmp_path / "ray-markers"
    local_markers.mkdir()
    ray_markers.mkdir()
    local = run_batch(items, tmp_path / "local.jsonl", agent=fake_agent(str(local_markers)),
                      overlays=tmp_path / "ov-local", progress=False)
    summary = run_batch_ray(
        items, tmp_path / "ray.jsonl", workers=2, chunk_size=2, overlays=tmp_path / "ov-ray",
        fhir=tmp_path / "fhir-ray", agent_factory=functools.partial(fake_agent, str(ray_markers)), progress=False,
    )
    lines = journal_lines(tmp_path / "ray.jsonl")
    assert sorted(r["id"] for r in lines) == sorted(it.id for it in items)  # each item once
    by_id = {r["id"]: r for r in lines}
    local_by_id = read_journal(tmp_path / "local.jsonl")
    for item_id, rec in local_by_id.items():
        assert stable_record(by_id[item_id]) == stable_record(rec), item_id
    assert by_id["zz_corrupt.png"]["status"] == "error"
    assert by_id["zz_corrupt.png"]["error_type"] == local_by_id["zz_corrupt.png"]["error_type"]
    assert (summary.total, summary.done_before, summary.ok, summary.errors) == (10, 0, local.ok, local.errors)
    assert summary.labels == local.labels and summary.ok == 9
    # The workers wrote the overlays and FHIR reports under the same names as the local engine.
    assert sorted(p.name for p in (tmp_path / "ov-ray").iterdir()) == sorted(p.name for p in (tmp_path / "ov-local").iterdir())
    assert len(list((tmp_path / "fhir-ray").glob("*.json"))) == 9
    for rec in lines:
        if rec["status"] == "ok":
            assert Path(rec["overlay"]).is_file() and Path(rec["fhir"]).is_file()
    # One agent per actor: two workers, two agents, in two processes other than this one.
    made = [p.name.split("-")[0] for p in ray_markers.iterdir()]
    assert len(made) == 2 and len(set(made)) == 2 and str(os.getpid()) not in made


def test_ray_resumes_a_journal_skipping_done_items_and_a_torn_line(ray_cluster, batch_folder, tmp_path):
    from echo_agent.scale.ray_engine import run_batch_ray

    items = collect_inputs(batch_folder, organ="breast")
    markers = tmp_path / "markers"
    markers.mkdir()
    factory = functools.partial(fake_agent, str(markers))
    out = tmp_path / "run.jsonl"
    # A journal begun by the local engine is finished by the Ray engine (same format, same ids).
    first = run_batch(items[:4], out, agent=fake_agent(str(tmp_path)), progress=False)
    assert first.processed == 4
    before = out.read_bytes()
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"id": "synthetic_6.png", "status": "o')
    seen: list[str] = []
    second = run_batch_ray(items, out, workers=2, chunk_size=3, agent_factory=factory,
                           on_item=lambda it, rec: seen.append(it.id), progress=False)
    assert second.done_before == 4 and second.processed == 6
    assert sorted(seen) == sorted(it.id for it in items[4:])  # nothing redone
    data = out.read_bytes()
    assert data.startswith(before)  # earlier lines untouched, the torn one removed
    ids = [r["id"] for r in journal_lines(out)]
    assert sorted(ids) == sorted(it.id for it in items) and len(ids) == len(set(ids))
    # A finished journal: nothing to do, no workers started, nothing written.
    n_agents = len(list(markers.iterdir()))
    third = run_batch_ray(items, out, workers=2, agent_factory=factory, progress=False)
    assert third.processed == 0 and third.done_before == 10
    assert out.read_bytes() == data and len(list(markers.iterdir())) == n_agents


_DRIVER = """
import functools, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import ray
from echo_agent.batch import collect_inputs
from echo_agent.scale.ray_engine import run_batch_ray
from test_ray_engine import fake_agent
ray.init(address={address!r}, log_to_driver=False,
         runtime_env={{"env_vars": {{"PYTHONPATH": {pythonpath!r}}}}})
items = collect_inputs({folder!r}, organ="breast")
run_batch_ray(items, {out!r}, workers=2, chunk_size=1, progress=False,
              agent_factory=functools.partial(fake_agent, {markers!r}, delay_s=0.6))
"""


def test_ray_driver_killed_with_sigkill_then_resumed(ray_cluster, batch_folder, tmp_path):
    """The driver is the journal's only writer: SIGKILL it mid-run, restart, and the journal ends
    with every item exactly once, the lines written before the kill untouched."""
    from echo_agent.scale.ray_engine import run_batch_ray

    items = collect_inputs(batch_folder, organ="breast")
    out = tmp_path / "killed.jsonl"
    markers = tmp_path / "markers"
    markers.mkdir()
    address = ray_cluster.get_runtime_context().gcs_address
    script = _DRIVER.format(tests=str(TESTS), repo=str(REPO), address=address, folder=str(batch_folder),
                            pythonpath=os.pathsep.join([str(TESTS), str(REPO)]),
                            out=str(out), markers=str(markers))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the driver ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 3 <= n_before < len(items)
    summary = run_batch_ray(items, out, workers=2, chunk_size=2,
                            agent_factory=functools.partial(fake_agent, str(markers)), progress=False)
    assert summary.done_before == n_before and summary.processed == len(items) - n_before
    assert out.read_bytes().startswith(complete)
    ids = [r["id"] for r in journal_lines(out)]
    assert sorted(ids) == sorted(it.id for it in items) and len(ids) == len(set(ids))
