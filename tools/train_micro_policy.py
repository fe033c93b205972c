"""Train a micro multimodal policy that drives the agent, on this CPU, and measure it in the agent.

    python tools/train_micro_policy.py --out runs/micro_policy

1. **traces** (``echo_agent.training.curriculum.traces``): the embedded agent runs on train images
   of both organs (BrEaST-Lesions_USG, BUSI, Hydronephrosis-NCNU; at most ``--frames-per-clip``
   frames of a kidney clip) with the packaged detectors, second-look classifiers, captioner and
   retriever; each run gives an ``agent_trace`` conversation (the reasoner's tool calls and the
   tools' real results) and an ``agent_final`` conversation (``LLMFinalizer``'s prompt answered with
   a compact Diagnosis of the evidence). The same for val images (measurement only). No test image.
2. **model**: a tiny Qwen3-VL (``build_tiny_qwen_vl``) whose BPE tokenizer is trained on the train
   traces.
3. **SFT** on both tasks (assistant turns only).
4. **eval**: the checkpoint is plugged into ``EchoAgent`` as reasoner (``QwenVLChatModel``) and
   finalizer (``LLMFinalizer``) and run through the eval harness on the val images, next to the
   embedded-policy agent on the same images: tool-call and Diagnosis validity of every run, then
   localization F1@0.5 and accuracy per organ.
5. **GRPO** (``--grpo-seeds``), one run per seed from the SFT checkpoint, on the ``agent_final``
   prompts with the ``echo-diag`` reward preset (IoU-gated classification, localization, DIoU
   shape, format; ``echo_agent.training.rewards``), a KL term to the SFT checkpoint and a small
   learning rate (``configs/training/micro_policy_grpo.yaml``); the mean reward of greedy answers to
   the val prompts is measured before and after each run, with their validity (``--reward-samples K``:
   also of K answers per prompt sampled at the rollout temperature, the expected reward GRPO
   optimises). The first seed's checkpoint is evaluated in the agent like step 4.

Measuring existing checkpoints only: ``--eval-checkpoint NAME DIR`` (in the agent) and
``--reward-checkpoint NAME DIR`` (val rewards), both reading the traces already in ``--out``.

Writes ``<out>/results.json`` (every number and the timings) and, with ``--plot``, the curves.
A recipe check at a scale this CPU trains in about an hour, not a clinical model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
REPO = Path(__file__).resolve().parents[1]

CENTERS = ("breast_lesions_usg", "busi", "hydronephrosis_ncnu")


def all_images(manifest: str | None) -> list[Any]:
    """The images to sample from: a manifest's, or the three staged centers' (``../shared/data``)."""
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.manifest import load_manifest

    if manifest:
        return list(load_manifest(manifest))
    return [im for c in CENTERS for im in load_split(c, None)]


def pick_images(images: list[Any], split: str, per_organ: int, frames_per_clip: int, seed: int) -> list[Any]:
    """A seeded sample of ``per_organ`` images of ``split`` per organ, with at most ``frames_per_clip``
    images of one group (a kidney clip; breast images are their own group)."""
    by_organ: dict[str, list[Any]] = {}
    for im in images:
        if im.split == split:
            by_organ.setdefault(im.organ, []).append(im)
    rng = random.Random(seed)
    out = []
    for organ in sorted(by_organ):
        ims = sorted(by_organ[organ], key=lambda im: im.key)
        rng.shuffle(ims)
        per_group: Counter[str] = Counter()
        kept = []
        for im in ims:
            g = im.group or im.key
            if per_group[g] >= frames_per_clip:
                continue
            per_group[g] += 1
            kept.append(im)
        out += kept[:per_organ]
    return out


def build_traces(out: Path, a: argparse.Namespace) -> dict[str, Path]:
    from echo_agent import EchoAgent
    from echo_agent.training.curriculum import check_no_leakage, count_table, to_hf_record, write_jsonl
    from echo_agent.training.curriculum.traces import agent_traces

    agent = EchoAgent(router=None)
    files = {}
    d = out / "traces"
    pool = all_images(a.manifest)
    for split, n in (("train", a.train_images), ("val", a.val_images)):
        images = pick_images(pool, split, n, a.frames_per_clip, a.seed)
        failed: list[str] = []
        samples = agent_traces(agent, images, on_error=lambda im, exc, failed=failed: failed.append(f"{im.key}: {exc}"),
                               final_variants=a.final_variants if split == "train" else 0, seed=a.seed,
                               answer=a.answer)
        check_no_leakage(samples, images)
        files[split] = d / f"{split}.jsonl"
        write_jsonl([to_hf_record(s, tool_images=False, relative_to=d) for s in samples], files[split])
        (d / f"counts_{split}.md").write_text(count_table(samples) + "\n", "utf-8")
        (d / f"images_{split}.json").write_text(json.dumps([im.key for im in images], indent=0), "utf-8")
        print(f"traces {split}: {len(images)} images, {len(samples)} conversations, {len(failed)} failed", flush=True)
        for f in failed[:5]:
            print("  ", f, flush=True)
    return files


def build_model(out: Path, train_file: Path, a: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    from echo_agent.training.curriculum import read_jsonl
    from echo_agent.training.sft_trainer import load_model_and_processor
    from echo_agent.training.tiny_model import build_tiny_qwen_vl, curriculum_corpus

    model_dir = build_tiny_qwen_vl("qwen3_vl", out / "tiny_qwen3_vl", seed=a.seed,
                                   corpus=curriculum_corpus(read_jsonl(train_file)), vocab_size=a.vocab_size,
                                   text_hidden=a.text_hidden, text_layers=a.text_layers,
                                   max_position_embeddings=a.max_positions, split_digits=not a.merge_digits,
                                   vision=a.vision)
    model, _ = load_model_and_processor(str(model_dir), dtype="float32")
    tc = model.config.text_config
    return model_dir, {"text_hidden": tc.hidden_size, "text_layers": tc.num_hidden_layers, "vocab": tc.vocab_size,
                       "vision": a.vision, "parameters": sum(p.numel() for p in model.parameters()),
                       "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def token_lengths(model_dir: Path, train_file: Path, k: int = 40) -> dict[str, float]:
    """Median and max tokens of the first ``k`` conversations of each task (the cost of a step)."""
    from transformers import AutoProcessor

    from echo_agent.training.curriculum import read_jsonl, resolve_images
    from echo_agent.training.sft_trainer import fill_images, open_rgb

    proc = AutoProcessor.from_pretrained(model_dir)
    by_task: dict[str, list[int]] = {}
    for r in read_jsonl(train_file):
        if len(by_task.setdefault(r["task"], [])) >= k:
            continue
        msgs = fill_images(r["messages"], [open_rgb(p) for p in resolve_images(r, train_file.parent)])
        ids = proc.apply_chat_template(msgs, tools=json.loads(r["tools"]) if r["tools"] else None, tokenize=True,
                                       return_dict=True)["input_ids"]
        by_task[r["task"]].append(len(ids[0]) if isinstance(ids[0], list) else len(ids))
    import statistics

    return {f"{t}_median": statistics.median(v) for t, v in by_task.items()} | {
        f"{t}_max": max(v) for t, v in by_task.items()}


def sft(out: Path, model_dir: Path, train_file: Path, a: argparse.Namespace) -> dict[str, Any]:
    from echo_agent.training._config import load_config
    from echo_agent.training.sft_config import EchoSFTConfig
    from echo_agent.training.sft_trainer import run_sft

    cfg = load_config(EchoSFTConfig, a.sft_config, [
        f"model_path={model_dir}", f"train_file={train_file}", f"output_dir={out / 'sft'}", f"seed={a.seed}", *a.sft_set])
    res = run_sft(cfg)
    res["loss_curve"] = [(h["step"], h["loss"]) for h in json.loads((out / "sft" / "log_history.json").read_text())
                         if "loss" in h]
    return res


class TracedAgent:
    """An ``EchoAgent`` for the eval harness that also keeps :func:`run_validity` of every run."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.validity: list[dict[str, Any]] = []

    def run(self, image: Any, *, organ: str | None = None, context: Any = None) -> Any:
        from echo_agent.schemas import Diagnosis
        from echo_agent.training.curriculum.traces import run_validity

        state = self.agent.run_state(image, organ=organ, context=context)
        self.validity.append(run_validity(state))
        return Diagnosis.model_validate(state["diagnosis"])


