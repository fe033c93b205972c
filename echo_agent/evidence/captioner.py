"""The pixel-based global-context captioner: sonographic descriptors computed from pixels.

:class:`PixelCaptioner` turns an image (and candidate boxes, usually from a detector) into a typed
:class:`~echo_agent.schemas.ImageContext`: whole-image descriptors (field of view, depth, image
quality, organ plausibility) and, per region, the organ's lexicon descriptors (for breast the
ACR BI-RADS ultrasound lexicon: shape, orientation, margin, echo pattern, posterior features,
size; for kidney: collecting-system fluid and its extent, echogenicity, acoustic shadowing). Each
descriptor carries a confidence in ``[0, 1]`` that grows with the distance of the measurement from
its decision threshold. The caption is assembled only from those values.

The decision thresholds are plain JSON (``echo_agent/assets/captioner/thresholds.json``), fitted
by ``tools/validate_captioner.py`` on a calibration half of BrEaST-Lesions_USG and reported on
the other half (see ``docs/captioner.md``).

Example:
    >>> import numpy as np
    >>> from echo_agent.schemas import Box
    >>> img = np.full((200, 300, 3), 120, np.uint8)
    >>> img[80:120, 100:180] = 20
    >>> ctx = PixelCaptioner().describe(img, organ="breast", regions=[Box.from_xyxy([95, 75, 185, 125])])
    >>> ctx.regions[0].descriptors["orientation"].value
    'parallel'
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EchoInputError, UnknownOrganError
from ..organs import get_organ
from ..schemas import Box, Descriptor, ImageContext, RegionDescription
from . import _descriptors as _d
from .descriptor_sets import DescriptorSet, RegionPixels, load_descriptor_set

__version__ = "0.1"

_THRESHOLDS_RESOURCE = ("assets", "captioner", "thresholds.json")


@lru_cache(maxsize=4)
def _load_json(path: str | None) -> dict[str, Any]:
    if path is None:
        ref = resources.files("echo_agent").joinpath(*_THRESHOLDS_RESOURCE)
        text = ref.read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return json.loads(text)


def load_thresholds(path: str | Path | None = None) -> dict[str, Any]:
    """Read the captioner's decision thresholds (the packaged file unless ``path`` is given)."""
    try:
        data = _load_json(None if path is None else str(path))
    except FileNotFoundError as exc:
        raise EchoInputError(
            f"captioner thresholds file {path!s} does not exist; pass an existing JSON file or None "
            "for the packaged one"
        ) from exc
    if not isinstance(data, dict) or "breast" not in data:
        raise EchoInputError("captioner thresholds JSON must be an object with a 'breast' section")
    return data


# ------------------------------------------------------------------------------------------------
# small decision helpers
# ------------------------------------------------------------------------------------------------


def _margin_confidence(x: float, threshold: float, spread: float) -> float:
    """0.5 at the threshold, rising towards 1 as ``x`` moves away from it (``spread`` sets the pace)."""
    if not math.isfinite(x):
        return 0.0
    return float(0.5 + 0.5 * math.tanh(abs(x - threshold) / max(spread, 1e-6)))


def linear_score(rule: Mapping[str, Any], feats: Mapping[str, float]) -> float:
    """Probability from a stored logistic rule ``{features, mean, scale, weights, bias}``."""
    z = float(rule["bias"])
    for name, mu, sd, w in zip(rule["features"], rule["mean"], rule["scale"], rule["weights"], strict=True):
        x = float(feats.get(name, mu))
        if not math.isfinite(x):
            x = mu
        z += w * (x - mu) / (sd if sd > 0 else 1.0)
    z = max(min(z, 40.0), -40.0)
    return 1.0 / (1.0 + math.exp(-z))


def _prob_confidence(p: float, threshold: float) -> float:
    """Confidence of a thresholded probability: 0.5 at the threshold, 1 at 0 or 1."""
    if p >= threshold:
        return float(0.5 + 0.5 * (p - threshold) / max(1.0 - threshold, 1e-6))
    return float(0.5 + 0.5 * (threshold - p) / max(threshold, 1e-6))


def decide_shape(f: Mapping[str, float], th: Mapping[str, Any]) -> Descriptor:
    """oval / round / irregular."""
    rule = th["shape_irregular"]
    p = linear_score(rule, f)
    t = float(rule["threshold"])
    if p >= t:
        return Descriptor(value="irregular", confidence=_prob_confidence(p, t), note=f"irregularity score {p:.2f}")
    r = th["shape_round"]
    aspect = float(f["aspect"])
    c = min(_prob_confidence(p, t), _margin_confidence(aspect, r["aspect"], r["spread"]))
    value = "round" if aspect < r["aspect"] else "oval"
    return Descriptor(value=value, confidence=c, note=f"irregularity score {p:.2f}, axis ratio {aspect:.2f}")


