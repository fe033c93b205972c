"""The resources behind the tools: detectors, captioner, retriever and the image store.

Everything expensive is created lazily on first use, so building a graph is cheap and a tool that
is never called never loads its model.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..detectors.base import PinnedValues
from ..imaging.store import ImageStore, default_store
from ..organs import OrganSpec, get_organ
from ..schemas import (
    Box,
    ClassificationResult,
    Detection,
    ImageContext,
    KnowledgeResult,
    RegionClassification,
)


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns an image and candidate boxes into an :class:`ImageContext`."""

    name: str

    def describe(
        self,
        image: np.ndarray,
        *,
        organ: str | None,
        regions: Sequence[Box] = (),
        detection_ids: Sequence[str | None] | None = None,
        pixel_spacing_mm: tuple[float, float] | None = None,
        evidence_id: str = "desc",
    ) -> ImageContext: ...


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a query with cited knowledge snippets."""

    name: str

    def retrieve(self, query: str, *, organ: str | None = None, k: int = 3, evidence_id: str = "kb") -> KnowledgeResult: ...


@dataclass
class Toolkit:
    """Resources shared by the tools of one graph.

    Args:
        detectors: per-organ detector overrides (``{"breast": my_detector}``); organs without one use
            the packaged weights (``echo_agent.detectors.get_detector``).
        classifiers: per-organ second-look region classifier overrides (any
            :class:`~echo_agent.detectors.RegionClassifier`, or ``None`` to give the organ no
            classify tool); organs without an entry use their ``classifier_weights``, and organs
            with neither get no classify tool.
        captioner: the global-context captioner (default: the pixel captioner).
        retriever: the knowledge retriever (default: BM25 over the packaged knowledge base).
        store: where images live (default: the process-wide in-memory store).
        preprocess: crop to the ultrasound field of view and mask burned-in annotations before
            detection (the same preprocessing the detectors were trained with).
        render_overlays: draw the detector's boxes into an overlay image (tool artifact).
        prefetch_context: when the detector tool starts on an image, start the captioner's
            whole-image analysis of it in a background thread (captioners with a ``prefetch``
            method, like the default one), so it overlaps the detector's forward passes; the
            descriptors are unchanged. Turn it off for reasoners that rarely call ``describe_image``.
        speculative_recheck: when the detector tool first looks at a whole image without test-time
            augmentation, start the mirrored view's forward pass in a background thread (detectors
            with ``prefetch_in_background``, like the ONNX one), so it shares the cores with the
            first pass; the re-check with test-time augmentation then costs no forward pass of its
            own. Only while such re-checks are the rule for the organ: the toolkit counts how often
            a first look was followed by one (the embedded policy re-checks 93-100 % of breast
            images, whose first looks are weak; hydronephrosis frames rarely need it) and stops
            speculating when fewer than half of the last :attr:`RecheckRate.window` were.
            Detections are the same either way.
        describe_ahead: when the second-look tool runs, also start the captioner's analysis of the
            latest detector call's top ``describe_ahead`` candidates in its background thread
            (captioners with ``prefetch_regions``, with ``prefetch_context`` on), so it overlaps
            the classifier's forward pass: the embedded policy describes exactly those next. The
            descriptors are the same either way; 0 turns it off.

    The toolkit also remembers the preprocessed detector input of the last few images
    (:meth:`prepared`), keyed by the image's content id: a re-check of the same image reuses it.
    """

    detectors: dict[str, Any] = field(default_factory=dict)
    classifiers: dict[str, Any | None] = field(default_factory=dict)
    captioner: Captioner | None = None
    retriever: Retriever | None = None
    store: ImageStore | None = None
    preprocess: bool = True
    render_overlays: bool = True
    prefetch_context: bool = True
    speculative_recheck: bool = True
    describe_ahead: int = 3
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _prepared: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict, repr=False, compare=False)
    _prepared_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _pinned_prepared: PinnedValues = field(default_factory=PinnedValues, repr=False, compare=False)
    _recheck_rates: dict[str, RecheckRate] = field(default_factory=dict, repr=False, compare=False)

    #: How many preprocessed detector inputs :meth:`prepared` keeps.
    prepared_capacity = 32

    def get_store(self) -> ImageStore:
        if self.store is None:
            self.store = default_store()
        return self.store

    def detector(self, organ: str) -> Any:
        """The organ's detector (loaded on first use)."""
        det = self.detectors.get(organ)
        if det is None:
            from ..detectors import get_detector

            det = get_detector(organ)
        return det

    def classifier(self, organ: OrganSpec | str) -> Any:
        """The organ's second-look region classifier (loaded on first use)."""
        name = organ if isinstance(organ, str) else organ.name
        if name in self.classifiers:
            clf = self.classifiers[name]
            if clf is None:
                from ..errors import ModelLoadError

                raise ModelLoadError(f"the second-look classifier of {name!r} is switched off in this toolkit")
            return clf
        from ..detectors import get_region_classifier

        return get_region_classifier(organ)

    def has_classifier(self, organ: OrganSpec) -> bool:
        """Whether ``organ`` has a region classifier (an override, or weights that exist)."""
        if organ.name in self.classifiers:
            return self.classifiers[organ.name] is not None
        path = organ.resolve_classifier_weights()
        return path is not None and path.is_file()

    def prepared(self, image_id: str, view: np.ndarray, region: tuple[int, int, int, int] | None = None) -> Any:
        """``prepare_for_detection(view)``, remembered under ``(image_id, region)``.

        ``image_id`` must be the content id of the stored image (an :class:`ImageRef`'s ``id``) and
        ``region`` the integer crop of it that ``view`` is, so equal keys mean equal pixels. The
        returned arrays are read-only: they are shared by later calls.
        """
        from ..imaging.preprocess import prepare_for_detection

        key = (image_id, region)
        hit = self._pinned_prepared.get(key)
        if hit is not None:
            return hit
        with self._prepared_lock:
            hit = self._prepared.get(key)
            if hit is not None:
                self._prepared.move_to_end(key)
                return hit
        prepared = prepare_for_detection(view)
        for arr in (prepared.array, prepared.fov_mask, prepared.annotation_mask):
            arr.setflags(write=False)
        with self._prepared_lock:
            self._prepared[key] = prepared
            while len(self._prepared) > self.prepared_capacity:
                self._prepared.popitem(last=False)
        return prepared

    def clear_caches(self) -> None:
        """Forget remembered detector inputs and the organ detectors' cached network outputs (for
        benchmarks that time the same image repeatedly)."""
        from ..organs import list_organs

        with self._prepared_lock:
            self._prepared.clear()
        for spec in list_organs():
            try:
                det = self.detector(spec.name)
            except Exception:  # an organ without weights has nothing cached
                continue
            clear = getattr(det, "clear_cache", None)
            if clear is not None:
                clear()

    @contextmanager
    def prefetched(self, organ: str, image_ids: Sequence[str]) -> Iterator[None]:
        """Within the block, the detector tool's first call on each of these stored images costs no
        forward pass of its own: their inputs are prepared exactly as that call will prepare them
        (whole image, :meth:`prepared`) and run through ``organ``'s detector in one batched pass,
        and both are held until the block ends, whatever the cache sizes and however many images
        run meanwhile. Detectors without ``pin`` / ``unpin`` (e.g. ultralytics) simply run as
        usual. Results are the same either way.

            with toolkit.prefetched("breast", [ref["id"] for ref in refs]):
                for ref in refs: graph.invoke({"image": ref, "organ": "breast"})
        """
        det = self.detector(organ)
        pin, unpin = getattr(det, "pin", None), getattr(det, "unpin", None)
        if pin is None or unpin is None or not image_ids:
            yield
            return
        store = self.get_store()
        held: list[tuple[str, None]] = []
        pins: list[Any] = []
        try:  # whatever fails (a missing image, the forward pass), nothing stays pinned
            views = []
            for image_id in image_ids:
                image = store.get(image_id)
                if self.preprocess:
                    prep = self.prepared(image_id, image)
                    self._pinned_prepared.pin((image_id, None), prep)
                    held.append((image_id, None))
                    views.append(prep.array)
                else:
                    views.append(image)
            pins = pin(views)
            yield
        finally:
            unpin(pins)
            for key in held:
                self._pinned_prepared.unpin(key)

    def prefetch_detections(self, organ: str, image_ids: Sequence[str]) -> None:
        """Deprecated: warms the detector's output cache only (correct while the cache holds the
        images until they run); use the :meth:`prefetched` block, which holds them explicitly."""
        import warnings

        warnings.warn("Toolkit.prefetch_detections is deprecated; use 'with toolkit.prefetched(organ, ids):'",
                      DeprecationWarning, stacklevel=2)
        det = self.detector(organ)
        prefetch = getattr(det, "prefetch", None)
        if prefetch is None or not image_ids:
            return
        store = self.get_store()
        views = []
        for image_id in image_ids:
            image = store.get(image_id)
            views.append(self.prepared(image_id, image).array if self.preprocess else image)
        prefetch(views)

    def prefetch_image_context(self, image: np.ndarray) -> None:
        """Start the captioner's whole-image analysis of a stored (read-only) image ahead of its
        ``describe`` call, where the captioner supports it and ``prefetch_context`` is on."""
        if not self.prefetch_context:
            return
        prefetch = getattr(self.get_captioner(), "prefetch", None)
        if prefetch is not None:
            prefetch(image)

    def recheck_rate(self, organ: str) -> RecheckRate:
        """How often the detector tool's whole-image first looks of ``organ`` were re-checked with
        test-time augmentation (see ``speculative_recheck``)."""
        with self._lock:
            return self._recheck_rates.setdefault(organ, RecheckRate())

    def note_detection(self, organ: str, image_id: str, image: np.ndarray, *, tta: bool, region: bool) -> None:
        """Count a detector tool call on the stored image ``image_id`` (``image``) for
        :meth:`recheck_rate` and, on a whole-image first look, start the speculative re-check when
        re-checks are the rule (``speculative_recheck``)."""
        if region:
            return
        rate = self.recheck_rate(organ)
        if tta:
            rate.rechecked(image_id)
        elif rate.first_look(image_id) and self.speculative_recheck:
            self.speculate_recheck(organ, image_id, image)

    def speculate_recheck(self, organ: str, image_id: str, image: np.ndarray) -> None:
        """Start the forward pass of the mirrored detector view of a stored image in the background,
        prepared exactly as a test-time-augmented detector call on the whole image will prepare it;
        a no-op for detectors that cannot do it."""
        det = self.detector(organ)
        start = getattr(det, "prefetch_in_background", None)
        if start is None:
            return
        import cv2

        view = self.prepared(image_id, image).array if self.preprocess else image
        start(cv2.flip(view, 1))  # the bytes LetterboxYoloDetector.detect_batch mirrors for TTA

    def prefetch_region_context(self, image: np.ndarray, evidence: Sequence[Any], *, organ: str | None,
                                pixel_spacing_mm: tuple[float, float] | None = None) -> None:
        """Start the captioner's analysis of the latest detector call's top candidates of a stored
        (read-only) image (see ``describe_ahead``)."""
        if not self.prefetch_context or self.describe_ahead <= 0:
            return
        start = getattr(self.get_captioner(), "prefetch_regions", None)
        reports = [e for e in evidence if isinstance(e, dict) and e.get("kind") == "detections"]
        if start is None or not reports:
            return
        from ..schemas import DetectorReport

        latest = DetectorReport.model_validate(reports[-1])
        top = sorted(latest.detections, key=lambda d: -d.score)[: self.describe_ahead]
        if top:
            start(image, [d.box for d in top], organ=organ, pixel_spacing_mm=pixel_spacing_mm)

    def get_captioner(self) -> Captioner:
        with self._lock:
            if self.captioner is None:
                from ..evidence.captioner import PixelCaptioner

                self.captioner = PixelCaptioner()
            return self.captioner

    def get_retriever(self) -> Retriever:
        with self._lock:
            if self.retriever is None:
                from ..evidence.knowledge import get_retriever

                self.retriever = get_retriever()
            return self.retriever


