"""A pool of second looks as one region classifier: the mean of their calibrated log-probabilities.

Two region classifiers with the same labels that look at different things (a probe on global frozen
features, a segmenter of the lesion cells) make partly independent errors. Their log-linear pool --
the mean of each one's calibrated log-probabilities, renormalised; for two labels the mean of the
log-odds -- is one calibrated-scale answer that a fusion reads like any classifier's.

:func:`pool_region_classifiers` writes the pool as **one ONNX file**: each member's graph behind one
shared ``images`` input, each member's logits divided by its temperature and turned into
log-probabilities, their mean the file's ``logits``. The members must share labels, input size, crop
margin and input scaling (one crop feeds them all); the pooled file's metadata keeps theirs
(temperature 1) and lists the members. The agent's loader, the classify tool and the fusions need
nothing new. With ``mirror`` each member also answers for the horizontally mirrored crop (a view the
second looks are trained on; posterior features still point down the beam), in the same batched pass,
and those answers join the pool: one member with ``mirror`` is its own mirror average. Needs the
``onnx`` package (train extra); the pooled file runs in the light runtime.
:func:`pool_probabilities` is the same pool for probabilities already computed (cached runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..detectors.region_classifier import CLASSIFIER_META_KEY, ClassifierInfo

#: Metadata that every member must share (one crop, one input, one label order).
SHARED_KEYS = ("labels", "input_size", "margin", "offset", "scale")
#: Floor of a probability before its logarithm (the exported segmenter clamps at 1e-6 too).
EPS = 1e-6


def pool_probabilities(members: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The log-linear pool of several probability dicts over the same labels.

    >>> p = pool_probabilities([{"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5}])
    >>> round(p["a"], 4)   # odds sqrt(9 * 1) = 3
    0.75
    """
    if not members:
        raise ValueError("nothing to pool")
    labels = list(members[0])
    if any(set(m) != set(labels) for m in members):
        raise ValueError(f"members disagree on the labels: {[sorted(m) for m in members]}")
    logs = {k: sum(math.log(max(float(m[k]), EPS)) for m in members) / len(members) for k in labels}
    top = max(logs.values())
    z = {k: math.exp(v - top) for k, v in logs.items()}
    total = sum(z.values())
    return {k: v / total for k, v in z.items()}


def _info(model: Any, source: str) -> ClassifierInfo:
    meta = {e.key: e.value for e in model.metadata_props}
    if CLASSIFIER_META_KEY not in meta:
        raise ValueError(f"{source}: not a region classifier (no {CLASSIFIER_META_KEY!r} metadata)")
    return ClassifierInfo.parse(meta[CLASSIFIER_META_KEY], source)


