"""DICOM reading for :func:`echo_agent.imaging.load_image` (private).

Privacy rule: nothing from the dataset reaches the caller except the pixels of one frame and the
whitelisted technical tags in :data:`SAFE_TAGS`. Messages of our errors are built from technical
values only, pydicom's own read warnings are swallowed (they can quote element values), and
exceptions raised while parsing are re-raised without their chained cause.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DicomError, ImageTooLargeError, UnreadableImageError, UnsupportedFormatError
from ._pixels import check_size, scale_range, to_canonical, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Keyword -> key in ``LoadedImage.meta``. Technical tags only; no patient, study, operator or
#: institution identifiers, no dates, no UIDs.
SAFE_TAGS: dict[str, str] = {
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "Rows": "rows",
    "Columns": "columns",
    "PhotometricInterpretation": "photometric_interpretation",
    "BitsStored": "bits_stored",
    "SamplesPerPixel": "samples_per_pixel",
}

# Which pip packages decode a transfer syntax that pydicom cannot decode on its own.
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pillow",
    "1.2.840.10008.1.2.4.51": "pillow",
    "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG,
    "1.2.840.10008.1.2.4.81": _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _OPENJPEG,
    "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG,
    "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
}

_EXPLICIT_LE = "1.2.840.10008.1.2.1"

# (0018,6024) Physical Units X/Y Direction: 3 = centimetres.
_UNITS_CM = 3


@dataclass
class DicomFrame:
    """One decoded frame plus the technical facts kept from its dataset."""

    array: np.ndarray
    frame: int | None
    n_frames: int
    pixel_spacing_mm: tuple[float, float] | None
    meta: dict[str, Any]


def read_dataset(data: bytes, *, force: bool = False) -> Dataset:
    """Parse DICOM bytes into a dataset; raise :class:`UnreadableImageError` if that fails."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError:
        raise UnreadableImageError(
            "the data is not a valid DICOM file; check that it is a complete DICOM image (Part 10 file)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise UnreadableImageError(
            f"the DICOM file could not be parsed ({type(exc).__name__}); it is probably truncated or corrupt, "
            "so export it again from the scanner or PACS."
        ) from None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


def _transfer_syntax(ds: Dataset) -> Any:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
    return UID(str(ts)) if ts else None


def _with_default_syntax(ds: Dataset) -> Dataset:
    """A shallow copy of an in-memory dataset with Explicit VR Little Endian as its transfer syntax.

    Datasets built in memory often have no file meta; pydicom needs a transfer syntax to decode.
    The caller's dataset is not touched.
    """
    import copy

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    out = copy.copy(ds)
    fm = FileMetaDataset()
    old = getattr(ds, "file_meta", None)
    if old is not None:
        for elem in old:
            fm.add(elem)
    fm.TransferSyntaxUID = UID(_EXPLICIT_LE)
    out.file_meta = fm
    return out


def _check_decodable(ts: Any) -> None:
    from pydicom.pixels import get_decoder

    name = f"{ts.name} ({ts})"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        if any(k in ts.name for k in ("MPEG", "HEVC", "H.264", "H.265")):
            raise UnsupportedFormatError(
                f"the DICOM pixel data is a video stream ({name}) that pydicom cannot decode; "
                "export the frames as images (e.g. with ffmpeg) and pass one of them."
            ) from None
        raise UnsupportedFormatError(
            f"the DICOM transfer syntax {name} has no pixel decoder in pydicom; "
            "convert the file to an uncompressed transfer syntax (e.g. `gdcmconv --raw`) and retry."
        ) from None
    if not decoder.is_available:
        hint = _DECODER_HINTS.get(str(ts), "python-gdcm")
        raise UnsupportedFormatError(
            f"the DICOM pixel data is compressed as {name}, which needs an optional decoder; "
            f"install one with `pip install {hint}` and retry."
        )


def _window_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The value range the VOI transform maps onto, or None when the dataset has no VOI."""
    from pydicom.pixels import apply_windowing

    seq = ds.get("VOILUTSequence", None)
    if seq:
        item = seq[0]
        if item.get("LUTDescriptor", None) is not None and item.get("LUTData", None) is not None:
            lut = np.asarray(item.LUTData, dtype=np.float64)
            return float(lut.min()), float(lut.max())
    if ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None:
        # Probe the windowing function at its extremes to get pydicom's output range.
        with np.errstate(over="ignore"):
            probe = apply_windowing(np.array([-1e30, 1e30]), ds)
        return float(np.min(probe)), float(np.max(probe))
    return None


def _monochrome(arr: np.ndarray, ds: Dataset, meta: dict[str, Any]) -> np.ndarray:
    """Modality LUT -> VOI LUT/windowing -> 8 bits, inverted for MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    has_modality = bool(ds.get("ModalityLUTSequence", None)) or ds.get("RescaleSlope", None) is not None
    out = apply_modality_lut(arr, ds) if has_modality else arr
    meta["modality_lut"] = has_modality
    try:
        voi_range = _window_output_range(ds)
    except (ValueError, TypeError, AttributeError, KeyError):
        voi_range = None  # malformed VOI attributes: fall back to the data range
    if voi_range is not None:
        out = apply_voi_lut(out, ds)
        meta["voi"] = "lut" if ds.get("VOILUTSequence", None) else "window"
        gray = scale_range(out, *voi_range)
    else:
        meta["voi"] = None
        if out.dtype == np.uint8:
            gray = out
        else:
            o = np.asarray(out, dtype=np.float64)
            gray = scale_range(o, float(o.min()), float(o.max())) if o.size else o.astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: the lowest value is displayed white
        meta["inverted"] = True
    return gray


