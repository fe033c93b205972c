"""A manifest from a folder of images: labels from subfolder names or a labels CSV, boxes from masks.

Most ultrasound collections come as folders, not as our manifest: BUSI-style ``benign/``,
``malignant/``, ``normal/`` folders with ``<name>_mask.png`` beside each image, or one folder of images
with a spreadsheet of labels and a folder of masks. :func:`manifest_from_folder` turns either into
:class:`~echo_agent.eval.manifest.ManifestImage` entries (write them with
:func:`~echo_agent.eval.manifest.write_manifest`; ``echo-agent manifest`` does both), so
``echo-agent eval`` runs on a user's own data without a hand-written CSV.

* **Labels**: one ``label`` for every image, or from ``labels`` (a CSV with ``image`` and ``label``
  columns, renamed from the sheet's own names with ``columns``; ``image`` is a path relative to the
  folder or to the sheet, a file name or a file stem; the manifest's optional columns ``category``
  (or ``birads``), ``patient_id``, ``group``, ``split``, ``age``, ``symptoms``, ``center`` are copied
  when present), else from the nearest enclosing folder named like one of the organ's labels (case
  ignored); ``label_map`` reads other names of the labels.
* **Boxes**: one per connected component of at least ``min_area`` pixels of the image's mask files
  (``mask_pattern``, a glob relative to the image's folder with ``{stem}`` for the image's file stem;
  default ``{stem}_mask*``: BUSI's ``_mask.png``, ``_mask_1.png`` ...; pixels above half intensity
  are the lesion; each mask file gives its own boxes, as BUSI stores a second lesion in a second file).
  Where a mask's name differs from its image's by more than an added ending (``bus_0001-l.png`` /
  ``mask_0001-l.png``), ``mask_rename`` rewrites the stem first (``{"bus_": "mask_"}``).
  Files matching a mask pattern are never images.
* Hidden files and folders (``.``-names: macOS ``._`` copies, caches) are never read.
* A lesion image without a mask file stays in the manifest without boxes (it counts for the
  image-level metrics only); a normal image whose mask is not empty is a problem to fix.

Every problem is collected and raised at once as one :class:`~echo_agent.errors.ManifestError`.
"""

from __future__ import annotations

import csv
import glob
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ManifestError
from ..imaging.io import IMAGE_SUFFIXES, image_size, is_hidden
from ..organs import OrganSpec
from ..schemas import Box
from .manifest import (
    _META_COLUMNS,
    MAX_REPORTED_PROBLEMS,
    ManifestImage,
    _parse_age,
    resolve_label,
    resolve_organ,
)

#: File endings read as masks (GIF too: some datasets store masks so).
MASK_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"})
#: Default mask files of an image: BUSI's ``<stem>_mask.png`` / ``<stem>_mask_1.png`` ...
DEFAULT_MASK_PATTERN = "{stem}_mask*"


@dataclass(frozen=True)
class FolderManifest:
    """What :func:`manifest_from_folder` found: the images and what a user should know about them."""

    images: tuple[ManifestImage, ...]
    notes: tuple[str, ...] = ()  # not errors: e.g. lesion images without a mask (no boxes)
    counts: dict[str, int] = field(default_factory=dict)  # images per label

    @property
    def n_boxes(self) -> int:
        return sum(len(im.boxes) for im in self.images)


def boxes_from_mask(mask: np.ndarray, *, min_area: int = 50) -> list[Box]:
    """One box per 4-connected component of ``mask`` (non-zero = lesion) with at least ``min_area``
    pixels; ``[x_min, y_min, x_max, y_max)`` pixel boxes (max exclusive), sorted top-left first (the
    convention of the staged datasets' ``boxes.csv``).

    >>> m = np.zeros((20, 30), np.uint8); m[2:5, 3:9] = 1; m[10:18, 20:25] = 1; m[0, 29] = 1
    >>> [(b.x1, b.y1, b.x2, b.y2) for b in boxes_from_mask(m, min_area=2)]
    [(3.0, 2.0, 9.0, 5.0), (20.0, 10.0, 25.0, 18.0)]
    """
    import cv2

    if mask.ndim != 2:
        raise ValueError(f"a mask is a 2-D array, got shape {mask.shape}")
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=4)
    boxes = [Box(x1=float(x), y1=float(y), x2=float(x + w), y2=float(y + h))
             for x, y, w, h, area in stats[1:n] if area >= min_area]
    return sorted(boxes, key=lambda b: (b.y1, b.x1))


def _mask_boxes(paths: Sequence[Path], size: tuple[int, int], min_area: int) -> list[Box]:
    """Boxes of each mask file in turn (two lesions drawn in two files stay two boxes where they touch);
    a mask stored at another size than its image is resampled onto it."""
    from PIL import Image

    boxes: list[Box] = []
    for p in paths:
        with Image.open(p) as im:
            m = im.convert("L")
            if m.size != size:
                m = m.resize(size, Image.NEAREST)
            boxes += boxes_from_mask(np.asarray(m) > 127, min_area=min_area)
    return boxes


