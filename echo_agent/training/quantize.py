"""8-bit static quantization of the agent's ONNX models (``tools/quantize_models.py`` is the CLI).

A detector or second-look classifier exported in fp32 is quantized with ONNX Runtime's static
quantizer: QDQ format, signed 8-bit weights per output channel, unsigned 8-bit activations whose
ranges come from calibration inputs. The calibration inputs are made by the runtime's own
preprocessing -- :meth:`OnnxDetector.network_input` (letterbox, ``/ 255``) and
:meth:`OnnxRegionClassifier.crops` (square crops with the context margin, the model's input
scaling) -- so the ranges are those the quantized model will meet. Use train images only: the
quantized model is then compared with its fp32 source on val.

The output keeps the source's metadata (labels, thresholds, temperature, provenance) so that
``OnnxDetector`` / ``OnnxRegionClassifier`` load it unchanged, except the weights-version key
(:data:`~echo_agent.detectors.onnx.WEIGHTS_VERSION_KEY`: the quantized outputs are not identical to
the source's, so the evidence must not carry the source's version). :data:`QUANT_META_KEY` records
the source file's digest, the method and the number of calibration inputs.

Needs ``onnx`` (the ``train`` extra) besides onnxruntime; the quantized files themselves run in the
light runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..schemas import Box

__all__ = [
    "METHODS",
    "QUANT_META_KEY",
    "QUANT_OP_TYPES",
    "QuantizeReport",
    "classifier_calibration_inputs",
    "compute_nodes",
    "fp32_source",
    "detector_calibration_inputs",
    "quantize_onnx",
]

#: Metadata key of a quantized file: ``{"source": name, "source_sha256": hex, "method": ..., "calibration_inputs": n}``.
QUANT_META_KEY = "echo_quantized"
#: Calibration methods: ``minmax`` (the observed range) and ``percentile`` (99.999th percentile of |x|).
METHODS = ("minmax", "percentile")
_PERCENTILE = 99.999
#: The compute operators: convolutions and matrix products. A detector is quantized with these only,
#: so its pre- and post-processing stay float (box decoding concatenates pixel coordinates with 0..1
#: scores in one tensor, which one 8-bit scale cannot hold).
QUANT_OP_TYPES = ("Conv", "MatMul", "Gemm")


def _quant_record(session: Any) -> dict[str, Any] | None:
    """The :data:`QUANT_META_KEY` record of a loaded model (``None``: not quantized by this module)."""
    meta = session.get_modelmeta().custom_metadata_map or {}
    return json.loads(meta[QUANT_META_KEY]) if QUANT_META_KEY in meta else None


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def fp32_source(path: str | Path) -> Path:
    """``path`` itself, or for a file this module quantized, the fp32 file it was made from when
    that lies beside it (e.g. ``kidney_int8.onnx`` -> ``kidney.onnx``, as tools/quantize_models.py names them)."""
    path = Path(path)
    record = _quant_record(_session(path))
    if record is not None and (path.parent / record["source"]).is_file():
        return path.parent / record["source"]
    return path


def compute_nodes(path: str | Path) -> list[str]:
    """Names of the Conv / MatMul / Gemm nodes of an ONNX model, in graph order (for choosing
    which to keep in float: the first convolutions, the final linear layer)."""
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in QUANT_OP_TYPES]


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_onnx` wrote."""

    source: str
    output: str
    method: str
    calibration_inputs: int
    source_sha256: str
    size_bytes: int
    source_size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detector_calibration_inputs(detector: Any, images: Iterable[np.ndarray], *, mirror: bool = True) -> list[np.ndarray]:
    """Network inputs (one ``(1, 3, s, s)`` float32 array each) of ``images`` as ``detector``
    (an :class:`~echo_agent.detectors.onnx.OnnxDetector`) makes them; ``mirror`` adds each image's
    horizontal mirror, which the test-time-augmentation re-check also runs."""
    import cv2

    out = []
    for img in images:
        views = [img, cv2.flip(np.ascontiguousarray(img), 1)] if mirror else [img]
        out.extend(detector.network_input([v]) for v in views)
    return out


