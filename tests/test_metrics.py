"""Metric rules on hand-computed cases, plus property checks (docs/metrics.md has the definitions)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_agent.eval.metrics import (
    PredictedBox,
    ScoredImage,
    auc_score,
    bootstrap_intervals,
    calibration_score,
    classification_score,
    compute_metrics,
    default_negative_label,
    detection_score,
    image_counts,
    match_boxes,
    referral_score,
)
from echo_agent.schemas import Box

BREAST = ("normal", "benign", "malignant")
KIDNEY = ("normal", "hydronephrosis")


def B(x1: float, y1: float, x2: float, y2: float) -> Box:
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


def P(box: Box, label: str, score: float) -> PredictedBox:
    return PredictedBox(box, label, score)


def img(key, true_label, true_boxes=(), pred_label="normal", pred_boxes=(), **kw) -> ScoredImage:
    return ScoredImage(key, true_label, tuple(true_boxes), pred_label, tuple(pred_boxes), **kw)


# -- matching ------------------------------------------------------------------------------------
def test_iou_threshold_is_inclusive():
    # gt 0..10 x 0..10 (area 100); pred 0..10 x 0..5 -> IoU exactly 0.5
    gt = [B(0, 0, 10, 10)]
    m = match_boxes([P(B(0, 0, 10, 5), "benign", 0.9)], gt, 0.5)
    assert [(p, g) for p, g, _ in m.pairs] == [(0, 0)]
    assert m.pairs[0][2] == pytest.approx(0.5)
    m = match_boxes([P(B(0, 0, 10, 4.99), "benign", 0.9)], gt, 0.5)
    assert m.pairs == () and m.unmatched_pred == (0,) and m.unmatched_gt == (0,)


def test_higher_score_claims_the_lesion_first():
    gt = [B(0, 0, 10, 10)]
    # the better-overlapping box has the lower score: greedy-by-score gives the lesion to the other one
    preds = [P(B(0, 0, 10, 10), "benign", 0.3), P(B(0, 0, 10, 6), "benign", 0.8)]
    m = match_boxes(preds, gt)
    assert [(p, g) for p, g, _ in m.pairs] == [(1, 0)]
    assert m.unmatched_pred == (0,)


def test_duplicate_boxes_one_tp_rest_fp():
    gt = [B(0, 0, 10, 10)]
    preds = [P(B(0, 0, 10, 10), "benign", 0.9)] * 3
    assert image_counts(img("a", "benign", gt, "benign", preds)) == (1, 2, 0)


def test_score_ties_keep_input_order():
    gt = [B(0, 0, 10, 10)]
    preds = [P(B(0, 0, 10, 8), "benign", 0.5), P(B(0, 0, 10, 10), "benign", 0.5)]
    m = match_boxes(preds, gt)
    assert [(p, g) for p, g, _ in m.pairs] == [(0, 0)]  # first of the tie wins, even with lower IoU


def test_pred_takes_its_best_remaining_gt():
    gts = [B(0, 0, 10, 10), B(2, 0, 12, 10)]
    # pred overlaps gt0 with IoU 8/12 and gt1 with IoU 1.0 -> takes gt1; second pred then gets gt0
    preds = [P(B(2, 0, 12, 10), "benign", 0.9), P(B(0, 0, 9, 10), "benign", 0.8)]
    m = match_boxes(preds, gts)
    assert sorted((p, g) for p, g, _ in m.pairs) == [(0, 1), (1, 0)]
    assert image_counts(img("a", "benign", gts, "benign", preds)) == (2, 0, 0)


def test_one_box_cannot_match_two_lesions():
    gts = [B(0, 0, 10, 10), B(0, 0, 10, 10)]
    assert image_counts(img("a", "benign", gts, "benign", [P(B(0, 0, 10, 10), "benign", 0.9)])) == (1, 0, 1)


# -- localization / grounded F1 --------------------------------------------------------------------
def _dataset():
    gt_a = [B(0, 0, 10, 10), B(20, 20, 30, 30)]
    return [
        # 2 lesions: one found with the right label, one missed; one stray box -> TP1 FP1 FN1
        img("a", "malignant", gt_a, "malignant",
            [P(B(0, 0, 10, 10), "malignant", 0.9), P(B(50, 50, 60, 60), "malignant", 0.4)]),
        # 1 lesion found, wrong label -> loc TP1; grounded FP1 FN1
        img("b", "benign", [B(0, 0, 10, 10)], "malignant", [P(B(1, 1, 10, 10), "malignant", 0.7)]),
        # lesion-free image with a box -> FP1 for both
        img("c", "normal", [], "benign", [P(B(0, 0, 5, 5), "benign", 0.3)]),
        # lesion-free, nothing reported -> nothing
        img("d", "normal", [], "normal", []),
        # lesion label but no box (unannotated) -> left out of box scoring
        img("e", "benign", [], "benign", [P(B(0, 0, 5, 5), "benign", 0.9)]),
    ]


def test_localization_counts_by_hand():
    s = detection_score(_dataset())
    assert (s.tp, s.fp, s.fn) == (2, 2, 1)
    assert s.precision == pytest.approx(2 / 4)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert s.n_images == 4 and s.n_skipped_unannotated == 1


def test_grounded_counts_by_hand():
    s = detection_score(_dataset(), grounded=True)
    # a: TP1 FP1 FN1; b: TP0 FP1 FN1; c: FP1
    assert (s.tp, s.fp, s.fn) == (1, 3, 2)
    assert s.f1 == pytest.approx(2 / (2 + 3 + 2))


def test_grounded_uses_label_blind_matching():
    # a wrong-label box with the higher score takes the lesion; the right-label box stays a FP
    gt = [B(0, 0, 10, 10)]
    preds = [P(B(0, 0, 10, 10), "benign", 0.9), P(B(0, 0, 10, 10), "malignant", 0.6)]
    assert image_counts(img("a", "malignant", gt, "benign", preds), grounded=True) == (0, 2, 1)
    assert image_counts(img("a", "malignant", gt, "benign", preds)) == (1, 1, 0)


def test_kidney_box_label_is_the_image_label():
    gt = [B(0, 0, 10, 10)]
    im = img("k", "hydronephrosis", gt, "hydronephrosis", [P(B(0, 0, 10, 10), "hydronephrosis", 0.8)])
    assert image_counts(im, grounded=True) == (1, 0, 0)


def test_nothing_to_score_gives_none():
    s = detection_score([img("d", "normal")])
    assert (s.tp, s.fp, s.fn, s.f1, s.precision, s.recall) == (0, 0, 0, None, None, None)


# -- classification --------------------------------------------------------------------------------
def test_classification_by_hand():
    y_true = ["normal", "normal", "benign", "benign", "benign", "malignant"]
    y_pred = ["normal", "benign", "benign", "benign", "malignant", "malignant"]
    c = classification_score(y_true, y_pred, BREAST)
    assert c.accuracy == pytest.approx(4 / 6)
    rec = {p.label: p.recall for p in c.per_class}
    assert rec == pytest.approx({"normal": 0.5, "benign": 2 / 3, "malignant": 1.0})
    assert c.balanced_accuracy == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert c.confusion.matrix == ((1, 1, 0), (0, 2, 1), (0, 0, 1))
    assert [p.predicted for p in c.per_class] == [1, 3, 2]


def test_balanced_accuracy_ignores_absent_classes():
    c = classification_score(["benign", "benign"], ["benign", "malignant"], BREAST)
    assert c.balanced_accuracy == pytest.approx(0.5)
    assert {p.label: p.recall for p in c.per_class}["normal"] is None


def test_unknown_label_names_it():
    with pytest.raises(ValueError, match="'cyst'"):
        classification_score(["benign"], ["cyst"], BREAST)


# -- AUC -------------------------------------------------------------------------------------------
def test_auc_restricted_to_benign_vs_malignant():
    y = ["normal", "benign", "benign", "malignant", "malignant"]
    # the normal image's high score would hurt the AUC if it were counted
    s = [0.99, 0.1, 0.6, 0.5, 0.9]
    a = auc_score(y, s, "malignant", "benign")
    # pairs (m, b): (0.5,0.1)=1 (0.5,0.6)=0 (0.9,0.1)=1 (0.9,0.6)=1 -> 3/4
    assert a.value == pytest.approx(0.75)
    assert (a.n_positive, a.n_negative) == (2, 2)


def test_auc_ties_count_half():
    a = auc_score(["normal", "hydronephrosis"], [0.5, 0.5], "hydronephrosis", "normal")
    assert a.value == pytest.approx(0.5)


def test_auc_single_class_gives_reason():
    a = auc_score(["benign", "benign", "normal"], [0.1, 0.2, 0.3], "malignant", "benign")
    assert a.value is None and a.reason == "needs 'malignant' and 'benign' images, got 0 and 2"


def test_auc_missing_score_gives_reason():
    a = auc_score(["benign", "malignant"], [0.1, None], "malignant", "benign")
    assert a.value is None and "score" in a.reason


def test_default_negative_label():
    assert default_negative_label(BREAST, "malignant", "normal") == "benign"
    assert default_negative_label(KIDNEY, "hydronephrosis", "normal") == "normal"


# -- calibration -----------------------------------------------------------------------------------
def test_ece_and_brier_by_hand():
    y = ["normal", "hydronephrosis", "normal", "hydronephrosis"]
    probs = [
        {"normal": 0.9, "hydronephrosis": 0.1},  # conf .9 correct
        {"normal": 0.2, "hydronephrosis": 0.8},  # conf .8 correct
        {"normal": 0.3, "hydronephrosis": 0.7},  # conf .7 wrong
        {"normal": 0.6, "hydronephrosis": 0.4},  # conf .6 wrong
    ]
    c = calibration_score(y, probs, KIDNEY, n_bins=15)
    # bins of width 1/15, bin b = (b/15, (b+1)/15]: .9 -> bin 13, .8 -> bin 11, .7 -> bin 10, .6 -> bin 8
    counts = {i: b.count for i, b in enumerate(c.bins) if b.count}
    assert counts == {13: 1, 11: 1, 10: 1, 8: 1}
    assert c.ece == pytest.approx((0.1 + 0.2 + 0.7 + 0.6) / 4)
    # per image sum_k (p_k - onehot_k)^2: .02, .08, .98 (0.7^2 + 0.7^2), .72 (0.6^2 + 0.6^2)
    brier = (0.02 + 0.08 + 0.98 + 0.72) / 4
    assert c.brier == pytest.approx(brier)
    # true-label probabilities .9, .8, .3, .4
    assert c.log_loss == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.3) + math.log(0.4)) / 4)


def test_ece_same_bin_averages_before_difference():
    y = ["normal", "normal"]
    probs = [{"normal": 0.95, "hydronephrosis": 0.05}, {"normal": 0.05, "hydronephrosis": 0.95}]
    c = calibration_score(y, probs, KIDNEY, n_bins=10)
    # both in bin (0.9, 1.0]: mean conf .95, accuracy .5 -> ECE .45
    assert c.ece == pytest.approx(0.45)
    assert c.bins[9].count == 2 and c.bins[9].accuracy == pytest.approx(0.5)


def test_ece_bin_edges_are_upper_inclusive():
    c = calibration_score(["normal"], [{"normal": 0.5, "hydronephrosis": 0.5}], KIDNEY, n_bins=2)
    assert [b.count for b in c.bins] == [1, 0]  # 0.5 belongs to (0, 0.5]


# -- bootstrap -------------------------------------------------------------------------------------
def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    data = [img(f"i{i}", "benign" if i % 3 else "normal", pred_label="benign" if i % 2 else "normal")
            for i in range(40)]
    a = bootstrap_intervals(data, BREAST, n_boot=300, seed=3)
    b = bootstrap_intervals(data, BREAST, n_boot=300, seed=3)
    assert a == b
    acc = classification_score([d.true_label for d in data], [d.pred_label for d in data], BREAST).accuracy
    assert a["accuracy"].low <= acc <= a["accuracy"].high
    assert a["accuracy"].low < a["accuracy"].high
    assert a["localization_f1"] is None or a["localization_f1"].unit == "image"


def test_bootstrap_resamples_whole_clusters():
    # two clusters: all-correct and all-wrong. Cluster resampling can only give 0, .5 or 1 accuracy.
    data = [img(f"a{i}", "benign", pred_label="benign", cluster="A") for i in range(10)]
    data += [img(f"b{i}", "benign", pred_label="normal", cluster="B") for i in range(10)]
    ci = bootstrap_intervals(data, BREAST, n_boot=400, seed=0)["accuracy"]
    assert ci.unit == "cluster"
    assert (ci.low, ci.high) == (0.0, 1.0)
    per_image = bootstrap_intervals([img(d.key, d.true_label, pred_label=d.pred_label) for d in data],
                                    BREAST, n_boot=400, seed=0)["accuracy"]
    assert per_image.high - per_image.low < 0.6  # images independent: much narrower


# -- compute_metrics -------------------------------------------------------------------------------
def test_compute_metrics_wires_everything():
    data = _dataset()
    m = compute_metrics(data, labels=BREAST, positive_label="malignant", n_boot=50)
    assert (m.localization.tp, m.grounded.tp) == (2, 1)
    assert m.classification.accuracy == pytest.approx(3 / 5)  # a, d, e correct
    assert m.calibration is None and "probability" in m.calibration_reason
    assert m.auc.value is None  # no scores given
    assert m.notes and "no box" in m.notes[0]
    d = m.to_dict()
    assert d["localization"]["ci"]["n_boot"] == 50
    assert d["classification"]["confusion"]["labels"] == list(BREAST)


def test_referral_counts_by_hand():
    conflict = "evidence conflict: read as normal, but the top candidate shows 4 of 4 malignant features (...)"
    rows = [
        img("a", "malignant", pred_label="normal", indeterminate=True, indeterminate_reason=conflict),
        img("b", "malignant", pred_label="benign", indeterminate=False),  # a miss nobody is warned about
        img("c", "malignant", pred_label="malignant", indeterminate=False),
        img("d", "benign", pred_label="benign", indeterminate=True,
            indeterminate_reason="calibrated top probability 0.41 < 0.50"),
        img("e", "normal", pred_label="normal", indeterminate=False),
    ]
    r = referral_score(rows, "malignant")
    assert (r.n_images, r.n_referred) == (5, 2) and r.referred_rate == pytest.approx(0.4)
    assert r.accuracy_kept == pytest.approx(2 / 3) and r.accuracy_referred == pytest.approx(1 / 2)
    assert (r.positive_missed_kept, r.positive_missed_referred) == (1, 1)
    assert r.by_reason == {"calibrated top probability": 1, "evidence conflict": 1}
    # a system without the notion (the detector-only baseline) gets no referral score
    assert referral_score([img("x", "normal")], "malignant") is None
    m = compute_metrics(rows, labels=BREAST, positive_label="malignant", n_boot=20)
    assert m.referral == r and m.to_dict()["referral"]["n_referred"] == 2
    assert compute_metrics([img("x", "normal")], labels=BREAST, positive_label="malignant", n_boot=20).referral is None


# -- properties ------------------------------------------------------------------------------------
coords = st.floats(0, 100, allow_nan=False)


@st.composite
def boxes(draw):
    x1, y1 = draw(coords), draw(coords)
    w, h = draw(st.floats(1, 50)), draw(st.floats(1, 50))
    return B(x1, y1, x1 + w, y1 + h)


@st.composite
def images(draw):
    n = draw(st.integers(0, 6))
    out = []
    for i in range(n):
        label = draw(st.sampled_from(BREAST))
        gts = draw(st.lists(boxes(), max_size=3)) if label != "normal" else []
        preds = draw(st.lists(st.builds(P, boxes(), st.sampled_from(BREAST[1:]), st.floats(0, 1)), max_size=4))
        out.append(img(f"k{i}", label, gts, draw(st.sampled_from(BREAST)), preds))
    return out


@settings(max_examples=60, deadline=None)
@given(images(), st.randoms(use_true_random=False))
def test_f1_bounded_and_permutation_invariant(data, rnd):
    s = detection_score(data)
    g = detection_score(data, grounded=True)
    for x in (s.f1, g.f1):
        assert x is None or 0.0 <= x <= 1.0
    assert g.tp <= s.tp
    shuffled = list(data)
    rnd.shuffle(shuffled)
    assert detection_score(shuffled) == s
    shuffled_boxes = [img(d.key, d.true_label, d.true_boxes[::-1], d.pred_label, d.pred_boxes) for d in data]
    assert detection_score(shuffled_boxes).tp == s.tp


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(BREAST), st.lists(boxes(), min_size=1, max_size=3)), min_size=1, max_size=6))
def test_perfect_predictions_score_one(rows):
    data = []
    for i, (label, gts) in enumerate(rows):
        gts = gts if label != "normal" else []
        probs = {lbl: float(lbl == label) for lbl in BREAST}
        data.append(img(f"k{i}", label, gts, label, [P(g, label, 0.9) for g in gts],
                        probabilities=probs, positive_score=float(label == "malignant")))
    m = compute_metrics(data, labels=BREAST, positive_label="malignant", n_boot=20)
    assert m.classification.accuracy == 1.0 and m.classification.balanced_accuracy == 1.0
    assert m.localization.f1 in (1.0, None) and m.grounded.f1 in (1.0, None)
    assert m.localization.fp == 0 and m.localization.fn == 0
    assert m.calibration.ece == pytest.approx(0.0) and m.calibration.brier == pytest.approx(0.0)
    assert m.auc.value in (1.0, None)
    if m.auc.value is None:
        assert m.auc.reason


def test_to_dict_has_no_nan():
    m = compute_metrics([], labels=KIDNEY, positive_label="hydronephrosis", n_boot=10)
    d = m.to_dict()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            assert math.isfinite(x)

    walk(d)


def test_category_agreement_by_hand():
    from echo_agent.eval.metrics import category_agreement

    order = ["1", "2", "3", "4A", "4B", "4C", "5"]
    a = category_agreement(["4a", "5", "3", "2", None, "4C"], ["4A", "4C", "1", None, "5", "4c"], order)
    assert a.n == 5 and a.n_missing == 1  # the None reader category is left out; the None prediction counts
    assert a.exact == 2 / 5 and a.within_one == 3 / 5
    assert a.confusion[order.index("5")][order.index("4C")] == 1
    empty = category_agreement([None], ["5"], order)
    assert empty.n == 0 and empty.exact is None


def test_category_agreement_with_coarse_and_unknown_reader_categories():
    from echo_agent.eval.metrics import category_agreement, coarse_categories

    order = ["1", "2", "3", "4A", "4B", "4C", "5"]
    assert coarse_categories(order) == {"4": ("4A", "4B", "4C")}
    assert coarse_categories(["2", "3", "4A", "4B", "4", "5"]) == {}  # 4 is a step itself: not coarse
    truth = ["4", "4", "4", "4", "BI-RADS 4", "6", "0", "6", "3"]
    pred = ["4B", "5", "3", "2", None, "5", "4A", "4C", "4A"]
    a = category_agreement(truth, pred, order)
    # the 4s: 4B exact, 5 and 3 one merged step away, 2 two away, None missing; 3 vs 4A is one step
    assert (a.n, a.n_coarse, a.n_missing) == (6, 5, 1)
    assert a.exact == 1 / 6 and a.within_one == 4 / 6
    assert a.unscored == (("0", 1), ("6", 2))
    assert a.reader_order == ("1", "2", "3", "4", "4A", "4B", "4C", "5")
    assert a.confusion[a.reader_order.index("4")] == (0, 1, 1, 0, 1, 0, 1)
    plain = category_agreement(["4a"], ["4A"], order)
    assert plain.reader_order == tuple(order) and plain.n_coarse == 0 and plain.unscored == ()
