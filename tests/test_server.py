"""The web service's JSON API: runs, typed event streams, overlays, review, errors, restart."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web service needs the 'serve' extra (fastapi)")
pytest.importorskip("langgraph.checkpoint.sqlite.aio", reason="the web service needs langgraph-checkpoint-sqlite")

from _server_fakes import GatedDetector, agent_factory  # noqa: E402
from fastapi.testclient import TestClient as _TestClient  # noqa: E402


def TestClient(app, **kw):  # noqa: N802 - the server answers to loopback hosts, not Starlette's "testserver"
    return _TestClient(app, base_url=kw.pop("base_url", "http://127.0.0.1"), **kw)
from PIL import Image  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from echo_agent.errors import EchoError  # noqa: E402
from echo_agent.events import AgentEvent, DiagnosisEvent, ReviewRequestedEvent  # noqa: E402
from echo_agent.imaging import example_image  # noqa: E402
from echo_agent.imaging.overlay import label_colour  # noqa: E402
from echo_agent.schemas import Diagnosis  # noqa: E402
from echo_agent.server import create_app  # noqa: E402

EVENTS = TypeAdapter(list[AgentEvent])
IMAGE = example_image("breast_malignant").read_bytes()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def db(tmp_path):
    return tmp_path / "srv" / "runs.sqlite"


@pytest.fixture()
def client(db):
    with TestClient(create_app(agent_factory(), db_path=db)) as c:
        yield c


def _start(client, data=IMAGE, name="scan.png", mode="wait", **form):
    return client.post(f"/api/runs?mode={mode}", files={"file": (name, data, "image/png")}, data=form)


def _paused(client, **form) -> dict:
    r = _start(client, **form)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "pending-review", body
    return body


def _sse(text: str) -> list[tuple[str | None, str, dict]]:
    """Parse an SSE body into (id, event, data) triples."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
    return out


# -- schema -------------------------------------------------------------------------------------------
def test_openapi_documents_every_operation(client):
    spec = client.get("/openapi.json").json()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert {
        ("POST", "/api/runs"), ("GET", "/api/runs"), ("GET", "/api/runs/{run_id}"),
        ("GET", "/api/runs/{run_id}/events"), ("GET", "/api/runs/{run_id}/overlay.png"),
        ("POST", "/api/runs/{run_id}/review"), ("GET", "/api/schema/diagnosis"), ("GET", "/api/organs"),
    } <= ops
    review_body = spec["paths"]["/api/runs/{run_id}/review"]["post"]["requestBody"]["content"]["application/json"]
    assert review_body["schema"]["$ref"].endswith("/ReviewDecision")
    # the events of a run are the library's typed events, discriminated by 'type'
    assert {"PerceivedEvent", "EvidenceEvent", "ReviewRequestedEvent", "DiagnosisEvent"} <= set(spec["components"]["schemas"])


def test_diagnosis_schema_and_organs(client):
    assert client.get("/api/schema/diagnosis").json() == Diagnosis.json_schema()
    organs = {o["name"]: o for o in client.get("/api/organs").json()}
    assert organs["breast"]["labels"] == ["normal", "benign", "malignant"]
    assert organs["breast"]["category_system"] == "BI-RADS" and "4A" in organs["breast"]["categories"]
    assert client.get("/").headers["content-type"].startswith("text/html")


# -- runs and events ----------------------------------------------------------------------------------
def test_wait_mode_pauses_for_review_with_typed_events(client):
    body = _paused(client, age="52", symptoms="palpable lump", organ="breast")
    events = EVENTS.validate_python(body["events"])
    types = [e.type for e in events]
    assert types[0] == "perceived" and types[-1] == "review_requested"
    assert {"tool_called", "evidence", "reasoner", "diagnosis"} <= set(types)
    assert [e.step for e in events] == list(range(len(events)))
    assert isinstance(events[-1], ReviewRequestedEvent) and events[-1].thread_id == body["run_id"]
    assert body["diagnosis"] == events[-1].diagnosis.model_dump(mode="json")
    assert body["context"] == {"age": 52, "symptoms": "palpable lump", "sex": None, "history": None, "notes": None}
    assert body["organ"] == "breast" and body["filename"] == "scan.png"
    w, h = Image.open(io.BytesIO(IMAGE)).size
    assert (body["image"]["width"], body["image"]["height"]) == (w, h)
    assert client.get(f"/api/runs/{body['run_id']}").json() == body