def _renamed(stem: str, renames: Sequence[tuple[str, str]]) -> str:
    """The stem of an image's masks: each ``(old, new)`` replaced once, in order.

    >>> _renamed("bus_0001-l", [("bus_", "mask_")])
    'mask_0001-l'
    """
    for old, new in renames:
        stem = stem.replace(old, new, 1)
    return stem


def _label_reader(spec: OrganSpec, label_map: Mapping[str, str] | None) -> Callable[[str], str | None]:
    """``text -> the organ's label`` (case ignored), through ``label_map`` first (``abnormal`` ->
    ``hydronephrosis``); a map entry naming no label of the organ is refused."""
    mapping = {k.strip().lower(): v for k, v in (label_map or {}).items()}
    bad = {k: v for k, v in mapping.items() if resolve_label(spec, v) is None}
    if bad:
        raise ValueError(f"label_map {bad} maps to no label of organ {spec.name!r}; use one of {list(spec.image_labels)}")

    def read(text: str) -> str | None:
        return resolve_label(spec, mapping.get(text.strip().lower(), text))
    return read


def _read_labels(path: Path, folder: Path, images: Sequence[Path], spec: OrganSpec, problems: list[str],
                 columns: Mapping[str, str] | None, read_label: Callable[[str], str | None],
                 label: str | None) -> dict[Path, dict[str, Any] | None]:
    """The labels sheet's rows keyed by image (``None`` for an image whose row has a problem); unknown
    or ambiguous image cells, bad labels and ages are problems. ``columns`` renames the sheet's columns
    to the manifest's (case ignored); with a constant ``label`` the sheet needs no label column."""
    if not path.is_file():
        raise ManifestError(f"labels file {path} does not exist; pass a CSV with columns image,label")
    by_rel = {im.relative_to(folder).as_posix(): im for im in images}
    names: dict[str, list[Path]] = {}
    for im in images:
        names.setdefault(im.name, []).append(im)
        names.setdefault(im.stem, []).append(im)
    rename = {k.strip().lower(): v.strip().lower() for k, v in (columns or {}).items()}
    rename.setdefault("birads", "category")  # the category column's former name
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [rename.get(h.strip().lower(), h.strip().lower()) for h in reader.fieldnames or []]
        missing = [c for c in ("image", "label") if c not in header and not (c == "label" and label)]
        if missing:
            raise ManifestError(f"{path}, line 1: missing column(s) {missing}; its columns are "
                                f"{[h.strip() for h in reader.fieldnames or []]} (rename one with columns / --column FROM=TO)")
        out: dict[Path, dict[str, Any] | None] = {}
        for line, raw in enumerate(reader, start=2):
            rec = {rename.get((k or "").strip().lower(), (k or "").strip().lower()): (v or "").strip()
                   for k, v in raw.items()}
            cell = rec["image"]
            text = label or rec.get("label", "")
            if not cell and not rec.get("label"):
                continue
            hits = [by_rel[cell]] if cell in by_rel else names.get(cell, [])
            if not hits and "/" in cell:  # a path relative to the sheet's folder rather than to the images'
                p = (path.parent / cell).resolve()
                hits = [im for im in images if im.resolve() == p]
            if len(hits) != 1:
                problems.append(f"{path.name}, line {line}: image {cell!r} "
                                + ("matches no image file in the folder" if not hits else
                                   f"matches {len(hits)} files; give its path relative to {folder}"))
                continue
            if hits[0] in out:
                problems.append(f"{path.name}, line {line}: image {cell!r} is labelled twice")
                continue
            out[hits[0]] = None  # has a row, even if a bad one
            found = read_label(text)
            if found is None:
                problems.append(f"{path.name}, line {line}: label {text!r} is not a label of organ "
                                f"{spec.name!r}; use one of {list(spec.image_labels)}")
                continue
            try:
                age = _parse_age(path, line, rec.get("age"))
            except ManifestError as exc:
                problems.append(str(exc).replace(str(path), path.name, 1))
                continue
            out[hits[0]] = {**{c: rec[c] for c in _META_COLUMNS if rec.get(c)}, "label": found, "age": age}
    return out


