"""Run the agent with a local Qwen2.5-VL / Qwen3-VL checkpoint through transformers (no server).

Needs the vlm extra:  pip install 'echo-agent[vlm]'
Run:  python examples/local_qwen_vl.py /models/Qwen3-VL-8B-Instruct [--adapter /runs/echo-lora]
"""

from __future__ import annotations

import argparse

from echo_agent import EchoAgent
from echo_agent.imaging import example_image
from echo_agent.reasoners.llm_finalizer import LLMFinalizer
from echo_agent.reasoners.qwen_vl import QwenVLChatModel
from echo_agent.tools import Toolkit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="local checkpoint directory")
    p.add_argument("--adapter", default=None, help="optional LoRA adapter directory (peft)")
    p.add_argument("--image", default=str(example_image("breast_malignant")))
    p.add_argument("--organ", default="breast")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="visual token budget of the processor")
    args = p.parse_args()

    toolkit = Toolkit()
    llm = QwenVLChatModel(
        model_path=args.checkpoint, adapter_path=args.adapter, device=args.device,
        max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels, image_store=toolkit.get_store(),
    ).load()
    agent = EchoAgent(reasoner=llm, finalizer=LLMFinalizer(llm), organ=args.organ, toolkit=toolkit)
    dx = agent.run(args.image, context={"age": 59, "symptoms": "palpable lump"})
    print(dx.label, round(dx.probability, 3), dx.category_system, dx.category, dx.box)
    print(dx.rationale)
    print("reasoner:", dx.reasoner, "| warnings:", dx.warnings)


if __name__ == "__main__":
    main()
