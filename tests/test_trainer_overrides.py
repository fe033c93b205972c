"""``--set KEY=VALUE`` on the trainers that read a dataclass config: applied on top of the file, checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from echo_agent.training.mask_classifier import MaskClassifierTrainConfig
from echo_agent.training.region_classifier import ClassifierTrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls, config", [(ClassifierTrainConfig, "configs/classifier/breast_busi_only.yaml"),
                                          (MaskClassifierTrainConfig, "configs/classifier/kidney_mask.yaml")])
def test_classifier_configs_take_overrides(cls: type, config: str) -> None:
    base = cls.from_yaml(REPO / config)
    cfg = cls.from_yaml(REPO / config, ["seed=7", "centers=[busi]"])
    assert (cfg.seed, cfg.centers) == (7, ["busi"]) and base.seed != 7
    with pytest.raises(ValueError, match=f"unknown {cls.__name__} field"):
        cls.from_yaml(REPO / config, ["sed=7"])


@pytest.mark.parametrize("extra", [[], ["--mask-supervised"]])
def test_the_classifier_trainer_refuses_an_unknown_field_before_reading_data(extra: list[str], tmp_path: Path) -> None:
    config = "configs/classifier/kidney_mask.yaml" if extra else "configs/classifier/kidney.yaml"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_classifier.py"), str(REPO / config), *extra,
                           "--set", "marginn=0.5", "--output", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "field(s) ['marginn']" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "x.onnx").exists()
