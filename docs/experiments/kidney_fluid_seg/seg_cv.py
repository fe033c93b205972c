"""Leave-one-given-fold-out hydronephrosis AUC of a fluid segmenter fine-tuned on the masks
(PREREGISTRATION.md in this folder).

    python docs/experiments/kidney_fluid_seg/seg_cv.py --out runs/kidney_fluid_seg [--epochs 4]

Needs the train extra and scikit-learn; Hydronephrosis-NCNU staged by ``python tools/prepare_data.py``.
Never reads the test split (fold 4).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "docs" / "experiments" / "kidney_patch_probe"))

from patch_cv import frames  # noqa: E402

CELL = 8  # output stride: one fluid logit per 8 x 8 pixels
TOP_K = 4
BASELINE = {"folds": [0.878, 0.920, 0.747], "mean": 0.848}  # whole-frame probe, ../kidney_patch_probe


def pool(out: Path) -> dict[str, np.ndarray]:
    cache = out / "frames.npz"
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    crops, masks, y, given = [], [], [], []
    for chunk in frames():
        for crop, mask, label, _, _, fold in chunk:
            crops.append(crop)
            masks.append(mask)
            y.append(label)
            given.append(fold)
    data = {"x": np.stack(crops), "mask": np.stack(masks), "y": np.asarray(y), "given_fold": np.asarray(given)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def build(pretrained: bool = True):  # noqa: ANN201 - a torch module
    import torch
    from torch import nn

    from echo_agent.training.lite_detector import _feature_taps
    from echo_agent.training.region_classifier import _freeze, build_network

    net = build_network(1, pretrained=pretrained, input_size=224)
    _freeze(net, 4)
    body = net.body
    taps, chans = _feature_taps(body, 224)

    class FluidSeg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.lateral = nn.ModuleList(nn.Conv2d(c, 48, 1) for c in chans)
            self.smooth = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.GroupNorm(8, 48), nn.ReLU(inplace=True))
            self.out = nn.Conv2d(48, 1, 1)
            nn.init.constant_(self.out.bias, -math.log(9.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = self.body
            h = b._swish(b._bn0(b._conv_stem(x)))
            feats = []
            for i, block in enumerate(b._blocks):
                h = block(h)
                if i in taps:
                    feats.append(h)
            lat = [m(f) for m, f in zip(self.lateral, feats, strict=True)]
            for i in range(len(lat) - 2, -1, -1):
                lat[i] = lat[i] + nn.functional.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
            return self.out(self.smooth(lat[0]))[:, 0]  # (B, 28, 28) logits at stride 8

    return FluidSeg()


def to_input(batch: np.ndarray):  # noqa: ANN201
    import torch

    from echo_agent.training.linear_probe import INPUT_OFFSET, INPUT_SCALE

    x = (batch.astype(np.float32) - INPUT_OFFSET) / INPUT_SCALE
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def cell_targets(masks: np.ndarray) -> np.ndarray:
    n, h, w = masks.shape
    return masks.reshape(n, h // CELL, CELL, w // CELL, CELL).mean(axis=(2, 4)).astype(np.float32)


def train_fold(d: dict[str, np.ndarray], train: np.ndarray, epochs: int, seed: int = 0, log=print):  # noqa: ANN001, ANN201
    import torch

    from echo_agent.training.region_classifier import photometric

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    rng = random.Random(seed)
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=1e-4)
    idx = np.flatnonzero(train)
    steps = epochs * math.ceil(len(idx) / 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-4, total_steps=steps, pct_start=0.15)
    t_all = cell_targets(d["mask"][idx])
    pos = float((t_all >= 0.5).sum())
    pos_weight = torch.tensor(min(20.0, (t_all.size - pos) / max(pos, 1.0)))
    for epoch in range(epochs):
        model.train()
        order = idx.copy()
        rng.shuffle(order)
        t0, total = time.monotonic(), 0.0
        for k in range(0, len(order), 16):
            b = order[k:k + 16]
            xs, ms = [], []
            for i in b:
                img, m = d["x"][i], d["mask"][i]
                if rng.random() < 0.5:
                    img, m = img[:, ::-1], m[:, ::-1]
                xs.append(photometric(np.ascontiguousarray(img), rng))
                ms.append(m)
            target = torch.from_numpy(cell_targets(np.stack(ms)))
            logits = model(to_input(np.stack(xs)))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        log(json.dumps({"epoch": epoch + 1, "loss": total / len(order), "seconds": round(time.monotonic() - t0, 1)}))
    return model


def frame_scores(model, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(x), 32):
            p = torch.sigmoid(model(to_input(x[k:k + 32]))).flatten(1)
            out.append(p.topk(TOP_K, dim=1).values.mean(1).numpy())
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/kidney_fluid_seg"))
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    t0 = time.monotonic()
    d = pool(args.out)
    y, given = d["y"], d["given_fold"]
    print(f"{len(y)} frames, {int(y.sum())} hydronephrosis; prepared in {time.monotonic() - t0:.0f} s", flush=True)
    scores = np.zeros(len(y))
    per_fold = []
    for f in (1, 2, 3):
        te = given == f
        model = train_fold(d, ~te, args.epochs, log=lambda s, f=f: print(f"fold {f}: {s}", flush=True))
        scores[te] = frame_scores(model, d["x"][te])
        auc = float(roc_auc_score(y[te], scores[te]))
        per_fold.append({"fold": f, "n": int(te.sum()), "hydronephrosis": int(y[te].sum()), "auc": auc})
        print(json.dumps(per_fold[-1]), f"{time.monotonic() - t0:.0f} s", flush=True)
    mean = float(np.mean([p["auc"] for p in per_fold]))
    verdict = {"seg_folds": [p["auc"] for p in per_fold], "seg_mean": mean, "baseline": BASELINE,
               "gain": mean - BASELINE["mean"],
               "worth_building": mean >= BASELINE["mean"] + 0.03 and per_fold[2]["auc"] >= 0.80}
    print(json.dumps(verdict, indent=1))
    np.save(args.out / "scores.npy", scores)
    (args.out / "cv.json").write_text(json.dumps({"folds": per_fold, "verdict": verdict, "epochs": args.epochs,
                                                  "command": " ".join(sys.argv)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
