"""Leakage-safe train/val/test splits and their committed assignments.

Units that must not be split apart: BUSI near-duplicate groups, BrEaST patients, hydronephrosis
clips -- all carried in :attr:`ManifestImage.group`. :func:`assign_splits` assigns whole groups,
stratified by the group's majority label, with a fixed seed. For hydronephrosis the official folds
are the basis: fold 4 is the test split and folds 1-3 are divided into train/val by clip.

The assignments of the staged datasets are committed as ``echo_agent/eval/splits/<center>.csv``
(columns ``key,split``); :func:`apply_splits` attaches them to freshly built manifests and
:func:`leakage_report` checks a split manifest.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ManifestError
from .manifest import ManifestImage

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXCLUDED = "excluded"
DEFAULT_SEED = 20240611
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}


class UnionFind:
    """Disjoint sets of string ids; the representative of a set is its smallest id."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _group_of(im: ManifestImage) -> str:
    return im.group or im.patient_id or im.key


def assign_splits(
    images: Sequence[ManifestImage],
    *,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    forced: Mapping[str, str] | None = None,
    stratify_by: str = "label",
) -> dict[str, str]:
    """Assign every image key to a split so that no group crosses splits.

    Groups (``group``, else ``patient_id``, else the image itself) are stratified by their majority
    label (``stratify_by="category"``: their majority reader category, images without one counting
    as their label), shuffled with ``seed`` and dealt greedily to the split whose image count is furthest below
    its target fraction. ``forced`` maps an image key to a fixed split (its whole group follows;
    ``excluded`` keeps only that image out). Returns ``{key: split}``.
    """
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(fractions)}")
    fr = {k: v / total for k, v in fractions.items()}
    forced = dict(forced or {})
    groups: dict[str, list[ManifestImage]] = defaultdict(list)
    for im in images:
        groups[_group_of(im)].append(im)
    out: dict[str, str] = {}
    group_forced: dict[str, str] = {}
    for g, members in groups.items():
        for im in members:
            s = forced.get(im.key)
            if s is not None and s != EXCLUDED:
                group_forced[g] = s
    strata: dict[str, list[str]] = defaultdict(list)
    for g in sorted(groups):
        if g in group_forced:
            continue
        labels = Counter((im.category or im.label) if stratify_by == "category" else im.label for im in groups[g])
        top = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        strata[top].append(g)
    rng = random.Random(seed)
    for label in sorted(strata):
        gs = strata[label]
        rng.shuffle(gs)
        n_total = sum(len(groups[g]) for g in gs)
        counts = dict.fromkeys(fr, 0)
        for g in gs:
            size = len(groups[g])
            # deficit of each split relative to its target share of this stratum
            best = max(fr, key=lambda s: (fr[s] * n_total - counts[s], fr[s], -list(fr).index(s)))
            counts[best] += size
            for im in groups[g]:
                out[im.key] = best
    for g, s in group_forced.items():
        for im in groups[g]:
            out[im.key] = s
    for key, s in forced.items():
        if s == EXCLUDED and key in out:
            out[key] = EXCLUDED
    return out


def assign_fold_splits(
    images: Sequence[ManifestImage],
    folds: Mapping[str, int],
    *,
    test_folds: Iterable[int] = (4,),
    val_fraction: float = 0.125,
    seed: int = DEFAULT_SEED,
) -> dict[str, str]:
    """Split by official folds: ``test_folds`` are test; the rest are split train/val by group."""
    test_folds = set(test_folds)
    rest = []
    out: dict[str, str] = {}
    for im in images:
        if im.key not in folds:
            raise ManifestError(f"image {im.key} has no fold; fold-based splitting needs a fold for every image")
        if folds[im.key] in test_folds:
            out[im.key] = "test"
        else:
            rest.append(im)
    out.update(
        assign_splits(rest, fractions={"train": 1.0 - val_fraction, "val": val_fraction, "test": 0.0}, seed=seed)
    )
    return out


# -- committed split files -------------------------------------------------------------------


def write_split_file(assignments: Mapping[str, str], path: str | Path) -> Path:
    """Write ``{key: split}`` as a sorted ``key,split`` CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["key", "split"])
        for key in sorted(assignments):
            w.writerow([key, assignments[key]])
    return path


def read_split_file(path: str | Path) -> dict[str, str]:
    """Read a ``key,split`` CSV."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return {r["key"]: r["split"] for r in csv.DictReader(fh)}


