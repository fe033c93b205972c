"""A Qwen3-VL policy whose vision side is a frozen, ImageNet-pretrained EfficientNet-Lite.

The micro policy of ``docs/training.md`` §7 is small enough to train on a CPU, which leaves no room to
train a vision transformer: its stock tower is random and the policy reads only the tools' text. This
module keeps every other part of the Qwen3-VL architecture (tokenizer, chat template, processor,
M-RoPE, the language model) and swaps the vision tower for a frozen pretrained CNN feeding the
language model through a small trained projection:

* the processor's patches are put back into the image they came from (the same
  ``[-1, 1]`` scaling the Lite weights were trained with, ``(x - 127) / 128`` to within half a grey level);
* EfficientNet-Lite reads it and gives a 1,280-channel map at stride 32, which is exactly one cell per
  merged 2 x 2 group of 16-px patches, the unit of one image token in Qwen3-VL;
* a LayerNorm + two-layer MLP projects each cell to the language model's width (trained; the
  backbone stays frozen, its batch-norm statistics too).

The checkpoint is an ordinary ``save_pretrained`` folder with ``model_type`` ``echo_qwen3_vl_lite``;
:func:`register` (idempotent; called by :class:`~echo_agent.reasoners.QwenVLChatModel` and the
training loaders) teaches ``AutoConfig`` / ``AutoModelForImageTextToText`` the two classes, so
``from_pretrained`` loads it like any Qwen3-VL checkpoint. Build one with
``echo_agent.training.tiny_model.build_tiny_qwen_vl(..., vision="efficientnet-lite0")``.

Needs torch, transformers and ``efficientnet-lite-pytorch`` (the ``train`` extra); imported lazily.
"""

from __future__ import annotations

from typing import Any

MODEL_TYPE = "echo_qwen3_vl_lite"
VISION_MODEL_TYPE = "echo_lite_vision"
#: channels of EfficientNet-Lite's head convolution (every variant)
FEATURE_CHANNELS = 1280
#: the stride of that map; one image token of Qwen3-VL covers ``spatial_merge_size * patch_size`` px
FEATURE_STRIDE = 32
LITE_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

_CLASSES: tuple[type, type, type, type] | None = None  # set by register()


def patches_to_images(pixel_values: Any, grid_thw: Any, *, channels: int, temporal: int, patch: int,
                      merge: int) -> list[Any]:
    """Undo the Qwen2-VL image processor's patching: one ``(t, channels, H, W)`` tensor per image.

    The processor cuts an image (or video) of ``t x gh x gw`` patches into rows ordered by merge group
    (``t``, ``gh / merge``, ``gw / merge``, ``merge``, ``merge``), each row ``channels x temporal x
    patch x patch`` values; each of the ``t`` temporal groups holds ``temporal`` frames (a still image
    repeats itself), of which the first is returned.
    """
    grids = grid_thw.tolist()
    total = sum(t * gh * gw for t, gh, gw in grids)
    if total != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {total} patches, pixel_values holds {pixel_values.shape[0]}")
    images = []
    start = 0
    for t, gh, gw in grids:
        n = t * gh * gw
        x = pixel_values[start:start + n].reshape(t, gh // merge, gw // merge, merge, merge, channels, temporal,
                                                  patch, patch)
        start += n
        # -> (t, temporal, channels, gh / merge, merge, patch, gw / merge, merge, patch)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, temporal, channels, gh * patch, gw * patch)
        images.append(x[:, 0])
    return images


