"""Tests of echo_agent.imaging: load_image for every input type, its errors, overlays, PNG output.

Every fixture is generated here (tmp_path, in-memory PIL/pydicom objects); only the optional
real-data check reads ../shared/data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo_agent.errors import (
    ChannelLayoutError,
    DicomError,
    EchoInputError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnreadableImageError,
    UnsupportedFormatError,
)
from echo_agent.imaging import (
    ImageStore,
    LoadedImage,
    encode_png,
    example_image,
    load_image,
    pixel_hash,
    render_overlay,
    save_png,
)
from echo_agent.imaging.overlay import LABEL_COLOURS, OutputExistsError, label_colour
from echo_agent.schemas import Box, Detection, Finding

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
PATIENT_NAME = "Kowalska^Zofia^Secret"
PATIENT_ID = "PID-987654321"


# -- fixtures built in the tests ------------------------------------------------------------------


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    """A deterministic uint8 gray image where every row differs."""
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 3 + yy * 5) % 256).astype(np.uint8)


def rgb_image(h: int = 48, w: int = 64) -> np.ndarray:
    g = gradient(h, w)
    return np.stack([g, 255 - g, (g // 2 + 40).astype(np.uint8)], axis=2)


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    *,
    with_identifiers: bool = True,
    **attrs: object,
) -> Dataset:
    """An ultrasound DICOM dataset around ``pixels`` ((frames,) rows, cols(, 3))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    multi = pixels.ndim == (4 if photometric in ("RGB", "YBR_FULL") else 3)
    ds.SOPClassUID = US_MULTIFRAME_STORAGE if multi else US_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Manufacturer = "ACME Medical"
    if with_identifiers:
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = "19600101"
        ds.AccessionNumber = "ACC-55555"
        ds.InstitutionName = "Hidden Hospital"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose IDAT holds a few bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def assert_canonical(img: LoadedImage, h: int, w: int) -> None:
    assert isinstance(img, LoadedImage)
    assert img.array.shape == (h, w, 3) and img.array.dtype == np.uint8
    assert (img.width, img.height) == (w, h)
    assert not img.array.flags.writeable
    assert img.sha256 == pixel_hash(img.array)


# -- files on disk --------------------------------------------------------------------------------


def test_png_gray_and_rgb_paths(tmp_path: Path) -> None:
    g, c = gradient(), rgb_image()
    Image.fromarray(g).save(tmp_path / "g.png")
    Image.fromarray(c).save(tmp_path / "c.png")
    gi = load_image(tmp_path / "g.png")
    ci = load_image(str(tmp_path / "c.png"))
    assert_canonical(gi, 48, 64)
    assert np.array_equal(gi.array, as_rgb(g))
    assert np.array_equal(ci.array, c)
    assert gi.source_kind == "png" and gi.path == str(tmp_path / "g.png")
    assert gi.frame is None and gi.n_frames == 1 and gi.pixel_spacing_mm is None


def test_format_is_detected_from_content_not_extension(tmp_path: Path) -> None:
    p = tmp_path / "really_a_png.jpg"
    p.write_bytes(png_bytes(gradient()))
    img = load_image(p)
    assert img.source_kind == "png"
    assert np.array_equal(img.array, as_rgb(gradient()))


def test_jpeg_and_bmp_paths(tmp_path: Path) -> None:
    c = rgb_image(64, 80)
    Image.fromarray(c).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(c).save(tmp_path / "a.bmp")
    j = load_image(tmp_path / "a.jpg")
    b = load_image(tmp_path / "a.bmp")
    assert j.source_kind == "jpeg" and b.source_kind == "bmp"
    assert_canonical(j, 64, 80)
    assert np.array_equal(b.array, c)  # BMP is lossless
    assert np.abs(j.array.astype(int) - c.astype(int)).mean() < 6  # JPEG is close


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    c = np.zeros((40, 60, 3), np.uint8)
    c[:, :30] = 255  # left half white
    im = Image.fromarray(c)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "o.jpg")
    assert (img.height, img.width) == (60, 40)
    assert img.meta["exif_orientation_applied"] == 6
    assert img.array[5, 20].mean() > 200 and img.array[55, 20].mean() < 50  # white half now on top


