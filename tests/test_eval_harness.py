"""End-to-end tests of the evaluation harness: a synthetic run with hand-computed metrics (fake
detector and agent, no weights needed) and a run on a handful of real images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo_agent.errors import EchoInputError
from echo_agent.eval.harness import (
    AGENT,
    DETECTOR,
    detector_prediction,
    eval_command,
    evaluate,
    select_images,
)
from echo_agent.eval.manifest import ManifestImage, default_data_root
from echo_agent.organs import get_organ
from echo_agent.schemas import Box, Detection, Diagnosis, Finding

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# image name -> (pixel value that tells the fake detector which image it sees, label, boxes, center, patient)
IMAGES = {
    "a.png": (10, "benign", [(10, 10, 30, 30)], "x", "p1"),
    "b.png": (20, "malignant", [(20, 20, 40, 50)], "x", "p2"),
    "c.png": (30, "normal", [], "y", "p3"),
    "d.png": (40, "normal", [], "y", "p4"),
}


def _det(box, label, score):
    return Detection(box=Box.from_xyxy(box), label=label, score=score)


class FakeDetector:
    name = "fake-detector"

    def __init__(self):
        self.calls = []

    def detect(self, image, *, score_threshold=0.25, tta=False):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        v = int(image[0, 0, 0])
        self.calls.append((v, score_threshold))
        return {
            10: [_det((10, 10, 30, 30), "benign", 0.9)],
            # right lesion, wrong top label; plus a malignant box elsewhere
            20: [_det((21, 20, 40, 50), "benign", 0.6), _det((0, 0, 8, 8), "malignant", 0.4)],
            30: [_det((5, 5, 15, 15), "benign", 0.5)],  # box on a lesion-free image
            40: [],
        }[v]


class FakeToolkit:
    preprocess = False

    def __init__(self, detector):
        self._detector = detector

    def detector(self, organ):
        return self._detector


class FakeAgent:
    def __init__(self, detector=None):
        self.toolkit = FakeToolkit(detector or FakeDetector())
        self.contexts = {}

    def run(self, image, *, organ=None, context=None):
        name = Path(image).name
        self.contexts[name] = context
        if name == "d.png":
            raise RuntimeError("reasoner crashed on purpose")
        probs, findings = {
            "a.png": ({"normal": 0.1, "benign": 0.7, "malignant": 0.2}, [((10, 10, 30, 30), "benign", 0.8)]),
            "b.png": ({"normal": 0.05, "benign": 0.15, "malignant": 0.8}, [((20, 20, 40, 50), "malignant", 0.7)]),
            "c.png": ({"normal": 0.6, "benign": 0.3, "malignant": 0.1}, []),
        }[name]
        return Diagnosis(
            organ=organ, label=max(probs, key=probs.get), probabilities=probs,
            findings=[Finding(box=Box.from_xyxy(b), label=lbl, score=s) for b, lbl, s in findings],
        )


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    lines = ["image,organ,label,x_min,y_min,x_max,y_max,center,patient_id,age"]
    for name, (v, label, boxes, center, patient) in IMAGES.items():
        Image.fromarray(np.full((64, 64), v, dtype=np.uint8)).save(data / name)
        age = "52" if name == "a.png" else ""
        for b in boxes or [None]:
            coords = ",".join(str(c) for c in b) if b else ",,,"
            lines.append(f"{name},breast,{label},{coords},{center},{patient},{age}")
    path = data / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_synthetic_end_to_end_matches_hand_computed(manifest: Path, tmp_path: Path):
    agent = FakeAgent()
    out = tmp_path / "run"
    res = evaluate(manifest, agent=agent, out_dir=out, progress=False, n_boot=50)

    assert res.n_images == 4
    assert res.errors == {DETECTOR: 0, AGENT: 1}
    assert agent.contexts["a.png"] == {"age": 52} and agent.contexts["b.png"] is None
    assert {t for _, t in agent.toolkit._detector.calls} == {0.25}

    det = res.metrics["breast"].overall[DETECTOR]
    # loc: a TP; b TP (benign box) + FP (malignant box); c FP -> TP2 FP2 FN0
    assert (det.localization.tp, det.localization.fp, det.localization.fn) == (2, 2, 0)
    assert det.localization.f1 == pytest.approx(4 / 6)
    # grounded: a TP; b benign box has the wrong label -> FP + FN, malignant box FP; c FP
    assert (det.grounded.tp, det.grounded.fp, det.grounded.fn) == (1, 3, 1)
    assert det.grounded.f1 == pytest.approx(2 / 6)
    assert det.classification.accuracy == pytest.approx(0.5)  # a, d right; b -> benign, c -> benign
    assert det.classification.balanced_accuracy == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert det.auc.value == pytest.approx(1.0)  # malignant score: a 0 (none), b 0.4
    assert det.calibration is None

    ag = res.metrics["breast"].overall[AGENT]
    assert ag.n_images == 3  # d failed and is left out
    assert ag.classification.accuracy == pytest.approx(1.0)
    assert ag.localization.f1 == pytest.approx(1.0) and ag.grounded.f1 == pytest.approx(1.0)
    assert ag.auc.value == pytest.approx(1.0)
    assert ag.calibration.ece == pytest.approx((0.3 + 0.2 + 0.4) / 3)
    assert ag.calibration.brier == pytest.approx((0.14 + 0.065 + 0.26) / 3)

    centers = res.metrics["breast"].centers
    assert set(centers) == {"x", "y"}
    assert centers["y"][DETECTOR].classification.accuracy == pytest.approx(0.5)
    assert centers["y"][AGENT].n_images == 1

    # files
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["organs"]["breast"]["overall"]["detector"]["localization"]["tp"] == 2
    assert metrics["errors"] == {"detector": 0, "agent": 1}
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    by_name = {Path(x["image"]).name: x for x in lines}
    assert by_name["d.png"]["agent"]["error"]["type"] == "RuntimeError"
    assert by_name["d.png"]["detector"]["label"] == "normal"
    assert by_name["b.png"]["detector"]["label"] == "benign"
    assert by_name["b.png"]["detector"]["positive_score"] == pytest.approx(0.4)
    assert Diagnosis.model_validate(by_name["b.png"]["agent"]["diagnosis"]).label == "malignant"
    assert by_name["b.png"]["agent"]["diagnosis"]["findings"][0]["box"] == {"x1": 20.0, "y1": 20.0, "x2": 40.0, "y2": 50.0}
    assert by_name["a.png"]["truth"] == {"label": "benign", "boxes": [[10.0, 10.0, 30.0, 30.0]], "category": None}
    report = (out / "report.md").read_text()
    assert "detector-only" in report and "0.667" in report and "RuntimeError" in report
    assert {p.name for p in res.plots} == {"confusion_breast.png", "per_class_breast.png", "reliability_breast.png"}
    for p in res.plots:
        assert p.stat().st_size > 1000
        assert f"plots/{p.name}" in report


def test_refuses_non_empty_out_dir(manifest: Path, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EchoInputError, match="not empty"):
        evaluate(manifest, agent=FakeAgent(), out_dir=out, progress=False, n_boot=10, plots=False)
    res = evaluate(manifest, agent=FakeAgent(), out_dir=out, progress=False, n_boot=10, plots=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # the user's file survives
    assert res.metrics_path.exists() and res.plots == []


def test_filters_and_limit(manifest: Path, tmp_path: Path):
    items = [ManifestImage(image=Path(f"/x/{i}.png"), organ="breast", label="normal", split="test" if i % 2 else "train")
             for i in range(10)]
    assert len(select_images(items, split="test")) == 5
    a = select_images(items, limit=3, seed=1)
    assert len(a) == 3 and a == select_images(items, limit=3, seed=1)
    assert [items.index(x) for x in a] == sorted(items.index(x) for x in a)
    with pytest.raises(EchoInputError, match="no image"):
        evaluate(manifest, agent=FakeAgent(), out_dir=tmp_path / "r", organ="kidney", progress=False)


def test_detector_failure_recorded_for_every_image(manifest: Path, tmp_path: Path):
    class Broken(FakeDetector):
        def detect(self, image, **kw):
            raise OSError("weights unreadable")

    res = evaluate(manifest, agent=FakeAgent(Broken()), out_dir=tmp_path / "r", progress=False, n_boot=10, plots=False)
    assert res.errors[DETECTOR] == 4 and res.errors[AGENT] == 1
    assert res.metrics["breast"].overall[DETECTOR].n_images == 0
    assert "weights unreadable" in (tmp_path / "r" / "report.md").read_text()


def test_detector_prediction_rule():
    spec = get_organ("breast")
    p = detector_prediction(spec, [_det((0, 0, 5, 5), "malignant", 0.3), _det((0, 0, 9, 9), "benign", 0.7)])
    assert p["label"] == "benign" and p["positive_score"] == pytest.approx(0.3)
    assert [d["score"] for d in p["detections"]] == [0.7, 0.3]
    p = detector_prediction(spec, [])
    assert p == {"label": "normal", "positive_score": 0.0, "detections": []}


def test_eval_command_exit_codes(manifest: Path, tmp_path: Path):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=120)
    code = eval_command(manifest, tmp_path / "ok", agent=FakeAgent(), progress=False, console=console)
    assert code == 0
    text = buf.getvalue()
    assert "localization F1@0.5" in text and "0.667" in text
    # non-empty output folder -> input error
    assert eval_command(manifest, tmp_path / "ok", agent=FakeAgent(), progress=False, console=console) == 2
    assert eval_command(tmp_path / "missing.csv", tmp_path / "new", agent=FakeAgent(), console=console) == 2


def test_mixed_organs_are_scored_separately(tmp_path: Path):
    data = tmp_path / "d"
    data.mkdir()
    rows = ["image,organ,label,x_min,y_min,x_max,y_max,center"]
    for name, v, organ, label, box in [
        ("a.png", 10, "breast", "benign", "10,10,30,30"),
        ("k1.png", 50, "kidney", "hydronephrosis", "5,5,25,25"),
        ("k2.png", 60, "kidney", "normal", ",,,"),
    ]:
        Image.fromarray(np.full((64, 64), v, dtype=np.uint8)).save(data / name)
        rows.append(f"{name},{organ},{label},{box},c")
    (data / "m.csv").write_text("\n".join(rows) + "\n")

    class Det(FakeDetector):
        def detect(self, image, *, score_threshold=0.25, tta=False):
            v = int(image[0, 0, 0])
            if v == 50:
                return [_det((5, 5, 25, 25), "hydronephrosis", 0.8)]
            return [] if v == 60 else super().detect(image, score_threshold=score_threshold)

    class Agent(FakeAgent):
        def run(self, image, *, organ=None, context=None):
            if organ == "breast":
                return super().run(image, organ=organ, context=context)
            hydro = Path(image).name == "k1.png"
            probs = {"normal": 0.1 if hydro else 0.7, "hydronephrosis": 0.9 if hydro else 0.3}
            findings = [Finding(box=Box.from_xyxy((5, 5, 25, 25)), label="hydronephrosis", score=0.9)] if hydro else []
            return Diagnosis(organ=organ, label=max(probs, key=probs.get), probabilities=probs, findings=findings)

    res = evaluate(data / "m.csv", agent=Agent(Det()), out_dir=tmp_path / "r", progress=False, n_boot=10)
    assert set(res.metrics) == {"breast", "kidney"}
    kid = res.metrics["kidney"]
    assert kid.labels == ("normal", "hydronephrosis")
    for s in (DETECTOR, AGENT):
        m = kid.overall[s]
        assert m.n_images == 2 and m.classification.accuracy == 1.0
        assert (m.localization.tp, m.localization.fp, m.localization.fn) == (1, 0, 0)
        assert m.grounded.tp == 1
        assert m.auc.negative_label == "normal" and m.auc.value == pytest.approx(1.0)
    assert res.metrics["breast"].overall[DETECTOR].n_images == 1
    assert {p.name for p in res.plots} >= {"confusion_kidney.png", "per_class_kidney.png", "reliability_kidney.png"}
    assert "## kidney" in res.report_path.read_text()


# -- real images -----------------------------------------------------------------------------------
DATA = default_data_root()
needs_data = pytest.mark.skipif(not (DATA / "BUSI" / "images.csv").exists(), reason=f"BUSI data not found under {DATA}")


def _busi_manifest(tmp_path: Path) -> Path:
    """One benign, one malignant and one normal image of the committed BUSI test split, as a CSV."""
    from echo_agent.eval import BUSI, load_split, write_manifest

    test = load_split(BUSI, "test")
    chosen = [next(im for im in test if im.label == lbl) for lbl in ("benign", "malignant", "normal")]
    return write_manifest(chosen, tmp_path / "busi_few.csv")


class CentreBoxDetector(FakeDetector):
    """Puts one benign box in the middle of any image (exercises real loading and box mapping)."""

    def detect(self, image, *, score_threshold=0.25, tta=False):
        h, w = image.shape[:2]
        return [_det((w * 0.4, h * 0.4, w * 0.6, h * 0.6), "benign", 0.5)]


@pytest.mark.realdata
@needs_data
def test_real_images_with_fake_models(tmp_path: Path):
    manifest = _busi_manifest(tmp_path)
    seen = []

    class Agent(FakeAgent):
        def run(self, image, *, organ=None, context=None):
            arr = np.asarray(Image.open(image).convert("RGB"))
            seen.append(arr.shape)
            return Diagnosis(organ=organ, label="normal", probabilities={"normal": 0.5, "benign": 0.3, "malignant": 0.2},
                             image_width=arr.shape[1], image_height=arr.shape[0])

    # preprocess=True: the real field-of-view crop and annotation masking, boxes mapped back
    res = evaluate(manifest, agent=Agent(CentreBoxDetector()), out_dir=tmp_path / "r", progress=False, n_boot=20,
                   preprocess=True)
    assert res.n_images == 3 and res.errors == {DETECTOR: 0, AGENT: 0}
    assert len(seen) == 3
    det = res.metrics["breast"].overall[DETECTOR]
    per_class = {c.label: c for c in det.classification.per_class}
    assert per_class["benign"].recall == 1.0 and per_class["normal"].recall == 0.0
    assert det.localization.fp >= 1  # at least the normal image's box
    assert det.classification.confusion.matrix[2] == (0, 1, 0)  # malignant called benign
    assert res.metrics["breast"].overall[AGENT].classification.accuracy == pytest.approx(1 / 3)
    assert set(res.metrics["breast"].centers) == {"busi"}
    rows = [json.loads(x) for x in res.predictions_path.read_text().splitlines()]
    assert {r["key"].split(":")[0] for r in rows} == {"busi"}
    for r in rows:  # boxes were mapped back into the original image
        h, w = Image.open(r["image"]).size[::-1]
        x1, y1, x2, y2 = r["detector"]["detections"][0]["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def _echo_agent_builds() -> bool:
    try:
        from echo_agent.agent import EchoAgent
        from echo_agent.tools import Toolkit

        EchoAgent(toolkit=Toolkit(detectors={"breast": CentreBoxDetector()}))
    except Exception:
        return False
    return True


@pytest.mark.realdata
@needs_data
@pytest.mark.skipif(not _echo_agent_builds(), reason="EchoAgent cannot be built in this checkout yet")
def test_real_agent_graph_with_an_injected_detector(tmp_path: Path):
    """The real graph and reasoner on real images; only the detector is a stand-in (no weights needed).
    The baseline must use the agent's own toolkit detector."""
    from echo_agent.agent import EchoAgent
    from echo_agent.tools import Toolkit

    detector = CentreBoxDetector()
    agent = EchoAgent(toolkit=Toolkit(detectors={"breast": detector}))
    res = evaluate(_busi_manifest(tmp_path), agent=agent, out_dir=tmp_path / "r", progress=False, n_boot=20)
    assert res.errors == {DETECTOR: 0, AGENT: 0}, res.summary["error_examples"]
    rows = [json.loads(x) for x in res.predictions_path.read_text().splitlines()]
    assert [r["detector"]["label"] for r in rows] == ["benign"] * 3  # the injected detector, via the toolkit
    for r in rows:
        dx = Diagnosis.model_validate(r["agent"]["diagnosis"])
        assert dx.organ == "breast" and r["agent"]["elapsed_ms"] > 0
    ag = res.metrics["breast"].overall[AGENT]
    assert ag.n_images == 3 and ag.calibration is not None and ag.calibration.n_images == 3