class RecheckRate:
    """The share of an organ's whole-image first looks that a re-check with test-time augmentation
    followed, over the last :attr:`window` first looks (thread-safe).

    A first look stays open until its image is re-checked (counted as re-checked), or looked at
    first again, or :attr:`open_limit` newer first looks have come (counted as not re-checked), so
    runs that overlap in a batch are counted too.

    >>> r = RecheckRate()
    >>> r.first_look("a"), r.rechecked("a"), r.share
    (True, None, 1.0)
    """

    window = 32
    open_limit = 4

    def __init__(self) -> None:
        self._open: OrderedDict[str, None] = OrderedDict()
        self._outcomes: deque[bool] = deque(maxlen=self.window)
        self._lock = threading.Lock()

    @property
    def share(self) -> float | None:
        """Re-checked share of the closed first looks in the window (``None`` before the first)."""
        with self._lock:
            return sum(self._outcomes) / len(self._outcomes) if self._outcomes else None

    def first_look(self, image_id: str) -> bool:
        """Open a first look of ``image_id``; whether a re-check is likely (no outcome yet, or at
        least half of the window re-checked)."""
        with self._lock:
            if image_id in self._open:  # looked at again without a re-check in between
                del self._open[image_id]
                self._outcomes.append(False)
            self._open[image_id] = None
            while len(self._open) > self.open_limit:
                self._open.popitem(last=False)
                self._outcomes.append(False)
            n = len(self._outcomes)
            return n == 0 or 2 * sum(self._outcomes) >= n

    def rechecked(self, image_id: str) -> None:
        """Close the open first look of ``image_id`` (if any) as re-checked."""
        with self._lock:
            if image_id in self._open:
                del self._open[image_id]
                self._outcomes.append(True)


