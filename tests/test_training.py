"""SFT and GRPO on a tiny random Qwen3-VL (offline): the trainers run, resume, and render the same
conversation text the agent's QwenVLChatModel renders at inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402
from test_curriculum import synthetic_manifest  # noqa: E402

from echo_agent.eval.manifest import load_manifest  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402
from echo_agent.training.curriculum import (  # noqa: E402
    CurriculumBuilder,
    CurriculumConfig,
    SimulatedDetector,
    read_jsonl,
    to_hf_record,
    tool_schemas,
    write_jsonl,
)
from echo_agent.training.rewards import (  # noqa: E402
    final_text,
    get_preset,
    valid_diagnosis_reward,
    valid_tool_calls_reward,
)

pytestmark = [pytest.mark.heavy, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _tiny_vlm import build_tiny_qwen_vl

    return build_tiny_qwen_vl("qwen3_vl", tmp_path_factory.mktemp("tiny") / "qwen3_vl")


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path]:
    root = tmp_path_factory.mktemp("train")
    images = load_manifest(synthetic_manifest(root / "data", size=(64, 48)))
    images = [im for im in images if im.organ == "breast"]
    cfg = CurriculumConfig(tasks=("rec", "grounded_diagnosis"), seed=0)
    samples = CurriculumBuilder(cfg, detections=SimulatedDetector(0), overlay_dir=root / "cur" / "overlays").build(images)
    write_jsonl([to_hf_record(s, relative_to=root / "cur") for s in samples], root / "cur" / "train.jsonl")
    return samples, root / "cur" / "train.jsonl"


def test_training_text_is_the_inference_text(tiny: Path, curriculum) -> None:  # noqa: ANN001
    """The SFT rendering of a curriculum conversation equals QwenVLChatModel.render of the same
    LangChain messages (system prompt, tools, image, tool results with the overlay image)."""
    from transformers import AutoProcessor

    from echo_agent.imaging.store import ImageStore
    from echo_agent.reasoners.qwen_vl import QwenVLChatModel
    from echo_agent.training.sft_trainer import fill_images, open_rgb

    samples, _ = curriculum
    sample = next(s for s in samples if s.task == "grounded_diagnosis")
    store = ImageStore()
    for path in sample.image_paths.values():
        store.put(np.asarray(Image.open(path).convert("RGB")))
    tools = tool_schemas(get_organ(sample.organ))
    prefix = sample.messages[:-1]  # everything the model sees before writing its final turn
    llm = QwenVLChatModel(model_path=str(tiny), image_store=store, device="cpu")
    served, served_images, _ = llm.render(prefix, tools)

    rec = to_hf_record(type(sample)(**{**sample.__dict__, "messages": prefix}))
    proc = AutoProcessor.from_pretrained(tiny)
    msgs = fill_images(rec["messages"], [open_rgb(p) for p in rec["images"]])
    trained = proc.apply_chat_template(msgs, tools=json.loads(rec["tools"]), tokenize=False, add_generation_prompt=True)
    assert trained == served
    assert len(served_images) == len(rec["images"]) == 2  # the image and the detector overlay


def test_sft_two_steps_lora_and_resume(tiny: Path, curriculum, tmp_path: Path) -> None:  # noqa: ANN001
    from echo_agent.training.sft_config import EchoSFTConfig
    from echo_agent.training.sft_trainer import run_sft

    _, train_file = curriculum
    cfg = EchoSFTConfig(model_path=str(tiny), train_file=str(train_file), output_dir=str(tmp_path / "sft"),
                        tasks=["rec"], max_steps=2, gradient_accumulation_steps=1, logging_steps=1, save_steps=1,
                        gradient_checkpointing=False, tool_images=False, lora_r=4, lora_alpha=8, learning_rate=1e-3)
    out = run_sft(cfg)
    assert out["steps"] == 2 and np.isfinite(out["train_loss"])
    final = Path(out["final_dir"])
    assert (final / "adapter_config.json").is_file() and (final / "processor_config.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert (tmp_path / "sft" / "checkpoint-2").is_dir()
    cfg.max_steps, cfg.resume_from_checkpoint = 3, True
    assert run_sft(cfg)["steps"] == 3  # resumed from checkpoint-2, one more step


def test_assistant_only_loss_masks_prompt_and_tool_turns(tiny: Path, curriculum) -> None:  # noqa: ANN001
    from transformers import AutoProcessor
    from trl.chat_template_utils import get_training_chat_template

    from echo_agent.training.curriculum import to_hf_dataset
    from echo_agent.training.sft_trainer import ToolAwareVisionCollator

    _, train_file = curriculum
    recs = [r for r in read_jsonl(train_file) if r["task"] == "grounded_diagnosis"][:1]
    proc = AutoProcessor.from_pretrained(tiny)
    coll = ToolAwareVisionCollator(proc, chat_template=get_training_chat_template(proc))
    batch = coll([to_hf_dataset(recs, base=train_file.parent)[0]])
    labels = batch["labels"][0]
    trained = proc.tokenizer.decode(labels[labels != -100])
    assert "detect_breast_lesions" in trained and '"label":' in trained  # tool calls and the Diagnosis
    assert "Read this breast ultrasound image" not in trained and "evidence_id" not in trained  # not user/tool turns
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape[0] == 2


def test_environment_tools_match_inference(tiny: Path, curriculum, monkeypatch) -> None:  # noqa: ANN001
    import functools

    from transformers import AutoProcessor

    from echo_agent.training import grpo_trainer
    from echo_agent.training.grpo_trainer import (
        inference_tool_list,
        make_environment,
        use_inference_tool_schemas,
    )

    # a simulated detector that never misses: its noise is seeded by the image's key, which for a
    # temporary folder changes from one pytest session to the next (a miss made this test flaky)
    sure = functools.partial(grpo_trainer.SimulatedDetector, p_miss=0.0, p_false_positive=0.0)
    monkeypatch.setattr(grpo_trainer, "SimulatedDetector", sure)

    samples, _ = curriculum
    s = next(x for x in samples if x.task == "grounded_diagnosis" and x.truth["boxes"])
    env_cls = make_environment(get_organ("breast"), detector="simulated", overlays=True)
    env = env_cls()
    env.reset(image_path=next(iter(s.image_paths.values())), gt_label=s.truth["label"], truth=json.dumps(s.truth))
    out = env.detect_breast_lesions(tta=True)
    report = json.loads(out[0]["text"])
    assert report["evidence_id"] == "det1" and report["tta"] is True and out[1]["type"] == "image"
    assert env.describe_image(regions=[[10, 10, 5, 5]]).startswith("Error: ValidationError")
    kb = json.loads(env.retrieve_knowledge(query="oval circumscribed mass"))
    assert kb["evidence_id"] == "kb1" and kb["snippets"]
    proc = use_inference_tool_schemas(AutoProcessor.from_pretrained(tiny))
    conv = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    cls = json.loads(env.classify_breast_regions(regions=[[100, 100, 600, 600]], detection_ids=["det1:0"]))
    assert cls["evidence_id"] == "cls1" and cls["regions"][-1]["box"] == "whole image"
    assert env.classify_breast_regions(regions=[], whole_image=False).startswith("Error: ")
    # candidates by id, as in the inference tools: their boxes are this rollout's detections
    first = report["candidates"][0]  # the simulated detector finds the true lesion
    by_id = json.loads(env.describe_image(detection_ids=[first["id"]]))
    assert by_id["regions"][0]["detection_id"] == first["id"]
    assert "det7:0" in env.classify_breast_regions(detection_ids=["det7:0"])
    # the methods as TRL lists them (alphabetically, by inspect.getmembers) render as at inference:
    # the same schemas in the same order, detector first (the order is part of the prompt)
    import inspect

    methods = [getattr(env, n) for n, _ in inspect.getmembers(env_cls, inspect.isfunction)
               if n != "reset" and not n.startswith("_")]
    assert methods[0].__name__ == "classify_breast_regions"
    assert proc.apply_chat_template(conv, tools=methods, tokenize=False) == proc.apply_chat_template(
        conv, tools=tool_schemas(get_organ("breast")), tokenize=False)
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}
    names = [t["function"]["name"] for t in inference_tool_list([methods[0], other, methods[2]])]
    assert names == ["other", "detect_breast_lesions", "classify_breast_regions"]  # others first, then inference order


def test_grpo_two_steps(tiny: Path, curriculum, tmp_path: Path) -> None:  # noqa: ANN001
    from echo_agent.training.grpo_config import EchoGRPOConfig
    from echo_agent.training.grpo_trainer import run_grpo

    _, train_file = curriculum
    cfg = EchoGRPOConfig(model_path=str(tiny), train_file=str(train_file), output_dir=str(tmp_path / "grpo"),
                         tasks=["grounded_diagnosis"], max_prompts=2, max_steps=2, num_generations=2,
                         per_device_train_batch_size=2, max_completion_length=16, max_tool_calling_iterations=1,
                         use_lora=False, gradient_checkpointing=False, detector="simulated", overlays=False,
                         preset="echo-ground", save_steps=2)
    out = run_grpo(cfg)
    assert out["steps"] == 2 and len(out["rewards"]) == 2
    hist = json.loads((tmp_path / "grpo" / "log_history.json").read_text())
    logged = [h for h in hist if "reward" in h]
    assert all(f"rewards/{n}_reward/mean" in logged[0] for n in ("localization", "shape", "format"))
    # the validity metrics are logged with weight 0: they never change the optimised reward
    for h in logged:
        assert 0.0 <= h["rewards/valid_tool_calls_reward/mean"] <= 1.0
        assert 0.0 <= h["rewards/valid_diagnosis_reward/mean"] <= 1.0
        weighted = sum(w * h[f"rewards/{n}_reward/mean"] for n, w in get_preset("echo-ground").weights.items())
        assert h["reward"] == pytest.approx(weighted, abs=1e-5)
    assert (Path(out["final_dir"]) / "model.safetensors").is_file()


def test_grpo_trains_tool_prompts_and_final_prompts_together(tiny: Path, tmp_path: Path) -> None:
    """A run over both kinds of prompt renders each as at inference: a tool prompt with the organ's
    tools, a final-answer prompt (asked by LLMFinalizer without tools) with none."""
    from echo_agent.training.grpo_config import EchoGRPOConfig
    from echo_agent.training.grpo_trainer import ANSWER_ENVIRONMENT, grpo_rows, run_grpo
    from echo_agent.training.sft_trainer import load_model_and_processor

    images = [im for im in load_manifest(synthetic_manifest(tmp_path / "data", size=(64, 48))) if im.organ == "breast"]
    cfg = CurriculumConfig(tasks=("grounded_diagnosis", "informed_diagnosis"), seed=0, overlays=False)
    samples = CurriculumBuilder(cfg, detections=SimulatedDetector(0)).build(images)
    train = tmp_path / "cur" / "train.jsonl"
    write_jsonl([to_hf_record(s, relative_to=train.parent) for s in samples], train)
    records = read_jsonl(train)
    rows = grpo_rows(records, train.parent)
    assert {(r["task"], r["environment"]) for r in rows} == {("grounded_diagnosis", "breast"),
                                                            ("informed_diagnosis", ANSWER_ENVIRONMENT)}
    task_of = {json.dumps(r["messages"][1]["content"], sort_keys=True): r["task"] for r in records}

    model, proc = load_model_and_processor(str(tiny))
    rendered: list[tuple[str, bool]] = []
    original = proc.apply_chat_template

    def spy(conversation, *args, tools=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        for conv in conversation if isinstance(conversation[0], list) else [conversation]:
            user = next((m for m in conv if m["role"] == "user"), None)
            content = [{k: v for k, v in b.items() if k != "image"} for b in user["content"]] if user else None
            key = json.dumps(content, sort_keys=True)
            if key in task_of:
                rendered.append((task_of[key], bool(tools)))
        return original(conversation, *args, tools=tools, **kwargs)

    proc.apply_chat_template = spy
    gcfg = EchoGRPOConfig(model_path=str(tiny), train_file=str(train), output_dir=str(tmp_path / "grpo"),
                          tasks=["grounded_diagnosis", "informed_diagnosis"], max_prompts=4, max_steps=2,
                          num_generations=2, per_device_train_batch_size=4, max_completion_length=16,
                          max_tool_calling_iterations=1, use_lora=False, gradient_checkpointing=False,
                          detector="simulated", overlays=False, preset="echo-ground", save_steps=2, seed=3)
    out = run_grpo(gcfg, model=model, processor=proc)
    assert out["steps"] == 2
    assert {task for task, _ in rendered} == {"grounded_diagnosis", "informed_diagnosis"}
    assert all(with_tools == (task == "grounded_diagnosis") for task, with_tools in rendered), rendered


def test_validity_metrics_hand_cases() -> None:
    def call(name: str, args: dict) -> list[dict]:
        return [{"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                     "function": {"name": name, "arguments": args}}]}]

    good, wrong_organ, bad_args = call("detect_breast_lesions", {}), call("detect_kidney_lesions", {}), \
        call("describe_image", {"regions": [[10, 10, 5, 5]]})
    text_call = '<tool_call>\n{"name": "detect_breast_lesions", "arguments": {"tta": true}}\n</tool_call>'
    organs = ["breast"] * 5
    assert valid_tool_calls_reward([good, wrong_organ, bad_args, text_call, "junk"], organ=organs) == [1, 0, 0, 1, 0]
    dx = '{"organ":"breast","label":"malignant","probabilities":{"normal":0.1,"benign":0.2,"malignant":0.7}}'
    kidney_dx = '{"organ":"kidney","label":"normal","probabilities":{"normal":1.0}}'
    assert valid_diagnosis_reward([dx, kidney_dx, '{"box": [1, 2, 3, 4]}'], organ=["breast"] * 3) == [1, 0, 0]
    assert get_preset({"format": 1.0, "valid_tool_calls": 0.0}).names == ["format", "valid_tool_calls"]


def test_tiny_model_sizes_and_corpus(tmp_path: Path) -> None:
    """build_tiny_qwen_vl honours its size and tokenizer parameters, and the checkpoint runs."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from echo_agent.training.tiny_model import (
        TinyQwenVLSpec,
        build_tiny_qwen_vl,
        curriculum_corpus,
        train_tokenizer,
    )

    with pytest.raises(ValueError, match="multiple of 64"):
        TinyQwenVLSpec(text_hidden=30).heads()
    recs = [{"tools": '[{"name": "detect_breast_lesions"}]', "messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "oval circumscribed mass"}],
         "tool_calls": [{"function": {"name": "detect_breast_lesions", "arguments": {}}}]}]}]
    corpus = curriculum_corpus(recs)
    assert corpus[:3] == ['[{"name": "detect_breast_lesions"}]', "oval circumscribed mass",
                          '{"name": "detect_breast_lesions", "arguments": {}}']
    default_tok = train_tokenizer(None, 400)
    for family in ("qwen3_vl", "qwen2_5_vl"):
        target = build_tiny_qwen_vl(family, tmp_path / family, corpus=corpus[:3], vocab_size=400, text_hidden=64,
                                    text_layers=1)
        tc = AutoConfig.from_pretrained(target).text_config
        assert (tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size) == (64, 1, 128)
        proc = AutoProcessor.from_pretrained(target)
        assert len(proc.tokenizer) <= 400 + 12 and tc.vocab_size == len(proc.tokenizer)
        # the tokenizer is trained on the given corpus: its texts become a few tokens each
        def n_tokens(tok: object) -> int:
            return sum(len(tok(t)["input_ids"]) for t in corpus[:3])  # type: ignore[operator]

        assert n_tokens(proc.tokenizer) < n_tokens(default_tok)
        model = AutoModelForImageTextToText.from_pretrained(target)
        ids = proc.tokenizer("oval circumscribed mass", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            assert model(input_ids=ids).logits.shape == (1, ids.shape[1], tc.vocab_size)


def test_split_digits_spells_numbers_digit_by_digit(tmp_path: Path) -> None:
    """With split_digits a number is the same digit tokens wherever it appears (what lets a tiny model
    copy a box from a tool result); text round-trips; the saved checkpoint keeps the setting."""
    from transformers import AutoConfig, AutoProcessor

    from echo_agent.training.tiny_model import build_tiny_qwen_vl, train_tokenizer

    corpus = ['{"box":[325,250,725,455],"score":0.98}', '"box": [325, 250]'] * 20
    text = '{"box":[325,250,725,455],"probabilities":{"normal":0.01}}'
    merged, split = train_tokenizer(corpus, 400), train_tokenizer(corpus, 400, split_digits=True)
    digits = [t for t in split.convert_ids_to_tokens(split(text)["input_ids"]) if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digits) and "".join(digits) == "325250725455001"
    assert any(len(t) > 1 and t.isdigit() for t in merged.convert_ids_to_tokens(merged(text)["input_ids"]))
    assert split.decode(split(text)["input_ids"]) == text
    target = build_tiny_qwen_vl("qwen3_vl", tmp_path / "m", corpus=corpus, vocab_size=400, split_digits=True,
                                max_position_embeddings=4096)
    tok = AutoProcessor.from_pretrained(target).tokenizer
    assert tok.convert_ids_to_tokens(tok("[725,455]")["input_ids"])[1:4] == ["7", "2", "5"]
    assert AutoConfig.from_pretrained(target).text_config.max_position_embeddings == 4096


@pytest.fixture(scope="module")
def mixed_curriculum(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tool prompts (grounded_diagnosis) and tool-less final prompts (informed_diagnosis)."""
    root = tmp_path_factory.mktemp("mixed")
    images = [im for im in load_manifest(synthetic_manifest(root / "data", size=(64, 48))) if im.organ == "breast"]
    cfg = CurriculumConfig(tasks=("grounded_diagnosis", "informed_diagnosis"), seed=0, overlays=False)
    samples = CurriculumBuilder(cfg, detections=SimulatedDetector(0)).build(images)
    train = root / "cur" / "train.jsonl"
    write_jsonl([to_hf_record(s, relative_to=train.parent) for s in samples], train)
    return train


def test_answer_rewards_scores_greedy_and_sampled_answers(tiny: Path, mixed_curriculum: Path) -> None:
    from echo_agent.training.answer_rewards import answer_rewards, answer_rewards_by_samples
    from echo_agent.training.grpo_trainer import grpo_rows
    from echo_agent.training.rewards import REWARD_FUNCS
    from echo_agent.training.sft_trainer import load_model_and_processor

    model, proc = load_model_and_processor(str(tiny))
    records = read_jsonl(mixed_curriculum)
    final = [r for r in records if r["task"] == "informed_diagnosis"][:3]
    preset = get_preset("echo-diag")
    greedy = answer_rewards(model, proc, final, mixed_curriculum.parent, preset, max_new_tokens=8)
    again = answer_rewards(model, proc, final, mixed_curriculum.parent, preset, max_new_tokens=8)
    assert [len(row) for row in greedy.per_prompt] == [1, 1, 1] and greedy.texts == again.texts
    sampled = answer_rewards(model, proc, final, mixed_curriculum.parent, preset, samples=3, max_new_tokens=8)
    assert [len(row) for row in sampled.texts] == [3, 3, 3] and len(sampled.spread()) == 3
    # several counts in one pass give the answers of separate calls
    both = answer_rewards_by_samples(model, proc, final, mixed_curriculum.parent, preset, [0, 3], max_new_tokens=8)
    assert both[0].texts == greedy.texts and both[3].texts == sampled.texts
    assert both[3].per_prompt == sampled.per_prompt
    # the weighted reward of each answer is the preset's weighted sum of the reward functions
    rows = grpo_rows(final, mixed_curriculum.parent)
    comps = [[{"role": "assistant", "content": t}] for row in sampled.texts for t in row]
    cols = {k: [row[k] for row in rows for _ in range(3)] for k in ("gt_label", "gt_boxes", "organ", "width", "height",
                                                                    "detections")}
    expect = [sum(w * REWARD_FUNCS[n](comps, **cols)[j] for n, w in preset.weights.items()) for j in range(9)]
    assert [v for row in sampled.per_prompt for v in row] == pytest.approx(expect)
    tool_prompt = next(r for r in records if r["task"] == "grounded_diagnosis")
    with pytest.raises(ValueError, match="asked with tools"):
        answer_rewards(model, proc, [tool_prompt], mixed_curriculum.parent, preset)
    # the model's answers scored on their own give the same rewards
    from echo_agent.training.answer_rewards import score_answers

    assert score_answers(final, sampled.texts, mixed_curriculum.parent, preset).per_prompt == sampled.per_prompt


def test_score_answers_without_a_model(mixed_curriculum: Path) -> None:
    """Given answers (here the curriculum's own targets, and a broken one) scored with the preset."""
    from echo_agent.training.answer_rewards import score_answers

    records = read_jsonl(mixed_curriculum)
    final = [r for r in records if r["task"] == "informed_diagnosis"][:4]
    preset = get_preset("echo-diag")

    def target(r: dict) -> str:  # the SFT target: the record's last (assistant) turn
        return final_text(r["messages"])

    good = score_answers(final, [[target(r)] for r in final], mixed_curriculum.parent, preset)
    assert good.terms["format"] == 1.0 and good.mean > 1.0
    both = score_answers(final, [[target(r), "not a diagnosis"] for r in final], mixed_curriculum.parent, preset)
    assert [row[0] for row in both.per_prompt] == pytest.approx([row[0] for row in good.per_prompt])
    assert all(row[1] < row[0] for row in both.per_prompt) and both.spread() == pytest.approx(
        [row[0] - row[1] for row in both.per_prompt])
    with pytest.raises(ValueError, match="answer lists for"):
        score_answers(final, [[target(final[0])]], mixed_curriculum.parent, preset)
    with pytest.raises(ValueError, match="same number of answers"):
        score_answers(final[:2], [["a"], ["a", "b"]], mixed_curriculum.parent, preset)
    with pytest.raises(ValueError, match="at least one answer"):
        score_answers(final[:1], [[]], mixed_curriculum.parent, preset)
    tool_prompt = next(r for r in records if r["task"] == "grounded_diagnosis")
    with pytest.raises(ValueError, match="asked with tools"):
        score_answers([tool_prompt], [["a"]], mixed_curriculum.parent, preset)


def test_informative_filter_drops_prompts_whose_answers_all_score_the_same(tiny: Path, mixed_curriculum: Path,
                                                                           tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import echo_agent.training.answer_rewards as ar
    from echo_agent.training.grpo_config import EchoGRPOConfig
    from echo_agent.training.grpo_trainer import grpo_records, informative_records, run_grpo

    cfg = EchoGRPOConfig(model_path=str(tiny), train_file=str(mixed_curriculum), output_dir=str(tmp_path / "grpo"),
                         tasks=["grounded_diagnosis", "informed_diagnosis"], filter_samples=2, max_steps=1,
                         num_generations=2, per_device_train_batch_size=2, max_completion_length=8,
                         max_tool_calling_iterations=1, use_lora=False, gradient_checkpointing=False,
                         detector="simulated", overlays=False, preset="echo-diag", save_steps=10)
    records = grpo_records(cfg)
    final_keys = [r["key"] for r in records if r["task"] == "informed_diagnosis"]
    assert len(final_keys) >= 3
    seen: list[int] = []

    def fake(model, processor, recs, base, preset, *, samples, temperature, max_new_tokens):  # noqa: ANN001, ANN202
        seen.append(samples)
        assert all(r["task"] == "informed_diagnosis" for r in recs) and temperature == cfg.temperature
        # every other prompt's answers disagree
        return ar.AnswerRewards(per_prompt=[[1.0, 0.0] if i % 2 == 0 else [0.5, 0.5] for i in range(len(recs))],
                                terms={}, texts=[["a", "b"] for _ in recs])

    monkeypatch.setattr(ar, "answer_rewards", fake)
    kept, report = informative_records(None, None, records, cfg)
    assert [r["key"] for r in kept if r["task"] == "informed_diagnosis"] == final_keys[::2]
    assert [r for r in kept if r["task"] != "informed_diagnosis"] == [r for r in records if r["task"] != "informed_diagnosis"]
    assert report["answered"] == len(final_keys) and report["kept"] == len(final_keys[::2]) and seen == [2]
    with pytest.raises(ValueError, match="at least 2"):
        informative_records(None, None, records, EchoGRPOConfig(train_file=str(mixed_curriculum), filter_samples=1))

    # run_grpo applies it before training and reports it
    out = run_grpo(cfg)
    assert out["n_prompts"] == len(kept) and out["prompt_filter"]["kept"] == len(final_keys[::2])
    assert json.loads((tmp_path / "grpo" / "prompt_filter.json").read_text())["answered"] == len(final_keys)
