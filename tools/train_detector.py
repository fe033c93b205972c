#!/usr/bin/env python
"""Train an organ detector with ultralytics from a model YAML, export it to ONNX, write its model card.

    python tools/train_detector.py configs/detector/breast.yaml
    python tools/train_detector.py configs/detector/kidney.yaml --hours 0.5 --work /tmp/echo_train

Steps: (1) build a YOLO folder from the committed train/val splits of the config's centers, every
image passed through ``prepare_for_detection`` (the inference preprocessing); (2) train from the
model YAML (no pretrained weights; offline ultralytics set-up); (3) validate the best checkpoint on
the val split; (4) export ONNX (fixed input ``imgsz``, dynamic batch axis, ultralytics' standard
``(B, 4 + nc, N)`` output with ``names``/``imgsz`` metadata), check it is <= 12 MB and loads in
onnxruntime; (5) write ``<work>/<organ>/summary.json`` and the organ's section of
``echo_agent/assets/weights/MODEL_CARD.md``.

Needs the ``train`` extra (torch, ultralytics, onnx). Run it with ``nice`` in the background on a
shared CPU machine; ``--hours`` bounds the wall-clock training time (ultralytics then fits its
learning-rate schedule into that budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_ONNX_BYTES = 12 * 1024 * 1024
CARD = REPO / "echo_agent" / "assets" / "weights" / "MODEL_CARD.md"


def _load_config(path: Path, overrides: argparse.Namespace) -> dict:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    for key in ("hours", "epochs", "imgsz", "batch", "workers", "seed", "train_split"):
        v = getattr(overrides, key, None)
        if v is not None:
            cfg[key] = v
    if overrides.epochs is not None and overrides.hours is None:
        cfg["no_time_budget"] = True  # explicit --epochs wins over the config's hours
    if overrides.lesion_only:
        cfg["lesion_only"] = True
        cfg["names"] = ["lesion"]
    return cfg


def check_training_split(ap: argparse.ArgumentParser, split: str) -> None:
    """An argument error (exit 2) when ``split`` includes the test split: models never train on it
    (:func:`echo_agent.eval.datasets.training_split`). Shared by the three trainers."""
    from echo_agent.eval.datasets import training_split

    try:
        training_split(split)
    except ValueError as exc:
        ap.error(str(exc))


def run_record(tool: str, argv: list[str] | None, t0: float) -> dict:
    """What a trainer's report records about the run itself: the command (``tool``, the arguments),
    wall minutes since ``t0`` (``time.monotonic()``), the machine and the date."""
    return {
        "command": f"python tools/{tool} " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_minutes": round((time.monotonic() - t0) / 60, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu", "date": time.strftime("%Y-%m-%d"),
    }


def add_set_argument(ap: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): override one field of a trainer's YAML config."""
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (value parsed as YAML), e.g. --set average_weights_from=0.5; "
                         "repeatable; the dedicated flags (--seed, --minutes, ...) apply after it")


def config_from_yaml(ap: argparse.ArgumentParser, cls: type, path: Path, overrides: list[str]):
    """``cls.from_yaml(path, overrides)``, a bad file or override reported as a usage error naming it."""
    try:
        return cls.from_yaml(path, overrides)
    except (TypeError, ValueError) as exc:
        ap.error(f"{path}: {exc}")


def check_fold_args(ap: argparse.ArgumentParser, fold: int | None, folds: int | None, has_output: bool) -> None:
    """The cross-fitting options, checked alike by every trainer: ``--fold`` and ``--folds`` together,
    ``0 <= fold < folds`` with ``folds >= 2``, and a fold model written to its own ``--output`` (it is
    never the packaged one)."""
    if (fold is None) != (folds is None):
        ap.error("--fold and --folds go together")
    if fold is None:
        return
    if folds < 2 or not 0 <= fold < folds:
        ap.error(f"--fold must be in 0..{folds - 1} and --folds at least 2")
    if not has_output:
        ap.error("a fold model needs its own --output (it is never the packaged one)")


def leave_fold_out(images: list, fold: int | None, folds: int | None) -> list:
    """The train images without cross-fitting fold ``fold`` of ``folds`` (whole groups: a patient,
    clip or near-duplicate group is in one fold; :func:`echo_agent.eval.splits.cross_fit_fold`)."""
    if fold is None:
        return images
    from echo_agent.eval.splits import cross_fit_fold, cv_group

    return [im for im in images if cross_fit_fold(cv_group(im), folds) != fold]


