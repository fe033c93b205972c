"""Train the organ router (echo_agent/assets/router/router.json) and report its held-out accuracy.

Data: breast = BUSI + BrEaST-Lesions_USG, kidney = Hydronephrosis-NCNU, with the committed
leakage-safe splits of ``echo_agent/eval/splits`` (BUSI by near-duplicate group, BrEaST by patient,
hydronephrosis by clip). The ``unknown`` class is trained on synthetic non-ultrasound images
(generated here: blank frames, gradients, checkerboards, noise, documents, charts, smooth colour
fields, simulated colour and grey "photos", shapes, empty scanner frames) drawn from a different
random stream for train, val and test, plus variants of real photographs from ``--photo-negatives``
(the sample images of scikit-image, see docs/router.md; 3/4 of the files train, 1/4 val).

Robustness: every organ image is also used in augmented copies (random crops incl. tight crops of
the scan area, rescaling to other pixel sizes, blur from down/up-sampling, black padding, convex-probe
fan masks, gamma/gain, colour tints, scanner-UI overlays, JPEG, noise), so that pixel size, borders
and tints do not decide the organ (the kidney frames are all 224x224 crops).

Model: standardised hand-crafted features (``echo_agent.organs.routing.extract_features``) plus a
PCA of the 16x16 thumbnail, then a multinomial logistic regression or a one-hidden-layer MLP
(scikit-learn, at training time only), picked on the validation split. The rejection threshold on the
best organ probability is picked on the validation split too.

Usage::

    .venv/bin/python tools/train_router.py --photo-negatives DIR  # train, evaluate, write router.json
    .venv/bin/python tools/train_router.py --evaluate-only      # evaluate the packaged router
    .venv/bin/python tools/train_router.py --real-negatives 'path/*.jpg' ...

Needs ECHO_AGENT_DATA (default ../shared/data) and scikit-learn.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from echo_agent.eval.datasets import (  # noqa: E402
    BREAST_LESIONS_USG,
    BUSI,
    HYDRONEPHROSIS_NCNU,
    center_organ,
    list_centers,
    load_split,
)
from echo_agent.organs.routing import (  # noqa: E402
    FEATURE_NAMES,
    FEATURE_VERSION,
    UNKNOWN,
    OrganRouter,
    RoutingResult,
    combine_heads,
    default_router_path,
    extract_features,
)

CENTERS = (BUSI, BREAST_LESIONS_USG, HYDRONEPHROSIS_NCNU)
CLASSES = ("breast", "kidney", UNKNOWN)
#: organ -> training label; ``--head`` maps every organ but its own to ``unknown``
LABEL_OF: dict[str, str] = {}
NEGATIVE_KINDS = (
    "blank",
    "dark_frame",
    "gradient",
    "checker",
    "document",
    "chart",
    "noise_uniform",
    "noise_gauss",
    "smooth_colour",
    "photo_colour",
    "photo_grey",
    "shapes",
    "texture_grey",
    "screenshot",
)
SEEDS = {"train": 1, "val": 2, "test": 3}
N_PCA = 12


# --------------------------------------------------------------------------------------------------
# loading and augmentation


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, size))
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _content_box(img: np.ndarray) -> tuple[int, int, int, int]:
    g = img.mean(axis=2) > 10
    rows, cols = np.flatnonzero(g.mean(1) > 0.05), np.flatnonzero(g.mean(0) > 0.05)
    if rows.size < 8 or cols.size < 8:
        return 0, 0, img.shape[1], img.shape[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def fan_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a convex-probe sector (apex above the top edge)."""
    apex_y = -rng.uniform(0.05, 0.5) * h
    apex_x = w / 2 + rng.uniform(-0.05, 0.05) * w
    half = math.radians(rng.uniform(22, 42))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - apex_y, xx - apex_x
    ang = np.abs(np.arctan2(dx, dy))
    r = np.hypot(dx, dy)
    r0 = -apex_y + rng.uniform(0.0, 0.08) * h
    r1 = -apex_y + h * rng.uniform(0.85, 1.1)
    return (ang <= half) & (r >= r0) & (r <= r1)