def validity_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    calls = sum(r["tool_calls"] for r in rows)
    dx = Counter(r["diagnosis"] for r in rows)
    n = max(len(rows), 1)
    return {
        "runs": len(rows), "tool_calls": calls,
        "valid_tool_call_rate": sum(r["valid_tool_calls"] for r in rows) / max(calls, 1),
        "runs_with_tool_calls": sum(1 for r in rows if r["tool_calls"]) / n,
        "runs_closed_by_policy": sum(1 for r in rows if r["closed"]) / n,
        "valid_diagnosis_rate": dx["first"] / n, "repaired_rate": dx["repaired"] / n, "fallback_rate": dx["fallback"] / n,
    }


def micro_agent(model_dir: Path, max_new_tokens: int, structured: str = "text", answer: str = "diagnosis") -> Any:
    from echo_agent import EchoAgent
    from echo_agent.reasoners.llm_finalizer import LLMFinalizer
    from echo_agent.reasoners.qwen_vl import QwenVLChatModel

    llm = QwenVLChatModel(model_path=str(model_dir), max_new_tokens=max_new_tokens, images_in_tool_messages=False,
                          device="cpu", dtype="float32")
    return EchoAgent(reasoner=llm, finalizer=LLMFinalizer(llm, structured=structured, answer=answer), router=None)


