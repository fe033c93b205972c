#!/usr/bin/env python
"""How the agent's numbers move when the same images arrive as another scanner or export would give them.

    python tools/robustness.py /tmp/echo_data/busi/val.csv /tmp/echo_data/breast_lesions_usg/val.csv \\
        --out runs/robustness

Each manifest's images are rewritten under a fixed set of acquisition and export changes (lossy JPEG,
half and 1.5x resolution, gamma, compressed dynamic range, speckle, blur, a horizontal mirror, a dark
border), boxes moved with the pixels, and ``echo-agent eval``'s harness is run on every version with one
agent. Printed and written (``robustness.json``, ``robustness.md``): per organ and condition, the
agent's accuracy, balanced accuracy, malignant / positive AUC, ECE, localization F1@0.5, lesion images
read normal, and the detector-only accuracy, each beside the clean images' value.

The changes are deterministic (one seed per image), so two runs on the same data agree. Use val or
development data: the point is to learn what a new center's images may do, not to score a test split
(``--allow-test`` exists for a final report only).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echo_agent.eval.manifest import ManifestImage, load_manifest  # noqa: E402
from echo_agent.schemas import Box  # noqa: E402


@dataclass(frozen=True)
class Change:
    """One rewrite of an image: ``pixels(array, rng) -> array``, with the geometry it applies to boxes
    (``scale`` then ``shift`` in pixels of the result; ``mirror`` flips x); ``suffix`` is the file type."""

    name: str
    what: str
    pixels: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    scale: float = 1.0
    pad: float = 0.0  # border added (> 0) or cut (< 0) on every side, as a fraction of the width / height
    mirror: bool = False
    suffix: str = ".png"


def _resize(x: np.ndarray, f: float) -> np.ndarray:
    import cv2

    h, w = x.shape[:2]
    return cv2.resize(x, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)


def _gamma(x: np.ndarray, g: float) -> np.ndarray:
    return np.clip(255.0 * np.power(x / 255.0, g), 0, 255).astype(np.uint8)


def _contrast(x: np.ndarray, c: float) -> np.ndarray:
    m = float(x.mean())
    return np.clip(m + (x.astype(np.float32) - m) * c, 0, 255).astype(np.uint8)


def _speckle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.gamma(4.0, 1 / 4.0, size=x.shape[:2]).astype(np.float32)
    if x.ndim == 3:
        noise = noise[:, :, None]
    return np.clip(x * noise, 0, 255).astype(np.uint8)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x, (0, 0), sigma)


def _pad(x: np.ndarray, frac: float) -> np.ndarray:
    h, w = x.shape[:2]
    py, px = round(h * frac), round(w * frac)
    if frac < 0:
        return np.ascontiguousarray(x[-py:h + py, -px:w + px])
    widths = ((py, py), (px, px)) + (((0, 0),) if x.ndim == 3 else ())
    return np.pad(x, widths, constant_values=0)


CHANGES: dict[str, Change] = {c.name: c for c in (
    Change("clean", "the images as stored", lambda x, r: x),
    Change("jpeg_q25", "re-saved as JPEG at quality 25 (a lossy export)", lambda x, r: x, suffix=".jpg"),
    Change("half_res", "half the pixels across and down (a smaller export)", lambda x, r: _resize(x, 0.5), scale=0.5),
    Change("res_1.5x", "1.5x the pixels across and down (bicubic)", lambda x, r: _resize(x, 1.5), scale=1.5),
    Change("gamma_0.67", "brighter mid-tones (gamma 0.67)", lambda x, r: _gamma(x, 0.67)),
    Change("gamma_1.5", "darker mid-tones (gamma 1.5)", lambda x, r: _gamma(x, 1.5)),
    Change("contrast_0.7", "dynamic range compressed to 70 % about the mean", lambda x, r: _contrast(x, 0.7)),
    Change("speckle", "multiplicative speckle (gamma noise, shape 4)", _speckle),
    Change("blur_1.5", "Gaussian blur, sigma 1.5 px", lambda x, r: _blur(x, 1.5)),
    Change("mirror", "mirrored left-right (the scan's symmetry; should change nothing)",
           lambda x, r: np.ascontiguousarray(x[:, ::-1]), mirror=True),
    Change("pad_15", "a black border of 15 % of the size on every side (other framing)", lambda x, r: _pad(x, 0.15),
           pad=0.15),
    Change("crop_10", "10 % cut from every side (a tighter frame; boxes clipped to it)", lambda x, r: _pad(x, -0.10),
           pad=-0.10),
)}


def rewrite(im: ManifestImage, change: Change, folder: Path) -> ManifestImage:
    """``im``'s image under ``change``, written into ``folder``, with its boxes moved to match."""
    from PIL import Image

    with Image.open(im.image) as pil:
        pil.load()
        mode = "L" if pil.mode in ("L", "I;16", "I") else "RGB"
        x = np.asarray(pil.convert(mode))
    h, w = x.shape[:2]
    rng = np.random.default_rng(zlib.crc32(str(im.image).encode()))
    y = change.pixels(x, rng)
    out = folder / f"{zlib.crc32(str(im.image).encode()):08x}_{im.image.stem}{change.suffix}"
    Image.fromarray(y).save(out, **({"quality": 25} if change.suffix == ".jpg" else {}))
    py, px = round(h * change.pad), round(w * change.pad)

    H, W = y.shape[:2]

    def move(b: Box) -> Box | None:
        x1, x2 = (w - b.x2, w - b.x1) if change.mirror else (b.x1, b.x2)
        s = change.scale
        x1, y1, x2, y2 = (max(0.0, min(x1 * s + px, W)), max(0.0, min(b.y1 * s + py, H)),
                          max(0.0, min(x2 * s + px, W)), max(0.0, min(b.y2 * s + py, H)))
        return Box(x1=x1, y1=y1, x2=x2, y2=y2) if x2 - x1 >= 2 and y2 - y1 >= 2 else None  # cut away

    boxes = tuple(m for b in im.boxes if (m := move(b)) is not None)
    return replace(im, image=out.resolve(), boxes=boxes)