def run_detector(
    organ: OrganSpec | str,
    image: np.ndarray,
    *,
    detector: Any,
    score_threshold: float = 0.25,
    tta: bool = False,
    region: Box | None = None,
    preprocess: bool = True,
    prepare: Callable[[np.ndarray, tuple[int, int, int, int] | None], Any] | None = None,
) -> list[Detection]:
    """Run a detector the way the agent does, returning boxes in ``image`` pixel coordinates.

    This is the single detection path shared by the agent's tool and the detector-only baseline of
    the evaluation harness, so the two see exactly the same pixels. ``region`` restricts detection
    to a box (the image is cropped to it, the boxes are mapped back). ``prepare(view, crop)``
    replaces ``prepare_for_detection(view)`` (e.g. :meth:`Toolkit.prepared`, which remembers it);
    ``crop`` is the integer ``(x0, y0, x1, y1)`` of ``view`` in ``image``, or None for the whole image.
    """
    spec = get_organ(organ) if isinstance(organ, str) else organ
    h, w = image.shape[:2]
    x0 = y0 = 0
    view = image
    crop = None
    if region is not None:
        r = region.clip(w, h)
        x0, y0 = int(np.floor(r.x1)), int(np.floor(r.y1))
        x1, y1 = max(int(np.ceil(r.x2)), x0 + 1), max(int(np.ceil(r.y2)), y0 + 1)
        view = image[y0:y1, x0:x1]
        crop = (x0, y0, x1, y1)
    prepared = None
    if preprocess:
        if prepare is not None:
            prepared = prepare(view, crop)
        else:
            from ..imaging.preprocess import prepare_for_detection

            prepared = prepare_for_detection(view)
        view = prepared.array
    dets = detector.detect(view, score_threshold=score_threshold, tta=tta)
    out: list[Detection] = []
    for d in dets:
        box = prepared.to_original(d.box) if prepared is not None else d.box
        if x0 or y0:
            box = Box(x1=box.x1 + x0, y1=box.y1 + y0, x2=box.x2 + x0, y2=box.y2 + y0)
        try:
            box = box.clip(w, h)
        except ValueError:
            continue  # entirely outside the image after mapping back
        if d.label not in spec.detector_labels:
            raise ValueError(
                f"the {spec.name} detector emitted label {d.label!r}, which is not one of the organ's "
                f"detector_labels {spec.detector_labels}; fix the weights' class names or the OrganSpec"
            )
        out.append(d.model_copy(update={"box": box}))
    out.sort(key=lambda d: -d.score)
    if spec.detector_agnostic_nms:
        out = merge_across_classes(out)
    return out


