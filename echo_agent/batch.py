"""Resumable batch runs: many images -> one JSONL of Diagnoses, overlays, a summary.

The output JSONL is the run's journal. Each finished item (success or error) is appended as one
complete line and flushed to disk before the next item starts, so a run killed at any moment (even
with SIGKILL) and started again skips what is done, redoes nothing, loses nothing and writes no
duplicate lines. A partial last line left by a kill is the only thing removed on restart.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EchoError, EchoInputError, OutputPathError
from .imaging.io import IMAGE_SUFFIXES, is_hidden


@dataclass(frozen=True)
class BatchItem:
    """One unit of work: an image and what we know about it."""

    id: str
    image: Path
    organ: str | None = None
    context: dict[str, Any] | None = None
    truth: dict[str, Any] | None = None


@dataclass
class BatchSummary:
    """Counts and timing of a batch run."""

    total: int = 0
    done_before: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    labels: dict[str, int] = field(default_factory=dict)
    indeterminate: int = 0

    @property
    def processed(self) -> int:
        return self.ok + self.errors

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "processed": self.processed, "images_per_second": self.images_per_second}


def _looks_like_image(p: Path) -> bool:
    return p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == "")


def collect_inputs(
    source: str | Path, *, organ: str | None = None, split: str | None = None, hash_ids: bool = False
) -> list[BatchItem]:
    """Expand a folder (recursive), a glob pattern or a manifest CSV into batch items.

    Item ids are stable across runs (paths relative to the folder / manifest), which is what makes
    resuming possible. File names can carry patient names, and ids go into the journal, overlay and
    FHIR file names and the FHIR resource ids: ``hash_ids=True`` replaces each id by
    :func:`hashed_id` of it (still stable, so resuming works; the journal's ``image`` field keeps the
    path, so keep the journal where the images are).
    """
    items = _collect(source, organ=organ, split=split)
    if hash_ids:
        items = [dataclasses.replace(it, id=hashed_id(it.id)) for it in items]
    return items


def hashed_id(item_id: str) -> str:
    """A stable id that does not show the file name: ``item-`` + 16 hex digits of its SHA-256.

    >>> hashed_id("smith_jane_2024.png")
    'item-f67f29d9c83863e9'
    """
    return "item-" + hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:16]


def _collect(source: str | Path, *, organ: str | None, split: str | None) -> list[BatchItem]:
    s = str(source)
    p = Path(s)
    if p.is_file() and p.suffix.lower() == ".csv":
        from .eval.manifest import load_manifest

        images = load_manifest(p, check_boxes=False)
        items = []
        for im in images:
            if organ and im.organ != organ:
                continue
            if split and im.split != split:
                continue
            truth = {"label": im.label, "boxes": [b.to_list() for b in im.boxes], "category": im.category}
            items.append(BatchItem(id=im.key, image=im.image, organ=im.organ, context=im.clinical_context, truth=truth))
        return items
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not is_hidden(f, p))
        base = p
    elif any(ch in s for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True) if _looks_like_image(Path(f)))
        base = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    elif p.is_file():
        files, base = [p], p.parent
    else:
        raise EchoInputError(f"batch input {s!r} is not a folder, a glob pattern that matches files, or a manifest .csv")
    if not files:
        raise EchoInputError(f"no images found in {s!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [BatchItem(id=str(f.relative_to(base)), image=f.resolve(), organ=organ) for f in files]


def _safe_name(item_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[-80:].strip("_") or "item"
    return f"{stem}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """Finished items of an earlier run (id -> record). A torn last line (killed mid-write) is
    truncated away; any other unreadable line is an error, because it is not ours to drop."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    raw = path.read_bytes()
    good_end = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        if not line.strip():
            if not is_last:
                good_end += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if is_last:  # complete JSON but no newline: the kill came after the payload, keep it
                good_end += len(line)
                with open(path, "ab") as f:
                    f.write(b"\n")
                good_end += 1
            else:
                good_end += len(line) + 1
        except json.JSONDecodeError:
            if is_last:
                break
            raise EchoInputError(
                f"{path} line {i + 1} is not valid JSON; it is not a journal written by echo-agent batch "
                "(choose another --out file)"
            ) from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise EchoInputError(f"{path} line {i + 1} has no 'id'; choose another --out file")
        done[rec["id"]] = rec
    if good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def _append(fd: int, record: dict[str, Any], path: Path | None = None) -> None:
    """Append one journal line, all or nothing: when the write fails (a full disk), the partial line
    is cut off again, so the journal never holds a torn line, and :class:`OutputPathError` says why."""
    data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # read_journal still repairs a torn last line on resume
        raise OutputPathError(
            f"the batch journal {path or ''} could not be written ({exc.strerror or type(exc).__name__}); "
            "the items done so far are kept: free space or fix permissions and run the same command again"
        ) from None