def agent_metrics(result: Any) -> dict[str, Any]:
    """Per organ, for the agent and the detector alone: accuracy, balanced accuracy, AUC, ECE and
    localization F1@0.5, from the harness's metrics.json."""
    metrics = json.loads(Path(result.metrics_path).read_text())
    out: dict[str, Any] = {}
    for organ, m in (metrics.get("organs") or {}).items():
        for system in ("agent", "detector"):
            s = (m.get("overall") or {}).get(system) or {}
            cls, auc, cal = s.get("classification") or {}, s.get("auc") or {}, s.get("calibration") or {}
            out.setdefault(organ, {})[system] = {
                "n": s.get("n_images"), "accuracy": cls.get("accuracy"), "balanced_accuracy": cls.get("balanced_accuracy"),
                "auc": auc.get("value"), "ece": cal.get("ece"), "localization_f1": (s.get("localization") or {}).get("f1"),
            }
    return out


def fresh_val_keys(a: argparse.Namespace, used: list[str], per_organ: int) -> list[str]:
    """Val images outside ``used``, for measuring a change chosen while looking at the ``used``
    images: a seeded sample of ``per_organ`` per organ (at most ``--frames-per-clip`` per clip),
    first from groups (near-duplicate groups, kidney clips) that ``used`` does not touch, then, where
    those run out, other frames of the touched groups."""
    from echo_agent.eval.splits import cv_group

    everything, used_set = all_images(a.manifest), set(used)
    images = [im for im in everything if im.split == "val" and im.key not in used_set]
    used_groups = {cv_group(im) for im in everything if im.key in used_set}
    untouched = pick_images([im for im in images if cv_group(im) not in used_groups], "val", per_organ,
                            a.frames_per_clip, a.seed + 1)
    out = [im.key for im in untouched]
    for organ in sorted({im.organ for im in images}):
        short = per_organ - sum(1 for im in untouched if im.organ == organ)
        if short > 0:
            touched = [im for im in images if im.organ == organ and cv_group(im) in used_groups]
            out += [im.key for im in pick_images(touched, "val", short, a.frames_per_clip, a.seed + 1)]
    return sorted(out)


def evaluate_agents(out: Path, val_keys: list[str], model_dir: Path | None, a: argparse.Namespace, name: str,
                    embedded: bool, embedded_name: str = "embedded") -> dict[str, Any]:
    from echo_agent import EchoAgent
    from echo_agent.eval.harness import evaluate

    keys = set(val_keys)
    images = [im for im in all_images(a.manifest) if im.key in keys and im.split == "val"]
    res: dict[str, Any] = {}
    if embedded:
        r = evaluate(images, agent=EchoAgent(router=None), out_dir=out / "eval" / embedded_name, progress=False,
                     plots=False, overwrite=True, command="tools/train_micro_policy.py (embedded policy)")
        res["embedded"] = agent_metrics(r)
    if model_dir is not None:
        traced = TracedAgent(micro_agent(model_dir, a.max_new_tokens, a.structured, a.answer))
        t = time.time()
        r = evaluate(images, agent=traced, out_dir=out / "eval" / name, progress=False, plots=False, overwrite=True,
                     command=f"tools/train_micro_policy.py ({name})")
        res[name] = agent_metrics(r)
        res[name]["validity"] = validity_summary(traced.validity)
        if (out / "eval" / "embedded" / "predictions.jsonl").is_file():
            res[name]["own_answers"] = own_answers(out, name)
        res[name]["seconds_per_image"] = (time.time() - t) / max(len(images), 1)
        (out / "eval" / name / "validity.jsonl").write_text(
            "".join(json.dumps(v) + "\n" for v in traced.validity), "utf-8")
    return res