def _agent_ready() -> bool:
    w = get_organ("breast").resolve_weights()
    if not (w and w.exists()):
        return False
    try:
        from echo_agent.agent import EchoAgent

        EchoAgent()
    except Exception:
        return False
    return True


@pytest.mark.realdata
@needs_data
@pytest.mark.skipif(not _agent_ready(), reason="breast detector weights not shipped yet, or EchoAgent() cannot be built")
def test_real_images_with_the_real_agent(tmp_path: Path):
    from echo_agent.agent import EchoAgent

    res = evaluate(_busi_manifest(tmp_path), agent=EchoAgent(), out_dir=tmp_path / "r", progress=False, n_boot=20)
    assert res.n_images == 3
    assert res.errors == {DETECTOR: 0, AGENT: 0}, res.predictions_path.read_text()[:2000]
    for s in (DETECTOR, AGENT):
        m = res.metrics["breast"].overall[s]
        assert m.n_images == 3
        assert m.localization.f1 is None or 0.0 <= m.localization.f1 <= 1.0
    assert res.metrics["breast"].overall[AGENT].calibration is not None


def test_report_reproduce_line_names_every_option(manifest: Path, tmp_path: Path):
    from rich.console import Console

    from echo_agent.eval.harness import _default_command

    console = Console(file=io.StringIO(), width=120)
    # default: rebuilt from the arguments, a non-default baseline threshold included
    assert eval_command(manifest, tmp_path / "a", agent=FakeAgent(), progress=False, console=console,
                        organ="breast", score_threshold=0.3) == 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert f"echo-agent eval {manifest} --out {tmp_path / 'a'} --organ breast --score-threshold 0.3" in report
    # a custom agent: the caller's real command line is what the report shows
    cmd = _default_command(str(manifest), tmp_path / "b", "breast", None, None, 0.25,
                           ["--fusion", "/x/fusion.json", "--detector", "/x/det.onnx"])
    assert cmd.endswith("--organ breast --fusion /x/fusion.json --detector /x/det.onnx")
    assert eval_command(manifest, tmp_path / "b", agent=FakeAgent(), progress=False, console=console,
                        command=cmd) == 0
    assert cmd in (tmp_path / "b" / "report.md").read_text()
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["command"] == cmd


