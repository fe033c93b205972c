"""The deployable graph served by ``langgraph dev`` (see ``graphs/langgraph.json``).

Input: ``{"image_path": "/path/on/the/server.png", "organ": "breast" | null, "clinical": {...}}``.
The server supplies the checkpointer; images are loaded on the server and kept in a directory-backed
image store so that a resumed thread can find them again.
"""

from __future__ import annotations

import os
from pathlib import Path

from echo_agent.graph import build_graph
from echo_agent.imaging.store import ImageStore
from echo_agent.organs.routing import default_router
from echo_agent.tools import Toolkit

_store_dir = Path(os.environ.get("ECHO_AGENT_IMAGE_STORE", Path.home() / ".cache" / "echo-agent" / "images"))
toolkit = Toolkit(store=ImageStore(directory=_store_dir))
graph = build_graph(toolkit=toolkit, router=default_router, review=os.environ.get("ECHO_AGENT_REVIEW") == "1")
