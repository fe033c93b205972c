"""A "soup" of fine-tuned second-look classifiers: several seeds from one start, weights averaged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from echo_agent.eval.manifest import ManifestImage
from echo_agent.schemas import Box
from echo_agent.training.region_classifier import ClassifierTrainConfig, prepare_cases

LABELS = ["normal", "benign", "malignant"]


def test_soup_must_be_a_positive_count() -> None:
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="soup"):
            ClassifierTrainConfig(organ="breast", labels=LABELS, centers=["busi"], soup=bad)
    assert ClassifierTrainConfig(organ="breast", labels=LABELS, centers=["busi"]).soup == 1


def test_the_tool_refuses_a_soup_of_linear_probes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("organ: breast\nlabels: [normal, benign, malignant]\ncenters: [busi]\n")
    for args, why in ((["--soup", "2", "--linear-probe"], "linear probe"), (["--soup", "0"], "soup")):
        with pytest.raises(SystemExit):
            train_classifier.main([str(cfg), *args])
        assert why in capsys.readouterr().err


def test_average_weights_is_the_mean_of_the_float_tensors() -> None:
    torch = pytest.importorskip("torch")
    from echo_agent.training.region_classifier import average_weights

    def net(seed: int):  # noqa: ANN202
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        m.train()
        m(torch.randn(2, 3, 8, 8) * (seed + 1))  # different batch-norm statistics per network
        return m

    a, b, c = net(0), net(1), net(2)
    soup = average_weights([a.state_dict(), b.state_dict(), c.state_dict()])
    for k, v in soup.items():
        members = [m.state_dict()[k] for m in (a, b, c)]
        if v.is_floating_point():
            assert torch.allclose(v, (members[0] + members[1] + members[2]) / 3)
        else:  # the batch counter: the first network's
            assert torch.equal(v, members[0])
    assert not torch.allclose(soup["1.running_mean"], a.state_dict()["1.running_mean"])
    with pytest.raises(ValueError, match="layers or shapes"):
        average_weights([a.state_dict(), torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3)).state_dict()])
    with pytest.raises(ValueError, match="at least one"):
        average_weights([])


def _image(tmp_path: Path, name: str, label: str) -> ManifestImage:
    from echo_agent.imaging import save_png

    rng = np.random.default_rng(sum(map(ord, name)))
    g = rng.integers(60, 120, size=(120, 160), dtype=np.uint8)
    boxes: tuple[Box, ...] = ()
    if label != "normal":
        g[40:80, 60:100] = 20 if label == "benign" else 200
        boxes = (Box(x1=60, y1=40, x2=100, y2=80),)
    path = tmp_path / f"{name}.png"
    save_png(np.repeat(g[:, :, None], 3, axis=2), path)
    return ManifestImage(image=path, organ="breast", label=label, boxes=boxes, center="toy", group=name)


@pytest.mark.heavy
def test_a_soup_trains_its_members_and_ships_one_network(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.training.region_classifier import export_onnx, train_classifier

    images = [_image(tmp_path, f"i{i}", LABELS[i % 3]) for i in range(9)]
    cases = prepare_cases(images, LABELS)
    cfg = ClassifierTrainConfig(organ="breast", labels=LABELS, centers=["toy"], pretrained=False, input_size=64,
                                epochs=1, batch_size=8, threads=1, seed=3, soup=2)
    lines: list[str] = []
    model, report = train_classifier(cfg, cases[:6], cases[6:], log=lines.append)
    soup = report["soup"]
    assert soup["seeds"] == [3, 4] and len(soup["members"]) == 2
    assert all(m["epochs"] and "acc" in m["val_uncalibrated"] for m in soup["members"])
    assert "acc" in soup["val_uncalibrated"] and "acc" in report["val"] and report["temperature"] > 0
    assert any("soup member 2 of 2 (seed 4)" in s for s in lines)
    single_model, single = train_classifier(ClassifierTrainConfig(**{**cfg.__dict__, "soup": 1}), cases[:6], cases[6:],
                                            log=lambda s: None)
    assert "soup" not in single and "val_uncalibrated" not in single
    # the soup is not its first member: the averaged weights differ from seed 3's own
    head = [k for k in model.state_dict() if model.state_dict()[k].is_floating_point()][-1]
    assert not np.allclose(model.state_dict()[head].numpy(), single_model.state_dict()[head].numpy())
    path = export_onnx(model, tmp_path / "soup.onnx", cfg, report)
    clf = OnnxRegionClassifier(path)
    assert clf.labels == tuple(LABELS) and json.loads(json.dumps(clf.info))["config"]["soup"] == 2
    probs = clf.classify(cases[1].array, [None, *cases[1].boxes])  # a benign image: the whole and its box
    assert len(probs) == 2 and all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)


def test_the_trainers_check_the_cross_fitting_options_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train_classifier (both recipes) and the detectors' trainers share one check of --fold / --folds."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import train_classifier
        from train_detector import check_fold_args
    finally:
        sys.path.pop(0)
    ap = argparse.ArgumentParser()
    for fold, folds, out, why in ((1, None, True, "go together"), (3, 3, True, r"0\.\.2"), (0, 1, True, "at least 2"),
                                  (0, 3, False, "its own --output")):
        with pytest.raises(SystemExit):
            check_fold_args(ap, fold, folds, out)
        assert re.search(why, capsys.readouterr().err)
    check_fold_args(ap, 2, 3, True)
    check_fold_args(ap, None, None, False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("organ: breast\nlabels: [normal, benign, malignant]\ncenters: [busi]\n")
    mask = tmp_path / "m.yaml"
    mask.write_text("organ: breast\nlabels: [normal, lesion]\nlesion_labels: [benign, malignant]\ncenters: [busi]\n")
    for argv in ([str(cfg), "--fold", "0", "--folds", "3"], [str(mask), "--mask-supervised", "--fold", "5", "--folds", "3",
                                                             "--output", str(tmp_path / "x.onnx")]):
        with pytest.raises(SystemExit):
            train_classifier.main(argv)
        err = capsys.readouterr().err
        assert "its own --output" in err or "0..2" in err
    assert not (tmp_path / "x.onnx").exists()


def test_a_presence_model_never_defaults_to_the_packaged_second_look(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A mask-supervised model whose labels are not the organ's (a [normal, lesion] presence model) is
    refused without --output instead of being written over the organ's packaged classifier."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    packaged = Path(__file__).resolve().parents[1] / "echo_agent" / "assets" / "classifiers" / "breast.onnx"
    before = packaged.stat().st_mtime_ns
    cfg = tmp_path / "presence.yaml"
    cfg.write_text("organ: breast\nlabels: [normal, lesion]\nlesion_labels: [benign, malignant]\ncenters: [busi]\n")
    with pytest.raises(SystemExit):
        train_classifier.main([str(cfg), "--mask-supervised"])
    assert "pass --output" in capsys.readouterr().err and packaged.stat().st_mtime_ns == before


@pytest.mark.heavy
def test_the_time_budget_flag_means_the_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An epoch whose sample draw is larger than the first's ends when the one-cycle schedule is spent;
    that is not a stop by the time budget (the flag once said so for runs well inside their budget)."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from echo_agent.training import region_classifier as rc

    draws = iter(range(100))
    real = rc.build_samples

    def growing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        samples = real(*args, **kwargs)
        return samples + samples[:3] * next(draws)  # the first draw as is, later ones larger

    monkeypatch.setattr(rc, "build_samples", growing)
    images = [_image(tmp_path, f"i{i}", LABELS[i % 3]) for i in range(9)]
    cases = prepare_cases(images, LABELS)
    cfg = ClassifierTrainConfig(organ="breast", labels=LABELS, centers=["toy"], pretrained=False, input_size=64,
                                epochs=2, batch_size=4, threads=1, seed=0, max_minutes=30)
    _, report = rc.train_classifier(cfg, cases[:6], cases[6:], log=lambda s: None)
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["stopped_by_time_budget"] is False
    draws = iter(range(100))
    _, report = rc.train_classifier(ClassifierTrainConfig(**{**cfg.__dict__, "max_minutes": 0.0}), cases[:6], cases[6:],
                                    log=lambda s: None)
    assert report["stopped_by_time_budget"] is True and len(report["epochs"]) == 1


@pytest.mark.heavy
def test_a_model_over_the_size_bound_keeps_its_file_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An experiment's model over the packaged 15 MB bound (a larger backbone) is an error (exit 1), but
    its ONNX file and training report stay, so the run is not lost."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    images = [_image(tmp_path, f"i{i}", LABELS[i % 3]) for i in range(9)]
    monkeypatch.setattr(train_classifier, "_split_images", lambda cfg, args: (images[:6], images[6:]))
    monkeypatch.setattr(train_classifier, "MAX_ONNX_BYTES", 1024)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("organ: breast\nlabels: [normal, benign, malignant]\ncenters: [toy]\npretrained: false\n"
                   "input_size: 64\nepochs: 1\nbatch_size: 8\n")
    out = tmp_path / "big.onnx"
    assert train_classifier.main([str(cfg), "--threads", "1", "--output", str(out)]) == 1
    assert "the packaged bound (file and report kept)" in capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and report["bytes"] == out.stat().st_size > 1024 and report["epochs"]
