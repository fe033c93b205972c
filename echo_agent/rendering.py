"""How a Diagnosis is shown: the terminal summary, the overlay image and a FHIR DiagnosticReport.

One module for every output surface (the CLI's ``run``, the batch engines' overlay and FHIR files),
so they say the same thing. The overlay is drawn on the pixels the agent already holds in its image
store (the Diagnosis carries the image's content id, ``image_id``); the file is decoded again only
when the store no longer has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .schemas import Diagnosis


def overlay_title(dx: Diagnosis) -> str:
    """``'malignant 0.95 BI-RADS 4C'``: the label, its probability and the category."""
    title = f"{dx.label} {dx.probability:.2f}"
    if dx.category:
        title += f" {dx.category_system or 'category'} {dx.category}"
    return title + (" (indeterminate)" if dx.indeterminate else "")


def diagnosis_pixels(dx: Diagnosis, store: Any, source: Any = None, *, frame: int | None = None) -> np.ndarray:
    """The image a Diagnosis was made on: from ``store`` by ``dx.image_id``, else decoded from
    ``source`` (the path/bytes the run started from). Raises ``EchoInputError`` when neither has it."""
    from .errors import EchoInputError

    if dx.image_id is not None and store is not None and dx.image_id in store:
        return store.get(dx.image_id)
    if source is None:
        raise EchoInputError("the diagnosed image is no longer in the image store; pass the image source to render it")
    from .imaging import load_image

    return load_image(source, frame=frame).array


def overlay(dx: Diagnosis, pixels: np.ndarray) -> np.ndarray:
    """The image with the reported findings drawn on it and :func:`overlay_title` above."""
    from .imaging import render_overlay

    return render_overlay(pixels, dx.findings, title=overlay_title(dx))


def write_overlay(dx: Diagnosis, pixels: np.ndarray, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write :func:`overlay` as a PNG (atomically: a reader never sees half a file)."""
    import os

    from .imaging import save_png

    path = Path(path)
    if path.exists() and not overwrite:
        from .errors import OutputPathError

        raise OutputPathError(f"{path} already exists")
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        save_png(overlay(dx, pixels), tmp, overwrite=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def conclusion(dx: Diagnosis) -> str:
    """One line: label, probability, category and why it is indeterminate."""
    text = f"{dx.label} (p={dx.probability:.2f})"
    if dx.category:
        text += f", {dx.category_system} {dx.category}"
    if dx.indeterminate:
        text += f"; indeterminate: {dx.indeterminate_reason}"
    return text


def fhir_report(dx: Diagnosis, report_id: str) -> dict[str, Any]:
    """A minimal FHIR R4 DiagnosticReport for one study (status 'preliminary': an AI read)."""
    return {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}]}],
        "code": {"text": f"Ultrasound {dx.organ}: AI-assisted read (echo-agent)"},
        "conclusion": conclusion(dx) + ". " + dx.rationale,
        "conclusionCode": [{"text": dx.label}] + ([{"text": f"{dx.category_system} {dx.category}"}] if dx.category else []),
        "extension": [{"url": "urn:echo-agent:diagnosis", "valueString": dx.model_dump_json()}],
    }


def summary_panel(dx: Diagnosis) -> Any:
    """The terminal summary (a ``rich`` Panel): label, probabilities, category, findings, rationale,
    recommendation, why indeterminate, warnings."""
    from rich.panel import Panel
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold cyan")
    t.add_column()
    label = f"{dx.label} (p={dx.probability:.2f})"
    if dx.indeterminate:
        label += "  [bold yellow]INDETERMINATE[/]"
    t.add_row("organ", dx.organ)
    t.add_row("label", label)
    t.add_row("probabilities", ", ".join(f"{k} {v:.2f}" for k, v in dx.probabilities.items()))
    if dx.category:
        t.add_row(dx.category_system or "category", dx.category)
    if dx.findings:
        for i, f in enumerate(dx.findings[:5]):
            b = f.box
            t.add_row(f"finding {i + 1}", f"{f.label} {f.score:.2f} at [{b.x1:.0f}, {b.y1:.0f}, {b.x2:.0f}, {b.y2:.0f}] px")
    else:
        t.add_row("findings", "no lesion reported")
    t.add_row("rationale", dx.rationale)
    if dx.recommendation:
        t.add_row("recommendation", dx.recommendation)
    if dx.indeterminate_reason:
        t.add_row("why indeterminate", dx.indeterminate_reason)
    for w in dx.warnings:
        t.add_row("warning", f"[yellow]{w}[/]")
    return Panel(t, title="echo-agent diagnosis", border_style="cyan")


__all__ = ["conclusion", "diagnosis_pixels", "fhir_report", "overlay", "overlay_title", "summary_panel", "write_overlay"]