def test_events_stream_is_live(db):
    """The SSE stream delivers steps while the agent is still working (the detector is blocked)."""
    det = GatedDetector()
    with TestClient(create_app(agent_factory(detector=det), db_path=db)) as c:
        r = _start(c, mode="background")
        assert r.status_code == 202 and r.headers["location"] == f"/api/runs/{r.json()['run_id']}"
        rid = r.json()["run_id"]
        assert r.json()["status"] == "running"
        seen = []
        with c.stream("GET", f"/api/runs/{rid}/events") as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if line.startswith("event: "):
                    seen.append(line[7:])
                    if line == "event: tool_called":
                        assert det.entered.wait(10)
                        # mid-run: no evidence yet, and the API reports the run as running
                        assert c.get(f"/api/runs/{rid}").json()["status"] == "running"
                        det.gate.set()
        assert seen[0] == "perceived" and seen[-2:] == ["review_requested", "end"]
        assert seen.index("tool_called") < seen.index("evidence")


def test_events_replay_and_last_event_id(client):
    rid = _paused(client)["run_id"]
    full = _sse(client.get(f"/api/runs/{rid}/events").text)
    assert full[-1][1] == "end" and full[-1][2]["status"] == "pending-review"
    typed = EVENTS.validate_python([d for _, e, d in full[:-1]])
    assert [str(i) for i in range(len(typed))] == [i for i, _, _ in full[:-1]]
    assert all(e.type == name for e, (_, name, _) in zip(typed, full))
    tail = _sse(client.get(f"/api/runs/{rid}/events", headers={"Last-Event-ID": "9"}).text)
    assert [i for i, _, _ in tail[:-1]] == [str(i) for i in range(10, len(typed))]