def _classes() -> tuple[type, type, type, type]:
    import torch
    from torch import nn
    from transformers import PreTrainedModel
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig, Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        BaseModelOutputWithDeepstackFeatures,
        Qwen3VLForConditionalGeneration,
    )

    class EchoLiteVisionConfig(Qwen3VLVisionConfig):
        """Qwen3-VL's vision config (patching and merge sizes, ``out_hidden_size``) plus the backbone."""

        model_type = VISION_MODEL_TYPE
        base_config_key = "vision_config"

        def __init__(self, backbone: str = "efficientnet-lite0", projector_hidden: int = 0,
                     train_backbone: bool = False, **kwargs: Any) -> None:
            self.backbone = backbone
            self.projector_hidden = projector_hidden
            self.train_backbone = train_backbone
            super().__init__(**kwargs)

    class EchoLiteVisionModel(PreTrainedModel):
        """Frozen EfficientNet-Lite + trained projection, with the Qwen3-VL vision tower's interface."""

        config_class = EchoLiteVisionConfig
        base_model_prefix = "lite_vision"
        main_input_name = "pixel_values"
        input_modalities = ("image", "video")
        _no_split_modules: list[str] = []
        # no attention inside: whatever implementation the language model is loaded with is fine here
        _supports_sdpa = True
        _supports_flash_attn = True
        _supports_flex_attn = True

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            if config.backbone not in LITE_BACKBONES:
                raise ValueError(f"unknown backbone {config.backbone!r}; expected one of {LITE_BACKBONES}")
            if config.spatial_merge_size * config.patch_size != FEATURE_STRIDE:
                raise ValueError(f"one image token must cover {FEATURE_STRIDE} px (spatial_merge_size x patch_size), "
                                 f"got {config.spatial_merge_size} x {config.patch_size}")
            try:
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError as exc:  # pragma: no cover - train extra
                raise ImportError("a Lite-vision policy needs efficientnet-lite-pytorch: "
                                  "pip install 'echo-agent[train]'") from exc
            self.spatial_merge_size = config.spatial_merge_size
            self.patch_size = config.patch_size
            self.backbone = EfficientNet.from_name(config.backbone)
            self.backbone._fc = nn.Identity()  # ImageNet's classifier: never used, not saved
            hidden = config.projector_hidden or 2 * config.out_hidden_size
            self.norm = nn.LayerNorm(FEATURE_CHANNELS)
            self.projector = nn.Sequential(nn.Linear(FEATURE_CHANNELS, hidden), nn.GELU(),
                                           nn.Linear(hidden, config.out_hidden_size))
            self.backbone.requires_grad_(bool(config.train_backbone))
            self.post_init()

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            if not self.config.train_backbone:
                self.backbone.eval()  # frozen: its batch-norm statistics stay the ImageNet ones
            return self

        def forward(self, hidden_states: Any, grid_thw: Any = None, **kwargs: Any) -> Any:
            c = self.config
            images = patches_to_images(hidden_states, grid_thw, channels=c.in_channels, temporal=c.temporal_patch_size,
                                       patch=c.patch_size, merge=c.spatial_merge_size)
            tokens = []
            for frames in images:  # (t, C, H, W): one frame per temporal group
                with torch.set_grad_enabled(torch.is_grad_enabled() and bool(c.train_backbone)):
                    fmap = self.backbone.extract_features(frames.to(self.dtype))
                gh, gw = frames.shape[2] // FEATURE_STRIDE, frames.shape[3] // FEATURE_STRIDE
                fmap = fmap[..., :gh, :gw]  # the same cells as the merged patches, row by row
                tokens.append(fmap.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1]))
            feats = torch.cat(tokens, dim=0)
            merged = self.projector(self.norm(feats))
            # No DeepStack levels: one all-zero level adds nothing to the first decoder layer's hidden
            # states, and keeps generate(num_return_sequences > 1) working (transformers expands the
            # DeepStack features it finds at deepstack_features[0][0]).
            return BaseModelOutputWithDeepstackFeatures(last_hidden_state=feats, pooler_output=merged,
                                                        deepstack_features=[torch.zeros_like(merged)])

    class EchoLiteQwen3VLConfig(Qwen3VLConfig):
        """A Qwen3-VL config whose vision part is :class:`EchoLiteVisionConfig`."""

        model_type = MODEL_TYPE
        sub_configs_defaults = {**Qwen3VLConfig.sub_configs_defaults, "vision_config": EchoLiteVisionConfig}

    class EchoLiteQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
        """Qwen3-VL with :class:`EchoLiteVisionModel` as ``model.visual`` (built through ``AutoModel``)."""

        config_class = EchoLiteQwen3VLConfig

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            model = super().from_pretrained(*args, **kwargs)
            visual = model.model.visual  # loading makes fresh parameters: freeze the backbone again
            visual.backbone.requires_grad_(bool(visual.config.train_backbone))
            return model

    return EchoLiteVisionConfig, EchoLiteVisionModel, EchoLiteQwen3VLConfig, EchoLiteQwen3VLForConditionalGeneration


def register() -> tuple[type, type, type, type]:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` know the Lite-vision classes.

    Idempotent. Returns ``(vision config, vision model, config, model)`` classes."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    try:
        classes = _classes()
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"Lite-vision checkpoints need transformers >= 5 (found {transformers.__version__}): "
                           f"{exc}") from exc
    vision_config, vision_model, config, model = classes
    AutoConfig.register(VISION_MODEL_TYPE, vision_config, exist_ok=True)
    AutoModel.register(vision_config, vision_model, exist_ok=True)
    AutoConfig.register(MODEL_TYPE, config, exist_ok=True)
    AutoModelForImageTextToText.register(config, model, exist_ok=True)
    # TRL builds GRPO's reference model from the checkpoint path, looking the class named in
    # config.architectures up in the transformers namespace (trl.trainer.utils.create_model_from_path)
    if not hasattr(transformers, model.__name__):
        setattr(transformers, model.__name__, model)
    _CLASSES = classes
    return classes


def try_register() -> bool:
    """:func:`register` where the installed transformers allows it; ``False`` where it does not (stock
    checkpoints load as before, a Lite-vision one then fails as an unknown model type)."""
    try:
        register()
    except RuntimeError:
        return False
    return True


__all__ = ["FEATURE_CHANNELS", "FEATURE_STRIDE", "LITE_BACKBONES", "MODEL_TYPE", "VISION_MODEL_TYPE",
           "patches_to_images", "register", "try_register"]
