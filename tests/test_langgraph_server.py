"""The deployable graphs (graphs/echo_graph.py) under the real ``langgraph dev`` server, driven by
the official Python SDK client: streaming node updates, the final Diagnosis, and the human-review
interrupt resumed with a ``Command``.

The server runs as a subprocess on loopback in its own process group and is killed at module end.
It is served twice where possible: with the fake tool backends of tests/_fakes.py (always; selected
through ``ECHO_AGENT_TOOLKIT``) and with the packaged toolkit (only when the detector weights ship).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("langgraph_api", reason="langgraph-cli[inmem] is not installed (pip install -e '.[serve]')")
pytest.importorskip("langgraph_cli", reason="langgraph-cli is not installed (pip install -e '.[serve]')")
langgraph_sdk = pytest.importorskip("langgraph_sdk", reason="langgraph-sdk is not installed (pip install -e '.[serve]')")

from echo_agent.imaging import example_image, load_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GRAPH_FILE = REPO / "graphs" / "echo_graph.py"
WEIGHTS = REPO / "echo_agent" / "assets" / "weights"
STARTUP_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"langgraph dev exited with {proc.returncode} before it was ready:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ok", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"langgraph dev was not ready within {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group (the server only: it was started in a new session)."""
    pgid = proc.pid
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # No member of the group may survive (uvicorn workers, reloaders, ...).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)


def _packaged_weights() -> bool:
    return (WEIGHTS / "breast.onnx").is_file()


@pytest.fixture(scope="module", params=["fake-tools", "packaged-tools"])
def served(request, tmp_path_factory):
    """``(url, toolkit kind)`` of a running ``langgraph dev`` serving graphs/echo_graph.py."""
    kind = request.param
    if kind == "packaged-tools" and not _packaged_weights():
        pytest.skip(f"packaged detector weights are not shipped yet ({WEIGHTS / 'breast.onnx'} is missing)")
    work = tmp_path_factory.mktemp(f"langgraph-{kind}")
    env_cfg = {"ECHO_AGENT_IMAGE_STORE": str(work / "images"),
               # server-side paths are refused unless roots are configured: allow the bundled examples
               "ECHO_AGENT_IMAGE_ROOTS": str(example_image("breast_benign").resolve().parent)}
    if kind == "fake-tools":
        env_cfg["ECHO_AGENT_TOOLKIT"] = "_fakes:fake_toolkit"
    config = {
        "dependencies": [str(REPO)],
        "graphs": {"echo": f"{GRAPH_FILE}:graph", "echo_review": f"{GRAPH_FILE}:review_graph"},
        "env": env_cfg,
    }
    (work / "langgraph.json").write_text(json.dumps(config, indent=2))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
        "HF_HUB_OFFLINE": "1",
    }
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "langgraph_cli", "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1",
             "--port", str(port), "--config", str(work / "langgraph.json"), "--n-jobs-per-worker", "2"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_ready(url, proc, log)
        yield url, kind, work
    finally:
        _stop(proc)


def _b64(name: str) -> str:
    return base64.b64encode(example_image(name).read_bytes()).decode()


def _local_agent(kind: str):
    from echo_agent import EchoAgent

    if kind == "fake-tools":
        from _fakes import fake_toolkit

        return EchoAgent(toolkit=fake_toolkit(), organ="breast")
    return EchoAgent(organ="breast")


def _node_updates(chunks: list) -> list[tuple[str, str]]:
    """``(namespace, node)`` for every 'updates' event ('' for the parent graph)."""
    out = []
    for c in chunks:
        if c.event == "updates" or c.event.startswith("updates|"):
            ns = c.event.partition("|")[2]
            out.extend((ns, node) for node in c.data)
    return out


async def test_assistants_are_registered(served):
    url, _, _ = served
    client = langgraph_sdk.get_client(url=url)
    graphs = {a["graph_id"] for a in await client.assistants.search()}
    assert {"echo", "echo_review"} <= graphs


async def test_stream_upload_to_diagnosis(served):
    url, kind, work = served
    client = langgraph_sdk.get_client(url=url)
    thread = await client.threads.create()
    chunks = [
        c async for c in client.runs.stream(
            thread["thread_id"], "echo",
            input={"image_b64": _b64("breast_malignant"), "organ": "breast", "clinical": {"age": 52}},
            stream_mode="updates", stream_subgraphs=True,
        )
    ]
    assert not [c for c in chunks if c.event == "error"], [c.data for c in chunks if c.event == "error"]
    updates = _node_updates(chunks)
    parent = [n for ns, n in updates if not ns]
    inner = [n for ns, n in updates if ns.startswith("echo")]
    assert parent == ["load", "echo"]
    assert inner[0] == "perceive" and inner[-1] == "reason"
    assert "reasoner" in inner and "tools" in inner
    # Tool updates stream the evidence as it is produced.
    tool_updates = [c.data["tools"] for c in chunks if c.event.startswith("updates|") and "tools" in c.data]
    kinds = {e["kind"] for u in tool_updates for e in u.get("evidence", [])}
    assert {"detections", "description"} <= kinds

    state = await client.threads.get_state(thread["thread_id"])
    values = state["values"]
    dx = values["diagnosis"]
    assert values.get("image_b64") is None  # the upload is not kept in the checkpoint
    # The pixels went to the server's directory-backed store under their content id.
    loaded = load_image(example_image("breast_malignant"))
    assert values["image"]["id"] == loaded.sha256
    assert (work / "images" / f"{loaded.sha256}.png").is_file()
    # The server's answer is the library's answer for the same image and tools.
    local = _local_agent(kind).run(example_image("breast_malignant"), context={"age": 52})
    assert dx["organ"] == "breast"
    assert dx["label"] == local.label
    assert dx["probability"] == pytest.approx(local.probability, abs=1e-6)
    assert [f["box"] for f in dx["findings"]] == [f.box.model_dump(mode="json") for f in local.findings]


