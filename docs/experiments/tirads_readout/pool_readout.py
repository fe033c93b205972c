"""Pool cross-validation of the TI-RADS read-outs (PREREGISTRATION.md in this folder).

    python docs/experiments/tirads_readout/pool_readout.py --out runs/tirads_readout

Same features, folds and heads as ``../tirads_ordinal/pool_cv.py`` (imported from there); the
category is read off each held-out distribution by ``echo_agent.organs.category_readout_index``.
Writes ``readout.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tirads_ordinal"))
import pool_cv  # noqa: E402 - the sibling experiment's features, folds and heads

C = 0.01
LABELS = ["normal", "2", "3", "4a", "4b", "4c", "5"]


def held_out_distributions(d: dict[str, np.ndarray], balanced: bool) -> np.ndarray:
    """Each eval box's category distribution from the head fitted without its fold."""
    fold_of_sample, fold_of_eval = d["fold"][d["case"]], d["fold"][d["case_eval"]]
    probs = np.zeros((len(d["y_eval"]), len(LABELS)))
    for f in range(pool_cv.FOLDS):
        tr, te = fold_of_sample != f, fold_of_eval == f
        mean, scale = d["x"][tr].mean(0), d["x"][tr].std(0) + 1e-6
        probs[te] = pool_cv.multinomial((d["x"][tr] - mean) / scale, d["y"][tr], (d["x_eval"][te] - mean) / scale,
                                        C, balanced=balanced)
    return probs


def fit_head(d: dict[str, np.ndarray], train_folds: np.ndarray, eval_mask: np.ndarray, balanced: bool) -> np.ndarray:
    """The head fitted on the samples of ``train_folds``, its distributions on the eval boxes of ``eval_mask``."""
    tr = np.isin(d["fold"][d["case"]], train_folds)
    mean, scale = d["x"][tr].mean(0), d["x"][tr].std(0) + 1e-6
    return pool_cv.multinomial((d["x"][tr] - mean) / scale, d["y"][tr], (d["x_eval"][eval_mask] - mean) / scale,
                               C, balanced=balanced)


def category_log_probs(p: np.ndarray) -> np.ndarray:
    """Log of the category distribution (normal column dropped, renormalised)."""
    cats = np.clip(p[:, 1:], 1e-9, None)
    return np.log(cats / cats.sum(1, keepdims=True))


def calibrated_distributions(d: dict[str, np.ndarray], balanced: bool) -> tuple[np.ndarray, list[float]]:
    """Addendum arms R3/R4: each outer fold's category distributions with a temperature fitted on inner
    grouped CV of its own training folds (each other fold held out in turn)."""
    from echo_agent.fusion import fit_temperature, softmax

    fold_of_eval = d["fold"][d["case_eval"]]
    folds = np.arange(pool_cv.FOLDS)
    out = np.zeros((len(d["y_eval"]), len(LABELS) - 1))
    temps = []
    for f in folds:
        z_in, y_in = [], []
        for g in folds[folds != f]:
            m = fold_of_eval == g
            z_in.append(category_log_probs(fit_head(d, folds[(folds != f) & (folds != g)], m, balanced)))
            y_in.append(d["y_eval"][m] - 1)
        t = fit_temperature(np.concatenate(z_in), np.concatenate(y_in))
        temps.append(t)
        m = fold_of_eval == f
        out[m] = softmax(category_log_probs(fit_head(d, folds[folds != f], m, balanced)) / t)
    return out, temps


def score(y: np.ndarray, pred: np.ndarray) -> dict[str, object]:
    from echo_agent.eval.metrics import category_agreement

    a = category_agreement([LABELS[i] for i in y], [LABELS[i] for i in pred], LABELS[1:])
    return {"exact": a.exact, "within_one": a.within_one, "S": a.exact + a.within_one, "n": a.n,
            "predicted": {lbl: int((pred == i).sum()) for i, lbl in enumerate(LABELS) if i}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=pool_cv.REPO / "runs" / "tirads_readout")
    ap.add_argument("--calibrated", action="store_true", help="the addendum's arms R3 / R4 (PREREGISTRATION.md)")
    args = ap.parse_args()
    if args.calibrated:
        return addendum(args.out)
    from echo_agent.organs import category_readout_index

    d = pool_cv.extract(args.out)
    y = d["y_eval"]
    rows = {}
    for name, balanced in (("packaged head (class-balanced)", True), ("prior kept", False)):
        p = held_out_distributions(d, balanced)
        for readout in ("median", "agreement"):
            pred = np.array([category_readout_index(row[1:], readout) + 1 for row in p])
            rows[f"{name}, {readout}"] = score(y, pred)
            print(f"{name}, {readout}: {json.dumps(rows[f'{name}, {readout}'])}", flush=True)
    for k, lbl in ((4, "4b"),):
        rows[f"always {lbl} (reading only)"] = score(y, np.full(len(y), k))
    packaged = rows["packaged head (class-balanced), median"]
    arms = {"R1": rows["packaged head (class-balanced), agreement"], "R2": rows["prior kept, agreement"]}
    best = "R2" if arms["R2"]["S"] > arms["R1"]["S"] else "R1"
    adopt = arms[best]["S"] >= packaged["S"] + 0.05 and arms[best]["within_one"] >= packaged["within_one"]
    decision = {"best_arm": best, "adopt": bool(adopt), "packaged_S": packaged["S"], "best_S": arms[best]["S"],
                "categories_in_pool": {LABELS[i]: int((y == i).sum()) for i in range(1, 7)}}
    print(json.dumps(decision, indent=1))
    (args.out / "readout.json").write_text(json.dumps({"rows": rows, "decision": decision,
                                                       "command": " ".join(sys.argv)}, indent=1))
    return 0


def addendum(out: Path) -> int:
    from echo_agent.organs import category_readout_index

    d = pool_cv.extract(out)
    y = d["y_eval"]
    previous = json.loads((out / "readout.json").read_text())
    packaged = previous["rows"]["packaged head (class-balanced), median"]
    rows, temps = {}, {}
    for arm, balanced in (("R3", True), ("R4", False)):
        p, temps[arm] = calibrated_distributions(d, balanced)
        pred = np.array([category_readout_index(row, "agreement") + 1 for row in p])
        rows[arm] = score(y, pred)
        print(f"{arm} (temperatures {[round(t, 2) for t in temps[arm]]}): {json.dumps(rows[arm])}", flush=True)
    best = "R4" if rows["R4"]["S"] > rows["R3"]["S"] else "R3"
    top_share = max(rows[best]["predicted"].values()) / len(y)
    adopt = (rows[best]["S"] >= packaged["S"] + 0.05 and rows[best]["within_one"] >= packaged["within_one"]
             and top_share <= 0.9)
    decision = {"best_arm": best, "adopt": bool(adopt), "packaged_S": packaged["S"], "best_S": rows[best]["S"],
                "largest_single_category_share": top_share}
    print(json.dumps(decision, indent=1))
    (out / "readout_calibrated.json").write_text(json.dumps({"rows": rows, "temperatures": temps, "decision": decision,
                                                             "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
