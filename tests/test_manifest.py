"""Manifest CSV parsing, writing and every validation error (messages name the file and line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from echo_agent.errors import ManifestError
from echo_agent.eval.manifest import MANIFEST_COLUMNS, ManifestImage, load_manifest, write_manifest
from echo_agent.schemas import Box

HEADER = "image,organ,label,x_min,y_min,x_max,y_max,birads,center,patient_id,group,split,age,symptoms\n"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    Image.new("L", (100, 80)).save(tmp_path / "a.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (30, 30)).save(tmp_path / "sub" / "c.png")
    return tmp_path


def _write(folder: Path, body: str, header: str = HEADER) -> Path:
    p = folder / "m.csv"
    p.write_text(header + body)
    return p


def test_parses_rows_into_images_with_boxes_and_metadata(folder: Path) -> None:
    p = _write(
        folder,
        "a.png,breast,benign,1,2,50,60,3,c1,p1,g1,train,54,palpable\n"
        "a.png,breast,benign,10,10,100,80,3,c1,p1,g1,train,54,palpable\n"
        "b.png,breast,normal,,,,,1,c1,p2,g2,test,,\n"
        "sub/c.png,kidney,hydronephrosis,0,0,30,30,,c2,,,,,\n",
    )
    ims = load_manifest(p)
    assert [im.image.name for im in ims] == ["a.png", "b.png", "c.png"]
    a, b, c = ims
    assert a.image == (folder / "a.png").resolve()
    assert a.boxes == (Box(x1=1, y1=2, x2=50, y2=60), Box(x1=10, y1=10, x2=100, y2=80))
    assert (a.birads, a.center, a.patient_id, a.group, a.split, a.age, a.symptoms) == (
        "3", "c1", "p1", "g1", "train", 54, "palpable")
    assert a.rows == (2, 3)
    assert b.boxes == () and b.age is None and b.label == "normal"
    assert c.organ == "kidney" and c.boxes == (Box(x1=0, y1=0, x2=30, y2=30),)
    assert a.key.startswith("c1:") and a.key != b.key


def test_minimal_columns_and_absolute_paths(folder: Path) -> None:
    p = _write(folder, f"{folder / 'b.png'},breast,malignant\n", header="image,organ,label\n")
    (im,) = load_manifest(p)
    assert im.boxes == () and im.label == "malignant" and im.image == folder / "b.png"


def test_organ_and_label_are_read_without_regard_to_case(folder: Path) -> None:
    """Another center's sheet writes 'Breast' / 'Malignant': read as the registered names, not refused."""
    p = _write(folder, "a.png,Breast,Malignant\nb.png,KIDNEY,Hydronephrosis\n", header="image,organ,label\n")
    a, b = load_manifest(p)
    assert (a.organ, a.label, b.organ, b.label) == ("breast", "malignant", "kidney", "hydronephrosis")


def test_write_then_load_round_trips(folder: Path) -> None:
    ims = [
        ManifestImage(image=folder / "a.png", organ="breast", label="malignant",
                      boxes=(Box(x1=1, y1=2, x2=3.5, y2=4),), category="4C", center="x", age=61, symptoms="a, b"),
        ManifestImage(image=folder / "sub" / "c.png", organ="kidney", label="normal", group="clip1", split="val"),
    ]
    out = write_manifest(ims, folder / "out" / "m.csv", relative_to=folder / "out")
    assert out.read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    assert "../a.png" in out.read_text()
    assert load_manifest(out) == ims
    with pytest.raises(FileExistsError):
        write_manifest(ims, out)
    write_manifest(ims, out, overwrite=True)
    absolute = write_manifest(ims, folder / "abs.csv")
    assert str(folder / "a.png") in absolute.read_text()


@pytest.mark.parametrize(
    ("body", "header", "fragments"),
    [
        ("a.png,breast\n", "image,organ\n", ["line 1", "missing required column", "label"]),
        ("missing.png,breast,benign,,,,\n", None, ["line 2", "missing.png", "does not exist"]),
        ("a.png,liver,benign,,,,\n", None, ["line 2", "'liver'", "not registered"]),
        ("a.png,breast,cyst,,,,\n", None, ["line 2", "'cyst'", "normal", "malignant"]),
        ("a.png,breast,benign,1,2,x3,4\n", None, ["line 2", "'x_max'", "'x3'", "number"]),
        ("a.png,breast,benign,1,2,,4\n", None, ["line 2", "partial box", "x_max"]),
        ("a.png,breast,benign,1,2,200,60\n", None, ["line 2", "outside", "100x80"]),
        ("a.png,breast,benign,1,2,50,81\n", None, ["line 2", "outside"]),
        ("a.png,breast,benign,50,2,50,60\n", None, ["line 2", "x_max > x_min"]),
        ("a.png,breast,benign,-1,2,50,60\n", None, ["line 2", "negative"]),
        ("a.png,breast,normal,1,2,50,60\n", None, ["line 2", "lesion-free", "box"]),
        ("a.png,breast,benign,1,2,5,6\nb.png,breast,normal,,,,\na.png,breast,malignant,1,2,5,6\n", None,
         ["lines 2, 4", "disagree"]),
        ("a.png,breast,benign,1,2,5,6,,,,,,forty\n",
         "image,organ,label,x_min,y_min,x_max,y_max,birads,center,patient_id,group,split,age\n",
         ["line 2", "'age'"]),
        ("a.png,breast,benign,1,2\n", "image,organ,label,x_min,y_min\n", ["line 1", "all four"]),
        (",breast,benign,,,,\n", None, ["line 2", "'image' is empty"]),
        ("b.png,breast,normal,,,,\nb.png,breast,normal,,,,,,,,,,,,,extra\n", None, ["line 3", "more cells"]),
    ],
)
def test_validation_errors_name_file_and_line(folder: Path, body: str, header: str | None,
                                              fragments: list[str]) -> None:
    hdr = header if header is not None else "image,organ,label,x_min,y_min,x_max,y_max\n"
    p = _write(folder, body, header=hdr)
    with pytest.raises(ManifestError) as exc:
        load_manifest(p)
    msg = str(exc.value)
    assert str(p) in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_checks_can_be_disabled(folder: Path) -> None:
    p = _write(folder, "missing.png,breast,benign,1,2,5000,60\n", header="image,organ,label,x_min,y_min,x_max,y_max\n")
    with pytest.raises(ManifestError):
        load_manifest(p)
    (im,) = load_manifest(p, check_files=False, check_boxes=False)
    assert im.boxes[0].x2 == 5000
    p2 = _write(folder, "a.png,breast,benign,1,2,5000,60\n", header="image,organ,label,x_min,y_min,x_max,y_max\n")
    assert load_manifest(p2, check_boxes=False)[0].boxes[0].x2 == 5000


