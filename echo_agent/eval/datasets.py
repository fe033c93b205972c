"""Adapters that turn the staged public datasets into manifests.

Each dataset is one *center* (``busi``, ``breast_lesions_usg``, ``hydronephrosis_ncnu``). The
adapters read the files documented in each dataset's ``SOURCE.md`` under the data root
(``$ECHO_AGENT_DATA``, default ``<repo>/../shared/data``) and return a :class:`DatasetBuild`: the
manifest images (with ``group``/``patient_id`` set for leakage-safe splitting) plus per-image flags
(``cross_class_duplicate``, ``colour_overlay``, ``other_finding`` ...). Decisions (documented in
``docs/data.md``):

* BUSI: mask components < 50 px are dropped; one box per remaining connected component; ``group`` is
  the near-duplicate group, merged across the cross-class duplicate pairs listed in SOURCE.md. Images
  of those pairs are flagged ``cross_class_duplicate`` and the splitter excludes them from every
  split (their label is unreliable); the 16 colour-overlay images are flagged ``colour_overlay``.
* BrEaST-Lesions_USG: label = ``Classification``; only the official *tumour* mask is ground truth;
  images with extra "other" findings are flagged ``other_finding`` (those findings are not boxes).
* Hydronephrosis-NCNU: label ``normal`` / ``hydronephrosis``; one box per mask component >= 150 px
  (smaller components are JPEG noise of the stored masks); normal frames have no boxes;
  ``group`` = clip id; the fold number is kept in ``patient_id``-free ``group`` metadata via
  :attr:`DatasetBuild.folds`.
"""

from __future__ import annotations

import csv
import glob
import math
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from ..errors import ManifestError
from ..organs.plugins import register_plugins
from ..schemas import Box
from .manifest import ManifestImage, default_data_root
from .splits import UnionFind

BUSI = "busi"
BREAST_LESIONS_USG = "breast_lesions_usg"
HYDRONEPHROSIS_NCNU = "hydronephrosis_ncnu"

#: Mask components smaller than this (pixels) are annotation specks in BUSI.
BUSI_MIN_COMPONENT_PX = 50
#: Hydronephrosis mask components smaller than this are JPEG-compression noise.
HYDRO_MIN_COMPONENT_PX = 150

#: Cross-class duplicate pairs of BUSI (SOURCE.md: pixel-identical, visually confirmed, or "likely").
#: The "possible" pairs benign (90)/malignant (6) and benign (349)/malignant (82) are visually
#: different images and are not listed.
BUSI_CROSS_CLASS_PAIRS: tuple[tuple[str, str], ...] = (
    ("benign/benign (433).png", "malignant/malignant (145).png"),
    ("benign/benign (435).png", "malignant/malignant (145).png"),
    ("benign/benign (399).png", "malignant/malignant (93).png"),
    ("benign/benign (406).png", "malignant/malignant (94).png"),
    ("benign/benign (437).png", "normal/normal (34).png"),
    ("benign/benign (42).png", "malignant/malignant (51).png"),
    ("benign/benign (131).png", "malignant/malignant (51).png"),
    ("benign/benign (85).png", "malignant/malignant (52).png"),
    ("benign/benign (164).png", "malignant/malignant (52).png"),
    ("benign/benign (333).png", "malignant/malignant (77).png"),
    ("benign/benign (269).png", "normal/normal (1).png"),
)

_FOLDERS = {
    BUSI: "BUSI",
    BREAST_LESIONS_USG: "BrEaST-Lesions_USG",
    HYDRONEPHROSIS_NCNU: "Hydronephrosis-NCNU",
}


@dataclass
class DatasetBuild:
    """The manifest images of one center plus what the splitter and reports need to know.

    ``flags`` maps an image key to flag names; ``folds`` maps an image key to its official fold
    (hydronephrosis only); ``forced`` maps a key to a split it must go to (``excluded`` drops it
    from train/val/test).
    """

    center: str
    images: list[ManifestImage]
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)
    forced: dict[str, str] = field(default_factory=dict)