def own_answers(out: Path, name: str) -> dict[str, Any]:
    """Per organ, on the val images where the micro policy's own Diagnosis was accepted (not the
    fusion fallback): its accuracy and localization F1@0.5 next to the embedded policy's on the same
    images. A fallback copies the embedded result, so the overall numbers flatter a weak policy."""
    from echo_agent.eval.metrics import PredictedBox, ScoredImage, detection_score
    from echo_agent.organs import get_organ
    from echo_agent.schemas import Box

    def read(system: str) -> dict[str, dict[str, Any]]:
        path = out / "eval" / system / "predictions.jsonl"
        return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}

    def scored(r: dict[str, Any], organ: Any) -> ScoredImage:
        dx = r["agent"]["diagnosis"]
        boxes = tuple(PredictedBox(Box(**f["box"]), organ.image_label_for(f["label"]), float(f["score"]))
                      for f in dx["findings"])
        return ScoredImage(key=r["key"], true_label=r["truth"]["label"], pred_label=dx["label"], pred_boxes=boxes,
                           true_boxes=tuple(Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for b in r["truth"]["boxes"]))

    micro, emb = read(name), read("embedded")
    res: dict[str, Any] = {}
    for organ_name in sorted({r["organ"] for r in micro.values()}):
        organ = get_organ(organ_name)
        keys = [k for k, r in micro.items() if r["organ"] == organ_name and (r["agent"].get("diagnosis") or {})
                .get("reasoner", "").startswith("llm:") and k in emb and emb[k]["agent"].get("diagnosis")]
        row: dict[str, Any] = {"n_own": len(keys), "n": sum(1 for r in micro.values() if r["organ"] == organ_name)}
        for system, recs in (("micro", micro), ("embedded", emb)):
            imgs = [scored(recs[k], organ) for k in keys]
            row[system] = {
                "accuracy": sum(i.pred_label == i.true_label for i in imgs) / len(imgs) if imgs else None,
                "localization_f1": detection_score(imgs, normal_label=organ.normal_label).f1 if imgs else None,
            }
        res[organ_name] = row
    return res


def grey_copies(recs: list[dict[str, Any]], base: Path, folder: Path) -> list[dict[str, Any]]:
    """The records with each image replaced by a mid-grey image of its size (written under ``folder``):
    what a policy scores without the pixels, beside what it scores with them."""
    from PIL import Image

    from echo_agent.imaging.io import image_size
    from echo_agent.training.curriculum import resolve_images

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in recs:
        paths = []
        for p in resolve_images(r, base):
            size = image_size(p)
            grey = folder / f"grey_{size[0]}x{size[1]}.png"
            if not grey.is_file():
                Image.new("RGB", size, (128, 128, 128)).save(grey)
            paths.append(str(grey.resolve()))
        out.append({**r, "images": paths})
    return out


