"""Pool cross-validation of the TI-RADS category counted from descriptors (PREREGISTRATION.md here).

    python docs/experiments/tirads_descriptors/pool_count.py --out runs/tirads_descriptors

Describes each categorised DDTI train + val nodule box with the plug-in's captioner, counts the
organ's suspicious descriptor values and scores two count-to-category maps by case folds.
Writes ``count.json`` (and the per-nodule descriptors, ``descriptors.json``) into ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
FOLDS = 5
CATS = ["2", "3", "4a", "4b", "4c", "5"]
KWAK = (1, 2, 3, 4, 4, 5)  # count 0..5 -> index into CATS: 3, 4a, 4b, 4c, 4c, 5


def describe_pool(out: Path, cache_name: str = "descriptors.json") -> list[dict]:
    """One row per categorised train + val nodule: case fold, reader category, suspicious count."""
    cache = out / cache_name
    if cache.exists():
        return json.loads(cache.read_text())
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.splits import cross_fit_fold, cv_group
    from echo_agent.evidence.captioner import PixelCaptioner
    from echo_agent.imaging import load_image
    from echo_agent.organs import get_organ

    spec = get_organ("thyroid")
    cap = PixelCaptioner()
    rows = []
    for split in ("train", "val"):
        for im in load_split("ddti", split):
            if im.category not in CATS or not im.boxes:
                continue
            ctx = cap.describe(load_image(im.image).array, organ="thyroid", regions=[im.boxes[0]])
            d = ctx.regions[0].descriptors
            hits = {k: str(d[k].value) in vals for k, vals in spec.suspicious_descriptors.items() if k in d}
            rows.append({"image": str(im.image), "split": split, "fold": cross_fit_fold(cv_group(im), FOLDS),
                         "category": im.category, "values": {k: str(v.value) for k, v in d.items()},
                         "hits": hits, "count": int(sum(hits.values()))})
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def agreement(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return float((y == pred).mean()), float((np.abs(y - pred) <= 1).mean())


def all_maps() -> list[tuple[int, ...]]:
    """Every non-decreasing map from count 0..5 to a category index 0..5 (462)."""
    return list(itertools.combinations_with_replacement(range(len(CATS)), 6))


def fit_map(count: np.ndarray, y: np.ndarray) -> tuple[int, ...]:
    """The map with the largest S on (count, y); ties: fewest counts mapped unlike Kwak's, then first."""
    def key(m: tuple[int, ...]) -> tuple[float, int]:
        e, w = agreement(y, np.asarray(m)[count])
        return (-(e + w), sum(a != b for a, b in zip(m, KWAK, strict=True)))
    return min(all_maps(), key=key)


def score(y: np.ndarray, pred: np.ndarray) -> dict:
    e, w = agreement(y, pred)
    conf = np.zeros((len(CATS), len(CATS)), dtype=int)
    for a, b in zip(y, pred, strict=True):
        conf[a, b] += 1
    return {"exact": e, "within_one": w, "S": e + w, "n": int(len(y)),
            "predicted": {c: int((pred == i).sum()) for i, c in enumerate(CATS)},
            "confusion_rows_reader_cols_predicted": conf.tolist()}


LEVELS = (0.30, 0.40, 0.50)
BOUNDS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.15)
CURRENT = (0.30, 0.15)


def composition_grid(out: Path) -> dict[tuple[float, float], list[dict]]:
    """Addendum A: the pool described with each (fluid level, mixed lower bound) pair."""
    import echo_organ_thyroid.descriptors as dmod

    saved = dmod.CYSTIC_LEVEL, dmod.CYSTIC_FRACTION
    grid = {}
    try:
        for level in LEVELS:
            for bound in BOUNDS:
                dmod.CYSTIC_LEVEL, dmod.CYSTIC_FRACTION = level, (bound, saved[1][1])
                grid[(level, bound)] = describe_pool(out, f"descriptors_{level:.2f}_{bound:.2f}.json")
    finally:
        dmod.CYSTIC_LEVEL, dmod.CYSTIC_FRACTION = saved
    return grid


def addendum_a(out: Path) -> int:
    grid = composition_grid(out)
    first = grid[CURRENT]
    y = np.asarray([CATS.index(r["category"]) for r in first])
    fold = np.asarray([r["fold"] for r in first])
    counts = {k: np.asarray([r["count"] for r in rows]) for k, rows in grid.items()}
    kwak = np.asarray(KWAK)

    def best_pair(mask: np.ndarray) -> tuple[float, float]:
        def key(k: tuple[float, float]) -> tuple[float, bool, float, float]:
            e, w = agreement(y[mask], kwak[counts[k][mask]])
            return (-(e + w), k != CURRENT, k[1], k[0])
        return min(counts, key=key)

    pred, pairs = np.zeros_like(y), {}
    for f in range(FOLDS):
        k = best_pair(fold != f)
        pairs[f] = list(k)
        pred[fold == f] = kwak[counts[k][fold == f]]
    res = score(y, pred)
    res["pairs_by_fold"] = pairs
    per_pair = {f"{k[0]:.2f}/{k[1]:.2f}": dict(zip(("exact", "within_one"), agreement(y, kwak[c]), strict=True))
                for k, c in counts.items()}
    d1 = json.loads((out / "count.json").read_text())["rows"]["D1"]
    adopt = (res["S"] >= d1["S"] + 0.03 and res["within_one"] >= d1["within_one"]
             and res["exact"] >= d1["exact"] - 0.01)
    decision = {"adopt": bool(adopt), "D1_S": d1["S"], "C_S": res["S"]}
    if adopt:
        decision["pair_on_whole_pool"] = list(best_pair(np.ones_like(y, dtype=bool)))
    print("C", json.dumps({a: res[a] for a in ("exact", "within_one", "S", "predicted", "pairs_by_fold")}))
    print(json.dumps(decision, indent=1))
    (out / "composition.json").write_text(json.dumps({"C": res, "decision": decision, "in_sample_by_pair": per_pair,
                                                      "command": " ".join(sys.argv)}, indent=1))
    return 0


