"""How a linear-probe second look chooses its regularisation (``probe_cs``, ``probe_c_selection``).

The backbone is replaced by a cheap feature function, so these run without torch; what is checked is
the choice of C: on the val split, or by held-out log-loss over folds of the training cases' groups
(frames of one clip never on both sides), and the warning when the choice sits at the grid's edge.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from echo_agent.training.region_classifier import ClassifierTrainConfig, PreparedCase

pytest.importorskip("sklearn")


def _config(**kw) -> ClassifierTrainConfig:
    return ClassifierTrainConfig(organ="kidney", labels=["normal", "hydronephrosis"], centers=["x"], **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"probe_c_selection": "test"}, "probe_c_selection"),
    ({"probe_cs": []}, "probe_cs"),
    ({"probe_cs": [0.1, 0.0]}, "probe_cs"),
])
def test_probe_options_are_checked(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_grouped_cv_keeps_a_groups_samples_on_one_side() -> None:
    """Each group has its own label and an identity feature, nothing else: a weakly regularised fit
    memorises the identities, which a split by sample would reward (log-loss far below chance) and
    a split by group does not."""
    from echo_agent.training.linear_probe import grouped_cv_log_loss

    rng = np.random.default_rng(0)
    n_groups, per = 40, 10
    groups = [f"clip{g}" for g in range(n_groups) for _ in range(per)]
    y = np.repeat(rng.permutation(np.arange(n_groups) % 2), per)  # constant within each group
    x = np.eye(n_groups)[[g for g in range(n_groups) for _ in range(per)]] + rng.normal(scale=0.05, size=(len(y), n_groups))
    plain = np.ones(len(y), bool)
    grouped = grouped_cv_log_loss(100.0, x, y, groups, plain, 2, "balanced")
    assert grouped > 0.6  # chance is log 2 = 0.69: nothing carries over between clips
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import KFold, cross_val_predict

    by_sample = log_loss(y, cross_val_predict(LogisticRegression(C=100.0, max_iter=2000), x, y,
                                              cv=KFold(3, shuffle=True, random_state=0), method="predict_proba"))
    assert by_sample < 0.3  # the leak a per-sample split would have rewarded


def test_grouped_cv_needs_two_classes() -> None:
    from echo_agent.training.linear_probe import grouped_cv_log_loss

    x = np.zeros((6, 2))
    with pytest.raises(ValueError, match="two classes"):
        grouped_cv_log_loss(1.0, x, np.zeros(6, int), list("aabbcc"), np.ones(6, bool), 2, None)


class _FakeFeatures:
    """Stands in for the frozen backbone: the crop's mean grey level plus noise, deterministic."""

    def __init__(self, *, input_size: int = 224, threads: int | None = None) -> None:
        self.input_size = input_size

    def of_samples(self, cases, samples, margin, rng=None, acquisition_p=0.0) -> np.ndarray:
        out = []
        for ci, _box, label, _kind in samples:
            noise = np.random.default_rng(hash((cases[ci].key, rng is None)) % 2**32).normal(size=4)
            out.append(np.r_[cases[ci].array.mean() / 255 + 0.3 * label, noise])
        return np.asarray(out)


def _cases(n: int, seed: int) -> list[PreparedCase]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        label = i % 2
        arr = rng.integers(60, 120, (64, 64, 3)).astype(np.uint8)
        cases.append(PreparedCase(key=f"s{seed}-{i}", group=f"g{seed}-{i // 3}", array=arr, label=label))
    return cases


@pytest.mark.parametrize("selection", ["val", "grouped_cv"])
def test_the_probe_takes_the_c_its_selection_scores_best_and_says_when_it_is_at_the_edge(monkeypatch, selection) -> None:
    from echo_agent.training import linear_probe

    monkeypatch.setattr(linear_probe, "Lite0Features", _FakeFeatures)
    lines: list[str] = []
    cfg = _config(probe_c_selection=selection, probe_cs=[1e-4, 1e-2, 1.0], background_per_image=0)
    _, weight, bias, report = linear_probe.train_linear_probe(cfg, _cases(48, 0), _cases(24, 1), log=lines.append)
    rows = [json.loads(line) for line in lines if line.startswith('{"C"')]
    key = "cv_log_loss" if selection == "grouped_cv" else "val_log_loss"
    assert [r["C"] for r in rows] == [1e-4, 1e-2, 1.0]
    assert all(("cv_log_loss" in r) == (selection == "grouped_cv") for r in rows)
    assert report["C"] == min(rows, key=lambda r: r[key])["C"]
    assert report["C_selection"] == selection and report["C_grid"] == [1e-4, 1e-2, 1.0]
    assert report["C_at_grid_edge"] == (report["C"] in (1e-4, 1.0))
    assert any(line.startswith("warning: C =") for line in lines) == report["C_at_grid_edge"]
    assert weight.shape == (2, 5) and bias.shape == (2,)
    meta = linear_probe.probe_metadata(cfg, report)["probe"]
    assert meta["C_selection"] == selection and ("cv_log_loss" in meta) == (selection == "grouped_cv")
