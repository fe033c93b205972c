"""Markdown report of an evaluation, rendered from the ``metrics.json`` summary alone.

Because it only reads the summary dict, a report can be regenerated from a saved ``metrics.json``::

    import json
    from echo_agent.eval.report import render_report
    text = render_report(json.load(open("runs/busi/metrics.json")))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_DASH = "–"


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with fixed decimals, or a dash for a missing value."""
    return _DASH if value is None else f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.812 [0.780, 0.845]``; the interval is left out when there is none."""
    if value is None:
        return _DASH
    if not ci:
        return fmt(value, digits)
    return f"{value:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def _auc(m: Mapping[str, Any]) -> str:
    auc = m.get("auc")
    if not auc:
        return _DASH
    return fmt(auc["value"]) if auc["value"] is not None else f"{_DASH} ({auc['reason']})"


def _cal(m: Mapping[str, Any], key: str) -> str:
    cal = m.get("calibration")
    return fmt(cal[key]) if cal else _DASH


def lesions_called_normal(m: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(lesion images read as the normal label, lesion images)`` from a system's confusion matrix
    (the organ's first label is its normal label); ``None`` without lesion images."""
    cm = (m.get("classification") or {}).get("confusion")
    if not cm or not cm.get("labels"):
        return None
    rows = cm["matrix"][1:]
    total = sum(sum(r) for r in rows)
    return (sum(r[0] for r in rows), total) if total else None


def _called_normal(m: Mapping[str, Any]) -> str:
    v = lesions_called_normal(m)
    return _DASH if v is None else f"{v[0]} / {v[1]} ({100.0 * v[0] / v[1]:.1f} %)"


