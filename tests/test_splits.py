"""Leakage-safe splitting (synthetic cases) and the committed split files of the staged data."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo_agent.errors import ManifestError
from echo_agent.eval.manifest import ManifestImage
from echo_agent.eval.splits import (
    EXCLUDED,
    LeakageError,
    apply_splits,
    assign_fold_splits,
    assign_splits,
    cross_fit_fold,
    cv_group,
    leakage_report,
    read_split_file,
    write_split_file,
)


def _images(n_groups: int = 60, seed: int = 0) -> list[ManifestImage]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        label = ("normal", "benign", "malignant")[g % 3]
        for k in range(int(rng.integers(1, 5))):
            out.append(ManifestImage(image=Path(f"/d/g{g}_{k}.png"), organ="breast", label=label,
                                     center="synthetic", group=f"g{g}"))
    return out


def test_groups_stay_together_and_fractions_are_close() -> None:
    ims = _images()
    a = assign_splits(ims, seed=1)
    assert set(a) == {im.key for im in ims}
    by_group = defaultdict(set)
    for im in ims:
        by_group[im.group].add(a[im.key])
    assert all(len(s) == 1 for s in by_group.values())
    n = Counter(a.values())
    assert abs(n["train"] / len(ims) - 0.7) < 0.08 and abs(n["test"] / len(ims) - 0.2) < 0.08 and n["val"] > 0
    for label in ("normal", "benign", "malignant"):  # stratified: every label in every split
        assert {a[im.key] for im in ims if im.label == label} == {"train", "val", "test"}


def test_fixed_seed_is_deterministic_and_seed_matters() -> None:
    ims = _images()
    assert assign_splits(ims, seed=5) == assign_splits(list(reversed(ims)), seed=5)
    assert assign_splits(ims, seed=5) != assign_splits(ims, seed=6)


def test_forced_assignments() -> None:
    ims = _images()
    first_g0 = next(im for im in ims if im.group == "g0")
    g1 = [im for im in ims if im.group == "g1"]
    a = assign_splits(ims, forced={first_g0.key: EXCLUDED, g1[0].key: "train"})
    assert a[first_g0.key] == EXCLUDED
    assert {a[im.key] for im in g1} == {"train"}


def test_fold_splits_put_test_folds_in_test_only() -> None:
    ims = _images(40)
    folds = {im.key: 1 + int(im.group[1:]) % 4 for im in ims}
    a = assign_fold_splits(ims, folds, test_folds=(4,))
    for im in ims:
        assert (a[im.key] == "test") == (folds[im.key] == 4)
    assert {"train", "val"} <= set(a.values())
    with pytest.raises(ManifestError, match="no fold"):
        assign_fold_splits(ims, {})


def test_leakage_report_flags_groups_patients_and_pixel_duplicates(tmp_path: Path) -> None:
    ims = apply_splits(_images(), assign_splits(_images()))
    rep = leakage_report(ims)
    assert rep.ok and sum(sum(c.values()) for c in rep.counts.values()) == len(ims)
    broken = list(ims)
    j = next(k for k, im in enumerate(broken) if im.split != broken[0].split)
    broken[j] = replace(broken[j], group=broken[0].group)
    with pytest.raises(LeakageError, match="group"):
        leakage_report(broken)
    assert not leakage_report(broken, raise_on_problem=False).ok
    # patients
    p = [replace(im, patient_id="P1" if k in (0, j) else None) for k, im in enumerate(ims)]
    assert any("patient_id 'P1'" in s for s in leakage_report(p, raise_on_problem=False).problems)
    # pixel-identical images in different groups and splits
    arr = np.full((8, 8), 7, np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    Image.fromarray(arr).convert("RGB").save(tmp_path / "y.png")  # same pixels, other encoding
    Image.fromarray(arr + 1).save(tmp_path / "z.png")
    dup = [
        ManifestImage(image=tmp_path / "x.png", organ="breast", label="benign", group="a", split="train"),
        ManifestImage(image=tmp_path / "y.png", organ="breast", label="malignant", group="b", split="test"),
        ManifestImage(image=tmp_path / "z.png", organ="breast", label="benign", group="c", split="val"),
    ]
    assert leakage_report(dup).ok
    rep = leakage_report(dup, check_pixels=True, raise_on_problem=False)
    assert len(rep.problems) == 1 and "pixel-identical" in rep.problems[0]


def test_split_file_round_trip(tmp_path: Path) -> None:
    a = {"c:b.png": "val", "c:a.png": "train"}
    p = write_split_file(a, tmp_path / "s.csv")
    assert p.read_text().splitlines() == ["key,split", "c:a.png,train", "c:b.png,val"]
    assert read_split_file(p) == a
    ims = [ManifestImage(image=Path("/x/q.png"), organ="breast", label="normal", center="c")]
    with pytest.raises(ManifestError, match="no split assignment"):
        apply_splits(ims, a)
    assert apply_splits(ims, a, strict=False)[0].split is None


# -- committed splits of the staged data ------------------------------------------------------

CENTERS = ("busi", "breast_lesions_usg", "hydronephrosis_ncnu")


@pytest.mark.realdata
@pytest.mark.parametrize("center", CENTERS)
def test_committed_splits_cover_data_without_leakage(shared_data: Path, center: str) -> None:
    from echo_agent.eval.datasets import load_center, split_file

    build = load_center(center, shared_data)
    committed = read_split_file(split_file(center))
    assert set(committed) == {im.key for im in build.images}
    ims = apply_splits(build.images, committed)
    rep = leakage_report(ims)  # raises on any group / patient / clip crossing splits
    sizes = {s: sum(c.values()) for s, c in rep.counts.items()}
    assert 0.6 < sizes["train"] / sum(sizes.values()) < 0.8
    assert sizes["val"] > 0 and sizes["test"] > 0
    if center == "hydronephrosis_ncnu":
        for im in ims:
            assert (im.split == "test") == (build.folds[im.key] == 4)
    if center == "busi":
        excluded = {im.key for im in ims if im.split == EXCLUDED}
        flagged = {k for k, f in build.flags.items() if "cross_class_duplicate" in f}
        assert excluded == flagged and "busi:benign/benign (433).png" in excluded
        assert "busi:malignant/malignant (145).png" in excluded


@pytest.mark.realdata
def test_known_identical_hydronephrosis_frames_share_a_split(shared_data: Path) -> None:
    from echo_agent.eval.datasets import split_file

    committed = read_split_file(split_file("hydronephrosis_ncnu"))
    pairs = [
        ("fold1/normal/20210224_S0000027_US000001_000.jpg", "fold3/normal/20210224_S0000028_US000001_000.jpg"),
        ("fold2/abnormal/CANON_20210414_150447_1504510033_000.jpg",
         "fold3/abnormal/CANON_20210414_150447_1504500032_237.jpg"),
    ]
    for a, b in pairs:
        assert committed[f"hydronephrosis_ncnu:{a}"] == committed[f"hydronephrosis_ncnu:{b}"]


@pytest.mark.realdata
def test_breast_lesions_usg_splits_recompute_identically(shared_data: Path) -> None:
    from echo_agent.eval.datasets import compute_splits, load_center, split_file

    build = load_center("breast_lesions_usg", shared_data)
    assert compute_splits(build) == read_split_file(split_file("breast_lesions_usg"))


def test_cross_fit_folds_keep_groups_together_and_leave_each_image_out_once() -> None:
    import importlib.util

    images = _images(90)
    folds = [cross_fit_fold(cv_group(im), 3) for im in images]
    assert set(folds) == {0, 1, 2}
    by_group = defaultdict(set)
    for im, f in zip(images, folds):
        by_group[im.group].add(f)
    assert all(len(f) == 1 for f in by_group.values())  # a group is never split across folds
    sizes = Counter(next(iter(f)) for f in by_group.values())
    assert min(sizes.values()) >= 20  # 90 groups: roughly a third each
    assert cross_fit_fold("g1", 3) == cross_fit_fold("g1", 3)  # no state, no file needed
    with pytest.raises(ValueError):
        cross_fit_fold("g1", 1)
    # the detector trainer's training set for fold k is exactly the images whose fold is not k
    spec = importlib.util.spec_from_file_location("train_detector", Path(__file__).parents[1] / "tools" / "train_detector.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for k in range(3):
        kept = tool.leave_fold_out(images, k, 3)
        assert kept == [im for im, f in zip(images, folds) if f != k]
    assert tool.leave_fold_out(images, None, None) == images
    # cv_group: group, else patient, else the image itself
    im = images[0]
    assert cv_group(im) == im.group
    assert cv_group(replace(im, group=None, patient_id="p7")) == "p7"
    assert cv_group(replace(im, group=None, patient_id=None)) == im.key


def test_split_pools_join_splits_but_never_test() -> None:
    from echo_agent.eval.datasets import parse_split_pool

    assert parse_split_pool("train") == ("train",)
    assert parse_split_pool("train+val") == ("train", "val")
    assert parse_split_pool("test") == ("test",)
    for bad, why in (("train+test", "never pooled"), ("valid", "unknown split"), ("train+train", "twice"),
                     ("train+", "unknown split")):
        with pytest.raises(ValueError, match=why):
            parse_split_pool(bad)


def test_models_never_train_on_test() -> None:
    import subprocess
    import sys

    from echo_agent.eval.datasets import training_split

    assert training_split("train+val") == ("train", "val") and training_split("val") == ("val",)
    for bad, why in (("test", "never train on test"), ("train+test", "never pooled"), ("tran", "unknown split")):
        with pytest.raises(ValueError, match=why):
            training_split(bad)
    # every trainer refuses it up front, before any data is read
    repo = Path(__file__).resolve().parents[1]
    for tool, config in (("train_classifier.py", "configs/classifier/kidney.yaml"),
                         ("train_lite_detector.py", "configs/lite_detector/kidney.yaml"),
                         ("train_detector.py", "configs/detector/kidney.yaml")):
        proc = subprocess.run([sys.executable, str(repo / "tools" / tool), str(repo / config), "--train-split", "test"],
                              capture_output=True, text=True, timeout=300, cwd=repo)
        assert proc.returncode == 2 and "never train on test" in proc.stderr, (tool, proc.stderr[-1500:])


@pytest.mark.realdata
def test_the_development_pool_is_train_and_val_together(shared_data: Path) -> None:
    from echo_agent.eval.datasets import load_split

    train = load_split("hydronephrosis_ncnu", "train", root=shared_data)
    val = load_split("hydronephrosis_ncnu", "val", root=shared_data)
    pool = load_split("hydronephrosis_ncnu", "train+val", root=shared_data)
    assert {im.key for im in pool} == {im.key for im in train} | {im.key for im in val}
    assert len(pool) == len(train) + len(val) and not any(im.split == "test" for im in pool)


def test_more_staged_kidney_folds_become_test_and_leave_the_committed_splits(
        shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folds 5-10 of Hydronephrosis-NCNU were never staged here; a user who stages them gets them as
    test images (no packaged model trained on them), and folds 1-4 keep their committed splits, both
    when loading and when the split files are recomputed."""
    import csv
    import shutil

    from echo_agent.eval.datasets import (
        HYDRONEPHROSIS_NCNU,
        committed_splits,
        compute_splits,
        load_center,
        load_split,
        split_file,
    )
    from echo_agent.eval.splits import read_split_file

    src = shared_data / "Hydronephrosis-NCNU"
    dst = tmp_path / "Hydronephrosis-NCNU"
    with (src / "frames.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    picked = [next(r for r in rows if r["fold"] == str(f) and r["label"] == lbl) for f in (1, 2, 3, 4)
              for lbl in ("abnormal", "normal")]
    # three frames staged as a new fold 5 (copies of development frames under new names and clips)
    extra = [dict(r, fold="5", image=f"fold5/{r['label']}/new_{i}.jpg", mask="", clip_id=f"new_clip_{i}")
             for i, r in enumerate(picked[:3])]
    for r, source in [*((r, r) for r in picked), *zip(extra, picked[:3])]:
        (dst / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / source["image"], dst / r["image"])
    with (dst / "frames.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(picked + extra)
    shutil.copy(src / "boxes.csv", dst / "boxes.csv")
    monkeypatch.setenv("ECHO_AGENT_DATA", str(tmp_path))

    build = load_center(HYDRONEPHROSIS_NCNU)
    committed = read_split_file(split_file(HYDRONEPHROSIS_NCNU))
    splits = committed_splits(build)
    for im in build.images:
        expected = "test" if build.folds[im.key] == 5 else committed[im.key]
        assert splits[im.key] == expected
    test = load_split(HYDRONEPHROSIS_NCNU, "test")
    assert {im.image.name for im in test} >= {"new_0.jpg", "new_1.jpg", "new_2.jpg"}
    recomputed = compute_splits(build)
    assert all(v == "test" for k, v in recomputed.items() if build.folds[k] in (4, 5))
    assert all(v in ("train", "val") for k, v in recomputed.items() if build.folds[k] in (1, 2, 3))


def test_new_patients_staged_later_are_test_and_a_known_patient_is_refused(tmp_path: Path) -> None:
    """A center whose staged copy is partial (``new_images_are_test``): an image the committed file
    does not list is test when its patient is new, and refused when a development patient owns it."""
    from echo_agent.eval.datasets import (
        CenterSpec,
        DatasetBuild,
        committed_splits,
        load_split,
        register_center,
        unregister_center,
    )
    from echo_agent.eval.splits import write_split_file

    def image(name: str, patient: str) -> ManifestImage:
        return ManifestImage(image=tmp_path / name, organ="breast", label="benign", center="toy_partial",
                             patient_id=patient, group=patient)

    staged = [image("a.png", "p1"), image("b.png", "p2")]
    later = [image("c.png", "p3"), image("d.png", "p1")]  # p3 is new; p1 is a train patient
    split = write_split_file({staged[0].key: "train", staged[1].key: "test"}, tmp_path / "toy.csv")
    register_center(CenterSpec("toy_partial", "breast", "toy", lambda root: DatasetBuild("toy_partial", staged + later),
                               split, new_images_are_test=True))
    try:
        splits = committed_splits(DatasetBuild("toy_partial", staged + later))
        assert splits[later[0].key] == "test" and later[1].key not in splits
        with pytest.raises(ManifestError, match="no split assignment"):
            load_split("toy_partial", "test")
        register_center(CenterSpec("toy_partial", "breast", "toy", lambda root: DatasetBuild("toy_partial", staged + later[:1]),
                                   split, new_images_are_test=True), replace=True)
        assert [im.image.name for im in load_split("toy_partial", "test")] == ["b.png", "c.png"]
    finally:
        unregister_center("toy_partial")
