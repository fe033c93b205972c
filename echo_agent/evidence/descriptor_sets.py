"""Per-organ descriptor sets: how a candidate region's pixels become an organ's lexicon descriptors.

The captioner measures generic features of every region (segmentation, axes, echo ratio to the
surrounding ring, dark and bright fractions, margin sharpness, posterior band ...). A
:class:`DescriptorSet` turns them -- and, where it needs more, the region's pixels -- into the
descriptors of its organ's lexicon and a one-sentence caption. The built-in organs use the
captioner's own breast and kidney rules; an organ added by a plug-in names its set in
``OrganSpec.descriptor_set`` as ``'<module>:<attribute>'``::

    # my_plugin/descriptors.py
    from echo_agent.evidence.descriptor_sets import RegionPixels
    from echo_agent.schemas import Descriptor

    class LiverDescriptors:
        name = "liver-descriptors/1"

        def describe(self, region: RegionPixels) -> dict[str, Descriptor]:
            ratio = region.features["echo_ratio"]
            return {"echogenicity": Descriptor(value="hypoechoic" if ratio < 0.8 else "isoechoic")}

        def caption(self, descriptors) -> str:
            return f"{descriptors['echogenicity'].value} focal lesion."

    LIVER_DESCRIPTORS = LiverDescriptors()

The captioner adds the size descriptors (``size_mm`` or ``size_px``) and the segmentation note to
whatever the set returns.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import ModelLoadError
from ..schemas import Descriptor


@dataclass(frozen=True)
class RegionPixels:
    """One candidate region as the captioner analysed it.

    ``roi`` is the grey-level (uint8) neighbourhood of the box resampled to the captioner's working
    scale (the box plus margins on the sides, a little above and one box height below, so the
    surrounding tissue and the posterior band are in it); ``mask`` (bool, same shape) is the
    segmented lesion in it; ``box`` is the region in original pixels; ``features`` are the generic
    numeric features (see ``PixelCaptioner.features``); ``spacing_mm`` is the pixel spacing when known.
    """

    roi: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]
    features: Mapping[str, float]
    segmentation: str
    spacing_mm: tuple[float, float] | None = None

    @property
    def surround(self) -> np.ndarray:
        """Boolean mask of the ROI's tissue around the lesion: outside the lesion, inside the ROI,
        not in the band below it (where shadowing or enhancement would bias a comparison)."""
        import cv2

        m = self.mask.astype(np.uint8)
        if not m.any():
            return ~self.mask
        k = max(3, int(round(0.15 * max(self.mask.shape))) | 1)
        grown = cv2.dilate(m, np.ones((k, k), np.uint8)).astype(bool)
        ring = grown & ~self.mask
        ys = np.nonzero(self.mask)[0]
        ring[ys.max() + 1 :, :] = False
        return ring if ring.any() else ~self.mask


@runtime_checkable
class DescriptorSet(Protocol):
    """What ``OrganSpec.descriptor_set`` names: descriptors and a caption for one region."""

    name: str

    def describe(self, region: RegionPixels) -> dict[str, Descriptor]: ...

    def caption(self, descriptors: Mapping[str, Descriptor]) -> str: ...


@functools.lru_cache(maxsize=32)
def load_descriptor_set(ref: str) -> DescriptorSet:
    """Import ``'<module>:<attribute>'`` and check it is a :class:`DescriptorSet` (cached).

    Raises :class:`~echo_agent.errors.ModelLoadError` naming what is wrong."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"descriptor set {ref!r} must look like '<module>:<attribute>'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"descriptor set {ref!r}: cannot import {module_name!r} ({exc})") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise ModelLoadError(f"descriptor set {ref!r}: module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, DescriptorSet):
        raise ModelLoadError(
            f"descriptor set {ref!r} is a {type(obj).__name__}, which lacks name/describe(region)/caption(descriptors)"
        )
    return obj


__all__ = ["DescriptorSet", "RegionPixels", "load_descriptor_set"]