def check_writable_dir(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file, or raise
    :class:`OutputPathError` naming ``what`` and the path (checked before a batch starts)."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".echo-write-check-"):
            pass
    except OSError as exc:
        raise OutputPathError(
            f"the {what} folder {str(folder)!r} is not writable ({exc.strerror or type(exc).__name__}); "
            "choose another folder or fix its permissions"
        ) from None
    return folder


def check_writable_file(path: str | Path, what: str) -> Path:
    """``path``'s folder is writable and ``path``, if it exists, is a regular file we may append to."""
    path = Path(path)
    check_writable_dir(path.parent, f"{what}'s")
    if path.exists() and (not path.is_file() or not os.access(path, os.W_OK)):
        raise OutputPathError(f"the {what} {str(path)!r} exists but is not a writable regular file")
    return path


def fhir_report(item: BatchItem, dx: Any) -> dict[str, Any]:
    """The FHIR DiagnosticReport of one item (:func:`echo_agent.rendering.fhir_report`, id from the item)."""
    from .rendering import fhir_report as report

    return report(dx, _safe_name(item.id))


def tally(summary: BatchSummary, rec: dict[str, Any]) -> None:
    """Count one journal record into ``summary`` (ok / errors / labels / indeterminate)."""
    if rec.get("status") == "ok":
        summary.ok += 1
        lbl = rec["diagnosis"]["label"]
        summary.labels[lbl] = summary.labels.get(lbl, 0) + 1
        summary.indeterminate += bool(rec["diagnosis"].get("indeterminate"))
    else:
        summary.errors += 1


def open_journal(
    items: Sequence[BatchItem], out: Path, *, overlays: str | Path | None = None, fhir: str | Path | None = None
) -> tuple[list[BatchItem], BatchSummary]:
    """Start or resume a run on the journal ``out``: check that ids are unique, create the output
    folders, read what is done (repairing a torn last line) and return ``(todo, summary)``.
    Shared by every engine so they resume the same way."""
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EchoInputError(f"batch item id {dup!r} appears twice; ids must be unique")
    # Every output is checked before any work, so a bad path costs nothing and says which it is.
    check_writable_file(out, "journal")
    if overlays is not None:
        check_writable_dir(overlays, "overlays")
    if fhir is not None:
        check_writable_dir(fhir, "FHIR")
    done = read_journal(out)
    todo = [it for it in items if it.id not in done]
    return todo, BatchSummary(total=len(items), done_before=len(items) - len(todo))


@contextmanager
def journal_writer(
    out: Path, summary: BatchSummary, total: int,
    on_item: Callable[[BatchItem, dict[str, Any]], None] | None = None, progress: bool = False,
) -> Iterator[Callable[[BatchItem, dict[str, Any]], None]]:
    """Open the journal ``out`` for appending and yield ``write(item, record)``, the one way every
    engine records an item: one fsync'd line, counted into ``summary``, then ``on_item`` and the
    progress bar (``progress``: a rich bar over ``total`` items). On exit the journal is closed and
    ``summary.seconds`` set to the time spent inside."""
    bar = task = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[status]}"))
        bar.start()
        task = bar.add_task("batch", total=total, completed=summary.done_before, status="")

    def write(item: BatchItem, rec: dict[str, Any]) -> None:
        _append(fd, rec, out)
        tally(summary, rec)
        if on_item is not None:
            on_item(item, rec)
        if bar is not None:
            bar.update(task, advance=1, status=f"{item.id[-40:]}: {rec['status']}")

    t0 = time.perf_counter()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        yield write
    finally:
        os.close(fd)
        if bar is not None:
            bar.stop()
        summary.seconds = time.perf_counter() - t0