def apply_splits(
    images: Iterable[ManifestImage], assignments: Mapping[str, str] | str | Path, *, strict: bool = True
) -> list[ManifestImage]:
    """Return copies of ``images`` with ``split`` set from ``assignments`` (a mapping or a split CSV).

    With ``strict`` an image without an assignment raises :class:`ManifestError` (the committed split
    files cover every staged image, so a miss means the data changed).
    """
    if not isinstance(assignments, Mapping):
        assignments = read_split_file(assignments)
    out = []
    for im in images:
        s = assignments.get(im.key)
        if s is None and strict:
            raise ManifestError(
                f"image {im.key} has no split assignment; regenerate the split files with "
                "`python tools/prepare_data.py --write-splits`"
            )
        out.append(replace(im, split=s))
    return out


# -- leakage checks --------------------------------------------------------------------------


@dataclass
class LeakageReport:
    """Counts per split/label and every leakage problem found (empty ``problems`` = clean)."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    groups_per_split: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class LeakageError(ManifestError):
    """A group, patient, clip or pixel-identical image appears in more than one split."""


def merge_identical_groups(images: Sequence[ManifestImage]) -> list[ManifestImage]:
    """Copies of ``images`` whose ``group`` is merged across pixel-identical images (decodes every
    image once), so that :func:`assign_splits` keeps identical frames of different clips together."""
    uf = UnionFind()
    first: dict[str, str] = {}
    for im in images:
        g = _group_of(im)
        d = _pixel_digest(im.image)
        if d in first:
            uf.union(first[d], g)
        else:
            first[d] = g
            uf.find(g)
    return [replace(im, group=uf.find(_group_of(im))) for im in images]


def _pixel_digest(path: Path) -> str:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return hashlib.blake2b(arr.tobytes() + str(arr.shape).encode(), digest_size=16).hexdigest()


def leakage_report(
    images: Sequence[ManifestImage], *, check_pixels: bool = False, raise_on_problem: bool = True
) -> LeakageReport:
    """Check that no group / patient / clip and (with ``check_pixels``) no pixel-identical image
    spans two of train/val/test. Images with split ``excluded`` or ``None`` are ignored.

    Raises :class:`LeakageError` listing the problems unless ``raise_on_problem=False``.
    """
    rep = LeakageReport()
    active = [im for im in images if im.split in SPLITS]
    for s in SPLITS:
        rep.counts[s] = dict(sorted(Counter(im.label for im in active if im.split == s).items()))
    for attr in ("group", "patient_id"):
        seen: dict[tuple[str | None, str], set[str]] = defaultdict(set)
        for im in active:
            v = getattr(im, attr)
            if v:
                seen[(im.center, v)].add(im.split)  # type: ignore[arg-type]
        for (center, v), ss in sorted(seen.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if len(ss) > 1:
                rep.problems.append(f"{attr} {v!r} of center {center!r} is in splits {sorted(ss)}")
        if attr == "group":
            for s in SPLITS:
                rep.groups_per_split[s] = sum(1 for ss in seen.values() if s in ss)
    if check_pixels:
        by_digest: dict[str, set[str]] = defaultdict(set)
        names: dict[str, list[str]] = defaultdict(list)
        for im in active:
            d = _pixel_digest(im.image)
            by_digest[d].add(im.split)  # type: ignore[arg-type]
            names[d].append(im.key)
        for d, ss in by_digest.items():
            if len(ss) > 1:
                rep.problems.append(f"pixel-identical images {names[d]} are in splits {sorted(ss)}")
    if rep.problems and raise_on_problem:
        raise LeakageError("split leakage: " + "; ".join(rep.problems))
    return rep


def cv_group(im: ManifestImage) -> str:
    """The unit an image is kept together with in cross-validation and cross-fitting: its ``group``
    (near-duplicate group, clip), else its patient, else the image itself."""
    return im.group or im.patient_id or im.key


def cross_fit_fold(group: str, folds: int) -> int:
    """The cross-fitting fold (``0 .. folds-1``) of a group: a hash of the group id, so every tool
    (the detector trainer leaving a fold out, the fusion trainer pairing each image with the
    detector that did not see it) computes the same fold without sharing a file.

    >>> cross_fit_fold("p12", 3) == cross_fit_fold("p12", 3)
    True
    """
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    return int(hashlib.sha256(f"echo-cross-fit/{group}".encode()).hexdigest()[:12], 16) % folds


__all__ = [
    "cross_fit_fold",
    "cv_group",
    "DEFAULT_FRACTIONS",
    "DEFAULT_SEED",
    "EXCLUDED",
    "SPLITS",
    "LeakageError",
    "LeakageReport",
    "apply_splits",
    "assign_fold_splits",
    "assign_splits",
    "leakage_report",
    "merge_identical_groups",
    "read_split_file",
    "write_split_file",
]
