"""tools/train_policy.py with --manifest: fitting a fusion on a user's own labelled images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_policy.py"


def run_tool(tool: Path, *args: str) -> subprocess.CompletedProcess:
    """A tools/ script run as a user runs it (offline), from the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_tool(TOOL, *args)


def _manifest(tmp_path: Path, split: str = "", n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    rows = ["image,organ,label,x_min,y_min,x_max,y_max,patient_id,split"]
    for i in range(n):
        img = (rng.random((96, 128)) * 60).astype(np.uint8)
        if i % 2:
            img[30:60, 40:80] = 5  # a dark blob the detector may or may not take for a lesion
            box = "40,30,80,60"
        else:
            box = ",,,"
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
        rows.append(f"im{i}.png,breast,{'benign' if i % 2 else 'normal'},{box},p{i // 2},{split}")
    (tmp_path / "cal.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "cal.csv"


def test_fit_on_own_manifest_writes_a_loadable_fusion(tmp_path: Path):
    out = tmp_path / "fusion.json"
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "running the agent on 12 breast images (manifest" in r.stdout
    # 12 images < the 50-image minimum: a calibrated rule, with the warning shown
    assert "WARNING: only 12 breast images" in r.stdout
    params = json.loads(out.read_text())
    assert params["organ"] == "breast"
    assert params["training"]["manifest"].endswith("cal.csv") and params["training"]["split"] is None
    assert params["training"]["n_groups"] == 6  # grouped by patient_id, not by image

    from echo_agent.fusion import load_fusion_params

    assert load_fusion_params("breast", str(out)).organ == "breast"
    # an existing output is never overwritten without --force
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--out", str(out))
    assert r.returncode == 2 and "exists" in r.stderr


def test_manifest_rows_marked_test_are_refused(tmp_path: Path):
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path, "test")), "--out", str(tmp_path / "f.json"))
    assert r.returncode == 2
    assert "12 row(s) have split=test" in r.stderr and not (tmp_path / "f.json").exists()


def test_manifest_without_the_organ_or_with_errors_is_refused(tmp_path: Path):
    m = _manifest(tmp_path)
    r = _run("--organ", "kidney", "--manifest", str(m), "--out", str(tmp_path / "f.json"))
    assert r.returncode == 2 and "no 'kidney' rows" in r.stderr
    (tmp_path / "bad.csv").write_text("image,organ,label\nmissing.png,breast,benign\n")
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "f.json"))
    assert r.returncode == 2 and "missing.png" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path, n=6)), "--out", str(tmp_path / "f.json"))
    assert r.returncode == 2 and "has 6 breast image(s); a fusion needs at least 10" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(m), "--centers", "busi", "--out", str(tmp_path / "f.json"))
    assert r.returncode == 2 and "not allowed with" in r.stderr


def _weights_copy(tmp_path: Path, tag: str) -> Path:
    """The packaged breast detector with a metadata tag: same outputs, another digest, so another
    detector name (``breast-onnx@<digest>``)."""
    import onnx

    from echo_agent.organs import get_organ

    model = onnx.load(str(get_organ("breast").resolve_weights()))
    entry = model.metadata_props.add()
    entry.key, entry.value = "echo_test_fold", tag
    out = tmp_path / f"fold_{tag}.onnx"
    onnx.save(model, str(out))
    return out


def test_cross_fitted_detectors_each_see_only_their_fold(tmp_path: Path):
    from echo_agent.detectors import get_detector, load_detector
    from echo_agent.eval.splits import cross_fit_fold
    from echo_agent.training.fusion_fit import RunRecord

    folds = [_weights_copy(tmp_path, str(k)) for k in range(2)]
    names = [load_detector(f, labels=("benign", "malignant")).name for f in folds]
    assert names[0] != names[1]
    out, cache = tmp_path / "oof.json", tmp_path / "runs.jsonl"
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path)), "--cross-fitted", *map(str, folds),
             "--out", str(out), "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    # every image ran with the detector of its patient's fold, i.e. the one trained without it
    for line in cache.read_text().splitlines():
        rec = RunRecord(**json.loads(line))
        used = {e["detector"] for e in rec.evidence if e.get("kind") == "detections"}
        assert used == {names[cross_fit_fold(rec.group, 2)]}, rec.key
    training = json.loads(out.read_text())["training"]
    # written for the packaged detector, which the cross-fitted ones stand in for
    assert training["detectors"] == [get_detector("breast").name]
    assert sorted(training["runs_detectors"]) == sorted(set(names))
    assert training["cross_fit"]["folds"] == 2 and training["cross_fit"]["groups_per_fold"] == [3, 3]
    # argument errors
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--cross-fitted", str(folds[0]),
             "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "at least 2 detectors" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--for-detector", str(folds[0]),
             "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "only goes with --cross-fitted" in r.stderr


