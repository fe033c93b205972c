"""Where pixels live while a graph runs.

Graph state must stay small and serialisable (checkpointers persist it), so it holds an
:class:`ImageRef` — an id plus metadata — and the pixels live in an :class:`ImageStore`. The default
store keeps recent images in memory; give it a directory to make references survive a process
restart (a LangGraph server, a resumed review).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import TypedDict

from ..errors import EchoInputError


class ImageRef(TypedDict, total=False):
    """A JSON-serialisable pointer to an image in an :class:`ImageStore`."""

    id: str
    width: int
    height: int
    path: str | None
    source_kind: str
    frame: int | None
    n_frames: int | None
    pixel_spacing_mm: list[float] | None


#: What a content id looks like (:func:`pixel_hash`): anything else is refused before it can name a file.
_ID_PATTERN = re.compile(r"[0-9a-f]{24}")


def check_image_id(image_id: object) -> str:
    """``image_id`` if it is a content id (24 lowercase hex digits), else :class:`EchoInputError`
    (an id such as ``'../secret'`` must never become a path in the store's directory)."""
    if not isinstance(image_id, str) or not _ID_PATTERN.fullmatch(image_id):
        raise EchoInputError(
            f"{str(image_id)[:40]!r} is not an image id (24 hexadecimal digits, as returned in an ImageRef)"
        )
    return image_id


def pixel_hash(array: np.ndarray) -> str:
    """Content id of a canonical array (sha256 of shape + bytes, first 24 hex digits)."""
    h = hashlib.sha256()
    h.update(repr(array.shape).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:24]


#: How a store re-reads an image it no longer holds from a file: ``(path, frame) -> (content id,
#: canonical array)``. The imaging package sets :func:`echo_agent.imaging.io.read_for_store` as the
#: default (the store sits below the readers and does not import them).
ImageReader = Callable[[Path, int | None], tuple[str, np.ndarray]]
_default_reader: ImageReader | None = None


def set_default_reader(reader: ImageReader | None) -> None:
    """The reader stores without their own use to re-read a file (``None``: never re-read)."""
    global _default_reader
    _default_reader = reader


class ImageStore:
    """Thread-safe LRU of canonical RGB uint8 arrays keyed by content id.

    Args:
        capacity: how many images to keep in memory.
        directory: optional folder where each image is also written as ``<id>.png`` so a later
            process can resolve the same reference.
        reader: how to re-read an evicted image from its file (default: the package's image loader).
    """

    def __init__(self, capacity: int = 64, directory: str | Path | None = None, *,
                 reader: ImageReader | None = None) -> None:
        if capacity < 1:
            raise ValueError("ImageStore capacity must be at least 1")
        self.capacity = capacity
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._reader = reader

    def put(self, array: np.ndarray, *, image_id: str | None = None, **meta: Any) -> ImageRef:
        """Store a canonical HxWx3 uint8 array and return its reference.

        ``image_id`` skips re-hashing when the caller already has :func:`pixel_hash` of ``array``.
        """
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise EchoInputError(
                f"ImageStore holds canonical HxWx3 uint8 RGB arrays, got shape {array.shape} dtype {array.dtype}"
            )
        image_id = check_image_id(image_id) if image_id is not None else pixel_hash(array)
        array = np.ascontiguousarray(array)
        array.setflags(write=False)  # callers share it; nobody may edit the stored pixels
        with self._lock:
            self._items[image_id] = array
            self._items.move_to_end(image_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        if self.directory is not None:
            target = self.directory / f"{image_id}.png"
            if not target.exists():
                from PIL import Image

                # one temp name per writer: two requests storing the same image at once must not
                # write (or rename away) each other's temp file; the content is the same either way
                tmp = target.with_name(f".{image_id}.{os.getpid()}.{threading.get_ident()}.png.tmp")
                try:
                    Image.fromarray(array).save(tmp, format="PNG")
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
        ref: ImageRef = {"id": image_id, "width": int(array.shape[1]), "height": int(array.shape[0])}
        ref.update(meta)  # type: ignore[typeddict-item]
        return ref

    def get(self, ref: ImageRef | str) -> np.ndarray:
        """Return the pixels for a reference (re-reading from the directory or the source path)."""
        image_id = check_image_id(ref if isinstance(ref, str) else ref.get("id", ""))
        with self._lock:
            arr = self._items.get(image_id)
            if arr is not None:
                self._items.move_to_end(image_id)
                return arr
        candidates: list[Path] = []
        if self.directory is not None:
            candidates.append(self.directory / f"{image_id}.png")
        if not isinstance(ref, str) and ref.get("path"):
            candidates.append(Path(str(ref["path"])))
        reader = self._reader or _default_reader
        for p in candidates:
            if reader is not None and p.exists():
                frame = None if isinstance(ref, str) else ref.get("frame")
                sha, array = reader(p, frame)
                if sha == image_id:
                    self.put(array)
                    return array
        raise EchoInputError(
            f"image {image_id!r} is not in the image store (it holds the {self.capacity} most recent "
            "images in memory); pass the image again, or give the store a directory so references persist"
        )

    def __contains__(self, image_id: str) -> bool:
        with self._lock:
            return image_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __bool__(self) -> bool:
        # A store is a resource, not a container to test for emptiness: `store or default_store()`
        # must keep an empty store the caller passed in.
        return True


_default_store: ImageStore | None = None
_default_lock = threading.Lock()


def default_store() -> ImageStore:
    """The process-wide store used when none is given."""
    global _default_store
    with _default_lock:
        if _default_store is None:
            _default_store = ImageStore()
        return _default_store