def classifier_calibration_inputs(classifier: Any, cases: Iterable[tuple[np.ndarray, Sequence[Box | None]]]
                                  ) -> list[np.ndarray]:
    """Network inputs (one ``(1, 3, size, size)`` float32 array each) of every box of every
    ``(image, boxes)`` case as ``classifier`` (an
    :class:`~echo_agent.detectors.region_classifier.OnnxRegionClassifier`) crops them (``None`` =
    the whole image)."""
    out = []
    for image, boxes in cases:
        if boxes:
            x = classifier.crops(image, list(boxes))
            out.extend(x[i : i + 1] for i in range(len(x)))
    return out


class _Reader:
    """ONNX Runtime calibration reader over prepared inputs, with the ``set_range`` protocol the
    quantizer uses to collect statistics a slice at a time (bounded memory)."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray]) -> None:
        self.name, self.inputs = name, inputs
        self.start, self.end, self.pos = 0, len(inputs), 0

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        self.pos += 1
        return {self.name: self.inputs[self.pos - 1]}

    def rewind(self) -> None:
        self.pos = self.start


def _stride(n: int, most: int = 32) -> int:
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def quantize_onnx(source: str | Path, output: str | Path, inputs: Sequence[np.ndarray], *,
                  method: str = "minmax", op_types: Sequence[str] | None = QUANT_OP_TYPES,
                  exclude_nodes: Sequence[str] = (), overwrite: bool = False) -> QuantizeReport:
    """Quantize the fp32 ONNX model ``source`` to ``output`` with ``inputs`` as calibration data.

    ``op_types``: the operator types to quantize (``None``: every type ONNX Runtime can);
    ``exclude_nodes``: node names kept in float whatever their type (see :func:`compute_nodes`).

    Raises :class:`ValueError` for an unknown ``method``, a ``source`` that is already quantized, no
    calibration inputs, inputs whose shape the model does not take, ``output`` equal to ``source``,
    or an existing ``output`` without ``overwrite``; :class:`FileNotFoundError` when ``source`` does
    not exist.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..detectors.onnx import WEIGHTS_VERSION_KEY

    source, output = Path(source), Path(output)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if not source.is_file():
        raise FileNotFoundError(f"model to quantize not found: {source}")
    if output.resolve() == source.resolve():
        raise ValueError(f"the quantized model would overwrite its source {source}; choose another output path")
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    if not inputs:
        raise ValueError("no calibration inputs: quantization needs at least one input the model would see")
    sess = _session(source)
    record = _quant_record(sess)
    if record is not None:
        raise ValueError(f"{source} is already quantized (from {record['source']}); quantize the fp32 model "
                         "(fp32_source() finds it beside a packaged 8-bit file)")
    spec = sess.get_inputs()[0]
    for i, x in enumerate(inputs):
        if x.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape[1:], x.shape[1:], strict=True)):
            raise ValueError(f"calibration input {i} has shape {tuple(x.shape)}; {source.name} takes {spec.shape}")
    del sess

    t0 = time.perf_counter()
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    src_model = onnx.load_from_string(data)
    meta = {p.key: p.value for p in src_model.metadata_props if p.key not in (WEIGHTS_VERSION_KEY, QUANT_META_KEY)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="echo-quant-") as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        # ONNX's own shape inference is enough for these CNNs; the symbolic one fails on some
        # ultralytics exports and then leaves temporary files in the working directory.
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        calib = CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile
        extra: dict[str, Any] = {"CalibStridedMinMax": _stride(len(inputs))}
        if method == "percentile":
            extra.update(CalibPercentile=_PERCENTILE, CalibNumBins=2048)
        quantize_static(
            str(pre), str(raw), _Reader(spec.name, list(inputs)),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=calib, extra_options=extra,
            op_types_to_quantize=None if op_types is None else list(op_types), nodes_to_exclude=list(exclude_nodes),
        )
        model = onnx.load(str(raw))
        del model.metadata_props[:]
        meta[QUANT_META_KEY] = json.dumps({"source": source.name, "source_sha256": digest, "method": method,
                                           "calibration_inputs": len(inputs), "op_types": "all" if op_types is None else list(op_types),
                                           "excluded_nodes": list(exclude_nodes),
                                           "format": "QDQ s8 weights per channel, u8 activations"})
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        part = output.with_name(output.name + f".part{os.getpid()}")
        onnx.save(model, str(part))
        os.replace(part, output)
    return QuantizeReport(source=str(source), output=str(output), method=method, calibration_inputs=len(inputs),
                          source_sha256=digest, size_bytes=output.stat().st_size, source_size_bytes=len(data),
                          seconds=round(time.perf_counter() - t0, 2))
