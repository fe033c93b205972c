"""ONNX Runtime backend: the default, light detector (no torch needed at inference)."""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from .base import LetterboxYoloDetector, PinnedValues, check_image
from .postprocess import LetterboxInfo, letterbox

__all__ = ["WEIGHTS_VERSION_KEY", "OnnxDetector", "inference_session", "parse_ultralytics_metadata"]

log = logging.getLogger(__name__)

_DEFAULT_INPUT_SIZE = 640

#: Metadata key naming the weights version of a re-export whose outputs were proven identical to the
#: file it replaces (e.g. the same checkpoint exported again with a dynamic batch axis). The detector
#: name then keeps that version, so evidence and fitted fusions refer to the same model.
WEIGHTS_VERSION_KEY = "echo_weights_version"


def inference_session(path: Path, *, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",),
                      hint: str = "") -> Any:
    """An ONNX Runtime session as every model of the agent runs: full graph optimisation, ``threads``
    intra-op threads, one inter-op thread, sequential, no spin-waiting (spinning threads compete
    with the captioner and with other runs for the cores), warnings off. A file ONNX Runtime cannot
    load is a :class:`ModelLoadError` naming it (``hint`` says what to do)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise ModelLoadError("onnxruntime is not installed; `pip install onnxruntime`") from exc

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as exc:  # ORT raises its own pybind exception types
        raise ModelLoadError(
            f"{path} could not be loaded by ONNX Runtime ({type(exc).__name__}: {str(exc).strip()[:200]})"
            + (f"; {hint}" if hint else "")
        ) from exc


def _to_network(padded: np.ndarray) -> np.ndarray:
    """Letterboxed uint8 ``(n, s, s, 3)`` images as the network's float32 ``(n, 3, s, s)`` input in 0..1."""
    batch = np.empty((padded.shape[0], 3, padded.shape[1], padded.shape[2]), dtype=np.float32)
    np.divide(padded.transpose(0, 3, 1, 2), np.float32(255.0), out=batch, dtype=np.float32)
    return batch


