"""The DDTI thyroid database as an echo-agent center (``ddti``).

Reads ``<data root>/DDTI-thyroid/`` as documented in its ``SOURCE.md``: one sample per nodule
(``labels.csv``), its outline as a GIF mask. Decisions:

* label ``nodule`` for every sample (the database has no nodule-free images and no pathology);
  the radiologist's TI-RADS category (``2``, ``3``, ``4a``, ``4b``, ``4c``, ``5``; blank for 162
  samples) goes to :attr:`ManifestImage.category`;
* one box per connected mask component of at least :data:`MIN_COMPONENT_PX` pixels;
* ``group`` = ``patient_id`` = ``case_id``: images of one case, and the two samples of a
  two-nodule image, are near-duplicates and stay in one split; the split balances the cases' majority
  TI-RADS category.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np

from echo_agent.errors import ManifestError
from echo_agent.eval.datasets import CenterSpec, DatasetBuild, dataset_folder
from echo_agent.eval.manifest import ManifestImage
from echo_agent.schemas import Box

CENTER = "ddti"
FOLDER = "DDTI-thyroid"
#: Mask components smaller than this (pixels of the 300 x 300 images) are outline specks.
MIN_COMPONENT_PX = 30
#: The TI-RADS categories in the data, in order.
TIRADS = ("2", "3", "4a", "4b", "4c", "5")


def mask_boxes(mask_path: Path, min_px: int = MIN_COMPONENT_PX) -> list[Box]:
    """One pixel box per connected component of a GIF mask (> 0 is nodule), as the library's
    :func:`~echo_agent.eval.from_folder.boxes_from_mask` draws them."""
    from PIL import Image

    from echo_agent.eval.from_folder import boxes_from_mask

    with Image.open(mask_path) as im:
        return boxes_from_mask(np.asarray(im.convert("L")) > 0, min_area=min_px)


def load_ddti(root: str | Path | None = None) -> DatasetBuild:
    """DDTI -> one manifest entry per nodule sample (flag ``no_category`` where TI-RADS is blank)."""
    folder = dataset_folder(CENTER, root)
    build = DatasetBuild(center=CENTER, images=[])
    with (folder / "labels.csv").open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    for line, r in enumerate(rows, start=2):
        cat = (r.get("tirads") or "").strip().lower() or None
        if cat is not None and cat not in TIRADS:
            raise ManifestError(f"{folder / 'labels.csv'}, line {line}: unknown TI-RADS category {cat!r}")
        boxes = mask_boxes(folder / r["mask"])
        im = ManifestImage(image=folder / r["image"], organ="thyroid", label="nodule", boxes=tuple(boxes),
                           category=cat, center=CENTER, patient_id=r["case_id"], group=r["case_id"])
        build.images.append(im)
        flags = (() if cat else ("no_category",)) + (() if boxes else ("no_box",))
        if flags:
            build.flags[im.key] = flags
    return build


def split_file() -> Path:
    """The committed case-level split of DDTI (written by ``tools/prepare_data.py --write-splits``)."""
    return Path(str(resources.files("echo_organ_thyroid") / "splits" / f"{CENTER}.csv"))


def ddti_center() -> CenterSpec:
    """The ``echo_agent.datasets`` entry point."""
    # the database has more cases than are staged here: cases staged later are test (never trained on)
    return CenterSpec(CENTER, "thyroid", FOLDER, load_ddti, split_file(), stratify_by="category",
                      new_images_are_test=True)
