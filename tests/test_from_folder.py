"""A manifest built from a folder of images (labels from folders or a CSV, boxes from masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from echo_agent.errors import ManifestError
from echo_agent.eval.from_folder import boxes_from_mask, manifest_from_folder
from echo_agent.eval.manifest import load_manifest, write_manifest
from echo_agent.schemas import Box


def _image(path: Path, size: tuple[int, int] = (80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), 90, np.uint8)).save(path)
    return path


def _mask(path: Path, regions: list[tuple[int, int, int, int]], size: tuple[int, int] = (80, 60)) -> Path:
    m = np.zeros((size[1], size[0]), np.uint8)
    for x1, y1, x2, y2 in regions:
        m[y1:y2, x1:x2] = 255
    Image.fromarray(m).save(path)
    return path


@pytest.fixture()
def busi_like(tmp_path: Path) -> Path:
    """BUSI's layout: one folder per label (capitalised here), masks beside the images."""
    root = tmp_path / "data"
    _image(root / "Benign" / "b (1).png")
    _mask(root / "Benign" / "b (1)_mask.png", [(10, 5, 30, 20), (50, 30, 70, 50), (0, 0, 3, 3)])  # 9-px speck
    _image(root / "Benign" / "b (2).png")  # no mask: image-level only
    _image(root / "malignant" / "sub" / "m (1).png")
    _mask(root / "malignant" / "sub" / "m (1)_mask.png", [(20, 10, 60, 40)])
    _mask(root / "malignant" / "sub" / "m (1)_mask_1.png", [(0, 50, 10, 60)])  # a second lesion, its own file
    _image(root / "normal" / "n (1).png")
    _mask(root / "normal" / "n (1)_mask.png", [])  # BUSI ships empty masks for normals
    (root / "Benign" / "._b (1).png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource-fork copy
    _image(root / ".cache" / "benign" / "x.png")
    return root


def test_boxes_from_mask_one_per_component_and_small_ones_dropped():
    m = np.zeros((40, 40), bool)
    m[5:10, 5:20] = True
    m[20:30, 30:35] = True
    m[0, 39] = True
    assert boxes_from_mask(m, min_area=2) == [Box(x1=5, y1=5, x2=20, y2=10), Box(x1=30, y1=20, x2=35, y2=30)]
    assert boxes_from_mask(m, min_area=60) == [Box(x1=5, y1=5, x2=20, y2=10)]
    with pytest.raises(ValueError, match="2-D"):
        boxes_from_mask(np.zeros((4, 4, 3)))


def test_labels_from_folders_and_boxes_from_masks(busi_like: Path, tmp_path: Path):
    built = manifest_from_folder(busi_like, "breast", center="mine")
    by_name = {im.image.name: im for im in built.images}
    assert sorted(by_name) == ["b (1).png", "b (2).png", "m (1).png", "n (1).png"]  # masks are never images
    assert by_name["b (1).png"].label == "benign"
    assert by_name["b (1).png"].boxes == (Box(x1=10, y1=5, x2=30, y2=20), Box(x1=50, y1=30, x2=70, y2=50))
    assert by_name["m (1).png"].label == "malignant"  # the nearest folder named like a label
    assert by_name["m (1).png"].boxes == (Box(x1=20, y1=10, x2=60, y2=40), Box(x1=0, y1=50, x2=10, y2=60))
    assert by_name["n (1).png"].boxes == () and by_name["b (2).png"].boxes == ()
    assert {im.center for im in built.images} == {"mine"}
    assert built.counts == {"benign": 2, "malignant": 1, "normal": 1} and built.n_boxes == 4
    assert len(built.notes) == 1 and "1 lesion image(s) have no mask" in built.notes[0]
    # what it writes is a manifest the harness reads back unchanged
    path = write_manifest(built.images, tmp_path / "m.csv", relative_to=tmp_path)
    assert [(im.image, im.label, im.boxes) for im in load_manifest(path)] == [
        (im.image, im.label, im.boxes) for im in built.images]
    assert manifest_from_folder(busi_like, "breast", mask_pattern=None).n_boxes == 0


def test_labels_from_a_csv_with_metadata(tmp_path: Path):
    root = tmp_path / "Images"
    for name in ("bus_0001-l.png", "bus_0002-r.png", "bus_0003-l.png"):
        _image(root / name)
    _mask(root / "bus_0001-l_mask.png", [(5, 5, 25, 25)])
    sheet = tmp_path / "labels.csv"
    sheet.write_text("Image,Label,Category,Patient_ID,Age\n"
                     "bus_0001-l.png,Malignant,BI-RADS 5,p1,61\n"
                     "bus_0002-r,benign,3,p2,\n"          # by stem
                     "bus_0003-l.png,benign,4,p2,45\n")
    built = manifest_from_folder(root, "breast", labels=sheet)
    a, b, c = built.images
    assert (a.label, a.category, a.patient_id, a.age, a.boxes) == ("malignant", "BI-RADS 5", "p1", 61,
                                                                    (Box(x1=5, y1=5, x2=25, y2=25),))
    assert (b.label, b.category, b.age, c.age) == ("benign", "3", None, 45)

    own = tmp_path / "sheet.csv"  # a dataset's own sheet, its columns named on the command line
    own.write_text("ID,Pathology,BIRADS\nbus_0001-l,malignant,5\nbus_0002-r,benign,3\nbus_0003-l,benign,4\n")
    built = manifest_from_folder(root, "breast", labels=own, columns={"ID": "image", "pathology": "label"})
    assert [(im.label, im.category) for im in built.images] == [("malignant", "5"), ("benign", "3"), ("benign", "4")]
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['image', 'label'\]; its columns are \['ID'"):
        manifest_from_folder(root, "breast", labels=own)


def test_every_problem_is_reported_at_once(busi_like: Path, tmp_path: Path):
    _mask(busi_like / "normal" / "n (1)_mask.png", [(10, 10, 40, 40)])  # a normal image with a lesion mask
    _image(busi_like / "unsorted" / "x.png")                             # in no label folder
    with pytest.raises(ManifestError) as info:
        manifest_from_folder(busi_like, "breast")
    msg = str(info.value)
    assert "2 problem(s)" in msg and "n (1).png: labelled 'normal' but its mask" in msg
    assert "1 image(s) in no folder named like a label" in msg and "unsorted/x.png" in msg

    root = tmp_path / "flat"
    for name in ("a.png", "b.png", "sub/a.png"):
        _image(root / name)
    sheet = tmp_path / "labels.csv"
    _image(root / "c.png")
    sheet.write_text("image,label,age\nmissing.png,benign,\na,benign,\nb.png,cyst,\n"
                     "sub/a.png,benign,forty\n")
    with pytest.raises(ManifestError) as info:
        manifest_from_folder(root, "breast", labels=sheet)
    msg = str(info.value)
    for text in ("4 problem(s)", "line 2: image 'missing.png' matches no image file",
                 "line 3: image 'a' matches 2 files", "line 4: label 'cyst' is not a label", "line 5: column 'age'"):
        assert text in msg


def test_a_sheet_selects_the_images_and_one_label_can_cover_all(tmp_path: Path):
    root = tmp_path / "d"
    for name in ("images/1.png", "images/2.png", "images/3.png"):
        _image(root / name)
    (root / "masks").mkdir()
    m = np.zeros((60, 80), np.uint8)
    m[5:25, 5:45] = 255
    Image.fromarray(m).save(root / "masks" / "1.gif")  # GIF masks in a sibling folder (DDTI's layout)
    sheet = root / "labels.csv"
    sheet.write_text("image,tirads,case_id\nimages/1.png,4a,c1\nimages/2.png,,c2\n")  # 3.png is not listed
    built = manifest_from_folder(root / "images", "breast", labels=sheet, label="Benign",
                                 mask_pattern="../masks/{stem}.gif",
                                 columns={"tirads": "category", "case_id": "patient_id"})
    a, b = built.images
    assert (a.label, a.category, a.patient_id, a.boxes) == ("benign", "4a", "c1", (Box(x1=5, y1=5, x2=45, y2=25),))
    assert (b.label, b.category, b.boxes) == ("benign", None, ())
    assert any("1 image file(s) without a row in labels.csv were left out: 3.png" in n for n in built.notes)
    folder_wide = manifest_from_folder(root / "images", "breast", label="malignant", mask_pattern=None)
    assert [im.label for im in folder_wide.images] == ["malignant"] * 3
    with pytest.raises(ValueError, match="'cyst' is not a label"):
        manifest_from_folder(root / "images", "breast", label="cyst")


def test_bad_arguments_are_named(tmp_path: Path):
    with pytest.raises(ManifestError, match="is not a folder"):
        manifest_from_folder(tmp_path / "nowhere", "breast")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no image files"):
        manifest_from_folder(tmp_path / "empty", "breast")
    with pytest.raises(ValueError, match="needs {stem}"):
        manifest_from_folder(tmp_path / "empty", "breast", mask_pattern="mask_*")
    with pytest.raises(ManifestError, match="labels file"):
        _image(tmp_path / "one" / "a.png")
        manifest_from_folder(tmp_path / "one", "breast", labels=tmp_path / "no.csv")


def test_manifest_command_writes_then_refuses_to_overwrite(busi_like: Path, tmp_path: Path):
    from echo_agent.cli import app

    out = tmp_path / "out" / "m.csv"
    args = ["manifest", str(busi_like), "--organ", "breast", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 images (benign 2, malignant 1, normal 1), 4 lesion boxes" in res.output and "note:" in res.output
    assert len(load_manifest(out)) == 4
    before = out.read_text()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "exists" in res.output and out.read_text() == before
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    res = CliRunner().invoke(app, ["manifest", str(busi_like), "--organ", "liver", "--out", str(out), "--overwrite"])
    assert res.exit_code == 2 and "not registered" in res.output


def test_busi_folder_gives_the_staged_boxes(shared_data: Path):
    """BUSI as distributed (label folders, `_mask` / `_mask_1` files): the manifest built from the
    folder has exactly the boxes the staging computed (boxes.csv, specks under 50 px left out)."""
    import csv

    root = shared_data / "BUSI"
    built = manifest_from_folder(root, "breast")
    assert built.counts == {"benign": 437, "malignant": 210, "normal": 133}
    staged: dict[str, list[tuple[int, ...]]] = {}
    with (root / "boxes.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["speck_lt50px"] != "True":
                staged.setdefault(r["image"], []).append(tuple(int(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")))
    for im in built.images:
        mine = sorted((int(b.x1), int(b.y1), int(b.x2), int(b.y2)) for b in im.boxes)
        assert mine == sorted(staged.get(im.image.relative_to(root).as_posix(), [])), im.image


def test_kidney_folder_with_renamed_labels_gives_the_adapters_boxes(shared_data: Path):
    """Hydronephrosis-NCNU as distributed (abnormal/ and normal/ folders, `_M.jpg` masks): with
    abnormal=hydronephrosis and the adapter's 150-px components, every frame gets the adapter's boxes."""
    from echo_agent.eval.datasets import load_center

    root = shared_data / "Hydronephrosis-NCNU"
    built = manifest_from_folder(root, "kidney", mask_pattern="{stem}_M*", min_area=150,
                                 label_map={"Abnormal": "hydronephrosis"})
    assert built.counts == {"hydronephrosis": 1342, "normal": 654}
    def key(im):  # noqa: ANN001, ANN202
        return im.label, sorted((b.x1, b.y1, b.x2, b.y2) for b in im.boxes)

    ref = {Path(im.image).resolve(): key(im) for im in load_center("hydronephrosis_ncnu").images}
    assert {im.image: key(im) for im in built.images} == ref
    with pytest.raises(ValueError, match="maps to no label"):
        manifest_from_folder(root, "kidney", label_map={"abnormal": "hydro"})


def test_ddti_folder_with_its_own_sheet_gives_the_plugins_boxes(shared_data: Path):
    """DDTI as distributed (images/, GIF masks in masks/, a sheet with tirads and case_id): one label
    for all, the sheet's columns renamed; every nodule matches the thyroid plug-in's adapter."""
    from echo_agent.eval.datasets import load_center
    from echo_agent.organs import list_organs

    if "thyroid" not in {o.name for o in list_organs()}:
        pytest.skip("the thyroid plug-in is not installed")
    root = shared_data / "DDTI-thyroid"
    built = manifest_from_folder(root / "images", "thyroid", labels=root / "labels.csv", label="nodule",
                                 mask_pattern="../masks/{stem}.gif",
                                 columns={"tirads": "category", "case_id": "patient_id"})

    def key(im):  # noqa: ANN001, ANN202
        return im.label, sorted((b.x1, b.y1, b.x2, b.y2) for b in im.boxes), (im.category or "").upper(), im.patient_id

    assert {im.image: key(im) for im in built.images} == {
        Path(im.image).resolve(): key(im) for im in load_center("ddti").images}


def test_masks_named_otherwise_than_their_images(tmp_path: Path):
    """BUS-BRA-style naming: images/bus_0001-l.png, masks/mask_0001-l.png, a sheet of its own columns."""
    root = tmp_path / "set"
    _image(root / "images" / "bus_0001-l.png")
    (root / "masks").mkdir()
    _mask(root / "masks" / "mask_0001-l.png", [(10, 10, 40, 30)])
    _image(root / "images" / "bus_0002-r.png")
    _mask(root / "masks" / "mask_0002-r.png", [(5, 5, 20, 50)])
    sheet = root / "data.csv"
    sheet.write_text("ID,Pathology,BIRADS\nbus_0001-l,benign,3\nbus_0002-r,malignant,4\n")
    built = manifest_from_folder(root / "images", "breast", labels=sheet, mask_pattern="../masks/{stem}.png",
                                 mask_rename={"bus_": "mask_"},
                                 columns={"ID": "image", "Pathology": "label", "BIRADS": "category"})
    assert [(im.image.name, im.label, im.category, im.boxes) for im in built.images] == [
        ("bus_0001-l.png", "benign", "3", (Box(x1=10, y1=10, x2=40, y2=30),)),
        ("bus_0002-r.png", "malignant", "4", (Box(x1=5, y1=5, x2=20, y2=50),))]
    assert built.notes == ()
    # without the rename the masks are not found: image-level only, and the note says so
    plain = manifest_from_folder(root / "images", "breast", labels=sheet, mask_pattern="../masks/{stem}.png",
                                 columns={"ID": "image", "Pathology": "label", "BIRADS": "category"})
    assert plain.n_boxes == 0 and "2 lesion image(s) have no mask" in plain.notes[0]
    # a rename that matches no image name is pointed out
    miss = manifest_from_folder(root / "images", "breast", labels=sheet, mask_pattern="../masks/{stem}.png",
                                mask_rename={"img_": "mask_"}, columns={"ID": "image", "Pathology": "label"})
    assert any("no image name contains 'img_'" in n for n in miss.notes)
    with pytest.raises(ValueError, match="needs a mask_pattern"):
        manifest_from_folder(root / "images", "breast", label="benign", mask_pattern=None, mask_rename={"bus_": "m_"})
    with pytest.raises(ValueError, match="text to replace"):
        manifest_from_folder(root / "images", "breast", label="benign", mask_rename={"": "m_"})

    from echo_agent.cli import app

    out = tmp_path / "m.csv"
    res = CliRunner().invoke(app, ["manifest", str(root / "images"), "--organ", "breast", "--out", str(out),
                                   "--labels", str(sheet), "--mask-pattern", "../masks/{stem}.png",
                                   "--mask-rename", "bus_=mask_", "--column", "ID=image",
                                   "--column", "Pathology=label", "--column", "BIRADS=category"])
    assert res.exit_code == 0, res.output
    assert "2 lesion boxes" in res.output
    assert [im.boxes for im in load_manifest(out)] == [im.boxes for im in built.images]
