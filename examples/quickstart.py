"""Quickstart: diagnose a bundled breast ultrasound image with the embedded default agent.

Run:  python examples/quickstart.py
"""

from echo_agent import EchoAgent
from echo_agent.imaging import example_image

agent = EchoAgent()  # embedded policy, packaged ONNX detectors; no GPU, network or API key
dx = agent.run(example_image("breast_malignant"), context={"age": 59, "symptoms": "palpable lump"})
print(dx.label, round(dx.probability, 3), dx.category_system, dx.category)
print("box (pixels):", dx.box)
print("rationale:", dx.rationale)

# Every step is observable: tool calls, typed evidence, the final diagnosis.
for event in agent.stream(example_image("breast_benign"), organ="breast"):
    print(f"{event.step:2d} {event.type:12s}", getattr(event, "name", ""))
