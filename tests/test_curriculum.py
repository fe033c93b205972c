"""The nine-task SFT curriculum: inference message format, schema-valid answers, boxes, leakage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from PIL import Image

from echo_agent.eval.manifest import ManifestImage, load_manifest
from echo_agent.messages import IMAGE_URI_PREFIX, diagnosis_from_model
from echo_agent.organs import get_organ
from echo_agent.prompts import system_prompt, user_prompt
from echo_agent.reasoners.llm_finalizer import validate_diagnosis
from echo_agent.training.curriculum import (
    FINALIZER_TASKS,
    TASKS,
    CurriculumBuilder,
    CurriculumConfig,
    PredictionsFile,
    SimulatedDetector,
    check_no_leakage,
    count_table,
    radiologist_descriptors,
    read_jsonl,
    strip_tool_images,
    to_hf_dataset,
    to_hf_record,
    write_jsonl,
)
from echo_agent.training.rewards import valid_tool_call

BOX_KEYS = ("box", "region")
BOX_LIST_KEYS = ("regions",)


# -- a synthetic manifest: dark elliptic "lesions" on speckle, train / val / test ------------------------
def _image(rng: np.random.Generator, w: int, h: int, boxes: list[list[int]]) -> np.ndarray:
    img = rng.normal(120, 20, (h, w)).clip(0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    for x1, y1, x2, y2 in boxes:
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = 30
    return np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)


def synthetic_manifest(folder: Path, *, n_per_split: int = 1, size: tuple[int, int] = (96, 72)) -> Path:
    """A manifest CSV with breast (benign / malignant / normal) and kidney images in three splits."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rows = []
    kinds = [("breast", "malignant", [[20, 15, 60, 45]]), ("breast", "benign", [[30, 20, 70, 50]]),
             ("breast", "normal", []), ("kidney", "hydronephrosis", [[25, 20, 55, 50]])]
    sx, sy = w / 96, h / 72  # the boxes above are drawn for 96x72
    kinds = [(o, lbl, [[round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy)] for b in bs])
             for o, lbl, bs in kinds]
    for split in ("train", "val", "test"):
        for i in range(n_per_split):
            for organ, label, boxes in kinds:
                name = f"{split}_{organ}_{label}_{i}.png"
                Image.fromarray(_image(rng, w, h, boxes)).save(folder / name)
                base = {"image": name, "organ": organ, "label": label, "split": split, "age": 40 + i,
                        "group": f"{split}{i}{label}"}
                if boxes:
                    for b in boxes:
                        rows.append({**base, "x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3]})
                else:
                    rows.append(base)
    path = folder / "manifest.csv"
    cols = ["image", "organ", "label", "x_min", "y_min", "x_max", "y_max", "split", "age", "group"]
    with path.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        for r in rows:
            wr.writerow({c: r.get(c, "") for c in cols})
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ManifestImage], list, Path]:
    root = tmp_path_factory.mktemp("curriculum")
    images = load_manifest(synthetic_manifest(root / "data"))
    builder = CurriculumBuilder(CurriculumConfig(seed=3), detections=SimulatedDetector(1), overlay_dir=root / "out" / "overlays")
    return images, builder.build(images), root