def test_report_counts_lesion_images_called_normal() -> None:
    from echo_agent.eval.report import headline_rows, lesions_called_normal

    cm = {"labels": ["normal", "benign", "malignant"], "matrix": [[5, 1, 0], [2, 7, 1], [1, 0, 8]]}
    m = {"n_images": 25, "classification": {"confusion": cm, "accuracy": 0.8, "accuracy_ci": None,
                                            "balanced_accuracy": 0.8, "balanced_accuracy_ci": None},
         "localization": {"f1": 0.5, "ci": None, "precision": 0.5, "recall": 0.5}, "grounded": {"f1": 0.5, "ci": None}}
    assert lesions_called_normal(m) == (3, 19)
    rows = {r[0]: r for r in headline_rows({"detector": m, "agent": m})}
    assert rows["lesion images called normal"][1] == "3 / 19 (15.8 %)"
    assert lesions_called_normal({"classification": {"confusion": {"labels": ["normal", "x"], "matrix": [[3, 0], [0, 0]]}}}) is None
    # an organ with reader categories gets one more row, the agent's agreement with them
    cat = {"system": "BI-RADS", "n": 52, "exact": 0.365, "within_one": 0.788}
    rows = {r[0]: r for r in headline_rows({"detector": m, "agent": m}, cat)}
    assert rows["BI-RADS vs readers: exact / within one"][1:] == ("–", "0.365 / 0.788 (n=52)")
    assert len(headline_rows({"detector": m, "agent": m}, {"n": 0})) == len(headline_rows({"detector": m, "agent": m}))


