#!/usr/bin/env python
"""Train a second-look region classifier (EfficientNet-Lite0, ImageNet start) and export it to ONNX.

    python tools/train_classifier.py configs/classifier/breast.yaml
    python tools/train_classifier.py configs/classifier/kidney.yaml --output /tmp/kidney_cls.onnx
    python tools/train_classifier.py configs/classifier/breast_busi_only.yaml --output /tmp/xc/busi_cls.onnx
    python tools/train_classifier.py configs/classifier/kidney.yaml --fold 0 --folds 2 --output /tmp/cf/kidney_cls0.onnx
    python tools/train_classifier.py configs/classifier/breast_busi_only.yaml --set margin=0.5 --output /tmp/m.onnx

Reads the committed train/val splits of the config's centers from the staged data
(``$ECHO_AGENT_DATA`` or ``../shared/data``), fine-tunes (``echo_agent.training.region_classifier``),
fits the temperature on val, exports ONNX with its metadata, checks size (<= 15 MB) and that ONNX
Runtime reproduces the torch logits, and writes ``<output>.json`` (the training report). The
default output is the config's ``output`` (relative to the repository root), else the packaged
``echo_agent/assets/classifiers/<organ>.onnx``.

The config's labels must be the organ's classifier labels (``OrganSpec.classifier_labels``). For an
organ whose categories come from a category head (``category_source: classifier``, e.g. TI-RADS) the
labels are ``[normal, *categories]`` and lesion images are labelled with their reader category;
lesion images without one are left out (their number is printed).

Needs the ``train`` extra. ``--minutes`` bounds the wall-clock training time. ``--fold k --folds K``
leaves out one hash-assigned fold of the train split's groups (``echo_agent.eval.splits.cross_fit_fold``,
the same folds as ``tools/train_detector.py``), for out-of-fold predictions on the train split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

MAX_ONNX_BYTES = 15 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--output", type=Path, default=None, help="ONNX path (default: the config's output, else the packaged classifier)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--soup", type=int, default=None,
                    help="fine-tune this many networks (seeds --seed, --seed + 1, ...) and ship their averaged weights "
                         "(default: the config's soup, else 1)")
    ap.add_argument("--random-init", action="store_true", help="start from random weights (ablation)")
    ap.add_argument("--train-split", default=None,
                    help="split or '+'-joined pool to train on (e.g. train+val; default: the config's train_split)")
    ap.add_argument("--fold", type=int, default=None,
                    help="cross-fitting: leave this fold of the train split's groups out (needs --folds and --output)")
    ap.add_argument("--folds", type=int, default=None)
    ap.add_argument("--mask-supervised", action="store_true",
                    help="CONFIG is a MaskClassifierTrainConfig: fine-tune a small segmenter on the lesion masks and "
                         "export it as a region classifier (echo_agent.training.mask_classifier)")
    ap.add_argument("--linear-probe", action="store_true",
                    help="fit a linear probe on frozen pretrained features instead of fine-tuning "
                         "(echo_agent.training.linear_probe; C as the config's probe_c_selection says) -- for small data sets")
    from train_detector import add_set_argument, config_from_yaml

    add_set_argument(ap)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from echo_agent.training.region_classifier import (
        ClassifierTrainConfig,
        category_head_images,
        export_onnx,
        is_category_head,
        prepare_cases,
        train_classifier,
    )

    if args.mask_supervised:
        if args.linear_probe or args.soup or args.random_init:
            ap.error("--mask-supervised goes without --linear-probe, --soup and --random-init")
        return _mask_supervised(ap, args, argv)
    cfg = config_from_yaml(ap, ClassifierTrainConfig, args.config, args.overrides)
    _configure(ap, cfg, args, soup=args.soup)
    if args.linear_probe and cfg.soup > 1:
        ap.error("--soup averages fine-tuned networks; a linear probe has one solution per C (drop --soup)")
    if args.random_init:
        cfg.pretrained = False
    try:
        category_head = is_category_head(cfg)
    except ValueError as exc:
        ap.error(f"{args.config}: {exc}")
    out = _output_path(cfg, args)

    t0 = time.monotonic()
    train_imgs, val_imgs = _split_images(cfg, args)
    left_out: dict[str, int] = {}
    if category_head:
        train_imgs, left_train = category_head_images(train_imgs, cfg.labels)
        val_imgs, left_val = category_head_images(val_imgs, cfg.labels)
        left_out = {"train": len(left_train), "val": len(left_val)}
        print(f"category head {cfg.labels}: left out {len(left_train)} train / {len(left_val)} val lesion images "
              "without a reader category", flush=True)
    train_cases = prepare_cases(train_imgs, cfg.labels, max_frames_per_group=cfg.max_frames_per_group, seed=cfg.seed,
                                category_head=category_head)
    val_cases = prepare_cases(val_imgs, cfg.labels, category_head=category_head)
    print(f"prepared {len(train_cases)} train / {len(val_cases)} val images in {time.monotonic() - t0:.0f} s", flush=True)
    if args.linear_probe:
        from echo_agent.training.linear_probe import export_linear_onnx, probe_metadata, train_linear_probe

        features, weight, bias, report = train_linear_probe(cfg, train_cases, val_cases, log=lambda s: print(s, flush=True))
        export_linear_onnx(features, weight, bias, out, probe_metadata(cfg, report))
    else:
        model, report = train_classifier(cfg, train_cases, val_cases, log=lambda s: print(s, flush=True))
        export_onnx(model, out, cfg, report)
    if not args.linear_probe:
        _check_onnx(model, out, val_cases[:4], cfg)
    _write_report(report, out, args, argv, t0, {
        "train_images": len(train_cases), "val_images": len(val_cases),
        **({"left_out_without_category": left_out} if category_head else {})},
        ("val", "val_category_baseline", "temperature", "wall_minutes", "bytes"))
    return 0 if _size_ok(out) else 1


def _configure(ap: argparse.ArgumentParser, cfg, args: argparse.Namespace, **extra) -> None:  # noqa: ANN001, ANN003
    """Apply the command line's overrides (``extra``: more of them, ``None`` = not given) to a train
    config, check them as the config's own values are checked, and check the split and fold options."""
    from train_detector import check_fold_args, check_training_split

    for key, value in (("max_minutes", args.minutes), ("epochs", args.epochs), ("seed", args.seed), ("threads", args.threads),
                       ("train_split", args.train_split), *extra.items()):
        if value is not None:
            setattr(cfg, key, value)
    try:
        cfg.__post_init__()  # the options given on the command line, checked as the config's are
    except ValueError as exc:
        ap.error(str(exc))
    check_training_split(ap, cfg.train_split)
    check_fold_args(ap, args.fold, args.folds, args.output is not None)


