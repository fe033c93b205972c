"""Deployable graphs served by ``langgraph dev`` or a LangGraph server (see ``graphs/langgraph.json``).

Two entries:

* ``echo`` (:data:`graph`): image in, structured Diagnosis out.
* ``echo_review`` (:data:`review_graph`): the same, paused before the end for a human reviewer;
  resume the thread with ``Command(resume={"action": "accept" | "edit" | "reject", "reviewer": ...})``
  (the fields of :class:`echo_agent.graph.ReviewDecision`).

Input (JSON), one image source plus optional organ and clinical context::

    {"image_b64": "<base64 of a PNG/JPEG/TIFF/BMP/DICOM file, or a data: URL>",
     "image_path": "/path/readable/by/the/server.png",          # alternative to image_b64
     "organ": "breast" | "kidney" | null,                         # null: routed from the pixels
     "clinical": {"age": 52, "symptoms": "palpable lump"}}        # ClinicalContext fields

Each graph is a small parent graph: a ``load`` node decodes the upload into the directory-backed
image store (so a thread resumed later, or by another worker, finds the pixels again) and then the
invoke-and-reason graph runs as the ``echo`` subgraph. Stream with ``stream_subgraphs=True`` to see
the subgraph's node updates (perceive, reasoner, tools, reason, review).

Configuration is by environment variable (set them in ``langgraph.json``'s ``env`` or the shell):

* ``ECHO_AGENT_IMAGE_STORE``: folder of the image store (default ``~/.cache/echo-agent/images``).
* ``ECHO_AGENT_IMAGE_ROOTS``: folders (``os.pathsep``-separated) that ``image_path`` may point
  into. **Unset, server-side paths are refused** (default deny): clients upload ``image_b64``.
  A path is resolved (symlinks followed) and checked against the roots before anything touches the
  file, and the refusal says nothing about whether it exists; inside the roots, only regular files
  of bounded size are read (``echo_agent.imaging.io.read_image_file``).
* ``ECHO_AGENT_MAX_UPLOAD_MB``: largest accepted ``image_b64`` payload after decoding (default 50).
* ``ECHO_AGENT_TOOLKIT``: ``module:factory`` returning a :class:`echo_agent.tools.Toolkit`, called as
  ``factory(store=ImageStore)`` (default: the packaged detectors, captioner and retriever).
* ``ECHO_AGENT_LLM_BASE_URL`` / ``ECHO_AGENT_LLM_MODEL`` / ``ECHO_AGENT_LLM_API_KEY``: an
  OpenAI-compatible endpoint (e.g. vLLM at ``http://host:8000/v1``) used as the reasoner and the
  finaliser instead of the embedded policy.
* ``ECHO_AGENT_ORGAN``: fix the organ of every run.

The agent-building variables are read by :meth:`echo_agent.AgentConfig.from_env`, the same config
every other entry point builds its agent from; the upload limits above are this module's own.

``langgraph dev`` resolves the graph paths from its working directory: run it inside ``graphs/``
(``cd graphs && langgraph dev``); see ``docs/deployment.md``.
"""

# No `from __future__ import annotations`: LangGraph reads the state TypedDicts' hints at run time and
# the server imports this file by path, where postponed annotations could not be resolved.
import base64
import binascii
import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

from langchain_core.messages import AnyMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

from echo_agent.config import AgentConfig, AgentParts
from echo_agent.errors import EchoInputError, ImageTooLargeError
from echo_agent.graph import EchoOutput, EchoRunContext, build_graph
from echo_agent.imaging import ImageRef, load_image
from echo_agent.imaging.store import check_image_id


class ServedInput(TypedDict, total=False):
    """The JSON a client sends to start a run (give exactly one of ``image_b64``, ``image_path``,
    ``image``)."""

    image_b64: str | None
    image_path: str | None
    image: ImageRef
    organ: str | None
    clinical: dict[str, Any] | None


class ServedState(ServedInput, total=False):
    """Parent-graph state: the input plus what the echo subgraph returns."""

    messages: Annotated[list[AnyMessage], add_messages]
    evidence: list[dict[str, Any]]
    tool_calls_used: int
    diagnosis: dict[str, Any] | None
    warnings: list[str]