def run_classifier(
    organ: OrganSpec,
    image: np.ndarray,
    boxes: Sequence[Box | None],
    *,
    classifier: Any,
    preprocess: bool = True,
    prepare: Callable[[np.ndarray, tuple[int, int, int, int] | None], Any] | None = None,
) -> list[dict[str, float]]:
    """Run a second-look classifier the way the agent does: on the detector's preprocessed view
    (field-of-view crop, annotations masked; ``prepare`` as in :func:`run_detector`), boxes in
    ``image`` pixels (``None`` = whole image). Shared by the tool and the GRPO environment.

    Returns probabilities over the organ's image labels (a category head's output summed per label,
    see :meth:`OrganSpec.split_classifier_output`; :func:`classify_regions` keeps the categories).
    Raises :class:`~echo_agent.errors.ModelLoadError` when the classifier's labels are not
    :attr:`OrganSpec.classifier_labels`."""
    rows = _classifier_rows(organ, image, boxes, classifier=classifier, preprocess=preprocess, prepare=prepare)
    return [organ.split_classifier_output(r)[0] for r in rows]


def _classifier_rows(
    organ: OrganSpec,
    image: np.ndarray,
    boxes: Sequence[Box | None],
    *,
    classifier: Any,
    preprocess: bool,
    prepare: Callable[[np.ndarray, tuple[int, int, int, int] | None], Any] | None,
) -> list[dict[str, float]]:
    """The classifier's own output rows (see :func:`run_classifier`)."""
    from ..errors import ModelLoadError

    if tuple(classifier.labels) != tuple(organ.classifier_labels):
        what = "category head labels" if organ.category_source == "classifier" else "image labels"
        raise ModelLoadError(
            f"the {organ.name} region classifier has labels {tuple(classifier.labels)}, the organ's {what} are "
            f"{organ.classifier_labels}; retrain it with the organ's labels"
        )
    if not preprocess:
        return classifier.classify(image, list(boxes))
    if prepare is not None:
        prepared = prepare(image, None)
    else:
        from ..imaging.preprocess import prepare_for_detection

        prepared = prepare_for_detection(image)
    h, w = image.shape[:2]
    mapped: list[Box | None] = []
    for b in boxes:
        try:
            mapped.append(prepared.from_original(b) if b is not None else None)
        except ValueError:  # outside the field of view: judge the blank region as it is
            mapped.append(b.clip(w, h) if b is not None else None)
    return classifier.classify(prepared.array, mapped)


