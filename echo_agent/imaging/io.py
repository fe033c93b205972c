"""Reading any supported image input into one canonical array.

:func:`load_image` accepts a path, encoded bytes, a ``PIL.Image.Image``, a numpy array or a
``pydicom.Dataset`` and returns a :class:`LoadedImage` whose ``array`` is the canonical
``HxWx3 uint8`` RGB array used everywhere in echo-agent (gray replicated, alpha composited on black).

Rules, in the order they are checked:

* the input type, the file (exists, is a file, not empty) and its format (PNG, JPEG, TIFF, BMP or
  DICOM, detected from the content, never only from the extension);
* the size from the header, before any pixel is decoded: each side at least ``min_size`` and at
  most ``max_pixels`` pixels in total (for DICOM: per decoded frame);
* the frame: a multi-frame source (DICOM cine, multi-page TIFF) gives its middle frame
  (``n_frames // 2``) unless ``frame`` is given; the chosen index is recorded in ``LoadedImage.frame``;
* intensities: uint8 kept; wider integers and floats scaled to 8 bits by their range (see
  :func:`echo_agent.imaging._pixels.to_uint8`); DICOM goes through its Modality LUT and VOI
  LUT/window, and MONOCHROME1 is inverted.

Nothing the caller passes is modified: arrays and images are copied before conversion.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    EchoInputError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnreadableImageError,
    UnsupportedFormatError,
)
from ._pixels import check_dtype, check_layout, check_size, to_canonical
from .store import ImageRef, ImageStore, default_store, pixel_hash

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage
    from pydicom.dataset import Dataset

    ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage.Image | np.ndarray | Dataset
else:
    ImageSource = Any

log = logging.getLogger(__name__)

#: Formats read from files and bytes (``source_kind`` values for paths; bytes get a ``bytes-`` prefix).
SUPPORTED_FORMATS = ("png", "jpeg", "tiff", "bmp", "dicom")
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP"}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
#: File endings a folder of inputs is searched for (``echo-agent batch``, ``echo-agent manifest``).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
_SUPPORTED_TEXT = "PNG, JPEG, TIFF, BMP or DICOM"


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file: from its header where Pillow reads it, else (DICOM) from
    the decoded pixels; raises ``FileNotFoundError`` or the library's unreadable-image error."""
    path = Path(path)
    if path.suffix.lower() not in _DICOM_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.size
        except FileNotFoundError:
            raise
        except Exception:  # noqa: BLE001 - not a Pillow format (a DICOM file without its ending), or an
            pass  # Image.open patched by another library (ultralytics) that fails in its own way
    h, w = load_image(path).array.shape[:2]
    return w, h


def is_hidden(path: Path, base: Path) -> bool:
    """Whether ``path`` (under ``base``) is or lies in a ``.``-named file or folder: macOS ``._`` copies,
    caches and version-control folders are never inputs.

    >>> is_hidden(Path("/d/a/._x.png"), Path("/d")), is_hidden(Path("/d/.git/x.png"), Path("/d")), is_hidden(Path("/d/a/x.png"), Path("/d"))
    (True, True, False)
    """
    return any(part.startswith(".") for part in path.relative_to(base).parts)


@dataclass(frozen=True)
class LoadedImage:
    """An image read by :func:`load_image`.

    Attributes:
        array: canonical ``HxWx3 uint8`` RGB pixels (read-only).
        width, height: size in pixels.
        sha256: content id of ``array`` (:func:`echo_agent.imaging.store.pixel_hash`).
        source_kind: ``'png' | 'jpeg' | 'tiff' | 'bmp' | 'dicom' | 'array' | 'pil'`` or, for encoded
            bytes, ``'bytes-png'``, ``'bytes-dicom'`` ...
        path: the file it came from (None for in-memory inputs).
        frame: index of the decoded frame when the source has several, else None.
        n_frames: number of frames in the source (1 for a still image).
        pixel_spacing_mm: ``(row_spacing, column_spacing)`` in mm (DICOM PixelSpacing order), from
            DICOM PixelSpacing or the ultrasound region calibration; None when unknown.
        meta: technical facts only (format, mode, original dtype, DICOM modality and pixel
            attributes); never patient or study identifiers.
    """

    array: np.ndarray = field(repr=False, compare=False)
    width: int
    height: int
    sha256: str
    source_kind: str
    path: str | None = None
    frame: int | None = None
    n_frames: int | None = 1
    pixel_spacing_mm: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_ref(self, store: ImageStore | None = None) -> ImageRef:
        """Put the pixels in ``store`` (default: the process-wide store) and return the reference."""
        store = store if store is not None else default_store()
        return store.put(
            self.array,
            image_id=self.sha256,
            path=self.path,
            source_kind=self.source_kind,
            frame=self.frame,
            n_frames=self.n_frames,
            pixel_spacing_mm=list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
        )