def headline_rows(systems: Mapping[str, Mapping[str, Any]],
                  category: Mapping[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """``(metric, detector-only, agent)`` rows of the headline metrics (values formatted); with an
    organ's ``category_agreement`` also the agent's category agreement with the readers."""
    det, ag = systems.get("detector", {}), systems.get("agent", {})

    def both(f: Any) -> tuple[str, str]:
        return (f(det) if det else _DASH, f(ag) if ag else _DASH)

    def pos_label(m: Mapping[str, Any]) -> str:
        auc = m.get("auc") or {}
        return f"{auc.get('positive_label')} vs {auc.get('negative_label')}" if auc else ""

    auc_name = f"AUC ({pos_label(ag or det)})" if (ag or det).get("auc") else "AUC"
    rows = [
        ("images scored", *both(lambda m: str(m["n_images"]))),
        ("localization F1@0.5", *both(lambda m: fmt_ci(m["localization"]["f1"], m["localization"]["ci"]))),
        ("  precision / recall", *both(lambda m: f"{fmt(m['localization']['precision'])} / {fmt(m['localization']['recall'])}")),
        ("grounded F1@0.5", *both(lambda m: fmt_ci(m["grounded"]["f1"], m["grounded"]["ci"]))),
        ("accuracy", *both(lambda m: fmt_ci(m["classification"]["accuracy"], m["classification"]["accuracy_ci"]))),
        ("balanced accuracy", *both(lambda m: fmt_ci(m["classification"]["balanced_accuracy"],
                                                     m["classification"]["balanced_accuracy_ci"]))),
        ("lesion images called normal", *both(_called_normal)),
        (auc_name, *both(_auc)),
        ("ECE (15 bins)", *both(lambda m: _cal(m, "ece"))),
        ("Brier score", *both(lambda m: _cal(m, "brier"))),
    ]
    if category and category.get("n"):
        rows.append((f"{category.get('system') or 'category'} vs readers: exact / within one", _DASH,
                     f"{fmt(category['exact'])} / {fmt(category['within_one'])} (n={category['n']})"))
    if (ag or det).get("referral"):
        rows += [
            ("referred for review (indeterminate)", *both(_referred)),
            ("  accuracy kept / referred", *both(lambda m: _ref(m, lambda r: f"{fmt(r['accuracy_kept'])} / {fmt(r['accuracy_referred'])}"))),
            ("  positives missed: unflagged / referred",
             *both(lambda m: _ref(m, lambda r: f"{r['positive_missed_kept']} / {r['positive_missed_referred']}"
                                  if r["positive_missed_kept"] is not None else _DASH))),
        ]
    return rows


def _ref(m: Mapping[str, Any], f: Any) -> str:
    r = m.get("referral")
    return f(r) if r else _DASH


def _referred(m: Mapping[str, Any]) -> str:
    def text(r: Mapping[str, Any]) -> str:
        why = ", ".join(f"{k} {v}" for k, v in r["by_reason"].items())
        return f"{r['n_referred']} ({r['referred_rate']:.1%})" + (f": {why}" if why else "")

    return _ref(m, text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> list[str]:
    sep = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def _per_class_rows(systems: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    det = {c["label"]: c for c in systems.get("detector", {}).get("classification", {}).get("per_class", [])}
    ag = {c["label"]: c for c in systems.get("agent", {}).get("classification", {}).get("per_class", [])}
    rows = []
    for label in dict.fromkeys([*det, *ag]):
        d, a = det.get(label, {}), ag.get(label, {})
        support = d.get("support", a.get("support", 0))
        rows.append([label, str(support), fmt(d.get("recall")), fmt(a.get("recall"))])
    return rows


def _confusion_lines(name: str, m: Mapping[str, Any]) -> list[str]:
    cm = m["classification"]["confusion"]
    labels = cm["labels"]
    rows = [[f"**{lbl}**", *[str(v) for v in row]] for lbl, row in zip(labels, cm["matrix"], strict=True)]
    return [f"{name} (rows: truth, columns: prediction)", "", *_table(["truth \\ pred", *labels], rows)]


def _group_rows(centers: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[list[str]]:
    rows = []
    for c, systems in centers.items():
        for s, m in systems.items():
            cls = m["classification"]
            rows.append([
                c, s, str(m["n_images"]), fmt(m["localization"]["f1"]), fmt(m["grounded"]["f1"]),
                fmt(cls["accuracy"]), fmt(cls["balanced_accuracy"]),
                fmt(m["auc"]["value"]) if m.get("auc") else _DASH,
            ])
    return rows


def _filters(filters: Mapping[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in filters.items() if v is not None and k != "seed"]
    if filters.get("limit") is not None:
        shown.append(f"random subset, seed {filters.get('seed')}")
    return "filters: " + ", ".join(shown) if shown else "all images of the manifest"


def render_report(summary: Mapping[str, Any], *, plots: Sequence[str | Path] = ()) -> str:
    """The Markdown report of one evaluation (``summary`` is the content of ``metrics.json``)."""
    out: list[str] = ["# echo-agent evaluation: detector-only vs agent", ""]
    out += [
        f"- manifest: `{summary.get('manifest')}`",
        f"- images: {summary.get('n_images')} ({_filters(summary.get('filters') or {})})",
        f"- baseline detection threshold: {summary.get('score_threshold')}; IoU threshold: {summary.get('iou_threshold')}",
        f"- bootstrap: {summary.get('n_boot')} resamples, 95 % percentile intervals in brackets "
        "(resampling whole patients / groups where the manifest gives them)",
        f"- run: {summary.get('started')} – {summary.get('finished')}",
        "",
        "Reproduce:",
        "",
        "```bash",
        str(summary.get("command", "")),
        "```",
        "",
        "Metric definitions: `docs/metrics.md`. The detector-only baseline labels an image with the label "
        "of its highest-scoring detection above threshold (`normal` when none) and has no probability "
        "distribution, so it has no ECE or Brier score; its AUC ranks the highest positive-class "
        "detection score (0 when none).",
        "",
    ]
    errors = summary.get("errors") or {}
    if any(errors.values()):
        out += [
            f"**Failures**: detector-only {errors.get('detector', 0)}, agent {errors.get('agent', 0)} image(s). "
            "A failed image is left out of that system's metrics (so the two columns may cover different "
            "images); the errors are in `predictions.jsonl`.",
            "",
        ]
        for e in summary.get("error_examples", [])[:5]:
            out.append(f"- `{e['key']}` ({e['system']}): {e['type']}: {e['message']}")
        out.append("")
    warned = summary.get("agent_warnings") or []
    if warned:
        out += ["**Warnings in the agent's diagnoses** (images with each kind; a warning on most images "
                "usually means a run-wide condition, such as a learned fusion that stepped aside):", ""]
        out += _table(["warning (first text of its kind)", "images"],
                      [[w["warning"], str(w["images"])] for w in warned], align_right_from=1)
        out.append("")
    timing = summary.get("timing_ms") or {}
    if timing:
        out += _table(
            ["time per image (ms)", "mean", "median", "p95"],
            [[s, fmt(t.get("mean"), 1), fmt(t.get("median"), 1), fmt(t.get("p95"), 1)] for s, t in timing.items()],
        )
        out.append("")

    plot_names = [str(p) for p in plots]
    for organ, om in summary.get("organs", {}).items():
        overall = om["overall"]
        out += [f"## {organ}", ""]
        out += _table(["metric", "detector-only", "agent"], headline_rows(overall, om.get("category_agreement")))
        out.append("")
        out += ["### Per-class accuracy (recall)", ""]
        out += _table(["true label", "images", "detector-only", "agent"], _per_class_rows(overall))
        out.append("")
        out += ["### Confusion matrices", ""]
        for s, name in (("detector", "Detector-only"), ("agent", "Agent")):
            if s in overall:
                out += _confusion_lines(name, overall[s])
                out.append("")
        breakdowns = [("center", om.get("centers"))]
        if om.get("by"):
            breakdowns.append((om["by"]["column"], om["by"]["groups"]))
        for column, groups in breakdowns:
            if groups:
                out += [f"### Per {column}", ""]
                out += _table(
                    [column, "system", "images", "loc. F1", "grounded F1", "accuracy", "bal. acc.", "AUC"],
                    _group_rows(groups), align_right_from=2,
                )
                out.append("")
        ca = om.get("category_agreement")
        if ca:
            out += _category_section(ca)
        notes = {n for s in overall.values() for n in s.get("notes", [])}
        for n in sorted(notes):
            out.append(f"- note: {n}")
        if notes:
            out.append("")
        mine = [p for p in plot_names if f"_{organ}." in Path(p).name]
        if mine:
            out += ["### Figures", ""]
            out += [f"![{Path(p).stem}]({Path(p).as_posix()})" for p in mine]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _majority(base: Mapping[str, Any]) -> str:
    reader = base.get("reader_category")
    return base["category"] if not reader or reader == base["category"] else f"{reader}, answered as {base['category']}"


def _category_section(ca: Mapping[str, Any]) -> list[str]:
    """The organ's category agreement: the sentence, what was scored at a coarser level or not at all,
    and the reader x agent table."""
    system = ca.get("system") or "category"
    out = [f"### {ca.get('system') or 'Category'} agreement with the readers", ""]
    if ca["n"]:
        base = ca["majority_baseline"]
        out.append(f"{ca['n']} images with a reader category: exact {fmt(ca['exact'], 3)}, within one step "
                   f"{fmt(ca['within_one'], 3)}"
                   + (f" ({ca['n_missing']} without an agent category)" if ca.get("n_missing") else "")
                   + f"; always answering the most frequent reader category ({_majority(base)}): exact "
                   f"{fmt(base['exact'], 3)}, within one {fmt(base['within_one'], 3)}.")
    else:
        out.append(f"No image has a reader category on the {system} scale.")
    if ca.get("n_coarse"):
        out.append(f"{ca['n_coarse']} image(s) with a reader category that covers several steps of the scale (e.g. 4 for "
                   "4A-4C), scored at that level: any of its steps is exact, within one counts those steps as one.")
    if ca.get("unscored"):
        values = ", ".join(f"{v!r} ({k})" for v, k in sorted(ca["unscored"].items()))
        out.append(f"Not scored, reader categories on no {system} step: {values}.")
    out.append("")
    if ca["n"]:
        rows = ca.get("reader_order") or ca["order"]
        out += _table(["reader \\ agent", *ca["order"]],
                      [[c, *[str(v) for v in row]] for c, row in zip(rows, ca["confusion"], strict=True)])
        out.append("")
    return out


__all__ = ["fmt", "fmt_ci", "headline_rows", "render_report"]