def val_rewards(model_dir: Path, val_file: Path, preset: Any, max_prompts: int, max_new_tokens: int,
                samples: int = 0, temperature: float = 1.0, grey: bool = False) -> dict[str, dict[str, Any]]:
    """The checkpoint's val rewards: under ``"greedy"``, the mean weighted reward (and its terms) of
    greedy answers to a seeded sample of ``max_prompts`` val ``agent_final`` prompts (the first run
    took the first ones in file order: breast only).

    ``samples`` > 0: also, under ``"sampled"``, that of ``samples`` answers per prompt sampled at
    ``temperature`` (the expected reward GRPO optimises), each prompt's generator seeded by its
    position, so a checkpoint's measure is reproducible and checkpoints are compared on the same
    draws. The model is loaded once for both. ``grey``: every prompt's image replaced by a mid-grey
    one of its size (:func:`grey_copies`), the same prompts and draws otherwise."""
    from echo_agent.training.answer_rewards import answer_rewards_by_samples
    from echo_agent.training.curriculum import read_jsonl
    from echo_agent.training.rewards import get_preset
    from echo_agent.training.sft_trainer import load_model_and_processor

    model, proc = load_model_and_processor(str(model_dir), dtype="float32")
    model.eval()
    recs = [r for r in read_jsonl(val_file) if r["task"] == "agent_final"]
    # a seeded sample, so both organs are in it (the file lists one organ after the other)
    recs = random.Random(0).sample(recs, min(max_prompts, len(recs)))
    if grey:
        recs = grey_copies(recs, val_file.parent, val_file.parent / "grey_images")

    counts = [0, samples] if samples else [0]
    got = answer_rewards_by_samples(model, proc, recs, val_file.parent, get_preset(preset), counts,
                                    temperature=temperature, max_new_tokens=max_new_tokens)

    def measure(k: int) -> dict[str, Any]:
        return {"n": len(recs), **({"samples": k, "temperature": temperature} if k else {}),
                "mean_reward": got[k].mean, "terms": got[k].terms,
                "example": got[k].texts[0][0][:400] if got[k].texts else ""}

    return {"greedy": measure(0), **({"sampled": measure(samples)} if samples else {})}


def grpo_config(out: Path, sft_final: Path, train_file: Path, seed: int, a: argparse.Namespace) -> Any:
    from echo_agent.training._config import load_config
    from echo_agent.training.grpo_config import EchoGRPOConfig

    return load_config(EchoGRPOConfig, a.grpo_config, [
        f"model_path={sft_final}", f"train_file={train_file}", f"output_dir={out / f'grpo_seed{seed}'}",
        f"seed={seed}", *a.grpo_set])