def build_dataset(cfg: dict, work: Path, limit: int | None = None, reuse: bool = False):
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.yolo_data import YoloDataset, build_yolo_dataset, label_class_map

    if reuse and (work / "data" / "data.yaml").is_file():
        counts = json.loads((work / "data" / "counts.json").read_text())
        return YoloDataset(data_yaml=work / "data" / "data.yaml", names=tuple(cfg["names"]), counts=counts)

    train_images = [im for c in cfg["train_centers"] for im in load_split(c, cfg.get("train_split", "train"))]
    splits = {
        "train": leave_fold_out(train_images, cfg.get("fold"), cfg.get("folds")),
        "val": [im for c in cfg["val_centers"] for im in load_split(c, "val")],
    }
    if limit:
        splits = {k: v[:: max(1, len(v) // limit)][:limit] for k, v in splits.items()}
    names = list(cfg["names"])
    ds = build_yolo_dataset(
        splits,
        work / "data",
        names,
        class_of=label_class_map(names, lesion_only=bool(cfg.get("lesion_only"))),
        max_side=int(cfg["imgsz"]),
    )
    return ds


def train(cfg: dict, data_yaml: Path, work: Path):
    from echo_agent.detectors.ultralytics_backend import configure_ultralytics_offline

    configure_ultralytics_offline(work / "yolo_config")
    from ultralytics import YOLO

    model = YOLO(str(REPO / cfg["model"]))
    aug = dict(cfg.get("augment") or {})
    kwargs = dict(
        data=str(data_yaml),
        imgsz=int(cfg["imgsz"]),
        epochs=int(cfg["epochs"]),
        batch=int(cfg["batch"]),
        workers=int(cfg["workers"]),
        device="cpu",
        pretrained=False,
        amp=False,
        seed=int(cfg["seed"]),
        deterministic=True,
        patience=int(cfg.get("patience", 100)),
        project=str(work / "runs"),
        name="train",
        exist_ok=True,
        plots=False,
        cache="ram",
        verbose=False,
        **aug,
    )
    if cfg.get("hours") and not cfg.get("no_time_budget"):
        kwargs["time"] = float(cfg["hours"])
    model.train(**kwargs)
    best = work / "runs" / "train" / "weights" / "best.pt"
    if not best.is_file():
        best = work / "runs" / "train" / "weights" / "last.pt"
    return best


def validate(best: Path, cfg: dict, data_yaml: Path, work: Path) -> dict:
    from ultralytics import YOLO

    m = YOLO(str(best))
    res = m.val(data=str(data_yaml), split="val", imgsz=int(cfg["imgsz"]), batch=8, device="cpu",
                project=str(work / "runs"), name="val", exist_ok=True, plots=False, verbose=False)
    box = res.box
    out = {
        "precision": float(box.mp),
        "recall": float(box.mr),
        "mAP50": float(box.map50),
        "mAP50_95": float(box.map),
        "per_class_mAP50": {m.names[int(c)]: float(v) for c, v in zip(res.ap_class_index, box.ap50, strict=False)},
    }
    return out


def export_onnx(best: Path, cfg: dict, output: Path) -> dict:
    """ONNX with a dynamic batch axis and a fixed ``imgsz`` input, so ``EchoAgent.batch`` runs the
    detector on many images in one forward pass.

    ultralytics' ``dynamic=True`` makes batch, height and width symbolic; height, width and the
    anchor count are then fixed again and the graph re-slimmed, so only the batch axis stays
    dynamic and ONNX Runtime keeps its static-shape optimisations (the graph has the same nodes as
    the fixed-batch export; outputs are bit-identical, see the model card).
    """
    import onnx
    import onnxslim
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed
    from ultralytics import YOLO

    imgsz = int(cfg["imgsz"])
    m = YOLO(str(best))
    path = Path(m.export(format="onnx", imgsz=imgsz, opset=17, dynamic=True, simplify=True, device="cpu"))
    model = onnx.load(str(path))
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    anchors = sum((imgsz // s) ** 2 for s in (8, 16, 32))  # YOLOv8/11 head: strides 8, 16, 32
    for param, value in (("height", imgsz), ("width", imgsz), (out_dims[2].dim_param or "anchors", anchors)):
        make_dim_param_fixed(model.graph, param, value)
    slim = onnxslim.slim(onnx.shape_inference.infer_shapes(model))
    del slim.metadata_props[:]
    slim.metadata_props.extend(model.metadata_props)  # names, imgsz, stride ... as ultralytics wrote them
    onnx.checker.check_model(slim)
    onnx.save(slim, str(path))
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise SystemExit(f"exported ONNX is {size / 2**20:.1f} MiB > 12 MiB; choose a smaller model YAML")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    out_shape = sess.get_outputs()[0].shape
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, output)
    return {"bytes": size, "input": sess.get_inputs()[0].shape, "output": out_shape,
            "names": meta.get("names"), "imgsz": meta.get("imgsz")}


def pipeline_metrics(onnx_path: Path, cfg: dict, thresholds=(0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)) -> dict:
    """Val-split metrics through the inference path (``run_detector``: load_image -> prepare_for_detection
    -> ONNX -> boxes mapped back to the original image -> the organ's class merging): localization F1@0.5 and detector-only accuracy
    (image label = label of the top box, normal when none), for several score thresholds."""
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.sweep import threshold_sweep
    from echo_agent.organs import get_organ

    spec = get_organ(cfg["organ"])
    det = OnnxDetector(onnx_path)
    if cfg.get("lesion_only"):  # the single-class model emits 'lesion', which the organ does not know
        spec = spec.model_copy(update={"detector_labels": tuple(det.labels), "detector_agnostic_nms": False})
    images = [im for c in cfg["val_centers"] for im in load_split(c, "val")]
    sweep = threshold_sweep(spec, det, images, thresholds, lesion_only=bool(cfg.get("lesion_only")))
    out = {f"{t:g}": {"loc_f1": m["f1"], "loc_precision": m["precision"], "loc_recall": m["recall"],
                      "grounded_f1": m["grounded_f1"], "accuracy": m["accuracy"]} for t, m in sweep.items()}
    return {"n_images": len(images), "by_threshold": out}


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_card_section(cfg: dict, summary: dict) -> None:
    organ = cfg["organ"]
    begin, end = f"<!-- BEGIN {organ} -->", f"<!-- END {organ} -->"
    ds = summary["dataset"]
    v = summary["val_metrics"]
    lines = [
        begin,
        f"## {organ}: `{Path(cfg['output']).name}`",
        "",
        f"- Classes: {', '.join(cfg['names'])} (image-level label of the lesion's image"
        + (", single lesion class" if cfg.get("lesion_only") else "") + ").",
        f"- Architecture: `{cfg['model']}` (YOLOv8 layer graph, scale t), trained from scratch "
        "(random init, no pretrained weights).",
        f"- Input: {cfg['imgsz']}x{cfg['imgsz']} letterboxed RGB (gray replicated) after "
        "`echo_agent.imaging.preprocess.prepare_for_detection` (field-of-view crop, burned-in "
        "annotations removed); ONNX opset 17, batch 1, output (1, 4 + nc, N) before NMS.",
        f"- Training data: committed **train** splits of {', '.join(cfg['train_centers'])} "
        f"({ds['train']['images']} images, {ds['train']['boxes']} boxes, {ds['train']['background']} lesion-free); "
        f"validation: **val** splits ({ds['val']['images']} images, {ds['val']['boxes']} boxes). "
        "Test splits were not used for training or model selection.",
        f"- Training: {summary['epochs_run']} epochs in {summary['train_minutes']:.0f} min on "
        f"{summary['machine']} (CPU), batch {cfg['batch']}, seed {cfg['seed']}, ultralytics {summary['ultralytics']}.",
        f"- Command: `{summary['command']}`",
        f"- Val metrics (ultralytics val, conf 0.001, IoU 0.7 NMS): precision {v['precision']:.3f}, "
        f"recall {v['recall']:.3f}, mAP@0.5 {v['mAP50']:.3f}, mAP@0.5:0.95 {v['mAP50_95']:.3f}; "
        "per class mAP@0.5: " + ", ".join(f"{k} {x:.3f}" for k, x in v["per_class_mAP50"].items()) + ".",
        "- Val split through the inference path (preprocess -> ONNX -> boxes in original pixels -> the organ's class merging; "
        f"{summary['pipeline']['n_images']} images), by score threshold: "
        + "; ".join(
            f"{t}: loc F1@0.5 {_f(m['loc_f1'])}, grounded F1 {_f(m['grounded_f1'])}, detector-only accuracy "
            f"{_f(m['accuracy'])}"
            for t, m in summary["pipeline"]["by_threshold"].items()
        ) + ".",
        f"- File: {summary['onnx']['bytes'] / 2**20:.1f} MiB.",
        end,
    ]
    section = "\n".join(lines)
    text = CARD.read_text() if CARD.is_file() else "# Detector weights\n\n"
    if begin in text and end in text:
        pre = text[: text.index(begin)]
        post = text[text.index(end) + len(end):]
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    CARD.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="configs/detector/<organ>.yaml")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "echo_train")
    ap.add_argument("--hours", type=float)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--imgsz", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--train-split", help="split (or '+'-joined pool, e.g. train+val) to train on; default: "
                    "the config's train_split or 'train'. With a pool, --fold leaves a fold of the pool out")
    ap.add_argument("--lesion-only", action="store_true", help="one 'lesion' class (class-design experiment)")
    ap.add_argument("--output", type=Path, help="ONNX destination (default: the config's output)")
    ap.add_argument("--reuse-data", action="store_true", help="reuse <work>/<organ>/data if it exists")
    ap.add_argument("--limit", type=int, help="at most N images per split (smoke tests)")
    ap.add_argument("--finish", action="store_true",
                    help="only (re)compute the val pipeline metrics of an earlier run's ONNX and rewrite its card section")
    ap.add_argument("--no-card", action="store_true", help="do not touch MODEL_CARD.md")
    ap.add_argument("--fold", type=int, help="cross-fitting: leave this fold of the train split's groups out "
                    "(a detector for out-of-fold predictions; tools/train_policy.py --cross-fitted)")
    ap.add_argument("--folds", type=int, help="cross-fitting: number of folds (with --fold)")
    args = ap.parse_args(argv)
    check_fold_args(ap, args.fold, args.folds, args.output is not None)
    cfg = _load_config(args.config, args)
    check_training_split(ap, cfg.get("train_split", "train"))
    if args.fold is not None:
        cfg["fold"], cfg["folds"] = args.fold, args.folds
    tag = cfg["organ"] + ("_lesion" if cfg.get("lesion_only") else "") + (
        f"_fold{args.fold}of{args.folds}" if args.fold is not None else "")
    work = (args.work / tag).resolve()
    work.mkdir(parents=True, exist_ok=True)
    output = args.output or (REPO / cfg["output"])
    if args.finish:
        summary = json.loads((work / "summary.json").read_text())
        summary["pipeline"] = pipeline_metrics(Path(summary["output"]), summary["config"])
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if not args.no_card:
            write_card_section(summary["config"], summary)
        print(json.dumps(summary["pipeline"]), flush=True)
        return 0
    t0 = time.time()
    ds = build_dataset(cfg, work, args.limit, args.reuse_data)
    print(f"dataset built in {time.time() - t0:.0f}s: {ds.counts}", flush=True)
    t1 = time.time()
    best = train(cfg, ds.data_yaml, work)
    train_min = (time.time() - t1) / 60
    metrics = validate(best, cfg, ds.data_yaml, work)
    print("val metrics:", json.dumps(metrics), flush=True)
    onnx_info = export_onnx(best, cfg, output)
    pipeline = pipeline_metrics(output, cfg)
    print("val pipeline metrics:", json.dumps(pipeline), flush=True)
    import csv

    import ultralytics

    results = work / "runs" / "train" / "results.csv"
    epochs_run = sum(1 for _ in csv.DictReader(results.open())) if results.is_file() else -1
    summary = {
        "config": cfg,
        "dataset": ds.counts,
        "val_metrics": metrics,
        "onnx": onnx_info,
        "pipeline": pipeline,
        "train_minutes": train_min,
        "epochs_run": epochs_run,
        "machine": f"{os.cpu_count()}-core {platform.machine()}",
        "ultralytics": ultralytics.__version__,
        "command": "python tools/train_detector.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "output": str(output),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not args.no_card and args.output is None:
        write_card_section(cfg, summary)
    print(json.dumps({k: summary[k] for k in ("val_metrics", "onnx", "train_minutes", "epochs_run", "pipeline")},
                     default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
