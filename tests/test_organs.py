"""Organ registry, category bands and the entry-point plug-in path."""

from __future__ import annotations

import pytest

import echo_agent.organs as organs
from echo_agent.errors import UnknownOrganError
from echo_agent.organs import OrganSpec, get_organ, list_organs, register_organ, unregister_organ


def test_builtins():
    names = [o.name for o in list_organs()]
    assert names[:2] == ["breast", "kidney"]
    b = get_organ("breast")
    assert b.image_labels == ("normal", "benign", "malignant") and b.positive_label == "malignant"
    assert get_organ("kidney").lesion_labels == ("hydronephrosis",)
    with pytest.raises(UnknownOrganError, match="known organs"):
        get_organ("liver")


@pytest.mark.parametrize("p,cat", [
    (0.0, "2"), (0.005, "2"), (0.0051, "3"), (0.02, "3"), (0.0201, "4A"), (0.10, "4A"), (0.1001, "4B"),
    (0.50, "4B"), (0.5001, "4C"), (0.9499, "4C"), (0.95, "5"), (1.0, "5"),
])
def test_birads_band_edges(p, cat):
    assert get_organ("breast").category_for(p) == cat


def test_no_lesion_category_and_kidney_has_none():
    assert get_organ("breast").category_for(0.7, lesion_found=False) == "1"
    assert get_organ("kidney").category_for(0.9) is None
    assert get_organ("breast").category_scale == ("1", "2", "3", "4A", "4B", "4C", "5")
    assert get_organ("kidney").category_scale == ()


def test_spec_validation():
    with pytest.raises(ValueError, match="start with the normal label"):
        OrganSpec(name="x", image_labels=("sick", "normal"), detector_labels=("sick",))
    with pytest.raises(ValueError, match="maps to"):
        OrganSpec(name="x", image_labels=("normal", "nodule"), detector_labels=("blob",))
    with pytest.raises(ValueError, match="cover"):
        OrganSpec(name="x", image_labels=("normal", "n"), detector_labels=("n",),
                  categories=({"name": "a", "low": 0.0, "high": 0.4, "low_inclusive": True},
                              {"name": "b", "low": 0.5, "high": 1.0}))


def test_register_and_replace():
    spec = OrganSpec(name="thyroid_t", image_labels=("normal", "nodule"), detector_labels=("nodule",))
    try:
        register_organ(spec)
        assert get_organ("thyroid_t") is spec
        register_organ(spec)  # same spec again is fine
        other = spec.model_copy(update={"prompt": "changed"})
        with pytest.raises(ValueError, match="already registered"):
            register_organ(other)
        register_organ(other, replace=True)
        assert get_organ("thyroid_t").prompt == "changed"
    finally:
        unregister_organ("thyroid_t")


def test_entry_point_plugins(monkeypatch):
    class EP:
        def __init__(self, name, obj):
            self.name, self.value, self._obj = name, f"pkg:{name}", obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    spec = OrganSpec(name="liver_ep", image_labels=("normal", "lesion"), detector_labels=("lesion",))
    eps = [EP("liver_ep", lambda: spec), EP("broken", ImportError("no module"))]
    monkeypatch.setattr(organs, "entry_points", lambda group: eps if group == organs.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(organs, "_entry_points_loaded", False)
    try:
        with pytest.warns(UserWarning, match="broken"):
            assert get_organ("liver_ep") is spec
    finally:
        unregister_organ("liver_ep")


def test_tools_are_generated_per_organ():
    from echo_agent.tools import make_tools

    spec = OrganSpec(name="thyroid_g", image_labels=("normal", "nodule"), detector_labels=("nodule",))
    register_organ(spec)
    try:
        names = [t.name for t in make_tools()]
        assert {"detect_breast_lesions", "detect_kidney_lesions", "detect_thyroid_g_lesions",
                "describe_image", "retrieve_knowledge"} <= set(names)
    finally:
        unregister_organ("thyroid_g")
