"""Fakes for the web-service tests: an agent factory over the fake toolkit, and a gated detector."""

from __future__ import annotations

import threading
from typing import Any

from _fakes import FakeDetector, fake_toolkit

from echo_agent.agent import EchoAgent


class GatedDetector(FakeDetector):
    """A fake detector that waits for ``gate`` before answering (lets a test watch a run mid-way)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def detect(self, image, **kw):  # type: ignore[override]
        self.entered.set()
        if not self.gate.wait(timeout=20):
            raise TimeoutError("the test never opened the gate")
        return super().detect(image, **kw)


def agent_factory(organ: str | None = "breast", detector: Any = None, **agent_kw: Any):
    """``create_app`` agent factory: the fake toolkit on the server's store and checkpointer."""

    def build(*, checkpointer: Any, store: Any) -> EchoAgent:
        tk = fake_toolkit()
        tk.store = store  # set after construction: an empty ImageStore is falsy in fake_toolkit's `or`
        if detector is not None:
            tk.detectors["breast"] = detector
        return EchoAgent(organ=organ, toolkit=tk, router=None, review=True, checkpointer=checkpointer, **agent_kw)

    return build
