"""tools/benchmark.py: the classifier-only mode that times candidate second looks beside the packaged one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_candidate_classifiers_are_timed_beside_the_packaged_one(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from echo_agent.organs import get_organ

    packaged = get_organ("breast").resolve_classifier_weights()
    for d in ("a", "b"):  # two candidates with the same file name stay apart
        (tmp_path / d).mkdir()
        shutil.copy(packaged, tmp_path / d / "candidate.onnx")
    a, b = tmp_path / "a" / "candidate.onnx", tmp_path / "b" / "candidate.onnx"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--only-classifier", str(a), str(b),
                          "--runs", "2", "--json", str(tmp_path / "res.json")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    timed = [k.removesuffix(": ms per crop (3 crops), p50 of rounds") for k in res if k.endswith("p50 of rounds")]
    assert timed == ["packaged", str(a), str(b)]
    assert all(res[f"{name}: ms per crop (3 crops), p50 of rounds"] > 0 for name in timed)
    sizes = {name: res[f"{name}: MB"] for name in timed}
    assert sizes["packaged"] == sizes[str(a)] == sizes[str(b)] == Path(packaged).stat().st_size / 2**20
    assert not any(k.startswith(("run_", "plumbing", "import", "cold")) for k in res)  # nothing else is timed
