"""GRPO reward functions in TRL's signature, and the two weight presets.

Every reward is a plain function ``f(completions, **kwargs) -> list[float]``. ``completions`` are what
TRL hands over: for conversational data a list of message lists per rollout (assistant turns, with
``tool_calls``, and the tool turns the tool loop added), or plain strings. The ground truth comes from
dataset columns passed as keyword arguments (one value per completion):

``gt_boxes``
    True lesion boxes, ``[[x1, y1, x2, y2], ...]`` in the model convention (0..1000); ``[]`` = no lesion.
``gt_label``
    The true image-level label.
``width``, ``height``
    Image size in pixels (geometry is computed in pixels, where DIoU's distance term is meaningful;
    without them the 0..1000 coordinates are used).
``organ``
    Organ name (tool names, Diagnosis validation).

A completion's answer is its last assistant turn: a Diagnosis JSON (its ``findings`` give the
predicted boxes, read back through :func:`echo_agent.messages.diagnosis_from_model`) or, for the
grounding tasks, ``{"box": [...]}``.

>>> dx = '{"organ":"breast","label":"malignant","probabilities":{"normal":0.05,"benign":0.05,"malignant":0.9},' \\
...      '"findings":[{"box":[100,100,300,300],"label":"malignant","score":0.9}]}'
>>> localization_reward([dx], gt_boxes=[[[100, 100, 300, 300]]], gt_label=["malignant"])
[1.0]
>>> classification_reward([dx], gt_boxes=[[[100, 100, 300, 300]]], gt_label=["malignant"])
[1.0]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..organs import get_organ
from ..schemas import Box

#: IoU thresholds of :func:`localization_reward` (the mean of the hits is the reward).
IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.75)


# ---------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes; 0 for disjoint or degenerate boxes.

    >>> box_iou([0, 0, 10, 10], [5, 0, 15, 10])
    0.3333333333333333
    >>> box_iou([0, 0, 1, 1], [2, 2, 3, 3])
    0.0
    """
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def box_diou(a: Sequence[float], b: Sequence[float]) -> float:
    """Distance-IoU: IoU minus the squared centre distance over the squared diagonal of the smallest
    enclosing box (Zheng et al., AAAI 2020). In ``[-1, 1]``; never above the IoU.

    >>> box_diou([0, 0, 10, 10], [0, 0, 10, 10])
    1.0
    >>> round(box_diou([0, 0, 10, 10], [20, 0, 30, 10]), 3)  # disjoint: IoU 0, centres 20 apart, diagonal^2 = 30^2 + 10^2
    -0.4
    """
    iou = box_iou(a, b)
    ca = ((a[0] + a[2]) / 2.0, (a[1] + a[3]) / 2.0)
    cb = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)
    rho2 = (ca[0] - cb[0]) ** 2 + (ca[1] - cb[1]) ** 2
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    c2 = cw * cw + ch * ch
    return float(iou - rho2 / c2) if c2 > 0 else iou


# ---------------------------------------------------------------------------------------------------
# reading completions
# ---------------------------------------------------------------------------------------------------
def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") or "" for b in content if isinstance(b, dict) and b.get("type", "text") == "text")
    return str(content)


def final_text(completion: Any) -> str:
    """Text of the last assistant turn of a completion (a string completion is returned as is)."""
    if isinstance(completion, str):
        return completion
    for m in reversed(list(completion or [])):
        if isinstance(m, Mapping) and m.get("role") == "assistant":
            return _text(m.get("content"))
    return ""


