"""echo-organ-thyroid: thyroid nodules with TI-RADS for echo-agent, as a plug-in.

Installing this package registers, through entry points (no code inside ``echo_agent`` names
thyroid):

* the organ ``thyroid`` (``echo_agent.organs``): labels, the TI-RADS categories, the nodule
  detector and the TI-RADS category head (ONNX, shipped here), knowledge, descriptors, router head;
* the center ``ddti`` (``echo_agent.datasets``): the DDTI database staged under the data root, with
  the committed case-level split, so the library's ``tools/`` train and evaluate on it by name.

See ``docs/plugins.md`` in the echo-agent repository for the walk-through.
"""

from __future__ import annotations

from importlib import resources

__version__ = "0.1.0"


def thyroid_spec():  # noqa: ANN201 - the OrganSpec type is imported lazily
    """The thyroid :class:`~echo_agent.organs.OrganSpec` (the ``echo_agent.organs`` entry point)."""
    from echo_agent.organs import load_spec_yaml

    return load_spec_yaml((resources.files(__name__) / "organ.yaml").read_text("utf-8"))


__all__ = ["__version__", "thyroid_spec"]