def test_multipage_tiff_frames(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((40, 50), v, np.uint8)) for v in (10, 20, 30, 40, 50)]
    p = tmp_path / "cine.tif"
    pages[0].save(p, save_all=True, append_images=pages[1:])
    mid = load_image(p)
    assert mid.source_kind == "tiff" and mid.n_frames == 5 and mid.frame == 2
    assert int(mid.array[0, 0, 0]) == 30
    first = load_image(p, frame=0)
    assert first.frame == 0 and int(first.array[0, 0, 0]) == 10
    assert int(load_image(p, frame=4).array[0, 0, 0]) == 50
    with pytest.raises(EchoInputError, match=r"5 frame"):
        load_image(p, frame=5)
    with pytest.raises(EchoInputError):
        load_image(p, frame=-1)


def test_16bit_png_is_scaled_by_its_range(tmp_path: Path) -> None:
    a = np.linspace(1000, 5000, 48 * 64).reshape(48, 64).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)  # PIL writes a 16-bit grayscale PNG
    img = load_image(p)
    assert img.meta["mode"].startswith("I")
    assert int(img.array.min()) == 0 and int(img.array.max()) == 255
    assert np.all(np.diff(img.array[:, :, 0].ravel().astype(int)) >= 0)  # monotonic mapping


def test_bytes_input_kinds() -> None:
    data = png_bytes(gradient())
    for src in (data, bytearray(data), memoryview(data)):
        img = load_image(src)
        assert img.source_kind == "bytes-png" and img.path is None
        assert np.array_equal(img.array, as_rgb(gradient()))


# -- PIL images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA", "1", "F", "CMYK"])
def test_pil_modes(mode: str) -> None:
    base = Image.fromarray(rgb_image())
    if mode == "I;16":
        im = Image.fromarray(gradient().astype(np.uint16) * 200)
        assert im.mode == "I;16"
    elif mode == "F":
        im = Image.fromarray(gradient().astype(np.float32) / 255.0)
    else:
        im = base.convert(mode)
    before = im.tobytes()
    img = load_image(im)
    assert_canonical(img, 48, 64)
    assert img.source_kind == "pil" and img.meta["mode"] == mode
    assert im.tobytes() == before and im.mode == mode  # caller's image untouched
    if mode in ("L", "RGB", "RGBA", "P"):
        assert np.array_equal(img.array, np.asarray(im.convert("RGB")))  # RGBA here is fully opaque
    if mode == "I;16":
        assert int(img.array.min()) == 0 and int(img.array.max()) == 255
    if mode == "F":
        assert np.array_equal(img.array[:, :, 0], gradient())


def test_palette_with_transparency_is_composited_on_black() -> None:
    idx = np.zeros((40, 40), np.uint8)
    idx[10:30, 10:30] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([255, 255, 255, 200, 100, 50] + [0] * 762)
    im.info["transparency"] = 0  # palette entry 0 (white) is transparent
    img = load_image(im)
    assert tuple(img.array[0, 0]) == (0, 0, 0)
    assert tuple(img.array[20, 20]) == (200, 100, 50)


def test_rgba_alpha_zero_becomes_black_like_a_sector_fan() -> None:
    a = np.zeros((40, 40, 4), np.uint8)
    a[..., :3] = 255  # white RGB under a transparent corner, as in BrEaST sector images
    a[:, 20:, 3] = 255
    a[:, 10:20, 3] = 128
    img = load_image(a)
    assert np.all(img.array[:, :10] == 0)
    assert np.all(img.array[:, 20:] == 255)
    assert np.all(img.array[:, 10:20] == 128)


def test_multiframe_pil_object_reads_current_frame_and_restores_it(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (1, 2, 3)]
    p = tmp_path / "t.tif"
    pages[0].save(p, save_all=True, append_images=pages[1:])
    with Image.open(p) as im:
        im.seek(1)
        assert int(load_image(im).array[0, 0, 0]) == 2
        third = load_image(im, frame=2)
        assert third.frame == 2 and third.n_frames == 3 and int(third.array[0, 0, 0]) == 3
        assert im.tell() == 1


