"""Run the agent with a multimodal LLM served behind an OpenAI-compatible endpoint (vLLM, SGLang, ...).

Start a server first (see docs/mllm.md), e.g.:

    vllm serve Qwen/Qwen3-VL-8B-Instruct --served-model-name qwen3-vl \
        --enable-auto-tool-choice --tool-call-parser hermes --max-model-len 32768

Run:  python examples/qwen_vl_endpoint.py --base-url http://localhost:8000/v1 --model qwen3-vl
"""

from __future__ import annotations

import argparse

from echo_agent import EchoAgent
from echo_agent.imaging import example_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--model", default="qwen3-vl", help="the served model name")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--image", default=str(example_image("breast_malignant")))
    p.add_argument("--organ", default="breast")
    p.add_argument("--no-tool-images", action="store_true",
                   help="for servers that reject images inside tool messages")
    p.add_argument("--qwen2-5", action="store_true", help="the model is Qwen2.5-VL (absolute-pixel boxes)")
    args = p.parse_args()

    agent = EchoAgent.from_endpoint(
        args.base_url, args.model, api_key=args.api_key, organ=args.organ,
        images_in_tool_messages=not args.no_tool_images,
        box_convention="absolute" if args.qwen2_5 else "relative1000",
    )
    for event in agent.stream(args.image, context={"age": 59, "symptoms": "palpable lump"}):
        print(f"{event.step:2d} {event.type:12s}", getattr(event, "name", "") or "")
        if event.type == "diagnosis":
            dx = event.diagnosis
            print(dx.label, round(dx.probability, 3), dx.category_system, dx.category, dx.box)
            print(dx.rationale)
            if dx.indeterminate:
                print("indeterminate:", dx.indeterminate_reason)


if __name__ == "__main__":
    main()
