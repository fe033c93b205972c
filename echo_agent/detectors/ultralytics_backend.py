"""ultralytics backend: run ``.pt`` checkpoints (or a ``.yaml`` architecture) and export them to ONNX.

Needs the ``train`` extra (torch + ultralytics), imported only inside the functions here.
:func:`configure_ultralytics_offline` is the one place that makes ultralytics work without network;
the training scripts call it too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtraError, ModelLoadError
from .base import LetterboxYoloDetector

__all__ = ["UltralyticsDetector", "configure_ultralytics_offline", "default_cache_dir", "export_onnx"]

_config_lock = threading.Lock()
_configured: Path | None = None

#: Settings that would reach the network or third-party trackers; all switched off.
_OFFLINE_SETTINGS = {
    "sync": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "hub": False,
    "vscode_msg": False,
    "openvino_msg": False,
}


def default_cache_dir() -> Path:
    """``$ECHO_AGENT_CACHE`` if set, else ``~/.cache/echo-agent``."""
    env = os.environ.get("ECHO_AGENT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "echo-agent"


def _find_font() -> Path | None:
    # Locate matplotlib's bundled DejaVuSans without importing matplotlib (slow import).
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        f = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if f.is_file():
            return f
    return None


def _install_fonts(user_dir: Path) -> None:
    user_dir.mkdir(parents=True, exist_ok=True)
    font = _find_font()
    if font is None:
        return  # plotting may then try to download Arial; training with plots=False never does
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = user_dir / name
        if not target.exists():
            shutil.copyfile(font, target)


def configure_ultralytics_offline(config_dir: str | Path | None = None) -> Path:
    """Make ultralytics work offline and keep its files in a project-local directory; returns that directory.

    Call it before the first ``import ultralytics`` (ultralytics reads its config directory at
    import). It sets ``YOLO_CONFIG_DIR`` (``config_dir``, else an existing ``YOLO_CONFIG_DIR``, else
    ``<cache>/ultralytics`` with ``<cache>`` = ``$ECHO_AGENT_CACHE`` or ``~/.cache/echo-agent``),
    ``YOLO_OFFLINE=1`` and ``YOLO_AUTOINSTALL=false``; copies matplotlib's DejaVuSans as
    ``Arial.ttf`` / ``Arial.Unicode.ttf`` into ``$YOLO_CONFIG_DIR/Ultralytics`` so plotting never
    downloads a font; and, when ultralytics is installed, turns settings sync and every tracker
    integration off and points its weights/runs/datasets directories into the config directory.
    Idempotent; safe to call from several threads.

    Build models from ``.yaml`` files only: a missing ``*.pt`` name makes ultralytics try a download.
    """
    global _configured
    with _config_lock:
        if config_dir is not None:
            cfg = Path(config_dir).expanduser().resolve()
            os.environ["YOLO_CONFIG_DIR"] = str(cfg)
        elif os.environ.get("YOLO_CONFIG_DIR"):
            cfg = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser()
        else:
            cfg = default_cache_dir() / "ultralytics"
            os.environ["YOLO_CONFIG_DIR"] = str(cfg)
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "false"
        _install_fonts(cfg / "Ultralytics")
        if _configured == cfg:
            return cfg
        if importlib.util.find_spec("ultralytics") is not None:
            from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

            _install_fonts(Path(USER_CONFIG_DIR))  # in case ultralytics was imported before us
            updates: dict[str, Any] = {k: v for k, v in _OFFLINE_SETTINGS.items() if k in SETTINGS.defaults}
            for key, sub in (("weights_dir", "weights"), ("runs_dir", "runs"), ("datasets_dir", "datasets")):
                if key in SETTINGS.defaults:
                    updates[key] = str(cfg / sub)
            if any(SETTINGS.get(k) != v for k, v in updates.items()):
                SETTINGS.update(updates)
        _configured = cfg
        return cfg


def _import_ultralytics() -> Any:
    configure_ultralytics_offline()
    try:
        import torch  # noqa: F401
        import ultralytics
    except ImportError as exc:
        raise MissingExtraError("ultralytics", "train", "the ultralytics detector backend") from exc
    return ultralytics


def _check_source(path: str | Path, suffixes: tuple[str, ...]) -> Path:
    p = Path(path).expanduser()
    if p.suffix.lower() not in suffixes:
        raise ModelLoadError(f"{p}: expected a {' or '.join(suffixes)} file for the ultralytics backend")
    if not p.is_file():
        # ultralytics would try to download a missing *.pt by name; never let it.
        raise ModelLoadError(f"ultralytics weights not found at {p}; check the path (nothing is downloaded)")
    return p


class UltralyticsDetector(LetterboxYoloDetector):
    """A YOLO model run by PyTorch through ultralytics, with the same letterbox and post-processing
    as :class:`~echo_agent.detectors.OnnxDetector` (so both give the same boxes for the same weights).

    ``path`` is a trained ``.pt`` checkpoint or a model ``.yaml`` (random weights: tests, smoke runs).
    The model is built lazily on first use. ``device`` is a torch device string.
    """

    backend = "ultralytics"

    def __init__(
        self,
        path: str | Path,
        *,
        labels: Sequence[str] | None = None,
        input_size: int | None = None,
        device: str = "cpu",
        name: str | None = None,
        max_batch: int = 16,
        fuse: bool = True,
    ) -> None:
        p = _check_source(path, (".pt", ".yaml", ".yml"))
        super().__init__(p, name=name, max_batch=max_batch)
        self._labels_arg = tuple(labels) if labels is not None else None
        self._input_size_arg = int(input_size) if input_size is not None else None
        self.device = device
        self.fuse = fuse
        self.model: Any = None  # the torch nn.Module (DetectionModel)

    def _load(self) -> None:
        _import_ultralytics()
        import torch
        from ultralytics import YOLO

        try:
            yolo = YOLO(str(self.path), task="detect")
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path} could not be loaded by ultralytics ({type(exc).__name__}: {exc})"
            ) from exc
        model = yolo.model
        head = model.model[-1]
        nc = int(getattr(head, "nc", len(yolo.names)))
        names = tuple(str(yolo.names[i]) for i in range(len(yolo.names)))
        labels = self._labels_arg or names
        if len(labels) != nc:
            raise ModelLoadError(
                f"{self.path}: the model has {nc} classes but labels {labels} has {len(labels)}"
            )
        self._labels = tuple(labels)
        args = getattr(model, "args", {}) or {}
        imgsz = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
        if isinstance(imgsz, (list, tuple)):
            imgsz = imgsz[0]
        self._input_size = int(self._input_size_arg or imgsz or 640)
        self._end2end = bool(getattr(model, "end2end", False))
        self._dynamic_batch = True
        model = model.to(torch.device(self.device)).float().eval()
        if self.fuse and hasattr(model, "fuse"):
            model = model.fuse(verbose=False)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            y = self.model(x)
            if isinstance(y, (list, tuple)):  # eval mode returns (decoded, raw head outputs)
                y = y[0]
            return y.float().cpu().numpy()


def export_onnx(
    pt_path: str | Path,
    out_path: str | Path,
    imgsz: int = 640,
    dynamic: bool = True,
    simplify: bool = True,
    opset: int | None = None,
) -> Path:
    """Export an ultralytics checkpoint to ONNX at ``out_path`` and return that path.

    ``dynamic=True`` gives dynamic batch (and height/width) axes, so :class:`OnnxDetector` batches
    images in one run. The class names and ``imgsz`` are stored in the file's metadata, which
    :class:`OnnxDetector` reads. Runs on CPU, offline.
    """
    src = _check_source(pt_path, (".pt", ".yaml", ".yml"))
    _import_ultralytics()
    from ultralytics import YOLO

    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "format": "onnx",
        "imgsz": int(imgsz),
        "dynamic": dynamic,
        "simplify": simplify,
        "device": "cpu",
    }
    if opset is not None:
        kwargs["opset"] = int(opset)
    try:
        produced = YOLO(str(src), task="detect").export(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"ONNX export of {src} failed ({type(exc).__name__}: {exc})") from exc
    produced_path = Path(str(produced))
    if produced_path.resolve() != out.resolve():
        shutil.move(str(produced_path), str(out))
    return out