def decide_orientation(f: Mapping[str, float], th: Mapping[str, Any]) -> Descriptor:
    """parallel (wider than tall) / not parallel (taller than wide), by the lesion's extents."""
    r = th["orientation"]
    x = math.log(max(float(f["height_width_ratio"]), 1e-6))
    t = math.log(float(r["height_width_ratio"]))
    value = "not parallel" if x > t else "parallel"
    return Descriptor(
        value=value,
        confidence=_margin_confidence(x, t, r["spread_log"]),
        note=f"height/width {f['height_width_ratio']:.2f}",
    )


def decide_margin(f: Mapping[str, float], th: Mapping[str, Any]) -> tuple[Descriptor, Descriptor]:
    """circumscribed vs not (calibrated) and, when not, a subtype guess (heuristic, lower confidence).

    Returns the ``margin`` descriptor and a ``margin_circumscribed`` boolean descriptor.
    """
    rule = th["margin_not_circumscribed"]
    p = linear_score(rule, f)
    t = float(rule["threshold"])
    conf = _prob_confidence(p, t)
    if p < t:
        d = Descriptor(value="circumscribed", confidence=conf, note=f"non-circumscribed score {p:.2f}")
        return d, Descriptor(value=True, confidence=conf)
    st = th["margin_subtype"]
    if f.get("n_spikes", 0.0) >= st["spiculated_spikes"]:
        sub = "spiculated"
    elif f.get("n_sharp_corners", 0.0) >= st["angular_corners"]:
        sub = "angular"
    elif f.get("n_lobes", 0.0) >= st["microlobulated_lobes"]:
        sub = "microlobulated"
    else:
        sub = "indistinct"
    d = Descriptor(
        value=sub,
        confidence=conf * float(st["confidence_factor"]),
        note=f"not circumscribed (score {p:.2f}, confidence {conf:.2f}); subtype is a heuristic guess",
    )
    return d, Descriptor(value=False, confidence=conf)


def decide_echo(f: Mapping[str, float], th: Mapping[str, Any]) -> Descriptor:
    """anechoic / hypoechoic / isoechoic / hyperechoic / heterogeneous / complex cystic/solid.

    Rules in order: anechoic (very dark and uniform), complex cystic/solid (a substantial anechoic
    part next to solid tissue), hyperechoic / isoechoic (brightness relative to the surrounding
    ring), heterogeneous (internal standard deviation relative to the surroundings' brightness),
    otherwise hypoechoic.
    """
    e = th["echo"]
    med = float(f["lesion_median_rel"])
    ratio = float(f["echo_ratio"])
    dark = float(f["dark_fraction"])
    iqr = float(f["lesion_iqr_rel"])
    het = float(f["lesion_std_rel"])
    note = f"lesion/surroundings {ratio:.2f}, median {med:.2f}, dark part {dark:.2f}, internal std {het:.2f}"
    if med < e["anechoic_median_rel"] and dark >= e["anechoic_dark_fraction"]:
        c = _margin_confidence(med, e["anechoic_median_rel"], e["spread_rel"])
        return Descriptor(value="anechoic", confidence=c, note=note)
    if e["complex_dark_low"] <= dark <= e["complex_dark_high"] and iqr > e["complex_iqr"]:
        c = min(_margin_confidence(iqr, e["complex_iqr"], e["spread_rel"]), 0.7)
        return Descriptor(value="complex cystic/solid", confidence=c, note=note)
    if ratio > e["hyperechoic_ratio"]:
        return Descriptor(
            value="hyperechoic", confidence=_margin_confidence(ratio, e["hyperechoic_ratio"], e["spread_rel"]), note=note
        )
    if ratio > e["isoechoic_ratio"]:
        c = min(
            _margin_confidence(ratio, e["isoechoic_ratio"], e["spread_rel"]),
            _margin_confidence(ratio, e["hyperechoic_ratio"], e["spread_rel"]),
        )
        return Descriptor(value="isoechoic", confidence=c, note=note)
    if het > e["heterogeneous_std"]:
        c = _margin_confidence(het, e["heterogeneous_std"], e["spread_std"])
        return Descriptor(value="heterogeneous", confidence=c, note=note)
    c = min(
        _margin_confidence(ratio, e["isoechoic_ratio"], e["spread_rel"]),
        _margin_confidence(het, e["heterogeneous_std"], e["spread_std"]),
    )
    return Descriptor(value="hypoechoic", confidence=c, note=note)


