"""Run 7: a few val final prompts answered by the SFT checkpoint with free text and under the
decision schema (constrained decoding), beside the target.

    python docs/experiments/micro_policy/decode_check.py 4   # output: results/eval/micro_policy_run7/

Reads runs/micro_policy_run7/ (traces and the SFT checkpoint of the run in docs/training.md).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from echo_agent.organs import get_organ
from echo_agent.reasoners.decision import decision_schema
from echo_agent.reasoners.qwen_vl import QwenVLChatModel

RUN = "runs/micro_policy_run7"


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(b.get("text", "") for b in content if b.get("type") == "text")


if __name__ == "__main__":
    recs = [json.loads(line) for line in open(f"{RUN}/traces/val.jsonl")]
    finals = [r for r in recs if r["task"] == "agent_final"][: int(sys.argv[1]) if len(sys.argv) > 1 else 3]
    llm = QwenVLChatModel(model_path=f"{RUN}/sft/final", max_new_tokens=160, images_in_tool_messages=False,
                          device="cpu", dtype="float32")
    for r in finals:
        msgs: list[BaseMessage] = [SystemMessage(_text(m["content"])) if m["role"] == "system" else HumanMessage(_text(m["content"]))
                                   for m in r["messages"][:-1]]
        constrained = llm.with_structured_output(decision_schema(get_organ(r["organ"])), method="json_schema",
                                                 include_raw=True).invoke(msgs)
        print("TARGET ", _text(r["messages"][-1]["content"]))
        print("FREE   ", llm.invoke(msgs).content)
        print("SCHEMA ", getattr(constrained["raw"], "content", constrained["raw"]))
        print()
