"""Learned fusion: features, fitting, JSON parameters (no pickle), diagnoses and citations."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import numpy as np
import pytest

from echo_agent.errors import ModelLoadError
from echo_agent.fusion import (
    DETECTOR_RULE,
    HEURISTIC_RULE,
    LOGISTIC,
    FusionParams,
    LearnedFusion,
    fit_rule_platt,
    fusion_features,
    merged_candidates,
    platt_rule_probs,
    recheck_candidate,
    rule_log_probs,
    veto_normal,
)
from echo_agent.fusion.diagnosis import OVERRULED_RECOMMENDATION
from echo_agent.fusion.learned import NORMAL_VETO_MARGIN
from echo_agent.organs import get_organ
from echo_agent.schemas import (
    Box,
    ClinicalContext,
    Descriptor,
    Detection,
    DetectorReport,
    ImageContext,
    RegionDescription,
)
from echo_agent.training.fusion_fit import (
    Candidate,
    CandidateScore,
    RunRecord,
    default_candidates,
    ece_with_interval,
    feature_subset,
    fit_fusion,
    guard_classes,
    select_candidate,
)

BREAST = get_organ("breast")


def _fit(records, **kw):
    """fit_fusion with light CV settings (one fold assignment, a short bootstrap) to keep tests fast."""
    return fit_fusion(records, organ="breast", **{"folds": 3, "seeds": (0,), "n_boot": 50, **kw})


@functools.lru_cache(maxsize=1)
def _fitted_json() -> str:
    return _fit(_records()).to_json()


def _fitted() -> FusionParams:
    """The fusion fitted on :func:`_records` (fitted once per session, a fresh copy each call)."""
    return FusionParams.from_json(_fitted_json())


def _evidence(label: str | None, score: float, shape: str = "oval", tta: bool = False, eid: str = "det1",
              detector: str = "t"):
    dets = []
    if label is not None:
        dets = [Detection(id=f"{eid}:0", box=Box(x1=40, y1=30, x2=120, y2=80), label=label, score=score)]
    rep = DetectorReport(id=eid, organ="breast", detector=detector, detections=dets, score_threshold=0.25, tta=tta,
                         image_width=200, image_height=160)
    regs = [RegionDescription(box=d.box, detection_id=d.id,
                              descriptors={"shape": Descriptor(value=shape, confidence=0.8)}) for d in dets]
    ctx = ImageContext(id="desc1", organ="breast", image_width=200, image_height=160, regions=regs,
                       global_descriptors={"annotations": Descriptor(value=False)})
    return [rep, ctx]


def _records(n: int = 90, seed: int = 0) -> list[RunRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        truth = ["normal", "benign", "malignant"][i % 3]
        if truth == "normal":
            ev = _evidence(None, 0.0) if rng.random() < 0.8 else _evidence("benign", 0.3)
        elif truth == "benign":
            ev = _evidence("benign" if rng.random() < 0.8 else "malignant", rng.uniform(0.4, 0.9), shape="oval")
        else:
            ev = _evidence("malignant" if rng.random() < 0.7 else "benign", rng.uniform(0.4, 0.9), shape="irregular")
        out.append(RunRecord(key=f"k{i}", group=f"g{i // 2}", organ="breast", label=truth, width=200, height=160,
                             evidence=[e.model_dump(mode="json") for e in ev], clinical={"age": 40 + i % 30}))
    return out


def test_features_are_named_and_bounded():
    f = fusion_features(BREAST, _evidence("malignant", 0.8, "irregular"), ClinicalContext(age=65, symptoms="palpable lump"), (200, 160))
    assert f["det_max_malignant"] == 0.8 and f["det_max_benign"] == 0.0
    assert f["desc_shape=irregular"] == 0.8 and f["desc_shape=oval"] == 0.0
    assert f["palpable"] == 1.0 and f["age"] == pytest.approx(1.0)
    assert not any(k.startswith("global_") for k in f) and "age_known" not in f  # center shortcuts
    empty = fusion_features(BREAST, _evidence(None, 0), None, (200, 160))
    assert empty["det_top"] == 0.0 and empty["age"] == 0.0


def test_merged_candidates_fuse_repeated_calls():
    a = _evidence("malignant", 0.8)[0]
    b = _evidence("malignant", 0.6, tta=True, eid="det2")[0]
    merged = merged_candidates([a, b])
    assert len(merged) == 1 and merged[0].id in ("det1:0", "det2:0")
    assert 0.6 <= merged[0].score <= 0.8


def test_fit_predicts_and_round_trips_through_json(tmp_path):
    params = _fitted()
    assert params.training["oof_accuracy"] > 0.6
    path = tmp_path / "breast.json"
    path.write_text(params.to_json())
    raw = path.read_text()
    assert raw.lstrip().startswith("{")  # plain JSON, not a pickle
    loaded = FusionParams.from_json(raw)
    fusion = LearnedFusion({"breast": loaded})
    mal = fusion.fuse(BREAST, _evidence("malignant", 0.9, "irregular"), clinical=None, image_size=(200, 160))
    ben = fusion.fuse(BREAST, _evidence("benign", 0.9, "oval"), clinical=None, image_size=(200, 160))
    nor = fusion.fuse(BREAST, _evidence(None, 0.0), clinical=None, image_size=(200, 160))
    assert mal.label == "malignant" and ben.label == "benign" and nor.label == "normal"
    assert mal.probabilities["malignant"] > ben.probabilities["malignant"]
    assert nor.findings == [] and nor.category == "1"
    assert mal.category == BREAST.category_for(mal.probabilities["malignant"])
    assert "driven by" in mal.rationale and mal.findings[0].label == "malignant"
    # determinism
    assert fusion.fuse(BREAST, _evidence("malignant", 0.9, "irregular"), clinical=None, image_size=(200, 160)) == mal


def test_fused_label_overrides_a_disagreeing_detector_label():
    params = _fitted()
    dx = LearnedFusion({"breast": params}).fuse(BREAST, _evidence("benign", 0.5, "irregular"), clinical=None, image_size=(200, 160))
    if dx.label == "malignant":
        assert dx.findings[0].label == "malignant" and dx.findings[0].detection_ids == ["det1:0"]


def test_without_params_falls_back_to_heuristic():
    dx = LearnedFusion({}).fuse(BREAST, _evidence("malignant", 0.8), clinical=None, image_size=(200, 160))
    assert dx.reasoner.startswith("heuristic")


def test_bad_parameter_files_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        FusionParams.from_json("not json")
    good = json.loads(_fitted().to_json())
    good["weights"] = good["weights"][:1]
    with pytest.raises(ModelLoadError, match="inconsistent"):
        FusionParams.from_json(json.dumps(good))
    with pytest.raises(ValueError, match="at least 10"):
        fit_fusion(_records(6), organ="breast")
    bad_kind = json.loads(_fitted().to_json())
    bad_kind["kind"] = "random_forest"
    with pytest.raises(ModelLoadError, match="kind"):
        FusionParams.from_json(json.dumps(bad_kind))


# -- model selection -------------------------------------------------------------------------------------
def _score(name, n_features, loss, se=0.05, acc=0.8, bacc=0.8, l2=None, kind=LOGISTIC):
    return CandidateScore(name=name, kind=kind, features=None, l2=l2, balanced=False, n_features=n_features,
                          cv_log_loss=loss, cv_log_loss_se=se, cv_accuracy=acc, cv_balanced_accuracy=bacc, cv_ece=0.1)


def test_selection_rule_prefers_the_simpler_model_within_one_standard_error():
    scores = [_score("rule", 0, 0.60, kind=DETECTOR_RULE, acc=0.7, bacc=0.7), _score("small", 5, 0.52, l2=10.0),
              _score("big", 30, 0.50, se=0.03, l2=10.0)]
    assert select_candidate(scores, 0.7, 0.7) == 1  # 0.52 <= 0.50 + 0.03
    assert [s.chosen for s in scores] == [False, True, False]
    scores[2].cv_log_loss_se = 0.01
    assert select_candidate(scores, 0.7, 0.7) == 2  # now "small" is more than one SE worse
    # same features: the stronger L2 is the simpler model
    twins = [_score("weak", 5, 0.50, l2=1.0), _score("strong", 5, 0.52, l2=100.0)]
    assert select_candidate(twins, 0.0, 0.0) == 1


def test_selection_guard_rejects_models_that_lose_accuracy_to_the_detector():
    scores = [_score("rule", 0, 0.90, kind=DETECTOR_RULE, acc=0.70, bacc=0.70),
              _score("majority", 5, 0.60, acc=0.75, bacc=0.50),  # more accurate, but drops a class
              _score("worse", 9, 0.55, acc=0.65, bacc=0.72)]
    assert select_candidate(scores, 0.70, 0.70) == 0
    assert [s.eligible for s in scores] == [True, False, False]


def _signal_records(n: int, *, signal: str, seed: int = 0) -> list[RunRecord]:
    """Breast runs whose truth is carried by the detector (``signal='detector'``, shapes are noise) or
    only by the captioner's shape descriptor (``signal='descriptor'``, detector labels are noise)."""
    rng = np.random.default_rng(seed)
    shape_of = {"benign": "oval", "malignant": "irregular"}
    out = []
    for i in range(n):
        truth = ("benign", "malignant")[i % 2]
        other = ("malignant", "benign")[i % 2]
        if signal == "detector":
            det_label = truth if rng.random() < 0.9 else other
            shape = shape_of[("benign", "malignant")[int(rng.integers(2))]]
        else:
            det_label = ("benign", "malignant")[int(rng.integers(2))]
            shape = shape_of[truth] if rng.random() < 0.95 else shape_of[other]
        ev = _evidence(det_label, float(rng.uniform(0.5, 0.9)), shape=shape)
        out.append(RunRecord(key=f"k{i}", group=f"g{i // 2}", organ="breast", label=truth, width=200, height=160,
                             evidence=[e.model_dump(mode="json") for e in ev], clinical=None))
    return out