def decide_posterior(f: Mapping[str, float], th: Mapping[str, Any]) -> Descriptor:
    """enhancement / shadowing / combined / none, from the band below vs the lateral bands."""
    r = th["posterior"]
    if not f.get("posterior_valid", 0.0):
        return Descriptor(value="none", confidence=0.3, note="no usable tissue below or beside the region")
    x = float(f["posterior_log_ratio"])
    lo, hi = float(f["posterior_min_third"]), float(f["posterior_max_third"])
    te, ts, sp = float(r["enhancement"]), float(r["shadowing"]), float(r["spread"])
    note = f"below/lateral log-ratio {x:+.2f} (thirds {lo:+.2f}..{hi:+.2f})"
    if hi > r["combined_high"] and lo < r["combined_low"]:
        c = min(_margin_confidence(hi, r["combined_high"], sp), _margin_confidence(lo, r["combined_low"], sp))
        return Descriptor(value="combined", confidence=c, note=note)
    if x > te:
        return Descriptor(value="enhancement", confidence=_margin_confidence(x, te, sp), note=note)
    if x < ts:
        return Descriptor(value="shadowing", confidence=_margin_confidence(x, ts, sp), note=note)
    c = min(_margin_confidence(x, te, sp), _margin_confidence(x, ts, sp))
    return Descriptor(value="none", confidence=c, note=note)


def _kidney_descriptors(f: Mapping[str, float], th: Mapping[str, Any]) -> dict[str, Descriptor]:
    k = th["kidney"]
    frac = float(f["fluid_fraction"])
    bands = k["fluid_extent"]  # ascending lower bounds of mild / moderate / severe
    sp = float(k["spread_fraction"])
    if frac < bands["mild"]:
        extent, edges = "none", [bands["mild"]]
    elif frac < bands["moderate"]:
        extent, edges = "mild", [bands["mild"], bands["moderate"]]
    elif frac < bands["severe"]:
        extent, edges = "moderate", [bands["moderate"], bands["severe"]]
    else:
        extent, edges = "severe", [bands["severe"]]
    ext_conf = min(_margin_confidence(frac, e, sp) for e in edges)
    present = frac >= bands["mild"]
    out = {
        "collecting_system_fluid": Descriptor(
            value="present" if present else "absent",
            confidence=_margin_confidence(frac, bands["mild"], sp),
            note=f"anechoic fraction of the box {frac:.2f}",
        ),
        "fluid_extent": Descriptor(value=extent, confidence=ext_conf, note=f"anechoic fraction of the box {frac:.2f}"),
    }
    ratio = float(f["tissue_ratio"])
    if ratio < k["hypoechoic_ratio"]:
        echo = "hypoechoic"
    elif ratio > k["hyperechoic_ratio"]:
        echo = "hyperechoic"
    else:
        echo = "isoechoic"
    ec = min(
        _margin_confidence(ratio, k["hypoechoic_ratio"], k["spread_ratio"]),
        _margin_confidence(ratio, k["hyperechoic_ratio"], k["spread_ratio"]),
    )
    out["echogenicity_vs_cortex"] = Descriptor(
        value=echo,
        confidence=ec,
        note=f"non-fluid tissue in the box vs the surrounding ring (cortex proxy): {ratio:.2f}",
    )
    x = float(f.get("posterior_log_ratio", 0.0))
    valid = bool(f.get("posterior_valid", 0.0))
    shadow = valid and x < k["shadowing"]
    out["acoustic_shadowing"] = Descriptor(
        value="present" if shadow else "absent",
        confidence=_margin_confidence(x, k["shadowing"], k["spread_log"]) if valid else 0.3,
        note=f"below/lateral log-ratio {x:+.2f}",
    )
    return out


