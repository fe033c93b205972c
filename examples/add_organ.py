"""Add an organ with its own detector tool, without touching the engine.

An organ is data (an ``OrganSpec``); its detector is any object with ``name``, ``labels`` and
``detect(image, score_threshold=..., tta=...) -> list[Detection]``. A separate package can
register the spec through the ``echo_agent.organs`` entry-point group instead of calling
``register_organ``; docs/plugins.md walks through a complete plug-in (plugins/echo-organ-thyroid).

Run:  python examples/add_organ.py
"""

import numpy as np

from echo_agent import Box, Detection, EchoAgent, OrganSpec, Toolkit, register_organ


class DarkNoduleDetector:
    """A toy 'detector': the darkest 32x32 window is the nodule."""

    name = "toy-nodule/0"
    labels = ("nodule",)

    def detect(self, image: np.ndarray, *, score_threshold: float = 0.25, tta: bool = False, **_):
        gray = image.mean(axis=2)
        h, w = gray.shape
        best = min((gray[y:y + 32, x:x + 32].mean(), x, y) for y in range(0, h - 32, 16) for x in range(0, w - 32, 16))
        score = float(1.0 - best[0] / 255.0)
        if score < score_threshold:
            return []
        return [Detection(box=Box(x1=best[1], y1=best[2], x2=best[1] + 32, y2=best[2] + 32), label="nodule", score=score)]


register_organ(OrganSpec(
    name="toy_gland",  # not "thyroid": the real plug-in may be installed
    image_labels=("normal", "nodule"),
    detector_labels=("nodule",),
    positive_label="nodule",
    prompt="Organ: a toy gland. Describe nodules by echogenicity, shape and margin.",
))

rng = np.random.default_rng(0)
img = rng.integers(90, 160, (160, 200), dtype=np.uint8)
img[60:92, 100:132] = 20  # a dark nodule
agent = EchoAgent(organ="toy_gland", toolkit=Toolkit(detectors={"toy_gland": DarkNoduleDetector()}))
dx = agent.run(img)
print(dx.label, round(dx.probability, 2), dx.box)
