"""Built-in organs, defined as data in ``echo_agent/assets/organs/*.yaml``."""

from __future__ import annotations

from importlib import resources

import yaml

from .spec import OrganSpec


def load_spec_yaml(text: str) -> OrganSpec:
    """An :class:`OrganSpec` from YAML text (what a plug-in ships beside its weights)."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"an organ spec must be a YAML mapping, got {type(data).__name__}")
    return OrganSpec.model_validate(data)


def load_spec_file(name: str) -> OrganSpec:
    """Load a packaged organ spec by file stem (``breast`` -> ``assets/organs/breast.yaml``)."""
    return load_spec_yaml((resources.files("echo_agent") / "assets" / "organs" / f"{name}.yaml").read_text("utf-8"))


BREAST = load_spec_file("breast")
KIDNEY = load_spec_file("kidney")