def dataset_folder(center: str, root: str | Path | None = None) -> Path:
    """Folder of a staged dataset under the data root; raises ``FileNotFoundError`` if absent."""
    folder_name = get_center(center).folder
    folder = Path(root) if root is not None else default_data_root()
    folder = folder / folder_name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset folder {folder} does not exist; set ECHO_AGENT_DATA to the folder holding {folder_name}/"
        )
    return folder


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def _box(row: dict[str, str]) -> Box:
    return Box(x1=float(row["x_min"]), y1=float(row["y_min"]), x2=float(row["x_max"]), y2=float(row["y_max"]))


def load_busi(root: str | Path | None = None) -> DatasetBuild:
    """BUSI (Baheya, Cairo) -> one manifest entry per image, boxes per mask component >= 50 px."""
    folder = dataset_folder(BUSI, root)
    images = _read_csv(folder / "images.csv")
    boxes: dict[str, list[Box]] = defaultdict(list)
    for r in _read_csv(folder / "boxes.csv"):
        if int(r["area_px"]) < BUSI_MIN_COMPONENT_PX:
            continue
        boxes[r["image"]].append(_box(r))
    uf = UnionFind()
    group_of = {r["image"]: f"ndg{int(r['near_dup_group']):04d}" for r in images}
    for name in group_of.values():
        uf.find(name)
    cross = {name for pair in BUSI_CROSS_CLASS_PAIRS for name in pair}
    for a, b in BUSI_CROSS_CLASS_PAIRS:
        uf.union(group_of[a], group_of[b])
    cross_groups = {uf.find(group_of[name]) for name in cross}
    colour = {r["image"] for r in images if r["stored_as_grayscale"].strip().lower() != "true"}
    build = DatasetBuild(center=BUSI, images=[])
    for r in images:
        name = r["image"]
        label = r["class"]
        group = uf.find(group_of[name])
        # boxes are sorted for determinism (component order in boxes.csv is already stable)
        im_boxes = tuple(sorted(boxes.get(name, []), key=lambda b: (b.y1, b.x1))) if label != "normal" else ()
        im = ManifestImage(
            image=folder / name, organ="breast", label=label, boxes=im_boxes, center=BUSI, group=group
        )
        build.images.append(im)
        flags = []
        if name in cross:
            flags.append("cross_class_duplicate")
            build.forced[im.key] = "excluded"
        elif group in cross_groups:
            build.forced[im.key] = "train"
        if name in colour:
            flags.append("colour_overlay")
        if flags:
            build.flags[im.key] = tuple(flags)
    return build


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text.lower() in ("", "not available", "no", "nan") else text


def load_breast_lesions_usg(root: str | Path | None = None) -> DatasetBuild:
    """BrEaST-Lesions_USG (Poland, TCIA) -> manifest entries with BI-RADS, age, signs/symptoms."""
    folder = dataset_folder(BREAST_LESIONS_USG, root)
    tumour: dict[str, list[Box]] = defaultdict(list)
    for r in _read_csv(folder / "boxes.csv"):
        if r["mask_kind"] == "tumor":
            tumour[Path(r["image"]).name].append(_box(r))
    build = DatasetBuild(center=BREAST_LESIONS_USG, images=[])
    for r in _read_csv(folder / "clinical_data.csv"):
        name = r["Image_filename"].strip()
        label = r["Classification"].strip()
        if label not in ("normal", "benign", "malignant"):
            raise ManifestError(f"{folder / 'clinical_data.csv'}: case {r['CaseID']} has unknown Classification {label!r}")
        age_text = (r.get("Age") or "").strip()
        age = int(float(age_text)) if age_text and age_text.lower() != "nan" else None
        parts = [p for p in (_clean(r.get("Signs")), _clean(r.get("Symptoms"))) if p]
        symptoms = "; ".join(p.replace("&", ", ") for p in parts) or None
        case = f"case{int(r['CaseID']):03d}"
        im = ManifestImage(
            image=folder / "images_and_masks" / name,
            organ="breast",
            label=label,
            boxes=tuple(tumour.get(name, [])) if label != "normal" else (),
            category=r["BIRADS"].strip().upper() or None,
            center=BREAST_LESIONS_USG,
            patient_id=case,
            group=case,
            age=age,
            symptoms=symptoms,
        )
        build.images.append(im)
        if (r.get("Mask_other_filename") or "").strip():
            build.flags[im.key] = ("other_finding",)
    return build


