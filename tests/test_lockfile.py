"""The lock file CI installs from agrees with pyproject.toml (item 1 of the hardening issue)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "constraints.txt"
CI_EXTRAS = ("dev", "train", "vlm", "eval", "serve", "scale", "dense")


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"constraints line is not 'name==version': {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(extras=CI_EXTRAS) -> list[Requirement]:
    proj = _project()
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in proj["optional-dependencies"][extra]]
    return reqs


def test_every_requirement_is_locked_inside_its_bounds() -> None:
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but not locked in {LOCK.name}; run tools/relock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} in {LOCK.name} violates pyproject's {req.specifier}"
        )


@pytest.mark.parametrize("req", [r for r in _project()["dependencies"]], ids=lambda r: Requirement(r).name)
def test_runtime_dependencies_have_an_upper_bound(req: str) -> None:
    spec = Requirement(req).specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{req}: bound the next major version"


def test_ci_installs_from_the_lock() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c requirements/constraints.txt" in ci
    extras = re.search(r'EXTRAS="([^"]+)"', ci)
    assert extras and tuple(extras.group(1).split(",")) == CI_EXTRAS