def headline(summary: dict) -> dict[str, dict[str, float | int | None]]:
    """Per organ: the numbers the table shows, from an eval summary."""
    from echo_agent.eval.report import lesions_called_normal

    out = {}
    for organ, om in summary["organs"].items():
        ag, det = om["overall"]["agent"], om["overall"]["detector"]
        called = lesions_called_normal(ag)
        out[organ] = {
            "n": ag["n_images"],
            "accuracy": ag["classification"]["accuracy"],
            "balanced_accuracy": ag["classification"]["balanced_accuracy"],
            "auc": (ag.get("auc") or {}).get("value"),
            "ece": (ag.get("calibration") or {}).get("ece"),
            "loc_f1": ag["localization"]["f1"],
            "lesions_read_normal": None if called is None else called[0] / called[1],
            "detector_accuracy": det["classification"]["accuracy"],
            "detector_loc_f1": det["localization"]["f1"],
        }
    return out


COLUMNS = ("accuracy", "balanced_accuracy", "auc", "ece", "loc_f1", "lesions_read_normal", "detector_accuracy",
           "decisions_changed")


def decisions(predictions: Path, original: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """``{original image: (organ, the agent's label)}`` from an eval's predictions.jsonl."""
    out = {}
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        dx = (row.get("agent") or {}).get("diagnosis") or {}
        out[original[row["image"]]] = (row["organ"], dx.get("label"))
    return out


def table(results: dict[str, dict[str, dict]], organ: str) -> list[str]:
    clean = results["clean"][organ]

    def cell(cond: str, k: str) -> str:
        v, c = results[cond][organ].get(k), clean.get(k)
        if v is None:
            return "–"
        if k == "decisions_changed":
            return f"{v} / {results[cond][organ]['n']}"
        return f"{v:.3f}" if cond == "clean" or c is None else f"{v:.3f} ({v - c:+.3f})"

    rows = [f"| condition | {' | '.join(COLUMNS)} |", "|---|" + "---:|" * len(COLUMNS)]
    rows += [f"| {cond} | " + " | ".join(cell(cond, k) for k in COLUMNS) + " |" for cond in results if organ in results[cond]]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifests", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--changes", default=",".join(CHANGES), help=f"comma-separated, of: {', '.join(CHANGES)}")
    ap.add_argument("--limit", type=int, default=None, help="a seeded subset of N images per manifest (quick checks)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--allow-test", action="store_true", help="accept rows of the test split (a final report only)")
    args = ap.parse_args(argv)

    names = [c.strip() for c in args.changes.split(",") if c.strip()]
    unknown = [n for n in names if n not in CHANGES]
    if unknown:
        ap.error(f"unknown change(s) {unknown}; choose from {list(CHANGES)}")
    if "clean" not in names:
        names.insert(0, "clean")
    images: list[ManifestImage] = []
    for m in args.manifests:
        items = load_manifest(m)
        if args.limit:
            rng = np.random.default_rng(0)
            items = [items[i] for i in sorted(rng.choice(len(items), min(args.limit, len(items)), replace=False))]
        images += items
    if any(im.split == "test" for im in images) and not args.allow_test:
        ap.error("a manifest has test-split rows; run this on val or development data (or --allow-test for a final report)")
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"{args.out} is not empty; give a new folder")

    from echo_agent import EchoAgent
    from echo_agent.eval.harness import evaluate

    agent = EchoAgent()
    results: dict[str, dict[str, dict]] = {}
    reference: dict[str, tuple[str, str | None]] = {}
    for name in names:
        folder = args.out / "images" / name
        folder.mkdir(parents=True)
        moved = [rewrite(im, CHANGES[name], folder) for im in images]
        res = evaluate(moved, agent=agent, out_dir=args.out / "eval" / name, progress=False, plots=False,
                       n_boot=args.n_boot)
        results[name] = headline(res.summary)
        made = decisions(res.predictions_path, {str(m.image): str(o.image) for m, o in zip(moved, images, strict=True)})
        if name == "clean":
            reference = made
        for organ, r in results[name].items():  # images whose agent label differs from the clean image's
            r["decisions_changed"] = sum(o == organ and reference.get(k, (o, lbl))[1] != lbl
                                         for k, (o, lbl) in made.items())
        print(name, json.dumps({o: {k: None if v is None else round(v, 3) for k, v in r.items()}
                                for o, r in results[name].items()}), flush=True)
    (args.out / "robustness.json").write_text(json.dumps(
        {"manifests": [str(m) for m in args.manifests], "changes": {n: CHANGES[n].what for n in names},
         "results": results}, indent=1))
    lines = ["# Robustness to acquisition and export changes", "",
             "Manifests: " + ", ".join(f"`{m}`" for m in args.manifests), "",
             *[f"- `{n}`: {CHANGES[n].what}" for n in names], ""]
    for organ in results["clean"]:
        lines += [f"## {organ} ({results['clean'][organ]['n']} images)", "", *table(results, organ), ""]
    (args.out / "robustness.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