# -- numpy arrays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(48, 64), (48, 64, 1), (48, 64, 3), (48, 64, 4)], ids=["HxW", "HxWx1", "HxWx3", "HxWx4"]
)
def test_uint8_array_shapes(shape: tuple[int, ...]) -> None:
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    if len(shape) == 3 and shape[2] == 4:
        a[..., 3] = 255
    img = load_image(a)
    assert_canonical(img, 48, 64)
    expected = as_rgb(a.reshape(48, 64)) if len(shape) == 2 or shape[2] == 1 else a[..., :3]
    assert np.array_equal(img.array, expected)
    assert img.source_kind == "array" and img.meta["original_shape"] == list(shape)


def test_uint16_array_min_max_scaled() -> None:
    a = np.array([[100, 4195]] * 40, dtype=np.uint16).repeat(20, axis=1)
    img = load_image(a)
    assert int(img.array[0, 0, 0]) == 0 and int(img.array[0, -1, 0]) == 255


def test_float_arrays() -> None:
    unit = gradient().astype(np.float32) / 255.0
    assert np.array_equal(load_image(unit).array[:, :, 0], gradient())
    wide = gradient().astype(np.float64) * 10.0 - 500.0  # arbitrary range -> min-max
    out = load_image(wide).array[:, :, 0]
    assert int(out.min()) == 0 and int(out.max()) == 255
    bad = unit.copy()
    bad[0, 0] = np.nan
    with pytest.raises(EchoInputError, match="NaN"):
        load_image(bad)


def test_int64_with_8bit_values_is_kept() -> None:
    a = gradient().astype(np.int64)
    assert np.array_equal(load_image(a).array[:, :, 0], gradient())


def test_input_array_is_not_modified_and_output_is_independent() -> None:
    for a in (rgb_image(), gradient().astype(np.uint16) * 100, np.dstack([rgb_image(), np.full((48, 64), 7, np.uint8)])):
        before = a.copy()
        img = load_image(a)
        assert np.array_equal(a, before)
        assert a.flags.writeable
        assert not np.shares_memory(img.array, a)
        with pytest.raises(ValueError):
            img.array[0, 0, 0] = 1


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((48, 64, 2), np.uint8),
        np.zeros((48, 64, 5), np.uint8),
        np.zeros((2, 48, 64, 3), np.uint8),
        np.zeros((3, 48, 64), np.uint8),
        np.zeros((48,), np.uint8),
        np.zeros((48, 64), bool),
        np.zeros((48, 64), np.complex64),
    ],
    ids=["2ch", "5ch", "4d", "chw", "1d", "bool", "complex"],
)
def test_bad_array_layouts(bad: np.ndarray) -> None:
    with pytest.raises(ChannelLayoutError) as info:
        load_image(bad)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_frame_on_a_still_array_is_rejected() -> None:
    with pytest.raises(EchoInputError, match="frame"):
        load_image(gradient(), frame=1)
    assert load_image(gradient(), frame=0).frame is None


# -- DICOM ----------------------------------------------------------------------------------------


def test_dicom_monochrome2_12bit_window_from_path_bytes_and_dataset(tmp_path: Path) -> None:
    raw = np.linspace(0, 4095, 40 * 50).reshape(40, 50).astype(np.uint16)
    ds = make_dicom(raw, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096)
    data = dicom_bytes(ds)
    (tmp_path / "scan").write_bytes(data)  # no extension: detected by the DICM preamble
    from_path = load_image(tmp_path / "scan")
    from_bytes = load_image(data)
    from_ds = load_image(ds)
    assert from_path.source_kind == "dicom" and from_bytes.source_kind == "bytes-dicom"
    assert from_ds.source_kind == "dicom" and from_ds.path is None
    assert_canonical(from_path, 40, 50)
    assert np.array_equal(from_path.array, from_bytes.array) and np.array_equal(from_path.array, from_ds.array)
    g = from_path.array[:, :, 0]
    assert int(g.min()) == 0 and int(g.max()) == 255
    assert from_path.meta["voi"] == "window" and from_path.meta["modality"] == "US"
    # A narrow window saturates everything above its upper edge.
    narrow = load_image(make_dicom(raw, "MONOCHROME2", 12, WindowCenter=500, WindowWidth=200))
    assert int(narrow.array[-1, -1, 0]) == 255 and int(narrow.array[0, 0, 0]) == 0
    assert (narrow.array[:, :, 0] == 255).mean() > 0.8