def classify_regions(
    organ: OrganSpec,
    image: np.ndarray,
    boxes: Sequence[Box],
    detection_ids: Sequence[str] | None = None,
    *,
    whole_image: bool = True,
    classifier: Any,
    evidence_id: str,
    preprocess: bool = True,
    prepare: Callable[[np.ndarray, tuple[int, int, int, int] | None], Any] | None = None,
) -> ClassificationResult:
    """One second-look call as typed evidence: ``boxes`` (pixels of ``image``) and, with
    ``whole_image``, the whole image, through :func:`run_classifier`. Shared by the graph tool and
    the GRPO environment, so both check and answer alike.

    Raises :class:`~echo_agent.errors.EchoInputError` when there is nothing to classify or
    ``detection_ids`` does not give one id per box."""
    from ..errors import EchoInputError

    if detection_ids is not None and len(detection_ids) != len(boxes):
        raise EchoInputError(
            f"detection_ids has {len(detection_ids)} entries but regions has {len(boxes)}; give one id per region"
        )
    if not boxes and not whole_image:
        raise EchoInputError("nothing to classify: give regions or whole_image=true")
    targets: list[Box | None] = [*boxes, None] if whole_image else list(boxes)
    ids: list[str | None] = [*(detection_ids or [None] * len(boxes)), *([None] if whole_image else [])]
    t0 = time.perf_counter()
    rows = _classifier_rows(organ, image, targets, classifier=classifier, preprocess=preprocess, prepare=prepare)
    split = [organ.split_classifier_output(r) for r in rows]
    h, w = image.shape[:2]
    return ClassificationResult(
        id=evidence_id, organ=organ.name, classifier=str(getattr(classifier, "name", type(classifier).__name__)),
        regions=[RegionClassification(box=b, detection_id=i, probabilities=p, categories=c)
                 for b, i, (p, c) in zip(targets, ids, split, strict=True)],
        image_width=w, image_height=h, elapsed_ms=round((time.perf_counter() - t0) * 1000, 2),
    )


def merge_across_classes(detections: list[Detection], iou_threshold: float = 0.5) -> list[Detection]:
    """Class-agnostic suppression that keeps what it suppresses as ``class_scores``.

    Greedy by descending score: a candidate overlapping an already kept one by IoU above
    ``iou_threshold`` is dropped, whatever its class, and its score becomes that class's entry in the
    kept candidate's ``class_scores`` (best score per class; the kept label's own score included).
    Candidates that absorbed nothing are returned unchanged. Order: descending score.

    >>> from echo_agent.schemas import Box
    >>> a = Detection(box=Box(x1=0, y1=0, x2=10, y2=10), label="benign", score=0.6)
    >>> b = Detection(box=Box(x1=1, y1=0, x2=10, y2=10), label="malignant", score=0.4)
    >>> [(d.label, d.class_scores) for d in merge_across_classes([a, b])]
    [('benign', {'benign': 0.6, 'malignant': 0.4})]
    """
    kept: list[Detection] = []
    absorbed: list[dict[str, float]] = []
    for d in sorted(detections, key=lambda d: -d.score):
        for i, k in enumerate(kept):
            if k.box.iou(d.box) > iou_threshold:
                scores = absorbed[i]
                scores[d.label] = max(scores.get(d.label, 0.0), d.score)
                break
        else:
            kept.append(d)
            absorbed.append({d.label: d.score})
    return [
        k if len(scores) == 1 else k.model_copy(update={"class_scores": scores})
        for k, scores in zip(kept, absorbed, strict=True)
    ]