def kidney_fluid_features(
    gray: np.ndarray, box: tuple[int, int, int, int], ring_mean: float, fluid_level: float = 0.35
) -> dict[str, float]:
    """Anechoic-fluid fraction of a kidney box and the brightness of its remaining tissue.

    Fluid pixels are darker than ``fluid_level`` x the reference tissue level (the larger of the
    box's 75th percentile and the mean of the ring around the region), and at least 12.
    """
    import cv2

    x1, y1, x2, y2 = box
    crop = gray[y1:y2, x1:x2]
    s = min(1.0, _d.WORK_SIZE * 2 / max(crop.shape))
    if s < 1.0:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))), interpolation=cv2.INTER_AREA)
    g = cv2.GaussianBlur(crop, (0, 0), 1.5).astype(np.float32)
    ref = float(np.percentile(g, 75)) if g.size else 0.0
    ref = max(ref, ring_mean if math.isfinite(ring_mean) else 0.0, 1.0)
    fluid = (g < max(12.0, fluid_level * ref)).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fluid, connectivity=8)
    keep = np.zeros(n, bool)
    min_area = max(4, int(0.01 * fluid.size))
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    fl = keep[lab]
    frac = float(fl.mean()) if fl.size else 0.0
    tissue = g[~fl]
    tmean = float(tissue.mean()) if tissue.size else ref
    return {
        "fluid_fraction": frac,
        "fluid_components": float(keep.sum()),
        "tissue_ratio": float((tmean + 1.0) / ((ring_mean if math.isfinite(ring_mean) else tmean) + 1.0)),
    }


# ------------------------------------------------------------------------------------------------
# global descriptors
# ------------------------------------------------------------------------------------------------


def _global_descriptors(
    ga: _d.GlobalAnalysis, organ: str | None, spacing: tuple[float, float] | None, th: Mapping[str, Any]
) -> dict[str, Descriptor]:
    f = ga.features
    q = th["quality"]
    out: dict[str, Descriptor] = {}
    x1, y1, x2, y2 = ga.fov_box
    out["field_of_view"] = Descriptor(
        value=f"[{x1}, {y1}, {x2}, {y2}]",
        confidence=1.0,
        unit="px",
        note="bounding box [x1, y1, x2, y2) of the non-black field of view",
    )
    fill = f["fov_fill"]
    tb = f["fov_top_bottom_width_ratio"]
    sector = fill < q["sector_fill"] or tb < q["sector_top_bottom"]
    geo_conf = max(_margin_confidence(fill, q["sector_fill"], 0.05), _margin_confidence(tb, q["sector_top_bottom"], 0.1))
    if not sector:
        geo_conf = min(_margin_confidence(fill, q["sector_fill"], 0.05), _margin_confidence(tb, q["sector_top_bottom"], 0.1))
    out["fov_geometry"] = Descriptor(
        value="sector" if sector else "linear",
        confidence=geo_conf,
        note=f"FOV fills {fill:.2f} of its bounding box; top/bottom width {tb:.2f}",
    )
    out["depth_px"] = Descriptor(value=float(f["depth_px"]), unit="px", note="height of the field of view")
    if spacing is not None:
        out["depth_mm"] = Descriptor(value=round(float(f["depth_px"]) * float(spacing[0]), 1), unit="mm")
    c = f["contrast"]
    out["contrast"] = Descriptor(
        value="low" if c < q["low_contrast"] else "adequate",
        confidence=_margin_confidence(c, q["low_contrast"], 0.08),
        note=f"5-95 percentile span {c:.2f} of the gray range",
    )
    out["noise_sigma"] = Descriptor(value=round(f["noise_sigma"], 2), unit="gray levels", note="Immerkaer estimate")
    out["speckle_index"] = Descriptor(
        value=round(f["speckle_index"], 3), note="median local std/mean over 8x8 blocks (fully developed speckle ~0.5)"
    )
    sat = f["saturation_fraction"]
    out["gain_saturation"] = Descriptor(
        value=round(sat, 4),
        confidence=1.0,
        note="over-gained" if sat > q["saturation_high"] else "within range",
    )
    ann = f["annotation_fraction"]
    out["annotations"] = Descriptor(
        value="present" if ann > q["annotation_present"] else "absent",
        confidence=_margin_confidence(ann, q["annotation_present"], q["annotation_present"]),
        note=f"fraction of annotation-like pixels {ann:.4f}",
    )
    if organ in ("breast", "kidney"):
        score = _organ_plausibility(f, organ, sector, th["organ_plausibility"])
        out["organ_plausibility"] = Descriptor(
            value=round(score, 2),
            confidence=0.5,
            note="cheap heuristic (horizontal layering of the upper field, probe geometry), not a classifier",
        )
    return out


def _organ_plausibility(f: Mapping[str, float], organ: str, sector: bool, p: Mapping[str, float]) -> float:
    """Heuristic 0..1 score that the image shows ``organ``.

    Breast scans (linear probe) show strong horizontal layering (skin, fat, Cooper's ligaments,
    pectoral fascia) in the upper half of the field; kidney scans (curvilinear probe) much less.
    A sector-shaped field nudges towards kidney, a linear one towards breast.
    """
    layering = float(f["layering"])  # share of vertical gradient energy: ~0.5 isotropic, -> 1 layered
    z = p["layering_gain"] * (layering - p["layering_center"])
    z += -p["sector_weight"] if sector else p["sector_weight"]
    if organ == "kidney":
        z = -z
    return 1.0 / (1.0 + math.exp(-z))


