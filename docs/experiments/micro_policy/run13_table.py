"""Run 13's table and addendum 10's rule, from the run folders' results.json.

    python docs/experiments/micro_policy/run13_table.py runs/micro_policy_run12 runs/micro_policy_run13 \
        [--json docs/training_micro_policy_run13_results.json]

Reads ``<run>/results.json`` (the SFT checkpoint's agent evaluation), ``<run>_s{0,1,2}/results.json``
(each GRPO seed: val rewards before and after, the agent evaluation of its checkpoint) and, where
present, the grey-image rewards in ``<run13>/results.json``; prints markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SEEDS = (0, 1, 2)


def load(path: Path) -> dict[str, Any]:
    return json.loads((path / "results.json").read_text()) if (path / "results.json").is_file() else {}


def agent_row(ev: dict[str, Any]) -> tuple[float, int, float, str, str]:
    v = ev["validity"]
    b, k = ev["breast"]["agent"], ev["kidney"]["agent"]
    return (v["valid_tool_call_rate"], v["tool_calls"], v["valid_diagnosis_rate"],
            f"{b['accuracy']:.3f} / {b['localization_f1']:.3f}", f"{k['accuracy']:.3f} / {k['localization_f1']:.3f}")


def summary(run: Path) -> dict[str, Any]:
    """SFT and per-seed numbers of one run."""
    base = load(run)
    out: dict[str, Any] = {"sft_agent": agent_row(base["eval_sft"]["micro_sft"]) if "eval_sft" in base else None,
                           "embedded": base.get("eval_sft", {}).get("embedded"), "seeds": {}}
    for k in SEEDS:
        r = load(Path(f"{run}_s{k}"))
        if "grpo" not in r:
            continue
        g = r["grpo"][str(k)]
        out["sft_reward"] = r["reward_sft"]
        out["sft_sampled"] = r.get("reward_sft_sampled")
        ev = r.get(f"eval_grpo_seed{k}_schema", {}).get(f"grpo_seed{k}_schema")
        kl = max((c.get("kl", 0.0) for c in g.get("curve", []) if isinstance(c, dict)), default=float("nan"))
        zero = [c["frac_reward_zero_std"] for c in g.get("curve", []) if isinstance(c, dict) and "frac_reward_zero_std" in c]
        out["seeds"][k] = {"greedy": g["val_reward"], "sampled": g.get("val_reward_sampled"), "kl": kl,
                           "zero": sum(zero) / len(zero) if zero else float("nan"),
                           "agent": agent_row(ev) if ev else None}
    out["grey"] = {n: base[n] for n in base if n.startswith("rewards_") and n.endswith("_grey")}
    return out


def fmt_agent(a: tuple[float, int, float, str, str] | None) -> str:
    if not a:
        return "– | – | –"
    return f"{100 * a[0]:.1f} % of {a[1]} / {100 * a[2]:.1f} % | {a[3]} | {a[4]}"


def combined(run: Path) -> dict[str, Any]:
    """Every number of a run and its seed copies in one object (the file docs/training.md links)."""
    base = load(run)
    out: dict[str, Any] = {k: base[k] for k in ("command", "timings_s", "model", "tokens", "sft", "eval_sft", "notes")
                           if k in base}
    out.update({k: base[k] for k in base if k.startswith("rewards_")})
    for k in SEEDS:
        r = load(Path(f"{run}_s{k}"))
        if "grpo" not in r:
            continue
        out.setdefault("reward_sft_by_seed_dir", {})[str(k)] = {"greedy": r.get("reward_sft"),
                                                               "sampled": r.get("reward_sft_sampled")}
        out.setdefault("grpo", {})[str(k)] = r["grpo"][str(k)]
        out.setdefault("eval_grpo", {})[str(k)] = r.get(f"eval_grpo_seed{k}_schema")
        out.setdefault("timings_s_by_seed", {})[str(k)] = r.get("timings_s")
    return out


def main(argv: list[str]) -> int:
    if "--json" in argv:
        i = argv.index("--json")
        Path(argv[i + 1]).write_text(json.dumps(combined(Path(argv[2])), indent=1, default=str) + "\n", "utf-8")
        argv = argv[:i] + argv[i + 2:]
    base_run, run = (Path(p) for p in argv[1:3])
    ref, new = summary(base_run), summary(run)
    print("| checkpoint | greedy val reward, 120 (format) | sampled, 120 × 4 | max KL | zero-spread | "
          "agent: valid tool calls / first Diagnosis | breast acc. / loc. F1 | kidney acc. / loc. F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in ((base_run.name, ref), (run.name, new)):
        sr, ss = s.get("sft_reward"), s.get("sft_sampled")
        if sr:
            print(f"| {name} SFT | {sr['mean_reward']:.4f} ({sr['terms']['format']:.3f}) | "
                  f"{ss['mean_reward'] if ss else float('nan'):.4f} | – | – | {fmt_agent(s['sft_agent'])} |")
        for k, g in s["seeds"].items():
            sampled = g["sampled"]["mean_reward"] if g["sampled"] else float("nan")
            print(f"| {name} GRPO seed {k} | {g['greedy']['mean_reward']:.4f} ({g['greedy']['terms']['format']:.3f}) | "
                  f"{sampled:.4f} | {g['kl']:.3f} | {g['zero']:.2f} | {fmt_agent(g['agent'])} |")
    print()
    if new["grey"]:
        print("| SFT checkpoint | greedy val reward: images → grey | sampled: images → grey |")
        print("|---|---:|---:|")
        for tag, s in (("sft12_grey", ref), ("sft13_grey", new)):
            grey = new["grey"].get(f"rewards_{tag}")
            if grey and s.get("sft_reward"):
                print(f"| {tag[:5]} | {s['sft_reward']['mean_reward']:.4f} → {grey['greedy']['mean_reward']:.4f} | "
                      f"{s['sft_sampled']['mean_reward']:.4f} → {grey['sampled']['mean_reward']:.4f} |")
        print()
    # addendum 10's rule
    sr, sa = new.get("sft_reward"), new.get("sft_agent")
    ref_agent = ref["sft_agent"]
    checks = []
    if sr and sa and ref_agent:
        checks.append(("(a) SFT greedy reward ≥ 3.1195 − 0.01", sr["mean_reward"] >= 3.1195 - 0.01))
        checks.append(("(a) SFT valid tool calls within 5 calls of run 12's",
                       sa[0] * sa[1] >= ref_agent[0] * sa[1] - 5))
        checks.append(("(a) SFT first Diagnoses within one run of run 12's", sa[2] >= ref_agent[2] - 1 / 120 - 1e-9))
    strict = []
    for k in SEEDS:
        g = new["seeds"].get(k)
        if not (g and sr and sa and g["agent"]):
            checks.append((f"(b) seed {k}: not run", False))
            continue
        up = g["greedy"]["mean_reward"] - sr["mean_reward"]
        fmt = g["greedy"]["terms"]["format"] >= sr["terms"]["format"]
        tools = g["agent"][0] * g["agent"][1] >= sa[0] * g["agent"][1] - 5
        diag = g["agent"][2] >= sa[2] - 1 / 120 - 1e-9
        checks.append((f"(b) seed {k}: greedy {up:+.4f} ≥ +0.01, format kept, validity within one run",
                       up >= 0.01 and fmt and tools and diag))
        sampled_up = (g["sampled"]["mean_reward"] - new["sft_sampled"]["mean_reward"]) if g["sampled"] else float("nan")
        strict.append(f"seed {k}: greedy {up:+.4f}, sampled {sampled_up:+.4f}, validity "
                      f"{'not lower' if g['agent'][0] >= sa[0] and g['agent'][2] >= sa[2] else 'lower'}")
    for what, ok in checks:
        print(f"- {what}: {'✔' if ok else '✘'}")
    print(f"- rule: {'adopted' if checks and all(ok for _, ok in checks) else 'not adopted'}")
    print("- issue 20 as written: " + "; ".join(strict))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