def draw_ui(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Overlay scanner-UI-like marks: text in the corners, calipers, a depth ruler, a grey bar."""
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    h, w = img.shape[:2]
    colours = [(255, 255, 255), (255, 255, 0), (0, 255, 0), (0, 255, 255), (200, 200, 200)]
    font = _font(int(rng.uniform(0.025, 0.05) * h))
    for _ in range(int(rng.integers(1, 5))):
        txt = rng.choice(
            [
                "L12-5",
                "Gain 52",
                "FR 28Hz",
                "Depth 4.0cm",
                "R KIDNEY",
                "BREAST RT",
                "12:00 3CM",
                "MI 1.1 TIS 0.4",
                "C5-1",
            ]
        )
        x = rng.choice([int(0.02 * w), int(rng.uniform(0.55, 0.8) * w)])
        y = rng.choice([int(0.02 * h), int(rng.uniform(0.85, 0.95) * h)])
        d.text((x, y), str(txt), fill=colours[int(rng.integers(len(colours)))], font=font)
    if rng.random() < 0.5:  # calipers
        c = colours[int(rng.integers(len(colours)))]
        for _ in range(2):
            x, y, s = int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h), max(3, h // 60)
            d.line([(x - s, y), (x + s, y)], fill=c)
            d.line([(x, y - s), (x, y + s)], fill=c)
    if rng.random() < 0.5:  # depth ruler
        x = int(rng.choice([0.01, 0.97]) * w)
        for k in range(10):
            y = int(h * (0.05 + 0.09 * k))
            d.rectangle([x, y, x + max(2, w // 150), y + max(2, h // 150)], fill=(255, 255, 255))
    if rng.random() < 0.3:  # grey bar
        x = int(rng.choice([0.01, 0.95]) * w)
        bw, y0, y1 = max(3, w // 40), int(0.2 * h), int(0.6 * h)
        for y in range(y0, y1):
            v = int(255 * (y1 - y) / (y1 - y0))
            d.line([(x, y), (x + bw, y)], fill=(v, v, v))
    return np.asarray(pil)


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random "other center" version of one ultrasound image (see the module docstring)."""
    h, w = img.shape[:2]
    if rng.random() < 0.35:  # tight crop of the scan area (no black frame)
        x0, y0, x1, y1 = _content_box(img)
        m = rng.uniform(0.0, 0.12)
        x0, x1 = x0 + int(m * (x1 - x0)), x1 - int(m * (x1 - x0))
        y0, y1 = y0 + int(m * (y1 - y0)), y1 - int(m * (y1 - y0))
        if x1 - x0 > 32 and y1 - y0 > 32:
            img = img[y0:y1, x0:x1]
    elif rng.random() < 0.5:  # random crop
        h, w = img.shape[:2]
        area = rng.uniform(0.45, 1.0)
        ar = math.exp(rng.uniform(-0.35, 0.35))
        cw = min(w, max(32, int(w * math.sqrt(area * ar))))
        ch = min(h, max(32, int(h * math.sqrt(area / ar))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.ascontiguousarray(img)
    if rng.random() < 0.25:  # resolution loss
        f = rng.uniform(0.3, 0.7)
        h, w = img.shape[:2]
        small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    # other pixel size and aspect
    h, w = img.shape[:2]
    target = rng.uniform(180, 900)
    s = target / max(h, w)
    sa = math.exp(rng.uniform(-0.15, 0.15))
    nw, nh = max(24, int(w * s * sa)), max(24, int(h * s / sa))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    # intensity
    x = img.astype(np.float32) / 255.0
    x = np.clip(x * rng.uniform(0.8, 1.2) + rng.uniform(-0.05, 0.05), 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.35:  # colour tint of the whole grey scale
        gains = 1.0 + rng.uniform(-0.15, 0.15, size=3)
        x = np.clip(x * (gains / gains.max()), 0, 1)
    if rng.random() < 0.2:
        x = np.clip(x + rng.normal(0, rng.uniform(0.01, 0.04), size=x.shape[:2])[:, :, None], 0, 1)
    img = (x * 255).astype(np.uint8)
    # field of view: fan mask, then black padding
    if rng.random() < 0.35:
        h, w = img.shape[:2]
        img = img * fan_mask(h, w, rng)[:, :, None].astype(np.uint8)
    if rng.random() < 0.5:
        h, w = img.shape[:2]
        t, b, left, right = (int(rng.uniform(0, 0.25) * v) for v in (h, h, w, w))
        img = cv2.copyMakeBorder(img, t, b, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    if rng.random() < 0.4:
        img = draw_ui(np.ascontiguousarray(img), rng)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------------------------------
# synthetic non-ultrasound images


def _pink_noise(h: int, w: int, rng: np.random.Generator, beta: float) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**beta
    spec[0, 0] = 0
    x = np.fft.irfft2(spec, s=(h, w))
    return (x - x.min()) / (np.ptp(x) + 1e-9)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def synth_negative(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One synthetic non-ultrasound RGB image of the given kind (random size and aspect)."""
    h = int(rng.integers(96, 800))
    w = int(h * math.exp(rng.uniform(-0.6, 0.6)))
    w = max(64, min(w, 1200))
    grey = rng.random() < 0.5
    if kind == "blank":
        c = np.array([int(rng.integers(0, 256))] * 3 if grey else _colour(rng), np.float32)
        img = np.broadcast_to(c, (h, w, 3)).copy()
        img += rng.normal(0, rng.choice([0.0, 1.0, 3.0]), size=(h, w, 1))
    elif kind == "dark_frame":  # an empty scanner frame: black, faint noise, maybe UI text
        img = np.abs(rng.normal(0, rng.uniform(0.5, 6), size=(h, w, 1))).repeat(3, 2)
        img = np.clip(img, 0, 255).astype(np.uint8)
        return draw_ui(img, rng) if rng.random() < 0.6 else img
    elif kind == "gradient":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if rng.random() < 0.5:
            a = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(a) + yy * math.sin(a)
        else:
            t = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        c0, c1 = (np.array([v] * 3 if grey else _colour(rng), np.float32) for v in rng.integers(0, 256, 2))
        img = c0 * (1 - t[:, :, None]) + c1 * t[:, :, None]
    elif kind == "checker":
        cell = int(rng.integers(4, max(5, min(h, w) // 3)))
        yy, xx = np.mgrid[0:h, 0:w]
        m = ((yy // cell + xx // cell) % 2).astype(np.float32)[:, :, None]
        c0 = np.array([int(rng.integers(0, 128))] * 3 if grey else _colour(rng), np.float32)
        c1 = np.array([int(rng.integers(128, 256))] * 3 if grey else _colour(rng), np.float32)
        img = c0 * (1 - m) + c1 * m
    elif kind in ("document", "screenshot", "chart"):
        bg = (
            int(rng.integers(215, 256))
            if kind != "screenshot" or rng.random() < 0.5
            else int(rng.integers(20, 70))
        )
        pil = Image.new(
            "RGB",
            (w, h),
            (bg, bg, bg)
            if grey or kind == "document"
            else tuple(min(255, bg + int(v)) for v in rng.integers(-30, 1, 3)),
        )
        d = ImageDraw.Draw(pil)
        ink = (0, 0, 0) if bg > 128 else (230, 230, 230)
        if kind == "chart":
            x0, y0, x1, y1 = int(0.1 * w), int(0.1 * h), int(0.92 * w), int(0.88 * h)
            d.line([(x0, y1), (x1, y1)], fill=ink, width=2)
            d.line([(x0, y0), (x0, y1)], fill=ink, width=2)
            for _ in range(int(rng.integers(1, 4))):
                c = (90, 90, 90) if grey else _colour(rng)
                if rng.random() < 0.5:
                    pts = [
                        (x0 + (x1 - x0) * i / 12, y1 - (y1 - y0) * rng.uniform(0.1, 0.9)) for i in range(13)
                    ]
                    d.line(pts, fill=c, width=int(rng.integers(1, 4)))
                else:
                    n = int(rng.integers(3, 12))
                    bw = (x1 - x0) / n
                    for i in range(n):
                        top = y1 - (y1 - y0) * rng.uniform(0.05, 0.95)
                        d.rectangle([x0 + i * bw + 2, top, x0 + (i + 0.7) * bw, y1], fill=c)
        font = _font(int(rng.uniform(0.02, 0.06) * h))
        words = [
            "patient",
            "report",
            "the",
            "lesion",
            "figure",
            "table",
            "result",
            "0.93",
            "mm",
            "total",
            "value",
            "2024",
        ]
        y = int(rng.uniform(0.02, 0.1) * h)
        while y < h * (0.35 if kind == "chart" else 0.95):
            line = " ".join(str(rng.choice(words)) for _ in range(int(rng.integers(2, 12))))
            d.text((int(0.05 * w), y), line, fill=ink, font=font)
            y += int(font.size * rng.uniform(1.2, 2.0)) if hasattr(font, "size") else 14
        if kind == "screenshot":
            for _ in range(int(rng.integers(2, 8))):
                x, yb = int(rng.uniform(0, w * 0.8)), int(rng.uniform(0, h * 0.8))
                d.rectangle(
                    [x, yb, x + int(rng.uniform(20, w * 0.4)), yb + int(rng.uniform(10, h * 0.3))],
                    outline=ink,
                    fill=None if rng.random() < 0.5 else _colour(rng),
                )
        img = np.asarray(pil).astype(np.float32)
    elif kind == "noise_uniform":
        img = rng.uniform(0, 256, size=(h, w, 1 if grey else 3)) * np.ones((1, 1, 3))
    elif kind == "noise_gauss":
        img = rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), size=(h, w, 1 if grey else 3)) * np.ones(
            (1, 1, 3)
        )
    elif kind == "smooth_colour":
        k = int(rng.integers(2, 9))
        small = rng.integers(0, 256, size=(k, k, 3)).astype(np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    elif kind in ("photo_colour", "photo_grey", "texture_grey", "shapes"):
        if kind == "shapes":
            base = np.ones((h, w, 3), np.float32) * np.array(_colour(rng), np.float32)
        else:
            beta = rng.uniform(0.8, 1.8) if kind != "texture_grey" else rng.uniform(0.5, 1.5)
            lum = _pink_noise(h, w, rng, beta)
            if kind == "photo_colour":
                tint = [_pink_noise(h, w, rng, beta + 0.5) for _ in range(3)]
                base = np.stack([0.5 * lum + 0.5 * t for t in tint], axis=2) * 255
            else:
                base = np.repeat(lum[:, :, None] * 255, 3, axis=2)
        pil = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(pil)
        n_shapes = int(rng.integers(0 if kind == "texture_grey" else 3, 4 if kind == "texture_grey" else 25))
        for _ in range(n_shapes):
            c = _colour(rng)
            if kind in ("photo_grey", "texture_grey"):
                c = (c[0], c[0], c[0])
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(0.03, 0.3) * min(h, w)
            if rng.random() < 0.5:
                d.ellipse([x - r, y - r * rng.uniform(0.4, 1.5), x + r, y + r], fill=c)
            else:
                d.polygon(
                    [
                        (x + rng.uniform(-r, r), y + rng.uniform(-r, r))
                        for _ in range(int(rng.integers(3, 7)))
                    ],
                    fill=c,
                )
        img = np.asarray(pil).astype(np.float32)
        if rng.random() < 0.6:
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 3))
    else:
        raise ValueError(f"unknown negative kind {kind!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# data set assembly


def organ_items(split: str) -> list[tuple[str, str, Path]]:
    """(center, organ, path) of every image of ``split`` in the three staged centers."""
    out = []
    for c in CENTERS:
        out += [(c, center_organ(c), im.image) for im in load_split(c, split)]
    return out


def featurize(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    feats, thumbs = zip(*(extract_features(im) for im in images), strict=True)
    return np.asarray(feats), np.asarray(thumbs)


def photo_files(folder: Path | None, split: str) -> list[Path]:
    """The photographs of ``folder`` assigned to ``split``: every fourth file (sorted by name,
    starting with the second) is a validation photo, the rest train; none are test photos (the test
    report uses other, real images: ``--real-negatives``)."""
    if folder is None or split == "test":
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [p for i, p in enumerate(files) if (i % 4 == 1) == (split == "val")]


def photo_variant(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A photograph as it might reach the router: grey or colour, cropped, rescaled, framed."""
    if rng.random() < 0.5:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    return augment(img, rng)


def build_split(
    split: str, n_aug: dict[str, int], n_neg: int, *, seed: int, photos: list[Path] = (), n_photo: int = 0,
    deep=None,  # noqa: ANN001 - an echo_agent.training.router_head.Lite0Features (train extra)
) -> dict[str, list]:
    """Features of one split: clean organ images, augmented copies, synthetic negatives and
    variants of real photographs.

    Returns lists ``feat``, ``thumb``, ``label``, ``source`` (center or negative kind) and ``variant``
    (``clean``, ``aug`` or ``synthetic``); with ``deep`` also ``deep`` (its whole-image features)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = defaultdict(list)
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            rows["deep"].extend(deep([np.asarray(c) for c in pending]))
            pending.clear()

    def add(img: np.ndarray, label: str, source: str, variant: str) -> None:
        f, t = extract_features(img)
        rows["feat"].append(f)
        rows["thumb"].append(t)
        rows["label"].append(label)
        rows["source"].append(source)
        rows["variant"].append(variant)
        if deep is not None:
            pending.append(deep.crop(img))
            if len(pending) >= 32:
                flush()

    for center, organ, path in organ_items(split):
        img = load_rgb(path)
        label = LABEL_OF.get(organ, organ)
        add(img, label, center, "clean")
        for _ in range(n_aug[center]):
            add(augment(img, rng), label, center, "aug")
    for i in range(n_neg):
        kind = NEGATIVE_KINDS[i % len(NEGATIVE_KINDS)]
        add(synth_negative(kind, rng), UNKNOWN, kind, "synthetic")
    for p in photos:
        img = load_rgb(p)
        for _ in range(n_photo):
            add(photo_variant(img, rng), UNKNOWN, "photo", p.name)
    if deep is not None:
        flush()
    return rows


def to_arrays(rows: dict[str, list]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in rows.items()}


# --------------------------------------------------------------------------------------------------
# model


def fit_pca(thumbs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    mean = thumbs.mean(axis=0)
    _, _, vt = np.linalg.svd(thumbs - mean, full_matrices=False)
    return mean, vt[:k]


def fit_model(
    x: np.ndarray, y: np.ndarray, kind: str, c: float, seed: int, sample_weight: np.ndarray
) -> list[dict]:
    """Fit on standardised x; returns the dense layers (weight rows follow CLASSES)."""
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        from echo_agent.errors import MissingExtraError

        raise MissingExtraError("scikit-learn", "eval", "training the organ router") from exc
    from echo_agent.training.linear_probe import class_rows

    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        m = LogisticRegression(C=c, max_iter=3000)
        m.fit(x, y, sample_weight=sample_weight)
        coef, intercept = class_rows(m.coef_, m.intercept_, list(m.classes_), len(CLASSES))
        return [{"weight": coef.tolist(), "bias": intercept.tolist()}]
    from sklearn.neural_network import MLPClassifier

    # MLPClassifier has no sample weights: rebalance by resampling to equal class counts.
    rng = np.random.default_rng(seed)
    counts = Counter(y.tolist())
    n = max(counts.values())
    idx = np.concatenate([rng.choice(np.flatnonzero(y == k), n, replace=True) for k in sorted(counts)])
    hidden = int(kind[3:] or 32)  # "mlp" = 32 hidden units, "mlp64" = 64
    m = MLPClassifier(
        hidden_layer_sizes=(hidden,), alpha=c, max_iter=400, random_state=seed, early_stopping=False
    )
    m.fit(x[idx], y[idx])
    assert list(m.classes_) == list(range(len(CLASSES)))
    layers = [(w.T, b) for w, b in zip(m.coefs_, m.intercepts_, strict=True)]
    layers[-1] = class_rows(*layers[-1], list(m.classes_), len(CLASSES))
    return [{"weight": w.tolist(), "bias": b.tolist()} for w, b in layers]


def class_weights(y: np.ndarray) -> np.ndarray:
    counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
    w = len(y) / (len(CLASSES) * np.maximum(counts, 1))
    return w[y]


def decisions(router: OrganRouter, vecs: np.ndarray) -> list[str | None]:
    probs = router.probabilities_from_vectors(vecs)
    return [router.decide(p).organ for p in probs]


def pick_threshold(
    router: OrganRouter, vecs: np.ndarray, labels: np.ndarray, slack: float = 0.005
) -> tuple[float, float]:
    """The highest threshold whose balanced routing accuracy (organ correct, unknown rejected; mean
    over the classes) on val is within ``slack`` of the best one: when in doubt, say "unknown"."""
    probs = router.probabilities_from_vectors(vecs)
    curve = []
    for t in np.round(np.arange(0.34, 0.96, 0.01), 2):
        router.threshold = float(t)
        pred = np.array([router.decide(p).organ or UNKNOWN for p in probs])
        curve.append((float(t), float(np.mean([np.mean(pred[labels == c] == c) for c in CLASSES]))))
    top = max(b for _, b in curve)
    t, bal = max((t, b) for t, b in curve if b >= top - slack)
    router.threshold = t
    return t, bal


def _rounded(obj):
    """Floats to 7 significant digits (float32 precision) to keep the JSON small."""
    if isinstance(obj, float):
        return float(f"{obj:.7g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def make_router(params: dict) -> OrganRouter:
    return OrganRouter(params, source="<training>")


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate(router: OrganRouter, data: dict[str, np.ndarray]) -> dict:
    """Routing metrics of one split, per center and variant and per negative kind."""
    vecs = vectors(router, data)
    pred = np.array([d or UNKNOWN for d in decisions(router, vecs)])
    out: dict = {"organ_images": {}, "negatives": {}}
    for src in sorted(set(data["source"][data["label"] != UNKNOWN])):
        for variant in ("clean", "aug"):
            m = (data["source"] == src) & (data["variant"] == variant)
            if not m.any():
                continue
            truth = data["label"][m][0]
            c = Counter(pred[m].tolist())
            out["organ_images"][f"{src}/{variant}"] = {
                "organ": truth,
                "n": int(m.sum()),
                "accuracy": round(float(np.mean(pred[m] == truth)), 4),
                "rejected": round(c.get(UNKNOWN, 0) / m.sum(), 4),
                "wrong_organ": round(float(np.mean((pred[m] != truth) & (pred[m] != UNKNOWN))), 4),
            }
    neg = data["label"] == UNKNOWN
    for kind in sorted(set(data["source"][neg])):
        m = neg & (data["source"] == kind)
        c = Counter(pred[m].tolist())
        out["negatives"][kind] = {
            "n": int(m.sum()),
            "rejected": round(c.get(UNKNOWN, 0) / m.sum(), 4),
            "routed": {k: v for k, v in c.items() if k != UNKNOWN},
        }
    out["negatives_rejected_overall"] = round(float(np.mean(pred[neg] == UNKNOWN)), 4) if neg.any() else None
    return out


def _group(source: str, head_centers: tuple[str, ...]) -> str:
    """Val groups of a head's threshold choice: each center, and every non-ultrasound negative as one."""
    return source if source in CENTERS or source in head_centers else "negatives"


def _routing_table(base: OrganRouter, organ: str, head_results: Sequence[RoutingResult], d: dict) -> dict:
    """Routing accuracy of every source of one split (centers: clean and augmented apart), with the
    packaged router alone and with a head that decided ``head_results`` (one per row of ``d``),
    combined by ``echo_agent.organs.routing.combine_heads``: what installing the plug-in changes."""
    pb = base.probabilities_from_vectors(vectors(base, d))
    alone, both = [], []
    for b, h in zip(pb, head_results, strict=True):
        r = base.decide(b)
        alone.append(r.organ or UNKNOWN)
        both.append(combine_heads(r, [(organ, h)]).organ or UNKNOWN)
    alone_a, both_a = np.array(alone), np.array(both)
    out = {}
    for src in sorted(set(d["source"].tolist())):
        is_center = src in CENTERS
        for variant in ("clean", "aug", "all") if is_center else ("all",):
            m = (d["source"] == src) & ((d["variant"] == variant) if variant != "all" else True)
            if not m.any():
                continue
            truth = center_organ(src) if is_center else UNKNOWN
            out[f"{src}/{variant}"] = {
                "n": int(m.sum()), "truth": truth, "packaged_router": round(float(np.mean(alone_a[m] == truth)), 4),
                "with_head": round(float(np.mean(both_a[m] == truth)), 4)}
    return out


def _accepts(organ: str, p_head: np.ndarray, threshold: float) -> list[RoutingResult]:
    """The decisions of a linear head with organ probabilities ``p_head`` accepting from ``threshold``."""
    return [RoutingResult(organ if p >= threshold else None, float(p), {}, "") for p in p_head]


def _deep_head(args, splits, deep, head_centers, t0, argv) -> int:  # noqa: ANN001 - argparse/ndarray dicts
    """--head-model efficientnet-lite0: fit the linear head on val-chosen C and threshold (with
    --head-max-loss: raised until no built-in center loses more routing accuracy on val), export ONNX,
    and report routing of every split's sources with the packaged router alone and with the head."""
    from echo_agent.training.router_head import export_router_head, fit_linear_head

    tr, va = splits["train"], splits["val"]
    y_tr = (tr["label"] == args.head).astype(int)
    y_va = (va["label"] == args.head).astype(int)
    groups = np.array([_group(s, head_centers) for s in va["source"]])
    head = fit_linear_head(tr["deep"], y_tr, va["deep"], y_va, groups_val=groups)
    print(f"[{time.time() - t0:6.0f}s] head C={head.c} threshold={head.threshold:.2f} "
          f"val group-balanced accuracy {head.val_balanced_accuracy:.4f}", flush=True)
    base = OrganRouter.from_file(default_router_path())
    chosen_by = "group-balanced val accuracy"
    if args.head_max_loss is not None:
        builtin = [c for c in CENTERS if c not in head_centers]
        for t in np.round(np.arange(head.threshold, 0.991, 0.01), 2):
            table = _routing_table(base, args.head, _accepts(args.head, head.probability(va["deep"]), float(t)), va)
            if all(table[f"{c}/all"]["packaged_router"] - table[f"{c}/all"]["with_head"] <= args.head_max_loss + 1e-9
                   for c in builtin):
                head.threshold = float(t)
                chosen_by = f"lowest val threshold at which no built-in center loses more than {args.head_max_loss:g}"
                break
        else:
            print(f"no threshold keeps every built-in center within {args.head_max_loss:g}; kept {head.threshold}")
        print(f"[{time.time() - t0:6.0f}s] threshold {head.threshold:.2f} ({chosen_by})", flush=True)
    report: dict = {"head": {"C": head.c, "threshold": head.threshold, "threshold_chosen_by": chosen_by,
                             "val_balanced_accuracy": head.val_balanced_accuracy}}
    for split in ("val", "test"):
        report[split] = _routing_table(base, args.head, _accepts(args.head, head.probability(splits[split]["deep"]),
                                                                 head.threshold), splits[split])
    export_router_head(deep, head, args.head, args.out, {
        "trained_on": {"positives": list(head_centers), "negatives": [c for c in CENTERS if c not in head_centers]
                       + ["synthetic non-ultrasound images", "photographs (--photo-negatives)"], "split": "train"},
        "threshold_chosen_by": chosen_by,
        "command": "python tools/train_router.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.date.today().isoformat(), "val_routing": report["val"],
    })
    print(f"wrote {args.out}")
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        args.report.write_text(text + "\n", encoding="utf-8")
    return 0


def vectors(router: OrganRouter, data: dict[str, np.ndarray]) -> np.ndarray:
    proj = (data["thumb"] - router._pca_mean) @ router._pca.T
    return np.concatenate([data["feat"], proj], axis=1)


def real_negatives(patterns: list[str], n_crops: int, seed: int) -> dict[str, list]:
    """Held-out real non-ultrasound images (never used for training): each file as is, in grey, and
    in random crops."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = defaultdict(list)
    paths = sorted({p for pat in patterns for p in glob.glob(pat)})
    for p in paths:
        try:
            img = load_rgb(Path(p))
        except OSError:
            continue
        variants = [img, np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)]
        for _ in range(n_crops):
            h, w = img.shape[:2]
            ch, cw = int(h * rng.uniform(0.4, 0.9)), int(w * rng.uniform(0.4, 0.9))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            variants.append(np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw]))
        for i, v in enumerate(variants):
            if min(v.shape[:2]) < 16:
                continue
            f, t = extract_features(v)
            rows["feat"].append(f)
            rows["thumb"].append(t)
            rows["label"].append(UNKNOWN)
            rows["source"].append("real_grey" if i == 1 else "real")
            rows["variant"].append(Path(p).name)
    return rows


def _gamma(img: np.ndarray, g: float) -> np.ndarray:
    return (255 * (img / 255.0) ** g).astype(np.uint8)


def _rescale(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = side / max(h, w)
    return cv2.resize(
        img, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    )


def _pad(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    t, b, left, right = (int(0.2 * v) for v in (h, h, w, w))
    return cv2.copyMakeBorder(img, t, b, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def _fan(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img * fan_mask(*img.shape[:2], rng)[:, :, None].astype(np.uint8)


def _tight(img: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = _content_box(img)
    mx, my = int(0.06 * (x1 - x0)), int(0.06 * (y1 - y0))
    return np.ascontiguousarray(img[y0 + my : y1 - my, x0 + mx : x1 - mx])


def _jpeg(img: np.ndarray) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 50])[1], cv2.IMREAD_UNCHANGED)


def _blur(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(cv2.resize(img, (w // 3, h // 3), interpolation=cv2.INTER_AREA), (w, h))


def robustness(router: OrganRouter, n: int, seed: int = 5) -> dict[str, dict[str, float]]:
    """Accuracy on ``n`` evenly spaced test images per center under one fixed transform at a time."""
    rng = np.random.default_rng(seed)
    ops = {
        "clean": lambda x: x,
        "fan": lambda x: _fan(x, rng),
        "black_padding_20pct": _pad,
        "fan+padding": lambda x: _pad(_fan(x, rng)),
        "tight_crop": _tight,
        "rescaled_800px": lambda x: _rescale(x, 800),
        "rescaled_200px": lambda x: _rescale(x, 200),
        "tint": lambda x: np.clip(x * np.array([0.85, 0.95, 1.0]), 0, 255).astype(np.uint8),
        "scanner_ui": lambda x: draw_ui(np.ascontiguousarray(x), rng),
        "blur_x3": _blur,
        "jpeg_q50": _jpeg,
        "gamma_0.7": lambda x: _gamma(x, 0.7),
        "gamma_1.4": lambda x: _gamma(x, 1.4),
    }
    out = {}
    for c in CENTERS:
        items = load_split(c, "test")
        items = items[:: max(1, len(items) // n)][:n]
        imgs = [load_rgb(im.image) for im in items]
        organ = center_organ(c)
        out[c] = {
            k: round(float(np.mean([router.route(f(im)).organ == organ for im in imgs])), 3)
            for k, f in ops.items()
        }
    return out


def time_router(router: OrganRouter, n: int) -> dict[str, float]:
    """Median and p90 wall time of ``router.route`` per image (decoded arrays, warm cache)."""
    images = [load_rgb(im.image) for c in CENTERS for im in load_split(c, "test")[:n]]
    router.route(images[0])
    times = []
    for img in images:
        t = time.perf_counter()
        router.route(img)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "n": len(times),
        "p50": round(float(np.median(times)), 3),
        "p90": round(float(np.percentile(times, 90)), 3),
    }


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=default_router_path(), help="router JSON to write")
    ap.add_argument("--seed", type=int, default=0, help="base seed of augmentation and negatives")
    ap.add_argument("--aug-breast", type=int, default=5, help="augmented copies per breast image (train)")
    ap.add_argument("--aug-kidney", type=int, default=2, help="augmented copies per kidney frame (train)")
    ap.add_argument("--aug-eval", type=int, default=2, help="augmented copies per image in val/test")
    ap.add_argument(
        "--negatives", type=int, default=3500, help="synthetic negatives in train (val/test: a third)"
    )
    ap.add_argument(
        "--models",
        default="logreg:0.1,logreg:1,logreg:10,mlp:0.001,mlp:0.01,mlp64:0.01,mlp64:0.1,mlp128:0.1",
        help="candidates kind:C (logreg:C, mlp[H]:alpha)",
    )
    ap.add_argument(
        "--real-negatives", nargs="*", default=[], help="globs of real non-ultrasound images for the report"
    )
    ap.add_argument(
        "--photo-negatives",
        type=Path,
        default=None,
        help="folder of photographs for the unknown class (train/val)",
    )
    ap.add_argument(
        "--photo-variants", type=int, default=40, help="variants per training photograph (val: a third)"
    )
    ap.add_argument("--cache", type=Path, default=None, help="npz cache of the extracted features")
    ap.add_argument("--evaluate-only", action="store_true", help="evaluate --out instead of training")
    ap.add_argument(
        "--time", type=int, default=0, help="also time route() on this many test images per center"
    )
    ap.add_argument(
        "--robustness", type=int, default=0, help="per-transform accuracy on this many test images per center"
    )
    ap.add_argument("--report", type=Path, default=None, help="write the metrics JSON here")
    ap.add_argument("--head", default=None, metavar="ORGAN",
                    help="train a router head for a plug-in organ instead (its centers against the built-in organs "
                         "and the negatives; classes ORGAN/unknown); write it to --out, the file its OrganSpec.router_head names")
    ap.add_argument("--aug-head", type=int, default=4, help="augmented copies per image of the --head organ (train)")
    ap.add_argument("--head-max-loss", type=float, default=None,
                    help="--head-model efficientnet-lite0: raise the head's threshold (on val) until no built-in "
                         "center loses more than this routing accuracy (e.g. 0.01)")
    ap.add_argument("--head-model", default="features", choices=["features", "efficientnet-lite0"],
                    help="--head on the router's hand-crafted features (a .json head) or on frozen pretrained "
                         "EfficientNet-Lite0 features of the whole image (an .onnx head, train extra)")
    args = ap.parse_args(argv)
    global CENTERS, CLASSES
    head_centers: tuple[str, ...] = ()
    if args.head:
        head_centers = tuple(c for c in list_centers() if center_organ(c) == args.head)
        if not head_centers:
            ap.error(f"no registered center holds {args.head!r} images; install the plug-in that registers them")
        if args.out == default_router_path():
            ap.error("--head writes a plug-in's head: give --out (never the packaged router.json)")
        CENTERS = (*CENTERS, *head_centers)
        CLASSES = (args.head, UNKNOWN)
        LABEL_OF.update({center_organ(c): UNKNOWN for c in CENTERS if c not in head_centers})

    if args.photo_negatives is None and not args.evaluate_only:
        print("warning: no --photo-negatives; the unknown class sees synthetic images only", file=sys.stderr)
    deep = None
    if args.head_model != "features":
        if not args.head or args.out.suffix != ".onnx":
            ap.error(f"--head-model {args.head_model} trains a plug-in head: give --head and an --out ending in .onnx")
        from echo_agent.training.linear_probe import Lite0Features

        deep = Lite0Features()
    t0 = time.time()
    splits: dict[str, dict[str, np.ndarray]] = {}
    cache = None
    if args.cache and args.cache.exists():
        cache = np.load(args.cache, allow_pickle=False)
    for split in ("train", "val", "test"):
        if cache is not None and f"{split}_feat" in cache.files:
            splits[split] = {
                k: cache[f"{split}_{k}"] for k in ("feat", "thumb", "label", "source", "variant", "deep")
                if f"{split}_{k}" in cache.files
            }
            continue
        if split == "train" and args.evaluate_only:
            continue
        train = split == "train"
        n_aug = {
            BUSI: args.aug_breast if train else args.aug_eval,
            BREAST_LESIONS_USG: args.aug_breast if train else args.aug_eval,
            HYDRONEPHROSIS_NCNU: args.aug_kidney if train else max(1, args.aug_eval // 2),
            **{c: args.aug_head if train else args.aug_eval for c in head_centers},
        }
        n_neg = args.negatives if train else max(len(NEGATIVE_KINDS), args.negatives // 3)
        photos = photo_files(args.photo_negatives, split)
        n_photo = args.photo_variants if train else max(1, args.photo_variants // 3)
        splits[split] = to_arrays(
            build_split(
                split, n_aug, n_neg, seed=1000 * SEEDS[split] + args.seed, photos=photos, n_photo=n_photo,
                deep=deep,
            )
        )
        print(f"[{time.time() - t0:6.0f}s] {split}: {len(splits[split]['label'])} samples", flush=True)
    if args.cache and cache is None:
        np.savez(args.cache, **{f"{s}_{k}": v for s, d in splits.items() for k, v in d.items()})

    real = to_arrays(real_negatives(args.real_negatives, 6, seed=99)) if args.real_negatives else None
    if deep is not None:
        return _deep_head(args, splits, deep, head_centers, t0, argv)

    if args.evaluate_only:
        router = OrganRouter.from_file(args.out)
        params = router.params
    else:
        tr, va = splits["train"], splits["val"]
        pca_mean, pca = fit_pca(tr["thumb"], N_PCA)
        base = {
            "feature_version": FEATURE_VERSION,
            "classes": list(CLASSES),
            "pca_mean": pca_mean.tolist(),
            "pca_components": pca.tolist(),
        }
        proj_tr = np.concatenate([tr["feat"], (tr["thumb"] - pca_mean) @ pca.T], axis=1)
        proj_va = np.concatenate([va["feat"], (va["thumb"] - pca_mean) @ pca.T], axis=1)
        mu, sd = proj_tr.mean(axis=0), proj_tr.std(axis=0)
        sd = np.where(sd < 1e-6, 1.0, sd)
        y_tr = np.array([CLASSES.index(c) for c in tr["label"]])
        # Clean and augmented organ images weigh the same per center; classes are balanced.
        w = class_weights(y_tr)
        best: tuple[float, dict, str] | None = None
        for cand in args.models.split(","):
            kind, c = cand.split(":")
            layers = fit_model((proj_tr - mu) / sd, y_tr, kind, float(c), args.seed, w)
            params = {
                **base,
                "feature_mean": mu.tolist(),
                "feature_scale": sd.tolist(),
                "layers": layers,
                "threshold": 0.5,
            }
            router = make_router(params)
            t, bal = pick_threshold(router, proj_va, va["label"])
            print(
                f"[{time.time() - t0:6.0f}s] {cand}: val balanced routing accuracy {bal:.4f} at threshold {t:.2f}",
                flush=True,
            )
            if best is None or bal > best[0] + 1e-9:
                best = (bal, {**params, "threshold": t}, cand)
        assert best is not None
        params = best[1]
        params["version"] = f"router-{_dt.date.today().isoformat()}-{best[2].replace(':', '-C')}"
        params["model"] = best[2]
        params["feature_names"] = list(FEATURE_NAMES) + [f"thumb_pca_{i}" for i in range(N_PCA)]
        params["training"] = {
            "command": "python tools/train_router.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed,
            "splits": "echo_agent/eval/splits/{busi,breast_lesions_usg,hydronephrosis_ncnu}.csv",
            "train_samples": dict(Counter(tr["label"].tolist())),
            "val_balanced_routing_accuracy": round(best[0], 4),
        }
        params = _rounded(params)
        router = make_router(params)

    report = {
        "version": params.get("version"),
        "threshold": params["threshold"],
        "model": params.get("model"),
    }
    for split in ("val", "test"):
        report[split] = evaluate(router, splits[split])
    if real is not None and len(real.get("label", [])):
        vecs = vectors(router, real)
        pred = np.array([d or UNKNOWN for d in decisions(router, vecs)])
        report["real_non_ultrasound"] = {
            "files": sorted(set(real["variant"].tolist())),
            **{
                src: {
                    "n": int((real["source"] == src).sum()),
                    "rejected": round(float(np.mean(pred[real["source"] == src] == UNKNOWN)), 4),
                    "routed": dict(Counter(pred[(real["source"] == src) & (pred != UNKNOWN)].tolist())),
                }
                for src in sorted(set(real["source"].tolist()))
            },
        }
    if args.head:
        test = splits["test"]
        report["with_packaged_router_test"] = _routing_table(
            OrganRouter.from_file(default_router_path()), args.head,
            [router.decide(p) for p in router.probabilities_from_vectors(vectors(router, test))], test)
    if not args.evaluate_only:
        params["test_summary"] = {k: v["accuracy"] for k, v in report["test"]["organ_images"].items()} | {
            "synthetic_negatives_rejected": report["test"]["negatives_rejected_overall"]
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(params, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    if args.time:
        report["timing_ms"] = time_router(router, args.time)
    if args.robustness:
        report["robustness_test"] = robustness(router, args.robustness)
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        args.report.write_text(text + "\n", encoding="utf-8")
    print(f"[{time.time() - t0:6.0f}s] done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