#: Default pixel limit (width x height) of every decoded image. Ultrasound frames are 0.3-2 MP and a
#: 4K screen capture 8.3 MP; at 12 MP a single input peaks below 1 GB of memory through the whole
#: agent (a 16 MP blank PNG of 47 KB peaked at 1.0 GB, a 49 MP one at 1.9 GB: docs/security.md).
DEFAULT_MAX_PIXELS = 12_000_000


def read_for_store(path: Path, frame: int | None) -> tuple[str, np.ndarray]:
    """``(content id, canonical array)`` of an image file: how an :class:`ImageStore` re-reads an
    image it no longer holds (:data:`echo_agent.imaging.store.ImageReader`)."""
    loaded = load_image(path, frame=frame)
    return loaded.sha256, loaded.array


def load_image(
    source: ImageSource,
    *,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 32,
) -> LoadedImage:
    """Read an image from a path, bytes, PIL image, numpy array or pydicom Dataset.

    Args:
        source: a path (``str`` / ``os.PathLike``) or the bytes of a PNG, JPEG, TIFF (multi-page
            too), BMP or DICOM (single or multi-frame) file; a ``PIL.Image.Image``; a numpy array of
            shape HxW, HxWx1, HxWx3 or HxWx4 (any integer or float dtype, not bool); a
            ``pydicom.Dataset``; or a :class:`LoadedImage` (returned as it is).
        frame: which frame of a multi-frame source to read (0-based); default: the middle one
            (for a PIL image: its current frame).
        max_pixels: largest accepted width x height, checked from the header before decoding.
        min_size: smallest accepted width and height.

    Returns:
        A :class:`LoadedImage` whose ``array`` is read-only ``HxWx3 uint8`` RGB.

    Raises:
        EchoInputError: missing path or directory, bad argument type, bad TIFF frame index.
        UnreadableImageError: corrupt, truncated or unrecognisable data.
        UnsupportedFormatError: a recognised but unsupported format (PDF, GIF, text, video DICOM,
            a compressed DICOM without its decoder installed).
        ImageTooSmallError / ImageTooLargeError: outside ``min_size`` / ``max_pixels``.
        ChannelLayoutError: an array whose shape or dtype is not an image.
        DicomError: a DICOM without pixel data, or a frame index it does not have.

    >>> import numpy as np
    >>> img = load_image(np.zeros((64, 80), dtype=np.uint16))
    >>> img.array.shape, img.array.dtype.name, img.source_kind
    ((64, 80, 3), 'uint8', 'array')
    """
    if max_pixels < 1 or min_size < 0:
        raise EchoInputError(
            f"max_pixels must be >= 1 and min_size >= 0, got {max_pixels} and {min_size}; pass sensible limits."
        )
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise EchoInputError(f"frame must be an integer index or None, got {frame!r}; pass e.g. frame=0.")
    frame = None if frame is None else int(frame)
    limits = {"max_pixels": max_pixels, "min_size": min_size}

    if isinstance(source, LoadedImage):
        # Already canonical and immutable: only the caller's limits and frame still need checking.
        if frame is not None and frame != (source.frame or 0):
            raise EchoInputError(
                f"this LoadedImage holds frame {source.frame or 0}, not frame {frame}; load the source again with frame={frame}."
            )
        check_size(source.width, source.height, max_pixels=max_pixels, min_size=min_size)
        return source
    if isinstance(source, (str, os.PathLike)):
        path = _check_path(source)
        return _from_bytes(read_image_file(path), frame=frame, path=path, prefix="", **limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), frame=frame, path=None, prefix="bytes-", **limits)
    if isinstance(source, np.ndarray):
        return _from_array(source, frame=frame, **limits)
    if _is_pil_image(source):
        return _from_pil_object(source, frame=frame, **limits)
    if _is_dicom_dataset(source):
        from ._dicom import decode_frame

        dec = decode_frame(source, frame=frame, **limits)
        return _finish(dec.array, "dicom", None, dec.frame, dec.n_frames, dec.pixel_spacing_mm, dec.meta)
    raise UnsupportedFormatError(
        f"load_image cannot read a {type(source).__name__}; pass a file path, encoded bytes, "
        "a PIL image, a numpy array or a pydicom Dataset."
    )