def addendum_b(out: Path) -> int:
    rows = describe_pool(out)
    keys = list(rows[0]["hits"])
    y = np.asarray([CATS.index(r["category"]) for r in rows])
    fold = np.asarray([r["fold"] for r in rows])
    hits = np.asarray([[r["hits"][k] for k in keys] for r in rows], dtype=int)
    kwak = np.asarray(KWAK)
    subsets = [tuple(k for i, k in enumerate(keys) if bits >> i & 1) for bits in range(1, 2 ** len(keys))]

    def counts(subset: tuple[str, ...]) -> np.ndarray:
        return hits[:, [keys.index(k) for k in subset]].sum(1)

    def best_subset(mask: np.ndarray) -> tuple[str, ...]:
        def key(sub: tuple[str, ...]) -> tuple[float, bool, int, list[int]]:
            e, w = agreement(y[mask], kwak[counts(sub)[mask]])
            return (-(e + w), len(sub) != len(keys), -len(sub), [keys.index(k) for k in sub])
        return min(subsets, key=key)

    pred, chosen = np.zeros_like(y), {}
    for f in range(FOLDS):
        sub = best_subset(fold != f)
        chosen[f] = list(sub)
        pred[fold == f] = kwak[counts(sub)[fold == f]]
    res = score(y, pred)
    res["subsets_by_fold"] = chosen
    d1 = json.loads((out / "count.json").read_text())["rows"]["D1"]
    adopt = res["S"] >= d1["S"] + 0.03 and res["within_one"] >= d1["within_one"] and res["exact"] >= 0.263
    decision = {"adopt": bool(adopt), "D1_S": d1["S"], "F_S": res["S"]}
    if adopt:
        decision["subset_on_whole_pool"] = list(best_subset(np.ones_like(y, dtype=bool)))
    print("F", json.dumps({a: res[a] for a in ("exact", "within_one", "S", "predicted", "subsets_by_fold")}))
    print(json.dumps(decision, indent=1))
    (out / "features.json").write_text(json.dumps({"F": res, "decision": decision, "command": " ".join(sys.argv)},
                                                  indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "tirads_descriptors")
    ap.add_argument("--composition", action="store_true", help="addendum A (PREREGISTRATION.md)")
    ap.add_argument("--features", action="store_true", help="addendum B (PREREGISTRATION.md)")
    args = ap.parse_args()
    if args.composition:
        return addendum_a(args.out)
    if args.features:
        return addendum_b(args.out)
    rows = describe_pool(args.out)
    y = np.asarray([CATS.index(r["category"]) for r in rows])
    count = np.asarray([r["count"] for r in rows])
    fold = np.asarray([r["fold"] for r in rows])
    print(f"{len(rows)} nodules; categories {np.bincount(y, minlength=6).tolist()}; counts {np.bincount(count, minlength=6).tolist()}")
    by_cat = {c: float(count[y == i].mean()) if (y == i).any() else None for i, c in enumerate(CATS)}
    print("mean count by category:", by_cat)
    res = {"D1": score(y, np.asarray(KWAK)[count])}
    pred2, maps = np.zeros_like(y), {}
    for f in range(FOLDS):
        m = fit_map(count[fold != f], y[fold != f])
        maps[f] = [CATS[i] for i in m]
        pred2[fold == f] = np.asarray(m)[count[fold == f]]
    res["D2"] = score(y, pred2)
    res["D2"]["maps_by_fold"] = maps
    res["constant 4b (reading only)"] = score(y, np.full_like(y, CATS.index("4b")))
    for k, v in res.items():
        print(k, json.dumps({a: v[a] for a in ("exact", "within_one", "S", "predicted")}))
    packaged = json.loads((REPO / "results/eval/tirads_readout/readout.json").read_text())["rows"][
        "packaged head (class-balanced), median"]
    best = "D2" if res["D2"]["S"] > res["D1"]["S"] else "D1"
    top_share = max(res[best]["predicted"].values()) / len(y)
    adopt = res[best]["S"] >= packaged["S"] + 0.05 and res[best]["within_one"] >= packaged["within_one"] and top_share <= 0.9
    decision = {"best_arm": best, "adopt": bool(adopt), "packaged_S": packaged["S"],
                "packaged_within_one": packaged["within_one"], "best_S": res[best]["S"],
                "largest_single_category_share": top_share}
    if adopt and best == "D2":
        decision["map_on_whole_pool"] = [CATS[i] for i in fit_map(count, y)]
    print(json.dumps(decision, indent=1))
    (args.out / "count.json").write_text(json.dumps({"rows": res, "decision": decision, "mean_count_by_category": by_cat,
                                                      "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
