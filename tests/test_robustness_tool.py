"""tools/robustness.py: the agent on the same images under acquisition and export changes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_policy_tool import ROOT, _manifest, run_tool

from echo_agent.eval.manifest import ManifestImage
from echo_agent.schemas import Box

TOOL = ROOT / "tools" / "robustness.py"
sys.path.insert(0, str(ROOT / "tools"))


@pytest.mark.parametrize("name", ["half_res", "res_1.5x", "mirror", "pad_15", "crop_10", "jpeg_q25", "speckle"])
def test_boxes_follow_the_pixels(tmp_path: Path, name: str):
    """A bright square drawn inside the box is still inside the moved box after each change."""
    from robustness import CHANGES, rewrite

    x = np.zeros((60, 100), np.uint8)
    x[10:30, 20:50] = 200
    Image.fromarray(x).save(tmp_path / "a.png")
    im = ManifestImage(image=tmp_path / "a.png", organ="breast", label="benign", boxes=(Box(x1=20, y1=10, x2=50, y2=30),))
    out_dir = tmp_path / name
    out_dir.mkdir()
    moved = rewrite(im, CHANGES[name], out_dir)
    y = np.asarray(Image.open(moved.image).convert("L")).astype(float)
    (b,) = moved.boxes
    inside = y[int(b.y1) + 1:int(b.y2) - 1, int(b.x1) + 1:int(b.x2) - 1]
    mask = np.ones_like(y, bool)
    mask[int(b.y1) - 1:int(b.y2) + 1, int(b.x1) - 1:int(b.x2) + 1] = False
    assert inside.mean() > 100 and y[mask].mean() < 40
    assert moved.image.suffix == CHANGES[name].suffix and im.image.exists()  # the user's file is untouched
    rerun = rewrite(im, CHANGES[name], out_dir)
    assert np.array_equal(np.asarray(Image.open(rerun.image)), np.asarray(Image.open(moved.image)))  # deterministic


def test_the_tool_runs_the_harness_per_change_and_refuses_test_rows(tmp_path: Path):
    out = tmp_path / "out"
    r = run_tool(TOOL, str(_manifest(tmp_path, n=6)), "--out", str(out), "--changes", "mirror,half_res")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "robustness.json").read_text())
    assert list(res["results"]) == ["clean", "mirror", "half_res"]
    clean = res["results"]["clean"]["breast"]
    assert clean["n"] == 6 and clean["decisions_changed"] == 0
    assert 0 <= res["results"]["half_res"]["breast"]["decisions_changed"] <= 6
    assert "| mirror |" in (out / "robustness.md").read_text()

    (tmp_path / "t").mkdir()
    r = run_tool(TOOL, str(_manifest(tmp_path / "t", split="test", n=4)), "--out", str(tmp_path / "out2"))
    assert r.returncode == 2 and "test-split rows" in r.stderr
    r = run_tool(TOOL, str(tmp_path / "cal.csv"), "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr
    r = run_tool(TOOL, str(tmp_path / "cal.csv"), "--out", str(tmp_path / "out3"), "--changes", "sepia")
    assert r.returncode == 2 and "unknown change" in r.stderr
