"""Dataset manifests: the CSV format that describes a labelled ultrasound dataset.

A manifest is a CSV file with one row per lesion (or one row for a lesion-free image). Rows of the
same image repeat its image-level columns. Columns (see ``docs/data.md``):

``image``
    Path of the image file, relative to the manifest's folder or absolute. Required.
``organ``
    A registered organ name (``breast``, ``kidney``, ...). Required.
``label``
    Image-level label, one of the organ's ``image_labels``. Required.
``x_min, y_min, x_max, y_max``
    Pixel box of one lesion, 0-based, ``x_max``/``y_max`` exclusive (so the box maps directly to
    :class:`~echo_agent.schemas.Box` ``(x1=x_min, y1=y_min, x2=x_max, y2=y_max)``). All four empty for
    a lesion-free image.
``category, center, patient_id, group, split, age, symptoms``
    Optional metadata. ``category`` is the reader's assessment in the organ's ``category_system``
    (BI-RADS ``4A``, a plug-in organ's own scale, ...); files written before it was generalised call
    the column ``birads``, which is still read. ``group`` ties images that must stay in one split
    (near-duplicates, one clip).

:func:`load_manifest` validates every row and raises :class:`~echo_agent.errors.ManifestError`
naming the file and the CSV line. :func:`write_manifest` writes the same format back.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ManifestError, UnknownOrganError
from ..organs import OrganSpec, get_organ, list_organs
from ..schemas import Box

#: Columns written by :func:`write_manifest`, in order. Only ``image``, ``organ`` and ``label`` are required.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image",
    "organ",
    "label",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
    "category",
    "center",
    "patient_id",
    "group",
    "split",
    "age",
    "symptoms",
)

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "organ", "label")
BOX_COLUMNS: tuple[str, ...] = ("x_min", "y_min", "x_max", "y_max")
_META_COLUMNS: tuple[str, ...] = ("category", "center", "patient_id", "group", "split", "age", "symptoms")


@dataclass(frozen=True)
class ManifestImage:
    """One image of a manifest with all its lesion boxes.

    ``image`` is an absolute path; ``boxes`` are pixel boxes in the coordinates of that file (empty for
    a lesion-free image); ``rows`` are the 1-based CSV line numbers that produced the entry.
    """

    image: Path
    organ: str
    label: str
    boxes: tuple[Box, ...] = ()
    category: str | None = None
    center: str | None = None
    patient_id: str | None = None
    group: str | None = None
    split: str | None = None
    age: int | None = None
    symptoms: str | None = None
    rows: tuple[int, ...] = field(default=(), compare=False)

    @property
    def birads(self) -> str | None:
        """The reader's category under its name before it was generalised (:attr:`category`)."""
        return self.category

    @property
    def clinical_context(self) -> dict[str, Any] | None:
        """What the agent gets as ``context=`` for this image: its ``age`` and ``symptoms`` where the
        manifest has them, ``None`` when it has neither (the eval harness, batch runs, fusion
        fitting and the training traces all pass this)."""
        ctx = {k: v for k, v in (("age", self.age), ("symptoms", self.symptoms)) if v is not None}
        return ctx or None

    @property
    def key(self) -> str:
        """Stable identifier ``<center>:<path>`` (``<center>`` may be empty).

        For images under the data root (:func:`default_data_root`) ``<path>`` is relative to the
        dataset's folder (``busi:benign/benign (1).png``), so keys do not depend on where the data is
        mounted; for other images it is the absolute path.
        """
        return f"{self.center or ''}:{_relative_key_path(self.image)}"


def default_data_root() -> Path:
    """The staged data folder: ``$ECHO_AGENT_DATA``, else ``<repo>/../shared/data``."""
    root = os.environ.get("ECHO_AGENT_DATA")
    if root:
        return Path(root).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _relative_key_path(path: Path) -> str:
    for base in (default_data_root(),):
        try:
            rel = path.resolve().relative_to(base.resolve())
        except (ValueError, OSError):
            continue
        parts = rel.parts
        # drop the dataset folder itself (it is the center)
        return "/".join(parts[1:]) if len(parts) > 1 else rel.as_posix()
    return path.as_posix()


