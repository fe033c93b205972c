"""The facts rationales are built from: clinical context and the radiologist's descriptors."""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from ...eval.manifest import ManifestImage
from ...schemas import ClinicalContext, Descriptor


# ---------------------------------------------------------------------------------------------------
# facts: clinical context, radiologist descriptors
# ---------------------------------------------------------------------------------------------------
def clinical_for(im: ManifestImage) -> ClinicalContext | None:
    """The clinical context the agent gets for a manifest image (age, symptoms), as the eval harness does."""
    data = im.clinical_context
    return ClinicalContext.model_validate(data) if data else None


_BREAST_COLUMNS = {"Shape": "shape", "Margin": "margin", "Echogenicity": "echo_pattern",
                   "Posterior_features": "posterior_features", "Halo": "halo", "Calcifications": "calcifications"}


@functools.cache
def _clinical_table(path: str) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return {r["Image_filename"].strip(): r for r in csv.DictReader(fh)}


def radiologist_descriptors(im: ManifestImage) -> dict[str, str]:
    """The radiologist's BI-RADS lexicon descriptors of a BrEaST-Lesions_USG image, by file name.

    Read from ``clinical_data.csv`` next to the image's folder (the manifest has no descriptor
    columns). Returns ``{}`` for images of other datasets or without descriptors. Values are mapped
    to the organ's vocabulary: ``margin`` becomes ``circumscribed`` or the listed non-circumscribed
    kinds (``"indistinct, angular"``), posterior ``no`` becomes ``none``.
    """
    for folder in (im.image.parent, im.image.parent.parent):
        table = folder / "clinical_data.csv"
        if table.is_file():
            break
    else:
        return {}
    row = _clinical_table(str(table)).get(im.image.name)
    if row is None:
        return {}
    out: dict[str, str] = {}
    for col, key in _BREAST_COLUMNS.items():
        v = (row.get(col) or "").strip()
        if not v or v == "not applicable":
            continue
        if key == "margin" and v.startswith("not circumscribed"):
            kinds = v.split("-", 1)[1].strip().split("&") if "-" in v else []
            v = ", ".join(k.strip() for k in kinds) or "not circumscribed"
        if key == "posterior_features" and v == "no":
            v = "none"
        out[key] = v
    return out


def _descriptor_values(ctx_region: Mapping[str, Descriptor], vocabulary: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in vocabulary:
        d = ctx_region.get(k)
        if d is not None and d.value is not None:
            out[k] = d.value
    for k in ("size_mm", "size_px"):
        d = ctx_region.get(k)
        if d is not None and d.value is not None:
            out[k] = d.value
    return out


def _phrase(descs: Mapping[str, Any]) -> str:
    order = ["shape", "orientation", "margin", "echo_pattern", "posterior_features", "halo", "calcifications",
             "collecting_system_fluid", "fluid_extent", "echogenicity_vs_cortex", "acoustic_shadowing"]
    parts = []
    for k in order:
        if k in descs:
            name = k.replace("_", " ")
            parts.append(f"{name} {descs[k]}")
    return ", ".join(parts)
