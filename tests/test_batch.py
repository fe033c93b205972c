"""Resumable batch runs: inputs, journal, per-item errors, SIGKILL + restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _fakes import fake_toolkit, speckle_image
from PIL import Image

from echo_agent import EchoAgent
from echo_agent.batch import collect_inputs, read_journal, run_batch, summarise_journal
from echo_agent.errors import EchoInputError


def _images(folder: Path, n: int, bad: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(speckle_image(seed=i)).save(p)
        out.append(p)
    for j in range(bad):
        p = folder / f"broken_{j}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        out.append(p)
    return out


def _agent():
    return EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None)


def test_collect_folder_glob_and_manifest(tmp_path):
    _images(tmp_path / "in" / "sub", 3)
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "sub" / "._img_000.png").write_bytes(b"\x00\x05\x16\x07")  # macOS copy: not an input
    (tmp_path / "in" / ".thumbs").mkdir()
    (tmp_path / "in" / ".thumbs" / "t.png").write_bytes(b"x")
    items = collect_inputs(tmp_path / "in")
    assert [i.id for i in items] == ["sub/img_000.png", "sub/img_001.png", "sub/img_002.png"]
    assert len(collect_inputs(str(tmp_path / "in" / "**" / "*.png"))) == 3
    man = tmp_path / "m.csv"
    man.write_text("image,organ,label,x_min,y_min,x_max,y_max,age\n"
                   "in/sub/img_000.png,breast,benign,10,10,40,40,51\nin/sub/img_001.png,breast,normal,,,,,\n")
    mi = collect_inputs(man)
    assert [i.organ for i in mi] == ["breast", "breast"] and mi[0].context == {"age": 51}
    assert mi[0].truth["label"] == "benign"
    with pytest.raises(EchoInputError, match="no images"):
        collect_inputs(tmp_path / "in" / "*.jpg")
    with pytest.raises(EchoInputError, match="not a folder"):
        collect_inputs(tmp_path / "nowhere")


def test_run_records_errors_and_resumes_without_duplicates(tmp_path):
    _images(tmp_path / "in", 5, bad=2)
    items = collect_inputs(tmp_path / "in")
    out = tmp_path / "res.jsonl"
    s = run_batch(items[:4], out, agent=_agent(), overlays=tmp_path / "ov", fhir=tmp_path / "fhir", progress=False, chunk_size=3)
    assert (s.ok, s.errors) == (2, 2)  # the two broken files sort first
    s2 = run_batch(items, out, agent=_agent(), overlays=tmp_path / "ov", fhir=tmp_path / "fhir", progress=False)
    assert s2.done_before == 4 and s2.processed == 3
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(i.id for i in items)
    errs = [r for r in recs if r["status"] == "error"]
    assert len(errs) == 2 and all(r["error_type"] == "UnreadableImageError" for r in errs)
    ok = [r for r in recs if r["status"] == "ok"]
    assert all(Path(r["overlay"]).exists() and Path(r["fhir"]).exists() for r in ok)
    fhir = json.loads(Path(ok[0]["fhir"]).read_text())
    assert fhir["resourceType"] == "DiagnosticReport" and fhir["status"] == "preliminary"
    assert summarise_journal(out).ok == 5


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"id":"a","status":"ok","diagnosis":{"label":"normal"}}\n{"id":"b","sta')
    done = read_journal(out)
    assert list(done) == ["a"] and out.read_text().endswith("}\n")
    out.write_text('{"id":"a","status":"error"}\nnot json\n{"id":"b","status":"error"}\n')
    with pytest.raises(EchoInputError, match="line 2"):
        read_journal(out)


def test_duplicate_ids_refused(tmp_path):
    from echo_agent.batch import BatchItem

    it = BatchItem(id="x", image=tmp_path / "a.png")
    with pytest.raises(EchoInputError, match="twice"):
        run_batch([it, it], tmp_path / "o.jsonl", agent=_agent(), progress=False)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_and_restart_finishes_exactly_once(tmp_path):
    _images(tmp_path / "in", 24)
    out = tmp_path / "res.jsonl"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from _fakes import fake_toolkit, FakeDetector
        from echo_agent import EchoAgent
        from echo_agent.batch import collect_inputs, run_batch

        class Slow(FakeDetector):
            def detect(self, image, **kw):
                time.sleep(0.15)
                return super().detect(image, **kw)

        tk = fake_toolkit()
        tk.detectors["breast"] = Slow()
        agent = EchoAgent(organ="breast", toolkit=tk, router=None)
        run_batch(collect_inputs({str(tmp_path / 'in')!r}), {str(out)!r}, agent=agent, progress=False, chunk_size=2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 60
    while time.time() < deadline:
        if out.exists() and len(out.read_bytes().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(read_journal(out))
    assert 5 <= first < 24, "the kill should land half-way"
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    lines = out.read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert len(ids) == 24 and len(set(ids)) == 24


# -- batched detector ------------------------------------------------------------------------------
def _packaged_breast_agent(**kw):
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.organs import get_organ
    from echo_agent.tools import Toolkit

    det = OnnxDetector(get_organ("breast").resolve_weights())  # own instance: its own output cache
    if not det.dynamic_batch:
        pytest.skip("the packaged breast detector has a fixed batch of 1")
    calls: list[int] = []
    forward = det._forward
    det._forward = lambda batch: calls.append(len(batch)) or forward(batch)
    toolkit = Toolkit(detectors={"breast": det}, render_overlays=False)
    return EchoAgent(organ="breast", toolkit=toolkit, router=None, **kw), calls


def _variants():
    from echo_agent.imaging import example_image, load_image

    base = load_image(example_image("breast_malignant")).array
    h, w = base.shape[:2]
    return [base, base[:, ::-1].copy(), base[h // 10 :, : w - w // 8].copy(), base[: h - h // 6].copy()]


def test_batch_runs_the_detector_once_for_the_chunk_and_matches_run():
    images = _variants()
    agent, calls = _packaged_breast_agent()
    batched = agent.batch(images)
    assert calls[0] == len(images)  # the prefetch: one forward pass for the whole chunk
    assert all(c <= 2 for c in calls[1:])  # afterwards only the re-checks' own views
    single_agent, single_calls = _packaged_breast_agent(prefetch=False)
    single = [single_agent.run(img) for img in images]
    assert all(c == 1 for c in single_calls)
    assert [d.model_dump() for d in batched] == [d.model_dump() for d in single]
    assert len(calls) < len(single_calls)


def test_prefetch_holds_its_outputs_whatever_the_cache_sizes():
    images = _variants()
    agent, calls = _packaged_breast_agent()
    det = agent.toolkit.detectors["breast"]
    det.cache_size = 0  # no output cache at all
    agent.toolkit.prepared_capacity = 1  # and room for one prepared input
    single_agent, single_calls = _packaged_breast_agent(prefetch=False)
    single_agent.toolkit.detectors["breast"].cache_size = 0
    batched = agent.batch(images)
    single = [single_agent.run(img) for img in images]
    assert calls[0] == len(images)
    # with no output cache, each re-check (original + flipped view) runs both views one by one...
    assert single_calls.count(2) >= 1
    # ...but with the chunk held, the original views never run again: only flipped views remain
    assert all(c == 1 for c in calls[1:]) and sum(calls) < sum(single_calls)
    assert not det._pinned and not agent.toolkit._pinned_prepared  # released after the chunk
    assert [d.model_dump() for d in batched] == [d.model_dump() for d in single]


def test_overlapping_prefetch_blocks_hold_until_the_last_and_failures_release_everything():
    from echo_agent.errors import EchoInputError

    agent, calls = _packaged_breast_agent()
    tk, det = agent.toolkit, agent.toolkit.detectors["breast"]
    ids = [tk.get_store().put(img)["id"] for img in _variants()[:2]]
    with tk.prefetched("breast", ids):
        with tk.prefetched("breast", ids[:1]):
            pass
        assert len(tk._pinned_prepared) == 2 and len(det._pinned) == 2  # the outer block still holds both
    assert not tk._pinned_prepared and not det._pinned
    with pytest.raises(EchoInputError):
        with tk.prefetched("breast", [ids[0], "0" * 24]):  # the second image is not in the store
            pass
    assert not tk._pinned_prepared and not det._pinned


def test_prepared_inputs_are_remembered_per_image_and_region():
    from echo_agent.imaging.preprocess import prepare_for_detection
    from echo_agent.tools import Toolkit

    tk = Toolkit()
    img = _variants()[0]
    a = tk.prepared("id-a", img)
    assert tk.prepared("id-a", img) is a
    assert not a.array.flags.writeable
    expected = prepare_for_detection(img)
    assert (a.array == expected.array).all() and a.crop == expected.crop
    crop = (10, 20, 200, 220)
    r = tk.prepared("id-a", img[20:220, 10:200], crop)
    assert r is not a and r.original_size == (190, 200)
    tk.prepared_capacity = 2
    tk.prepared("id-b", img)
    tk.prepared("id-c", img)
    assert tk.prepared("id-a", img) is not a  # evicted, recomputed


def test_agent_batch_concurrency_gives_the_same_results_and_keeps_errors_per_item(tmp_path):
    paths = _images(tmp_path / "in", 4, bad=1)
    agent = _agent()
    seq = agent.batch(paths)
    par = agent.batch(paths, max_concurrency=3)
    assert [type(r).__name__ for r in seq] == [type(r).__name__ for r in par]
    assert isinstance(seq[-1], EchoInputError) or type(seq[-1]).__name__.endswith("Error")
    assert [r.model_dump() for r in seq[:-1]] == [r.model_dump() for r in par[:-1]]


def test_batch_of_more_arrays_than_the_store_holds_keeps_every_image():
    """In-memory arrays have no path to re-read them from: every image must still be in the image
    store when its graph runs, however long the batch (inputs are stored chunk by chunk)."""
    from echo_agent.imaging.store import ImageStore

    agent = EchoAgent(organ="breast", toolkit=fake_toolkit(store=ImageStore(capacity=40)), router=None)
    images = [speckle_image(seed=i) for i in range(45)]
    results = agent.batch(images)
    assert len(results) == 45 and not any(isinstance(r, Exception) for r in results)
    for dx in results:
        # each run saw its detector's, captioner's and retriever's evidence (no tool failed on a
        # missing image)
        assert not dx.indeterminate, dx.indeterminate_reason
        assert {r.kind for r in dx.evidence} >= {"detection", "description", "knowledge"}


# -- outputs that cannot be written (hardening) -------------------------------------------------------
def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    from echo_agent.errors import OutputPathError

    folder = tmp_path / "in"
    folder.mkdir()
    _images(folder, 2)
    items = collect_inputs(str(folder), organ="breast")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    calls = []
    agent = _agent()
    original = agent.batch
    agent.batch = lambda *a, **k: calls.append(1) or original(*a, **k)
    for kw in ({"out": blocker / "r.jsonl"}, {"out": tmp_path / "r.jsonl", "overlays": blocker},
               {"out": tmp_path / "r.jsonl", "fhir": blocker / "sub"}, {"out": tmp_path}):
        out = kw.pop("out")
        with pytest.raises(OutputPathError, match="not writable|not a writable"):
            run_batch(items, out, agent=agent, progress=False, **kw)
    assert not calls


def test_overlay_and_fhir_write_failures_are_per_item(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    _images(folder, 3)
    items = collect_inputs(str(folder), organ="breast")
    real_write_text = Path.write_text

    def flaky(self, *a, **k):
        if self.suffix == ".tmp" and "img_001" in self.name:  # one item's FHIR write hits a full disk
            raise OSError(28, "No space left on device", str(self))
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", flaky)
    out = tmp_path / "r.jsonl"
    s = run_batch(items, out, agent=_agent(), fhir=tmp_path / "fhir", progress=False)
    recs = list(read_journal(out).values())
    assert len(recs) == 3 and s.total == 3
    failed = [r for r in recs if "fhir_error" in r]
    assert len(failed) == 1 and "No space left" in failed[0]["fhir_error"] and failed[0]["status"] == "ok"
    assert not list((tmp_path / "fhir").glob("*.tmp"))


def test_a_full_disk_leaves_no_torn_journal_line(tmp_path, monkeypatch):
    from echo_agent import batch as batch_mod
    from echo_agent.errors import OutputPathError

    folder = tmp_path / "in"
    folder.mkdir()
    _images(folder, 3)
    items = collect_inputs(str(folder), organ="breast")
    out = tmp_path / "r.jsonl"
    run_batch(items[:1], out, agent=_agent(), progress=False)
    before = out.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if fd > 2 and len(data) > 20:
            real_write(fd, bytes(data[:10]))  # part of the line lands, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(batch_mod.os, "write", half_then_full)
    with pytest.raises(OutputPathError, match="No space left"):
        run_batch(items, out, agent=_agent(), progress=False)
    monkeypatch.undo()
    assert out.read_bytes() == before  # the partial line was cut off again
    run_batch(items, out, agent=_agent(), progress=False)  # and the same command finishes the rest
    assert len(read_journal(out)) == 3


def test_hashed_ids_keep_file_names_out_of_ids_fhir_and_file_names(tmp_path):
    from echo_agent.batch import hashed_id

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(speckle_image()).save(folder / "smith_jane_1961.png")
    items = collect_inputs(str(folder), organ="breast", hash_ids=True)
    assert [it.id for it in items] == [hashed_id("smith_jane_1961.png")]
    assert collect_inputs(str(folder), organ="breast", hash_ids=True)[0].id == items[0].id  # stable: resumable
    out = tmp_path / "r.jsonl"
    run_batch(items, out, agent=_agent(), fhir=tmp_path / "fhir", overlays=tmp_path / "ov", progress=False)
    rec = next(iter(read_journal(out).values()))
    assert "smith" not in rec["id"]
    for f in [*(tmp_path / "fhir").iterdir(), *(tmp_path / "ov").iterdir()]:
        assert "smith" not in f.name
        if f.suffix == ".json":
            assert "smith" not in json.loads(f.read_text())["id"]