def test_dicom_monochrome1_is_inverted() -> None:
    raw = np.tile(np.arange(50, dtype=np.uint8) * 5, (40, 1))
    m2 = load_image(make_dicom(raw, "MONOCHROME2"))
    m1 = load_image(make_dicom(raw, "MONOCHROME1"))
    assert np.array_equal(m2.array, as_rgb(raw))
    assert np.array_equal(m1.array, 255 - m2.array)
    assert m1.meta["inverted"] is True


def test_dicom_rgb_and_ybr_full() -> None:
    c = rgb_image(40, 50)
    rgb = load_image(make_dicom(c, "RGB"))
    assert np.array_equal(rgb.array, c)
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(c, "RGB", "YBR_FULL")
    back = load_image(make_dicom(ybr, "YBR_FULL"))
    assert np.abs(back.array.astype(int) - c.astype(int)).max() <= 3


def test_dicom_multiframe_default_middle_and_bad_index() -> None:
    frames = np.stack([np.full((40, 50), 10 * (i + 1), np.uint8) for i in range(5)])
    ds = make_dicom(frames, "MONOCHROME2")
    assert int(ds.NumberOfFrames) == 5
    mid = load_image(ds)
    assert mid.frame == 2 and mid.n_frames == 5 and int(mid.array[0, 0, 0]) == 30
    assert int(load_image(dicom_bytes(ds), frame=4).array[0, 0, 0]) == 50
    with pytest.raises(DicomError, match=r"5 frame") as info:
        load_image(ds, frame=7)
    assert "0..4" in str(info.value)


def test_dicom_identifiers_never_leak(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    ds = make_dicom(gradient(40, 50), "MONOCHROME2")
    p = tmp_path / "id.dcm"
    p.write_bytes(dicom_bytes(ds))
    for img in (load_image(p), load_image(ds)):
        text = repr(img) + repr(img.meta) + repr(img.to_ref(ImageStore()))
        for secret in (PATIENT_NAME, "Kowalska", PATIENT_ID, "19600101", "ACC-55555", "Hidden Hospital"):
            assert secret not in text
        assert set(img.meta) <= {
            "modality", "manufacturer", "manufacturer_model", "rows", "columns", "photometric_interpretation",
            "bits_stored", "samples_per_pixel", "n_frames", "transfer_syntax", "modality_lut", "voi",
            "inverted", "pixel_spacing_source",
        }
    assert all("Kowalska" not in str(w.message) for w in recwarn.list)
    assert any("DICOM" in r.getMessage() for r in caplog.records)  # the loader does log ...
    assert "Kowalska" not in caplog.text and PATIENT_ID not in caplog.text  # ... but no identifiers
    with pytest.raises(DicomError) as info:
        load_image(ds, frame=3)
    assert "Kowalska" not in str(info.value) and PATIENT_ID not in str(info.value)


def test_dicom_pixel_spacing_and_ultrasound_regions() -> None:
    ds = make_dicom(gradient(40, 50), "MONOCHROME2", PixelSpacing=[0.2, 0.25])
    assert load_image(ds).pixel_spacing_mm == (0.2, 0.25)

    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 49, 39
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX, region.PhysicalDeltaY = 0.01, 0.02
    strip = Dataset()  # a smaller calibrated strip (e.g. Doppler) must not win
    strip.RegionLocationMinX0, strip.RegionLocationMinY0 = 0, 0
    strip.RegionLocationMaxX1, strip.RegionLocationMaxY1 = 9, 9
    strip.PhysicalUnitsXDirection = strip.PhysicalUnitsYDirection = 3
    strip.PhysicalDeltaX, strip.PhysicalDeltaY = 0.5, 0.5
    us = make_dicom(gradient(40, 50), "MONOCHROME2", SequenceOfUltrasoundRegions=[strip, region])
    img = load_image(dicom_bytes(us))
    assert img.pixel_spacing_mm == pytest.approx((0.2, 0.1))  # (row, column) in mm
    assert img.meta["pixel_spacing_source"] == "SequenceOfUltrasoundRegions"
    assert img.to_ref(ImageStore())["pixel_spacing_mm"] == pytest.approx([0.2, 0.1])


def test_dicom_without_preamble_by_extension(tmp_path: Path) -> None:
    ds = make_dicom(gradient(40, 50), "MONOCHROME2")
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)  # no preamble, no file meta
    assert buf.getvalue()[128:132] != b"DICM"
    p = tmp_path / "raw.dcm"
    p.write_bytes(buf.getvalue())
    assert np.array_equal(load_image(p).array, as_rgb(gradient(40, 50)))


