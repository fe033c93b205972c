"""Build the nine-task SFT curriculum from a manifest (or a staged center's committed split).

    python tools/build_curriculum.py --center breast_lesions_usg --split train --out data/curriculum \
        --detector simulated --max-images 40
    python tools/build_curriculum.py --manifest my.csv --predictions eval/predictions.jsonl --out cur/

Writes ``<out>/<split>.jsonl`` (one conversation per line, images by path relative to ``<out>``),
``<out>/overlays/`` (detector overlay images of tool turns), ``<out>/counts.md`` (per-task table),
``<out>/curriculum_config.json``, and with ``--hf`` a ``datasets`` folder ``<out>/hf_<split>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="Manifest CSV with a split column.")
    src.add_argument("--center", action="append", help="Staged center(s) with committed splits (repeatable).")
    ap.add_argument("--out", required=True, help="Output folder.")
    ap.add_argument("--split", default="train", help="Split to build (train or val; test is refused).")
    ap.add_argument("--tasks", nargs="*", default=None, help="Subset of the nine tasks.")
    ap.add_argument("--detector", choices=["predictions", "live", "simulated"], default=None,
                    help="Candidate source (default: predictions when --predictions is given, else live).")
    ap.add_argument("--predictions", help="JSONL of detector predictions (eval harness predictions.jsonl).")
    ap.add_argument("--max-images", type=int, default=None, help="Seeded sample of at most N images.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-overlays", action="store_true", help="No detector overlay images in tool turns.")
    ap.add_argument("--hf", action="store_true", help="Also save a HF datasets folder.")
    a = ap.parse_args(argv)

    from echo_agent.training.curriculum import (
        TASKS,
        CurriculumBuilder,
        CurriculumConfig,
        LiveDetector,
        PredictionsFile,
        SimulatedDetector,
        check_no_leakage,
        config_dict,
        count_table,
        to_hf_dataset,
        to_hf_record,
        write_jsonl,
    )

    if a.manifest:
        from echo_agent.eval.manifest import load_manifest

        images = load_manifest(a.manifest)
    else:
        from echo_agent.eval.datasets import load_split

        images = [im for c in a.center for im in load_split(c, None)]
    kind = a.detector or ("predictions" if a.predictions else "live")
    if kind == "predictions":
        if not a.predictions:
            ap.error("--detector predictions needs --predictions FILE")
        source = PredictionsFile(a.predictions)
    elif kind == "live":
        source = LiveDetector()
    else:
        source = SimulatedDetector(a.seed)
    cfg = CurriculumConfig(tasks=tuple(a.tasks or TASKS), split=a.split, seed=a.seed, max_images=a.max_images,
                           overlays=not a.no_overlays)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = CurriculumBuilder(cfg, detections=source, overlay_dir=out / "overlays").build(images)
    check_no_leakage(samples, images)
    records = [to_hf_record(s, relative_to=out) for s in samples]
    n = write_jsonl(records, out / f"{a.split}.jsonl")
    table = count_table(samples)
    (out / "counts.md").write_text(table + "\n", "utf-8")
    (out / "curriculum_config.json").write_text(
        json.dumps({**config_dict(cfg), "detector": source.name, "sources": a.manifest or a.center}, indent=1), "utf-8")
    if a.hf:
        to_hf_dataset(records, base=out).save_to_disk(str(out / f"hf_{a.split}"))
    print(table)
    print(f"{n} conversations -> {out / (a.split + '.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