def load_hydronephrosis_ncnu(root: str | Path | None = None) -> DatasetBuild:
    """Hydronephrosis-NCNU (the staged folds 1-4, or every fold ``frames.csv`` lists when more are
    staged) -> one entry per frame, boxes per fluid component >= 150 px."""
    folder = dataset_folder(HYDRONEPHROSIS_NCNU, root)
    comps: dict[str, list[Box]] = defaultdict(list)
    for r in _read_csv(folder / "boxes.csv"):
        if int(r["area_px"]) >= HYDRO_MIN_COMPONENT_PX:
            comps[r["image"]].append(_box(r))
    build = DatasetBuild(center=HYDRONEPHROSIS_NCNU, images=[])
    for r in _read_csv(folder / "frames.csv"):
        label = "hydronephrosis" if r["label"] == "abnormal" else "normal"
        im = ManifestImage(
            image=folder / r["image"],
            organ="kidney",
            label=label,
            boxes=tuple(comps.get(r["image"], [])) if label != "normal" else (),
            center=HYDRONEPHROSIS_NCNU,
            group=r["clip_id"],
        )
        build.images.append(im)
        build.folds[im.key] = int(r["fold"])
        if label == "hydronephrosis" and not im.boxes:
            build.flags[im.key] = ("no_box",)
    return build


#: ``annotation_fraction`` from which :func:`flag_burned_in_annotations` flags an image.
ANNOTATION_FLAG_FRACTION = 0.005


def flag_burned_in_annotations(build: DatasetBuild, threshold: float = ANNOTATION_FLAG_FRACTION) -> int:
    """Add the flag ``burned_in_annotation`` to images whose field of view has at least ``threshold``
    annotation pixels according to :func:`~echo_agent.imaging.preprocess.prepare_for_detection`
    (decodes every image). Heuristic: very bright thin tissue lines can also trigger it. Returns the
    number of flagged images."""
    from ..imaging import load_image
    from ..imaging.preprocess import prepare_for_detection

    n = 0
    for im in build.images:
        frac = prepare_for_detection(load_image(im.image).array).annotation_fraction
        if frac >= threshold:
            build.flags[im.key] = (*build.flags.get(im.key, ()), "burned_in_annotation")
            n += 1
    return n