# ------------------------------------------------------------------------------------------------
# the captioner
# ------------------------------------------------------------------------------------------------


def _fmt_mm(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def region_caption(organ: str | None, d: Mapping[str, Descriptor]) -> str:
    """One sentence built only from a region's descriptor values."""

    def v(name: str) -> Any:
        return d[name].value if name in d else None

    if organ == "kidney":
        fluid = v("collecting_system_fluid")
        parts = []
        if fluid == "present":
            parts.append(f"{v('fluid_extent')} anechoic collecting-system fluid")
        else:
            parts.append("no anechoic collecting-system fluid")
        parts.append(f"{v('echogenicity_vs_cortex')} tissue relative to its surroundings")
        if v("acoustic_shadowing") == "present":
            parts.append("posterior acoustic shadowing")
        return "Region with " + ", ".join(parts) + "."
    if "shape" not in d:
        return ""
    size = ""
    if "size_mm" in d:
        size = f"{_fmt_mm(float(v('size_mm')))} x {_fmt_mm(float(v('size_short_mm')))} mm "
    margin = v("margin")
    margin_txt = "circumscribed margin" if margin == "circumscribed" else f"not circumscribed ({margin}) margin"
    post = v("posterior_features")
    post_txt = "no posterior features" if post == "none" else f"posterior {post}"
    return f"{size}{v('shape')}, {v('orientation')}, {v('echo_pattern')} mass with {margin_txt} and {post_txt}.".capitalize()


class PixelCaptioner:
    """Describe an ultrasound image and its candidate regions with the organ's lexicon, from pixels.

    Deterministic, CPU-only, a few milliseconds per region. Thresholds are read from the packaged
    JSON unless ``thresholds`` (a path or an already-loaded dict) is given.

    Example:
        >>> import numpy as np
        >>> cap = PixelCaptioner()
        >>> img = np.zeros((64, 64, 3), np.uint8) + 90
        >>> ctx = cap.describe(img, organ=None)
        >>> ctx.global_descriptors["fov_geometry"].value
        'linear'
    """

    name = f"pixel-captioner/{__version__}"

    def __init__(self, thresholds: str | Path | Mapping[str, Any] | None = None) -> None:
        # a private deep copy: the loaded JSON is cached and shared between instances
        source = thresholds if isinstance(thresholds, Mapping) else load_thresholds(thresholds)
        self.thresholds: dict[str, Any] = copy.deepcopy(dict(source))
        # whole-image analyses started ahead of describe() (see prefetch), by image object
        self._pending: OrderedDict[int, tuple[np.ndarray, Future[tuple[np.ndarray, _d.GlobalAnalysis]]]] = OrderedDict()
        self._pending_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        # region analyses started ahead of describe() (see prefetch_regions)
        self._pending_regions: OrderedDict[tuple[Any, ...], tuple[np.ndarray, Future[tuple[dict[str, float], _d.RegionAnalysis]]]] = OrderedDict()

    #: How many prefetched whole-image analyses are kept until describe() takes them.
    prefetch_capacity = 32

    # -- whole-image analysis, possibly ahead of time -------------------------------------------
    def prefetch(self, image: np.ndarray) -> bool:
        """Start the whole-image analysis of ``image`` in a background thread.

        The analysis (field of view, quality, layout: about a third of a describe call) does not
        depend on the candidate boxes, so it can run while the detector's forward passes keep the
        other core busy; a later :meth:`describe` of the same array object takes the result
        instead of computing it. The descriptors are the same either way.

        Only read-only arrays take part (the image store hands out read-only arrays), so the pixels
        cannot change between the prefetch and the describe call. Returns whether a job was
        started (False: not read-only, or already prefetched).
        """
        if not isinstance(image, np.ndarray) or image.flags.writeable or image.ndim != 3:
            return False
        with self._pending_lock:
            return self._whole_image_job(image)[1]

    def _whole_image_job(self, image: np.ndarray) -> tuple[Future[tuple[np.ndarray, _d.GlobalAnalysis]], bool]:
        """The pending whole-image analysis of ``image``, started if there is none (with the lock
        held); whether it was started now."""
        key = id(image)
        hit = self._pending.get(key)
        if hit is not None and hit[0] is image:
            return hit[1], False
        fut = self._pool_now().submit(_whole_image, image)
        self._pending[key] = (image, fut)
        while len(self._pending) > self.prefetch_capacity:
            self._pending.popitem(last=False)[1][1].cancel()
        return fut, True

    def _pool_now(self) -> ThreadPoolExecutor:
        self._after_fork()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="echo-captioner")
            self._pool_pid = os.getpid()
        return self._pool

    def _after_fork(self) -> None:
        """In a forked child (with the lock held): the parent's thread and its jobs do not exist
        here, so forget them (waiting on one would never end) and start a thread of our own."""
        if self._pool is not None and self._pool_pid != os.getpid():
            self._pool, self._pending, self._pending_regions = None, OrderedDict(), OrderedDict()

    def prefetch_regions(self, image: np.ndarray, boxes: Sequence[Box], *, organ: str | None,
                         pixel_spacing_mm: tuple[float, float] | None = None) -> int:
        """Start the analysis of ``boxes`` of ``image`` in the background thread (after the
        whole-image analysis it needs, started too if it was not), for a later :meth:`describe` of
        the same array object, organ, spacing and boxes. The descriptors are the same either way;
        a region never asked for is just work done for nothing. Read-only arrays only (see
        :meth:`prefetch`). Returns how many analyses were started."""
        if not isinstance(image, np.ndarray) or image.flags.writeable or image.ndim != 3:
            return 0
        spacing = _check_spacing(pixel_spacing_mm)
        kidney = organ == "kidney"
        started = 0
        with self._pending_lock:
            whole, _ = self._whole_image_job(image)
            for raw in boxes:
                box = _as_box(raw)
                key = _region_key(image, box, spacing, kidney)
                hit = self._pending_regions.get(key)
                if hit is not None and hit[0] is image:
                    continue
                fut = self._pool_now().submit(self._region_after, whole, image, box, spacing, kidney)
                self._pending_regions[key] = (image, fut)
                started += 1
            while len(self._pending_regions) > self.prefetch_capacity:
                self._pending_regions.popitem(last=False)[1][1].cancel()
        return started

    def _region_after(self, whole: Future[tuple[np.ndarray, _d.GlobalAnalysis]], image: np.ndarray, box: Box,
                      spacing: tuple[float, float] | None, kidney: bool) -> tuple[dict[str, float], _d.RegionAnalysis]:
        try:
            gray, ga = whole.result()
        except Exception:  # noqa: BLE001 - the whole-image job failed or was dropped: redo it here
            gray, ga = _whole_image(image)
        return self._region_features(gray, ga.fov_mask, box, None, spacing, kidney)

    def _take_region(self, image: np.ndarray, box: Box, spacing: tuple[float, float] | None,
                     kidney: bool) -> tuple[dict[str, float], _d.RegionAnalysis] | None:
        """A prefetched region analysis (waited for if running), or None."""
        with self._pending_lock:
            self._after_fork()
            hit = self._pending_regions.pop(_region_key(image, box, spacing, kidney), None)
        if hit is None or hit[0] is not image or hit[1].cancel():
            return None
        try:
            return hit[1].result()
        except Exception:  # noqa: BLE001 - recomputed by the caller, so the error surfaces there
            return None

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles (a Ray actor, copy.deepcopy) take the thresholds, not the thread
        return {"thresholds": self.thresholds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["thresholds"])  # type: ignore[misc]

    def _take_whole_image(self, image: np.ndarray) -> tuple[np.ndarray, _d.GlobalAnalysis]:
        """(gray, whole-image analysis): the prefetched result if there is one, else computed now."""
        with self._pending_lock:
            self._after_fork()
            hit = self._pending.get(id(image))
            if hit is not None and hit[0] is image:
                del self._pending[id(image)]
            else:
                hit = None
        if hit is not None:
            fut = hit[1]
            if not fut.cancel():  # already running or done: wait for it (not started: do it here)
                try:
                    return fut.result()
                except Exception:  # noqa: BLE001 - recomputed below, so the error surfaces here
                    pass
        return _whole_image(image)

    # -- numeric features ----------------------------------------------------------------------
    def features(
        self,
        image: np.ndarray,
        box: Box | Sequence[float],
        *,
        mask: np.ndarray | None = None,
        pixel_spacing_mm: tuple[float, float] | None = None,
    ) -> dict[str, float]:
        """Raw numeric features of one region (shape, margin, echo, posterior, kidney fluid).

        ``mask`` (HxW bool, optional) replaces the built-in segmentation, e.g. with a ground-truth
        mask. Lengths are in original pixels, or mm when ``pixel_spacing_mm`` is given.
        """
        gray = _d.to_gray(image)
        fov = _d.fov_mask(gray)
        return self._region_features(gray, fov, _as_box(box), mask, pixel_spacing_mm)[0]

    def _region_features(
        self,
        gray: np.ndarray,
        fov: np.ndarray,
        box: Box,
        mask: np.ndarray | None,
        spacing: tuple[float, float] | None,
        kidney: bool = True,
    ) -> tuple[dict[str, float], _d.RegionAnalysis]:
        ra = _d.analyse_region(gray, box.to_list(), fov, mask=mask, pixel_spacing_mm=spacing)
        f = dict(ra.features)
        if kidney:
            level = float(self.thresholds["kidney"].get("fluid_level", 0.35))
            f.update(kidney_fluid_features(gray, ra.box, f.get("ring_mean", float("nan")), level))
        return f, ra

    # -- descriptors ---------------------------------------------------------------------------
    def describe_region(
        self, f: Mapping[str, float], organ: str | None, spacing: tuple[float, float] | None, segmentation: str
    ) -> dict[str, Descriptor]:
        """Lexicon descriptors of one region from its numeric features."""
        th_b = self.thresholds["breast"]
        d: dict[str, Descriptor] = {}
        if organ == "kidney":
            d.update(_kidney_descriptors(f, self.thresholds))
        else:
            d["shape"] = decide_shape(f, th_b)
            d["orientation"] = decide_orientation(f, th_b)
            d["margin"], d["margin_circumscribed"] = decide_margin(f, th_b)
            d["echo_pattern"] = decide_echo(f, th_b)
            d["posterior_features"] = decide_posterior(f, th_b)
        return _with_size_and_segmentation(d, f, spacing, segmentation)

    def describe_with_set(
        self, descriptor_set: DescriptorSet, ra: _d.RegionAnalysis, spacing: tuple[float, float] | None
    ) -> dict[str, Descriptor]:
        """A plug-in organ's descriptors of one analysed region (``OrganSpec.descriptor_set``)."""
        region = RegionPixels(roi=ra.roi if ra.roi is not None else np.zeros(ra.mask.shape, np.uint8), mask=ra.mask,
                              box=ra.box, features=dict(ra.features), segmentation=ra.segmentation, spacing_mm=spacing)
        d = dict(descriptor_set.describe(region))
        return _with_size_and_segmentation(d, ra.features, spacing, ra.segmentation)

    def _descriptor_set(self, organ: str | None) -> DescriptorSet | None:
        """The descriptor set a registered organ names, if any (unknown organ names: none)."""
        if organ is None:
            return None
        try:
            spec = get_organ(organ)
        except UnknownOrganError:
            return None
        return load_descriptor_set(spec.descriptor_set) if spec.descriptor_set else None


    def describe(
        self,
        image: np.ndarray,
        *,
        organ: str | None,
        regions: Sequence[Box] = (),
        detection_ids: Sequence[str | None] | None = None,
        pixel_spacing_mm: tuple[float, float] | None = None,
        evidence_id: str = "desc",
    ) -> ImageContext:
        """Describe the whole image and each region.

        Args:
            image: canonical HxWx3 uint8 RGB array of the original image (not modified).
            organ: ``"breast"``, ``"kidney"``, a registered organ with a ``descriptor_set`` (its
                lexicon), or ``None`` (the breast lexicon is used for regions of unknown organs and of
                organs without a set; organ plausibility is omitted).
            regions: candidate boxes in pixel coordinates of ``image``.
            detection_ids: optional ids (one per region) linking each description to a detection.
            pixel_spacing_mm: ``(row, column)`` spacing in mm per pixel (DICOM PixelSpacing order);
                sizes and depth are then also given in mm.
            evidence_id: the ``id`` of the returned :class:`ImageContext`.
        """
        t0 = time.perf_counter()
        gray, ga = self._take_whole_image(image)  # validates the image first
        h, w = gray.shape
        if detection_ids is not None and len(detection_ids) != len(regions):
            raise EchoInputError(
                f"detection_ids has {len(detection_ids)} entries but there are {len(regions)} regions; "
                "give one id (or None) per region"
            )
        spacing = _check_spacing(pixel_spacing_mm)
        glob = _global_descriptors(ga, organ, spacing, self.thresholds)
        dset = self._descriptor_set(organ)
        descs: list[RegionDescription] = []
        for i, raw in enumerate(regions):
            box = _as_box(raw)
            if box.intersection(Box(x1=0, y1=0, x2=w, y2=h)) <= 0:
                raise EchoInputError(
                    f"region {i} {box.to_list()} lies outside the {w}x{h} image; give boxes in pixel "
                    "coordinates of the original image"
                )
            kidney = organ == "kidney"
            f, ra = self._take_region(image, box, spacing, kidney) or self._region_features(
                gray, ga.fov_mask, box, None, spacing, kidney=kidney)
            if dset is not None:
                d = self.describe_with_set(dset, ra, spacing)
                caption_text = dset.caption(d)
            else:
                d = self.describe_region(f, organ, spacing, ra.segmentation)
                caption_text = region_caption(organ, d)
            descs.append(
                RegionDescription(
                    box=box,
                    detection_id=None if detection_ids is None else detection_ids[i],
                    descriptors=d,
                    caption=caption_text,
                )
            )
        caption = _image_caption(organ, glob, descs)
        return ImageContext(
            id=evidence_id,
            organ=organ,
            image_width=w,
            image_height=h,
            global_descriptors=glob,
            regions=descs,
            caption=caption,
            captioner=self.name,
            elapsed_ms=(time.perf_counter() - t0) * 1000.0,
        )