def test_metrics_broken_down_by_lesion_size(manifest: Path, tmp_path: Path):
    """``by="lesion_size"`` groups images by their largest reference box's share of the image area
    (no column needed); a CSV column of that name is read instead."""
    # a: 20 x 20 of 64 x 64 (9.8 %), b: 20 x 30 (14.6 %); c, d: no box
    res = evaluate(manifest, agent=FakeAgent(), out_dir=tmp_path / "size", progress=False, n_boot=20, by="lesion_size")
    groups = res.metrics["breast"].groups
    assert set(groups) == {"c 4-16 %", "no box"} and groups["c 4-16 %"][DETECTOR].n_images == 2
    assert "### Per lesion_size" in (tmp_path / "size" / "report.md").read_text()
    lines = manifest.read_text().splitlines()
    own = manifest.with_name("own_size.csv")
    own.write_text("\n".join([lines[0] + ",lesion_size"] + [f"{x},mine" for x in lines[1:]]) + "\n")
    res = evaluate(own, agent=FakeAgent(), out_dir=tmp_path / "own", progress=False, n_boot=20, by="lesion_size")
    assert set(res.metrics["breast"].groups) == {"mine"}


class CategoryAgent(FakeAgent):
    """FakeAgent that also gives a BI-RADS category (a: 4A, b: 5, c: none)."""

    def run(self, image, *, organ=None, context=None):
        dx = super().run(image, organ=organ, context=context)
        cat = {"a.png": "4A", "b.png": "5"}.get(Path(image).name)
        return dx.model_copy(update={"category": cat, "category_system": "BI-RADS" if cat else None})


