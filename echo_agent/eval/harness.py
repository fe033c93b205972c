"""The evaluation harness: detector-only baseline vs the full agent on every image of a manifest.

:func:`evaluate` runs both systems image by image, never losing an image because one system failed
on it (the error is recorded and the run goes on), and writes into ``out_dir``:

``metrics.json``
    Every metric of both systems, per organ, overall and per center (see ``docs/metrics.md``).
``predictions.jsonl``
    One line per image: key, truth, the detector-only prediction, the agent's Diagnosis JSON, timings
    and any error. Written as the run goes, so a crash keeps what was done.
``report.md`` and ``plots/*.png``
    Tables and figures (confusion matrices, per-class accuracy bars, reliability diagram).

:func:`eval_command` is what ``echo-agent eval MANIFEST.csv --out DIR`` calls.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import EchoError, EchoInputError, MissingExtraError
from ..organs import OrganSpec, get_organ
from ..schemas import Detection, Diagnosis
from .manifest import IMAGE_LEVEL_FIELDS, ManifestImage, column_values, load_manifest
from .metrics import (
    IOU_THRESHOLD,
    PredictedBox,
    ScoredImage,
    SystemMetrics,
    category_agreement,
    coarse_categories,
    compute_metrics,
    normalise_category,
)

#: Names of the two systems, as used in metrics.json, predictions.jsonl and the report.
DETECTOR = "detector"
AGENT = "agent"
SYSTEMS = (DETECTOR, AGENT)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
#: Version tag of the files written by the harness.
SCHEMA = "echo-agent-eval/1"


class AgentLike(Protocol):
    """What the harness needs of an agent (``echo_agent.EchoAgent`` satisfies it)."""

    def run(self, image: Any, *, organ: str | None = ..., context: Any = ...) -> Diagnosis: ...


class DetectorLike(Protocol):
    """What the harness needs of a detector (``echo_agent.detectors.Detector`` satisfies it)."""

    def detect(self, image: np.ndarray, *, score_threshold: float = ..., tta: bool = ...) -> list[Detection]: ...


@dataclass
class OrganMetrics:
    """Metrics of both systems for one organ: over all its images, per center and, when
    ``evaluate(by=...)`` named a column, per value of that column (``groups``)."""

    organ: str
    labels: tuple[str, ...]
    positive_label: str | None
    overall: dict[str, SystemMetrics]
    centers: dict[str, dict[str, SystemMetrics]]
    by: str | None = None
    groups: dict[str, dict[str, SystemMetrics]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "labels": list(self.labels),
            "positive_label": self.positive_label,
            "overall": {s: m.to_dict() for s, m in self.overall.items()},
            "centers": {c: {s: m.to_dict() for s, m in d.items()} for c, d in self.centers.items()},
        }
        if self.by is not None:
            out["by"] = {"column": self.by,
                         "groups": {g: {s: m.to_dict() for s, m in d.items()} for g, d in self.groups.items()}}
        return out


@dataclass
class EvalResult:
    """What :func:`evaluate` produced; ``metrics`` is keyed by organ name."""

    out_dir: Path
    n_images: int
    errors: dict[str, int]
    metrics: dict[str, OrganMetrics]
    metrics_path: Path
    predictions_path: Path
    report_path: Path
    plots: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """The canonical HxWx3 uint8 RGB array of an image file."""
    try:
        from ..imaging import load_image  # the library's validated loader (DICOM, limits, ...)
    except ImportError:  # pragma: no cover - the imaging loader is optional at this layer
        load_image = None
    if load_image is not None:
        return np.asarray(load_image(path).array)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise EchoInputError(f"output path {out_dir} is a file; give a folder for the evaluation results")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise EchoInputError(
            f"output folder {out_dir} is not empty; choose a new folder, or pass overwrite=True "
            f"(--overwrite) to replace the evaluation files in it"
        )


def _require_extras(plots: bool) -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("scikit-learn", "eval", "the evaluation metrics") from exc
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("matplotlib", "eval", "the evaluation plots") from exc


def select_images(
    images: Sequence[ManifestImage],
    *,
    organ: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[ManifestImage]:
    """Filter by organ and split; ``limit`` keeps a seeded random subset, in manifest order."""
    out = [im for im in images if (organ is None or im.organ == organ) and (split is None or im.split == split)]
    if limit is not None:
        if limit < 1:
            raise EchoInputError(f"limit must be a positive number of images, got {limit}")
        if limit < len(out):
            keep = sorted(random.Random(seed).sample(range(len(out)), limit))
            out = [out[i] for i in keep]
    return out


def _cluster(im: ManifestImage) -> str | None:
    # Bootstrap unit: the patient when known (coarsest), else the split group (clip, near-duplicates).
    unit = im.patient_id or im.group
    return f"{im.center or ''}|{unit}" if unit else None


def _error_record(exc: BaseException) -> dict[str, str]:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return {"type": type(exc).__name__, "message": str(exc), "where": where}


def detector_prediction(spec: OrganSpec, detections: Sequence[Detection]) -> dict[str, Any]:
    """The detector-only baseline's answer from the detections above threshold.

    Label: the image label of the highest-scoring detection, ``normal`` when there is none.
    Positive score (for the AUC): the highest score among detections whose image label is the organ's
    positive label, 0 when there is none.
    """
    boxes = [
        {"box": d.box.to_list(), "label": spec.image_label_for(d.label), "detector_label": d.label, "score": d.score}
        for d in sorted(detections, key=lambda d: -d.score)
    ]
    label = boxes[0]["label"] if boxes else spec.normal_label
    pos = None
    if spec.positive_label is not None:
        pos = max((b["score"] for b in boxes if b["label"] == spec.positive_label), default=0.0)
    return {"label": label, "positive_score": pos, "detections": boxes}


def _scored(
    im: ManifestImage, pred_label: str, boxes: Iterable[PredictedBox], probs: Mapping[str, float] | None,
    positive_score: float | None, **referral: Any,
) -> ScoredImage:
    return ScoredImage(
        key=im.key, true_label=im.label, true_boxes=tuple(im.boxes), pred_label=pred_label,
        pred_boxes=tuple(boxes), probabilities=probs, positive_score=positive_score, cluster=_cluster(im),
        **referral,
    )


def _from_box_dicts(items: Iterable[Mapping[str, Any]]) -> list[PredictedBox]:
    from ..schemas import Box

    return [PredictedBox(Box.from_xyxy(b["box"]), b["label"], float(b["score"])) for b in items]


# ---------------------------------------------------------------------------------------------------
# running the two systems
# ---------------------------------------------------------------------------------------------------
class _Baseline:
    """Runs the organ's detector through the agent's own detection path (preprocessing included)."""

    def __init__(self, agent: Any, detectors: Mapping[str, Any] | None, preprocess: bool | None,
                 score_threshold: float) -> None:
        toolkit = getattr(agent, "toolkit", None)
        if toolkit is None or not hasattr(toolkit, "detector"):
            from ..tools.toolkit import Toolkit

            toolkit = Toolkit()
        self.toolkit = toolkit
        self.overrides = dict(detectors or {})
        self.preprocess = getattr(toolkit, "preprocess", True) if preprocess is None else preprocess
        self.score_threshold = score_threshold
        self._cache: dict[str, Any] = {}

    def detector(self, organ: str) -> Any:
        if organ not in self._cache:
            try:
                self._cache[organ] = self.overrides.get(organ) or self.toolkit.detector(organ)
            except Exception as exc:  # remembered: a missing model fails every image the same way
                self._cache[organ] = exc
        det = self._cache[organ]
        if isinstance(det, Exception):
            raise det
        return det

    def __call__(self, spec: OrganSpec, image: np.ndarray) -> list[Detection]:
        from ..tools.toolkit import run_detector

        return run_detector(
            spec, image, detector=self.detector(spec.name), score_threshold=self.score_threshold,
            tta=False, preprocess=self.preprocess,
        )


def _run_item(
    im: ManifestImage, spec: OrganSpec, baseline: Callable[[OrganSpec, np.ndarray], list[Detection]],
    agent: AgentLike,
) -> tuple[dict[str, Any], dict[str, ScoredImage]]:
    record: dict[str, Any] = {
        "key": im.key, "image": str(im.image), "organ": im.organ, "center": im.center, "split": im.split,
        "truth": {"label": im.label, "boxes": [b.to_list() for b in im.boxes], "category": im.category},
    }
    scored: dict[str, ScoredImage] = {}

    t0 = time.perf_counter()
    try:
        dets = baseline(spec, read_image(im.image))
        pred = detector_prediction(spec, dets)
        record[DETECTOR] = {**pred, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2), "error": None}
        scored[DETECTOR] = _scored(im, pred["label"], _from_box_dicts(pred["detections"]), None, pred["positive_score"])
    except Exception as exc:  # never lose the image: record why and go on
        record[DETECTOR] = {"elapsed_ms": round((time.perf_counter() - t0) * 1000, 2), "error": _error_record(exc)}

    t0 = time.perf_counter()
    try:
        dx = agent.run(im.image, organ=im.organ, context=im.clinical_context)
        elapsed = round((time.perf_counter() - t0) * 1000, 2)
        if not isinstance(dx, Diagnosis):
            raise TypeError(f"the agent returned {type(dx).__name__}, not a Diagnosis")
        record[AGENT] = {"diagnosis": json.loads(dx.to_json()), "elapsed_ms": elapsed, "error": None}
        if dx.label not in spec.image_labels:
            raise ValueError(f"the agent's label {dx.label!r} is not one of the {spec.name} labels {spec.image_labels}")
        boxes = [PredictedBox(f.box, spec.image_label_for(f.label), f.score) for f in dx.findings]
        probs = {lbl: float(dx.probabilities.get(lbl, 0.0)) for lbl in spec.image_labels}
        pos = probs[spec.positive_label] if spec.positive_label else None
        scored[AGENT] = _scored(im, dx.label, boxes, probs, pos, indeterminate=bool(dx.indeterminate),
                                indeterminate_reason=dx.indeterminate_reason)
    except Exception as exc:
        rec = record.get(AGENT) or {"elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}
        rec["error"] = _error_record(exc)
        record[AGENT] = rec
    return record, scored


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), disable=not enabled, transient=False,
    )


# ---------------------------------------------------------------------------------------------------
# the public entry points
# ---------------------------------------------------------------------------------------------------
def evaluate(
    manifest: str | Path | Sequence[ManifestImage],
    *,
    agent: AgentLike | None = None,
    out_dir: str | Path,
    organ: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    score_threshold: float = 0.25,
    iou_threshold: float = IOU_THRESHOLD,
    overwrite: bool = False,
    plots: bool = True,
    detectors: Mapping[str, DetectorLike] | None = None,
    preprocess: bool | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    command: str | None = None,
    by: str | None = None,
) -> EvalResult:
    """Run the detector-only baseline and the agent on every image; write metrics, predictions, report.

    Args:
        manifest: a manifest CSV path, or already loaded :class:`ManifestImage` items.
        agent: the agent to evaluate (default: ``EchoAgent()`` with the packaged models).
        out_dir: where to write; must be empty or new unless ``overwrite``.
        organ, split: evaluate only images of this organ / split.
        limit: evaluate a seeded random subset of this many images (for quick checks).
        score_threshold: detection threshold of the baseline (the agent's tools choose their own).
        detectors: per-organ detector overrides for the baseline (default: the agent's toolkit's).
        preprocess: override the baseline's preprocessing (default: the agent's toolkit setting, so the
            baseline sees the same pixels as the agent's detect tool).
        n_boot, seed: bootstrap resamples and seed of the confidence intervals.
        command: the command line to print in the report (default: an equivalent ``echo-agent eval``).
        by: also break every metric down by this manifest column, one of the image-level fields
            (``center``, ``split``, ``category`` ...) or any other column of the CSV (a scanner, an
            acquisition series), which must then be the same on every row of an image; needs the
            manifest's path for a column :class:`ManifestImage` does not hold. Empty cells count as
            ``unknown``. ``lesion_size`` (unless the CSV has such a column) groups images by their
            largest reference box's share of the image area (:data:`LESION_SIZE_BINS`; ``no box``).

    Returns:
        An :class:`EvalResult`. Raises :class:`~echo_agent.errors.EchoInputError` for a bad manifest or
        a non-empty ``out_dir``; per-image failures are recorded, never raised.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    _require_extras(plots)
    manifest_name = str(manifest) if isinstance(manifest, (str, Path)) else "<in-memory manifest>"
    items = load_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
    items = select_images(items, organ=organ, split=split, limit=limit, seed=seed)
    if not items:
        raise EchoInputError(
            f"no image of {manifest_name} matches organ={organ!r} split={split!r}; check the filters"
        )
    group_of = _group_values(manifest, items, by) if by is not None else None
    specs = {name: get_organ(name) for name in sorted({im.organ for im in items})}
    if agent is None:
        from ..agent import EchoAgent

        agent = EchoAgent.from_config()
    baseline = _Baseline(agent, detectors, preprocess, score_threshold)

    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS_FILE
    scored: dict[str, dict[str, list[tuple[ManifestImage, ScoredImage]]]] = {
        name: {s: [] for s in SYSTEMS} for name in specs
    }
    errors = dict.fromkeys(SYSTEMS, 0)
    error_examples: list[dict[str, Any]] = []
    timing: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    categories: dict[str, list[tuple[str, str | None]]] = {name: [] for name in specs}
    warnings = WarningTally()
    started = datetime.now(timezone.utc)
    with pred_path.open("w", encoding="utf-8") as fh, _progress(progress) as bar:
        task = bar.add_task("eval", total=len(items))
        for im in items:
            record, got = _run_item(im, specs[im.organ], baseline, agent)
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            dx = (record.get(AGENT) or {}).get("diagnosis") or {}
            warnings.add(dx.get("warnings") or ())
            if im.category:
                categories[im.organ].append((im.category, dx.get("category")))
            for s in SYSTEMS:
                if s in got:
                    scored[im.organ][s].append((im, got[s]))
                    timing[s].append(record[s]["elapsed_ms"])
                else:
                    errors[s] += 1
                    if len(error_examples) < 10:
                        error_examples.append({"key": im.key, "system": s, **record[s]["error"]})
            bar.advance(task)

    organ_metrics: dict[str, OrganMetrics] = {}
    for name, spec in specs.items():
        organ_metrics[name] = _organ_metrics(spec, scored[name], iou_threshold=iou_threshold, n_boot=n_boot, seed=seed,
                                             by=by, group_of=group_of)

    cmd = command or _default_command(manifest_name, out, organ, split, limit, score_threshold, by=by)
    summary = {
        "schema": SCHEMA,
        "manifest": manifest_name,
        "command": cmd,
        "filters": {"organ": organ, "split": split, "limit": limit, "seed": seed},
        **({"by": by} if by is not None else {}),
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
        "n_boot": n_boot,
        "n_images": len(items),
        "errors": errors,
        "error_examples": error_examples,
        "agent_warnings": warnings.most_common(),
        "timing_ms": {s: _timing(v) for s, v in timing.items()},
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "organs": {name: m.to_dict() for name, m in organ_metrics.items()},
    }
    for name, pairs in categories.items():
        agreement = _category_summary(specs[name], pairs)
        if agreement:
            summary["organs"][name]["category_agreement"] = agreement
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    plot_paths: list[Path] = []
    if plots:
        from .plots import write_plots

        plot_paths = write_plots(summary, out / PLOTS_DIR)
    from .report import render_report

    report_path = out / REPORT_FILE
    report_path.write_text(render_report(summary, plots=[p.relative_to(out) for p in plot_paths]), encoding="utf-8")
    return EvalResult(
        out_dir=out, n_images=len(items), errors=errors, metrics=organ_metrics, metrics_path=metrics_path,
        predictions_path=pred_path, report_path=report_path, plots=plot_paths, summary=summary,
    )


class WarningTally:
    """How many images each kind of agent warning was given on. Warnings that differ only in their
    numbers ("router p=0.75" / "p=0.61") count as one kind, shown by its first text."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._first: dict[str, str] = {}

    @staticmethod
    def kind(text: str) -> str:
        return re.sub(r"\d+(?:\.\d+)?", "#", text)

    def add(self, texts: Iterable[str]) -> None:
        seen: set[str] = set()
        for text in texts:
            key = self.kind(text)
            if key not in seen:  # once per image
                seen.add(key)
                self._counts[key] += 1
                self._first.setdefault(key, text)

    def most_common(self, n: int = 10) -> list[dict[str, Any]]:
        return [{"warning": self._first[k], "images": c} for k, c in self._counts.most_common(n)]


#: a warning given on at least this share of the images is printed after the table: a run-wide
#: condition (a learned fusion that stepped aside, a model that did not load) changes every number
WIDESPREAD_WARNING = 0.1


#: Breakdowns computed from the manifest rather than read from a column (a column of the same name wins).
DERIVED_FIELDS: tuple[str, ...] = ("lesion_size",)
#: ``lesion_size`` bins: the largest reference box's share of the image area, upper bounds.
LESION_SIZE_BINS: tuple[tuple[float, str], ...] = ((0.01, "a < 1 %"), (0.04, "b 1-4 %"), (0.16, "c 4-16 %"),
                                                   (float("inf"), "d >= 16 %"))


def _header(path: Path) -> list[str]:
    import csv

    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [h.strip() for h in next(csv.reader(fh), [])]


def lesion_size_group(im: ManifestImage, size: tuple[int, int]) -> str:
    """The ``lesion_size`` group of an image of ``size`` (width, height): its largest reference box's
    share of the image area in one of :data:`LESION_SIZE_BINS`, or ``no box``.

    >>> from echo_agent.schemas import Box
    >>> im = ManifestImage(image=Path("a.png"), organ="breast", label="benign", boxes=(Box(x1=0, y1=0, x2=20, y2=20),))
    >>> lesion_size_group(im, (100, 100)), lesion_size_group(im, (400, 400))
    ('c 4-16 %', 'a < 1 %')
    """
    if not im.boxes:
        return "no box"
    share = max((b.x2 - b.x1) * (b.y2 - b.y1) for b in im.boxes) / float(size[0] * size[1])
    return next(name for bound, name in LESION_SIZE_BINS if share < bound)


def _group_values(manifest: str | Path | Sequence[ManifestImage], items: Sequence[ManifestImage], by: str) -> dict[Path, str]:
    """Each image's value in column ``by`` (see ``evaluate(by=...)``); '' for an empty cell."""
    if by in DERIVED_FIELDS and not (isinstance(manifest, (str, Path)) and by in _header(Path(manifest))):
        from ..imaging.io import image_size

        return {im.image: lesion_size_group(im, image_size(im.image)) if im.boxes else "no box" for im in items}
    if by in IMAGE_LEVEL_FIELDS:
        return {im.image: "" if getattr(im, by) is None else str(getattr(im, by)) for im in items}
    if not isinstance(manifest, (str, Path)):
        raise EchoInputError(f"by={by!r} is not one of the image-level fields {list(IMAGE_LEVEL_FIELDS)} or "
                             f"{list(DERIVED_FIELDS)}; to break "
                             "results down by another column, pass the manifest's path so that column can be read")
    values = column_values(manifest, by)
    return {im.image: values.get(im.image, "") for im in items}


def _organ_metrics(
    spec: OrganSpec, by_system: Mapping[str, list[tuple[ManifestImage, ScoredImage]]], *,
    iou_threshold: float, n_boot: int, seed: int, by: str | None = None, group_of: Mapping[Path, str] | None = None,
) -> OrganMetrics:
    def metrics(rows: Sequence[ScoredImage]) -> SystemMetrics:
        return compute_metrics(
            rows, labels=spec.image_labels, positive_label=spec.positive_label, normal_label=spec.normal_label,
            iou_threshold=iou_threshold, n_boot=n_boot, seed=seed,
        )

    def breakdown(key: Callable[[ManifestImage], str | None]) -> dict[str, dict[str, SystemMetrics]]:
        names = sorted({key(im) or "unknown" for s in SYSTEMS for im, _ in by_system[s]})
        return {g: {s: metrics([x for im, x in by_system[s] if (key(im) or "unknown") == g]) for s in SYSTEMS}
                for g in names}

    overall = {s: metrics([x for _, x in by_system[s]]) for s in SYSTEMS}
    centers = breakdown(lambda im: im.center)
    groups = breakdown(lambda im: group_of.get(im.image)) if group_of is not None else {}
    return OrganMetrics(spec.name, spec.image_labels, spec.positive_label, overall, centers, by, groups)


def _category_summary(spec: OrganSpec, pairs: Sequence[tuple[str, str | None]]) -> dict[str, Any] | None:
    """The agent's categories against the readers' (images with a reader category only), with the
    majority-category baseline beside them; ``None`` when the organ has no categories or no image one.

    A coarse reader category (BI-RADS "4" where the scale has 4A-4C) is scored at its level; reader
    categories on no scale are counted in ``unscored`` (then the summary exists even with ``n`` 0)."""
    if not spec.categories or not pairs:
        return None
    order = spec.category_scale
    truth = [t for t, _ in pairs]
    a = category_agreement(truth, [p for _, p in pairs], order)
    if not a.n and not a.unscored:
        return None
    coarse = coarse_categories(order)
    counts = Counter(normalise_category(t) for t in truth)
    majority = max(a.reader_order, key=lambda c: (counts.get(c, 0), -a.reader_order.index(c)))
    answer = coarse[majority][len(coarse[majority]) // 2] if majority in coarse else majority  # 4 -> 4B
    base = category_agreement(truth, [answer] * len(truth), order)
    return {"system": spec.category_system, "n": a.n, "exact": a.exact, "within_one": a.within_one,
            "n_missing": a.n_missing, "order": list(a.order), "reader_order": list(a.reader_order),
            "confusion": [list(r) for r in a.confusion], "n_coarse": a.n_coarse,
            "unscored": dict(a.unscored),
            "majority_baseline": {"category": answer, "reader_category": majority, "exact": base.exact,
                                  "within_one": base.within_one}}


def _timing(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p95": None}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 2), "median": round(float(np.median(a)), 2),
            "p95": round(float(np.quantile(a, 0.95)), 2)}


def _default_command(
    manifest: str, out: Path, organ: str | None, split: str | None, limit: int | None,
    score_threshold: float = 0.25, extra: Sequence[str] = (), *, by: str | None = None,
) -> str:
    parts = ["echo-agent", "eval", manifest, "--out", str(out)]
    for flag, v in (("--organ", organ), ("--split", split), ("--limit", limit), ("--by", by)):
        if v is not None:
            parts += [flag, str(v)]
    if score_threshold != 0.25:
        parts += ["--score-threshold", str(score_threshold)]
    return shlex.join([*parts, *extra])


def eval_command(
    manifest: str | Path,
    out: str | Path,
    organ: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    *,
    agent: AgentLike | None = None,
    progress: bool = True,
    score_threshold: float = 0.25,
    console: Any = None,
    command: str | None = None,
    by: str | None = None,
) -> int:
    """``echo-agent eval MANIFEST.csv --out DIR``: run :func:`evaluate`, print a summary, return an exit code.

    ``command`` is the command line the report gives under "Reproduce" (default: an equivalent
    ``echo-agent eval`` built from the arguments above; pass the real one when a custom agent was used).

    Exit codes: 0 done; 1 the run finished but a system failed on every image; 2 bad input (manifest,
    output folder, missing extra).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    try:
        result = evaluate(
            manifest, agent=agent, out_dir=out, organ=organ, split=split, limit=limit,
            overwrite=overwrite, progress=progress, score_threshold=score_threshold, command=command, by=by,
        )
    except (EchoInputError, MissingExtraError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except EchoError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    console.print(summary_table(result.summary))
    console.print(f"wrote {result.metrics_path}, {result.predictions_path}, {result.report_path}"
                  + (f" and {len(result.plots)} plot(s)" if result.plots else ""))
    for w in result.summary.get("agent_warnings", []):
        if w["images"] >= WIDESPREAD_WARNING * result.n_images:
            console.print(f"[yellow]agent warning on {w['images']} of {result.n_images} images:[/] {w['warning']}")
    failed = [s for s in SYSTEMS if result.errors[s] == result.n_images]
    if failed:
        first = result.summary["error_examples"][0] if result.summary["error_examples"] else {}
        console.print(f"[red]{' and '.join(failed)} failed on every image[/]: {first.get('message', '')}")
        return 1
    if any(result.errors.values()):
        console.print(f"[yellow]errors:[/] {result.errors} (see {result.predictions_path.name})")
    return 0


def summary_table(summary: Mapping[str, Any]) -> Any:
    """A rich table of the headline metrics of both systems, one block per organ."""
    from rich.table import Table

    from .report import headline_rows

    table = Table(title=f"echo-agent eval: {summary['n_images']} image(s)")
    table.add_column("organ")
    table.add_column("metric")
    table.add_column("detector-only", justify="right")
    table.add_column("agent", justify="right")
    for organ, m in summary["organs"].items():
        for i, (name, det, ag) in enumerate(headline_rows(m["overall"], m.get("category_agreement"))):
            table.add_row(organ if i == 0 else "", name, det, ag)
        table.add_section()
    return table


__all__ = [
    "AGENT",
    "DETECTOR",
    "AgentLike",
    "DetectorLike",
    "EvalResult",
    "OrganMetrics",
    "detector_prediction",
    "eval_command",
    "evaluate",
    "read_image",
    "select_images",
    "summary_table",
]