def parse_ultralytics_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Parse the ``metadata_props`` ultralytics writes into an exported ONNX model.

    Returns the keys found among ``names`` (tuple of class names in index order), ``imgsz`` (list of
    ints, ``[h, w]``), ``stride`` (int), ``end2end`` (bool) and ``task`` (str). Values are Python
    literals written with ``str()``, so they are read with :func:`ast.literal_eval` (never ``eval``).

    >>> parse_ultralytics_metadata({"names": "{0: 'benign', 1: 'malignant'}", "imgsz": "[640, 640]"})
    {'names': ('benign', 'malignant'), 'imgsz': [640, 640]}
    """
    out: dict[str, Any] = {}
    try:
        if "names" in meta:
            names = ast.literal_eval(meta["names"])
            if isinstance(names, dict):
                keys = sorted(int(k) for k in names)
                if keys != list(range(len(keys))):
                    raise ValueError(f"class indices {keys} are not 0..{len(keys) - 1}")
                out["names"] = tuple(str(names[k]) for k in keys)
            else:
                out["names"] = tuple(str(n) for n in names)
        if "imgsz" in meta:
            imgsz = ast.literal_eval(meta["imgsz"])
            out["imgsz"] = [int(imgsz)] * 2 if isinstance(imgsz, (int, float)) else [int(v) for v in imgsz]
        if "stride" in meta:
            out["stride"] = int(ast.literal_eval(meta["stride"]))
        if "end2end" in meta:
            out["end2end"] = bool(ast.literal_eval(meta["end2end"]))
        if "task" in meta:
            out["task"] = str(meta["task"])
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ModelLoadError(
            f"the model's ultralytics metadata could not be parsed ({exc}); re-export it or pass labels= and "
            "input_size= explicitly"
        ) from exc
    return out


class OnnxDetector(LetterboxYoloDetector):
    """A YOLO detector exported to ONNX (ultralytics ``format='onnx'``), run with ONNX Runtime.

    The session is created lazily on the first detection (or :meth:`load`), once, under a lock. Class
    names and input size come from the metadata ultralytics writes into the file; ``labels`` and
    ``input_size`` override them. The output must be the YOLOv8/11 head ``(B, 4 + nc, N)`` (or
    ``(B, K, 6)`` for NMS-free ``end2end`` exports); anything else raises :class:`ModelLoadError`.

    >>> det = OnnxDetector("echo_agent/assets/weights/breast.onnx")   # doctest: +SKIP
    >>> det.detect(image, score_threshold=0.3)                          # doctest: +SKIP
    [Detection(id='', box=Box(x1=..., ...), label='malignant', score=0.87, source='detector')]

    Args:
        path: the ``.onnx`` file.
        labels: class names in class-index order (default: the model's ``names`` metadata).
        input_size: side of the square network input (default: the fixed input shape, else the
            ``imgsz`` metadata, else 640).
        providers: ONNX Runtime execution providers, in order of preference.
        intra_op_threads: threads inside one operator (default 1: on a small shared CPU a second
            spinning thread costs more than it gains; measured in ``docs/benchmarks.md``). Idle
            threads never spin-wait, so they leave the cores to the rest of the agent.
        name: detector name (default ``'<stem>-onnx@<version>'``: the file's
            ``echo_weights_version`` metadata when it has one, else the first 8 hex digits of its
            SHA-256).
        max_batch: most images per forward pass in :meth:`detect_batch`.
        cache_size: raw network outputs kept per letterboxed input (0 turns the cache off). The
            agent calls the detector several times on one image (a first look, then a re-check with
            test-time augmentation); the cache answers the repeated view without a forward pass, and
            :meth:`prefetch` fills it for many images in one batched pass.
    """

    backend = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        labels: Sequence[str] | None = None,
        input_size: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        name: str | None = None,
        max_batch: int = 16,
        cache_size: int = 64,
    ) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"ONNX detector weights not found at {path}; check the path or train and export a "
                "detector (tools/train_detector.py)"
            )
        super().__init__(path, name=name, max_batch=max_batch)
        self._labels_arg = tuple(labels) if labels is not None else None
        if input_size is not None and int(input_size) <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self._input_size_arg = int(input_size) if input_size is not None else None
        self.providers = tuple(providers)
        self.intra_op_threads = intra_op_threads
        self.metadata: dict[str, Any] = {}
        self._session: Any = None
        self._input_name = ""
        self._checked_output = False
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        # outputs pinned by pin() until unpin(): held whatever the cache size
        self._pinned = PinnedValues()
        # forward passes started by prefetch_in_background() and not finished yet, by cache key
        self._inflight: dict[bytes, Future[np.ndarray]] = {}
        self._background: ThreadPoolExecutor | None = None
        self._background_pid = os.getpid()

    def _load(self) -> None:
        session = inference_session(self.path, threads=int(self.intra_op_threads or 1), providers=self.providers,
                                    hint="is it an ONNX model file? Re-export it with export_onnx()")

        self.metadata = parse_ultralytics_metadata(session.get_modelmeta().custom_metadata_map or {})
        task = self.metadata.get("task", "detect")
        if task != "detect":
            raise ModelLoadError(
                f"{self.path} is an ultralytics {task!r} model; only detection models (task 'detect') are supported"
            )
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelLoadError(
                f"{self.path}: expected one image input of shape (batch, 3, height, width), got "
                f"{[(i.name, i.shape) for i in inputs]}; is this a YOLO detection export?"
            )
        b, c, h, w = inputs[0].shape
        if isinstance(c, int) and c != 3:
            raise ModelLoadError(f"{self.path}: the model takes {c} input channels, expected 3 (RGB)")
        self._input_size = self._resolve_input_size(h, w)
        self._dynamic_batch = not isinstance(b, int)
        self._end2end = bool(self.metadata.get("end2end", False))
        self._labels = self._resolve_labels(outputs[0].shape)
        self._input_name = inputs[0].name
        self._session = session

    def _resolve_input_size(self, h: Any, w: Any) -> int:
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ModelLoadError(
                    f"{self.path}: fixed input {h}x{w} is not square; export the model with a square imgsz"
                )
            if self._input_size_arg is not None and self._input_size_arg != h:
                raise ModelLoadError(
                    f"{self.path}: the model has a fixed {h}x{h} input but input_size={self._input_size_arg} "
                    "was requested; drop input_size or re-export with dynamic=True"
                )
            return h
        if self._input_size_arg is not None:
            return self._input_size_arg
        imgsz = self.metadata.get("imgsz")
        if imgsz and imgsz[0] == imgsz[-1]:
            return int(imgsz[0])
        return _DEFAULT_INPUT_SIZE

    def _resolve_labels(self, out_shape: Sequence[Any]) -> tuple[str, ...]:
        if len(out_shape) != 3:
            raise ModelLoadError(
                f"{self.path}: output has shape {list(out_shape)}, expected (batch, 4 + num_classes, anchors) "
                "from a YOLOv8/11 detection export"
            )
        names = self.metadata.get("names")
        labels = self._labels_arg or names
        if self._labels_arg and names and tuple(names) != self._labels_arg:
            log.warning(
                "%s: labels %s override the model's class names %s", self.path, self._labels_arg, names
            )
        if self._end2end:
            if isinstance(out_shape[2], int) and out_shape[2] != 6:
                raise ModelLoadError(
                    f"{self.path}: end-to-end output must be (batch, detections, 6), got {list(out_shape)}; "
                    "only detection models are supported"
                )
            if not labels:
                raise ModelLoadError(f"{self.path}: end-to-end model without class names; pass labels=")
            return tuple(labels)
        rows = out_shape[1]
        if isinstance(rows, int):
            if rows < 5:
                raise ModelLoadError(
                    f"{self.path}: output has shape {list(out_shape)}; a YOLO detection head needs "
                    "(batch, 4 + num_classes, anchors) with at least one class"
                )
            if labels and len(labels) != rows - 4:
                raise ModelLoadError(
                    f"{self.path}: output has {rows - 4} classes (shape {list(out_shape)}) but "
                    f"{len(labels)} labels {tuple(labels)} were given; pass the model's own class names"
                )
            self._checked_output = True
            return tuple(labels) if labels else tuple(f"class_{i}" for i in range(rows - 4))
        if not labels:
            raise ModelLoadError(
                f"{self.path}: the number of classes is not fixed in the output shape {list(out_shape)} "
                "and the model has no class names; pass labels="
            )
        return tuple(labels)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input_name: batch})[0]
        if not self._checked_output:
            expected = 6 if self._end2end else 4 + len(self._labels)
            axis = 2 if self._end2end else 1
            if out.ndim != 3 or out.shape[axis] != expected:
                raise ModelLoadError(
                    f"{self.path}: output has shape {out.shape}, expected {expected} values on axis {axis} "
                    f"for {len(self._labels)} classes; is this a YOLO detection export?"
                )
            self._checked_output = True
        return out

    @property
    def name(self) -> str:
        """``'<weights stem>-onnx@<version>'`` unless a name was given (see ``name`` in the class doc)."""
        if self._name is None:
            version = self._weights_version()
            self._name = f"{self.path.stem}-{self.backend}@{version}" if version else super().name
        return self._name

    def _weights_version(self) -> str | None:
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            # Reading metadata needs a session; a loaded detector already has one.
            sess = self._session or ort.InferenceSession(str(self.path), sess_options=opts,
                                                         providers=["CPUExecutionProvider"])
            value = (sess.get_modelmeta().custom_metadata_map or {}).get(WEIGHTS_VERSION_KEY)
        except Exception:  # unreadable files fail later with a clear ModelLoadError from load()
            return None
        return str(value).strip() or None if value is not None else None

    def predict_raw(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """Letterbox ``images`` and run the network on those not in the output cache.

        Same result as the shared pipeline (the cache key is a digest of the letterboxed pixels the
        network would see, so a hit returns the very output that input produced); uncached inputs go
        through the network ``max_batch`` at a time when the model has a dynamic batch axis.
        """
        out, infos, _ = self._predict_keyed(images)
        return out, infos

    def _predict_keyed(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo], list[bytes]]:
        """:meth:`predict_raw` plus each input's cache key."""
        self.load()
        padded, infos = self._letterboxed(images)
        if not infos:
            return np.zeros((0, 0, 0), dtype=np.float32), [], []
        keys = [hashlib.sha256(padded[i].data).digest() for i in range(len(infos))]
        outs: list[np.ndarray | None] = [None] * len(keys)
        waiting: dict[int, Future[np.ndarray]] = {}
        with self._cache_lock:
            self._after_fork()
            for i, k in enumerate(keys):
                held = self._held(k)
                if held is not None:
                    outs[i] = held
                elif k in self._inflight:
                    waiting[i] = self._inflight[k]
        first: dict[bytes, int] = {}  # one forward per distinct input (a batch may repeat an image)
        todo = [i for i in range(len(keys))
                if outs[i] is None and i not in waiting and first.setdefault(keys[i], i) == i]
        self._run_and_cache(padded, keys, todo, outs)
        for i, fut in waiting.items():
            try:
                outs[i] = fut.result()
            except Exception:  # the background pass failed: this call runs the input itself
                self._run_and_cache(padded, keys, [i], outs)
        for i in range(len(keys)):
            if outs[i] is None:
                outs[i] = outs[first[keys[i]]]
        return np.concatenate(outs, axis=0), infos, keys  # type: ignore[arg-type]

    def _after_fork(self) -> None:
        """In a forked child (call with ``_cache_lock`` held): the parent's background thread and
        its passes do not exist here, so forget them (a wait on one would never end)."""
        if self._background_pid != os.getpid():
            self._background, self._inflight, self._background_pid = None, {}, os.getpid()

    def _held(self, key: bytes) -> np.ndarray | None:
        """The pinned or cached output of ``key`` (call with ``_cache_lock`` held)."""
        pinned = self._pinned.get(key)
        if pinned is not None:
            return pinned
        if self.cache_size:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        return None

    def _run_and_cache(self, padded: np.ndarray, keys: Sequence[bytes], todo: Sequence[int],
                       outs: list[np.ndarray | None]) -> None:
        """Forward ``padded[todo]`` (``max_batch`` at a time), fill ``outs`` and the cache."""
        step = self.max_batch if self._dynamic_batch else 1
        for start in range(0, len(todo), step):
            idx = list(todo[start : start + step])
            raw = self._forward(_to_network(padded[idx]))
            for j, i in enumerate(idx):
                one = raw[j : j + 1].copy()
                one.setflags(write=False)  # shared through the cache
                outs[i] = one
            if self.cache_size:
                with self._cache_lock:
                    for i in idx:
                        self._cache[keys[i]] = outs[i]  # type: ignore[assignment]
                        self._cache.move_to_end(keys[i])
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)

    def prefetch_in_background(self, image: np.ndarray) -> Future[np.ndarray] | None:
        """Start the network on ``image`` in a background thread and return at once.

        A ``detect`` of the same input that comes while the pass runs waits for it instead of
        running its own, and one that comes later finds the output in the cache; the detections
        are the same as without it. ``Toolkit`` uses it for the mirrored view of an image whose
        first look runs without test-time augmentation, because the re-check that follows almost
        always adds it: the two passes then share the cores. Returns the pass's future, or ``None``
        when the output is already held or running (or the cache is off).
        """
        if not self.cache_size:
            return None
        self.load()
        padded, _ = self._letterboxed([image])
        key = hashlib.sha256(padded[0].data).digest()
        fut: Future[np.ndarray] = Future()
        with self._cache_lock:
            self._after_fork()
            if self._held(key) is not None or key in self._inflight:
                return None
            self._inflight[key] = fut
            if self._background is None:
                self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="echo-detector")
            pool = self._background

        def work() -> None:
            outs: list[np.ndarray | None] = [None]
            try:
                self._run_and_cache(padded, [key], [0], outs)
                fut.set_result(outs[0])  # type: ignore[arg-type]
            except BaseException as exc:  # the waiting call falls back to its own pass
                fut.set_exception(exc)
            finally:
                with self._cache_lock:
                    self._inflight.pop(key, None)

        pool.submit(work)
        return fut

    def network_input(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The float32 ``(n, 3, s, s)`` tensor the network receives for ``images`` (letterboxed to
        the model's input size, scaled to 0..1), e.g. as calibration data for quantization."""
        self.load()
        return _to_network(self._letterboxed(images)[0])

    def _letterboxed(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """``images``, each checked (:func:`check_image`), letterboxed to the input size: uint8
        ``(n, s, s, 3)`` and each one's geometry."""
        images = [check_image(img, f"image {i}") for i, img in enumerate(images)]
        s = self._input_size
        padded = np.empty((len(images), s, s, 3), dtype=np.uint8)
        infos = [letterbox(img, s, out=padded[i])[1] for i, img in enumerate(images)]
        return padded, infos

    def pin(self, images: Sequence[np.ndarray]) -> list[bytes]:
        """Run the network on ``images`` now, batched, and hold the outputs until :meth:`unpin` with
        the returned keys: a later ``detect`` of the same input costs no forward pass, however many
        other images run in between (the output cache's size does not matter)."""
        out, _, keys = self._predict_keyed(images)
        for i, k in enumerate(keys):
            one = out[i : i + 1].copy()
            one.setflags(write=False)
            self._pinned.pin(k, one)
        return keys

    def unpin(self, keys: Sequence[bytes]) -> None:
        """Release outputs held by :meth:`pin`."""
        for k in keys:
            self._pinned.unpin(k)

    def prefetch(self, images: Sequence[np.ndarray]) -> None:
        """Run the network on ``images`` now, batched, and keep the outputs for the next ``detect``.

        ``EchoAgent.batch`` calls it with the prepared views of a chunk of images so that their
        first detector calls cost no forward pass of their own. A no-op when the cache is off.
        """
        if self.cache_size:
            self.predict_raw(list(images)[-self.cache_size :])

    def clear_cache(self) -> None:
        """Forget the cached network outputs (pinned ones stay until unpinned); background passes
        still running are waited for first, so none lands in the cache afterwards."""
        with self._cache_lock:
            self._after_fork()
            running = list(self._inflight.values())
        for fut in running:
            try:
                fut.result()
            except Exception:  # noqa: S110 - a failed pass leaves nothing to clear
                pass
        with self._cache_lock:
            self._cache.clear()

    @property
    def dynamic_batch(self) -> bool:
        """Whether the model takes several images in one run (loads the model if needed)."""
        self.load()
        return self._dynamic_batch