async def test_image_path_input_and_input_errors(served):
    url, _, _ = served
    client = langgraph_sdk.get_client(url=url)
    thread = await client.threads.create()
    out = await client.runs.wait(
        thread["thread_id"], "echo", input={"image_path": str(example_image("breast_benign")), "organ": "breast"}
    )
    assert out["diagnosis"]["organ"] == "breast"
    assert out["image"]["path"] == str(example_image("breast_benign").resolve())

    bad = await client.threads.create()
    chunks = [
        c async for c in client.runs.stream(
            bad["thread_id"], "echo", input={"image_b64": "not base64!!", "organ": "breast"}, stream_mode="updates"
        )
    ]
    errors = [c.data for c in chunks if c.event == "error"]
    assert errors and "not valid base64" in json.dumps(errors)

    both = await client.threads.create()
    chunks = [
        c async for c in client.runs.stream(
            both["thread_id"], "echo",
            input={"image_b64": _b64("breast_benign"), "image_path": str(example_image("breast_benign"))},
            stream_mode="updates",
        )
    ]
    errors = [c.data for c in chunks if c.event == "error"]
    assert errors and "exactly one image source" in json.dumps(errors)


async def test_review_interrupt_and_resume(served):
    from langgraph_sdk.schema import Command

    url, _, _ = served
    client = langgraph_sdk.get_client(url=url)
    thread = await client.threads.create()
    tid = thread["thread_id"]
    chunks = [
        c async for c in client.runs.stream(
            tid, "echo_review", input={"image_b64": _b64("breast_malignant"), "organ": "breast"},
            stream_mode="updates", stream_subgraphs=True,
        )
    ]
    assert not [c for c in chunks if c.event == "error"], [c.data for c in chunks if c.event == "error"]
    interrupts = [c.data["__interrupt__"] for c in chunks if c.event.startswith("updates") and "__interrupt__" in c.data]
    assert interrupts, "the review graph did not pause"
    payload = interrupts[0][0]["value"]
    assert payload["type"] == "review" and set(payload["actions"]) == {"accept", "edit", "reject"}
    agent_dx = payload["diagnosis"]

    state = await client.threads.get_state(tid)
    assert state["next"] == ["echo"]  # paused inside the echo subgraph, before END
    assert (await client.threads.get(tid))["status"] == "interrupted"

    new_label = "benign" if agent_dx["label"] != "benign" else "malignant"
    decision = {"action": "edit", "reviewer": "dr-okafor", "label": new_label, "comment": "second look"}
    resumed = [
        c async for c in client.runs.stream(
            tid, "echo_review", command=Command(resume=decision), stream_mode="updates", stream_subgraphs=True
        )
    ]
    assert not [c for c in resumed if c.event == "error"], [c.data for c in resumed if c.event == "error"]
    assert ("echo", "review") in {(ns.partition(":")[0], n) for ns, n in _node_updates(resumed)}

    final = (await client.threads.get_state(tid))["values"]["diagnosis"]
    assert final["label"] == new_label
    review = final["review"]
    assert review["reviewer"] == "dr-okafor" and review["action"] == "edit"
    assert review["changes"]["label"] == {"from": agent_dx["label"], "to": new_label}
    assert review["original"]["label"] == agent_dx["label"]
    assert (await client.threads.get(tid))["status"] == "idle"


async def test_review_reviewer_from_run_context(served):
    """The reviewer id may come from the run context (EchoRunContext) instead of the decision."""
    from langgraph_sdk.schema import Command

    url, _, _ = served
    client = langgraph_sdk.get_client(url=url)
    tid = (await client.threads.create())["thread_id"]
    await client.runs.wait(tid, "echo_review", input={"image_b64": _b64("breast_benign"), "organ": "breast"})
    out = await client.runs.wait(
        tid, "echo_review", command=Command(resume={"action": "reject", "comment": "poor view"}),
        context={"reviewer": "dr-context"},
    )
    dx = out["diagnosis"]
    assert dx["indeterminate"] is True
    assert dx["review"]["reviewer"] == "dr-context"
    assert "poor view" in dx["indeterminate_reason"]