def test_every_bad_row_is_reported_at_once(folder: Path) -> None:
    (folder / "broken.png").write_bytes(b"not an image")
    p = _write(
        folder,
        "a.png,breast,benign,1,2,50,60,,,,,,,\n"
        "a.png,breast,benign,1,2,500,60,,,,,,,\n"            # line 3: box outside the image
        "gone.png,breast,benign,,,,,,,,,,,\n"                # line 4: missing file
        "broken.png,breast,malignant,1,1,5,5,,,,,,,\n"       # line 5: not an image
        "b.png,breast,benin,,,,,,,,,,,\n",                   # line 6: label typo
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: 4 problems; fix them all")
    entries = msg.split("\n  ")[1:]
    assert len(entries) == 4
    for entry, (line, text) in zip(entries, ((3, "lies outside the 100x80"), (4, "gone.png does not exist"),
                                             (5, "cannot be read as an image"), (6, "label 'benin' is not")), strict=True):
        assert entry.startswith(f"line {line}: ") and text in entry


def test_a_long_list_of_problems_is_cut_with_a_count(folder: Path) -> None:
    from echo_agent.eval.manifest import MAX_REPORTED_PROBLEMS

    p = _write(folder, "".join(f"x{i}.png,breast,normal,,,,,,,,,,,\n" for i in range(MAX_REPORTED_PROBLEMS + 5)))
    with pytest.raises(ManifestError, match=r"(?s)25 problems.*\n  line 2: .*\.\.\. and 5 more$") as info:
        load_manifest(p)
    assert str(info.value).count("does not exist") == MAX_REPORTED_PROBLEMS


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")


def test_blank_lines_are_skipped(folder: Path) -> None:
    p = _write(folder, "a.png,breast,benign,1,2,5,6\n\nb.png,breast,normal,,,,\n",
               header="image,organ,label,x_min,y_min,x_max,y_max\n")
    assert [im.rows for im in load_manifest(p)] == [(2,), (4,)]


@pytest.mark.realdata
def test_prepare_data_writes_loadable_manifests(shared_data: Path, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_data", Path(__file__).resolve().parents[1] / "tools" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    assert mod.main(["--out", str(tmp_path), "--relative", "--centers", "breast_lesions_usg",
                     "--data-root", str(shared_data)]) == 0
    folder = tmp_path / "breast_lesions_usg"
    every = load_manifest(folder / "all.csv")
    parts = [load_manifest(folder / f"{s}.csv") for s in ("train", "val", "test")]
    assert len(every) == 256 == sum(len(p) for p in parts)
    assert all(im.split == s for p, s in zip(parts, ("train", "val", "test"), strict=True) for im in p)
    assert "../" in (folder / "all.csv").read_text().splitlines()[1]  # relative paths
    assert sum(len(im.boxes) for im in every) == 252
    assert {im.label for im in every} == {"normal", "benign", "malignant"}
    assert (folder / "flags.csv").read_text().count("other_finding") == 7


def test_dicom_images_with_boxes_are_checked_against_their_decoded_size(tmp_path: Path) -> None:
    """Pillow cannot read a DICOM header; the box check decodes it instead of refusing the image."""
    import numpy as np
    from test_agent import _dicom

    _dicom(tmp_path / "a.dcm", np.full((80, 100, 3), 90, np.uint8))
    p = _write(tmp_path, "a.dcm,breast,benign,10,10,40,40\n", header="image,organ,label,x_min,y_min,x_max,y_max\n")
    (im,) = load_manifest(p)
    assert im.boxes == (Box(x1=10, y1=10, x2=40, y2=40),)
    p = _write(tmp_path, "a.dcm,breast,benign,10,10,140,40\n", header="image,organ,label,x_min,y_min,x_max,y_max\n")
    with pytest.raises(ManifestError, match="outside the 100x80 image a.dcm"):
        load_manifest(p)