def manifest_from_folder(
    folder: str | Path,
    organ: str,
    *,
    labels: str | Path | None = None,
    mask_pattern: str | None = DEFAULT_MASK_PATTERN,
    min_area: int = 50,
    center: str | None = None,
    columns: Mapping[str, str] | None = None,
    label_map: Mapping[str, str] | None = None,
    label: str | None = None,
    mask_rename: Mapping[str, str] | None = None,
) -> FolderManifest:
    """Manifest entries for every image under ``folder`` (see the module doc for where labels and
    boxes come from). ``mask_pattern=None`` reads no masks. ``center`` names the collection (a
    ``center`` column of the labels file wins). ``columns`` renames the labels file's columns to the
    manifest's (a dataset's own sheet: ``{"ID": "image", "Pathology": "label", "tirads": "category"}``).
    ``label_map`` reads other names of the organ's labels, in folder names and in the labels file
    (``{"abnormal": "hydronephrosis"}``; case ignored). ``label`` gives every image that label (a
    folder of one class; folder names are then not read, and a labels file needs no label column).
    With a labels file, image files it does not list are left out (and counted in ``notes``).
    ``mask_rename`` maps text in an image's stem to the text in its mask's stem before ``{stem}`` is
    filled in (each pair once, in order; stems without the text stay as they are).
    Raises :class:`ManifestError` listing every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder; pass the folder that holds the images")
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1 pixel, got {min_area}")
    if mask_pattern is not None and "{stem}" not in mask_pattern:
        raise ValueError(f"mask_pattern {mask_pattern!r} needs {{stem}} (the image's file name without its ending)")
    renames = list((mask_rename or {}).items())
    if renames and mask_pattern is None:
        raise ValueError("mask_rename needs a mask_pattern (no masks are read without one)")
    if any(not old for old, _ in renames):
        raise ValueError(f"mask_rename pairs need the text to replace, got {dict(renames)}")
    spec = resolve_organ(organ)
    read_label = _label_reader(spec, label_map)
    if label is not None and read_label(label) is None:
        raise ValueError(f"label {label!r} is not a label of organ {spec.name!r}; use one of {list(spec.image_labels)}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not is_hidden(p, folder))
    masks_of: dict[Path, list[Path]] = {}
    if mask_pattern is not None:
        for p in files:
            escaped = mask_pattern.replace("{stem}", glob.escape(_renamed(p.stem, renames)))
            masks_of[p] = sorted(m for m in p.parent.glob(escaped) if m != p and m.suffix.lower() in MASK_SUFFIXES)
    mask_files = {m.resolve() for ms in masks_of.values() for m in ms}
    images = [p for p in files if p.resolve() not in mask_files]
    if not images:
        raise ManifestError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) other than masks")
    problems: list[str] = []
    table = (_read_labels(Path(labels), folder, images, spec, problems, columns, read_label, label)
             if labels is not None else {})
    out: list[ManifestImage] = []
    no_mask: list[str] = []
    unlabelled: list[str] = []
    for p in images:
        rel = p.relative_to(folder).as_posix()
        if p in table and table[p] is None:  # its row's problem is already reported
            continue
        rec = table.get(p)
        if rec is None and labels is None:
            found = read_label(label) if label is not None else next(
                (lb for part in reversed(p.relative_to(folder).parts[:-1]) if (lb := read_label(part))), None)
            rec = {"label": found} if found else None
        if rec is None:
            unlabelled.append(rel)
            continue
        boxes: list[Box] = []
        ms = masks_of.get(p, [])
        if ms:
            try:
                boxes = _mask_boxes(ms, image_size(p), min_area)
            except (OSError, ValueError) as exc:  # ValueError: the library's unreadable-image errors
                problems.append(f"{rel}: cannot read it or its mask ({exc})")
                continue
        if rec["label"] == spec.normal_label and boxes:
            problems.append(f"{rel}: labelled {spec.normal_label!r} but its mask ({ms[0].name}) marks "
                            f"{len(boxes)} lesion region(s); fix the label or the mask")
            continue
        if rec["label"] != spec.normal_label and not boxes:
            no_mask.append(rel)
        out.append(ManifestImage(
            image=p.resolve(), organ=spec.name, label=rec["label"], boxes=tuple(boxes),
            category=rec.get("category"), center=rec.get("center") or center, patient_id=rec.get("patient_id"),
            group=rec.get("group"), split=rec.get("split"), age=rec.get("age"), symptoms=rec.get("symptoms")))
    listed = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
    if unlabelled and labels is None:
        problems.append(f"{len(unlabelled)} image(s) in no folder named like a label of organ {spec.name!r} "
                        f"({', '.join(spec.image_labels)}): {listed}; label them or move them out of the folder")
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise ManifestError(f"{folder}: {len(problems)} problem(s); fix them all before building the manifest:\n"
                            + "\n".join(f"  {m}" for m in shown) + (f"\n  ... and {more} more" if more else ""))
    notes = []
    if renames and not any(old in p.stem for p in images for old, _ in renames):
        notes.append(f"mask_rename: no image name contains {', '.join(repr(old) for old, _ in renames)}")
    if unlabelled:
        notes.append(f"{len(unlabelled)} image file(s) without a row in {Path(str(labels)).name} were left out: {listed}")
    if no_mask:
        notes.append(f"{len(no_mask)} lesion image(s) have no mask"
                     + ("" if mask_pattern is None else f" matching {mask_pattern!r}")
                     + " (or an empty one): they count for image-level metrics only, not for localization")
    return FolderManifest(tuple(out), tuple(notes), dict(Counter(im.label for im in out)))


__all__ = ["DEFAULT_MASK_PATTERN", "MASK_SUFFIXES", "FolderManifest", "boxes_from_mask", "manifest_from_folder"]