def _with_size_and_segmentation(
    d: dict[str, Descriptor], f: Mapping[str, float], spacing: tuple[float, float] | None, segmentation: str
) -> dict[str, Descriptor]:
    """Add the size descriptors and the segmentation note every organ's regions carry."""
    if spacing is not None:
        d["size_mm"] = Descriptor(value=round(f["long_axis"], 1), unit="mm", note="long axis of the segmented region")
        d["size_short_mm"] = Descriptor(value=round(f["short_axis"], 1), unit="mm", note="short axis")
    else:
        d["size_px"] = Descriptor(value=round(f["long_axis"], 1), unit="px", note="long axis; pixel spacing unknown")
        d["size_short_px"] = Descriptor(value=round(f["short_axis"], 1), unit="px", note="short axis")
    if segmentation == "ellipse":
        # the lesion could not be separated from its surroundings: every shape call is weaker
        for k in ("shape", "orientation", "margin", "margin_circumscribed"):
            if k in d:
                d[k] = d[k].model_copy(update={"confidence": d[k].confidence * 0.5})
    d["segmentation"] = Descriptor(
        value=segmentation,
        confidence=1.0,
        note="dark/bright: threshold segmentation; ellipse: fallback to the box's inscribed ellipse",
    )
    return d


def _region_key(image: np.ndarray, box: Box, spacing: tuple[float, float] | None, kidney: bool) -> tuple[Any, ...]:
    """What a prefetched region analysis is kept under: the array object, the box, the spacing and
    whether the kidney features are computed (see :meth:`PixelCaptioner.prefetch_regions`)."""
    return (id(image), tuple(box.to_list()), spacing, kidney)