def test_stream_mode_post_answers_with_events(client):
    with client.stream("POST", "/api/runs?mode=stream", files={"file": ("a.png", IMAGE, "image/png")}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        rid = s.headers["location"].rsplit("/", 1)[1]
        parsed = _sse(s.read().decode())
    assert parsed[0][1] == "perceived" and parsed[-1] == (None, "end", {"status": "pending-review", "error": None, "run_id": rid})


def test_list_runs_filters_by_status(client):
    a = _paused(client)["run_id"]
    b = _paused(client)["run_id"]
    client.post(f"/api/runs/{a}/review", json={"action": "accept", "reviewer": "dr-a"})
    pending = [r["run_id"] for r in client.get("/api/runs?status=pending-review").json()]
    done = [r["run_id"] for r in client.get("/api/runs?status=done").json()]
    assert pending == [b] and done == [a]
    assert {r["run_id"] for r in client.get("/api/runs").json()} == {a, b}


def test_overlay_draws_the_diagnosis_box(client):
    body = _paused(client)
    r = client.get(body["overlay_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert img.shape[:2] == (body["image"]["height"], body["image"]["width"])
    box = Diagnosis.model_validate(body["diagnosis"]).box
    colour = label_colour(body["diagnosis"]["findings"][0]["label"])
    x1, y1, y2 = int(box.x1), int(box.y1), int(box.y2)
    assert img[(y1 + y2) // 2, x1].tolist() == list(colour)
    original = np.asarray(Image.open(io.BytesIO(IMAGE)).convert("RGB"))
    assert not np.array_equal(img, original)


# -- review -------------------------------------------------------------------------------------------
def test_review_accept(client):
    body = _paused(client)
    r = client.post(body["review_url"], json={"action": "accept", "reviewer": "dr-a", "comment": "agree"})
    assert r.status_code == 200, r.text
    dx = Diagnosis.model_validate(r.json())
    assert dx.review.reviewer == "dr-a" and dx.review.action == "accept" and dx.review.changes == {}
    assert dx.label == body["diagnosis"]["label"]
    state = client.get(f"/api/runs/{body['run_id']}").json()
    assert state["status"] == "done" and state["diagnosis"] == r.json()
    last = EVENTS.validate_python(state["events"])[-1]
    assert isinstance(last, DiagnosisEvent) and last.diagnosis.review.reviewer == "dr-a"
    # a finished run cannot be reviewed twice
    again = client.post(body["review_url"], json={"action": "accept", "reviewer": "dr-b"})
    assert again.status_code == 409 and "not waiting for review" in again.json()["detail"]


def test_review_edit_label_category_box(client):
    body = _paused(client)
    agent_dx = body["diagnosis"]
    r = client.post(body["review_url"], json={
        "action": "edit", "reviewer": "dr-e", "label": "benign", "category": "3", "box": [100, 120, 220, 260],
    })
    assert r.status_code == 200, r.text
    dx = Diagnosis.model_validate(r.json())
    assert (dx.label, dx.category) == ("benign", "3")
    assert dx.box.to_list() == [100, 120, 220, 260]
    ch = dx.review.changes
    assert ch["label"] == {"from": agent_dx["label"], "to": "benign"}
    assert ch["category"] == {"from": agent_dx["category"], "to": "3"}
    assert ch["box"]["to"] == [100, 120, 220, 260]
    assert dx.review.original["label"] == agent_dx["label"] and dx.review.reviewer == "dr-e"
    # the overlay now shows the reviewed box in the reviewed label's colour
    img = np.asarray(Image.open(io.BytesIO(client.get(body["overlay_url"]).content)).convert("RGB"))
    assert img[190, 100].tolist() == list(label_colour("benign"))


def test_review_reject_with_comment(client):
    body = _paused(client)
    r = client.post(body["review_url"], json={"action": "reject", "reviewer": "dr-r", "comment": "motion artefact"})
    dx = Diagnosis.model_validate(r.json())
    assert dx.indeterminate and "dr-r" in dx.indeterminate_reason and "motion artefact" in dx.indeterminate_reason
    assert dx.review.action == "reject" and dx.review.comment == "motion artefact"


@pytest.mark.parametrize(
    ("decision", "needle"),
    [
        ({"action": "accept"}, "reviewer"),
        ({"action": "edit", "reviewer": "dr-x", "label": "hydronephrosis"}, "not a breast label"),
        ({"action": "edit", "reviewer": "dr-x", "category": "9"}, "not valid for breast"),
        ({"action": "edit", "reviewer": "dr-x"}, "must change"),
        ({"action": "approve", "reviewer": "dr-x"}, "action"),
        ({"action": "edit", "reviewer": "dr-x", "box": [1, 2, 3]}, "box"),
    ],
)
def test_invalid_review_is_422_and_the_run_stays_paused(client, decision, needle):
    body = _paused(client)
    r = client.post(body["review_url"], json=decision)
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json()["detail"])
    assert client.get(f"/api/runs/{body['run_id']}").json()["status"] == "pending-review"
    ok = client.post(body["review_url"], json={"action": "accept", "reviewer": "dr-y"})
    assert ok.status_code == 200 and ok.json()["review"]["reviewer"] == "dr-y"


def test_review_of_unknown_run_is_404(client):
    r = client.post("/api/runs/nope/review", json={"action": "accept", "reviewer": "x"})
    assert r.status_code == 404 and "no run 'nope'" in r.json()["detail"]
    for path in ("/api/runs/nope", "/api/runs/nope/events", "/api/runs/nope/overlay.png"):
        assert client.get(path).status_code == 404


# -- input validation ---------------------------------------------------------------------------------
def _dicom(pixels: np.ndarray, patient: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.PatientName = patient
    ds.PatientID = "ID-" + patient
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_and_jpeg_uploads_and_no_identifier_is_stored(client, db):
    gray = np.asarray(Image.open(io.BytesIO(IMAGE)).convert("L"))
    body = _paused(client, data=_dicom(gray, "Doe^Secret"), name="study.dcm")
    assert body["image"]["source_kind"] == "bytes-dicom"
    assert (body["image"]["width"], body["image"]["height"]) == (gray.shape[1], gray.shape[0])
    jpeg = io.BytesIO()
    Image.fromarray(gray).save(jpeg, format="JPEG", quality=90)
    assert _paused(client, data=jpeg.getvalue(), name="scan.jpg")["image"]["source_kind"] == "bytes-jpeg"
    # only pixels are kept: the patient's name is nowhere in the database, the images or the API
    assert "Secret" not in json.dumps(client.get(f"/api/runs/{body['run_id']}").json())
    for f in db.parent.rglob("*"):
        if f.is_file():
            assert b"Secret" not in f.read_bytes(), f


def test_text_file_is_415(client):
    r = client.post("/api/runs", files={"file": ("notes.txt", b"patient notes, not an image", "text/plain")})
    assert r.status_code == 415
    assert r.json()["error"] == "UnsupportedFormatError" and "text, not an image" in r.json()["detail"]
    assert client.get("/api/runs").json() == []


def test_corrupt_png_and_empty_file_are_422(client):
    r = _start(client, data=IMAGE[:60])
    assert r.status_code == 422 and r.json()["error"] == "UnreadableImageError"
    r = _start(client, data=b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"]


def test_unknown_organ_and_bad_context_are_422(client):
    r = _start(client, organ="liver")
    assert r.status_code == 422 and r.json()["error"] == "UnknownOrganError" and "liver" in r.json()["detail"]
    r = _start(client, age="200")
    assert r.status_code == 422
    r = _start(client, sex="robot")
    assert r.status_code == 422


def test_upload_size_and_pixel_limits_are_413(db):
    big = _png(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))  # ~1.4 MB
    with TestClient(create_app(agent_factory(), db_path=db, max_upload_mb=1.0, max_pixels=400 * 400)) as c:
        r = _start(c, data=big)
        assert r.status_code == 413 and "MB limit" in r.json()["detail"]
        small_but_wide = _png(np.zeros((300, 600, 3), np.uint8))
        r = _start(c, data=small_but_wide)
        assert r.status_code == 413 and r.json()["error"] == "ImageTooLargeError"
        assert _start(c, data=_png(np.full((300, 300, 3), 90, np.uint8))).status_code == 200


def test_a_failing_run_reports_its_error(db):
    # no organ and no router: the agent fails in perceive; the API shows why, the stream ends with it
    with TestClient(create_app(agent_factory(organ=None), db_path=db)) as c:
        r = _start(c)
        assert r.status_code == 200 and r.json()["status"] == "error"
        assert "no organ was given" in r.json()["error"]
        end = _sse(c.get(f"/api/runs/{r.json()['run_id']}/events").text)[-1]
        assert end[1] == "end" and end[2]["status"] == "error" and "organ" in end[2]["error"]
        assert c.post(r.json()["review_url"], json={"action": "accept", "reviewer": "x"}).status_code == 409


def test_factory_must_enable_review(db):
    app = create_app(_no_review_factory, db_path=db)
    with pytest.raises(EchoError, match="review=True"):
        with TestClient(app):
            pass


def _no_review_factory(*, checkpointer, store):
    from _fakes import fake_toolkit

    from echo_agent.agent import EchoAgent

    return EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None, checkpointer=checkpointer)


# -- persistence --------------------------------------------------------------------------------------
def test_paused_review_survives_a_restart(db):
    with TestClient(create_app(agent_factory(), db_path=db)) as c1:
        body = _paused(c1, age="61")
    assert (db.parent / "runs.images" / f"{body['image']['id']}.png").is_file()
    # a new app (new agent, new in-memory image store) on the same database and image folder
    with TestClient(create_app(agent_factory(), db_path=db)) as c2:
        state = c2.get(f"/api/runs/{body['run_id']}").json()
        assert state == body
        assert c2.get(body["overlay_url"]).status_code == 200
        r = c2.post(body["review_url"], json={"action": "edit", "reviewer": "dr-late", "label": "benign"})
        assert r.status_code == 200, r.text
        assert r.json()["review"]["changes"]["label"] == {"from": body["diagnosis"]["label"], "to": "benign"}
        assert r.json()["review"]["original"]["label"] == body["diagnosis"]["label"]
    with TestClient(create_app(agent_factory(), db_path=db)) as c3:
        final = c3.get(f"/api/runs/{body['run_id']}").json()
        assert final["status"] == "done" and final["diagnosis"]["label"] == "benign"
        assert final["events"][: len(body["events"])] == body["events"]


def test_a_run_interrupted_by_a_stop_is_marked_failed(db):
    det = GatedDetector()
    with TestClient(create_app(agent_factory(detector=det), db_path=db)) as c:
        rid = _start(c, mode="background").json()["run_id"]
        assert det.entered.wait(10)
        # leaving the block stops the server with the run still blocked in the detector
        det.gate.set()  # let the worker thread finish after the loop is gone
    with TestClient(create_app(agent_factory(), db_path=db)) as c:
        state = c.get(f"/api/runs/{rid}").json()
        assert state["status"] == "error" and "server stopped" in state["error"]


def _writable_now(db) -> bool:
    import sqlite3

    con = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def test_closing_after_a_cancelled_write_leaves_the_database_unlocked(db):
    """A stop can cancel a checkpoint or index write between its statement and its commit. If a
    cursor of that connection still lives (a cancelled frame in a reference cycle holds it, mid-read),
    closing the connection did not end the transaction: the process kept SQLite's write lock until
    the garbage collector ran, and the next server on the file found the database locked."""
    import asyncio

    from echo_agent.server.app import open_checkpointer
    from echo_agent.server.runs import RunIndex

    kept = []

    async def leave_a_write_open(conn, insert, table):
        await conn.execute(insert)
        cur = await conn.execute(f"SELECT 1 FROM {table} UNION ALL SELECT 1 FROM {table}")
        await cur.fetchone()  # a read left half-way keeps its statement active
        kept.append(cur)
        assert conn.in_transaction

    async def main():
        db.parent.mkdir(parents=True)
        async with open_checkpointer(db, None) as saver:
            await saver.conn.execute("CREATE TABLE t (x INTEGER)")
            await saver.conn.commit()
            await leave_a_write_open(saver.conn, "INSERT INTO t DEFAULT VALUES", "t")
        assert _writable_now(db), "the checkpointer's connection kept the write lock after closing"
        index = RunIndex(db)
        await index.open()
        await leave_a_write_open(index._conn, "INSERT INTO echo_run_events VALUES ('r', 0, '{}')", "echo_run_events")
        await index.close()
        assert _writable_now(db), "the run index's connection kept the write lock after closing"

    asyncio.run(main())
    assert len(kept) == 2


# -- Postgres (optional) ------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture()
def postgres_url():
    """ECHO_AGENT_TEST_POSTGRES_URL, or a throwaway cluster on a Unix socket (no TCP) in tmp_path."""
    import os
    import subprocess

    pytest.importorskip("langgraph.checkpoint.postgres.aio", reason="needs langgraph-checkpoint-postgres")
    pytest.importorskip("psycopg", reason="needs psycopg")
    if os.environ.get("ECHO_AGENT_TEST_POSTGRES_URL"):
        yield os.environ["ECHO_AGENT_TEST_POSTGRES_URL"]
        return
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no Postgres server binaries (apt-get install postgresql) and no ECHO_AGENT_TEST_POSTGRES_URL")
    import shutil
    import tempfile

    as_user: list[str] = []
    # a short path of its own: pytest's tmp_path is private to root and too long for a socket name
    root = Path(tempfile.mkdtemp(prefix="echo-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root: run the cluster as the 'postgres' user
        import pwd

        try:
            uid = pwd.getpwnam("postgres").pw_uid
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to own the test cluster")
        os.chown(root, uid, -1)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, sock = root / "pgdata", root
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    port = "54329"
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w",
                    "-o", f"-k {sock} -c listen_addresses='' -p {port}", "start"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql://postgres@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_checkpointer_survives_a_restart(tmp_path, postgres_url):
    import sqlite3

    import psycopg

    db = tmp_path / "index" / "runs.sqlite"
    with TestClient(create_app(agent_factory(), db_path=db, checkpointer_url=postgres_url)) as c1:
        body = _paused(c1)
    with psycopg.connect(postgres_url) as conn:
        n = conn.execute("SELECT count(*) FROM checkpoints WHERE thread_id = %s", (body["run_id"],)).fetchone()[0]
    assert n > 0
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "checkpoints" not in tables and "echo_runs" in tables  # the SQLite file holds only the run index
    with TestClient(create_app(agent_factory(), db_path=db, checkpointer_url=postgres_url)) as c2:
        r = c2.post(body["review_url"], json={"action": "reject", "reviewer": "dr-pg", "comment": "blurred"})
        assert r.status_code == 200, r.text
        assert r.json()["indeterminate"] and r.json()["review"]["reviewer"] == "dr-pg"


def test_checkpointer_url_must_be_postgres(db):
    with pytest.raises(EchoError, match="postgresql://"):
        with TestClient(create_app(agent_factory(), db_path=db, checkpointer_url="mysql://x")):
            pass


# -- the serve command --------------------------------------------------------------------------------
def test_serve_command_rejects_bad_arguments(tmp_path):
    from echo_agent.errors import EchoInputError
    from echo_agent.server.cli import serve_command

    with pytest.raises(EchoInputError, match="port"):
        serve_command("127.0.0.1", 70000, tmp_path / "x.sqlite")
    with pytest.raises(EchoInputError, match="is a folder"):
        serve_command("127.0.0.1", 8000, tmp_path)


def test_serve_command_serves_the_page_and_api(tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("uvicorn", reason="the serve command needs uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "cli.sqlite"
    code = f"from echo_agent.server.cli import serve_command; serve_command('127.0.0.1', {port}, {str(db)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.poll() is not None else ""
                    pytest.fail(f"echo-agent serve did not come up: {out[-2000:]}")
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"echo-agent" in r.read()
        assert db.is_file() and (tmp_path / "cli.images").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_chunked_upload_is_cut_off_at_the_limit(db):
    """No Content-Length (chunked): the body is counted while it streams and refused past the limit,
    instead of being spooled to temp files in full before a 413."""
    def body():
        yield b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n" \
              b"Content-Type: image/png\r\n\r\n"
        for _ in range(40):  # 40 MB
            yield b"\0" * (1 << 20)
        yield b"\r\n--xx--\r\n"

    with TestClient(create_app(agent_factory(), db_path=db, max_upload_mb=1.0)) as c:
        r = c.post("/api/runs", content=body(), headers={"content-type": "multipart/form-data; boundary=xx"})
        assert r.status_code == 413 and r.json()["error"] == "ImageTooLargeError"
        assert c.get("/api/runs").status_code == 200  # the server goes on


async def test_body_limit_stops_reading_a_chunked_body_at_the_limit():
    """The middleware itself, driven as an ASGI server would: the app behind it sees a disconnect
    once the limit is passed, the rest of the body is never received, and the answer is 413."""
    from echo_agent.server.app import BodyLimit

    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": True} for _ in range(100)]
    received, sent, app_saw = [], [], []

    async def receive():
        received.append(1)
        return chunks[len(received) - 1]

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # reads like a multipart parser, then answers 200
        while True:
            m = await receive()
            app_saw.append(m["type"])
            if m["type"] == "http.disconnect" or not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "POST", "path": "/api/runs", "headers": []}
    await BodyLimit(app, paths=("/api/runs",), max_bytes=5000, upload_limit=5000)(scope, receive, send)
    assert len(received) == 6 and app_saw[-1] == "http.disconnect"
    assert sent[0]["status"] == 413 and b"ImageTooLargeError" in sent[1]["body"]


def test_inverted_nan_or_outside_review_boxes_are_refused_and_boxes_are_clipped(client):
    body = _paused(client)
    for box in ([220, 260, 100, 120], [float("nan"), 1, 2, 3], [1, 2, 3, float("inf")]):
        r = client.post(body["review_url"], content=json.dumps({"action": "edit", "reviewer": "dr-x", "box": box}),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422, (box, r.text)
    r = client.post(body["review_url"], json={"action": "edit", "reviewer": "dr-x", "box": [5000, 5000, 6000, 6000]})
    assert r.status_code == 422 and "outside" in r.json()["detail"]
    r = client.post(body["review_url"], json={"action": "edit", "reviewer": "dr-x", "box": [-50, 10, 100, 9000]})
    assert r.status_code == 200, r.text
    dx = Diagnosis.model_validate(r.json())
    assert dx.box.x1 == 0 and dx.box.y2 == dx.image_height


def test_host_origin_checks_and_security_headers(db):
    app = create_app(agent_factory(), db_path=db, allowed_hosts=["review.example.org"])
    with TestClient(app) as c:
        r = c.get("/api/organs")
        assert r.status_code == 200
        for name in ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy"):
            assert name in r.headers
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        # DNS rebinding: an attacker's name resolving to 127.0.0.1 arrives with its own Host
        r = c.get("/api/organs", headers={"host": "evil.example.com"})
        assert r.status_code == 400 and r.json()["error"] == "HostNotAllowed"
        assert "x-frame-options" in r.headers
        assert c.get("/api/organs", headers={"host": "review.example.org:8443"}).status_code == 200
        assert c.get("/api/organs", headers={"host": "[::1]:8000"}).status_code == 200
        # a page elsewhere cannot start runs or post reviews
        png = _png(np.full((300, 300, 3), 90, np.uint8))
        for headers in ({"origin": "http://evil.example.com"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"}):
            r = c.post("/api/runs", files={"file": ("a.png", png, "image/png")}, headers=headers)
            assert r.status_code == 403 and r.json()["error"] == "CrossOriginRefused", headers
            r = c.post("/api/runs/x/review", json={"action": "accept"}, headers=headers)
            assert r.status_code == 403
        same = c.post("/api/runs", files={"file": ("a.png", png, "image/png")}, headers={"origin": "http://127.0.0.1"})
        assert same.status_code == 202, same.text
    with TestClient(create_app(agent_factory(), db_path=db, allowed_hosts=["*"])) as c:
        assert c.get("/api/organs", headers={"host": "anything.example"}).status_code == 200


def test_concurrent_decoding_is_bounded(db, monkeypatch):
    import threading
    import time as _time

    from echo_agent import imaging

    real = imaging.load_image
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow_load(*a, **k):
        if not (a and isinstance(a[0], (bytes, bytearray))):  # only the server's decoding of uploads
            return real(*a, **k)
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        _time.sleep(0.3)
        try:
            return real(*a, **k)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(imaging, "load_image", slow_load)
    png = _png(np.full((300, 300, 3), 90, np.uint8))
    with TestClient(create_app(agent_factory(), db_path=db, max_concurrent_decodes=1)) as c:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(_start(c, data=png).status_code)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes.count(200) + codes.count(202) == 4 and state["max"] == 1
    with pytest.raises(ValueError, match="max_concurrent_decodes"):
        create_app(agent_factory(), db_path=db, max_concurrent_decodes=0)


# -- storage faults (hardening): a locked database costs time, not consistency --------------------------
def test_review_survives_a_storage_failure_between_graph_and_index(db, monkeypatch):
    """The graph takes the review, then recording it fails with 'database is locked': the retry
    finds the review in the checkpointer and finishes the bookkeeping instead of leaving the run
    stuck in 'pending-review' (every retry used to get 409)."""
    import sqlite3

    from echo_agent.server.runs import RunIndex

    real_update = RunIndex.update
    failures = {"left": 1}

    async def flaky_update(self, run_id, **fields):
        if fields.get("status") == "done" and failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return await real_update(self, run_id, **fields)

    monkeypatch.setattr(RunIndex, "update", flaky_update)
    with TestClient(create_app(agent_factory(), db_path=db)) as c:
        body = _paused(c)
        r = c.post(body["review_url"], json={"action": "accept", "reviewer": "dr-l"})
        assert r.status_code == 200, r.text
        assert c.get(f"/api/runs/{body['run_id']}").json()["status"] == "done"
        again = c.post(body["review_url"], json={"action": "accept", "reviewer": "dr-l"})  # a client retry
        assert again.status_code == 200 and again.json()["review"]["reviewer"] == "dr-l"
        other = c.post(body["review_url"], json={"action": "reject", "reviewer": "dr-m"})
        assert other.status_code == 409 and other.json()["error"] == "RunConflict"


def test_an_exclusive_lock_on_the_database_delays_but_does_not_wedge_the_server(db):
    import sqlite3
    import threading
    import time as _time

    with TestClient(create_app(agent_factory(), db_path=db), raise_server_exceptions=False) as c:
        body = _paused(c)
        held = threading.Event()

        def hold(seconds):
            con = sqlite3.connect(db, timeout=1, isolation_level=None)
            con.execute("BEGIN EXCLUSIVE")
            held.set()
            _time.sleep(seconds)
            con.execute("COMMIT")
            con.close()

        t = threading.Thread(target=hold, args=(7.0,))  # longer than the checkpointer's 5 s busy timeout
        t.start()
        held.wait(5)
        r = c.post(body["review_url"], json={"action": "accept", "reviewer": "dr-k"})
        t.join()
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
        assert c.get(f"/api/runs/{body['run_id']}").json()["status"] == "done"
        assert _start(c).status_code == 200  # and the server serves normally afterwards


def test_a_full_disk_is_a_json_507_and_leaves_no_temp_files(db, monkeypatch, tmp_path):
    import errno

    from PIL import Image as PILImage

    real_save = PILImage.Image.save

    def full(self, fp, *a, **k):
        if str(fp).endswith(".tmp"):
            with open(fp, "wb") as f:  # part of the file lands, then the disk is full
                f.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    images = tmp_path / "imgs"
    with TestClient(create_app(agent_factory(), db_path=db, image_dir=images), raise_server_exceptions=False) as c:
        monkeypatch.setattr(PILImage.Image, "save", full)
        r = _start(c, data=_png(np.full((300, 300, 3), 77, np.uint8)))
        assert r.status_code == 507 and r.json()["error"] == "StorageFullError", r.text
        assert not [p for p in images.iterdir() if ".tmp" in p.name]
        monkeypatch.undo()
        assert _start(c).status_code == 200  # space back: the server goes on


# -- access tokens (hardening) ----------------------------------------------------------------------------
TOKENS = {"tok-alice-0123456789abcdef": "alice", "tok-bob-0123456789abcdefgh": "bob"}


def test_tokens_guard_the_api_and_name_the_reviewer(db):
    with TestClient(create_app(agent_factory(), db_path=db, auth_tokens=TOKENS)) as c:
        assert c.get("/api/health").status_code == 200  # liveness stays open
        assert c.get("/").status_code == 200  # the page itself holds no data
        r = c.get("/api/runs")
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        alice = {"Authorization": "Bearer tok-alice-0123456789abcdef"}
        r = c.post("/api/runs?mode=wait", files={"file": ("scan.png", IMAGE, "image/png")}, headers=alice)
        assert r.status_code == 200, r.text
        # whoever the body names, the review is recorded under the token's reviewer
        rv = c.post(r.json()["review_url"], json={"action": "accept", "reviewer": "someone-else"}, headers=alice)
        assert rv.status_code == 200 and rv.json()["review"]["reviewer"] == "alice"
        # the page's way: exchange the token for an HttpOnly, SameSite=Strict cookie
        bad = c.post("/api/session", json={"token": "nope"})
        assert bad.status_code == 401
        s = c.post("/api/session", json={"token": "tok-bob-0123456789abcdefgh"})
        assert s.status_code == 200 and s.json()["reviewer"] == "bob"
        cookie = s.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/api/runs").status_code == 200  # the cookie now authenticates


def test_tokens_file_and_the_non_loopback_rule(tmp_path):
    from echo_agent.errors import EchoInputError
    from echo_agent.server.app import load_tokens
    from echo_agent.server.cli import serve_command

    f = tmp_path / "tokens.txt"
    f.write_text("# reviewers\nalice:tok-alice-0123456789abcdef\n\nbob:tok-bob-0123456789abcdefgh\n")
    assert load_tokens(f) == TOKENS
    for bad in ("alice:short", "no-colon-here-0123456789", "alice:tok-alice-0123456789abcdef\nalice:tok-x-0123456789abcdefgh"):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(EchoInputError):
            load_tokens(tmp_path / "bad.txt")
    with pytest.raises(EchoInputError, match="tokens-file"):
        serve_command("0.0.0.0", 8000, tmp_path / "x.sqlite")