def _output_path(cfg, args: argparse.Namespace) -> Path:  # noqa: ANN001 - a train config
    """``--output``, else the config's ``output``, else the packaged classifier of the organ."""
    if args.output:
        return args.output
    return REPO / cfg.output if cfg.output else REPO / "echo_agent" / "assets" / "classifiers" / f"{cfg.organ}.onnx"


def _size_ok(out: Path) -> bool:
    """The exported file is within the packaged size bound (says so on stderr when it is not). Checked
    last: a model over the bound (an experiment's larger backbone, say) keeps its file and its report,
    and the command exits 1."""
    size = out.stat().st_size
    if size > MAX_ONNX_BYTES:
        print(f"error: {out} is {size / 2**20:.1f} MB > 15 MB, the packaged bound (file and report kept)",
              file=sys.stderr)
        return False
    return True


def _write_report(report: dict, out: Path, args: argparse.Namespace, argv: list[str] | None, t0: float,
                  extra: dict, keys: tuple[str, ...]) -> None:
    """Write the training report beside the ONNX file (with the command, wall time, machine and date)
    and print its ``keys``."""
    from train_detector import run_record

    report.update({"output": str(out), "bytes": out.stat().st_size, "config": str(args.config), **extra,
                   **run_record("train_classifier.py", argv, t0)})
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in keys if k in report}), flush=True)


