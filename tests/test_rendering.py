"""One rendering module: the summary, the overlay (from the store's pixels) and FHIR."""

from __future__ import annotations

import numpy as np
import pytest
from _fakes import fake_toolkit, speckle_image

from echo_agent import EchoAgent
from echo_agent.errors import EchoInputError, OutputPathError
from echo_agent.imaging import ImageStore
from echo_agent.rendering import (
    diagnosis_pixels,
    fhir_report,
    overlay,
    overlay_title,
    summary_panel,
    write_overlay,
)


def _run():
    tk = fake_toolkit(render_overlays=False)
    img = speckle_image()
    return EchoAgent(toolkit=tk, organ="breast", router=None).run(img), tk, img


def test_the_diagnosis_names_its_image_and_the_overlay_uses_the_stored_pixels(tmp_path, monkeypatch):
    dx, tk, img = _run()
    store = tk.get_store()
    assert dx.image_id is not None and dx.image_id in store
    import echo_agent.imaging as imaging

    monkeypatch.setattr(imaging, "load_image", lambda *a, **k: pytest.fail("decoded the image again"))
    pixels = diagnosis_pixels(dx, store)
    assert np.array_equal(pixels, img)
    out = write_overlay(dx, pixels, tmp_path / "o.png")
    assert out.is_file() and not list(tmp_path.glob("*.tmp.png"))
    with pytest.raises(OutputPathError):
        write_overlay(dx, pixels, out)
    drawn = overlay(dx, pixels)
    assert drawn.shape[1] == img.shape[1] and drawn.dtype == np.uint8


def test_an_evicted_image_is_decoded_from_its_source_or_refused(tmp_path):
    from echo_agent.imaging import save_png

    dx, _, img = _run()
    src = save_png(img, tmp_path / "scan.png")
    assert np.array_equal(diagnosis_pixels(dx, ImageStore(), src), img)
    with pytest.raises(EchoInputError, match="no longer in the image store"):
        diagnosis_pixels(dx, ImageStore())


def test_titles_reports_and_summary_say_the_same_thing():
    dx, _, _ = _run()
    title = overlay_title(dx)
    assert title.startswith(f"{dx.label} {dx.probability:.2f}")
    if dx.category:
        assert dx.category in title
    report = fhir_report(dx, "item-1")
    assert report["id"] == "item-1" and report["conclusion"].startswith(f"{dx.label} (p={dx.probability:.2f})")
    from echo_agent.batch import BatchItem, _safe_name
    from echo_agent.batch import fhir_report as batch_report

    assert batch_report(BatchItem(id="item-1", image="x.png"), dx) == fhir_report(dx, _safe_name("item-1"))
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(summary_panel(dx))
    assert dx.label in console.export_text()