def test_shipped_langgraph_json_points_at_the_graphs():
    """graphs/langgraph.json is valid for the CLI and each entry names a module-level graph."""
    import ast

    from langgraph_cli.config import validate_config_file

    cfg_path = REPO / "graphs" / "langgraph.json"
    cfg = validate_config_file(cfg_path)
    assert set(cfg["graphs"]) == {"echo", "echo_review"}
    for spec in cfg["graphs"].values():
        file, _, var = spec.partition(":")
        path = (cfg_path.parent / file).resolve()  # `langgraph dev` resolves paths from its cwd: run it in graphs/
        assert path.is_file(), spec
        names = {t.id for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
        assert var in names, f"{spec}: no module-level {var!r}"


@pytest.fixture
def served_module(monkeypatch, tmp_path):
    """graphs/echo_graph.py imported in-process (as the server imports it), on the fake tools."""
    import importlib.util

    monkeypatch.setenv("ECHO_AGENT_TOOLKIT", "_fakes:fake_toolkit")
    monkeypatch.setenv("ECHO_AGENT_IMAGE_STORE", str(tmp_path / "images"))
    spec = importlib.util.spec_from_file_location("echo_graph_under_test", GRAPH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upload_decoding_and_path_roots(served_module, tmp_path):
    from echo_agent.errors import EchoInputError, ImageTooLargeError

    m = served_module
    raw = example_image("breast_benign").read_bytes()
    assert m.decode_upload("data:image/png;base64," + base64.b64encode(raw).decode(), max_bytes=len(raw)) == raw
    with pytest.raises(ImageTooLargeError, match="larger than"):
        m.decode_upload(base64.b64encode(raw).decode(), max_bytes=len(raw) // 2)
    with pytest.raises(EchoInputError, match="data: URL"):
        m.decode_upload("data:image/png,abc", max_bytes=100)

    from _fakes import fake_toolkit

    g = m.make_graph(toolkit=fake_toolkit(), image_roots=[tmp_path / "allowed"])
    with pytest.raises(EchoInputError, match="outside the folders"):
        g.invoke({"image_path": str(example_image("breast_benign")), "organ": "breast"})
    (tmp_path / "allowed").mkdir()
    inside = tmp_path / "allowed" / "b.png"
    inside.write_bytes(raw)
    assert g.invoke({"image_path": str(inside), "organ": "breast"})["diagnosis"]["organ"] == "breast"
    with pytest.raises(EchoInputError, match="exactly one image source"):
        g.invoke({"organ": "breast"})
    # A reference from an earlier run is resolved by id in the server's store; its 'path' and size
    # are not taken from the client.
    first = g.invoke({"image_b64": base64.b64encode(raw).decode(), "organ": "breast"})
    forged = {**first["image"], "path": "/etc/passwd", "width": 1, "height": 1}
    again = g.invoke({"image": forged, "organ": "breast"})
    assert again["image"]["path"] is None
    assert (again["image"]["width"], again["image"]["height"]) == (first["image"]["width"], first["image"]["height"])
    assert again["diagnosis"] == first["diagnosis"]
    with pytest.raises(EchoInputError, match="not in the image store"):
        g.invoke({"image": {"id": "0" * 24, "path": str(inside), "width": 9, "height": 9}, "organ": "breast"})
    # ids are content ids: a path-like id never reaches the store's directory
    for bad in ("../secret", "../../etc/passwd", "0" * 23 + "/", "A" * 24):
        with pytest.raises(EchoInputError, match="not an image id"):
            g.invoke({"image": {"id": bad, "width": 9, "height": 9}, "organ": "breast"})


def test_server_side_paths_are_denied_by_default(served_module, monkeypatch, tmp_path):
    """Default deny: no ECHO_AGENT_IMAGE_ROOTS, no server-side path; outside the roots, the error
    is the same whether the file exists or not; inside, pipes and devices are refused unread."""
    from _fakes import fake_toolkit

    from echo_agent.errors import EchoInputError

    m = served_module
    monkeypatch.delenv("ECHO_AGENT_IMAGE_ROOTS", raising=False)
    g = m.make_graph(toolkit=fake_toolkit())
    with pytest.raises(EchoInputError, match="reads no server-side image paths"):
        g.invoke({"image_path": str(example_image("breast_benign")), "organ": "breast"})
    root = tmp_path / "allowed"
    root.mkdir()
    g = m.make_graph(toolkit=fake_toolkit(), image_roots=[root])
    messages = set()
    for probe in ("/etc/passwd", "/root/.ssh/id_rsa", "/no/such/file.png", str(root / ".." / "x.png"), "/dev/zero"):
        with pytest.raises(EchoInputError) as err:
            g.invoke({"image_path": probe, "organ": "breast"})
        messages.add(str(err.value))
    assert len(messages) == 1 and "outside the folders" in messages.pop()
    os.mkfifo(root / "pipe.png")
    with pytest.raises(EchoInputError, match="not a regular file"):
        g.invoke({"image_path": str(root / "pipe.png"), "organ": "breast"})
    (root / "link.png").symlink_to("/etc/passwd")
    with pytest.raises(EchoInputError, match="outside the folders"):
        g.invoke({"image_path": str(root / "link.png"), "organ": "breast"})