def tool_calls_of(completion: Any) -> list[tuple[str, Any]]:
    """Every tool call of a completion as ``(name, arguments)``, in order.

    Structured ``tool_calls`` (TRL's parsed turns) are used where present; otherwise the turn's text
    is parsed with :func:`echo_agent.reasoners.toolcall_parsing.parse_tool_calls`. A call whose
    arguments could not be read has ``None`` as arguments.
    """
    from ..reasoners.toolcall_parsing import parse_tool_calls

    turns = [completion] if isinstance(completion, str) else [
        m for m in completion or [] if isinstance(m, Mapping) and m.get("role") == "assistant"
    ]
    out: list[tuple[str, Any]] = []
    for t in turns:
        if isinstance(t, str):
            calls, text = None, t
        else:
            calls, text = t.get("tool_calls"), _text(t.get("content"))
        if calls:
            for c in calls:
                fn = c.get("function", c) if isinstance(c, Mapping) else {}
                args = fn.get("arguments", fn.get("args"))
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        args = None
                out.append((str(fn.get("name", "")), args if isinstance(args, dict) else None))
            continue
        parsed = parse_tool_calls(text)
        out.extend((c["name"], c["args"]) for c in parsed.tool_calls)
        out.extend((str(c.get("name") or ""), None) for c in parsed.invalid_tool_calls)
    return out


