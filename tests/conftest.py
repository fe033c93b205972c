"""Shared test configuration: offline settings and the real-data location."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Offline and deterministic everywhere, before any heavy library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("ECHO_AGENT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "echo-agent"))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/_fakes.py and friends

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    return Path(os.environ.get("ECHO_AGENT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real ultrasound data folder; tests using it skip where it is absent."""
    root = data_root()
    if not (root / "BrEaST-Lesions_USG").is_dir():
        pytest.skip(f"real data not found at {root} (set ECHO_AGENT_DATA to the shared data folder)")
    return root


@pytest.fixture
def batch_folder(tmp_path: Path) -> Path:
    """Ten batch inputs (two bundled examples, seven synthetic frames, one corrupt file) in a folder."""
    from _fakes import batch_folder as fill

    return fill(tmp_path / "images")
