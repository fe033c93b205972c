"""Micro-scale demonstration that the training recipe runs and moves its numbers, on a CPU.

    python tools/train_micro_demo.py --out runs/micro --images 10 --sft-steps 320 --grpo-steps 60

1. builds the curriculum of a few BrEaST-Lesions_USG + BUSI *train* images, with the packaged ONNX
   breast detector producing the tool results (``--detector live``; ``simulated`` = ground truth +
   noise, for a checkout without weights), and the same for a few *val* images (evaluation prompts);
2. builds a tiny random Qwen3-VL (:func:`echo_agent.training.tiny_model.build_tiny_qwen_vl`; its BPE
   tokenizer is trained on the curriculum's own text so sequences stay short -- the architecture and
   chat template are Qwen3-VL's);
3. measures, on the val prompts, the rate of valid first tool calls (greedy reply to system + user,
   parsed like QwenVLChatModel does and checked against the tool schemas) and of valid Diagnosis JSON
   (greedy reply to the teacher-forced trajectory before the final turn);
4. runs SFT, measures again, runs GRPO whose rollouts call the agent's real tools (the same detector,
   the pixel captioner, the BM25 retriever), measures again;
5. writes ``<out>/results.json`` (every number), ``<out>/curves.json`` and, with ``--plot``, a PNG of
   the SFT loss and GRPO reward curves.

The model is far too small to diagnose; the point is that every stage runs and moves what it should.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def build_curricula(out: Path, n_images: int, n_val: int, seed: int, tasks: tuple[str, ...], detector: str) -> dict[str, Path]:
    from echo_agent.eval.datasets import load_split
    from echo_agent.training.curriculum import (
        CurriculumBuilder,
        CurriculumConfig,
        LiveDetector,
        SimulatedDetector,
        check_no_leakage,
        count_table,
        to_hf_record,
        write_jsonl,
    )

    images = [im for c in ("breast_lesions_usg", "busi") for im in load_split(c, None)]
    source = LiveDetector() if detector == "live" else SimulatedDetector(seed)
    paths = {}
    for split, n in (("train", n_images), ("val", n_val)):
        per_center = []
        for c in ("breast_lesions_usg", "busi"):
            ims = [im for im in images if im.center == c]
            cfg = CurriculumConfig(tasks=tasks, split=split, seed=seed, max_images=max(n // 2, 1))
            b = CurriculumBuilder(cfg, detections=source, overlay_dir=out / "curriculum" / "overlays")
            per_center += b.build(ims)
        check_no_leakage(per_center, images)
        d = out / "curriculum"
        paths[split] = d / f"{split}.jsonl"
        write_jsonl([to_hf_record(s, relative_to=d) for s in per_center], paths[split])
        (d / f"counts_{split}.md").write_text(count_table(per_center) + "\n", "utf-8")
    return paths


def build_model(target: Path, train_file: Path, vocab_size: int, text_hidden: int, text_layers: int, seed: int) -> Path:
    from echo_agent.training.curriculum import read_jsonl
    from echo_agent.training.tiny_model import build_tiny_qwen_vl, curriculum_corpus

    return build_tiny_qwen_vl("qwen3_vl", target, seed=seed, corpus=curriculum_corpus(read_jsonl(train_file)),
                              vocab_size=vocab_size, text_hidden=text_hidden, text_layers=text_layers)


def measure(model_dir: Path, val_file: Path, max_prompts: int, max_new_tokens: int) -> dict[str, float]:
    """On val conversations: valid first tool call rate and valid Diagnosis JSON rate of greedy
    replies, and the teacher-forced loss (mean NLL per assistant token) of the reference replies."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from echo_agent.reasoners.toolcall_parsing import parse_tool_calls
    from echo_agent.training.curriculum import read_jsonl, resolve_images, strip_tool_images
    from echo_agent.training.rewards import parse_answer, valid_tool_call
    from echo_agent.training.sft_trainer import fill_images, open_rgb

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    recs = [strip_tool_images(r) for r in read_jsonl(val_file) if r["tools"] and any(m.get("tool_calls") for m in r["messages"])]
    recs = recs[:max_prompts]
    base = val_file.parent

    def reply(messages: list, images: list, tools: list, limit: int) -> str:
        msgs = fill_images(messages, [open_rgb(p) for p in images])
        inputs = proc.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=limit, do_sample=False)
        return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    tool_ok = dx_ok = 0
    examples = {}
    for r in recs:
        tools = json.loads(r["tools"])
        truth = json.loads(r["truth"])
        imgs = resolve_images(r, base)
        head = r["messages"][:2]
        n_head = sum(1 for m in head for b in m["content"] if b.get("type") == "image")
        text = reply(head, imgs[:n_head], tools, 48)
        calls = parse_tool_calls(text).tool_calls
        ok = bool(calls) and all(valid_tool_call(c["name"], c["args"], r["organ"]) for c in calls)
        tool_ok += ok
        before_final = r["messages"][:-1]
        text2 = reply(before_final, imgs, tools, max_new_tokens)
        ans = parse_answer(text2, r["organ"], truth["width"], truth["height"])
        dx_ok += bool(ans and ans["diagnosis"] is not None)
        examples.setdefault("first_turn", text[:300])
        examples.setdefault("final_turn", text2[:300])
    # teacher-forced loss of the reference assistant turns (the SFT objective, on held-out data)
    from trl.chat_template_utils import get_training_chat_template

    from echo_agent.training.curriculum import to_hf_dataset
    from echo_agent.training.sft_trainer import ToolAwareVisionCollator

    coll = ToolAwareVisionCollator(proc, chat_template=get_training_chat_template(proc))
    ds = to_hf_dataset(recs, base=base)
    nll = n_tok = 0.0
    for i in range(len(ds)):
        batch = coll([ds[i]])
        labels = batch.pop("labels")
        with torch.inference_mode():
            logits = model(**batch).logits[0, :-1]
        tgt = labels[0, 1:]
        keep = tgt != -100
        nll += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
        n_tok += int(keep.sum())
    n = max(len(recs), 1)
    return {"n_prompts": len(recs), "valid_tool_call_rate": tool_ok / n, "valid_diagnosis_rate": dx_ok / n,
            "val_assistant_loss": nll / max(n_tok, 1),
            "example_first_turn": examples.get("first_turn", ""), "example_final_turn": examples.get("final_turn", "")}


