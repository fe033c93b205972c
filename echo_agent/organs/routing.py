"""Organ routing: which registered organ does an ultrasound image show, if any.

The graph's perceive step calls :func:`default_router` when the caller gives no organ. It is a small
classifier (a standardised feature vector fed to a multinomial logistic regression or a one-hidden-
layer network) over hand-crafted, size-invariant features of a downscaled image:

* colour: saturation, chroma and whether the colour is a single tint that scales with brightness
  (tinted ultrasound) or many hues (a photograph);
* field of view: black fraction overall, in the border ring and in the corners (fan shape), the
  content box, near-white fraction (documents);
* intensity: histogram, quantiles, entropy and number of distinct grey levels of the content box;
* texture: contrast-normalised gradients at two scales and their orientation ratio, speckle
  (block coefficient of variation), Laplacian energy, lag-1 autocorrelation, strong-edge fraction;
* geometry: a depth profile and a 16x16 contrast-normalised thumbnail projected on PCA components.

The parameters (class list, feature normalisation, PCA, weights, rejection threshold, version) are
plain JSON in ``echo_agent/assets/router/router.json``; ``tools/train_router.py`` writes them. An
image is "unknown organ" when the ``unknown`` class wins or when the best organ's probability is
below the threshold. Only numpy and OpenCV are used at run time.

Example::

    >>> from echo_agent.organs.routing import default_router
    >>> organ, confidence = default_router(image)     # ('breast', 0.98) or (None, 0.91)
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ChannelLayoutError, ImageTooSmallError, ModelLoadError

FEATURE_VERSION = 2
"""Version of :func:`extract_features`; a router file trained on another version is refused."""

UNKNOWN = "unknown"
"""Class name of the explicit "not a routed organ" class in the router file."""

_VIEW_SIDE = 128  # longest side of the working view: enough for speckle, cheap to compute
_GRID = 64  # content box resampled to _GRID x _GRID for texture features
_THUMB = 16  # thumbnail side for the PCA shape features
_BLACK = 10 / 255
_MIN_SIDE = 8


@dataclass(frozen=True)
class RoutingResult:
    """The router's decision on one image.

    ``organ`` is the organ name or ``None`` for "unknown organ"; ``confidence`` is the probability the
    router gives to its decision (the organ's probability, or for ``None`` the probability that the
    image is none of the organs); ``scores`` holds every class probability; ``reason`` says in one
    sentence why.
    """

    organ: str | None
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def _as_rgb(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ChannelLayoutError(
            f"the router expects an HxWx3 RGB array, got shape {arr.shape}; load the image with "
            "echo_agent.imaging.load_image first"
        )
    arr = arr[:, :, :3]
    if min(arr.shape[:2]) < _MIN_SIDE:
        raise ImageTooSmallError(
            f"the image is {arr.shape[1]}x{arr.shape[0]} pixels; the router needs at least "
            f"{_MIN_SIDE}x{_MIN_SIDE}"
        )
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    interp = cv2.INTER_AREA if w <= arr.shape[1] and h <= arr.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(arr, (max(1, w), max(1, h)), interpolation=interp)


def _content_box(black: np.ndarray) -> tuple[int, int, int, int]:
    # Rows/columns with more than 5% non-black pixels: drops the black frame around a fan or a scan.
    rows = np.flatnonzero((~black).mean(axis=1) > 0.05)
    cols = np.flatnonzero((~black).mean(axis=0) > 0.05)
    h, w = black.shape
    if rows.size < 4 or cols.size < 4:
        return 0, 0, w, h
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-3)


def _autocorr(z: np.ndarray, axis: int) -> float:
    a = np.take(z, range(z.shape[axis] - 1), axis=axis)
    b = np.take(z, range(1, z.shape[axis]), axis=axis)
    return float((a * b).mean())


def extract_features(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """Hand-crafted features and the raw 16x16 thumbnail of one image.

    ``image`` is an HxWx3 uint8 RGB array (grayscale 2-D arrays are accepted). Returns
    ``(features, thumbnail)``: a float64 vector (:data:`FEATURE_NAMES` order) and a flattened,
    contrast-normalised 16x16 thumbnail of the content box (the router projects it on PCA
    components). Every feature depends on the image's content, not its pixel size.
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    s = _VIEW_SIDE / max(h, w)
    view = _resize(rgb, round(w * s), round(h * s)) if s < 1 else rgb
    # Colour with OpenCV on uint8 (numpy reductions over the channel axis are several times slower).
    hsv = cv2.cvtColor(view, cv2.COLOR_RGB2HSV)
    gray8 = cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)
    r, gch, b = cv2.split(view)
    val = hsv[:, :, 2]
    chroma8 = cv2.subtract(val, cv2.min(cv2.min(r, gch), b))
    lit8 = (val > 20).astype(np.uint8)
    n_lit = max(int(cv2.countNonZero(lit8)), 1)
    sat8 = hsv[:, :, 1]
    sat_hist = np.bincount(sat8[lit8 > 0], minlength=256) / n_lit
    chroma = chroma8.astype(np.float32) * (1 / 255)
    gray = gray8.astype(np.float32) * (1 / 255)
    mean_rgb = np.asarray(cv2.mean(view, mask=lit8)[:3]) / 255
    mean_chroma_lit = float(cv2.mean(chroma, mask=lit8)[0])
    tint_coherence = float(np.linalg.norm(mean_rgb - mean_rgb.mean()) / (mean_chroma_lit + 1e-2))
    cs, gs = chroma.std(), gray.std()
    if cs > 1e-4 and gs > 1e-4:
        chroma_gray_corr = float(((chroma - chroma.mean()) * (gray - gray.mean())).mean() / (cs * gs))
    else:
        chroma_gray_corr = 0.0
    colour = [
        float((sat_hist * np.arange(256)).sum() / 255),
        float(sat_hist[64:].sum()),
        float(sat_hist[128:].sum()),
        float(chroma.mean()),
        float(np.count_nonzero(chroma8 > 40) / chroma8.size),
        tint_coherence,
        chroma_gray_corr,
    ]

    black = gray8 < round(_BLACK * 255)
    vh, vw = black.shape
    ry, rx = max(1, vh // 12), max(1, vw // 12)
    ring = (black[:ry].sum() + black[-ry:].sum() + black[:, :rx].sum() + black[:, -rx:].sum()) / (
        2 * ry * vw + 2 * rx * vh
    )
    cy, cx = max(1, vh // 6), max(1, vw // 6)
    top_corners = 0.5 * (black[:cy, :cx].mean() + black[:cy, -cx:].mean())
    bottom_corners = 0.5 * (black[-cy:, :cx].mean() + black[-cy:, -cx:].mean())
    x0, y0, x1, y1 = _content_box(black)
    content_frac = (x1 - x0) * (y1 - y0) / float(vh * vw)
    fov = [
        float(black.mean()),
        float(ring),
        float(top_corners),
        float(bottom_corners),
        float(top_corners - bottom_corners),
        float(content_frac),
        float(np.count_nonzero(gray8 > 235) / gray8.size),
    ]

    crop_u8 = gray8[y0:y1, x0:x1]
    levels = np.bincount(crop_u8.ravel(), minlength=256)
    p = levels / max(crop_u8.size, 1)
    hist16 = p.reshape(16, 16).sum(axis=1)
    p64 = p.reshape(64, 4).sum(axis=1)
    nz = p64[p64 > 0]
    entropy = float(-(nz * np.log2(nz)).sum() / 6.0)
    cdf = np.cumsum(p)
    q = np.searchsorted(cdf, [0.05, 0.25, 0.5, 0.75, 0.95]) / 255.0
    x = np.arange(256) / 255.0
    mean = float((p * x).sum())
    std = float(np.sqrt(max((p * x * x).sum() - mean * mean, 0.0)))
    k = round(_BLACK * 255)
    pin = p[k:]
    w_in = pin.sum()
    in_mean = float((pin * x[k:]).sum() / w_in) if w_in > 0 else 0.0
    in_std = float(np.sqrt(max((pin * x[k:] ** 2).sum() / w_in - in_mean**2, 0.0))) if w_in > 0 else 0.0
    intensity = [
        mean,
        std,
        *[float(v) for v in q],
        float(q[4] - q[0]),
        entropy,
        float((levels > 0).sum() / 256.0),
        float(p[:k].sum()),
        in_mean,
        in_std,
    ]

    # Fine scale (the working view, no further resampling), inside the lit area only: speckle keeps
    # every pixel textured, while photographs and graphics have flat patches and sparse sharp edges.
    ci = crop_u8.astype(np.int16)
    gm = (np.abs(np.diff(ci, axis=1))[:-1, :] + np.abs(np.diff(ci, axis=0))[:, :-1]).astype(np.float32)
    inside_px = crop_u8[:-1, :-1] >= k
    cf = crop_u8.astype(np.float32)
    lm = cv2.blur(cf, (5, 5))
    lv = np.maximum(cv2.blur(cf * cf, (5, 5)) - lm * lm, 0.0)
    lcv = np.sqrt(lv) / (lm + 4.0)
    lcv_in = lcv[:-1, :-1][inside_px]
    if lcv_in.size > 16:
        gin = gm[inside_px]
        m2 = float((gin * gin).mean())
        fine = [
            float(np.count_nonzero(gin <= 1) / gin.size),
            float(gin.mean() / (in_mean * 255 + 10)),
            float(np.log1p((gin**4).mean() / (m2 * m2 + 1e-6))),
            float(np.median(lcv_in)),
            float(np.count_nonzero(lcv_in < 0.03) / lcv_in.size),
            float(np.count_nonzero(lcv_in > 0.5) / lcv_in.size),
        ]
    else:
        fine = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    crop = gray[y0:y1, x0:x1]
    g = _resize(np.ascontiguousarray(crop), _GRID, _GRID)
    z = _zscore(g)
    z32 = _zscore(_resize(g, _GRID // 2, _GRID // 2))
    gx, gy = np.abs(np.diff(z, axis=1)), np.abs(np.diff(z, axis=0))
    gx32, gy32 = np.abs(np.diff(z32, axis=1)), np.abs(np.diff(z32, axis=0))
    mag = np.hypot(gx[:-1, :], gy[:, :-1])
    blocks = g.reshape(_GRID // 4, 4, _GRID // 4, 4)
    bm = blocks.mean(axis=(1, 3))
    bs = blocks.std(axis=(1, 3))
    lit_blocks = bm > 0.05
    cv = bs[lit_blocks] / bm[lit_blocks] if lit_blocks.any() else np.zeros(1)
    blur = cv2.GaussianBlur(z, (5, 5), 1.0)
    lap = z - blur
    texture = [
        float(gx.mean()),
        float(gy.mean()),
        float(np.log((gx.mean() + 1e-3) / (gy.mean() + 1e-3))),
        float(gx32.mean()),
        float(gy32.mean()),
        float(np.log((gx.mean() + gy.mean() + 1e-3) / (gx32.mean() + gy32.mean() + 1e-3))),
        float((mag > 1.5).mean()),
        float((mag < 0.02).mean()),
        float(np.median(cv)),
        float(np.percentile(cv, 90) - np.percentile(cv, 10)),
        float(lit_blocks.mean()),
        float((lap**2).mean()),
        _autocorr(z, 1),
        _autocorr(z, 0),
    ]

    prof = g.reshape(8, _GRID // 8, _GRID).mean(axis=(1, 2))
    prof = prof / (prof.mean() + 1e-3)
    cols = g.mean(axis=0)
    centre = cols[_GRID // 4 : 3 * _GRID // 4].mean()
    sides = 0.5 * (cols[: _GRID // 4].mean() + cols[3 * _GRID // 4 :].mean())
    geometry = [*[float(v) for v in prof], float(np.log((centre + 1e-2) / (sides + 1e-2)))]

    thumb = _zscore(_resize(g, _THUMB, _THUMB)).ravel().astype(np.float64)
    feats = np.asarray(
        colour + fov + intensity + texture + geometry + hist16.tolist() + fine, dtype=np.float64
    )
    return np.nan_to_num(feats), np.nan_to_num(thumb)


FEATURE_NAMES: tuple[str, ...] = (
    *(
        "sat_mean",
        "sat_frac_025",
        "sat_frac_050",
        "chroma_mean",
        "chroma_p95",
        "tint_coherence",
        "chroma_gray_corr",
    ),
    *(
        "black_frac",
        "ring_black",
        "top_corner_black",
        "bottom_corner_black",
        "corner_black_diff",
        "content_frac",
        "white_frac",
    ),
    *(
        "mean",
        "std",
        "q05",
        "q25",
        "q50",
        "q75",
        "q95",
        "q_range",
        "entropy",
        "levels_used",
        "content_black",
        "inside_mean",
        "inside_std",
    ),
    *(
        "grad_x",
        "grad_y",
        "grad_xy_log_ratio",
        "grad_x32",
        "grad_y32",
        "grad_scale_log_ratio",
        "strong_edges",
        "flat_pixels",
    ),
    *("speckle_cv_median", "speckle_cv_spread", "lit_blocks", "laplacian_energy", "autocorr_x", "autocorr_y"),
    *(f"depth_{i}" for i in range(8)),
    "centre_side_log_ratio",
    *(f"hist_{i}" for i in range(16)),
    *(
        "fine_flat",
        "fine_grad",
        "fine_grad_log_kurtosis",
        "local_cv_median",
        "local_cv_smooth",
        "local_cv_high",
    ),
)


class OrganRouter:
    """A trained organ classifier loaded from plain JSON (see ``tools/train_router.py``).

    The file holds ``classes`` (organ names plus ``unknown``), ``feature_mean``/``feature_scale``,
    ``pca_mean``/``pca_components`` for the thumbnail, ``layers`` (dense layers, ReLU between them),
    ``threshold`` and ``feature_version``. :meth:`route` returns a :class:`RoutingResult`.
    """

    def __init__(self, params: dict[str, Any], *, source: str = "<dict>") -> None:
        try:
            version = int(params["feature_version"])
            if version != FEATURE_VERSION:
                raise ModelLoadError(
                    f"router file {source} was trained on feature version {version}, this code computes "
                    f"version {FEATURE_VERSION}; retrain it with tools/train_router.py"
                )
            self.classes: tuple[str, ...] = tuple(str(c) for c in params["classes"])
            self.threshold = float(params["threshold"])
            self.version = str(params.get("version", ""))
            self._mean = np.asarray(params["feature_mean"], dtype=np.float64)
            self._scale = np.asarray(params["feature_scale"], dtype=np.float64)
            self._pca_mean = np.asarray(params["pca_mean"], dtype=np.float64)
            self._pca = np.asarray(params["pca_components"], dtype=np.float64).reshape(-1, _THUMB * _THUMB)
            self._layers = [
                (np.asarray(layer["weight"], dtype=np.float64), np.asarray(layer["bias"], dtype=np.float64))
                for layer in params["layers"]
            ]
        except ModelLoadError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"router file {source} is malformed ({exc!r}); regenerate it with tools/train_router.py"
            ) from exc
        n_in = len(FEATURE_NAMES) + self._pca.shape[0]
        if self._mean.shape != (n_in,) or self._scale.shape != (n_in,):
            raise ModelLoadError(
                f"router file {source} normalises {self._mean.shape[0]} features but the extractor gives "
                f"{n_in}; retrain it with tools/train_router.py"
            )
        if self._layers[-1][0].shape[0] != len(self.classes):
            raise ModelLoadError(
                f"router file {source}: the last layer does not match the {len(self.classes)} classes"
            )
        self.params = params

    @classmethod
    def from_file(cls, path: str | Path) -> OrganRouter:
        """Load a router file written by ``tools/train_router.py``."""
        p = Path(path)
        try:
            params = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ModelLoadError(f"cannot read router file {p} ({exc.strerror}); check the path") from exc
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"router file {p} is not valid JSON ({exc.msg}); regenerate it") from exc
        return cls(params, source=str(p))

    @property
    def organs(self) -> tuple[str, ...]:
        """The organ classes (every class but ``unknown``)."""
        return tuple(c for c in self.classes if c != UNKNOWN)

    def vectorize(self, image: Any) -> np.ndarray:
        """The model's input vector for one image (hand-crafted features + thumbnail PCA), unscaled."""
        return self.vector_from_features(*extract_features(image))

    def vector_from_features(self, feats: np.ndarray, thumb: np.ndarray) -> np.ndarray:
        """The input vector from :func:`extract_features`' output (so several routers share one extraction)."""
        return np.concatenate([feats, self._pca @ (thumb - self._pca_mean)])

    def probabilities_from_vectors(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (rows follow :attr:`classes`) for unscaled vectors ``x`` (N x D)."""
        a = (np.atleast_2d(x) - self._mean) / self._scale
        for i, (w, b) in enumerate(self._layers):
            a = a @ w.T + b
            if i < len(self._layers) - 1:
                a = np.maximum(a, 0.0)
        a = a - a.max(axis=1, keepdims=True)
        e = np.exp(a)
        return e / e.sum(axis=1, keepdims=True)

    def decide(self, probs: np.ndarray) -> RoutingResult:
        """Turn one probability vector into a decision (argmax, then the rejection threshold)."""
        scores = {c: float(p) for c, p in zip(self.classes, probs, strict=True)}
        organ_scores = {c: scores[c] for c in self.organs}
        best = max(organ_scores, key=organ_scores.__getitem__)
        p_best = organ_scores[best]
        p_unknown = scores.get(UNKNOWN, 0.0)
        if p_unknown >= p_best:
            return RoutingResult(
                None,
                p_unknown,
                scores,
                f"does not look like {' or '.join(self.organs)} ultrasound (p_unknown={p_unknown:.2f})",
            )
        if p_best < self.threshold:
            return RoutingResult(
                None,
                1.0 - p_best,
                scores,
                f"best organ {best} has p={p_best:.2f}, below the routing threshold {self.threshold:.2f}",
            )
        return RoutingResult(best, p_best, scores, f"routed to {best} with p={p_best:.2f}")

    def route(self, image: Any) -> RoutingResult:
        """Route one HxWx3 uint8 RGB image to an organ, or to ``None`` ("unknown organ")."""
        return self.decide(self.probabilities_from_vectors(self.vectorize(image))[0])

    def __call__(self, image: Any) -> tuple[str | None, float | None]:
        r = self.route(image)
        return r.organ, r.confidence


DEFAULT_ROUTER_PATH = "router/router.json"
_load_lock = threading.Lock()


def default_router_path() -> Path:
    """Path of the packaged router file."""
    return Path(str(resources.files("echo_agent") / "assets" / DEFAULT_ROUTER_PATH))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> OrganRouter:
    return OrganRouter.from_file(path)


def load_router(path: str | Path | None = None) -> OrganRouter:
    """The router stored at ``path`` (default: the packaged one), loaded once and cached."""
    p = Path(path).expanduser().resolve() if path is not None else default_router_path()
    with _load_lock:
        return _load_cached(str(p))


def combine_heads(result: RoutingResult, heads: Sequence[tuple[str, RoutingResult]]) -> RoutingResult:
    """The routing decision from the base router's ``result`` and each plug-in head's ``(organ, decision)``.

    A head that accepts the image (its organ probability above its own threshold) takes it; of several,
    the most confident. The base router's confidence does not count against a head: it never saw the
    plug-in's organ, so on those images it can be confidently wrong (scans of an organ it never saw read as breast
    with p = 1.00), while a head is trained against the built-in organs' images and the non-ultrasound
    negatives. When no head accepts, the base router's decision stands.
    """
    accepted = [(organ, r) for organ, r in heads if r.organ == organ]
    if not accepted:
        return result
    organ, r = max(accepted, key=lambda item: item[1].confidence)
    scores = {**result.scores, **{o: h.confidence for o, h in accepted}}
    return RoutingResult(organ, r.confidence, scores, f"routed to {organ} by its plug-in's head with p={r.confidence:.2f} "
                         f"(the packaged router alone: {result.organ or 'unknown'}, p={result.confidence:.2f})")


def default_router(image: Any) -> tuple[str | None, float | None]:
    """Route an HxWx3 uint8 RGB image with the packaged router alone: ``(organ, confidence)``.

    ``organ`` is ``'breast'``, ``'kidney'`` or ``None`` when the image does not look like either
    (a photograph, a blank frame, noise, a document); ``confidence`` is the probability of that
    decision. ``EchoAgent`` uses :func:`echo_agent.detectors.router_head.default_router`, which also
    asks the router heads of organs added by plug-ins.
    """
    return load_router()(image)


__all__ = [
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "OrganRouter",
    "RoutingResult",
    "UNKNOWN",
    "combine_heads",
    "default_router",
    "default_router_path",
    "extract_features",
    "load_router",
]
