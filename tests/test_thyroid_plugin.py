"""The thyroid plug-in (plugins/echo-organ-thyroid) as a user installs it: found through its entry
points, routed without --organ, diagnosed with a TI-RADS category. ``.ci/run`` installs it into the
test venv; elsewhere these tests skip."""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

import pytest

try:
    metadata.distribution("echo-organ-thyroid")
    INSTALLED = True
except metadata.PackageNotFoundError:
    INSTALLED = False

pytestmark = pytest.mark.skipif(
    not INSTALLED, reason="the thyroid plug-in is not installed (pip install -e plugins/echo-organ-thyroid; .ci/run does)"
)

TIRADS = ("2", "3", "4a", "4b", "4c", "5")


@pytest.fixture(scope="module")
def example() -> Path:
    return Path(str(resources.files("echo_organ_thyroid") / "examples" / "ddti_example.png"))


def test_the_plugin_registers_the_organ_and_its_center() -> None:
    from echo_agent.eval.datasets import center_organ, list_centers
    from echo_agent.organs import get_organ

    spec = get_organ("thyroid")
    assert spec.category_system == "TI-RADS" and spec.category_source == "classifier"
    assert tuple(b.name for b in spec.categories) == TIRADS
    for path in (spec.resolve_weights(), spec.resolve_classifier_weights(), spec.resolve_router_head(),
                 *spec.resolve_knowledge_files()):
        assert path is not None and path.is_file(), path
    assert "ddti" in list_centers() and center_organ("ddti") == "thyroid"


def test_no_thyroid_line_inside_the_library() -> None:
    import re

    import echo_agent

    root = Path(echo_agent.__file__).parent
    word = re.compile(r"\bthyroid\b", re.IGNORECASE)  # not "hyperparathyroidism" in the kidney knowledge
    hits = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".md", ".csv")
            and word.search(p.read_text("utf-8", errors="ignore"))]
    assert hits == []


def test_the_agent_routes_and_diagnoses_a_thyroid_image(example: Path) -> None:
    from echo_agent import EchoAgent

    dx = EchoAgent().run(example)  # no organ: the router and the plug-in's head decide
    assert dx.organ == "thyroid"
    assert dx.label in ("normal", "nodule")
    if dx.label == "nodule":
        assert dx.findings and dx.category in TIRADS and dx.category_system == "TI-RADS"
        assert dx.findings[0].category in TIRADS
    assert any(ref.ref.startswith("kb") and "thyroid/" in ref.ref for ref in dx.evidence)


def test_thyroid_regions_get_the_tirads_lexicon(example: Path) -> None:
    from echo_agent.evidence.captioner import PixelCaptioner
    from echo_agent.imaging import load_image
    from echo_agent.schemas import Box

    ctx = PixelCaptioner().describe(load_image(example).array, organ="thyroid",
                                    regions=[Box(x1=68, y1=83, x2=234, y2=219)])
    d = ctx.regions[0].descriptors
    assert {"composition", "echogenicity", "shape", "margin", "echogenic_foci"} <= set(d)
    assert "nodule" in ctx.regions[0].caption


def test_without_the_plugin_organ_thyroid_images_are_not_routed_to_it(example: Path) -> None:
    from echo_agent.detectors.router_head import route_image
    from echo_agent.imaging import load_image
    from echo_agent.organs import get_organ, register_organ, unregister_organ

    image = load_image(example).array
    spec = get_organ("thyroid")
    unregister_organ("thyroid")
    try:
        assert route_image(image).organ != "thyroid"
    finally:
        register_organ(spec)
    assert route_image(image).organ == "thyroid"