def _evaluate_with_categories(tmp_path: Path, categories: dict[str, str]):
    """Evaluate CategoryAgent on the four test images with these reader categories."""
    data = tmp_path / "data"
    data.mkdir()
    lines = ["image,organ,label,x_min,y_min,x_max,y_max,category"]
    for name, cat in categories.items():
        v, label, boxes, _, _ = IMAGES[name]
        Image.fromarray(np.full((64, 64), v, dtype=np.uint8)).save(data / name)
        for b in boxes or [None]:
            coords = ",".join(str(c) for c in b) if b else ",,,"
            lines.append(f"{name},breast,{label},{coords},{cat}")
    (data / "m.csv").write_text("\n".join(lines) + "\n")
    return evaluate(data / "m.csv", agent=CategoryAgent(), out_dir=tmp_path / "run", progress=False, n_boot=10,
                    plots=False)


def test_reader_categories_are_scored_against_the_agents(tmp_path: Path):
    res = _evaluate_with_categories(tmp_path, {"a.png": "4B", "b.png": "5", "c.png": "", "d.png": ""})
    ca = res.summary["organs"]["breast"]["category_agreement"]
    # a: reader 4B, agent 4A (one step); b: 5 vs 5; c, d have no reader category
    assert (ca["n"], ca["exact"], ca["within_one"]) == (2, 0.5, 1.0)
    assert ca["order"][0] == "1" and ca["system"] == "BI-RADS"
    assert ca["majority_baseline"]["category"] == "4B"  # tie 4B/5 broken towards the lower category
    report = (tmp_path / "run" / "report.md").read_text()
    assert "BI-RADS agreement with the readers" in report and "exact 0.500" in report