def test_non_dicom_with_dicom_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n")
    with pytest.raises(UnsupportedFormatError, match="text"):
        load_image(tmp_path / "notes.dcm")
    (tmp_path / "noise.dcm").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)))
    with pytest.raises(UnreadableImageError):
        load_image(tmp_path / "noise.dcm")


def test_dicom_without_pixel_data() -> None:
    ds = make_dicom(gradient(40, 50), "MONOCHROME2")
    del ds.PixelData
    with pytest.raises(DicomError, match="no pixel data"):
        load_image(dicom_bytes(ds))


def test_dicom_header_too_large_is_rejected_before_decoding() -> None:
    ds = make_dicom(gradient(40, 50), "MONOCHROME2")
    ds.Rows, ds.Columns = 20000, 20000  # the pixel data is still 2,000 bytes
    with pytest.raises(ImageTooLargeError, match="400,000,000"):
        load_image(ds)


def test_dicom_tiny_and_truncated() -> None:
    with pytest.raises(ImageTooSmallError):
        load_image(make_dicom(np.zeros((10, 10), np.uint8), "MONOCHROME2"))
    data = dicom_bytes(make_dicom(gradient(40, 50), "MONOCHROME2"))
    with pytest.raises(UnreadableImageError):
        load_image(data[: len(data) - 500])


def _encapsulated(ds: Dataset, syntax: str) -> Dataset:
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    return ds


def test_dicom_compressed_without_decoder_names_syntax_and_package() -> None:
    from pydicom.pixels import get_decoder

    jpeg_ls = "1.2.840.10008.1.2.4.80"
    if get_decoder(UID(jpeg_ls)).is_available:
        pytest.skip("a JPEG-LS decoder is installed here, so the missing-decoder path cannot be exercised")
    ds = _encapsulated(make_dicom(gradient(40, 50), "MONOCHROME2"), jpeg_ls)
    with pytest.raises(UnsupportedFormatError) as info:
        load_image(dicom_bytes(ds))
    msg = str(info.value)
    assert "JPEG-LS" in msg and "pip install" in msg and "pylibjpeg" in msg