def test_selection_ignores_pure_noise_features():
    cands = [Candidate(DETECTOR_RULE), Candidate(LOGISTIC, "detector", 10.0), Candidate(LOGISTIC, "all", 10.0)]
    params = _fit(_signal_records(120, signal="detector"), candidates=cands)
    assert params.training["chosen"] != "logistic[all] l2=10"
    assert not any(n.startswith("desc_") for n in params.feature_names)


def test_selection_takes_the_learned_model_when_descriptors_carry_the_signal():
    cands = [Candidate(DETECTOR_RULE), Candidate(LOGISTIC, "detector", 10.0), Candidate(LOGISTIC, "all", 10.0)]
    params = _fit(_signal_records(120, signal="descriptor"), candidates=cands)
    assert params.kind == LOGISTIC and params.training["chosen"] == "logistic[all] l2=10"
    table = {c["name"]: c for c in params.training["selection"]["candidates"]}
    assert table["logistic[all] l2=10"]["cv_accuracy"] > table["detector_rule+temperature"]["cv_accuracy"] + 0.2
    assert params.training["oof_accuracy"] == table["logistic[all] l2=10"]["cv_accuracy"]


def test_few_images_fall_back_to_a_calibrated_rule_with_a_warning():
    params = _fit(_signal_records(30, signal="descriptor"), min_images=50)
    assert params.kind in (DETECTOR_RULE, HEURISTIC_RULE) and params.feature_names == []
    assert any("only 30 breast images" in w for w in params.training["warnings"])
    assert {c["kind"] for c in params.training["selection"]["candidates"]} <= {DETECTOR_RULE, HEURISTIC_RULE}
    # the rule's diagnosis follows the detector's vote, with a temperature-calibrated probability
    dx = LearnedFusion({"breast": params}).fuse(BREAST, _evidence("malignant", 0.8), clinical=None, image_size=(200, 160))
    assert dx.label == "malignant" and dx.reasoner.startswith("learned") and "malignant detector score 0.80" in dx.rationale