def _whole_image(image: np.ndarray) -> tuple[np.ndarray, _d.GlobalAnalysis]:
    gray = _d.to_gray(image)
    return gray, _d.analyse_image(image, gray)


def _image_caption(organ: str | None, glob: Mapping[str, Descriptor], regions: Sequence[RegionDescription]) -> str:
    geo = glob["fov_geometry"].value
    quality = []
    if glob["contrast"].value == "low":
        quality.append("low contrast")
    if glob["gain_saturation"].note == "over-gained":
        quality.append("saturated gain")
    if glob["annotations"].value == "present":
        quality.append("burned-in annotations")
    qtxt = ", ".join(quality) if quality else "adequate contrast"
    first = f"{geo.capitalize()} field of view, {qtxt}"
    if "depth_mm" in glob:
        first += f", depth {glob['depth_mm'].value:.0f} mm"
    first += "."
    if not regions:
        return first + " No regions described."
    if len(regions) == 1:
        return f"{first} {regions[0].caption}"
    return f"{first} {len(regions)} regions described; first: {regions[0].caption}"


def _as_box(raw: Box | Sequence[float]) -> Box:
    if isinstance(raw, Box):
        return raw
    try:
        return Box.from_xyxy(list(raw))
    except (TypeError, ValueError) as exc:
        raise EchoInputError(f"region {raw!r} is not a pixel box [x1, y1, x2, y2]: {exc}") from exc


def _check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    try:
        dy, dx = (float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise EchoInputError(f"pixel_spacing_mm must be two numbers (row, column) in mm, got {spacing!r}") from exc
    if not (dy > 0 and dx > 0 and math.isfinite(dy) and math.isfinite(dx)):
        raise EchoInputError(f"pixel_spacing_mm must be positive finite numbers, got {spacing!r}")
    return dy, dx


__all__ = ["PixelCaptioner", "load_thresholds", "region_caption"]
