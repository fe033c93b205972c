#!/usr/bin/env python
"""Build manifests of the staged datasets (BUSI, BrEaST-Lesions_USG, Hydronephrosis-NCNU).

    python tools/prepare_data.py --out /tmp/echo_data            # manifests with committed splits
    python tools/prepare_data.py --out /tmp/echo_data --relative # image paths relative to the CSVs
    python tools/prepare_data.py --write-splits                  # regenerate echo_agent/eval/splits/*.csv

For each center it writes ``<out>/<center>/{all,train,val,test}.csv`` and ``flags.csv`` (image key ->
flags: cross_class_duplicate, colour_overlay, burned_in_annotation (BUSI), other_finding (BrEaST),
no_box (hydronephrosis)), and prints counts and the leakage check.
Data root: ``--data-root`` or ``$ECHO_AGENT_DATA`` (default ``<repo>/../shared/data``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echo_agent.eval.datasets import (  # noqa: E402
    BUSI,
    committed_splits,
    compute_splits,
    flag_burned_in_annotations,
    list_centers,
    load_center,
    split_file,
)
from echo_agent.eval.manifest import write_manifest  # noqa: E402
from echo_agent.eval.splits import (  # noqa: E402
    SPLITS,
    apply_splits,
    leakage_report,
    write_split_file,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder for manifests (outside the repository)")
    ap.add_argument("--data-root", type=Path, help="folder holding BUSI/, BrEaST-Lesions_USG/, Hydronephrosis-NCNU/")
    ap.add_argument("--centers", nargs="+", default=list_centers(), choices=list_centers(),
                    help="registered centers (the built-ins and those of installed plug-ins)")
    ap.add_argument("--relative", action="store_true", help="write image paths relative to each manifest")
    ap.add_argument("--write-splits", action="store_true", help="recompute and overwrite the committed split files")
    ap.add_argument("--check-pixels", action="store_true", help="also check pixel-identical images across splits")
    ap.add_argument("--no-annotation-scan", action="store_true",
                    help="skip flagging BUSI images with burned-in annotations (decodes every image)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing manifests in --out")
    args = ap.parse_args(argv)
    if args.data_root is not None:
        os.environ["ECHO_AGENT_DATA"] = str(args.data_root.resolve())
    if args.out is None and not args.write_splits:
        ap.error("give --out DIR and/or --write-splits")
    for center in args.centers:
        build = load_center(center)
        if args.write_splits:
            write_split_file(compute_splits(build), split_file(center))
        images = apply_splits(build.images, committed_splits(build))
        rep = leakage_report(images, check_pixels=args.check_pixels)
        excluded = sum(im.split == "excluded" for im in images)
        print(f"{center}: {len(images)} images, excluded {excluded}, groups/split {rep.groups_per_split}")
        for s in SPLITS:
            print(f"  {s:5s} {sum(rep.counts[s].values()):5d} {rep.counts[s]}")
        if args.out is None:
            continue
        if center == BUSI and not args.no_annotation_scan:
            print(f"  flagged {flag_burned_in_annotations(build)} images with burned-in annotations")
        folder = args.out / center
        folder.mkdir(parents=True, exist_ok=True)
        rel = folder if args.relative else None
        write_manifest(images, folder / "all.csv", relative_to=rel, overwrite=args.overwrite)
        for s in SPLITS:
            write_manifest([im for im in images if im.split == s], folder / f"{s}.csv", relative_to=rel,
                           overwrite=args.overwrite)
        with (folder / "flags.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["key", "flags"])
            for key, flags in sorted(build.flags.items()):
                w.writerow([key, ";".join(flags)])
        print(f"  wrote {folder}/{{all,train,val,test,flags}}.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