def test_selection_fields_round_trip_through_json_and_fitting_is_deterministic(tmp_path):
    a = _fit(_records())
    b = _fit(_records())
    assert a.to_json() == b.to_json()
    loaded = FusionParams.from_json(a.to_json())
    assert loaded.kind == a.kind and loaded.training == json.loads(a.to_json())["training"]
    sel = loaded.training["selection"]
    assert sel["rule"] and len(sel["candidates"]) == len(default_candidates())
    assert sum(c["chosen"] for c in sel["candidates"]) == 1 and loaded.training["n"] == 90
    assert len(sel["candidates"][0]["cv_ece_ci"]) == 2
    # a rule-kind parameter file has no features and still loads
    rule = _fit(_records(), candidates=[Candidate(HEURISTIC_RULE)], min_images=10)
    assert rule.kind in (DETECTOR_RULE, HEURISTIC_RULE)
    assert FusionParams.from_json(rule.to_json()).feature_names == []


def test_feature_sets_are_nested():
    names = sorted(fusion_features(BREAST, _evidence("malignant", 0.8, "irregular"), ClinicalContext(age=60), (200, 160)))
    det, geo, full = (feature_subset(names, fs) for fs in ("detector", "detector+geometry", "all"))
    assert set(det) < set(geo) < set(full) == set(names)
    assert "det_max_malignant" in det and "det_top_area" in geo and "det_top_area" not in det
    assert not any(n.startswith("desc_") or n == "age" for n in geo)


def test_ece_interval_matches_the_harness_definition():
    from echo_agent.eval.metrics import calibration_score

    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], 60)
    y = rng.integers(0, 3, 60)
    labels = ["normal", "benign", "malignant"]
    ece, (lo, hi) = ece_with_interval(y, probs, labels, [f"g{i // 3}" for i in range(60)], n_boot=200)
    ref = calibration_score([labels[i] for i in y], [dict(zip(labels, p)) for p in probs], labels).ece
    assert ece == pytest.approx(ref) and 0.0 <= lo <= hi <= 1.0


def test_parameters_for_another_detector_are_refused():
    params = _fitted()
    assert params.training["detectors"] == ["t"]
    dx = LearnedFusion({"breast": params}).fuse(BREAST, _evidence("malignant", 0.8, detector="other"),
                                                clinical=None, image_size=(200, 160))
    assert dx.reasoner.startswith("heuristic") and any("trained on detector t" in w for w in dx.warnings)


# -- evidence conflict: a non-malignant reading of a candidate that looks malignant -------------------
SUSPICIOUS_LOOK = {"shape": "irregular", "orientation": "not parallel", "margin": "spiculated",
                   "posterior_features": "shadowing"}
BENIGN_LOOK = {"shape": "oval", "orientation": "parallel", "margin": "circumscribed", "posterior_features": "none"}


def _described(label: str, score: float, look: dict[str, str]):
    rep, ctx = _evidence(label, score)
    region = ctx.regions[0].model_copy(update={"descriptors": {k: Descriptor(value=v, confidence=0.8) for k, v in look.items()}})
    return [rep, ctx.model_copy(update={"regions": [region]})]


def test_evidence_conflict_rule_counts_the_organs_suspicious_values():
    from echo_agent.fusion import evidence_conflict

    descs = {k: Descriptor(value=v) for k, v in SUSPICIOUS_LOOK.items()}
    why = evidence_conflict(BREAST, "normal", descs)
    assert why and "4 of 4 malignant features" in why and "margin spiculated" in why
    assert evidence_conflict(BREAST, "malignant", descs) is None  # agrees with the reading
    two = {**{k: Descriptor(value=v) for k, v in BENIGN_LOOK.items()}, "shape": Descriptor(value="irregular"),
           "margin": Descriptor(value="indistinct")}
    assert evidence_conflict(BREAST, "benign", two) is None  # 2 < conflict_min_votes (3)
    three = {**two, "posterior_features": Descriptor(value="combined")}
    assert "3 of 4" in evidence_conflict(BREAST, "benign", three)
    assert evidence_conflict(get_organ("kidney"), "normal", descs) is None  # no suspicious sets declared


@pytest.mark.parametrize("fusion", ["learned", "heuristic"])
def test_conflicting_evidence_makes_the_diagnosis_indeterminate_without_changing_it(fusion):
    from echo_agent.fusion import CONFLICT_RECOMMENDATION, HeuristicFusion

    # learned: fitted on few images, so a calibrated detector rule (it reads only the detector, like
    # the packaged breast fusion's features); heuristic: the transparent fallback
    f = LearnedFusion({"breast": _fit(_records(n=30))}) if fusion == "learned" else HeuristicFusion()
    calm = f.fuse(BREAST, _described("benign", 0.9, BENIGN_LOOK), clinical=None, image_size=(200, 160))
    odd = f.fuse(BREAST, _described("benign", 0.9, SUSPICIOUS_LOOK), clinical=None, image_size=(200, 160))
    assert calm.reasoner == odd.reasoner and calm.reasoner.startswith("heuristic" if fusion == "heuristic" else "learned")
    assert not calm.indeterminate and "evidence conflict" not in (calm.indeterminate_reason or "")
    assert odd.indeterminate and "evidence conflict" in odd.indeterminate_reason
    assert odd.recommendation == CONFLICT_RECOMMENDATION
    # both read only the detector here: the flag changes nothing but the indeterminate fields (the calm
    # look is also the probably-benign look, which gives it category 3 instead of its band)
    assert (odd.label, odd.probabilities) == (calm.label, calm.probabilities)
    assert calm.category == "3" and odd.category == BREAST.category_for(odd.probabilities["malignant"])


# -- benign finding: a simple-cyst look makes a benign reading BI-RADS 2 -----------------------------------
CYST_LOOK = {**BENIGN_LOOK, "echo_pattern": "anechoic", "posterior_features": "enhancement"}