def _spacing_mm(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) pixel spacing in mm and where it came from."""
    ps = ds.get("PixelSpacing", None)
    try:
        if ps is not None and len(ps) == 2 and float(ps[0]) > 0 and float(ps[1]) > 0:
            return (float(ps[0]), float(ps[1])), "PixelSpacing"
    except (TypeError, ValueError):
        pass
    best: tuple[float, float] | None = None
    best_area = -1
    for region in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            if (
                int(region.get("PhysicalUnitsXDirection", 0)) != _UNITS_CM
                or int(region.get("PhysicalUnitsYDirection", 0)) != _UNITS_CM
            ):
                continue
            dx = abs(float(region.PhysicalDeltaX)) * 10.0  # cm -> mm
            dy = abs(float(region.PhysicalDeltaY)) * 10.0
            area = (int(region.get("RegionLocationMaxX1", 0)) - int(region.get("RegionLocationMinX0", 0))) * (
                int(region.get("RegionLocationMaxY1", 0)) - int(region.get("RegionLocationMinY0", 0))
            )
        except (AttributeError, TypeError, ValueError):
            continue
        # The largest calibrated region is the B-mode image; small ones are M-mode/Doppler strips.
        if dx > 0 and dy > 0 and area > best_area:
            best, best_area = (dy, dx), area
    return (best, "SequenceOfUltrasoundRegions") if best else (None, None)


def decode_frame(ds: Dataset, *, frame: int | None, max_pixels: int, min_size: int) -> DicomFrame:
    """Validate a dataset's header, then decode one frame to the canonical RGB array."""
    from pydicom.pixels import apply_color_lut, pixel_array

    if "PixelData" not in ds:
        what = "float pixel data, which is not an ultrasound image" if (
            "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        ) else "no pixel data (it may be a report or presentation state, or the file is truncated)"
        raise DicomError(f"the DICOM dataset has {what}; pass a DICOM image instead.")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or cols is None:
        raise DicomError("the DICOM dataset lacks Rows/Columns, so its pixels cannot be read; export it again.")
    n_frames = max(_int(ds, "NumberOfFrames", 1) or 1, 1)
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    # Only one frame is ever decoded, so the pixel limit applies to a frame; the whole clip's raw
    # bytes are already bounded by the file the caller handed us.
    check_size(cols, rows, max_pixels=max_pixels, min_size=min_size, what="DICOM frame")
    if samples not in (1, 3):
        raise UnsupportedFormatError(
            f"the DICOM image has {samples} samples per pixel, which is not gray or RGB; convert it to RGB first."
        )
    if frame is None:
        frame = n_frames // 2  # the middle of a cine clip is more representative than its first frame
    elif not (0 <= frame < n_frames):
        raise DicomError(
            f"frame {frame} does not exist: the DICOM has {n_frames} frame(s); pass frame=0..{n_frames - 1}."
        )

    ts = _transfer_syntax(ds)
    if ts is None:
        ds = _with_default_syntax(ds)
        ts = _transfer_syntax(ds)
    if ts.is_compressed:
        _check_decodable(ts)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=frame)
    except MemoryError:
        raise ImageTooLargeError(
            "decoding the DICOM frame ran out of memory; downscale the image or pass a smaller file."
        ) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt input
        # pydicom's messages describe lengths and attributes, never element values of patients.
        detail = (str(exc).splitlines() or [""])[0].split(" - ")[0][:120].rstrip(":. ")
        raise UnreadableImageError(
            f"the DICOM pixel data could not be decoded ({type(exc).__name__}: {detail}); "
            "the file may be truncated or its image attributes inconsistent, so export it again."
        ) from None
    while arr.ndim > (3 if samples == 3 else 2) and arr.shape[0] == 1:
        arr = arr[0]

    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    meta: dict[str, Any] = {}
    for keyword, key in SAFE_TAGS.items():
        value = ds.get(keyword, None)
        if value not in (None, ""):
            meta[key] = value if isinstance(value, int) else str(value)
    meta["n_frames"] = n_frames
    meta["transfer_syntax"] = str(ts.name)
    if samples == 1 and pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        out = to_canonical(rgb if rgb.dtype == np.uint8 else to_uint8(rgb))
    elif samples == 1:
        out = to_canonical(_monochrome(arr, ds, meta))
    else:
        # pixel_array already converted YBR_FULL / YBR_FULL_422 to RGB (its default, raw=False).
        out = to_canonical(arr)
    spacing, spacing_source = _spacing_mm(ds)
    if spacing_source:
        meta["pixel_spacing_source"] = spacing_source
    log.debug("decoded DICOM frame %d of %d (%dx%d, %s)", frame, n_frames, cols, rows, pi)
    return DicomFrame(
        array=out,
        frame=frame if n_frames > 1 else None,
        n_frames=n_frames,
        pixel_spacing_mm=spacing,
        meta=meta,
    )
