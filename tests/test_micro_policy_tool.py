"""tools/train_micro_policy.py, shortened: traces -> tiny model -> SFT -> eval in the agent -> GRPO
-> reward measure, on a synthetic manifest (no ../shared/data needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from test_curriculum import synthetic_manifest  # noqa: E402

pytestmark = [pytest.mark.heavy, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("answer", ["diagnosis", "decision"])
def test_micro_policy_pipeline_shortened(tmp_path: Path, answer: str) -> None:
    manifest = synthetic_manifest(tmp_path / "data", size=(96, 72))
    out = tmp_path / "run"
    args = [
        "--out", str(out), "--manifest", str(manifest), "--train-images", "2", "--val-images", "1",
        "--vocab-size", "500", "--text-hidden", "32", "--text-layers", "1", "--max-positions", "8192",
        "--sft-set", "max_steps=3", "--sft-set", "num_train_epochs=1", "--max-new-tokens", "8",
        "--grpo-seeds", "0", "--grpo-set", "max_steps=1", "--grpo-set", "num_generations=2",
        "--grpo-set", "per_device_train_batch_size=2", "--grpo-set", "max_completion_length=8",
        "--reward-prompts", "1", "--reward-samples", "2", "--plot", str(out / "curves.png"), "--answer", answer,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_micro_policy.py"), *args], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    # traces of both organs from train images only; val images only in the val file
    train = [json.loads(x) for x in (out / "traces" / "train.jsonl").read_text().splitlines()]
    assert {r["split"] for r in train} == {"train"} and {r["organ"] for r in train} == {"breast", "kidney"}
    assert {r["task"] for r in train} == {"agent_trace", "agent_final"}
    finals = [json.loads(r["messages"][-1]["content"] if isinstance(r["messages"][-1]["content"], str)
                         else r["messages"][-1]["content"][0]["text"]) for r in train if r["task"] == "agent_final"]
    assert finals and all(("probabilities" in f) == (answer == "diagnosis") for f in finals)
    assert res["sft"]["steps"] == 3 and res["model"]["text_layers"] == 1
    # both agents ran on the same val images, and the micro agent's validity was measured on every run
    ev = res["eval_sft"]
    assert set(ev["embedded"]) == {"breast", "kidney"}
    v = ev["micro_sft"]["validity"]
    assert v["runs"] == 2 and 0.0 <= v["valid_diagnosis_rate"] <= 1.0
    g = res["grpo"]["0"]
    assert g["steps"] == 1 and g["curve"] and "val_reward" in g and res["reward_sft"]["n"] == 1
    sampled = res["reward_sft_sampled"]
    assert sampled["samples"] == 2 and sampled["n"] == 1 and "val_reward_sampled" in g
    assert (out / "curves.png").is_file()
    assert res["timings_s"]["sft_s"] > 0
    # a checkpoint's rewards measured again on their own: the same numbers (greedy, and seeded samples)
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "train_micro_policy.py"), "--out", str(out),
                            "--reward-prompts", "1", "--reward-samples", "2", "--grpo-set", "max_completion_length=8",
                            "--reward-checkpoint", "sft", str(out / "sft" / "final")],
                           capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    assert res2["grpo"] == res["grpo"]  # the run's results are kept
    assert res2["rewards_sft"]["greedy"]["mean_reward"] == res["reward_sft"]["mean_reward"]
    assert res2["rewards_sft"]["sampled"]["mean_reward"] == sampled["mean_reward"]