CURVE_KEYS = ("step", "reward", "reward_std", "rewards/format_reward/mean", "rewards/tool_cost_reward/mean",
              "rewards/valid_tool_calls_reward/mean", "rewards/valid_diagnosis_reward/mean",
              "tools/call_frequency", "tools/failure_frequency", "completions/mean_length")


def grpo_stage(a: argparse.Namespace, out: Path, files: dict[str, Path], sft_final: Path, results: dict,
               timings: dict[str, float], name: str) -> None:
    from echo_agent.training.grpo_config import EchoGRPOConfig
    from echo_agent.training.grpo_trainer import run_grpo

    t = time.time()
    g = a.grpo_generations
    weights = json.loads(a.grpo_rewards) if a.grpo_rewards.startswith("{") else None
    grpo = run_grpo(EchoGRPOConfig(
        model_path=str(sft_final), train_file=str(files["train"]), output_dir=str(out / name), use_lora=False,
        max_steps=a.grpo_steps, num_generations=g, per_device_train_batch_size=g, max_completion_length=256,
        max_tool_calling_iterations=2, learning_rate=a.grpo_lr, beta=a.grpo_beta, temperature=a.grpo_temperature,
        gradient_checkpointing=False, overlays=False, detector=a.detector, logging_steps=1,
        preset=a.grpo_rewards if weights is None else "echo-diag", reward_weights=weights,
        save_steps=a.grpo_steps, seed=a.seed,
    ))
    timings[f"{name}_s"] = time.time() - t
    hist = json.loads((out / name / "log_history.json").read_text())
    results["grpo"] = dict(grpo)
    results["grpo_curve"] = [{k: h.get(k) for k in CURVE_KEYS} for h in hist if "reward" in h]
    results["after_grpo"] = measure(Path(grpo["final_dir"]), files["val"], a.eval_prompts, a.max_new_tokens)
    print("after_grpo", results["after_grpo"], flush=True)