def _split_images(cfg, args) -> tuple[list, list]:  # noqa: ANN001 - a train config and parsed arguments
    """The config's train images (without ``--fold``'s groups when cross-fitting) and val images."""
    from train_detector import leave_fold_out

    from echo_agent.eval.datasets import load_split

    train_imgs = leave_fold_out([im for c in cfg.centers for im in load_split(c, cfg.train_split)], args.fold, args.folds)
    return train_imgs, [im for c in cfg.centers for im in load_split(c, cfg.val_split)]


def _mask_supervised(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--mask-supervised``: echo_agent.training.mask_classifier, exported as a region classifier."""
    from train_detector import config_from_yaml

    from echo_agent.training.mask_classifier import (
        MaskClassifierTrainConfig,
        export_mask_classifier,
        prepare_masked_crops,
        train_mask_classifier,
    )

    cfg = config_from_yaml(ap, MaskClassifierTrainConfig, args.config, args.overrides)
    _configure(ap, cfg, args)
    if not args.output and not cfg.output:
        from echo_agent.organs import get_organ

        organ_labels = list(get_organ(cfg.organ).classifier_labels)
        if list(cfg.labels) != organ_labels:  # e.g. a [normal, lesion] presence model: not the organ's second look
            ap.error(f"labels {cfg.labels} are not the {cfg.organ} organ's classifier labels {organ_labels}, so the "
                     "model cannot replace the packaged second look: pass --output (or set output in the config)")
    out = _output_path(cfg, args)
    t0 = time.monotonic()
    train_imgs, val_imgs = _split_images(cfg, args)
    train = prepare_masked_crops(train_imgs, cfg.labels, size=cfg.input_size, lesion_labels=cfg.lesion_labels,
                                 keep_view=cfg.crop_prob > 0)
    val = prepare_masked_crops(val_imgs, cfg.labels, size=cfg.input_size, lesion_labels=cfg.lesion_labels)
    print(f"prepared {len(train)} train / {len(val)} val images in {time.monotonic() - t0:.0f} s", flush=True)
    model, report = train_mask_classifier(cfg, train, val, log=lambda s: print(s, flush=True))
    export_mask_classifier(model, out, cfg, report)
    _check_mask_onnx(model, out, train[:4], cfg)
    _write_report(report, out, args, argv, t0, {"kind": "mask_supervised"}, ("val", "wall_minutes", "bytes"))
    return 0 if _size_ok(out) else 1


def _check_mask_onnx(model, path: Path, crops, cfg) -> None:  # noqa: ANN001 - torch objects
    """ONNX Runtime must give the torch model's P(lesion) on real whole-image crops (within 0.005: the
    file stores its weights in half precision)."""
    import numpy as np

    from echo_agent.detectors.region_classifier import OnnxRegionClassifier
    from echo_agent.training.mask_classifier import lesion_probability

    clf = OnnxRegionClassifier(path)
    ref = lesion_probability(model, np.stack([c.crop for c in crops]), cfg.top_k)
    got = np.array([clf.classify(c.crop, [None])[0][cfg.labels[1]] for c in crops])
    if not np.allclose(ref, got, atol=5e-3):
        raise SystemExit(f"ONNX P(lesion) differs from torch: {np.abs(ref - got).max():.2e}")


def _check_onnx(model, path: Path, cases, cfg) -> None:  # noqa: ANN001 - torch objects
    """ONNX Runtime must reproduce the torch logits on real crops."""
    import numpy as np
    import torch

    from echo_agent.detectors.region_classifier import OnnxRegionClassifier

    clf = OnnxRegionClassifier(path)
    model.eval()
    for c in cases:
        x = clf.crops(c.array, [None, *c.boxes[:1]])
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = clf.logits(c.array, [None, *c.boxes[:1]])
        if not np.allclose(ref, got, atol=1e-3):
            raise SystemExit(f"ONNX logits differ from torch: {np.abs(ref - got).max():.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
