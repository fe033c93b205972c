"""tools/benchmark.py: the classifier-only mode that times candidate second looks beside the packaged one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_candidate_classifiers_are_timed_beside_the_packaged_one(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from echo_agent.organs import get_organ

    candidate = tmp_path / "candidate.onnx"
    shutil.copy(get_organ("breast").resolve_classifier_weights(), candidate)
    out = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--only-classifier", str(candidate),
                          "--runs", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = dict(line.rsplit(None, 1) for line in out.stdout.splitlines() if line.strip())  # key ... value
    timed = [k for k in lines if k.endswith("p50 of rounds")]
    assert [k.split(":")[0] for k in timed] == ["packaged", "candidate.onnx"]
    assert all(float(lines[k]) > 0 for k in timed)
    sizes = {k.split(":")[0]: float(v) for k, v in lines.items() if k.endswith(": MB")}
    assert sizes["packaged"] == sizes["candidate.onnx"] > 1  # the same file, measured twice
    assert not any(k.startswith(("run_", "plumbing", "import")) for k in lines)  # nothing else is timed
