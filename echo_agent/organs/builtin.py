"""Built-in organs, defined as data in ``echo_agent/assets/organs/*.yaml``."""

from __future__ import annotations

from importlib import resources

import yaml

from .spec import OrganSpec


def load_spec_file(name: str) -> OrganSpec:
    """Load a packaged organ spec by file stem (``breast`` -> ``assets/organs/breast.yaml``)."""
    text = (resources.files("echo_agent") / "assets" / "organs" / f"{name}.yaml").read_text("utf-8")
    return OrganSpec.model_validate(yaml.safe_load(text))


BREAST = load_spec_file("breast")
KIDNEY = load_spec_file("kidney")