# -- helpers --------------------------------------------------------------------------------------


def _finish(
    array: np.ndarray,
    source_kind: str,
    path: Path | None,
    frame: int | None,
    n_frames: int | None,
    spacing: tuple[float, float] | None,
    meta: dict[str, Any],
) -> LoadedImage:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return LoadedImage(
        array=array,
        width=int(array.shape[1]),
        height=int(array.shape[0]),
        sha256=pixel_hash(array),
        source_kind=source_kind,
        path=str(path) if path is not None else None,
        frame=frame,
        n_frames=n_frames,
        pixel_spacing_mm=spacing,
        meta=meta,
    )


def _check_path(source: str | os.PathLike[str]) -> Path:
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise EchoInputError(f"image file {str(path)!r} does not exist; check the path.")
    if path.is_dir():
        raise EchoInputError(f"{str(path)!r} is a directory, not an image file; pass the path of one image.")
    return path


#: Largest image file :func:`load_image` reads from a path (ultrasound frames and cine DICOMs are
#: far smaller); bigger files are refused before any byte is read.
MAX_FILE_BYTES = 256 * 1024 * 1024


def read_image_file(path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a **regular** file of at most ``max_bytes``.

    A FIFO, a character device (``/dev/zero``), a socket or a directory is refused before it is read
    (opening is non-blocking, and the type is checked on the opened descriptor, so the path cannot
    be swapped in between), as is a file larger than ``max_bytes``; a file that grows while being
    read is cut off at ``max_bytes + 1`` bytes and refused.

    Raises:
        EchoInputError: not a regular file. ImageTooLargeError: larger than ``max_bytes``.
        UnreadableImageError: the OS refused to open or read it (permissions, I/O error).
    """
    import stat

    path = Path(os.fspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableImageError(
            f"{path} could not be opened ({exc.strerror or type(exc).__name__}); check its permissions."
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise EchoInputError(
                f"{str(path)!r} is not a regular file (a pipe, device or socket); pass the path of an image file."
            )
        if st.st_size > max_bytes:
            raise ImageTooLargeError(
                f"{str(path)!r} is {st.st_size / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit for an image file."
            )
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise UnreadableImageError(f"{path} could not be read ({exc.strerror or type(exc).__name__}).") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{str(path)!r} grew above the {max_bytes / 2**20:.0f} MiB limit while being read.")
    return data


def _is_pil_image(obj: object) -> bool:
    pil = sys.modules.get("PIL.Image")  # no PIL import when the caller has none to pass
    return pil is not None and isinstance(obj, pil.Image)


def _is_dicom_dataset(obj: object) -> bool:
    ds_mod = sys.modules.get("pydicom.dataset")
    return ds_mod is not None and isinstance(obj, ds_mod.Dataset)


def sniff_format(data: bytes) -> str | None:
    """Name the format of encoded bytes from their magic numbers (None when unknown)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    head = data[:16]
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff", "jpeg"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"II+\x00", "tiff"),  # BigTIFF
        (b"MM\x00+", "tiff"),
        (b"BM", "bmp"),
        (b"%PDF", "pdf"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
        (b"\xff\x4f\xff\x51", "jpeg2000"),
        (b"PK\x03\x04", "zip"),
        (b"\x1f\x8b", "gzip"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) >= 12 and data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "heif/avif"
    return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:2048]
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(sample) - 3  # a multibyte character cut by the sample boundary
    return True


def _from_bytes(
    data: bytes, *, frame: int | None, path: Path | None, prefix: str, max_pixels: int, min_size: int
) -> LoadedImage:
    where = f"{str(path)!r}" if path is not None else "the image data"
    if not data:
        raise ImageTooSmallError(f"{where} is empty (0 bytes); pass a complete image file.")
    kind = sniff_format(data)
    if kind is None and path is not None and path.suffix.lower() in _DICOM_SUFFIXES:
        kind = "dicom-nopreamble"  # DICOM written without the 128-byte preamble and 'DICM' marker
    if kind in ("dicom", "dicom-nopreamble"):
        from ._dicom import decode_frame, read_dataset

        if kind == "dicom-nopreamble":
            ds = _read_headerless_dicom(data, where)
        else:
            ds = read_dataset(data)
        dec = decode_frame(ds, frame=frame, max_pixels=max_pixels, min_size=min_size)
        return _finish(dec.array, prefix + "dicom", path, dec.frame, dec.n_frames, dec.pixel_spacing_mm, dec.meta)
    if kind in _PIL_FORMAT:
        return _from_encoded(data, kind, frame=frame, path=path, prefix=prefix, max_pixels=max_pixels, min_size=min_size)
    if kind is not None:
        raise UnsupportedFormatError(
            f"{where} is {'a ' + kind.upper() if kind != 'heif/avif' else 'HEIF/AVIF'} file, which echo-agent "
            f"does not read; convert it to {_SUPPORTED_TEXT} first."
        )
    if _looks_like_text(data):
        raise UnsupportedFormatError(
            f"{where} is text, not an image; pass a {_SUPPORTED_TEXT} image file."
        )
    raise UnreadableImageError(
        f"{where} is not a recognisable image (unknown or corrupt data); pass a {_SUPPORTED_TEXT} file."
    )


def _read_headerless_dicom(data: bytes, where: str) -> Any:
    """Parse a ``.dcm`` file that lacks the 'DICM' preamble; reject what only parses by force."""
    from ._dicom import read_dataset

    if _looks_like_text(data):
        raise UnsupportedFormatError(f"{where} is text, not an image; pass a {_SUPPORTED_TEXT} image file.")
    try:
        ds = read_dataset(data, force=True)
        # Forced parsing accepts almost any bytes; a real image has a sane pixel module.
        plausible = "PixelData" in ds and int(ds.get("Rows", 0) or 0) > 0 and int(ds.get("Columns", 0) or 0) > 0
    except (UnreadableImageError, TypeError, ValueError, OverflowError):
        plausible = False
    if not plausible:
        raise UnreadableImageError(
            f"{where} has a DICOM extension but is neither a DICOM image nor another known image; "
            "check that the file is complete."
        )
    return ds


def _open_pil(data: bytes, kind: str, where: str) -> PILImage.Image:
    import io

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Our own max_pixels check follows; PIL's global bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[kind]])
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{where} declares more than twice PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels in its header; "
            "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the source."
        ) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on broken headers
        raise UnreadableImageError(
            f"{where} has a {kind.upper()} signature but an unreadable header ({type(exc).__name__}); "
            "the file is corrupt or truncated, so export it again."
        ) from None