#: how many problems a ManifestError lists before '... and N more'
MAX_REPORTED_PROBLEMS = 20


def _err(path: Path, row: int | Iterable[int], msg: str) -> ManifestError:
    where = f"line {row}" if isinstance(row, int) else "lines " + ", ".join(str(r) for r in row)
    return ManifestError(f"{path}, {where}: {msg}")


def _resolve_image(base: Path, text: str) -> Path:
    """A manifest cell's image path: relative paths start at the manifest's folder (``base``), normalised."""
    image = Path(text)
    return Path(os.path.normpath(image if image.is_absolute() else base / image))


def _opt(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse_number(path: Path, row: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _err(path, row, f"column {column!r} must be a number, got {text!r}; fix or empty the cell") from None
    if not math.isfinite(value):
        raise _err(path, row, f"column {column!r} must be a finite number, got {text!r}")
    return value


def resolve_organ(name: str) -> OrganSpec:
    """The registered organ called ``name``, case ignored (another center's sheet writes ``Breast``);
    raises :class:`~echo_agent.errors.UnknownOrganError` naming the known organs."""
    try:
        return get_organ(name)
    except UnknownOrganError:
        match = next((o for o in list_organs() if o.name.lower() == name.strip().lower()), None)
        if match is None:
            raise
        return match


def resolve_label(organ: OrganSpec, text: str) -> str | None:
    """The organ's image label spelled ``text`` with case and surrounding spaces ignored, else ``None``."""
    return next((lbl for lbl in organ.image_labels if lbl.lower() == text.strip().lower()), None)


def _parse_age(path: Path, row: int, text: str | None) -> int | None:
    text = _opt(text)
    if text is None:
        return None
    value = _parse_number(path, row, "age", text)
    if value < 0 or value != int(value):
        raise _err(path, row, f"column 'age' must be a whole number of years >= 0, got {text!r}")
    return int(value)


@dataclass
class _Pending:
    image: Path
    organ: str
    label: str
    meta: dict[str, str | None]
    age: int | None
    boxes: list[tuple[Box, int]]
    rows: list[int]


class _Row(NamedTuple):
    row: int  # 1-based CSV line
    image: Path  # resolved
    image_text: str  # as written
    organ: str
    label: str
    box: Box | None
    meta: dict[str, str | None]
    age: int | None


def _parse_row(
    path: Path, row: int, raw: dict[str | None, Any], header: list[str], base: Path, *, has_boxes: bool
) -> _Row | None:
    """One CSV record checked on its own (``row``: its 1-based line); ``None`` for a blank line. Raises
    :class:`ManifestError` for the first problem of the record."""
    if None in raw:
        raise _err(path, row, f"has more cells than the header has columns ({len(header)})")
    rec = {str(k): (v if v is not None else "") for k, v in raw.items()}
    if not any(v.strip() for v in rec.values()):
        return None
    image_text = rec["image"].strip()
    if not image_text:
        raise _err(path, row, "column 'image' is empty; give the image path")
    image = _resolve_image(base, image_text)
    organ_name = rec["organ"].strip()
    try:
        organ = resolve_organ(organ_name)
    except UnknownOrganError as exc:
        raise _err(path, row, str(exc)) from None
    label = rec["label"].strip()
    label = resolve_label(organ, label) or label
    if label not in organ.image_labels:
        raise _err(path, row, f"label {label!r} is not a label of organ {organ_name!r}; use one of {list(organ.image_labels)}")
    box = _parse_box(path, row, rec) if has_boxes else None
    if box is not None and label == organ.normal_label:
        raise _err(path, row, f"image labelled {label!r} (lesion-free) has a box; empty the box or change the label")
    meta = {c: _opt(rec.get(c)) for c in _META_COLUMNS if c != "age"}
    return _Row(row, image, image_text, organ.name, label, box, meta, _parse_age(path, row, rec.get("age")))


def _parse_box(path: Path, row: int, rec: dict[str, str]) -> Box | None:
    cells = [rec[c].strip() for c in BOX_COLUMNS]
    filled = [bool(c) for c in cells]
    if not any(filled):
        return None
    if not all(filled):
        empty = [c for c, f in zip(BOX_COLUMNS, filled, strict=True) if not f]
        raise _err(path, row, f"partial box: {empty} empty; give all four box columns or none")
    x1, y1, x2, y2 = (_parse_number(path, row, c, t) for c, t in zip(BOX_COLUMNS, cells, strict=True))
    if x1 < 0 or y1 < 0:
        raise _err(path, row, f"box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has a negative coordinate")
    if x2 <= x1 or y2 <= y1:
        raise _err(
            path,
            row,
            f"box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] needs x_max > x_min and y_max > y_min "
            "(x_max/y_max are exclusive pixel bounds)",
        )
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


def load_manifest(
    path: str | os.PathLike[str], *, check_files: bool = True, check_boxes: bool = True
) -> list[ManifestImage]:
    """Read and validate a manifest CSV; returns one :class:`ManifestImage` per distinct image.

    ``check_files`` verifies every image exists; ``check_boxes`` also reads each image header (lazily,
    only for images with boxes) and verifies its boxes lie inside the image. Every row is checked
    before anything is raised: one :class:`~echo_agent.errors.ManifestError` names the file and lists
    each problem with its CSV line, in file order (the first ``MAX_REPORTED_PROBLEMS``, then a count),
    so a large manifest is fixed in one pass.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; pass the path of a CSV file")
    base = path.resolve().parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(
                f"{path}, line 1: missing required column(s) {missing}; the header must contain "
                f"{list(REQUIRED_COLUMNS)} (optional: {[c for c in MANIFEST_COLUMNS if c not in REQUIRED_COLUMNS]})"
            )
        has_boxes = [c for c in BOX_COLUMNS if c in header]
        if has_boxes and len(has_boxes) != 4:
            raise ManifestError(
                f"{path}, line 1: box columns must come as all four of {list(BOX_COLUMNS)}, got {has_boxes}"
            )
        if "birads" in header and "category" not in header:  # the column's name before it was generalised
            header = ["category" if h == "birads" else h for h in header]
        reader.fieldnames = header
        pending: dict[Path, _Pending] = {}
        order: list[Path] = []
        problems: list[tuple[int, str]] = []  # (CSV line, message)
        for raw in reader:
            try:
                parsed = _parse_row(path, reader.line_num, raw, header, base, has_boxes=bool(has_boxes))
                if parsed is None:
                    continue  # blank line
                row, image, image_text, organ_name, label, box, meta, age = parsed
                prev = pending.get(image)
                if prev is None:
                    if check_files and not image.is_file():
                        raise _err(path, row, f"image file {image} does not exist; fix the path (relative paths start at {base})")
                    pending[image] = prev = _Pending(image, organ_name, label, meta, age, [], [row])
                    order.append(image)
                else:
                    if prev.organ != organ_name or prev.label != label:
                        raise _err(
                            path,
                            [prev.rows[0], row],
                            f"rows of image {image_text!r} disagree: organ/label {prev.organ}/{prev.label} vs "
                            f"{organ_name}/{label}; one image has one organ and one label",
                        )
                    prev.rows.append(row)
                if box is not None:
                    prev.boxes.append((box, row))
            except ManifestError as exc:  # keep reading: report every bad row at once
                problems.append((reader.line_num, str(exc)))
    from ..imaging.io import image_size

    out: list[ManifestImage] = []
    for image in order:
        p = pending[image]
        if check_boxes and p.boxes:
            try:
                width, height = image_size(image)  # the header; a DICOM file is decoded
            except FileNotFoundError:
                problems.append((p.rows[0], str(_err(path, p.rows[0], f"image file {image} does not exist"))))
                continue
            except Exception as exc:
                problems.append((p.rows[0], str(_err(path, p.rows[0], f"image file {image} cannot be read as an image ({exc})"))))
                continue
            problems += [
                (row, str(_err(path, row, f"box {[int(v) if v == int(v) else v for v in box.to_list()]} lies outside the "
                                    f"{width}x{height} image {image.name} (x_max <= width, y_max <= height)")))
                for box, row in p.boxes if box.x2 > width or box.y2 > height
            ]
        out.append(
            ManifestImage(
                image=image,
                organ=p.organ,
                label=p.label,
                boxes=tuple(b for b, _ in p.boxes),
                age=p.age,
                rows=tuple(p.rows),
                **p.meta,  # type: ignore[arg-type]
            )
        )
    problems.sort(key=lambda lp: lp[0])  # the box checks run after the row checks: report in file order
    if len(problems) == 1:
        raise ManifestError(problems[0][1])
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise ManifestError(f"{path}: {len(problems)} problems; fix them all before evaluating:\n"
                            + "\n".join(f"  {m.removeprefix(f'{path}, ')}" for _, m in shown) + (f"\n  ... and {more} more" if more else ""))
    return out


#: :class:`ManifestImage` fields a result can be broken down by (``evaluate(by=...)``) without re-reading the file
IMAGE_LEVEL_FIELDS: tuple[str, ...] = ("label", "category", "center", "patient_id", "group", "split", "age", "symptoms")


def column_values(path: str | os.PathLike[str], column: str) -> dict[Path, str]:
    """Per image of a manifest CSV, its value in ``column`` ('' where the cell is empty).

    ``column`` may be one the manifest format does not define (a scanner, an acquisition series, a
    reader): :func:`load_manifest` ignores such columns, this reads one of them. Image paths are
    resolved as :func:`load_manifest` resolves them, so the keys match :attr:`ManifestImage.image`.
    Raises :class:`~echo_agent.errors.ManifestError` when the file has no such column, or when the
    rows of one image disagree on it (a per-lesion column cannot break images down).
    """
    path = Path(path)
    base = path.resolve().parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if column not in header:
            raise ManifestError(f"{path}, line 1: no column {column!r}; the columns are {header}")
        reader.fieldnames = header
        values: dict[Path, tuple[str, int]] = {}
        for raw in reader:
            text = (raw.get("image") or "").strip()
            if not text:
                continue
            image = _resolve_image(base, text)
            value = (raw.get(column) or "").strip()
            prev = values.setdefault(image, (value, reader.line_num))
            if prev[0] != value:
                raise _err(path, [prev[1], reader.line_num],
                           f"rows of image {text!r} disagree on column {column!r} ({prev[0]!r} vs {value!r}); "
                           "results can only be broken down by a column that is the same on every row of an image")
    return {image: v for image, (v, _) in values.items()}


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_manifest(
    images: Iterable[ManifestImage],
    path: str | os.PathLike[str],
    *,
    relative_to: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``images`` as a manifest CSV (one row per box, one row for a lesion-free image).

    Image paths are written absolute, or relative to ``relative_to`` when given (use the manifest's
    own folder so the file can be moved together with the data). Refuses to replace an existing file
    unless ``overwrite=True``. Returns the path written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    rel_base = Path(relative_to).resolve() if relative_to is not None else None
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for im in images:
            image = Path(im.image).resolve()
            image_text = os.path.relpath(image, rel_base) if rel_base is not None else str(image)
            meta = [
                im.category or "",
                im.center or "",
                im.patient_id or "",
                im.group or "",
                im.split or "",
                "" if im.age is None else str(im.age),
                im.symptoms or "",
            ]
            boxes: list[Box | None] = list(im.boxes) or [None]
            for box in boxes:
                coords = ["", "", "", ""] if box is None else [_fmt(v) for v in box.to_list()]
                writer.writerow([Path(image_text).as_posix(), im.organ, im.label, *coords, *meta])
    return path


def load_development_rows(path: str | os.PathLike[str], organ: str, *, purpose: str) -> list[ManifestImage]:
    """The ``organ`` rows of a manifest used to fit or calibrate something (``purpose``, e.g.
    "calibrate"): a row with ``split=test`` raises :class:`~echo_agent.errors.ManifestError`, because
    whatever is fitted on it could no longer be tested on it."""
    rows = load_manifest(path)
    test = [im for im in rows if im.split == "test"]
    if test:
        raise ManifestError(f"{path}: {len(test)} row(s) have split=test (first: {test[0].image}); "
                            f"{purpose} on images you will not test on")
    return [im for im in rows if im.organ == organ]


__all__ = ["IMAGE_LEVEL_FIELDS", "MANIFEST_COLUMNS", "ManifestImage", "column_values", "default_data_root", "load_development_rows", "load_manifest",
           "write_manifest"]