# -- the center registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CenterSpec:
    """A staged dataset (one *center*) that the training tools and the eval harness can load by name.

    ``adapter(root)`` builds its :class:`DatasetBuild` from ``<data root>/<folder>``; ``split_file`` is
    the committed ``key,split`` CSV (written once by ``tools/prepare_data.py --write-splits``);
    ``organ`` is the registered organ its images show; ``stratify_by`` (``label`` or ``category``)
    is what the splitter balances across splits. Built-in centers are registered here; a
    separate package adds one through the entry-point group ``echo_agent.datasets`` (an object that
    is a ``CenterSpec``, a sequence of them, or a zero-argument callable returning either) or at run
    time with :func:`register_center`.
    """

    name: str
    organ: str
    folder: str
    adapter: Callable[[str | Path | None], DatasetBuild]
    split_file: Path
    stratify_by: str = "label"
    #: the lesion mask files the dataset stores for an image (its path -> paths; missing ones are
    #: skipped), read by :func:`lesion_mask`; ``None``: the dataset has no masks (boxes are filled)
    mask_files: Callable[[Path], Sequence[Path]] | None = None
    #: for a dataset with official folds: the folds the packaged models were developed on (train and
    #: val come from them); an image of any other fold is ``test``, so staging more of the dataset's
    #: folds adds held-out test images and leaves the committed splits as they are. ``None``: every
    #: fold but the test fold is development data.
    development_folds: tuple[int, ...] | None = None
    #: images the committed split file does not list (more of the dataset staged later: other cases)
    #: are ``test`` when no listed image shares their ``patient_id`` or ``group``; one that does is
    #: left unassigned and refused (it would leak a development patient into test). ``False``: every
    #: unlisted image is refused, as for a dataset whose staged copy is complete.
    new_images_are_test: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"center name {self.name!r} must be a lower-case identifier (letters, digits, _)")
        if not callable(self.adapter):
            raise TypeError(f"center {self.name!r}: adapter must be callable, got {type(self.adapter).__name__}")
        object.__setattr__(self, "split_file", Path(self.split_file))
        if self.stratify_by not in ("label", "category"):
            raise ValueError(f"center {self.name!r}: stratify_by must be 'label' or 'category', got {self.stratify_by!r}")


DATASET_ENTRY_POINT_GROUP = "echo_agent.datasets"
_centers: dict[str, CenterSpec] = {}
_centers_lock = threading.RLock()
_center_entry_points_loaded = False

#: center -> adapter (built-ins and every center registered so far; prefer :func:`list_centers`,
#: which also loads the plug-ins' centers)
ADAPTERS: dict[str, Callable[[str | Path | None], DatasetBuild]] = {}
#: center -> organ (as :data:`ADAPTERS`; prefer :func:`center_organ`)
CENTER_ORGAN: dict[str, str] = {}


def register_center(spec: CenterSpec, *, replace: bool = False) -> CenterSpec:
    """Make a center loadable by name (``replace=True`` to override an existing one)."""
    if not isinstance(spec, CenterSpec):
        raise TypeError(f"register_center expects a CenterSpec, got {type(spec).__name__}")
    with _centers_lock:
        if spec.name in _centers and not replace and _centers[spec.name] != spec:
            raise ValueError(f"center {spec.name!r} is already registered; pass replace=True to override it")
        _centers[spec.name] = spec
        ADAPTERS[spec.name] = spec.adapter
        CENTER_ORGAN[spec.name] = spec.organ
    return spec


def unregister_center(name: str) -> None:
    """Remove a center (mostly for tests)."""
    with _centers_lock:
        _centers.pop(name, None)
        ADAPTERS.pop(name, None)
        CENTER_ORGAN.pop(name, None)


def _load_center_entry_points() -> None:
    global _center_entry_points_loaded
    with _centers_lock:
        if _center_entry_points_loaded:
            return
        _center_entry_points_loaded = True
        register_plugins(entry_points(group=DATASET_ENTRY_POINT_GROUP), CenterSpec, register_center, "dataset")


def get_center(name: str) -> CenterSpec:
    """The registered center ``name`` (built-in or from a plug-in)."""
    _load_center_entry_points()
    with _centers_lock:
        try:
            return _centers[name]
        except KeyError:
            raise ValueError(f"unknown center {name!r}; known: {sorted(_centers)}") from None


def list_centers() -> list[str]:
    """Names of every registered center, sorted."""
    _load_center_entry_points()
    with _centers_lock:
        return sorted(_centers)


def split_file(center: str) -> Path:
    """Path of the committed split CSV of the registered ``center`` (for the built-in centers a file
    inside the package; a plug-in's center names its own)."""
    return get_center(center).split_file


def center_organ(name: str) -> str:
    """The organ whose images the center ``name`` holds."""
    return get_center(name).organ


