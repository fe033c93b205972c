"""A Qwen3-VL policy whose vision side is a frozen ImageNet EfficientNet-Lite
(:mod:`echo_agent.reasoners.lite_vision`, ``build_tiny_qwen_vl(vision=...)``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")  # the chat templates of the tiny checkpoints come from TRL
pytest.importorskip("efficientnet_lite_pytorch")

from PIL import Image  # noqa: E402

from echo_agent.reasoners.lite_vision import (  # noqa: E402
    FEATURE_STRIDE,
    MODEL_TYPE,
    patches_to_images,
    register,
    try_register,
)
from echo_agent.training.sft_trainer import load_model_and_processor  # noqa: E402
from echo_agent.training.tiny_model import build_tiny_qwen_vl  # noqa: E402

pytestmark = pytest.mark.heavy
ROOT = Path(__file__).resolve().parents[1]


def _image(w: int = 200, h: int = 300, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def lite_ckpt(tmp_path_factory):
    return build_tiny_qwen_vl("qwen3_vl", tmp_path_factory.mktemp("lite") / "m", text_hidden=64, text_layers=1,
                              vision="efficientnet-lite0")


def test_patches_go_back_into_the_image_they_came_from() -> None:
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 224 * 224}, patch_size=16,
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    a, b = _image(), _image(100, 150, seed=1)
    out = ip(images=[a, b], return_tensors="pt")
    imgs = patches_to_images(out["pixel_values"], out["image_grid_thw"], channels=3, temporal=2, patch=16, merge=2)
    assert [tuple(i.shape) for i in imgs] == [(1, 3, 16 * g[1], 16 * g[2]) for g in out["image_grid_thw"].tolist()]
    for img, src in zip((i[0] for i in imgs), (a, b)):
        h, w = img.shape[1:]
        ref = (np.asarray(src.resize((w, h), Image.BICUBIC), np.float32) / 255 - 0.5) / 0.5
        assert np.abs(img.numpy().transpose(1, 2, 0) - ref).max() < 0.02  # the processor's own resampling
    # two temporal groups (a short video): one frame back per group, in order
    two = torch.cat([out["pixel_values"][:160], -out["pixel_values"][:160]])
    frames = patches_to_images(two, torch.tensor([[2, 16, 10]]), channels=3, temporal=2, patch=16, merge=2)[0]
    assert frames.shape == (2, 3, 256, 160) and torch.equal(frames[1], -frames[0]) and torch.equal(frames[0], imgs[0][0])
    with pytest.raises(ValueError, match="patches"):
        patches_to_images(out["pixel_values"][:-4], out["image_grid_thw"], channels=3, temporal=2, patch=16, merge=2)


def test_lite_policy_loads_frozen_with_imagenet_weights_and_one_token_per_cell(lite_ckpt: Path) -> None:
    from echo_agent.training.region_classifier import pretrained_weights_path

    cfg = json.loads((lite_ckpt / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE and cfg["vision_config"]["backbone"] == "efficientnet-lite0"
    model, proc = load_model_and_processor(str(lite_ckpt), dtype="float32")
    visual = model.model.visual
    imagenet = torch.load(pretrained_weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(visual.backbone._conv_stem.weight, imagenet["_conv_stem.weight"])
    assert not any(p.requires_grad for p in visual.backbone.parameters())
    assert all(p.requires_grad for p in visual.projector.parameters())
    model.train()
    assert not visual.backbone.training and visual.projector.training  # batch-norm statistics stay ImageNet's
    running = visual.backbone._bn0.running_mean.clone()

    msgs = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Read it."}]}]
    x = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    t, gh, gw = x["image_grid_thw"][0].tolist()
    n_image_tokens = int((x["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == t * gh * gw // 4 == (gh * 16 // FEATURE_STRIDE) * (gw * 16 // FEATURE_STRIDE)
    with torch.no_grad():  # a short video: one token per cell and temporal group
        video = visual(torch.cat([x["pixel_values"]] * 2), grid_thw=torch.tensor([[2, gh, gw]])).pooler_output
    assert video.shape == (2 * gh * gw // 4, model.config.text_config.hidden_size)
    out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    assert visual.projector[0].weight.grad.abs().sum() > 0
    assert visual.backbone._conv_stem.weight.grad is None
    assert torch.equal(visual.backbone._bn0.running_mean, running)
    # the pixels reach the language model: another image, other logits
    model.eval()
    with torch.no_grad():
        y = proc.apply_chat_template([{**msgs[0], "content": [{"type": "image", "image": _image(seed=5)},
                                                               msgs[0]["content"][1]]}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        assert not torch.allclose(model(**x).logits[0, -1], model(**y).logits[0, -1])
        # several sampled answers per prompt (what the GRPO rollouts and the sampled val reward ask)
        torch.manual_seed(0)
        many = model.generate(**x, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    assert many.shape[0] == 3


def test_qwen_vl_chat_model_runs_a_lite_policy(lite_ckpt: Path) -> None:
    from _fakes import fake_toolkit, speckle_image
    from langchain_core.messages import HumanMessage

    from echo_agent.messages import image_block
    from echo_agent.reasoners.qwen_vl import QwenVLChatModel

    tk = fake_toolkit()
    llm = QwenVLChatModel(model_path=str(lite_ckpt), device="cpu", max_new_tokens=6, image_store=tk.get_store())
    ref = tk.get_store().put(speckle_image(120, 160))
    msg = llm.invoke([HumanMessage(content=[{"type": "text", "text": "Read it."}, image_block(ref)])])
    assert isinstance(msg.content, str)
    assert type(llm.load()._model).__name__ == "EchoLiteQwen3VLForConditionalGeneration"


def test_lite_vision_choices_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown vision"):
        build_tiny_qwen_vl("qwen3_vl", tmp_path / "a", vision="resnet50")
    with pytest.raises(ValueError, match="qwen3_vl only"):
        build_tiny_qwen_vl("qwen2_5_vl", tmp_path / "b", vision="efficientnet-lite0")
    vision_config, _, config, _ = register()
    assert register()[0] is vision_config and try_register()  # idempotent
    with pytest.raises(ValueError, match="unknown backbone"):
        register()[1](vision_config(backbone="vgg", out_hidden_size=32))
    with pytest.raises(ValueError, match="32 px"):
        register()[1](vision_config(out_hidden_size=32, patch_size=14))
    assert config.model_type == MODEL_TYPE


@pytest.mark.slow
def test_micro_policy_tool_trains_a_lite_vision_policy_and_measures_it_without_pixels(tmp_path: Path) -> None:
    from test_curriculum import synthetic_manifest

    manifest = synthetic_manifest(tmp_path / "data", size=(96, 72))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    tool = [sys.executable, str(ROOT / "tools" / "train_micro_policy.py"), "--out", str(out)]
    args = ["--manifest", str(manifest), "--train-images", "2", "--val-images", "1", "--vision", "efficientnet-lite0",
            "--vocab-size", "500", "--text-hidden", "32", "--text-layers", "1", "--skip-eval",
            "--sft-set", "max_steps=2", "--sft-set", "num_train_epochs=1", "--max-new-tokens", "8",
            "--grpo-seeds", "0", "--grpo-set", "max_steps=1", "--grpo-set", "num_generations=2",
            "--grpo-set", "per_device_train_batch_size=2", "--grpo-set", "max_completion_length=8",
            "--reward-prompts", "1", "--reward-samples", "2", "--answer", "decision"]
    proc = subprocess.run([*tool, *args], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["vision"] == "efficientnet-lite0"
    assert 0 < res["model"]["trainable_parameters"] < res["model"]["parameters"] - 3_000_000  # backbone frozen
    assert res["grpo"]["0"]["steps"] == 1
    grey = subprocess.run([*tool, "--reward-prompts", "1", "--grpo-set", "max_completion_length=8", "--grey-images",
                           "--reward-checkpoint", "sft_grey", str(out / "sft" / "final")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert grey.returncode == 0, grey.stderr[-3000:]
    greys = list((out / "traces" / "grey_images").glob("grey_*.png"))
    assert greys and np.asarray(Image.open(greys[0])).std() == 0
    assert json.loads((out / "results.json").read_text())["rewards_sft_grey"]["greedy"]["n"] == 1
