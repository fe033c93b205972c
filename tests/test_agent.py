"""EchoAgent facade: inputs, run/arun/stream/astream/batch, review, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from _fakes import fake_toolkit, speckle_image
from PIL import Image

from echo_agent import EchoAgent
from echo_agent.errors import (
    ClinicalContextError,
    EchoError,
    EchoInputError,
    ImageTooSmallError,
    UnknownOrganError,
    UnreadableImageError,
)
from echo_agent.events import (
    DiagnosisEvent,
    EvidenceEvent,
    PerceivedEvent,
    ReasonerEvent,
    ReviewRequestedEvent,
    ToolCalledEvent,
    ToolErrorEvent,
)
from echo_agent.schemas import Diagnosis


@pytest.fixture()
def agent():
    return EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _dicom(path, arr: np.ndarray, frames: int = 1):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.Modality = "US"
    gray = arr[:, :, 0]
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = np.stack([gray] * frames).tobytes()
    else:
        ds.PixelData = gray.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    _ = pydicom
    return path


def test_run_every_input_type(agent, tmp_path):
    arr = speckle_image()
    p = tmp_path / "x.png"
    Image.fromarray(arr).save(p)
    inputs = [str(p), p, Image.fromarray(arr), arr, _png_bytes(arr), _dicom(tmp_path / "x.dcm", arr)]
    results = [agent.run(x) for x in inputs]
    assert all(isinstance(d, Diagnosis) for d in results)
    assert len({d.model_dump_json() for d in results}) == 1  # same pixels, same answer


def test_run_state_returns_the_run_behind_the_diagnosis(agent):
    from langchain_core.messages import AIMessage, ToolMessage

    arr = speckle_image()
    state = agent.run_state(arr, context={"age": 61})
    dx = Diagnosis.model_validate(state["diagnosis"])
    same = agent.run(arr, context={"age": 61})
    assert dx.model_dump(exclude={"elapsed_ms"}) == same.model_dump(exclude={"elapsed_ms"})
    assert state["organ"] == "breast" and state["clinical"] == {"age": 61}
    assert state["image"]["width"] == arr.shape[1] and state["evidence"]
    calls = [c["name"] for m in state["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and len([m for m in state["messages"] if isinstance(m, ToolMessage)]) == len(calls)
    with pytest.raises(EchoInputError):
        agent.run_state(b"not an image")
    with pytest.raises(EchoError, match="start"):
        EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None, review=True).run_state(arr)


def test_dicom_identifiers_never_reach_outputs(agent, tmp_path):
    dcm = _dicom(tmp_path / "multi.dcm", speckle_image(), frames=3)
    events = list(agent.stream(dcm, frame=2))
    blob = "".join(e.model_dump_json() for e in events)
    assert "Doe" not in blob and "SECRET-123" not in blob
    with pytest.raises(EchoInputError):
        agent.run(dcm, frame=7)


def test_clinical_context_forms(agent):
    arr = speckle_image()
    dx = agent.run(arr, context={"age": 52, "symptoms": "palpable lump"})
    assert any(r.kind == "clinical" and "age 52" in r.summary for r in dx.evidence)
    assert agent.run(arr, context="family history of breast cancer").evidence
    with pytest.raises(ClinicalContextError, match="unknown clinical context key"):
        agent.run(arr, context={"agee": 52})
    with pytest.raises(ClinicalContextError, match="age"):
        agent.run(arr, context={"age": -3})


def test_bad_inputs_raise_typed_errors(agent, tmp_path):
    with pytest.raises(EchoInputError, match="does not exist|not found|No such"):
        agent.run(tmp_path / "missing.png")
    with pytest.raises(UnreadableImageError):
        agent.run(_png_bytes(speckle_image())[:60])
    with pytest.raises(ImageTooSmallError):
        agent.run(np.zeros((8, 8), np.uint8))
    with pytest.raises(UnknownOrganError):
        agent.run(speckle_image(), organ="liver")


def test_unknown_organ_without_router(tmp_path):
    a = EchoAgent(toolkit=fake_toolkit(), router=None)
    with pytest.raises(UnknownOrganError, match="pass organ"):
        a.run(speckle_image())


def test_stream_yields_typed_events_in_order(agent):
    events = list(agent.stream(speckle_image()))
    types = [type(e) for e in events]
    assert types[0] is PerceivedEvent and types[-1] is DiagnosisEvent
    assert ReasonerEvent in types and ToolCalledEvent in types and EvidenceEvent in types
    called = [e.name for e in events if isinstance(e, ToolCalledEvent)]
    assert called == ["detect_breast_lesions", "describe_image", "retrieve_knowledge"]
    ev = [e for e in events if isinstance(e, EvidenceEvent)]
    assert [e.evidence.kind for e in ev] == ["detections", "description", "knowledge"]
    assert [e.step for e in events] == list(range(len(events)))
    assert events[-1].diagnosis == agent.run(speckle_image())


def test_stream_reports_tool_errors(agent):
    from echo_agent.errors import ModelLoadError

    class Broken:
        name, labels = "broken", ("benign", "malignant")

        def detect(self, image, **kw):
            raise ModelLoadError("no weights")

    agent.toolkit.detectors["breast"] = Broken()
    events = list(agent.stream(speckle_image()))
    errs = [e for e in events if isinstance(e, ToolErrorEvent)]
    assert errs and "no weights" in errs[0].error
    assert events[-1].diagnosis.indeterminate


async def test_arun_and_astream(agent):
    dx = await agent.arun(speckle_image())
    assert dx == agent.run(speckle_image())
    events = [e async for e in agent.astream(speckle_image())]
    assert isinstance(events[-1], DiagnosisEvent) and events[-1].diagnosis == dx


def test_batch_keeps_going_after_failures(agent, tmp_path):
    good = speckle_image()
    results = agent.batch([good, tmp_path / "nope.png", np.zeros((4, 4)), speckle_image(seed=3)])
    assert isinstance(results[0], Diagnosis) and isinstance(results[3], Diagnosis)
    assert isinstance(results[1], EchoInputError) and isinstance(results[2], ImageTooSmallError)
    with pytest.raises(EchoInputError, match="one per image"):
        agent.batch([good], contexts=[None, None])


def test_batch_records_graph_failures_per_item():
    a = EchoAgent(toolkit=fake_toolkit(), router=lambda img: ("breast", 1.0) if img.mean() > 50 else (None, 0.1))
    results = a.batch([speckle_image(), np.full((64, 64), 10, np.uint8)])
    assert isinstance(results[0], Diagnosis)
    assert isinstance(results[1], UnknownOrganError)


def test_input_is_never_modified(agent):
    arr = speckle_image()
    before = arr.copy()
    agent.run(arr)
    assert np.array_equal(arr, before) and arr.flags.writeable


def test_review_start_resume():
    a = EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None, review=True)
    with pytest.raises(EchoError, match="start"):
        a.run(speckle_image())
    ticket = a.start(speckle_image())
    assert ticket.diagnosis.label == "malignant"
    dx = a.resume(ticket, {"action": "reject", "reviewer": "dr-b", "comment": "artefact"})
    assert dx.indeterminate and "artefact" in dx.indeterminate_reason and dx.review.action == "reject"
    with pytest.raises(EchoInputError, match="not waiting"):
        a.resume(ticket, {"action": "accept", "reviewer": "dr-b"})
    t2 = a.start(speckle_image())
    with pytest.raises(Exception, match="not a breast label"):
        a.resume(t2, {"action": "edit", "reviewer": "x", "label": "hydronephrosis"})
    events = list(EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None, review=True).stream(speckle_image()))
    assert isinstance(events[-1], ReviewRequestedEvent)


def test_invalid_review_decision_does_not_wedge_the_run():
    a = EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None, review=True)
    t = a.start(speckle_image())
    with pytest.raises(EchoInputError, match="not a breast label"):
        a.resume(t, {"action": "edit", "reviewer": "x", "label": "hydronephrosis"})
    with pytest.raises(EchoInputError, match="reviewer"):
        a.resume(t, {"action": "accept"})
    dx = a.resume(t, {"action": "edit", "reviewer": "x", "label": "benign"})
    assert dx.label == "benign" and dx.findings[0].label == "benign"


def test_review_to_normal_clears_boxes():
    a = EchoAgent(organ="breast", toolkit=fake_toolkit(), router=None, review=True)
    dx = a.resume(a.start(speckle_image()), {"action": "edit", "reviewer": "x", "label": "normal", "category": "1"})
    assert dx.findings == [] and dx.box is None and "findings" in dx.review.changes


def test_policy_reuses_parsed_tool_results_without_sharing_mutable_arguments():
    import json

    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from echo_agent.reasoners.policy import EmbeddedPolicy

    policy = EmbeddedPolicy(bound_tool_names=["detect_breast_lesions", "describe_image", "retrieve_knowledge"])
    report = {"candidates": [{"id": "det1:0", "box": [100, 100, 400, 400], "label": "benign", "score": 0.9}]}
    msgs = [
        HumanMessage("image"),
        AIMessage("", tool_calls=[{"name": "detect_breast_lesions", "args": {}, "id": "c0", "type": "tool_call"}]),
        ToolMessage(json.dumps(report), tool_call_id="c0"),
    ]
    first = policy.decide(msgs)
    assert first.tool_calls[0]["name"] == "describe_image"
    ids = first.tool_calls[0]["args"]["detection_ids"]  # candidates by id, not by copied box
    assert "regions" not in first.tool_calls[0]["args"]
    ids[0] = "det9:9"  # a caller editing the call's arguments must not reach the parsed cache
    again = policy.decide(msgs)
    assert again.tool_calls[0]["args"]["detection_ids"] == ["det1:0"]
    # unparseable content counts as a failed call (not retried); valid JSON without candidates
    # ("null") is not an error, so the detector is asked again, as before the parse cache
    broken = [*msgs[:2], ToolMessage("not json", tool_call_id="c0")]
    assert policy.decide(broken).tool_calls[0]["name"] == "describe_image"
    null = [*msgs[:2], ToolMessage("null", tool_call_id="c0")]
    assert policy.decide(null).tool_calls[0]["name"] == "detect_breast_lesions"


def test_too_long_free_text_context_is_a_clinical_context_error():
    from echo_agent.errors import ClinicalContextError

    with pytest.raises(ClinicalContextError, match="notes"):
        EchoAgent(toolkit=fake_toolkit(), router=None).run(speckle_image(), organ="breast", context="x" * 5000)
