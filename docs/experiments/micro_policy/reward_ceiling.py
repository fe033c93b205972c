"""How much val reward is there above the answers the micro policy imitates? (addendum 9, run 12)

    python docs/experiments/micro_policy/reward_ceiling.py runs/micro_policy_run12/traces/val.jsonl

Scores, with the reward weights run 10-12 trained on, three answer sets to the 120 val
``agent_final`` prompts, no model involved:

* **reference**: the SFT targets (the embedded agent's fused decision and the candidates it cites),
  which a perfect imitator of the traces would write;
* **truth label**: the reference with its label (and each finding's label) replaced by the ground
  truth (no finding where the truth is normal), so only the classification can change;
* **oracle**: per prompt, the best-scoring answer among the organ's labels x (no finding, or one
  finding citing one of the prompt's candidates) -- the most an answer built from the tools'
  candidates can score.

The gap between reference and oracle is the room GRPO has; the gap reached without ground truth is
bounded by what the policy can read from its prompt better than the fusion did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from echo_agent.organs import get_organ
from echo_agent.training.answer_rewards import score_answers
from echo_agent.training.curriculum import read_jsonl
from echo_agent.training.rewards import final_text, get_preset

WEIGHTS = {"localization": 0.5, "shape": 0.25, "classification": 2.0, "tool_cost": 0.5, "format": 1.0,
           "valid_tool_calls": 1.0}


def answer(label: str, ids: list[str], normal: str) -> str:
    findings = [] if label == normal else [{"label": label, "detection_ids": ids}] if ids else []
    why = f"{label}; " + (f"strongest finding {label} at {ids[0]}." if findings else "no finding.")
    return json.dumps({"label": label, "findings": findings, "rationale": why, "indeterminate": False},
                      separators=(",", ":"))


def main(val_file: str) -> None:
    path = Path(val_file)
    recs = [r for r in read_jsonl(path) if r["task"] == "agent_final"]
    preset = get_preset(WEIGHTS)
    truths = [json.loads(r["truth"]) if isinstance(r["truth"], str) else r["truth"] for r in recs]
    normals = [get_organ(r["organ"]).normal_label for r in recs]
    truth_label = []
    for r, t, normal in zip(recs, truths, normals, strict=True):
        ref = json.loads(final_text(r["messages"]))
        findings = [] if t["label"] == normal else [dict(f, label=t["label"]) for f in ref["findings"]]
        truth_label.append(json.dumps(dict(ref, label=t["label"], findings=findings), separators=(",", ":")))
    scores = {"reference": score_answers(recs, [[final_text(r["messages"])] for r in recs], path.parent, preset),
              "truth label": score_answers(recs, [[t] for t in truth_label], path.parent, preset)}
    best = []
    for r, t, normal in zip(recs, truths, normals, strict=True):
        labels = get_organ(r["organ"]).image_labels
        ids = list((t.get("detections") or {}).keys())
        options = [answer(lab, [i], normal) for lab in labels for i in ids] + [answer(lab, [], normal) for lab in labels]
        best.append(max(score_answers([r], [options], path.parent, preset).per_prompt[0]))
    n = len(recs)
    print(f"{n} val agent_final prompts ({sum(r['organ'] == 'breast' for r in recs)} breast)")
    for name, s in scores.items():
        print(f"{name:12s} mean reward {s.mean:.4f}  terms " + ", ".join(f"{k} {v:.3f}" for k, v in s.terms.items()))
    print(f"{'oracle':12s} mean reward {sum(best) / n:.4f}")
    ref_per = [x[0] for x in scores["reference"].per_prompt]
    print(f"prompts where the oracle beats the reference by > 0.01: {sum(b > r + 0.01 for b, r in zip(best, ref_per))} of {n}")


if __name__ == "__main__":
    main(sys.argv[1])