def _env_paths(name: str) -> list[Path]:
    raw = os.environ.get(name, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def decode_upload(data: str, *, max_bytes: int) -> bytes:
    """Bytes of a base64 upload (plain base64 or a ``data:<mime>;base64,`` URL), size-checked first."""
    if not isinstance(data, str) or not data.strip():
        raise EchoInputError("image_b64 must be a non-empty base64 string of an image file")
    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise EchoInputError("image_b64 is a data: URL without ';base64,'; send base64-encoded file bytes")
    # 4 base64 characters carry 3 bytes: refuse oversized uploads before decoding them.
    if len(text.rstrip("=")) * 3 // 4 > max_bytes:
        raise ImageTooLargeError(
            f"the uploaded image is larger than {max_bytes / 2**20:.1f} MB; "
            "send a smaller file or raise ECHO_AGENT_MAX_UPLOAD_MB on the server"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EchoInputError("image_b64 is not valid base64; encode the image file's bytes with base64") from None


def check_image_path(path: str, roots: list[Path]) -> str:
    """``path`` resolved; refused unless it lies under one of ``roots`` (no roots: every path is
    refused). The error never depends on whether the path exists."""
    if not roots:
        raise EchoInputError(
            "this server reads no server-side image paths (ECHO_AGENT_IMAGE_ROOTS is not set); "
            "upload the image as image_b64 instead"
        )
    if not isinstance(path, str) or not path or "\x00" in path:
        raise EchoInputError("image_path must be a non-empty path string")
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, over-long names: as outside
        resolved = None
    if resolved is None or not any(resolved.is_relative_to(r) for r in roots):
        raise EchoInputError(
            "image_path is outside the folders this server may read; upload the image as image_b64 instead"
        )
    return str(resolved)


def served_config() -> AgentConfig:
    """The agent the ``ECHO_AGENT_*`` variables describe (:meth:`AgentConfig.from_env`: reasoner,
    toolkit factory, image store, organ), with the image store in ``~/.cache/echo-agent/images``
    unless ``ECHO_AGENT_IMAGE_STORE`` names another folder."""
    cfg = AgentConfig.from_env()
    if cfg.image_store is None:
        cfg = cfg.replace(image_store=Path.home() / ".cache" / "echo-agent" / "images")
    return cfg


def make_graph(
    *,
    review: bool = False,
    config: AgentConfig | None = None,
    parts: AgentParts | None = None,
    toolkit: Any = None,
    reasoner: Any = None,
    finalizer: Any = None,
    image_roots: list[Path] | None = None,
    max_upload_bytes: int | None = None,
) -> Any:
    """Compile the served graph (no checkpointer: the LangGraph server supplies one).

    Args:
        review: pause before the end for a human reviewer.
        config: the agent to serve (default: :func:`served_config`, from the ``ECHO_AGENT_*``
            variables); its image store must be directory-backed so references survive restarts.
        parts: parts already built from ``config`` (to share one toolkit between graphs).
        toolkit / reasoner / finalizer: objects to use instead of the config's (a toolkit's store
            should be directory-backed; see :func:`echo_agent.build_graph`).
        image_roots: folders ``image_path`` may point into (default: ``ECHO_AGENT_IMAGE_ROOTS``; none:
            ``image_path`` is refused).
        max_upload_bytes: largest decoded ``image_b64`` (default: ``ECHO_AGENT_MAX_UPLOAD_MB``).
    """
    config = config or served_config()
    parts = parts or config.build_parts(toolkit=toolkit)
    if reasoner is not None or finalizer is not None:
        parts = dataclasses.replace(parts, reasoner=reasoner, finalizer=finalizer)
    store = parts.toolkit.get_store()
    roots = _env_paths("ECHO_AGENT_IMAGE_ROOTS") if image_roots is None else [Path(r).resolve() for r in image_roots]
    limit = max_upload_bytes or int(float(os.environ.get("ECHO_AGENT_MAX_UPLOAD_MB", "50")) * 1024 * 1024)

    def load(state: ServedState) -> dict[str, Any]:
        given = [k for k in ("image_b64", "image_path", "image") if state.get(k)]
        if len(given) != 1:
            raise EchoInputError(
                "give exactly one image source: image_b64 (an uploaded file), image_path (on the server) "
                f"or image (a stored reference); got {given or 'none'}"
            )
        if given[0] == "image_b64":
            loaded = load_image(decode_upload(state["image_b64"], max_bytes=limit))  # type: ignore[arg-type]
            # Pixels go to the store; the checkpoint keeps the small reference, not the upload.
            return {"image": loaded.to_ref(store), "image_b64": None}
        if given[0] == "image_path":
            return {"image_path": check_image_path(state["image_path"], roots)}  # type: ignore[arg-type]
        # A reference from an earlier run: resolve it by id in this server's store only (a client's
        # 'path' is not trusted) and take the size from the pixels, not from the client.
        ref = dict(state["image"])  # type: ignore[arg-type]
        pixels = store.get(check_image_id(ref.get("id", "")))
        ref.update(path=None, width=int(pixels.shape[1]), height=int(pixels.shape[0]))
        return {"image": ref}

    echo = build_graph(parts.reasoner, toolkit=parts.toolkit, fusion=parts.fusion, finalizer=parts.finalizer,
                       router=parts.router, review=review, max_tool_calls=config.max_tool_calls,
                       check_given_organ=config.check_given_organ)
    parent: StateGraph = StateGraph(
        ServedState, context_schema=EchoRunContext, input_schema=ServedInput, output_schema=EchoOutput
    )
    parent.add_node("load", load)
    parent.add_node("echo", echo.compile())
    parent.add_edge(START, "load")
    parent.add_edge("load", "echo")
    parent.add_edge("echo", END)
    return parent.compile(name="echo_review" if review else "echo")


# One set of parts (one toolkit) for both entries: each detector is loaded once per server process.
_config = served_config()
_parts = _config.build_parts()
graph = make_graph(config=_config, parts=_parts)
review_graph = make_graph(config=_config, parts=_parts, review=True)
