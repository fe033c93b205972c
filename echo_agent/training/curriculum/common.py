"""What every task family shares: the tools' model-facing schemas, tool-call dicts, the per-image context."""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...eval.manifest import ManifestImage
from ...organs import OrganSpec, get_organ
from ...schemas import ClinicalContext


# ---------------------------------------------------------------------------------------------------
# building blocks shared with inference
# ---------------------------------------------------------------------------------------------------
def tool_schemas(spec: OrganSpec) -> list[dict[str, Any]]:
    """The OpenAI-style tool schemas the reasoner is bound with for ``spec`` at inference.

    Built from the real tools (:func:`echo_agent.tools.make_tools`) exactly as
    :meth:`QwenVLChatModel.bind_tools` converts them; nothing is loaded.
    """
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from ...tools import Toolkit, make_tools

    return [convert_to_openai_tool(t) for t in make_tools(Toolkit(), [spec])]


@functools.lru_cache(maxsize=32)
def _tool_schemas_json(organ: str) -> str:
    return json.dumps(tool_schemas(get_organ(organ)), ensure_ascii=False)


def _call(name: str, args: dict[str, Any], turn: int, i: int = 0) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"call_{turn}_{i}", "type": "tool_call"}


@dataclass
class _Ctx:
    """Everything known about one image while its samples are built."""

    im: ManifestImage
    spec: OrganSpec
    image: np.ndarray
    image_id: str
    clinical: ClinicalContext | None
    radiologist: dict[str, str]
    rng: random.Random
    overlay_dir: Path | None
    image_paths: dict[str, str] = field(default_factory=dict)

    @property
    def w(self) -> int:
        return int(self.image.shape[1])

    @property
    def h(self) -> int:
        return int(self.image.shape[0])

    def reader_category(self) -> str:
        """`` (radiologist BI-RADS 4A)`` -- the reader's category in the organ's system -- or ``""``."""
        if not self.im.category:
            return ""
        return f" (radiologist {self.spec.category_system or 'category'} {self.im.category.upper()})"

    def ref(self) -> dict[str, Any]:
        return {"id": self.image_id, "width": self.w, "height": self.h, "path": str(self.im.image)}