def test_coarse_and_off_scale_reader_categories(tmp_path: Path):
    """A center that records BI-RADS 4 without 4A-4C (and a 0 for an incomplete study) must not have
    those images silently dropped: a coarse 4 is scored at its level, an off-scale 0 is reported."""
    res = _evaluate_with_categories(tmp_path, {"a.png": "4", "b.png": "BI-RADS 4", "c.png": "0", "d.png": ""})
    ca = res.summary["organs"]["breast"]["category_agreement"]
    # a: reader 4, agent 4A (exact at the coarse level); b: reader 4, agent 5 (one step); c: 0 is on no step
    assert (ca["n"], ca["exact"], ca["within_one"], ca["n_coarse"]) == (2, 0.5, 1.0, 2)
    assert ca["unscored"] == {"0": 1}
    rows = dict(zip(ca["reader_order"], ca["confusion"], strict=True))
    assert rows["4"][ca["order"].index("4A")] == 1 and rows["4"][ca["order"].index("5")] == 1
    assert ca["majority_baseline"] == {"category": "4B", "reader_category": "4", "exact": 1.0, "within_one": 1.0}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "(4, answered as 4B)" in report and "2 image(s) with a reader category that covers several steps" in report and "'0' (1)" in report
    assert "| 4 |" in report


def test_a_warning_on_many_images_is_counted_printed_and_reported(manifest: Path, tmp_path: Path):
    """A run-wide condition (here: a learned fusion that stepped aside on every image) must not hide in
    predictions.jsonl: the summary counts each kind of warning once per image (texts that differ only
    in their numbers are one kind), the console prints the widespread ones, the report lists them."""
    from rich.console import Console

    class WarnedAgent(FakeAgent):
        def run(self, image, *, organ=None, context=None):
            dx = super().run(image, organ=organ, context=context)
            name = Path(image).name
            extra = [f"router unsure, p=0.{ord(name[0])}"] if name == "a.png" else []
            return dx.model_copy(update={"warnings": ["learned fusion skipped: it needs classifier X",
                                                      "learned fusion skipped: it needs classifier X", *extra]})

    buf = io.StringIO()
    assert eval_command(manifest, tmp_path / "w", agent=WarnedAgent(), progress=False,
                        console=Console(file=buf, width=200)) == 0
    summary = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert summary["agent_warnings"] == [
        {"warning": "learned fusion skipped: it needs classifier X", "images": 3},  # d.png failed
        {"warning": "router unsure, p=0.97", "images": 1},
    ]
    text = buf.getvalue()
    assert "agent warning on 3 of 4 images: learned fusion skipped" in text
    assert "agent warning on 1 of 4 images: router unsure, p=0.97" in text  # 25 % >= WIDESPREAD_WARNING
    report = (tmp_path / "w" / "report.md").read_text()
    assert "| learned fusion skipped: it needs classifier X | 3 |" in report