def _from_encoded(
    data: bytes, kind: str, *, frame: int | None, path: Path | None, prefix: str, max_pixels: int, min_size: int
) -> LoadedImage:
    where = f"{str(path)!r}" if path is not None else f"the {kind.upper()} data"
    im = _open_pil(data, kind, where)
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    frame_idx = _pick_frame(frame, n_frames, where)
    try:
        if frame_idx:
            im.seek(frame_idx)
        check_size(im.width, im.height, max_pixels=max_pixels, min_size=min_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
        meta: dict[str, Any] = {"format": kind, "mode": im.mode}
        # Any format that carries EXIF (JPEG, and PNG's eXIf chunk, TIFF, WebP) is shown upright by
        # viewers; a PNG stored rotated with an orientation tag was read sideways and failed routing.
        im = _exif_upright(im, meta)
        array = _pil_to_canonical(im)
    except (EchoInputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise OSError, SyntaxError, ...
        raise UnreadableImageError(
            f"{where} could not be decoded ({type(exc).__name__}: {str(exc)[:120]}); the file is corrupt or "
            "truncated, so export it again."
        ) from None
    finally:
        im.close()
    return _finish(array, prefix + kind, path, frame_idx if n_frames > 1 else None, n_frames, None, meta)


def _pick_frame(frame: int | None, n_frames: int, where: str) -> int:
    if frame is None:
        return n_frames // 2
    if not 0 <= frame < n_frames:
        raise EchoInputError(
            f"frame {frame} does not exist: {where} has {n_frames} frame(s); pass frame=0..{n_frames - 1}."
        )
    return frame


def _exif_upright(im: PILImage.Image, meta: dict[str, Any]) -> PILImage.Image:
    """Apply an EXIF orientation (any format) so boxes refer to the image as viewers display it."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop reading the pixels
        return im
    if orientation in (None, 1):
        return im
    meta["exif_orientation_applied"] = int(orientation)
    return ImageOps.exif_transpose(im)


def _pil_to_canonical(im: PILImage.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to the canonical array (the image is not modified)."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return to_canonical(np.asarray(im))
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        return to_canonical(np.asarray(im.convert("RGBA" if has_alpha else "RGB")))
    if mode in ("RGBA", "LA", "La", "RGBa"):
        return to_canonical(np.asarray(im.convert("RGBA")))
    if mode == "1":
        return to_canonical(np.asarray(im.convert("L")))
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        return to_canonical(arr.astype(arr.dtype.newbyteorder("=")))
    try:
        return to_canonical(np.asarray(im.convert("RGB")))  # CMYK, YCbCr, LAB, HSV, RGBX ...
    except ValueError:
        raise UnsupportedFormatError(
            f"PIL image mode {mode!r} cannot be converted to RGB; convert the image to 'RGB' or 'L' first."
        ) from None


def _from_pil_object(im: PILImage.Image, *, frame: int | None, max_pixels: int, min_size: int) -> LoadedImage:
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    start = im.tell() if n_frames > 1 else 0
    # A PIL image carries a current frame: without `frame`, read the one the caller selected.
    target = _pick_frame(start if frame is None else frame, n_frames, "the PIL image")
    try:
        if target != start:
            im.seek(target)
        check_size(im.width, im.height, max_pixels=max_pixels, min_size=min_size)
        array = _pil_to_canonical(im)  # np.asarray copies, so the caller's image stays untouched
        meta: dict[str, Any] = {"mode": im.mode}
        if im.format:
            meta["format"] = str(im.format).lower()
    except (EchoInputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a lazily opened PIL image may fail to decode here
        raise UnreadableImageError(
            f"the PIL image could not be decoded ({type(exc).__name__}: {str(exc)[:120]}); "
            "its file is corrupt or truncated, so export it again."
        ) from None
    finally:
        if im.tell() != start:
            im.seek(start)  # leave a multi-frame image on the frame the caller had selected
    return _finish(array, "pil", None, target if n_frames > 1 else None, n_frames, None, meta)


def _from_array(a: np.ndarray, *, frame: int | None, max_pixels: int, min_size: int) -> LoadedImage:
    check_dtype(a.dtype)
    check_layout(a.shape)
    h, w = int(a.shape[0]), int(a.shape[1])
    if a.size == 0:
        raise ImageTooSmallError(f"the image array is empty (shape {a.shape}); pass a real image.")
    _pick_frame(frame, 1, "a numpy array")
    check_size(w, h, max_pixels=max_pixels, min_size=min_size, what="image array")
    array = to_canonical(a)  # always a new array: the caller's stays as it was
    meta = {"original_dtype": str(a.dtype), "original_shape": list(a.shape)}
    return _finish(array, "array", None, None, 1, None, meta)