# -- checks ------------------------------------------------------------------------------------------------
def _walk_boxes(data: object) -> list[list[float]]:
    out: list[list[float]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if k in BOX_KEYS and isinstance(v, list) and len(v) == 4:
                out.append(v)
            elif k in BOX_LIST_KEYS and isinstance(v, list) and all(isinstance(b, list) for b in v):
                out.extend(v)
            else:
                out.extend(_walk_boxes(v))
    elif isinstance(data, list):
        for v in data:
            out.extend(_walk_boxes(v))
    return out


def _check_sample(s) -> None:  # noqa: ANN001
    spec = get_organ(s.organ)
    msgs = s.messages
    truth = s.truth
    assert isinstance(msgs[0], SystemMessage) and isinstance(msgs[1], HumanMessage)
    blocks = msgs[1].content
    assert blocks[0]["text"].startswith(user_prompt(spec, None).split("\n")[0])
    image_blocks = [b for b in blocks if b.get("type") == "image"]
    assert len(image_blocks) == 1 and image_blocks[0]["url"].startswith(IMAGE_URI_PREFIX)
    if s.task not in FINALIZER_TASKS:
        assert msgs[0].content == system_prompt(spec, 8)  # the agent's own system prompt
    boxes: list[list[float]] = []
    for m in msgs[2:]:
        if isinstance(m, AIMessage):
            for c in m.tool_calls:
                assert valid_tool_call(c["name"], c["args"], s.organ), (s.task, c)
                boxes += _walk_boxes(c["args"])
        if isinstance(m, ToolMessage):
            boxes += _walk_boxes(json.loads(m.content))
    final = msgs[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    answer = json.loads(final.content)
    boxes += _walk_boxes(answer)
    for b in boxes:  # every box in the 0..1000 convention, non-empty
        assert all(0 <= v <= 1000 for v in b) and b[2] > b[0] and b[3] > b[1], (s.task, b)
    if s.task in ("rec", "reg"):
        assert answer["box"] in truth["boxes"]
        return
    dx = validate_diagnosis(answer, spec, truth["width"], truth["height"])  # LLMFinalizer's own check
    assert dx.label == truth["label"]
    back = diagnosis_from_model(answer, truth["width"], truth["height"])
    assert [f.box.to_model(truth["width"], truth["height"]) for f in back.findings] == truth["boxes"]
    for f in back.findings:  # pixel boxes inside the image
        assert 0 <= f.box.x1 < f.box.x2 <= truth["width"] and 0 <= f.box.y1 < f.box.y2 <= truth["height"]


def test_every_task_is_built_and_schema_valid(synthetic) -> None:  # noqa: ANN001
    images, samples, _ = synthetic
    assert {s.task for s in samples} == set(TASKS)
    for s in samples:
        _check_sample(s)
    table = count_table(samples)
    assert "| report_generation |" in table and "kidney" in table


def test_only_the_train_split_and_never_test(synthetic) -> None:  # noqa: ANN001
    images, samples, _ = synthetic
    assert {s.split for s in samples} == {"train"}
    test_paths = {str(im.image) for im in images if im.split == "test"}
    assert not any(p in test_paths for s in samples for p in s.image_paths.values())
    check_no_leakage(samples, images)
    with pytest.raises(ValueError, match="forbidden"):
        CurriculumConfig(split="test")
    bad = samples[0]
    bad_key = next(im.key for im in images if im.split == "test")
    with pytest.raises(AssertionError, match="forbidden split"):
        check_no_leakage([type(bad)(**{**bad.__dict__, "key": bad_key})], images)


def test_deterministic_for_a_seed(synthetic, tmp_path: Path) -> None:  # noqa: ANN001
    images, samples, root = synthetic
    again = CurriculumBuilder(CurriculumConfig(seed=3), detections=SimulatedDetector(1),
                              overlay_dir=tmp_path / "overlays").build(images)
    strip = lambda r: {k: v for k, v in r.items() if k != "images"}  # noqa: E731
    assert [strip(to_hf_record(s)) for s in samples] == [strip(to_hf_record(s)) for s in again]
    other = CurriculumBuilder(CurriculumConfig(seed=4), detections=SimulatedDetector(2),
                              overlay_dir=tmp_path / "o2").build(images)
    assert [to_hf_record(s)["messages"] for s in samples] != [to_hf_record(s)["messages"] for s in other]


def test_hf_export_images_by_path(synthetic) -> None:  # noqa: ANN001
    images, samples, root = synthetic
    out = root / "out"
    records = [to_hf_record(s, relative_to=out) for s in samples]
    write_jsonl(records, out / "train.jsonl")
    back = read_jsonl(out / "train.jsonl")
    assert back == records
    for r in back:
        n_blocks = sum(1 for m in r["messages"] for b in m["content"] if b.get("type") == "image")
        assert n_blocks == len(r["images"])
        assert all((out / p).is_file() or Path(p).is_file() for p in r["images"])
        assert (r["tools"] == "") == (r["task"] in FINALIZER_TASKS)
        stripped = strip_tool_images(r)
        assert not any(b.get("type") == "image" for m in stripped["messages"] if m["role"] == "tool" for b in m["content"])
        assert len(stripped["images"]) == sum(1 for m in stripped["messages"] for b in m["content"] if b.get("type") == "image")
    ds = to_hf_dataset(back, base=out)
    row = ds[0]
    assert row["messages"] == back[0]["messages"] and Path(row["images"][0]).is_absolute()


def test_predictions_file_feeds_the_detector_turn(synthetic, tmp_path: Path) -> None:  # noqa: ANN001
    images, _, _ = synthetic
    im = next(i for i in images if i.split == "train" and i.label == "malignant")
    pred = tmp_path / "predictions.jsonl"
    det = {"box": [21.0, 16.0, 58.0, 44.0], "label": "malignant", "detector_label": "malignant", "score": 0.77}
    pred.write_text(json.dumps({"key": im.key, "image": str(im.image), "detector": {"detections": [det]}}) + "\n")
    cfg = CurriculumConfig(tasks=("grounded_diagnosis",), seed=0, overlays=False)
    samples = CurriculumBuilder(cfg, detections=PredictionsFile(pred)).build(images)
    assert [s.key for s in samples] == [im.key]  # images without predictions are skipped for detector tasks
    tool = next(m for m in samples[0].messages if isinstance(m, ToolMessage))
    cand = json.loads(tool.content)["candidates"]
    assert cand[0]["score"] == 0.77 and cand[0]["label"] == "malignant" and cand[0]["id"] == "det1:0"


def test_simulated_detector_is_seeded() -> None:
    im = ManifestImage(image=Path("x.png"), organ="breast", label="benign", boxes=(), split="train")
    img = np.zeros((50, 80, 3), np.uint8)
    a = SimulatedDetector(5, p_false_positive=1.0)(im, img, score_threshold=0.0, tta=False)
    b = SimulatedDetector(5, p_false_positive=1.0)(im, img, score_threshold=0.0, tta=False)
    assert a == b and len(a) == 1


# -- real data ---------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_breast_slice(shared_data: Path, tmp_path: Path) -> None:
    from echo_agent.eval.datasets import load_split

    images = load_split("breast_lesions_usg", None)
    cfg = CurriculumConfig(seed=0, max_images=3)
    samples = CurriculumBuilder(cfg, detections=SimulatedDetector(0), overlay_dir=tmp_path).build(images)
    assert samples and {s.split for s in samples} == {"train"}
    check_no_leakage(samples, images)
    for s in samples:
        _check_sample(s)
    # BrEaST descriptors come from the radiologist's table, not invented
    im = next(i for i in images if i.image.name == "case002.png")
    d = radiologist_descriptors(im)
    assert d["shape"] == "oval" and d["margin"] == "indistinct" and d["echo_pattern"] == "hypoechoic"
    rec = next(s for s in samples if s.task == "reg")
    key_im = next(i for i in images if i.key == rec.key)
    answer = json.loads(rec.messages[-1].content)
    for k, v in radiologist_descriptors(key_im).items():
        assert answer["descriptors"][k] == v


def test_build_curriculum_cli(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import build_curriculum

    manifest = synthetic_manifest(tmp_path / "data")
    out = tmp_path / "cur"
    rc = build_curriculum.main(["--manifest", str(manifest), "--out", str(out), "--detector", "simulated",
                                "--tasks", "rec", "tool_detection", "--no-overlays"])
    assert rc == 0
    recs = read_jsonl(out / "train.jsonl")
    assert {r["task"] for r in recs} == {"rec", "tool_detection"} and {r["split"] for r in recs} == {"train"}
    assert "| tool_detection |" in (out / "counts.md").read_text()
    with pytest.raises(ValueError, match="forbidden"):
        build_curriculum.main(["--manifest", str(manifest), "--out", str(out), "--split", "test", "--detector", "simulated"])


def test_training_configs_load() -> None:
    from echo_agent.training._config import load_config
    from echo_agent.training.grpo_config import EchoGRPOConfig
    from echo_agent.training.sft_config import EchoSFTConfig

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "training").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(EchoGRPOConfig if "grpo" in f.name else EchoSFTConfig, f)
        assert cfg.output_dir
    with pytest.raises(ValueError, match="unknown EchoSFTConfig field"):
        load_config(EchoSFTConfig, None, ["learning_rat=1"])
    assert load_config(EchoSFTConfig, None, ["max_steps=5", "tasks=[rec]"]).tasks == ["rec"]