def summarise(results: dict, k: int = 5) -> dict:
    """Mean of the first and last ``k`` GRPO steps of each logged curve (the trend, not one noisy step)."""
    curve = results.get("grpo_curve") or []
    out = {}
    for key in CURVE_KEYS[1:]:
        vals = [c[key] for c in curve if c.get(key) is not None]
        if len(vals) >= 2:
            n = min(k, len(vals) // 2)
            out[key] = {"first": sum(vals[:n]) / n, "last": sum(vals[-n:]) / n, "steps_each": n}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sft = results.get("sft_loss_curve") or []
    if sft:
        axes[0].plot([s for s, _ in sft], [v for _, v in sft], marker=".")
    axes[0].set(title="SFT: training loss (assistant tokens)", xlabel="step", ylabel="loss")
    curve = results.get("grpo_curve") or []
    steps = [c["step"] for c in curve]
    for key, label in (("reward", "reward (weighted sum)"),
                       ("rewards/valid_tool_calls_reward/mean", "rollouts with valid tool calls"),
                       ("rewards/valid_diagnosis_reward/mean", "rollouts with valid Diagnosis JSON")):
        vals = [c.get(key) for c in curve]
        if any(v is not None for v in vals):
            axes[1].plot(steps, vals, marker=".", label=label)
    axes[1].set(title="GRPO: per step (8 rollouts of one prompt)", xlabel="step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/micro")
    ap.add_argument("--images", type=int, default=10, help="Train images (half BrEaST, half BUSI).")
    ap.add_argument("--val-images", type=int, default=4, help="Val images (half BrEaST, half BUSI).")
    ap.add_argument("--tasks", default="grounded_diagnosis,tool_detection,report_generation,misdiagnosis_correction",
                    help="Curriculum tasks (comma-separated).")
    ap.add_argument("--detector", choices=("live", "simulated"), default="live",
                    help="live = the packaged ONNX detector (curriculum and GRPO rollouts); simulated = ground truth + noise.")
    ap.add_argument("--sft-steps", type=int, default=320)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--grpo-lr", type=float, default=3e-4)
    ap.add_argument("--grpo-beta", type=float, default=0.0)
    ap.add_argument("--grpo-generations", type=int, default=8, help="Rollouts per prompt.")
    ap.add_argument("--grpo-temperature", type=float, default=1.0)
    ap.add_argument("--grpo-rewards", default='{"format": 1.0, "tool_cost": 0.5}',
                    help="A preset name (echo-diag, echo-ground) or JSON {reward: weight}.")
    ap.add_argument("--vocab-size", type=int, default=3000)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=420, help="For the final (Diagnosis) turn.")
    ap.add_argument("--grpo-only", action="store_true",
                    help="Reuse <out>/curriculum and <out>/sft/final of an earlier run; redo only GRPO (results_grpo.json).")
    ap.add_argument("--plot", default="", help="Write the loss / reward curves to this PNG.")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict = {"command": "python tools/train_micro_demo.py " + " ".join(argv or sys.argv[1:])}

    if a.grpo_only:
        files = {"train": out / "curriculum" / "train.jsonl", "val": out / "curriculum" / "val.jsonl"}
        sft_final = out / "sft" / "final"
        earlier = out / "results.json"
        if earlier.is_file():  # the SFT numbers of the run that made the checkpoint
            old = json.loads(earlier.read_text())
            results.update({k: old[k] for k in ("before", "sft_loss_curve", "model") if k in old})
        results["after_sft"] = measure(sft_final, files["val"], a.eval_prompts, a.max_new_tokens)
        grpo_stage(a, out, files, sft_final, results, timings, "grpo_only")
        results["grpo_summary"] = summarise(results)
        (out / "results_grpo.json").write_text(json.dumps(results, indent=1, default=str), "utf-8")
        if a.plot:
            plot(results, Path(a.plot))
        print(json.dumps(results, indent=1, default=str))
        return 0
    t = time.time()
    tasks = tuple(x for x in a.tasks.split(",") if x)
    files = build_curricula(out, a.images, a.val_images, a.seed, tasks, a.detector)
    timings["curriculum_s"] = time.time() - t
    results["counts_train"] = (out / "curriculum" / "counts_train.md").read_text()

    t = time.time()
    model_dir = build_model(out / "tiny_qwen3_vl", files["train"], a.vocab_size, a.text_hidden, a.text_layers, a.seed)
    from transformers import AutoConfig, AutoModelForImageTextToText

    tc = AutoConfig.from_pretrained(model_dir).text_config
    n_params = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(model_dir).parameters())
    results["model"] = {"text_hidden": tc.hidden_size, "text_layers": tc.num_hidden_layers, "vocab": tc.vocab_size,
                        "parameters": n_params}
    timings["build_model_s"] = time.time() - t
    results["before"] = measure(model_dir, files["val"], a.eval_prompts, a.max_new_tokens)
    print("before", results["before"], flush=True)

    from echo_agent.training.sft_config import EchoSFTConfig
    from echo_agent.training.sft_trainer import run_sft

    t = time.time()
    sft = run_sft(EchoSFTConfig(
        model_path=str(model_dir), train_file=str(files["train"]), output_dir=str(out / "sft"), use_lora=False,
        max_steps=a.sft_steps, learning_rate=a.sft_lr, gradient_accumulation_steps=1, warmup_ratio=0.05,
        lr_scheduler_type="cosine", logging_steps=5, save_steps=max(a.sft_steps // 2, 1), gradient_checkpointing=False,
        tool_images=False, seed=a.seed,
    ))
    timings["sft_s"] = time.time() - t
    results["sft"] = sft
    results["sft_loss_curve"] = [(h["step"], h["loss"]) for h in json.loads((out / "sft" / "log_history.json").read_text())
                                 if "loss" in h]
    results["after_sft"] = measure(Path(sft["final_dir"]), files["val"], a.eval_prompts, a.max_new_tokens)
    print("after_sft", results["after_sft"], flush=True)
    # Written now too, so that a GRPO failure keeps the SFT numbers (and --grpo-only can pick them up).
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), "utf-8")

    if a.grpo_steps > 0:
        grpo_stage(a, out, files, Path(sft["final_dir"]), results, timings, "grpo")
        results["grpo_summary"] = summarise(results)
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), "utf-8")
    if a.plot:
        plot(results, Path(a.plot))
    print(json.dumps({k: v for k, v in results.items() if k not in ("counts_train",)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