def _packaged_split_file(center: str) -> Path:
    return Path(str(resources.files("echo_agent") / "eval" / "splits" / f"{center}.csv"))


def _busi_mask_files(image: Path) -> list[Path]:
    """BUSI: ``<name>_mask.png``, or ``<name>_mask_1.png``, ``_mask_2.png`` ... for several lesions."""
    return sorted(image.parent.glob(glob.escape(image.stem) + "_mask*.png"))


_MASK_FILES: dict[str, Callable[[Path], Sequence[Path]]] = {
    BUSI: _busi_mask_files,
    # only the official tumour mask (the "other finding" masks are not the lesion: see the module doc)
    BREAST_LESIONS_USG: lambda image: [image.with_name(image.stem + "_tumor.png")],
    HYDRONEPHROSIS_NCNU: lambda image: [image.with_name(image.stem + "_M.jpg")],  # the fluid mask
}


for _name, _organ, _adapter in (
    (BUSI, "breast", load_busi),
    (BREAST_LESIONS_USG, "breast", load_breast_lesions_usg),
    (HYDRONEPHROSIS_NCNU, "kidney", load_hydronephrosis_ncnu),
):
    register_center(CenterSpec(_name, _organ, _FOLDERS[_name], _adapter, _packaged_split_file(_name),
                               mask_files=_MASK_FILES[_name],
                               # folds 1-3 are development data, 4 the test split; folds 5-10 when staged are test
                               development_folds=(1, 2, 3) if _name == HYDRONEPHROSIS_NCNU else None))


def load_center(center: str, root: str | Path | None = None) -> DatasetBuild:
    """Run the adapter of the registered ``center`` (see :func:`list_centers`).

    Image keys (and so the committed splits) are computed relative to :func:`default_data_root`;
    point ``$ECHO_AGENT_DATA`` at the data rather than passing a different ``root``.
    """
    return get_center(center).adapter(root)


def compute_splits(build: DatasetBuild, *, seed: int | None = None) -> dict[str, str]:
    """Fresh leakage-safe split assignment of a built center (what the committed files hold).

    Groups are first merged across pixel-identical images (this decodes every image)."""
    from .splits import DEFAULT_SEED, assign_fold_splits, assign_splits, merge_identical_groups

    seed = DEFAULT_SEED if seed is None else seed
    images = merge_identical_groups(build.images)
    if build.folds:
        dev = get_center(build.center).development_folds
        held_out = {f for f in build.folds.values() if dev is not None and f not in dev}
        return assign_fold_splits(images, build.folds, seed=seed, test_folds=held_out or (4,))
    return assign_splits(images, seed=seed, forced=build.forced, stratify_by=get_center(build.center).stratify_by)


def committed_splits(build: DatasetBuild) -> dict[str, str]:
    """The committed split assignment of a built center, plus ``test`` for images the file does not
    list where the center says they are held out (more of the dataset staged later: frames of folds
    outside :attr:`CenterSpec.development_folds`, or new patients with
    :attr:`CenterSpec.new_images_are_test`). Other unlisted images stay unassigned, and
    :func:`~echo_agent.eval.splits.apply_splits` refuses them."""
    from .splits import read_split_file

    assignments = read_split_file(split_file(build.center))
    spec = get_center(build.center)
    listed_units = {u for im in build.images if im.key in assignments and assignments[im.key] != "test"
                    for u in (("p", im.patient_id), ("g", im.group)) if u[1]}
    for im in build.images:
        if im.key in assignments:
            continue
        fold = build.folds.get(im.key)
        if spec.development_folds is not None and fold is not None and fold not in spec.development_folds:
            assignments[im.key] = "test"
        elif spec.new_images_are_test and not ({("p", im.patient_id), ("g", im.group)} & listed_units):
            assignments[im.key] = "test"
    return assignments