@pytest.mark.parametrize("fusion", ["learned", "heuristic"])
def test_a_benign_reading_with_the_simple_cyst_look_is_category_2(fusion):
    from echo_agent.fusion import HeuristicFusion

    f = LearnedFusion({"breast": _fit(_records(n=30))}) if fusion == "learned" else HeuristicFusion()
    solid = f.fuse(BREAST, _described("benign", 0.9, {**CYST_LOOK, "echo_pattern": "hypoechoic", "shape": "round"}),
                   clinical=None, image_size=(200, 160))
    cyst = f.fuse(BREAST, _described("benign", 0.9, {**CYST_LOOK, "shape": "round"}), clinical=None,
                  image_size=(200, 160))
    assert cyst.label == solid.label == "benign" and solid.category not in (None, "2")
    assert cyst.category == "2" and cyst.probabilities == solid.probabilities
    assert f"Category 2 instead of {solid.category}" in cyst.rationale and "echo pattern anechoic" in cyst.rationale
    assert "Category 2" not in solid.rationale
    # the rule never softens a malignant reading, and needs every listed descriptor
    assert BREAST.benign_finding("malignant", {k: Descriptor(value=v) for k, v in CYST_LOOK.items()}) is None
    assert BREAST.benign_finding("benign", {"echo_pattern": Descriptor(value="anechoic")}) is None
    assert BREAST.benign_finding("normal", {k: Descriptor(value=v) for k, v in CYST_LOOK.items()}) is None


@pytest.mark.parametrize("fusion", ["learned", "heuristic"])
def test_a_benign_reading_with_the_probably_benign_look_is_category_3(fusion):
    from echo_agent.fusion import HeuristicFusion

    f = LearnedFusion({"breast": _fit(_records(n=30))}) if fusion == "learned" else HeuristicFusion()
    plain = f.fuse(BREAST, _described("benign", 0.6, {**BENIGN_LOOK, "shape": "round"}), clinical=None,
                   image_size=(200, 160))
    oval = f.fuse(BREAST, _described("benign", 0.6, BENIGN_LOOK), clinical=None, image_size=(200, 160))
    assert BREAST.category_scale.index(plain.category) > BREAST.category_scale.index("3")  # a band above 3
    assert oval.category == "3" and oval.probabilities == plain.probabilities
    assert f"Category 3 instead of {plain.category}" in oval.rationale and "probably benign mass" in oval.rationale
    # the simple-cyst look comes first; a look never raises a category; a malignant reading keeps its band
    look = {k: Descriptor(value=v) for k, v in BENIGN_LOOK.items()}
    assert BREAST.appearance_rule("benign", {**look, "echo_pattern": Descriptor(value="anechoic")}, "4B").category == "2"
    assert BREAST.appearance_rule("benign", look, "2") is None and BREAST.appearance_rule("benign", look, "3") is None
    assert BREAST.appearance_rule("malignant", look, "4C") is None


def test_benign_finding_rule_is_checked_against_the_organ():
    from echo_agent.organs import OrganSpec

    base = BREAST.model_dump()
    for change, why in (({"benign_finding_category": None}, "go together"),
                        ({"benign_finding_category": "7"}, "probability bands"),
                        ({"benign_finding_descriptors": {"echo_pattern": ["glowing"]}}, "descriptor_vocabulary"),
                        ({"benign_finding_descriptors": {"colour": ["red"]}}, "descriptor_vocabulary"),
                        ({"benign_finding_rules": [{"descriptors": {"shape": ["oval"]}, "category": "9"}]},
                         r"benign_finding_rules\[0\] gives category '9'"),
                        ({"benign_finding_rules": [{"descriptors": {"shape": ["starry"]}, "category": "3"}]},
                         "descriptor_vocabulary"),
                        ({"benign_finding_rules": [{"descriptors": {}, "category": "3"}]}, "names no descriptor")):
        with pytest.raises(ValueError, match=why):
            OrganSpec.model_validate({**base, "name": "breast_x", **change})
    off = OrganSpec.model_validate({**base, "name": "breast_off", "benign_finding_descriptors": {},
                                    "benign_finding_category": None, "benign_finding_rules": []})
    assert off.appearance_rules == ()
    assert off.benign_finding("benign", {k: Descriptor(value=v) for k, v in CYST_LOOK.items()}) is None


def test_suspicious_descriptors_must_come_from_the_vocabulary():
    from echo_agent.organs import OrganSpec

    base = BREAST.model_dump()
    bad = {**base, "name": "breast_bad", "suspicious_descriptors": {"shape": ["jagged"]}}
    with pytest.raises(ValueError, match="suspicious_descriptors"):
        OrganSpec.model_validate(bad)
    nopos = {**base, "name": "breast_nopos", "positive_label": None, "categories": ()}
    with pytest.raises(ValueError, match="positive_label"):
        OrganSpec.model_validate(nopos)


def test_run_evidence_sorts_a_run_once_and_both_fusions_accept_it():
    from echo_agent.fusion import HeuristicFusion, RunEvidence
    from echo_agent.schemas import KnowledgeResult

    ev = [*_evidence("malignant", 0.8, "irregular"), KnowledgeResult(id="kn1", query="q", snippets=[]),
          *_evidence("benign", 0.6, eid="det2")]
    run = RunEvidence.of(ev)
    assert [r.id for r in run.reports] == ["det1", "det2"] and len(run.contexts) == 2 and len(run.knowledge) == 1
    assert RunEvidence.of(run) is run
    assert run.candidates is run.candidates  # merged once
    assert [d.score for d in run.candidates] == [d.score for d in merged_candidates(run.reports)]
    clin = ClinicalContext(age=60)
    for fusion in (LearnedFusion({"breast": _fitted()}), HeuristicFusion()):
        a = fusion.fuse(BREAST, ev, clinical=clin, image_size=(200, 160))
        b = fusion.fuse(BREAST, run, clinical=clin, image_size=(200, 160))
        assert a == b


@pytest.mark.parametrize("old, names", [
    ("echo_agent.reasoners.fusion", ["HeuristicFusion", "evidence_conflict", "CONFLICT_RECOMMENDATION", "collect"]),
    ("echo_agent.reasoners.learned_fusion", ["LearnedFusion", "FusionParams", "fusion_features", "presence_conflict"]),
    ("echo_agent.reasoners.fusion_training", ["RunRecord", "fit_fusion", "collect_runs"]),
])
def test_old_fusion_module_paths_still_work_with_a_deprecation_warning(old, names):
    import importlib
    import sys

    import echo_agent.fusion as new
    import echo_agent.training.fusion_fit as fit

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to echo_agent"):
        mod = importlib.import_module(old)
    for name in names:
        assert getattr(mod, name) is getattr(new, name, None) or getattr(mod, name) is getattr(fit, name)
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