def test_warning_kinds_ignore_numbers() -> None:
    from echo_agent.eval.harness import WarningTally

    tally = WarningTally()
    tally.add(["router p=0.75", "router p=0.61"])  # one kind, once for this image
    tally.add(["router p=0.5"])
    assert tally.most_common() == [{"warning": "router p=0.75", "images": 2}]


def test_metrics_broken_down_by_any_manifest_column(manifest: Path, tmp_path: Path):
    """``by`` reads a column the manifest format does not define (here a scanner), checks it is an
    image-level column, and gives every metric per value of it in the result, metrics.json, the report
    and the reproduce line; an image-level field works for an in-memory manifest too."""
    from echo_agent.errors import ManifestError

    scanner = {"a.png": "s1", "b.png": "s1", "c.png": "s2", "d.png": ""}
    lines = manifest.read_text().splitlines()
    rows = [lines[0] + ",scanner"] + [f"{x},{scanner[x.split(',')[0]]}" for x in lines[1:]]
    with_scanner = manifest.with_name("with_scanner.csv")
    with_scanner.write_text("\n".join(rows) + "\n")

    out = tmp_path / "by_scanner"
    res = evaluate(with_scanner, agent=FakeAgent(), out_dir=out, progress=False, n_boot=20, by="scanner")
    m = res.metrics["breast"]
    assert m.by == "scanner" and set(m.groups) == {"s1", "s2", "unknown"}
    assert m.groups["s1"][DETECTOR].n_images == 2 and m.groups["s1"][DETECTOR].classification.accuracy == pytest.approx(0.5)
    assert m.groups["s1"][AGENT].classification.accuracy == pytest.approx(1.0)
    assert m.groups["unknown"][DETECTOR].n_images == 1 and m.groups["unknown"][AGENT].n_images == 0  # d: agent failed
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["by"] == "scanner"
    assert summary["organs"]["breast"]["by"]["column"] == "scanner"
    assert summary["organs"]["breast"]["by"]["groups"]["s2"]["detector"]["n_images"] == 1
    assert "--by scanner" in summary["command"]
    report = (out / "report.md").read_text()
    assert "### Per scanner" in report and "### Per center" in report
    # without by nothing changes in the output
    plain = evaluate(manifest, agent=FakeAgent(), out_dir=tmp_path / "plain", progress=False, n_boot=20)
    assert plain.metrics["breast"].by is None and "by" not in plain.summary["organs"]["breast"]

    # an image-level field, from an in-memory manifest
    items = [ManifestImage(image=manifest.parent / n, organ="breast", label=v[1], patient_id=v[4],
                           boxes=tuple(Box.from_xyxy(b) for b in v[2])) for n, v in IMAGES.items()]
    res = evaluate(items, agent=FakeAgent(), out_dir=tmp_path / "by_patient", progress=False, n_boot=20, by="patient_id")
    assert set(res.metrics["breast"].groups) == {"p1", "p2", "p3", "p4"}
    with pytest.raises(EchoInputError, match="pass the manifest's path"):
        evaluate(items, agent=FakeAgent(), out_dir=tmp_path / "x1", progress=False, by="scanner")
    # a column the file does not have; a column that differs between the rows of one image
    with pytest.raises(ManifestError, match="no column 'scaner'"):
        evaluate(with_scanner, agent=FakeAgent(), out_dir=tmp_path / "x2", progress=False, by="scaner")
    per_box = manifest.with_name("per_box.csv")
    second_box = next(x for x in lines[1:] if x.startswith("b.png")).replace(",20,20,40,50,", ",1,1,9,9,")
    per_box.write_text("\n".join([lines[0] + ",size"] + [f"{x},{i}" for i, x in enumerate([*lines[1:], second_box])]) + "\n")
    with pytest.raises(ManifestError, match="disagree on column 'size'"):
        evaluate(per_box, agent=FakeAgent(), out_dir=tmp_path / "x3", progress=False, by="size")
    assert not (tmp_path / "x2").exists() and not (tmp_path / "x3").exists()  # refused before running
