"""The echo-agent command line and the light-runtime guarantees of the default path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from echo_agent.cli import app
from echo_agent.imaging import example_image

# Wide terminal: rich wraps error panels at the terminal width, so a long tmp path could split a
# message such as "already exists" across two lines and make text assertions depend on the path.
runner = CliRunner(env={"COLUMNS": "300"})

HEAVY = ("torch", "torchvision", "ultralytics", "transformers", "trl", "peft", "sklearn", "matplotlib", "langchain_openai")


def _weights_ready() -> bool:
    from echo_agent.organs import list_organs

    return all((o.resolve_weights() or __import__("pathlib").Path("/nonexistent")).exists() for o in list_organs()[:2])


needs_weights = pytest.mark.skipif(not _weights_ready(), reason="packaged detector weights are not built yet")


@needs_weights
def test_run_prints_and_writes_json_and_overlay(tmp_path):
    js, ov = tmp_path / "dx.json", tmp_path / "ov.png"
    res = runner.invoke(app, ["run", str(example_image("breast_malignant")), "--age", "52",
                              "--symptoms", "palpable lump", "--json", str(js), "--overlay", str(ov)])
    assert res.exit_code == 0, res.output
    assert "diagnosis" in res.output.lower()
    dx = json.loads(js.read_text())
    assert dx["organ"] == "breast" and abs(sum(dx["probabilities"].values()) - 1) < 1e-6
    assert ov.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # never overwrite what is there without --force
    again = runner.invoke(app, ["run", str(example_image("breast_malignant")), "--json", str(js)])
    assert again.exit_code != 0 and "already exists" in again.output
    forced = runner.invoke(app, ["run", str(example_image("breast_malignant")), "--json", str(js), "--force", "--quiet"])
    assert forced.exit_code == 0


@needs_weights
def test_run_json_to_stdout():
    res = runner.invoke(app, ["run", str(example_image("breast_benign")), "--organ", "breast", "--json", "-", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["organ"] == "breast"


def test_bad_input_gives_clear_error_and_exit_code(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    res = runner.invoke(app, ["run", str(bad), "--organ", "breast"])
    assert res.exit_code == 2 and "error" in res.output.lower()
    res = runner.invoke(app, ["run", str(example_image("breast_benign")), "--organ", "liver"])
    assert res.exit_code == 2 and "liver" in res.output
    res = runner.invoke(app, ["run", str(example_image("breast_benign")), "--context", "{broken json"])
    assert res.exit_code != 0 and "JSON" in res.output


def test_schema_and_organs_commands():
    res = runner.invoke(app, ["schema"])
    assert res.exit_code == 0 and "probabilities" in json.loads(res.stdout)["properties"]
    res = runner.invoke(app, ["organs"])
    assert res.exit_code == 0 and "breast" in res.output and "kidney" in res.output


def test_import_is_light():
    code = "import sys, echo_agent; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {'langgraph','langchain_core','onnxruntime','cv2','torch','pydantic'})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import echo_agent pulled in heavy modules: {out}"


@needs_weights
def test_default_agent_runs_without_heavy_packages():
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {HEAVY!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in BLOCKED:
                    raise ImportError('blocked for this test: ' + name)
        sys.meta_path.insert(0, Block())
        from echo_agent import EchoAgent
        from echo_agent.imaging import example_image
        dx = EchoAgent().run(example_image('breast_malignant'), context={{'age': 52}})
        print(dx.organ, dx.label)
        assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == "breast"


@needs_weights
def test_batch_command_engines_write_the_same_journal(tmp_path):
    import shutil

    src = tmp_path / "imgs"
    src.mkdir()
    for name in ("breast_benign", "breast_malignant"):
        shutil.copy(example_image(name), src / f"{name}.png")
    journals = {}
    for engine in ("local", "processes"):
        out = tmp_path / f"{engine}.jsonl"
        res = runner.invoke(app, ["batch", str(src), "--organ", "breast", "--out", str(out), "--engine", engine])
        assert res.exit_code == 0, res.output
        assert "ok / errors (whole journal)" in res.output and "2 / 0" in res.output
        journals[engine] = {r["id"]: r["diagnosis"]["label"] for r in map(json.loads, out.read_text().splitlines())}
    assert journals["local"] == journals["processes"] and len(journals["local"]) == 2
    res = runner.invoke(app, ["batch", str(src), "--out", str(tmp_path / "x.jsonl"), "--engine", "threads"])
    assert res.exit_code != 0 and "processes" in res.output