def _low_score_records(n: int, seed: int = 0) -> list[RunRecord]:
    """Breast runs whose detector is usually right but scores its candidates around 0.3-0.45 (its
    scores are calibrated to a threshold, not to a probability): a temperature cannot make those votes
    confident without also making the no-candidate votes (share 0.75) over-confident."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        truth = ("normal", "benign", "malignant")[i % 3]
        if truth == "normal":
            ev = _evidence(None, 0.0) if rng.random() < 0.6 else _evidence("benign", float(rng.uniform(0.3, 0.45)))
        else:
            other = "malignant" if truth == "benign" else "benign"
            ev = _evidence(truth if rng.random() < 0.9 else other, float(rng.uniform(0.3, 0.45)))
        out.append(RunRecord(key=f"k{i}", group=f"g{i // 2}", organ="breast", label=truth, width=200, height=160,
                             evidence=[e.model_dump(mode="json") for e in ev], clinical=None))
    return out


def test_platt_map_keeps_the_vote_and_moves_only_its_confidence():
    logp = np.log(np.array([[0.36, 0.32, 0.32], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]]))
    for a, b, c in [(1.0, 3.0, 0.0), (1.0, -5.0, -5.0), (0.0, 0.0, 2.0), (2.0, 1.0, 9.0)]:
        p = platt_rule_probs(logp, a, b, c)
        assert np.allclose(p.sum(1), 1.0)
        assert (p.argmax(1) == logp.argmax(1)).all()  # never below 1/K + 0.01: the rule's decisions stand
        assert (p.max(1) > 1 / 3).all()
    # a high intercept gives a weakly scored lesion vote a high probability (a temperature cannot: it
    # scales the 0.36-vs-0.32 gap only); the "no candidate" vote (label 0) has its own confidence
    weak = np.log([[0.32, 0.36, 0.32], [0.75, 0.125, 0.125]])
    p = platt_rule_probs(weak, 1.0, 3.0, -0.5)
    assert p[0, 1] > 0.9 and p[1, 0] == pytest.approx(1 / (1 + np.exp(0.5)))


def test_platt_fit_matches_how_often_votes_are_right():
    lesion = np.tile(np.log([[0.3, 0.4, 0.3]]), (200, 1))
    y = np.array([1] * 160 + [2] * 40)  # the lesion vote (label 1) is right 80 % of the time
    a, b, c = fit_rule_platt(lesion, y)
    assert platt_rule_probs(lesion[:1], a, b, c)[0, 1] == pytest.approx(0.8, abs=0.01)
    # all votes right: the small L2 keeps the map finite
    a, b, c = fit_rule_platt(lesion, np.ones(200, dtype=int))
    assert np.isfinite([a, b, c]).all() and platt_rule_probs(lesion[:1], a, b, c)[0, 1] > 0.95
    # "no candidate" votes right 1 time in 4: their own confidence, whatever the lesion votes do
    none = np.tile(np.log([[0.75, 0.125, 0.125]]), (40, 1))
    a, b, c = fit_rule_platt(np.vstack([lesion, none]), np.array([1] * 200 + [0] * 10 + [1] * 30))
    assert 1 / (1 + np.exp(-c)) == pytest.approx(10.5 / 41)
    # lesion votes that are right less often the higher their score: no reversed map, a flat one
    scores = np.linspace(0.35, 0.9, 100)
    logp = np.log(np.stack([(1 - scores) / 2, scores, (1 - scores) / 2], axis=1))
    y = np.where(scores > 0.6, 2, 1)
    a, b, c = fit_rule_platt(logp, y)
    hits = int((scores <= 0.6).sum())
    assert a == 0.0
    assert platt_rule_probs(logp, a, b, c)[:, 1] == pytest.approx((hits + 0.5) / 101)  # one value for all


def test_platt_calibrated_rule_is_chosen_where_temperature_cannot_calibrate(tmp_path):
    recs = _low_score_records(120)
    params = _fit(recs, candidates=[Candidate(DETECTOR_RULE), Candidate(DETECTOR_RULE, calibration="platt")])
    table = {c["name"]: c for c in params.training["selection"]["candidates"]}
    temp, platt = table["detector_rule+temperature"], table["detector_rule+platt"]
    assert platt["cv_accuracy"] == temp["cv_accuracy"]  # same decisions
    # (here 0.77 vs 0.80 log-loss, ECE 0.05 vs 0.13)
    assert platt["cv_log_loss"] < temp["cv_log_loss"] - 0.02 and platt["cv_ece"] < temp["cv_ece"] / 2
    assert params.training["chosen"] == "detector_rule+platt" and params.rule_platt is not None
    assert params.calibration == "platt"
    # it round-trips and the fusion uses it: a 0.38 vote, right 3 times in 4 here, is no longer read as 0.38
    path = tmp_path / "f.json"
    path.write_text(params.to_json())
    loaded = FusionParams.from_json(path.read_text())
    assert loaded.rule_platt == params.rule_platt
    dx = LearnedFusion({"breast": loaded}).fuse(BREAST, _evidence("malignant", 0.38), clinical=None, image_size=(200, 160))
    reports = [e for e in _evidence("malignant", 0.38) if isinstance(e, DetectorReport)]
    p_temp = np.exp(rule_log_probs(BREAST, reports, DETECTOR_RULE)).max()
    assert dx.label == "malignant" and dx.probabilities["malignant"] > 0.6 > p_temp
    # the other kinds' files have no rule_platt key (old files read as before)
    assert "rule_platt" not in json.loads(_fitted_json())


@pytest.mark.parametrize("bad, message", [
    ({"kind": LOGISTIC, "rule_platt": [1.0, 0.0, 0.0]}, "only goes with a rule kind"),
    ({"kind": DETECTOR_RULE, "rule_platt": [1.0, 0.0]}, "three finite numbers"),
    ({"kind": DETECTOR_RULE, "rule_platt": [1.0, float("nan"), 0.0]}, "three finite numbers"),
    ({"kind": DETECTOR_RULE, "rule_platt": [-1.0, 0.0, 0.0]}, "a >= 0"),
])
def test_bad_platt_parameters_are_refused(bad, message):
    data = {"organ": "breast", "labels": ["normal", "benign", "malignant"], "feature_names": [], "mean": [], "std": [],
            "weights": [[], [], []], "bias": [0.0, 0.0, 0.0], **bad}
    with pytest.raises(ModelLoadError, match=message):
        FusionParams.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="does not go with"):
        Candidate(LOGISTIC, "detector", 1.0, calibration="platt")


def test_platt_rules_are_opt_in_candidates():
    names = [c.name for c in default_candidates()]
    assert "detector_rule+temperature" in names and not any(n.endswith("+platt") for n in names)
    both = [c.name for c in default_candidates(rule_calibrations=("temperature", "platt"))]
    assert {"detector_rule+platt", "heuristic+platt"} <= set(both) and len(both) == len(names) + 2
    with pytest.raises(ValueError, match="rule_calibrations"):
        default_candidates(rule_calibrations=("isotonic",))


def test_guard_balanced_accuracy_ignores_classes_too_small_to_measure():
    y = np.array([0] * 3 + [1] * 40 + [2] * 30)
    assert guard_classes(y, 3, 10) == [1, 2]  # three normal images would decide a 3-class mean alone
    assert guard_classes(y, 3, 3) == [0, 1, 2]
    assert guard_classes(np.array([0] * 3 + [1] * 40), 3, 10) == [0, 1]  # fewer than two big classes: all present
    # the fit records the classes it averaged over
    recs = _records(90)
    for r in recs[:84]:
        if r.label == "normal":
            r.label = "benign"  # 2 normal images left among 90
    sel = _fit(recs, min_class_images=10).training["selection"]
    assert sel["guard_classes"] == ["benign", "malignant"] and sel["min_class_images"] == 10
    assert "at least min_class_images images" in sel["rule"]
    # the default averages every class present, as before
    assert _fit(recs).training["selection"]["guard_classes"] == ["normal", "benign", "malignant"]


# -- a normal reading needs the detector's agreement (normal_veto) ----------------------------------------
def test_veto_caps_normal_just_below_the_strongest_lesion_class():
    p = np.array([[0.7, 0.2, 0.1], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    before = p.copy()
    out = veto_normal(p, 0, np.array([True, True, True, False]))
    assert np.array_equal(p, before)  # the input is not modified
    assert np.allclose(out.sum(1), 1.0)
    assert out[0].argmax() == 1 and out[1].argmax() == 2 and out[0].max() <= 0.5 and out[1].max() <= 0.5
    assert out[0, 0] == pytest.approx(out[0, 1] * (1 - NORMAL_VETO_MARGIN))
    assert out[0, 1] / out[0, 2] == pytest.approx(2.0)  # the lesion classes keep their ratio
    assert np.array_equal(out[2], p[2]) and np.array_equal(out[3], p[3])  # a lesion reading; no candidate
    assert veto_normal(p[0], 0, True).shape == (3,)


def _normal_below(threshold: float, veto: bool) -> FusionParams:
    """A hand-set logistic fusion that reads normal when the top candidate scores below ~0.4."""
    return FusionParams(organ="breast", labels=["normal", "benign", "malignant"], feature_names=["det_top"],
                        mean=[0.0], std=[1.0], weights=[[-5.0], [5.0], [0.0]], bias=[4.0 * threshold / 0.4, 0.0, -9.0],
                        normal_veto=veto)


def test_a_normal_reading_the_first_look_contradicts_becomes_a_referred_lesion_reading():
    weak = _evidence("benign", 0.3)  # the first call has a candidate at its threshold; the fusion reads normal
    plain = LearnedFusion({"breast": _normal_below(0.4, veto=False)}).fuse(BREAST, weak, clinical=None, image_size=(200, 160))
    assert plain.label == "normal"
    dx = LearnedFusion({"breast": _normal_below(0.4, veto=True)}).fuse(BREAST, weak, clinical=None, image_size=(200, 160))
    assert dx.label == "benign" and dx.probabilities["benign"] < 0.51 and dx.indeterminate
    assert "overruled" in dx.indeterminate_reason and dx.recommendation == OVERRULED_RECOMMENDATION
    assert dx.findings and dx.findings[0].detection_ids == ["det1:0"]
    assert "overruled: the detector's first look has a benign candidate at 0.30" in dx.rationale
    assert dx.probabilities["normal"] == pytest.approx(dx.probabilities["benign"] * (1 - NORMAL_VETO_MARGIN))
    vetoing = LearnedFusion({"breast": _normal_below(0.4, veto=True)})
    # no candidate in the first call: the normal reading stands, even when a later TTA call finds one
    assert vetoing.fuse(BREAST, _evidence(None, 0.0), clinical=None, image_size=(200, 160)).label == "normal"
    late = [_evidence(None, 0.0)[0], _evidence("benign", 0.3, tta=True, eid="det2")[0]]
    assert vetoing.fuse(BREAST, late, clinical=None, image_size=(200, 160)).label == "normal"
    # a lesion reading is untouched
    strong = _evidence("benign", 0.9)
    assert vetoing.fuse(BREAST, strong, clinical=None, image_size=(200, 160)) == LearnedFusion(
        {"breast": _normal_below(0.4, veto=False)}).fuse(BREAST, strong, clinical=None, image_size=(200, 160))


def test_the_veto_can_also_read_the_whole_image_re_check():
    base = _normal_below(0.4, veto=True)
    listening = LearnedFusion({"breast": replace(base, normal_veto_recheck=0.2)})
    empty = _evidence(None, 0.0)[0]
    late = [empty, _evidence("malignant", 0.22, tta=True, eid="det2")[0]]
    dx = listening.fuse(BREAST, late, clinical=None, image_size=(200, 160))
    assert dx.label == "benign" and dx.indeterminate  # the strongest lesion class of this hand-set fusion
    assert "overruled: the detector's re-check has a malignant candidate at 0.22" in dx.rationale
    assert LearnedFusion({"breast": base}).fuse(BREAST, late, clinical=None, image_size=(200, 160)).label == "normal"
    # below the score, a region re-check, or no re-check at all: the normal reading stands
    weak = [empty, _evidence("malignant", 0.15, tta=True, eid="det2")[0]]
    regional = [empty, _evidence("malignant", 0.3, tta=True, eid="det2")[0].model_copy(
        update={"region": Box(x1=10, y1=10, x2=100, y2=100)})]
    for ev in (weak, regional, [empty]):
        assert listening.fuse(BREAST, ev, clinical=None, image_size=(200, 160)).label == "normal"
    assert recheck_candidate(late, 0.2).score == pytest.approx(0.22) and recheck_candidate(late, 0.3) is None


@pytest.mark.parametrize("bad", [0.0, 1.0, "0.2", True])
def test_normal_veto_recheck_round_trips_and_is_checked(bad):
    on = replace(_normal_below(0.4, veto=True), normal_veto_recheck=0.2)
    assert FusionParams.from_json(on.to_json()).normal_veto_recheck == 0.2
    assert "normal_veto_recheck" not in json.loads(_normal_below(0.4, veto=True).to_json())
    with pytest.raises(ModelLoadError, match="normal_veto_recheck must be a score"):
        FusionParams.from_json(json.dumps({**json.loads(on.to_json()), "normal_veto_recheck": bad}))
    with pytest.raises(ModelLoadError, match="needs normal_veto"):
        FusionParams.from_json(json.dumps({**json.loads(on.to_json()), "normal_veto": False}))


def test_normal_veto_round_trips_and_old_files_read_without_it():
    on = _normal_below(0.4, veto=True)
    assert json.loads(on.to_json())["normal_veto"] is True and FusionParams.from_json(on.to_json()).normal_veto
    off = json.loads(_normal_below(0.4, veto=False).to_json())
    assert "normal_veto" not in off  # files without the veto are written as before ...
    assert FusionParams.from_json(json.dumps(off)).normal_veto is False  # ... and read as off
    with pytest.raises(ModelLoadError, match="normal_veto must be true or false"):
        FusionParams.from_json(json.dumps({**off, "normal_veto": "yes"}))


def _with_second_look(evidence: list, p_whole_normal: float, p_top_normal: float | None = None) -> list:
    from echo_agent.schemas import ClassificationResult, RegionClassification

    def probs(pn: float) -> dict[str, float]:
        return {"normal": pn, "benign": (1 - pn) * 0.7, "malignant": (1 - pn) * 0.3}

    regions = [RegionClassification(box=None, probabilities=probs(p_whole_normal))]
    found = [e.detections[0] for e in evidence if isinstance(e, DetectorReport) and e.detections]
    if p_top_normal is not None and found:
        d = found[0]
        regions.insert(0, RegionClassification(box=d.box, detection_id=d.id, probabilities=probs(p_top_normal)))
    return [*evidence, ClassificationResult(id="cls1", organ="breast", classifier="c", regions=regions,
                                            image_width=200, image_height=160)]


def test_a_normal_reading_the_second_look_contradicts_does_not_stand_with_presence_veto():
    import dataclasses

    plain = _normal_below(0.4, veto=True)
    both = dataclasses.replace(plain, presence_veto="top_or_whole")
    whole = dataclasses.replace(plain, presence_veto="whole_image")
    late = [_evidence(None, 0.0)[0], _evidence("benign", 0.2, tta=True, eid="det2")[0], _evidence(None, 0.0)[1]]
    # nothing at the first look's threshold: the normal veto cannot act; the second look sees a lesion
    seen = _with_second_look(late, p_whole_normal=0.3)
    assert LearnedFusion({"breast": plain}).fuse(BREAST, seen, clinical=None, image_size=(200, 160)).label == "normal"
    dx = LearnedFusion({"breast": both}).fuse(BREAST, seen, clinical=None, image_size=(200, 160))
    assert dx.label == "benign" and dx.indeterminate and "overruled" in dx.indeterminate_reason
    assert "overruled: the second look gives the whole image lesion probability 0.70" in dx.rationale
    assert dx.probabilities["normal"] == pytest.approx(dx.probabilities["benign"] * (1 - NORMAL_VETO_MARGIN))
    assert dx.findings and dx.findings[0].detection_ids == ["det2:0"]  # the re-check's candidate is the finding
    # the top candidate's crop counts too
    top = _with_second_look(late, p_whole_normal=0.9, p_top_normal=0.4)
    assert LearnedFusion({"breast": both}).fuse(BREAST, top, clinical=None, image_size=(200, 160)).label == "benign"
    # ... unless only the whole image may overrule
    assert LearnedFusion({"breast": whole}).fuse(BREAST, top, clinical=None, image_size=(200, 160)).label == "normal"
    assert LearnedFusion({"breast": whole}).fuse(BREAST, seen, clinical=None, image_size=(200, 160)).label == "benign"
    # a second look that agrees (lesion probability < 0.5), or no second look: normal stands
    agrees = _with_second_look(late, p_whole_normal=0.6, p_top_normal=0.8)
    assert LearnedFusion({"breast": both}).fuse(BREAST, agrees, clinical=None, image_size=(200, 160)).label == "normal"
    assert LearnedFusion({"breast": both}).fuse(BREAST, late, clinical=None, image_size=(200, 160)).label == "normal"
    # round trip; files without it read as off
    assert FusionParams.from_json(whole.to_json()).presence_veto == "whole_image"
    assert "presence_veto" not in json.loads(plain.to_json())
    with pytest.raises(ModelLoadError, match="presence_veto must be one of off, whole_image, top_or_whole"):
        FusionParams.from_json(json.dumps({**json.loads(plain.to_json()), "presence_veto": True}))


def test_fit_adopts_the_veto_unless_it_costs_out_of_fold_accuracy():
    recs = _records()
    auto = _fit(recs).training["normal_veto"]
    assert set(auto) >= {"mode", "adopted", "without", "with", "n_lesions", "n_normals"}
    cost = auto["without"]["oof_accuracy"] - auto["with"]["oof_accuracy"]
    assert auto["adopted"] == (cost <= 0.01)
    assert auto["with"]["lesions_read_normal"] <= auto["without"]["lesions_read_normal"]
    assert auto["with"]["normals_read_normal"] <= auto["without"]["normals_read_normal"]
    assert _fit(recs, normal_veto="on").normal_veto is True
    off = _fit(recs, normal_veto="off")
    assert off.normal_veto is False and off.training["normal_veto"]["mode"] == "off"
    with pytest.raises(ValueError, match="normal_veto must be one of"):
        _fit(recs, normal_veto="sometimes")
    # where a normal reading the detector contradicts is usually right, the veto costs accuracy: not adopted
    costly = _records(120, seed=3)
    for r in costly:
        if r.label == "normal":  # every normal image has a weak candidate in the first look
            r.evidence = [e.model_dump(mode="json") for e in _evidence("benign", 0.3)]
    veto = _fit(costly, candidates=[Candidate(DETECTOR_RULE), Candidate(LOGISTIC, "detector", 10.0)]).training["normal_veto"]
    assert veto["without"]["normals_read_normal"] > 30  # the fit learned that a weak first candidate is normal
    assert veto["with"]["normals_read_normal"] == 0 and not veto["adopted"]
    assert veto["with"]["oof_accuracy"] < veto["without"]["oof_accuracy"] - 0.2


def test_doctests_of_the_fusion_module():
    import doctest

    from echo_agent.fusion import learned

    assert doctest.testmod(learned).failed == 0


def test_calibrated_selection_takes_the_best_calibrated_near_best_candidate():
    def scored(name, n_features, loss, ece, se=0.05, acc=0.8, bacc=0.8, l2=10.0):
        s = _score(name, n_features, loss, se=se, acc=acc, bacc=bacc, l2=l2)
        s.cv_ece = ece
        return s

    scores = [scored("rule", 0, 0.70, 0.20, acc=0.7, bacc=0.7, l2=None),
              scored("small", 5, 0.50, 0.09),
              scored("calibrated", 13, 0.47, 0.04),
              scored("far", 27, 0.60, 0.01),         # best calibrated, but more than one SE worse
              scored("unguarded", 6, 0.46, 0.02, acc=0.65)]  # fails the accuracy guard
    assert select_candidate(scores, 0.7, 0.7) == 1  # the default rule: the simplest near-best
    assert select_candidate(scores, 0.7, 0.7, selection="calibrated") == 2
    assert [s.chosen for s in scores] == [False, False, True, False, False]
    # equal ECE: the simpler one
    scores[1].cv_ece = 0.04
    assert select_candidate(scores, 0.7, 0.7, selection="calibrated") == 1
    with pytest.raises(ValueError, match="selection must be one of simplest, calibrated"):
        select_candidate(scores, 0.7, 0.7, selection="lowest")


def test_fit_fusion_records_the_selection_rule_it_used():
    params = fit_fusion(_records(80), organ="breast", selection="calibrated", n_boot=50)
    sel = params.training["selection"]
    assert sel["mode"] == "calibrated" and "calibration error" in sel["rule"]
    chosen = next(c for c in sel["candidates"] if c["chosen"])
    best = min((c for c in sel["candidates"] if c["eligible"]), key=lambda c: c["cv_log_loss"])
    near = [c for c in sel["candidates"] if c["eligible"]
            and c["cv_log_loss"] <= best["cv_log_loss"] + best["cv_log_loss_se"] + 1e-4]
    assert chosen["cv_ece"] == min(c["cv_ece"] for c in near)
    with pytest.raises(ValueError, match="selection must be one of"):
        fit_fusion(_records(80), organ="breast", selection="ece")


# -- recalibrating a fitted fusion's temperature on runs of the models it is used with -------------------
def test_recalibration_recovers_a_mis_set_temperature_and_keeps_the_weights():
    import dataclasses

    from echo_agent.training.fusion_fit import recalibrate_temperature

    fitted = _fitted()
    blunt = dataclasses.replace(fitted, temperature=fitted.temperature * 4)  # far too unsure
    new, report = recalibrate_temperature(blunt, _records(90, seed=1), notes={"source": "test"})
    assert new.weights == blunt.weights and new.bias == blunt.bias and new.feature_names == blunt.feature_names
    assert new.temperature < blunt.temperature / 2 and report["temperature"] == new.temperature
    assert report["after"]["nll"] < report["before"]["nll"] and report["better_in_cv"]
    assert report["cv"]["refit"]["nll"] < report["cv"]["current"]["nll"] and len(report["cv"]["fold_temperatures"]) == 3
    assert report["n"] == 90 and report["source"] == "test"
    assert new.training["recalibration"] == report and "recalibration" not in blunt.training
    assert FusionParams.from_json(new.to_json()).temperature == new.temperature


def test_recalibration_refuses_what_it_cannot_calibrate():
    import dataclasses

    from echo_agent.training.fusion_fit import MIN_RECALIBRATION_RUNS, recalibrate_temperature

    fitted = _fitted()
    with pytest.raises(ValueError, match=f"at least {MIN_RECALIBRATION_RUNS}"):
        recalibrate_temperature(fitted, _records(10))
    one_class = [r for r in _records(90) if r.label == "benign"]
    with pytest.raises(ValueError, match="two classes"):
        recalibrate_temperature(fitted, one_class)
    odd = _records(30)
    odd[0].label = "cyst"
    with pytest.raises(ValueError, match="not the fusion's"):
        recalibrate_temperature(fitted, odd)
    rule = dataclasses.replace(fitted, kind=DETECTOR_RULE, rule_platt=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="Platt"):
        recalibrate_temperature(rule, _records(30))
    # runs of another detector: the fusion would step aside on them, so they cannot calibrate it
    foreign = dataclasses.replace(fitted, training={**fitted.training, "detectors": ["someone-else"]})
    with pytest.raises(ValueError, match="steps aside"):
        recalibrate_temperature(foreign, _records(30))


def test_a_candidate_is_rebuilt_from_the_name_the_cv_table_prints():
    from echo_agent.fusion import RULE_CALIBRATIONS
    from echo_agent.training.fusion_fit import FEATURE_SETS

    every = default_candidates(l2_grid=(0.5, 1.0, 100.0), rule_calibrations=RULE_CALIBRATIONS, feature_sets=FEATURE_SETS)
    for c in every:
        assert Candidate.from_name(c.name) == c
    assert Candidate.from_name("  logistic[all]   l2=10  balanced ") == Candidate("logistic", "all", 10.0, True)
    for bad in ("logistic[pixels] l2=1", "logistic[all] l2=0", "logistic[all]", "heuristic+sigmoid", ""):
        with pytest.raises(ValueError, match="fusion candidate"):
            Candidate.from_name(bad)
