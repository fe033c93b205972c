"""Router heads: how an organ added by a plug-in gets its images routed to it.

The packaged organ router (:mod:`echo_agent.organs.routing`) knows breast, kidney and "unknown".
An organ spec may name a ``router_head`` that recognises its own organ against the others:

* a ``.json`` file written by ``tools/train_router.py --head ORGAN`` (the packaged router's
  hand-crafted features; classes ``[organ, "unknown"]``), or
* an ``.onnx`` whole-image classifier written by ``tools/train_router.py --head ORGAN --head-model
  efficientnet-lite0`` (pretrained EfficientNet-Lite0 features and a linear layer; labels
  ``[organ, "unknown"]`` and its acceptance threshold in the classifier metadata).

:func:`route_image` runs the packaged router, asks every head, and lets
:func:`~echo_agent.organs.routing.combine_heads` decide. ``EchoAgent`` uses :func:`default_router`
when no organ is given.
"""

from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ModelLoadError
from ..organs import list_organs
from ..organs.routing import OrganRouter, RoutingResult, combine_heads, extract_features, load_router
from .region_classifier import OnnxRegionClassifier


@runtime_checkable
class RouterHead(Protocol):
    """Says whether an image shows its organ: a :class:`RoutingResult` whose ``organ`` is the
    head's organ (accepted) or ``None`` (rejected)."""

    organ: str

    def decide(self, image: np.ndarray, features: tuple[np.ndarray, np.ndarray] | None = None) -> RoutingResult: ...


class JsonRouterHead:
    """A head in the packaged router's format (hand-crafted features, classes ``[organ, unknown]``)."""

    def __init__(self, router: OrganRouter, organ: str) -> None:
        if router.organs != (organ,):
            raise ModelLoadError(
                f"router head of organ {organ!r} recognises {router.organs}; a head recognises its own organ only "
                "(retrain it with tools/train_router.py --head)"
            )
        self.router, self.organ = router, organ

    def decide(self, image: np.ndarray, features: tuple[np.ndarray, np.ndarray] | None = None) -> RoutingResult:
        feats, thumb = features if features is not None else extract_features(image)
        return self.router.decide(self.router.probabilities_from_vectors(self.router.vector_from_features(feats, thumb))[0])


class OnnxRouterHead:
    """A head that classifies the whole image with an ONNX network (labels ``[organ, "unknown"]``,
    ``accept_threshold`` in its classifier metadata)."""

    def __init__(self, path: str | Path, organ: str) -> None:
        self.classifier = OnnxRegionClassifier(path, name=f"router-head:{organ}")
        labels = self.classifier.labels
        if labels != (organ, "unknown"):
            raise ModelLoadError(
                f"router head {path} has labels {labels}; a head of organ {organ!r} must have [{organ!r}, 'unknown'] "
                "(retrain it with tools/train_router.py --head)"
            )
        try:
            self.threshold = float(self.classifier.info["accept_threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"router head {path} has no numeric accept_threshold in its metadata") from exc
        self.organ = organ

    def decide(self, image: np.ndarray, features: tuple[np.ndarray, np.ndarray] | None = None) -> RoutingResult:
        p = float(self.classifier.classify(image, [None])[0][self.organ])
        scores = {self.organ: p, "unknown": 1.0 - p}
        if p >= self.threshold:
            return RoutingResult(self.organ, p, scores, f"routed to {self.organ} with p={p:.2f}")
        return RoutingResult(None, 1.0 - p, scores, f"not {self.organ} (p={p:.2f} < {self.threshold:.2f})")


_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _load(path: str, organ: str) -> RouterHead:
    if path.endswith(".onnx"):
        return OnnxRouterHead(path, organ)
    return JsonRouterHead(OrganRouter.from_file(path), organ)


def load_router_head(path: str | Path, organ: str) -> RouterHead:
    """The head stored at ``path`` (``.json`` or ``.onnx``) for ``organ``, loaded once and cached."""
    with _lock:
        return _load(str(Path(path).expanduser().resolve()), organ)


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def plugin_heads(base: OrganRouter) -> list[RouterHead]:
    """The heads of every registered organ that names one and that ``base`` does not know."""
    out = []
    for spec in list_organs():
        path = spec.resolve_router_head()
        if path is None or spec.name in base.organs:
            continue
        if not path.is_file():  # a broken plug-in install must not stop routing the other organs
            _warn_once(f"router head {path} of organ {spec.name!r} does not exist; {spec.name} images are not "
                       "routed automatically (reinstall the plug-in or pass the organ)")
            continue
        out.append(load_router_head(path, spec.name))
    return out


def route_image(image: Any, router: OrganRouter | None = None) -> RoutingResult:
    """Route one HxWx3 uint8 RGB image with the packaged router (or ``router``) and the plug-in
    organs' heads (:func:`~echo_agent.organs.routing.combine_heads` decides; hand-crafted features
    are extracted once)."""
    base = router if router is not None else load_router()
    features = extract_features(image)
    result = base.decide(base.probabilities_from_vectors(base.vector_from_features(*features))[0])
    heads = [(h.organ, h.decide(image, features)) for h in plugin_heads(base)]
    return combine_heads(result, heads)


def default_router(image: Any) -> tuple[str | None, float | None]:
    """``(organ, confidence)`` of :func:`route_image`: what ``EchoAgent`` uses when no organ is given.

    ``organ`` is ``'breast'``, ``'kidney'``, an organ added by a plug-in with a router head, or
    ``None`` when the image looks like none of them (a photograph, a blank frame, a document ...).
    """
    r = route_image(image)
    return r.organ, r.confidence


__all__ = ["JsonRouterHead", "OnnxRouterHead", "RouterHead", "default_router", "load_router_head", "plugin_heads",
           "route_image"]