def test_cross_fitted_classifiers_each_see_only_their_fold(tmp_path: Path):
    from _fakes import tiny_classifier

    from echo_agent.detectors import OnnxRegionClassifier, get_region_classifier
    from echo_agent.eval.splits import cross_fit_fold
    from echo_agent.training.fusion_fit import RunRecord

    folds = [tiny_classifier(tmp_path / f"cls{k}.onnx", temperature=1.0 + k) for k in range(2)]
    names = [OnnxRegionClassifier(f).name for f in folds]
    assert names[0] != names[1]
    out, cache = tmp_path / "oof.json", tmp_path / "runs.jsonl"
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path)), "--cross-fitted-classifiers",
             *map(str, folds), "--out", str(out), "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    for line in cache.read_text().splitlines():
        rec = RunRecord(**json.loads(line))
        used = {e["classifier"] for e in rec.evidence if e.get("kind") == "classification"}
        assert used == {names[cross_fit_fold(rec.group, 2)]}, rec.key
    training = json.loads(out.read_text())["training"]
    assert training["classifiers"] == [get_region_classifier("breast").name]
    # and says so, with how to write it for other files (a classifier replaced afterwards = a fallback)
    said = next(line for line in r.stdout.splitlines() if line.startswith("it is for "))
    assert get_region_classifier("breast").name in said and "--for-classifier" in said
    assert sorted(training["runs_classifiers"]) == sorted(names)
    assert training["cross_fit_classifiers"]["folds"] == 2
    assert training["selection"]["mode"] == "simplest"
    # the same cached runs, chosen by the calibration-weighing rule
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--cross-fitted-classifiers",
             *map(str, folds), "--out", str(out), "--runs-cache", str(cache), "--selection", "calibrated", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["training"]["selection"]["mode"] == "calibrated"
    assert "rule (calibrated)" in r.stdout
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--selection", "lowest",
             "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--cross-fitted-classifiers",
             str(folds[0]), "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "at least 2 classifiers" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--for-classifier", str(folds[0]),
             "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "only goes with --cross-fitted-classifiers" in r.stderr


def test_own_classifier_runs_every_image_and_the_fusion_is_written_for_it(tmp_path: Path):
    from _fakes import tiny_classifier

    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.training.fusion_fit import RunRecord

    clf = tiny_classifier(tmp_path / "own.onnx", temperature=2.0)
    name = OnnxRegionClassifier(clf).name
    out, cache = tmp_path / "own.json", tmp_path / "runs.jsonl"
    r = _run("--organ", "breast", "--manifest", str(_manifest(tmp_path)), "--classifier", str(clf),
             "--out", str(out), "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    for line in cache.read_text().splitlines():
        rec = RunRecord(**json.loads(line))
        assert {e["classifier"] for e in rec.evidence if e.get("kind") == "classification"} == {name}, rec.key
    assert json.loads(out.read_text())["training"]["classifiers"] == [name]
    # the Platt-calibrated rules are compared only on request (from the cached runs: no new agent runs)
    names = {c["name"] for c in json.loads(out.read_text())["training"]["selection"]["candidates"]}
    assert "heuristic+temperature" in names and "heuristic+platt" not in names
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--classifier", str(clf), "--platt-rules",
             "--out", str(tmp_path / "platt.json"), "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    names = {c["name"] for c in json.loads((tmp_path / "platt.json").read_text())["training"]["selection"]["candidates"]}
    assert {"detector_rule+platt", "heuristic+platt"} <= names
    # the normal veto is checked on the out-of-fold readings and reported; --normal-veto forces it
    assert "normal veto (auto):" in r.stdout
    # --candidates holds the family fixed: exactly the named candidates (and the guard's detector rule)
    fixed = "logistic[detector+classifier] l2=1"
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--classifier", str(clf), "--min-images", "1",
             "--candidates", fixed, "--out", str(tmp_path / "fixed.json"), "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    sel = json.loads((tmp_path / "fixed.json").read_text())["training"]["selection"]["candidates"]
    assert [c["name"] for c in sel] == ["detector_rule+temperature", fixed]
    for bad, message in ((["logistic[pixels] l2=1"], "unknown fusion candidate"),
                         ([fixed, "--platt-rules"], "drop --feature-sets / --platt-rules")):
        r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--candidates", *bad,
                 "--out", str(tmp_path / "bad.json"), "--runs-cache", str(cache))
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--classifier", str(clf), "--normal-veto", "off",
             "--out", str(tmp_path / "noveto.json"), "--runs-cache", str(cache))
    assert r.returncode == 0, r.stderr
    noveto = json.loads((tmp_path / "noveto.json").read_text())
    assert "normal_veto" not in noveto and noveto["training"]["normal_veto"]["mode"] == "off"
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--normal-veto", "maybe",
             "--out", str(tmp_path / "x.json"), "--runs-cache", str(cache))
    assert r.returncode == 2 and "--normal-veto" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--classifier", str(clf),
             "--cross-fitted-classifiers", str(clf), str(clf), "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "exclude each other" in r.stderr
    r = _run("--organ", "breast", "--manifest", str(tmp_path / "cal.csv"), "--classifier",
             str(tmp_path / "absent.onnx"), "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "classifier not found" in r.stderr
