"""tools/recalibrate_fusion.py: the packaged fusion's temperature refitted on a user's labelled images."""

from __future__ import annotations

import subprocess
from pathlib import Path

from test_train_policy_tool import ROOT, _manifest, run_tool

TOOL = ROOT / "tools" / "recalibrate_fusion.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_tool(TOOL, *args)


def test_recalibrating_the_packaged_fusion_on_own_images(tmp_path: Path):
    from echo_agent.fusion import load_fusion_params

    out, cache = tmp_path / "recal.json", tmp_path / "runs.jsonl"
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path, n=24)), "--out", str(out),
             "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    assert "running the agent on 24 breast images (manifest" in r.stdout and "grouped 3-fold: NLL" in r.stdout
    packaged, new = load_fusion_params("breast"), load_fusion_params("breast", str(out))
    assert new.weights == packaged.weights and new.feature_names == packaged.feature_names
    rec = new.training["recalibration"]
    assert rec["n"] == 24 and rec["groups"] == 12 and rec["temperature"] == new.temperature
    assert rec["temperature_before"] == packaged.temperature and rec["source"].startswith("manifest")
    assert len(cache.read_text().splitlines()) == 24
    # never overwritten without --force; the cached runs are reused with it
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--out", str(out), "--runs-cache", str(cache))
    assert r.returncode == 2 and "exists" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--out", str(out), "--runs-cache", str(cache),
             "--force")
    assert r.returncode == 0 and "reusing 24 cached runs" in r.stdout


def test_recalibration_refuses_too_few_images_and_test_rows(tmp_path: Path):
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path, n=12)), "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "at least 20" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path, split="test", n=24)), "--out", str(tmp_path / "y.json"))
    assert r.returncode == 2 and "test" in r.stderr
    r = _run("--organ", "breast", "--centers", "busi", "--split", "test", "--out", str(tmp_path / "z.json"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not list(tmp_path.glob("*.json"))


def test_retargeting_the_fusion_to_a_retrained_classifier(tmp_path: Path):
    import shutil

    from echo_agent.detectors import get_region_classifier, load_region_classifier
    from echo_agent.fusion import load_fusion_params

    retrained = tmp_path / "retrained.onnx"  # stands in for the same recipe retrained: another model to the fusion
    shutil.copy(get_region_classifier("breast").path, retrained)
    manifest, out = _manifest(tmp_path, n=20), tmp_path / "retargeted.json"
    cache = tmp_path / "runs.jsonl"
    r = _run("--organ", "breast", "--manifest", str(manifest), "--classifier", str(retrained), "--out", str(out),
             "--runs-cache", str(cache))
    assert r.returncode == 2 and "steps aside" in r.stderr and not out.exists()
    r = _run("--organ", "breast", "--manifest", str(manifest), "--out", str(out), "--retarget")
    assert r.returncode == 2 and "--retarget needs" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(manifest), "--classifier", str(retrained), "--out", str(out),
             "--runs-cache", str(cache), "--retarget")
    assert r.returncode == 0, r.stderr
    packaged, new = load_fusion_params("breast"), load_fusion_params("breast", str(out))
    name = load_region_classifier(retrained).name
    assert "retargeted classifiers:" in r.stdout and name in r.stdout
    assert new.weights == packaged.weights and new.training["classifiers"] == [name]
    assert new.training["retargeted"] == {"classifiers": {"from": packaged.training["classifiers"], "to": [name]}}
    assert new.training["detectors"] == packaged.training["detectors"] and new.training["recalibration"]["n"] == 20