def load_split(
    center: str, split: str | None = None, root: str | Path | None = None
) -> list[ManifestImage]:
    """Images of ``center`` with the committed split assignment; only ``split`` when given
    (``train``, ``val``, ``test``; ``None`` = all, including ``excluded``).

    ``split`` may name a pool of splits joined by ``+`` (``"train+val"``: the development pool, for
    choices made by grouped cross-validation where a center's val split is too small to choose on).
    A pool never contains ``test``.
    """
    from .splits import apply_splits

    wanted = None if split is None else parse_split_pool(split)
    build = load_center(center, root)
    images = apply_splits(build.images, committed_splits(build))
    return [im for im in images if wanted is None or im.split in wanted]


def parse_split_pool(split: str) -> tuple[str, ...]:
    """``"train"`` -> ``("train",)``; ``"train+val"`` -> ``("train", "val")``.

    Raises :class:`ValueError` for an unknown split name, a repeated one, or ``test`` in a pool of
    several splits (a development pool must never reach into the test split).
    """
    from .splits import SPLITS

    parts = tuple(p.strip() for p in split.split("+"))
    unknown = [p for p in parts if p not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r} in {split!r}; expected one of {', '.join(SPLITS)} "
                         "or a '+'-joined pool such as 'train+val'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"split pool {split!r} names a split twice")
    if len(parts) > 1 and "test" in parts:
        raise ValueError(f"split pool {split!r} includes 'test'; the test split is never pooled with the others")
    return parts


def training_split(split: str) -> tuple[str, ...]:
    """:func:`parse_split_pool` for a split a model is trained on: ``test`` is refused alone too.

    >>> training_split("train+val")
    ('train', 'val')
    """
    parts = parse_split_pool(split)
    if "test" in parts:
        raise ValueError(f"training split {split!r} is the test split; models never train on test "
                         "(train on 'train' or the development pool 'train+val')")
    return parts


def lesion_mask(image: ManifestImage, size: tuple[int, int]) -> np.ndarray | None:
    """A boolean ``(height, width)`` lesion mask of a manifest image (``size`` = ``(width, height)`` of
    its file): the union of the mask files its center stores for it (:attr:`CenterSpec.mask_files`;
    thresholded at half intensity, resized to ``size``) where there are any and they are not empty,
    else the image's boxes filled; ``None`` for an image without either (a normal image)."""
    w, h = size
    spec = _centers.get(image.center) if image.center else None
    paths = [p for p in spec.mask_files(Path(image.image)) if p.exists()] if spec and spec.mask_files else []
    if paths:
        from PIL import Image

        mask = np.zeros((h, w), bool)
        for path in paths:
            with Image.open(path) as pm:
                mask |= np.asarray(pm.convert("L").resize((w, h))) > 127
        if mask.any():
            return mask
    if not image.boxes:
        return None
    mask = np.zeros((h, w), bool)
    for b in image.boxes:
        mask[max(int(b.y1), 0):min(int(math.ceil(b.y2)), h), max(int(b.x1), 0):min(int(math.ceil(b.x2)), w)] = True
    return mask


__all__ = [
    "ADAPTERS",
    "BREAST_LESIONS_USG",
    "BUSI",
    "BUSI_CROSS_CLASS_PAIRS",
    "CENTER_ORGAN",
    "CenterSpec",
    "DATASET_ENTRY_POINT_GROUP",
    "DatasetBuild",
    "HYDRONEPHROSIS_NCNU",
    "dataset_folder",
    "flag_burned_in_annotations",
    "lesion_mask",
    "load_breast_lesions_usg",
    "load_busi",
    "committed_splits",
    "compute_splits",
    "load_center",
    "load_split",
    "parse_split_pool",
    "training_split",
    "load_hydronephrosis_ncnu",
    "center_organ",
    "get_center",
    "list_centers",
    "register_center",
    "split_file",
    "unregister_center",
]