def run_batch(
    items: Sequence[BatchItem],
    out: str | Path,
    *,
    agent: Any = None,
    overlays: str | Path | None = None,
    fhir: str | Path | None = None,
    chunk_size: int = 16,
    on_item: Callable[[BatchItem, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Run the agent over ``items``, appending one JSON line per item to ``out`` (resumable).

    Args:
        items: from :func:`collect_inputs`.
        out: the JSONL journal; if it exists, finished items are skipped.
        agent: an :class:`~echo_agent.EchoAgent` (default: a new one).
        overlays: folder for one overlay PNG per successful item.
        fhir: folder for one FHIR DiagnosticReport JSON per successful item.
        chunk_size: images handed to ``agent.batch`` at a time (the journal is written per item once
            its chunk is done); the default agent runs its detector on a chunk in one batched pass.
        on_item: callback after each item (e.g. for a UI).
    """
    out = Path(out)
    todo, summary = open_journal(items, out, overlays=overlays, fhir=fhir)
    if agent is None:
        from .agent import EchoAgent

        agent = EchoAgent.from_config()
    with journal_writer(out, summary, len(items), on_item, progress) as write:
        for start in range(0, len(todo), max(chunk_size, 1)):
            chunk = todo[start : start + chunk_size]
            for it, rec in zip(chunk, diagnose_chunk(agent, chunk, overlays=overlays, fhir=fhir)):
                write(it, rec)
    return summary


def diagnose_chunk(
    agent: Any, items: Sequence[BatchItem], *, overlays: str | Path | None = None, fhir: str | Path | None = None
) -> list[dict[str, Any]]:
    """The journal records of a chunk of items, in order: one ``agent.batch`` per organ (one batched
    detector pass each), then each item's record with its overlay / FHIR file. An item's failure is
    its own error record; nothing is written to a journal here (the local, process and Ray engines
    all call this and write the records themselves)."""
    by_organ: dict[str | None, list[int]] = {}
    for i, it in enumerate(items):
        by_organ.setdefault(it.organ, []).append(i)
    results: list[tuple[Any, float]] = [(None, 0.0)] * len(items)
    for organ, idx in by_organ.items():
        t_chunk = time.perf_counter()
        res = agent.batch([items[i].image for i in idx], organ=organ, contexts=[items[i].context for i in idx])
        per_item_ms = (time.perf_counter() - t_chunk) * 1000 / max(len(idx), 1)
        for i, r in zip(idx, res):
            results[i] = (r, per_item_ms)
    return [_record(it, res, ms, overlays, fhir, agent) for it, (res, ms) in zip(items, results)]


def _record(item: BatchItem, res: Any, ms: float, overlays: Any, fhir: Any, agent: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": item.id, "image": str(item.image)}
    if item.truth is not None:
        rec["truth"] = item.truth
    if isinstance(res, EchoError) or isinstance(res, BaseException):
        rec.update(status="error", error_type=type(res).__name__, error=str(res))
        return rec
    rec.update(status="ok", ms=round(ms, 2), diagnosis=res.model_dump(mode="json"))
    name = _safe_name(item.id)
    if overlays is not None:
        try:
            from .rendering import diagnosis_pixels, write_overlay

            store = agent.toolkit.get_store() if hasattr(agent, "toolkit") else None
            target = write_overlay(res, diagnosis_pixels(res, store, item.image), Path(overlays) / f"{name}.png",
                                   overwrite=True)
            rec["overlay"] = str(target)
        except (EchoError, OSError) as exc:  # the diagnosis stands even if the overlay cannot be written
            rec["overlay_error"] = _output_error(exc)
    if fhir is not None:
        target = Path(fhir) / f"{name}.json"
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(fhir_report(item, res), indent=2), encoding="utf-8")
            os.replace(tmp, target)
            rec["fhir"] = str(target)
        except OSError as exc:  # a per-item error, not the end of the batch
            _discard(tmp)
            rec["fhir_error"] = _output_error(exc)
    return rec


def _output_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, EchoError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}".strip()
    return str(exc)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def summarise_journal(path: str | Path) -> BatchSummary:
    """Recount a journal (e.g. after several resumed runs)."""
    recs = read_journal(Path(path)).values()
    s = BatchSummary(total=len(recs))
    for r in recs:
        tally(s, r)
    return s


def iter_ok(path: str | Path) -> Iterable[dict[str, Any]]:
    """The successful records of a journal."""
    return (r for r in read_journal(Path(path)).values() if r.get("status") == "ok")