def pool_region_classifiers(paths: Sequence[str | Path], output: str | Path, *, name: str | None = None,
                            mirror: bool = False) -> Path:
    """Write the log-linear pool of the region classifiers at ``paths`` as one ONNX file.

    ``mirror`` also asks each member about the horizontally mirrored crop and pools those answers
    with the rest (one member with ``mirror`` is its own mirror average).

    Raises :class:`ValueError` when fewer than two answers would be pooled, a file is not a region
    classifier, or the members differ in labels, input size, margin or input scaling."""
    import numpy as np
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    if len(paths) < (1 if mirror else 2):
        raise ValueError(f"a pool needs at least two classifiers (or one with mirror), got {len(paths)}")
    models, infos = [], []
    for p in paths:
        m = onnx.load(str(p))
        infos.append(_info(m, str(p)))
        models.append(m)
    for key in SHARED_KEYS:
        values = [info[key] for info in infos]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"the classifiers differ in {key!r}: {dict(zip(map(str, paths), values, strict=True))}")
    versions = [next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) for m in models]
    opset = max(versions)
    for i, v in enumerate(versions):
        if v != opset:  # one graph has one opset: bring the older members up to it
            from onnx import version_converter

            try:
                models[i] = version_converter.convert_version(models[i], opset)
            except Exception as exc:  # noqa: BLE001 - the converter raises several kinds
                raise ValueError(f"{paths[i]}: cannot convert from opset {v} to the pool's {opset} ({exc}); "
                                 "re-export the members with one opset") from None
    nodes, inits, value_info = [], [], []
    pooled_terms = []
    source = "images"
    if mirror:  # both views in one batch: [crops; crops flipped left-right] (a Slice over the width, step -1)
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                  (("mirror_starts", [-1]), ("mirror_ends", [-(2**62)]), ("mirror_axes", [3]), ("mirror_steps", [-1]))]
        nodes.append(helper.make_node("Slice", ["images", "mirror_starts", "mirror_ends", "mirror_axes", "mirror_steps"],
                                      ["images_mirrored"]))
        nodes.append(helper.make_node("Concat", ["images", "images_mirrored"], ["images_both"], axis=0))
        source = "images_both"
    for i, (m, info) in enumerate(zip(models, infos, strict=True)):
        if len(m.graph.input) != 1 or len(m.graph.output) != 1:
            raise ValueError(f"{paths[i]}: a region classifier has one input and one output")
        prefix = f"m{i}_"
        m = compose.add_prefix(m, prefix)
        g = m.graph
        nodes.append(helper.make_node("Identity", [source], [g.input[0].name]))
        nodes.extend(g.node)
        inits.extend(g.initializer)
        value_info.extend(g.value_info)
        t = numpy_helper.from_array(np.array(float(info["temperature"]), np.float32), f"{prefix}pool_temperature")
        inits.append(t)
        nodes.append(helper.make_node("Div", [g.output[0].name, t.name], [f"{prefix}pool_scaled"]))
        nodes.append(helper.make_node("LogSoftmax", [f"{prefix}pool_scaled"], [f"{prefix}pool_logp"], axis=1))
        if mirror:  # the two halves of the batch: the crops' answers and the mirrors'
            halves = [f"{prefix}pool_logp_crop", f"{prefix}pool_logp_mirror"]
            extra = {"num_outputs": 2} if opset >= 18 else {}
            nodes.append(helper.make_node("Split", [f"{prefix}pool_logp"], halves, axis=0, **extra))
            pooled_terms += halves
        else:
            pooled_terms.append(f"{prefix}pool_logp")
    n = numpy_helper.from_array(np.array(float(len(pooled_terms)), np.float32), "pool_members")
    inits.append(n)
    nodes.append(helper.make_node("Sum", pooled_terms, ["pool_sum"]))
    nodes.append(helper.make_node("Div", ["pool_sum", n.name], ["logits"]))
    size = int(infos[0]["input_size"])
    graph = helper.make_graph(
        nodes, "region_classifier_pool",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(infos[0]["labels"])])],
        initializer=inits, value_info=value_info)
    pooled = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                               producer_name="echo-agent classifier_pool")
    pooled.ir_version = max(m.ir_version for m in models)
    info = {key: infos[0][key] for key in SHARED_KEYS}
    info.update({"temperature": 1.0, "kind": "pool", "mirror": mirror,
                 "pooling": "log-linear (mean of calibrated log-probabilities)" + (", each member also on the mirrored crop"
                                                                                   if mirror else ""),
                 "organ": infos[0].get("organ"), "backbone": " + ".join(str(i.get("backbone", "?")) for i in infos),
                 "members": [{"file": Path(p).name, **{k: v for k, v in i.items() if k not in SHARED_KEYS}}
                             for p, i in zip(paths, infos, strict=True)]})
    if name:
        info["name"] = name
    entry = pooled.metadata_props.add()
    entry.key, entry.value = CLASSIFIER_META_KEY, json.dumps(info, sort_keys=True, default=str)
    onnx.checker.check_model(pooled)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(pooled, str(out))
    return out


__all__ = ["EPS", "SHARED_KEYS", "pool_probabilities", "pool_region_classifiers"]