def test_dicom_jpeg_baseline_ybr_full_422_like_a_scanner_export() -> None:
    """Many ultrasound scanners store JPEG Baseline frames with YBR_FULL_422; pydicom decodes them via Pillow."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if not get_decoder(UID("1.2.840.10008.1.2.4.50")).is_available:
        pytest.skip("no JPEG Baseline decoder available to pydicom")
    c = rgb_image(48, 64)
    frames = []
    for shift in (0, 40):
        buf = io.BytesIO()
        Image.fromarray(np.roll(c, shift, axis=1)).save(buf, format="JPEG", quality=95)
        frames.append(buf.getvalue())
    ds = make_dicom(c, "RGB")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.50")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    img = load_image(dicom_bytes(ds), frame=1)
    assert img.frame == 1 and img.n_frames == 2
    assert np.abs(img.array.astype(int) - np.roll(c, 40, axis=1).astype(int)).mean() < 6


def test_dicom_rle_multiframe() -> None:
    from pydicom.uid import RLELossless

    frames = np.stack([gradient(40, 50) // (i + 1) for i in range(3)]).astype(np.uint8)
    ds = make_dicom(frames, "MONOCHROME2")
    ds.compress(RLELossless)
    img = load_image(dicom_bytes(ds), frame=2)
    assert np.array_equal(img.array, as_rgb(frames[2]))


def test_dicom_video_syntax_is_unsupported() -> None:
    ds = _encapsulated(make_dicom(gradient(40, 50), "MONOCHROME2"), "1.2.840.10008.1.2.4.102")  # MPEG-4
    with pytest.raises(UnsupportedFormatError, match="video"):
        load_image(ds)


# -- errors for files and bytes -------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(EchoInputError, match="nope.png"):
        load_image(missing)
    with pytest.raises(EchoInputError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (png_bytes(rgb_image(64, 64))[:200], UnreadableImageError),  # truncated PNG
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", UnsupportedFormatError),
        (b"patient,label\nfoo,benign\n", UnsupportedFormatError),  # text / CSV
        (b"GIF89a" + b"\x00" * 64, UnsupportedFormatError),
        (bytes(range(256)) * 4, UnreadableImageError),  # unknown binary
        (b"", ImageTooSmallError),
        (png_header_only(100_000, 100_000), ImageTooLargeError),  # decompression bomb header
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, UnreadableImageError),  # broken header
    ],
    ids=["truncated-png", "pdf", "text", "gif", "binary", "empty", "bomb", "bad-header"],
)
def test_bad_bytes(data: bytes, error: type[Exception], tmp_path: Path) -> None:
    with pytest.raises(error) as info:
        load_image(data)
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg
    p = tmp_path / "input.png"  # the same bytes from a file
    p.write_bytes(data)
    with pytest.raises(error):
        load_image(p)


def test_size_limits_are_checked_from_the_header(tmp_path: Path) -> None:
    with pytest.raises(ImageTooSmallError, match="10x10"):
        load_image(png_bytes(np.zeros((10, 10), np.uint8)))
    with pytest.raises(ImageTooSmallError):
        load_image(np.zeros((10, 10, 3), np.uint8))
    assert load_image(np.zeros((10, 10, 3), np.uint8), min_size=8).width == 10
    # Header of 60,000 x 60,000 (3.6 G pixels) is refused without decoding; PIL's own bomb
    # threshold is not involved because the limit here is ours.
    with pytest.raises(ImageTooLargeError, match="limit"):
        load_image(png_header_only(3000, 3000), max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((100, 100), np.uint8), max_pixels=5000)


def test_unsupported_python_types() -> None:
    with pytest.raises(UnsupportedFormatError, match="list"):
        load_image([[0, 1], [2, 3]])  # type: ignore[arg-type]
    with pytest.raises(EchoInputError):
        load_image(gradient(), frame="1")  # type: ignore[arg-type]


def test_loaded_image_passes_through_and_is_hashable() -> None:
    img = load_image(gradient())
    assert load_image(img) is img
    assert hash(img) == hash(load_image(gradient())) and img == load_image(gradient())
    with pytest.raises(EchoInputError, match="frame"):
        load_image(img, frame=2)
    with pytest.raises(ImageTooLargeError):
        load_image(img, max_pixels=100)


# -- the store ------------------------------------------------------------------------------------


def test_to_ref_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    Image.fromarray(rgb_image()).save(p)
    img = load_image(p)
    store = ImageStore(capacity=2)
    ref = img.to_ref(store)
    assert ref["id"] == img.sha256 and ref["path"] == str(p) and ref["source_kind"] == "png"
    assert (ref["width"], ref["height"]) == (64, 48)
    assert np.array_equal(store.get(ref), img.array)


# -- overlay and PNG output -----------------------------------------------------------------------


def test_overlay_draws_in_the_right_place_and_keeps_input() -> None:
    base = np.full((200, 300, 3), 60, np.uint8)
    before = base.copy()
    box = Box(x1=100, y1=80, x2=180, y2=150)
    out = render_overlay(base, [(box, "malignant", 0.87)])
    assert np.array_equal(base, before)
    assert out is not base and out.shape == base.shape and out.dtype == np.uint8
    red = LABEL_COLOURS["malignant"]
    assert tuple(out[115, 100]) == red  # left edge
    assert tuple(out[115, 179]) == red  # right edge (x2 is exclusive)
    assert tuple(out[149, 140]) == red  # bottom edge
    assert tuple(out[115, 140]) == (60, 60, 60)  # inside untouched
    assert tuple(out[190, 20]) == (60, 60, 60)  # far away untouched
    label_zone = out[60:80, 100:180]
    assert (label_zone == np.array(red, np.uint8)).all(axis=2).mean() > 0.3  # label background above box


def test_overlay_accepts_detections_findings_and_colours() -> None:
    base = np.zeros((120, 120), np.uint8)  # gray input is converted
    det = Detection(box=Box(x1=10, y1=40, x2=50, y2=90), label="benign", score=0.6)
    fin = Finding(box=Box(x1=60, y1=40, x2=110, y2=90), label="hydronephrosis", score=0.9)
    out = render_overlay(base, [det, fin], title="test")
    assert out.shape == (120, 120, 3)
    assert tuple(out[60, 10]) == LABEL_COLOURS["benign"]
    assert tuple(out[60, 60]) == LABEL_COLOURS["hydronephrosis"]
    assert label_colour("cyst") == label_colour("Cyst") and label_colour("cyst") not in LABEL_COLOURS.values()
    # Boxes outside the image are skipped; partly outside ones are clipped.
    render_overlay(base, [([500, 500, 600, 600], "benign", 0.5), ([-20, -20, 30, 30], "benign", 0.5)])
    with pytest.raises(EchoInputError):
        render_overlay(base, ["not a box"])  # type: ignore[list-item]


def test_encode_png_round_trip() -> None:
    c = rgb_image()
    data = encode_png(c)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), c)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(gradient())))), gradient())
    with pytest.raises(ChannelLayoutError):
        encode_png(c.astype(np.float32))


def test_save_png_never_overwrites_unless_asked(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "out.png"
    assert save_png(rgb_image(), p) == p
    original = p.read_bytes()
    with pytest.raises(OutputExistsError) as info:
        save_png(np.zeros((48, 64, 3), np.uint8), p)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, EchoInputError)
    assert p.read_bytes() == original
    save_png(np.zeros((48, 64, 3), np.uint8), p, overwrite=True)
    assert np.asarray(Image.open(p)).max() == 0
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.png"]  # no temp files left
    with pytest.raises(EchoInputError, match=".png"):
        save_png(rgb_image(), tmp_path / "out.jpg")


# -- packaged examples and import cost ------------------------------------------------------------


def test_example_images() -> None:
    for name in ("breast_benign", "breast_malignant"):
        path = example_image(name)
        assert path.is_file() and path.suffix == ".png"
        img = load_image(path)
        assert min(img.width, img.height) >= 256
        a = img.array.astype(int)
        assert (a.max(axis=2) - a.min(axis=2)).max() == 0  # B-mode gray, no colour Doppler
    assert example_image() == example_image("breast_malignant")
    with pytest.raises(EchoInputError, match="breast_benign"):
        example_image("thyroid")


def _data_root() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("ECHO_AGENT_DATA", repo.parent / "shared" / "data"))


@pytest.mark.realdata
def test_examples_match_their_source_and_notice() -> None:
    root = _data_root() / "BrEaST-Lesions_USG"
    if not (root / "boxes.csv").is_file():
        pytest.skip(f"BrEaST-Lesions_USG not found under {root.parent} (set ECHO_AGENT_DATA)")
    boxes = {r["image"].split("/")[-1]: r for r in csv.DictReader(open(root / "boxes.csv")) if r["mask_kind"] == "tumor"}
    notice = (Path(example_image()).parent / "NOTICE.md").read_text(encoding="utf-8")
    for name, case, label in (("breast_benign", "case068", "benign"), ("breast_malignant", "case164", "malignant")):
        packaged = example_image(name).read_bytes()
        assert hashlib.sha256(packaged).digest() == hashlib.sha256((root / "images_and_masks" / f"{case}.png").read_bytes()).digest()
        row = boxes[f"{case}.png"]
        assert row["Classification"] == label
        box = f"[{row['x_min']}, {row['y_min']}, {row['x_max']}, {row['y_max']})"
        assert box in notice and case in notice
    repo_copy = Path(__file__).resolve().parents[1] / "examples" / "images"
    for name in ("breast_benign", "breast_malignant"):
        assert (repo_copy / f"{name}.png").read_bytes() == example_image(name).read_bytes()


@pytest.mark.realdata
def test_real_sector_image_is_composited_on_black() -> None:
    root = _data_root() / "BrEaST-Lesions_USG" / "images_and_masks"
    if not root.is_dir():
        pytest.skip(f"BrEaST-Lesions_USG not found under {root.parent.parent} (set ECHO_AGENT_DATA)")
    for path in sorted(root.glob("case???.png")):
        with Image.open(path) as im:
            if im.mode != "RGBA":
                continue
            rgba = np.asarray(im)
        outside = rgba[..., 3] == 0
        if not (outside.any() and (rgba[..., :3][outside] == 255).any()):
            continue  # want a fan image with white pixels hidden under alpha = 0
        img = load_image(path)
        assert np.all(img.array[outside] == 0)
        inside = rgba[..., 3] == 255
        assert np.array_equal(img.array[inside], rgba[..., :3][inside])
        return
    pytest.skip("no RGBA sector image with hidden white pixels found")


def test_import_is_light() -> None:
    code = (
        "import sys, echo_agent.imaging; "
        "print(','.join(m for m in ('cv2', 'PIL', 'pydicom', 'torch') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


# -- paths that are not regular files (hardening) ----------------------------------------------------
def test_fifo_device_and_huge_files_are_refused_without_reading(tmp_path):
    import os

    from echo_agent.errors import EchoInputError, ImageTooLargeError
    from echo_agent.imaging import load_image
    from echo_agent.imaging.io import read_image_file

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)  # opening a FIFO for reading would block forever without O_NONBLOCK
    with pytest.raises(EchoInputError, match="not a regular file"):
        load_image(fifo)
    if os.path.exists("/dev/zero"):
        with pytest.raises(EchoInputError, match="not a regular file"):
            load_image("/dev/zero")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(300 * 1024 * 1024)
    with pytest.raises(ImageTooLargeError, match="MiB"):
        load_image(big)
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ImageTooLargeError):
        read_image_file(small, max_bytes=10)
    assert read_image_file(small) == b"x" * 100


def test_cli_run_on_a_fifo_exits_with_an_error_instead_of_hanging(tmp_path):
    import os
    import subprocess
    import sys

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "echo_agent.cli", "run", str(fifo), "--organ", "breast"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not a regular file" in (r.stdout + r.stderr)


def test_one_default_pixel_limit_everywhere():
    import inspect

    from echo_agent import EchoAgent
    from echo_agent.imaging.io import DEFAULT_MAX_PIXELS
    from echo_agent.server.app import create_app

    assert inspect.signature(load_image).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert inspect.signature(EchoAgent).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert inspect.signature(create_app).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS


def test_a_tiny_file_of_a_huge_blank_image_is_refused_by_default():
    """A 47 KB all-zero 7000 x 7000 PNG took 2.4 GB through the agent: refused from its header now."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (7000, 7000), 0).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageTooLargeError, match="limit"):
        load_image(buf.getvalue())


def test_directory_store_takes_the_same_image_from_many_threads(tmp_path):
    """Concurrent uploads of one image used to race on one temp file name (500 under load)."""
    import threading

    from echo_agent.imaging import ImageStore

    arr = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    errors = []

    def put():
        try:
            ImageStore(directory=tmp_path).put(arr)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    for _ in range(5):
        threads = [threading.Thread(target=put) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for f in tmp_path.glob("*.png"):
            f.unlink()
    assert not errors, errors
    ImageStore(directory=tmp_path).put(arr)
    assert [p.name.endswith(".png") for p in tmp_path.iterdir()] == [True]  # no temp files left behind


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG"])
def test_exif_rotated_scans_are_read_upright_and_routed(tmp_path, fmt):
    from PIL import Image

    from echo_agent.imaging import example_image
    from echo_agent.organs.routing import default_router

    upright = Image.open(example_image("breast_malignant")).convert("RGB")
    stored = upright.rotate(90, expand=True)  # stored on its side; the tag tells viewers to turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"scan.{fmt.lower()}"
    stored.save(path, format=fmt, exif=exif.tobytes())
    img = load_image(path)
    assert (img.width, img.height) == upright.size
    assert default_router(img.array)[0] == "breast"