def grpo(out: Path, sft_final: Path, train_file: Path, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    from echo_agent.training.grpo_trainer import run_grpo

    cfg = grpo_config(out, sft_final, train_file, seed, a)
    res = run_grpo(cfg)
    hist = json.loads((Path(cfg.output_dir) / "log_history.json").read_text())
    res["curve"] = [{k: v for k, v in h.items() if k == "step" or k.startswith(("reward", "rewards/", "completions/mean",
                                                                               "frac_reward_zero_std", "kl"))}
                    for h in hist if "reward" in h]
    return res


def plot(results: dict[str, Any], path: Path) -> None:
    """SFT training loss, and per GRPO seed the reward of the sampled rollouts per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    curve = (results.get("sft") or {}).get("loss_curve") or []
    axes[0].plot([c[0] for c in curve], [c[1] for c in curve], marker=".")
    axes[0].set(title="SFT: training loss (assistant tokens)", xlabel="step", ylabel="loss", yscale="log")
    for seed, g in sorted((results.get("grpo") or {}).items()):
        pts = [(c["step"], c["reward"]) for c in g.get("curve") or [] if c.get("reward") is not None]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"seed {seed}")
    axes[1].set(title="GRPO: mean reward of the rollouts per step", xlabel="step")
    if results.get("grpo"):
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from echo_agent.training.tiny_model import VISIONS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/micro_policy")
    ap.add_argument("--manifest", default=None,
                    help="Sample from this manifest's train / val rows instead of the staged centers "
                         f"({', '.join(CENTERS)}).")
    ap.add_argument("--train-images", type=int, default=250, help="Train images per organ.")
    ap.add_argument("--val-images", type=int, default=60, help="Val images per organ (measurement only).")
    ap.add_argument("--frames-per-clip", type=int, default=2, help="At most this many frames of one kidney clip.")
    ap.add_argument("--vocab-size", type=int, default=3000)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--max-positions", type=int, default=8192)
    ap.add_argument("--vision", choices=VISIONS, default="vit",
                    help="The policy's vision side: Qwen3-VL's own tower (random, 'vit') or a frozen ImageNet "
                         "EfficientNet-Lite feeding the language model through a trained projection.")
    ap.add_argument("--grey-images", action="store_true",
                    help="With --reward-checkpoint: replace every val prompt's image by a mid-grey one of its "
                         "size (does the policy read the pixels?).")
    ap.add_argument("--merge-digits", action="store_true",
                    help="Let the tokenizer merge digits into number tokens (the first run's setting; the default "
                         "spells numbers digit by digit, as Qwen's tokenizers do).")
    ap.add_argument("--sft-config", default=str(REPO / "configs" / "training" / "micro_policy_sft.yaml"))
    ap.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a field of the SFT config (repeatable), e.g. max_steps=40.")
    ap.add_argument("--grpo-config", default=str(REPO / "configs" / "training" / "micro_policy_grpo.yaml"))
    ap.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a field of the GRPO config (repeatable), e.g. max_steps=2.")
    ap.add_argument("--grpo-seeds", default="0,1,2", help="One GRPO run per seed ('' = no GRPO).")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="Per reply (compact Diagnoses in run 5's traces: 42-84 tokens median, 108 max).")
    ap.add_argument("--reward-prompts", type=int, default=60, help="Val agent_final prompts for the reward measure.")
    ap.add_argument("--final-variants", type=int, default=0, metavar="K",
                    help="Counterfactual agent_final samples per train run: the baseline's numbers and the target "
                         "change together, so the policy must copy them (agent_traces(final_variants=K)).")
    ap.add_argument("--reuse", action="store_true", help="Reuse traces, model and SFT checkpoint already in --out.")
    ap.add_argument("--skip-eval", action="store_true", help="Do not run the agents on the val images.")
    ap.add_argument("--plot", default="", help="Write the SFT loss and GRPO reward curves to this PNG.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--structured", choices=("text", "json_schema"), default="text",
                    help="How the micro agent's finalizer asks for the Diagnosis: free text, or decoding "
                         "constrained to the Diagnosis JSON schema (QwenVLChatModel.with_structured_output).")
    ap.add_argument("--answer", choices=("diagnosis", "decision"), default="diagnosis",
                    help="The final turn's answer format (LLMFinalizer(answer=...)): the whole Diagnosis, or the "
                         "decision (label, cited candidates, rationale) with the numbers from the tools; the traces "
                         "and the agent's finalizer both use it.")
    ap.add_argument("--eval-checkpoint", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
                    help="Only evaluate these checkpoints in the agent on the val images (repeatable; needs "
                         "the traces in --out); results go to results.json under eval_NAME.")
    ap.add_argument("--reward-checkpoint", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
                    help="Only measure the val reward of these checkpoints (repeatable; needs the traces in --out): "
                         "greedy, and with --reward-samples K also sampled; results go to results.json under "
                         "rewards_NAME.")
    ap.add_argument("--reward-samples", type=int, default=0, metavar="K",
                    help="Also measure the mean reward of K answers per val prompt sampled at the GRPO rollout "
                         "temperature (the expected reward GRPO optimises), for the SFT checkpoint and each seed.")
    ap.add_argument("--fresh-val", type=int, default=0, metavar="N",
                    help="With --eval-checkpoint: evaluate on N val images per organ outside the traces' val "
                         "sample and its clips (written once to traces/images_val_fresh.json), with the "
                         "embedded policy on the same images.")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": "python tools/train_micro_policy.py " + " ".join(argv or sys.argv[1:])}
    timings: dict[str, float] = {}
    res_path = out / "results.json"
    command = results["command"]
    measure_only = bool(a.eval_checkpoint or a.reward_checkpoint)
    if (a.reuse or measure_only) and res_path.is_file():  # an evaluation adds to the run's results
        results = json.loads(res_path.read_text())
        if not measure_only:
            results["command"] = command
        timings = results.get("timings_s", {})

    def save() -> None:
        results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        res_path.write_text(json.dumps(results, indent=1, default=str), "utf-8")

    files = {"train": out / "traces" / "train.jsonl", "val": out / "traces" / "val.jsonl"}
    if a.reward_checkpoint:
        gcfg = grpo_config(out, out / "sft" / "final", files["train"], a.seed, a)
        preset = gcfg.reward_weights or gcfg.preset
        for name, ckpt in a.reward_checkpoint:
            t = time.time()
            res = {"command": command, **val_rewards(Path(ckpt), files["val"], preset, a.reward_prompts,
                                                     gcfg.max_completion_length, a.reward_samples, gcfg.temperature,
                                                     grey=a.grey_images)}
            results[f"rewards_{name}"] = res
            timings[f"rewards_{name}_s"] = time.time() - t
            print(f"rewards_{name}", json.dumps(res), flush=True)
            save()
        return 0
    if a.eval_checkpoint:
        val_keys = json.loads((out / "traces" / "images_val.json").read_text())
        embedded = False
        if a.fresh_val:
            fresh = out / "traces" / "images_val_fresh.json"
            if not fresh.is_file():
                fresh.write_text(json.dumps(fresh_val_keys(a, val_keys, a.fresh_val), indent=0))
            val_keys, embedded = json.loads(fresh.read_text()), "embedded_fresh" not in results
        for name, ckpt in a.eval_checkpoint:
            t = time.time()
            res = evaluate_agents(out, val_keys, Path(ckpt), a, name, embedded=embedded, embedded_name="embedded_fresh")
            if "embedded" in res:
                results["embedded_fresh"] = {"n_images": len(val_keys), **res.pop("embedded")}
                embedded = False
            results[f"eval_{name}"] = {"command": command, "structured": a.structured, "answer": a.answer,
                                       "images": "fresh" if a.fresh_val else "val",
                                       "n_images": len(val_keys), **res}
            timings[f"eval_{name}_s"] = time.time() - t
            print(f"eval_{name}", json.dumps(results[f"eval_{name}"], indent=1), flush=True)
            save()
        return 0
    if not (a.reuse and files["train"].is_file()):
        t = time.time()
        files = build_traces(out, a)
        timings["traces_s"] = time.time() - t
        save()
    sft_final = out / "sft" / "final"
    if not (a.reuse and sft_final.is_dir()):
        t = time.time()
        model_dir, results["model"] = build_model(out, files["train"], a)
        results["tokens"] = token_lengths(model_dir, files["train"])
        print("model", results["model"], results["tokens"], flush=True)
        timings["model_s"] = time.time() - t
        t = time.time()
        results["sft"] = sft(out, model_dir, files["train"], a)
        timings["sft_s"] = time.time() - t
        save()
    val_keys = json.loads((out / "traces" / "images_val.json").read_text())
    if "eval_sft" not in results and not a.skip_eval:
        t = time.time()
        results["eval_sft"] = evaluate_agents(out, val_keys, sft_final, a, "micro_sft", embedded=True)
        timings["eval_sft_s"] = time.time() - t
        print("eval_sft", json.dumps(results["eval_sft"], indent=1), flush=True)
        save()
    seeds = [int(s) for s in a.grpo_seeds.split(",") if s.strip()]
    gcfg = grpo_config(out, sft_final, files["train"], a.seed, a)
    preset = gcfg.reward_weights or gcfg.preset
    if seeds:
        t = time.time()
        r = val_rewards(sft_final, files["val"], preset, a.reward_prompts, gcfg.max_completion_length,
                        a.reward_samples, gcfg.temperature)
        results["reward_sft"] = r["greedy"]
        if "sampled" in r:
            results["reward_sft_sampled"] = r["sampled"]
        timings["reward_sft_s"] = time.time() - t
        print("reward_sft", results["reward_sft"], flush=True)
        save()
    for seed in seeds:
        t = time.time()
        g = grpo(out, sft_final, files["train"], seed, a)
        r = val_rewards(Path(g["final_dir"]), files["val"], preset, a.reward_prompts, gcfg.max_completion_length,
                        a.reward_samples, gcfg.temperature)
        g["val_reward"] = r["greedy"]
        if "sampled" in r:
            g["val_reward_sampled"] = r["sampled"]
        results.setdefault("grpo", {})[str(seed)] = g
        timings[f"grpo_seed{seed}_s"] = time.time() - t
        print(f"grpo seed {seed}: val reward {results['reward_sft']['mean_reward']:.3f} -> "
              f"{g['val_reward']['mean_reward']:.3f}", flush=True)
        save()
    if seeds and not a.skip_eval:
        t = time.time()
        first = Path(results["grpo"][str(seeds[0])]["final_dir"])
        results["eval_grpo"] = evaluate_agents(out, val_keys, first, a, f"micro_grpo_seed{seeds[0]}", embedded=False)
        timings["eval_grpo_s"] = time.time() - t
        print("eval_grpo", json.dumps(results["eval_grpo"], indent=1), flush=True)
    save()
    if a.plot:
        plot(results, Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
