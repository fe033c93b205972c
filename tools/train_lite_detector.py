#!/usr/bin/env python
"""Train a lesion detector on the pretrained EfficientNet-Lite0 backbone (Lite-FCOS) and export ONNX.

    python tools/train_lite_detector.py configs/lite_detector/breast.yaml
    python tools/train_lite_detector.py configs/lite_detector/breast_busi_only.yaml --output /tmp/xc/lite_busi.onnx
    python tools/train_lite_detector.py configs/lite_detector/kidney.yaml --minutes 30
    python tools/train_lite_detector.py configs/lite_detector/breast.yaml --set average_weights_from=0.5 --output /tmp/b.onnx

Reads the committed train/val splits of the config's centers from the staged data
(``$ECHO_AGENT_DATA`` or ``../shared/data``), trains (``echo_agent.training.lite_detector``; the
epoch with the best val localization F1 is kept and its best score threshold is mapped onto the
agent's operating threshold), exports ONNX in the ultralytics head layout (so
``echo_agent.detectors.OnnxDetector`` and every detector tool load it unchanged), checks its size
(<= 25 MB) and that ONNX Runtime reproduces the torch output, then measures the val split through
the agent's own detection path (``tools/train_detector.py``'s ``pipeline_metrics``: preprocessing,
mapping back to original pixels, the organ's class merging) and writes ``<output>.json``.

Needs the ``train`` extra. ``--minutes`` bounds the wall-clock training time. ``--fold k --folds K``
leaves one hash-assigned fold of the train split's groups out (cross-fitting, as the other trainers);
``--train-split train+val`` trains on the development pool instead (with ``--fold``: fold models for
out-of-fold runs over the pool, ``tools/train_policy.py --split train+val``; a pool never holds test).
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

MAX_ONNX_BYTES = 25 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--output", type=Path, default=None, help="ONNX path (default: the config's output)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most this many train and val images (smoke runs)")
    ap.add_argument("--random-init", action="store_true", help="start from random weights (ablation)")
    ap.add_argument("--train-split", default=None,
                    help="split or '+'-joined pool to train on (e.g. train+val; default: the config's train_split, "
                         "'train'). With a pool, --fold leaves a fold of the pool out")
    ap.add_argument("--fold", type=int, default=None, help="cross-fitting: leave this fold of the train groups out")
    ap.add_argument("--folds", type=int, default=None)
    from train_detector import add_set_argument

    add_set_argument(ap)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from train_detector import (
        check_fold_args,
        check_training_split,
        config_from_yaml,
        leave_fold_out,
        pipeline_metrics,
        run_record,
    )

    from echo_agent.eval.datasets import load_split
    from echo_agent.organs import get_organ
    from echo_agent.training.lite_detector import (
        LiteDetectorTrainConfig,
        detection_samples,
        export_onnx,
        train_detector,
    )
    from echo_agent.training.region_classifier import prepare_cases

    cfg = config_from_yaml(ap, LiteDetectorTrainConfig, args.config, args.overrides)
    for key, value in (("max_minutes", args.minutes), ("epochs", args.epochs), ("seed", args.seed),
                       ("threads", args.threads), ("fold", args.fold), ("folds", args.folds),
                       ("train_split", args.train_split)):
        if value is not None:
            setattr(cfg, key, value)
    if args.random_init:
        cfg.pretrained = False
    check_training_split(ap, cfg.train_split)
    check_fold_args(ap, cfg.fold, cfg.folds, args.output is not None)
    out = args.output or (REPO / cfg.output if cfg.output else None)
    if out is None:
        ap.error("the config has no output; pass --output")
    spec = get_organ(cfg.organ)
    if tuple(cfg.labels) != tuple(spec.detector_labels):
        ap.error(f"config labels {cfg.labels} differ from the {cfg.organ} organ's detector_labels {list(spec.detector_labels)}")

    t0 = time.monotonic()
    train_imgs = leave_fold_out([im for c in cfg.train_centers for im in load_split(c, cfg.train_split)], cfg.fold, cfg.folds)
    val_imgs = [im for c in cfg.val_centers for im in load_split(c, "val")]
    if args.limit:
        train_imgs, val_imgs = train_imgs[: args.limit], val_imgs[: args.limit]
    labels = list(spec.image_labels)
    train = detection_samples(prepare_cases(train_imgs, labels, max_frames_per_group=cfg.max_frames_per_group, seed=cfg.seed),
                              labels, cfg.labels, max_side=cfg.max_side)
    val = detection_samples(prepare_cases(val_imgs, labels), labels, cfg.labels, max_side=cfg.max_side)
    print(f"prepared {len(train)} train / {len(val)} val images in {time.monotonic() - t0:.0f} s", flush=True)
    export, report = train_detector(cfg, train, val, log=lambda s: print(s, flush=True))
    export_onnx(export, out, cfg, report)
    size = out.stat().st_size
    if size > MAX_ONNX_BYTES:
        print(f"error: {out} is {size / 2**20:.1f} MB > {MAX_ONNX_BYTES / 2**20:.0f} MB", file=sys.stderr)
        return 1
    _check_onnx(export, out, val[:4], cfg.input_size)
    pipe_cfg = {"organ": cfg.organ, "val_centers": cfg.val_centers}
    report.update({
        "output": str(out), "bytes": size, "config": str(args.config),
        "pipeline": pipeline_metrics(out, pipe_cfg) if not args.limit else None,
        **run_record("train_lite_detector.py", argv, t0),
    })
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    brief = {k: report[k] for k in ("best_epoch", "val_threshold", "wall_minutes", "bytes")}
    if report["pipeline"]:
        brief["pipeline_0.25"] = report["pipeline"]["by_threshold"].get("0.25")
    print(json.dumps(brief), flush=True)
    return 0


def _check_onnx(export, path: Path, samples, size: int) -> None:  # noqa: ANN001 - torch objects
    """ONNX Runtime must reproduce the torch output on real images."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from echo_agent.training.lite_detector import validation_view

    if not samples:
        return
    x = np.stack([validation_view(s, size)[0] for s in samples]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    with torch.no_grad():
        ref = export(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    # the file stores the weights in float16: boxes within 1 % (or half a pixel), scores within 0.01
    boxes_ok = np.allclose(ref[:, :4], got[:, :4], rtol=1e-2, atol=0.5)
    scores_ok = np.allclose(ref[:, 4:], got[:, 4:], atol=1e-2)
    if not (boxes_ok and scores_ok):
        raise SystemExit(f"ONNX output differs from torch: boxes {np.abs(ref[:, :4] - got[:, :4]).max():.2e} px, "
                         f"scores {np.abs(ref[:, 4:] - got[:, 4:]).max():.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
