"""Export: LangChain messages -> chat-template dicts with images by path, JSONL files, HF datasets."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ...eval.manifest import ManifestImage
from ...messages import IMAGE_URI_PREFIX, image_id_from_block
from .common import _tool_schemas_json
from .tasks import FINALIZER_TASKS, TASK_GROUPS, TASKS, CurriculumConfig, CurriculumSample


# ---------------------------------------------------------------------------------------------------
# export: LangChain messages -> chat-template dicts with images by path
# ---------------------------------------------------------------------------------------------------
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")


def to_hf_messages(
    messages: Sequence[BaseMessage], image_paths: Mapping[str, str], *, tool_images: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat-template messages (the structure ``QwenVLChatModel.render`` gives the processor) plus the
    image paths, in order.

    Each ``echo-image://<id>`` block becomes ``{"type": "image"}`` and ``image_paths[<id>]`` is
    appended to the returned path list, so the i-th image block of the conversation is the i-th
    path. A detector tool turn with an overlay gets the overlay image after its text when
    ``tool_images`` (as ``QwenVLChatModel(images_in_tool_messages=True)`` shows it). Every content is
    a list of blocks (one Arrow type for ``datasets``); tool-call arguments are dicts.
    """
    out: list[dict[str, Any]] = []
    paths: list[str] = []

    def image(image_id: str) -> dict[str, Any]:
        if image_id not in image_paths:
            raise KeyError(f"image {IMAGE_URI_PREFIX}{image_id} has no path; pass it in image_paths")
        paths.append(str(image_paths[image_id]))
        return {"type": "image"}

    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": [{"type": "text", "text": _text_of(m.content)}]})
        elif isinstance(m, HumanMessage):
            blocks = []
            for b in (m.content if isinstance(m.content, list) else [{"type": "text", "text": m.content}]):
                iid = image_id_from_block(b) if isinstance(b, dict) else None
                if iid is not None:
                    blocks.append(image(iid))
                elif isinstance(b, dict) and b.get("type") == "text":
                    blocks.append({"type": "text", "text": b.get("text", "")})
            out.append({"role": "user", "content": blocks})
        elif isinstance(m, AIMessage):
            text = _text_of(m.content)
            # An empty text turn must be an empty list: Qwen's templates test the content's truth
            # value before a tool call, and a list holding "" would add a newline inference lacks.
            entry: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": text}] if text else []}
            if m.tool_calls:
                entry["tool_calls"] = [
                    {"type": "function", "function": {"name": c["name"], "arguments": c.get("args") or {}}}
                    for c in m.tool_calls
                ]
            out.append(entry)
        elif isinstance(m, ToolMessage):
            blocks = [{"type": "text", "text": _text_of(m.content)}]
            art = m.artifact if isinstance(m.artifact, dict) else {}
            ov = art.get("overlay")
            if tool_images and isinstance(ov, dict) and ov.get("id"):
                blocks.append(image(str(ov["id"])))
            out.append({"role": "tool", "content": blocks})
    return out, paths


def to_hf_record(sample: CurriculumSample, *, tool_images: bool = True, relative_to: str | Path | None = None) -> dict[str, Any]:
    """A JSON-serialisable training record of a sample.

    Keys: ``task``, ``key``, ``organ``, ``split``, ``messages`` (chat-template dicts, see
    :func:`to_hf_messages`), ``images`` (paths, one per image block, in order; relative to
    ``relative_to`` when given), ``tools`` (the OpenAI tool schemas of the organ as a JSON string,
    ``""`` for the finalizer-format task), ``meta`` (JSON string), ``truth`` (JSON string: ``label``,
    ``boxes`` in 0..1000, ``boxes_px``, ``width``, ``height`` -- what the GRPO rewards compare with).
    """
    msgs, paths = to_hf_messages(sample.messages, sample.image_paths, tool_images=tool_images)
    if relative_to is not None:
        base = Path(relative_to).resolve()
        paths = [_rel(p, base) for p in paths]
    # Every agent-format conversation is rendered with the organ's tools bound, as at inference; the
    # finalizer-format conversation (informed_diagnosis) is asked without tools, as LLMFinalizer does.
    has_tools = sample.task not in FINALIZER_TASKS
    tools = _tool_schemas_json(sample.organ) if has_tools else ""
    return {
        "task": sample.task, "key": sample.key, "organ": sample.organ, "split": sample.split or "",
        "messages": msgs, "images": paths, "tools": tools, "meta": json.dumps(sample.meta, ensure_ascii=False),
        "truth": json.dumps(sample.truth, ensure_ascii=False),
    }


