"""End to end in a real headless browser: upload, watch the steps, see the report, edit, check the API.

Uses Debian's chromium (``apt-get install chromium``) driven by Playwright's Python package; the
browser Playwright would download is never used. Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web service needs the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the web service needs the 'serve' extra (uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the 'dev' extra)")

from _fakes import FakeDetector  # noqa: E402
from _server_fakes import agent_factory  # noqa: E402

from echo_agent.imaging import example_image  # noqa: E402
from echo_agent.server import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-dev-shm-usage",
]
# A box around the lesion of the packaged example, so the screenshots show a realistic overlay.
LESION = ([150.0, 170.0, 330.0, 300.0], "malignant", 0.82)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture()
def server(tmp_path):
    """The app on a free loopback port, served by uvicorn in a thread."""
    import uvicorn

    app = create_app(agent_factory(detector=FakeDetector([LESION])), db_path=tmp_path / "web.sqlite")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 20 s")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture()
def page():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(20_000)
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:  # loopback only
        return json.loads(r.read())


def test_upload_stream_report_edit_and_errors(server, page, tmp_path):
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#organ option[value='breast']").count() == 1
    unlabelled = page.eval_on_selector_all(
        "input, select, textarea", "els => els.filter(e => !e.labels || e.labels.length === 0).map(e => e.id || e.name)"
    )
    assert unlabelled == [], f"form controls without a label: {unlabelled}"

    # 1. upload the packaged example with clinical context
    page.set_input_files("#file", str(example_image("breast_malignant")))
    page.select_option("#organ", "breast")
    page.fill("#age", "52")
    page.fill("#symptoms", "palpable lump")
    page.click("#analyse")

    # 2. the steps stream in, the run pauses for review, the report and the overlay appear
    page.wait_for_selector("#steps li[data-type='review_requested']")
    page.wait_for_selector("#report-table")
    # polled from here: wait_for_function compiles its predicate in the page, which the page's CSP forbids
    _wait_until(page, "document.getElementById('overlay').complete && document.getElementById('overlay').naturalWidth > 0")
    types = page.eval_on_selector_all("#steps li", "els => els.map(e => e.dataset.type)")
    assert types[0] == "perceived" and types[-1] == "review_requested"
    assert "tool_called" in types and "evidence" in types
    assert page.locator("#steps li[data-type='evidence']").first.inner_text().count("candidate(s)") == 1
    assert "Waiting for your review" in page.inner_text("#run-status")
    report = page.inner_text("#report-table")
    assert "malignant" in report and "BI-RADS" in report and "Rationale" in report and "Recommendation" in report
    assert page.locator("#report-table meter").count() == 3
    run_id = page.evaluate("location.hash").split("=", 1)[1]
    assert _get(f"{server}/api/runs/{run_id}")["context"]["age"] == 52
    page.screenshot(path=str(ARTIFACTS / "web_01_report.png"), full_page=True)

    # 3. the reviewer edits the label and submits
    page.fill("#reviewer", "dr-web")
    page.check("input[name='action'][value='edit']")
    assert page.is_enabled("#edit-label")
    page.select_option("#edit-label", "benign")
    assert page.input_value("#box-x1") == "150"  # prefilled with the agent's box
    page.fill("#box-x1", "140")
    page.click("#submit-review")
    page.wait_for_selector("#review-record")
    assert "Done" in page.inner_text("#run-status")
    assert page.is_hidden("#review-section")
    record = page.inner_text("#review-record")
    assert "edit by dr-web" in record and 'label: "malignant" → "benign"' in record
    page.wait_for_selector("#steps li[data-type='diagnosis']:last-child")
    page.screenshot(path=str(ARTIFACTS / "web_02_reviewed.png"), full_page=True)

    # 4. the API holds the reviewed Diagnosis with who changed what, next to the original
    state = _get(f"{server}/api/runs/{run_id}")
    assert state["status"] == "done"
    dx = state["diagnosis"]
    assert dx["label"] == "benign" and dx["review"]["reviewer"] == "dr-web"
    assert dx["review"]["changes"]["label"] == {"from": "malignant", "to": "benign"}
    assert dx["review"]["original"]["label"] == "malignant"
    assert dx["review"]["changes"]["box"] == {"from": [150.0, 170.0, 330.0, 300.0], "to": [140.0, 170.0, 330.0, 300.0]}
    assert dx["box"] == {"x1": 140.0, "y1": 170.0, "x2": 330.0, "y2": 300.0}

    # 5. a text file is refused with the library's message shown in the page
    notes = tmp_path / "notes.txt"
    notes.write_text("patient notes, not an image\n")
    page.set_input_files("#file", str(notes))
    page.click("#analyse")
    err = page.wait_for_selector("#upload-error:not([hidden])")
    text = err.inner_text()
    assert "text, not an image" in text and "415" in text
    page.screenshot(path=str(ARTIFACTS / "web_03_error.png"), full_page=True)
    assert len(_get(f"{server}/api/runs")) == 1


def test_reviewer_id_is_required_and_reject_needs_a_comment(server, page):
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.set_input_files("#file", str(example_image("breast_benign")))
    page.select_option("#organ", "breast")
    page.click("#analyse")
    page.wait_for_selector("#review-section:not([hidden])")
    page.click("#submit-review")
    assert "reviewer id" in page.wait_for_selector("#review-error:not([hidden])").inner_text()
    page.fill("#reviewer", "dr-r")
    page.check("input[name='action'][value='reject']")
    page.click("#submit-review")
    assert "comment" in page.inner_text("#review-error")
    page.fill("#comment", "shadowing artefact, repeat the scan")
    page.click("#submit-review")
    page.wait_for_selector("#review-record")
    assert "indeterminate" in page.inner_text("#report-table")
    run_id = page.evaluate("location.hash").split("=", 1)[1]
    dx = _get(f"{server}/api/runs/{run_id}")["diagnosis"]
    assert dx["indeterminate"] and dx["review"]["action"] == "reject" and "shadowing" in dx["review"]["comment"]


def _wait_until(page, expression: str, timeout_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.1)