def _answer_json(text: str) -> dict[str, Any] | None:
    from ..reasoners.llm_finalizer import extract_json

    try:
        data = extract_json(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parse_answer(completion: Any, organ: str | None, width: int | None, height: int | None,
                 detections: Mapping[str, Sequence[float]] | str | None = None) -> dict[str, Any] | None:
    """The completion's final answer: ``{"label", "boxes" (0..1000), "diagnosis"}`` or ``None``.

    A Diagnosis is accepted only if :func:`echo_agent.messages.diagnosis_from_model` validates it
    (and, with ``organ`` given, its organ and label set match); a grounding answer ``{"box": [...]}``
    gives one box and no label. ``detections`` (the prompt's candidates: id -> 0..1000 box, or its
    JSON) lets a finding cite a candidate instead of giving a box, as ``LLMFinalizer`` allows.
    """
    from ..messages import diagnosis_from_model
    from ..reasoners.llm_finalizer import fill_boxes_from_ids

    data = _answer_json(final_text(completion))
    if data is None:
        return None
    w, h = int(width or 1000), int(height or 1000)
    if "probabilities" not in data and "label" in data and "findings" in data and organ is not None:
        return _decision_answer(data, get_organ(organ), w, h, detections)
    if "probabilities" in data or "label" in data:
        if detections:
            known = json.loads(detections) if isinstance(detections, str) else detections
            try:
                data = fill_boxes_from_ids(data, {k: Box.from_model(b, w, h) for k, b in known.items()})
            except ValueError:
                return None
        if organ is not None:
            spec = get_organ(organ)
            if data.get("organ", spec.name) != spec.name:
                return None
            probs = data.get("probabilities")
            if not isinstance(probs, dict) or set(probs) != set(spec.image_labels):
                return None
        try:
            dx = diagnosis_from_model(data, w, h)
        except (ValueError, TypeError):
            return None
        return {"label": dx.label, "boxes": [f.box.to_model(w, h) for f in dx.findings], "diagnosis": dx}
    box = data.get("box")
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        try:
            return {"label": None, "boxes": [Box.from_model(box, w, h).to_model(w, h)], "diagnosis": None}
        except ValueError:
            return None
    return None


def _decision_answer(data: dict[str, Any], spec: Any, w: int, h: int,
                     detections: Mapping[str, Sequence[float]] | str | None) -> dict[str, Any] | None:
    """:func:`parse_answer` of a decision answer (``LLMFinalizer(answer="decision")``): valid when
    :func:`~echo_agent.reasoners.decision.complete_decision` accepts it against the prompt's
    candidates; the rewards read its label and the boxes of the candidates it cites (its probabilities,
    which the fusion would give, are uniform here and read by no reward)."""
    from ..reasoners.decision import complete_decision
    from ..schemas import Detection, Diagnosis

    known = json.loads(detections) if isinstance(detections, str) else (detections or {})
    try:
        cands = {k: Detection(id=k, box=Box.from_model(b, w, h), label="candidate", score=0.0) for k, b in known.items()}
        labels = list(spec.image_labels)
        base = Diagnosis(organ=spec.name, label=labels[0], probabilities={lbl: 1.0 / len(labels) for lbl in labels},
                         image_width=w, image_height=h)
        dx = complete_decision(data, spec, base, cands)
    except (ValueError, TypeError):
        return None
    return {"label": dx.label, "boxes": [f.box.to_model(w, h) for f in dx.findings], "diagnosis": dx}


def _column(kwargs: Mapping[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    v = kwargs.get(name)
    if v is None:
        return [default] * n
    v = list(v)
    if len(v) != n:
        raise ValueError(f"reward column {name!r} has {len(v)} values for {n} completions")
    return v


def _boxes(v: Any) -> list[list[float]]:
    if v is None:
        return []
    if isinstance(v, str):
        v = json.loads(v) if v else []
    return [list(map(float, b)) for b in v]


def _pixels(box: Sequence[float], w: int | None, h: int | None) -> list[float]:
    if not w or not h:
        return [float(c) for c in box]
    return Box.from_model(box, int(w), int(h)).to_list()


def _answers(completions: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any] | None, Any, Any, Any]]:
    """Per completion: :func:`parse_answer` with the ``organ``/``width``/``height``/``detections``
    columns of ``kwargs``, and that row's organ, width and height."""
    n = len(completions)
    organs, ws, hs, dets = (_column(kwargs, k, n) for k in ("organ", "width", "height", "detections"))
    for c, organ, w, h, d in zip(completions, organs, ws, hs, dets, strict=True):
        yield parse_answer(c, organ, w, h, d), organ, w, h


def _answers_with_truth(
    completions: Sequence[Any], gt_boxes: Sequence[Any], kwargs: Mapping[str, Any]
) -> Iterator[tuple[list[list[float]] | None, list[list[float]]]]:
    """Per completion: the answer's boxes in pixels (``None`` when it cannot be parsed) and the
    true boxes in pixels, reading ``organ``/``width``/``height`` columns from ``kwargs``."""
    for (ans, _, w, h), gt in zip(_answers(completions, kwargs), gt_boxes, strict=True):
        gts = [_pixels(b, w, h) for b in _boxes(gt)]
        yield (None if ans is None else [_pixels(b, w, h) for b in ans["boxes"]]), gts


def _best(gt: Sequence[float], preds: Sequence[Sequence[float]], fn: Callable[[Sequence[float], Sequence[float]], float]) -> float:
    return max((fn(p, gt) for p in preds), default=-1.0 if fn is box_diou else 0.0)


# ---------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------
def localization_reward(
    completions: Sequence[Any], *, gt_boxes: Sequence[Any], thresholds: Sequence[float] = IOU_THRESHOLDS, **kwargs: Any
) -> list[float]:
    """IoU hit rate at several thresholds, averaged over the true lesions.

    For each true box the best IoU with any predicted box is compared with every threshold in
    ``thresholds``; the reward is the mean of those hits over thresholds and lesions, minus a
    false-positive share (predicted boxes that match no lesion at the lowest threshold, as a
    fraction of predicted boxes, times 0.5). An image without lesions scores 1 when no box is
    predicted and 0 otherwise. An unreadable answer scores 0.

    >>> dx = '{"organ":"breast","label":"benign","probabilities":{"normal":0.1,"benign":0.9,"malignant":0.0},' \\
    ...      '"findings":[{"box":[0,0,100,100],"label":"benign","score":0.9}]}'
    >>> localization_reward([dx], gt_boxes=[[[0, 0, 100, 60]]])  # IoU 0.6: hits at 0.3 and 0.5
    [0.6666666666666666]
    >>> localization_reward(['{"box": [0, 0, 100, 100]}'], gt_boxes=[[]])
    [0.0]
    """
    out = []
    for preds, gts in _answers_with_truth(completions, gt_boxes, kwargs):
        if preds is None:
            out.append(0.0)
            continue
        if not gts:
            out.append(1.0 if not preds else 0.0)
            continue
        hits = [sum(_best(g, preds, box_iou) >= t for t in thresholds) / len(thresholds) for g in gts]
        fp = [p for p in preds if max(box_iou(p, g) for g in gts) < min(thresholds)]
        penalty = 0.5 * len(fp) / len(preds) if preds else 0.0
        out.append(max(sum(hits) / len(hits) - penalty, 0.0))
    return out


def classification_reward(
    completions: Sequence[Any], *, gt_label: Sequence[str], gt_boxes: Sequence[Any] | None = None,
    iou_gate: float = 0.5, **kwargs: Any,
) -> list[float]:
    """1 when the label is right *and* grounded: with a true lesion, some finding of the answer must
    overlap a true box at ``iou_gate``; 0.25 for the right label with no grounded box; 0 otherwise.

    The gate stops the policy from collecting the diagnosis reward while pointing at the wrong place.

    >>> right = '{"organ":"breast","label":"malignant","probabilities":{"normal":0,"benign":0.1,"malignant":0.9},' \\
    ...         '"findings":[{"box":[600,600,900,900],"label":"malignant","score":0.9}]}'
    >>> classification_reward([right], gt_label=["malignant"], gt_boxes=[[[0, 0, 300, 300]]])
    [0.25]
    >>> classification_reward([right], gt_label=["benign"], gt_boxes=[[[600, 600, 900, 900]]])
    [0.0]
    """
    gtb = list(gt_boxes) if gt_boxes is not None else [[]] * len(completions)
    out = []
    for (ans, _, w, h), label, gt in zip(_answers(completions, kwargs), gt_label, gtb, strict=True):
        if ans is None or ans["label"] != label:
            out.append(0.0)
            continue
        gts = [_pixels(b, w, h) for b in _boxes(gt)]
        if not gts:
            out.append(1.0)
            continue
        preds = [_pixels(b, w, h) for b in ans["boxes"]]
        grounded = any(_best(g, preds, box_iou) >= iou_gate for g in gts)
        out.append(1.0 if grounded else 0.25)
    return out


def shape_reward(completions: Sequence[Any], *, gt_boxes: Sequence[Any], **kwargs: Any) -> list[float]:
    """Box shape and position through DIoU, mapped to ``[0, 1]`` as ``(1 + DIoU) / 2`` and averaged
    over the true lesions (best-matching predicted box each). Unlike IoU it still gives a gradient
    when the boxes do not overlap. No lesion and no box: 1; any mismatch of presence: 0.

    >>> dx = '{"organ":"breast","label":"benign","probabilities":{"normal":0.1,"benign":0.9,"malignant":0.0},' \\
    ...      '"findings":[{"box":[0,0,100,100],"label":"benign","score":0.9}]}'
    >>> shape_reward([dx], gt_boxes=[[[0, 0, 100, 100]]])
    [1.0]
    """
    out = []
    for preds, gts in _answers_with_truth(completions, gt_boxes, kwargs):
        if preds is None:
            out.append(0.0)
            continue
        if not gts or not preds:
            out.append(1.0 if not gts and not preds else 0.0)
            continue
        vals = [(1.0 + _best(g, preds, box_diou)) / 2.0 for g in gts]
        out.append(sum(vals) / len(vals))
    return out


def _canonical_args(args: Any) -> str:
    if not isinstance(args, dict):
        return "<unreadable>"
    clean = {k: v for k, v in args.items() if v is not None}
    return json.dumps(clean, sort_keys=True)


def tool_cost_reward(
    completions: Sequence[Any], *, redundant_penalty: float = 0.5, budget: int | None = None, **kwargs: Any
) -> list[float]:
    """Penalise wasted tool calls, not strategic ones: ``-redundant_penalty`` for every call that
    repeats an earlier call with the same name and the same arguments (a detector re-run with
    identical settings gives identical evidence), and the same for each call beyond ``budget``.
    A re-check with different settings (``tta``, a lower ``score_threshold``, a ``region``) is free.
    Clipped to ``[-1, 0]``.

    >>> same = [{"role": "assistant", "content": "", "tool_calls": [
    ...     {"type": "function", "function": {"name": "detect_breast_lesions", "arguments": {}}},
    ...     {"type": "function", "function": {"name": "detect_breast_lesions", "arguments": {}}}]}]
    >>> recheck = [{"role": "assistant", "content": "", "tool_calls": [
    ...     {"type": "function", "function": {"name": "detect_breast_lesions", "arguments": {}}},
    ...     {"type": "function", "function": {"name": "detect_breast_lesions", "arguments": {"tta": True}}}]}]
    >>> tool_cost_reward([same, recheck])
    [-0.5, 0.0]
    """
    out = []
    for c in completions:
        seen: set[tuple[str, str]] = set()
        cost = 0.0
        calls = tool_calls_of(c)
        for name, args in calls:
            key = (name, _canonical_args(args))
            if key in seen:
                cost += redundant_penalty
            seen.add(key)
        if budget is not None and len(calls) > budget:
            cost += redundant_penalty * (len(calls) - budget)
        out.append(max(-cost, -1.0) if cost else 0.0)
    return out


def _arg_models(organ: str | None) -> dict[str, Any]:
    from ..prompts import tool_text
    from ..tools.builders import ClassifyArgs, DescribeArgs, DetectArgs, RetrieveArgs

    models: dict[str, Any] = {tool_text("describe_image")[0]: DescribeArgs, tool_text("retrieve_knowledge")[0]: RetrieveArgs}
    from ..organs import list_organs

    specs = [get_organ(organ)] if organ else list_organs()
    for s in specs:
        models[tool_text("detect_lesions", s)[0]] = DetectArgs
        if s.classifier_weights:
            models[tool_text("classify_regions", s)[0]] = ClassifyArgs
    return models


def valid_tool_call(name: str, args: Any, organ: str | None = None) -> bool:
    """Whether a tool call names one of the agent's tools (for ``organ``) with arguments its schema accepts.

    >>> valid_tool_call("detect_breast_lesions", {"tta": True}, "breast")
    True
    >>> valid_tool_call("detect_breast_lesions", {"region": [10, 10, 5, 5]}, "breast")
    False
    >>> valid_tool_call("detect_kidney_lesions", {}, "breast")
    False
    """
    from pydantic import ValidationError

    model = _arg_models(organ).get(name)
    if model is None or not isinstance(args, dict) or "runtime" in args:
        return False
    try:
        model.model_validate(args)
    except ValidationError:
        return False
    return True


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Well-formed output: a valid final answer (a Diagnosis JSON that
    :func:`echo_agent.messages.diagnosis_from_model` accepts with the organ's labels, or a
    ``{"box": ...}`` answer for the grounding tasks ``rec`` / ``reg``) and, when the completion calls
    tools, well-formed calls (the share of calls that name a real tool with arguments its schema
    accepts). With tool calls the two count half each; without, the final answer is the whole reward,
    so text that is neither a call nor an answer earns nothing.

    >>> dx = '{"organ":"breast","label":"normal","probabilities":{"normal":0.9,"benign":0.05,"malignant":0.05}}'
    >>> format_reward([dx, "no json here"], organ=["breast", "breast"])
    [1.0, 0.0]
    """
    tasks = _column(kwargs, "task", len(completions))
    out = []
    for c, (ans, organ, _, _), task in zip(completions, _answers(completions, kwargs), tasks, strict=True):
        calls = tool_calls_of(c)
        if task in ("rec", "reg"):
            ok = ans is not None and bool(ans["boxes"])
        else:
            ok = ans is not None and ans["diagnosis"] is not None
        if calls:
            tool_part = sum(valid_tool_call(nm, a, organ) for nm, a in calls) / len(calls)
            out.append(0.5 * tool_part + 0.5 * float(ok))
        else:
            out.append(float(ok))
    return out


def valid_tool_calls_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1 when the completion calls at least one tool and every call is valid (:func:`valid_tool_call`),
    else 0. Its mean over a batch is the share of rollouts with well-formed tool use; ``run_grpo``
    logs it with weight 0 as a metric.

    >>> call = [{"role": "assistant", "content": "", "tool_calls": [
    ...     {"type": "function", "function": {"name": "detect_breast_lesions", "arguments": {}}}]}]
    >>> valid_tool_calls_reward([call, "no call"], organ=["breast", "breast"])
    [1.0, 0.0]
    """
    organs = _column(kwargs, "organ", len(completions))
    out = []
    for c, organ in zip(completions, organs, strict=True):
        calls = tool_calls_of(c)
        out.append(float(bool(calls) and all(valid_tool_call(nm, a, organ) for nm, a in calls)))
    return out


def valid_diagnosis_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1 when the completion's final turn is a Diagnosis JSON that :func:`parse_answer` accepts for the
    organ, else 0 (``run_grpo`` logs it with weight 0 as a metric).

    >>> dx = '{"organ":"breast","label":"benign","probabilities":{"normal":0.1,"benign":0.8,"malignant":0.1}}'
    >>> valid_diagnosis_reward([dx, '{"label": "benign"}'], organ=["breast", "breast"])
    [1.0, 0.0]
    """
    return [float(ans is not None and ans["diagnosis"] is not None) for ans, _, _, _ in _answers(completions, kwargs)]


#: Zero-weight metrics that ``run_grpo`` logs next to any preset (TRL logs every reward function's mean).
VALIDITY_METRICS: dict[str, Callable[..., list[float]]] = {
    "valid_tool_calls": valid_tool_calls_reward,
    "valid_diagnosis": valid_diagnosis_reward,
}


# ---------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------
REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "localization": localization_reward,
    "classification": classification_reward,
    "shape": shape_reward,
    "tool_cost": tool_cost_reward,
    "format": format_reward,
    **VALIDITY_METRICS,
}


@dataclass(frozen=True)
class RewardPreset:
    """Named reward weights (TRL ``reward_weights``, same order as ``names``)."""

    name: str
    weights: Mapping[str, float] = field(default_factory=dict)
    description: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def funcs(self) -> list[Callable[..., list[float]]]:
        """The reward functions, each renamed ``<name>_reward`` for TRL's logs."""
        return [REWARD_FUNCS[k] for k in self.weights]

    def weight_list(self) -> list[float]:
        return [float(v) for v in self.weights.values()]


#: Grounding-first (the paper's Echo-Ground): find the lesion and its shape before the label.
ECHO_GROUND = RewardPreset(
    "echo-ground",
    {"localization": 2.0, "shape": 1.0, "classification": 0.5, "tool_cost": 0.5, "format": 1.0},
    "Localization (IoU at 0.3/0.5/0.75) and shape (DIoU) dominate; the label counts less.",
)
#: Diagnosis-first (the paper's Echo-Diag): the grounded label dominates.
ECHO_DIAG = RewardPreset(
    "echo-diag",
    {"localization": 0.5, "shape": 0.25, "classification": 2.0, "tool_cost": 0.5, "format": 1.0},
    "The IoU-gated classification reward dominates; localization keeps the answer grounded.",
)
PRESETS: dict[str, RewardPreset] = {p.name: p for p in (ECHO_GROUND, ECHO_DIAG)}


def get_preset(name: str | RewardPreset | Mapping[str, float]) -> RewardPreset:
    """A preset by name (``echo-ground``, ``echo-diag``) or from a ``{reward: weight}`` mapping.

    >>> get_preset("echo-diag").weights["classification"]
    2.0
    >>> get_preset({"format": 1.0}).names
    ['format']
    """
    if isinstance(name, RewardPreset):
        return name
    if isinstance(name, Mapping):
        unknown = [k for k in name if k not in REWARD_FUNCS]
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; choose from {sorted(REWARD_FUNCS)}")
        return RewardPreset("custom", dict(name))
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown reward preset {name!r}; choose from {sorted(PRESETS)} or give weights") from None


__all__ = [
    "ECHO_DIAG",
    "ECHO_GROUND",
    "IOU_THRESHOLDS",
    "PRESETS",
    "VALIDITY_METRICS",
    "REWARD_FUNCS",
    "RewardPreset",
    "box_diou",
    "box_iou",
    "classification_reward",
    "final_text",
    "format_reward",
    "get_preset",
    "localization_reward",
    "parse_answer",
    "shape_reward",
    "tool_calls_of",
    "valid_diagnosis_reward",
    "valid_tool_calls_reward",
    "tool_cost_reward",
    "valid_tool_call",
]