def strip_tool_images(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a record without the overlay images of its tool turns (and their paths)."""
    paths = list(record["images"])
    kept: list[str] = []
    msgs = []
    i = 0
    for m in record["messages"]:
        blocks = []
        for b in m.get("content") or []:
            if isinstance(b, dict) and b.get("type") == "image":
                if m["role"] != "tool":
                    blocks.append(b)
                    kept.append(paths[i])
                i += 1
            else:
                blocks.append(b)
        msgs.append({**m, "content": blocks})
    return {**record, "messages": msgs, "images": kept}


def _rel(path: str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------------------------------
# output: JSONL, HF datasets, count table
# ---------------------------------------------------------------------------------------------------
def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write records as JSON lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a curriculum JSONL file written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def resolve_images(record: Mapping[str, Any], base: str | Path) -> list[str]:
    """Absolute image paths of a record whose paths are relative to ``base`` (the JSONL's folder)."""
    return [p if Path(p).is_absolute() else str((Path(base) / p).resolve()) for p in record["images"]]


def to_hf_dataset(records: Sequence[Mapping[str, Any]], *, base: str | Path | None = None) -> Any:
    """A ``datasets.Dataset`` of records that yields chat-template ``messages``, ``images`` (paths)
    and ``tools`` (list) when indexed.

    Conversations are stored as JSON text (Arrow would unify the differing tool-argument dicts of
    different rows, adding ``null`` keys that the chat template would render) and decoded on access
    with ``set_transform``, so SFT sees exactly the dicts of :func:`to_hf_messages`.
    """
    import datasets

    rows = [
        {
            "task": r["task"], "key": r["key"], "organ": r["organ"],
            "messages_json": json.dumps(r["messages"], ensure_ascii=False),
            "images": resolve_images(r, base) if base is not None else list(r["images"]),
            "tools_json": r.get("tools") or "",
        }
        for r in records
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.set_transform(decode_batch)
    return ds


def decode_batch(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """``set_transform`` decoder of :func:`to_hf_dataset` (JSON text -> messages / tools)."""
    out = dict(batch)
    if "messages_json" in out:
        out["messages"] = [json.loads(s) for s in out.pop("messages_json")]
    if "tools_json" in out:
        out["tools"] = [json.loads(s) if s else None for s in out.pop("tools_json")]
    return out


def count_table(samples: Sequence[CurriculumSample]) -> str:
    """A Markdown table: samples per task and organ, with perturbed counts."""
    organs = sorted({s.organ for s in samples})
    counts = Counter((s.task, s.organ) for s in samples)
    pert = Counter(s.task for s in samples if s.meta.get("perturbed"))
    head = "| task | group | " + " | ".join(organs) + " | total | perturbed |"
    sep = "|---|---|" + "---:|" * (len(organs) + 2)
    lines = [head, sep]
    # the nine tasks in curriculum order, then any other task (agent traces) in order of appearance
    tasks = [*TASKS, *dict.fromkeys(s.task for s in samples if s.task not in TASK_GROUPS)]
    groups = {**{s.task: str(s.meta.get("group", "")) for s in samples}, **TASK_GROUPS}
    for t in tasks:
        n = sum(counts[(t, o)] for o in organs)
        if not n:
            continue
        lines.append(f"| {t} | {groups[t]} | " + " | ".join(str(counts[(t, o)]) for o in organs)
                     + f" | {n} | {pert[t]} |")
    lines.append("| **all** | | " + " | ".join(str(sum(counts[(t, o)] for t in tasks)) for o in organs)
                 + f" | {len(samples)} | {sum(pert.values())} |")
    return "\n".join(lines)


def check_no_leakage(samples: Iterable[CurriculumSample], images: Sequence[ManifestImage], forbidden: Sequence[str] = ("test",)) -> None:
    """Raise if a sample comes from an image of a forbidden split (by key and by pixels' path)."""
    bad_keys = {im.key for im in images if im.split in forbidden}
    bad_paths = {str(im.image.resolve()) for im in images if im.split in forbidden}
    for s in samples:
        if s.key in bad_keys or any(str(Path(p).resolve()) in bad_paths for p in s.image_paths.values()):
            raise AssertionError(f"sample {s.task}/{s.key} uses an image of a forbidden split {list(forbidden)}")


def config_dict(config: CurriculumConfig) -> dict[str, Any]:
    """The config as plain data (for the output folder's ``curriculum_config.json``)."""
    d = asdict(config)
    d["tasks"] = list(d["tasks"])
    d["forbidden_splits"] = list(d["forbidden_splits"])
    return d
