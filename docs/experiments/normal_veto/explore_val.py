import sys, json
sys.argv = sys.argv[:1]
exec(open("/tmp/pg/analyse.py").read())
from echo_agent.fusion.learned import rule_log_probs
from echo_agent.schemas import DetectorReport

def det_rule_label(r):
    reports = [e for e in map(parse_evidence, r.evidence) if isinstance(e, DetectorReport)]
    lp = rule_log_probs(org, reports, "detector_rule")
    return org.image_labels[int(np.argmax(lp))]

def evaluate(name, runs, params):
    rs = rows(runs, params)
    for r, run in zip(rs, runs):
        r["det_rule"] = det_rule_label(run); r["center"] = run.key.split(":")[0]
    for center in sorted({r["center"] for r in rs}):
        sub = [r for r in rs if r["center"] == center]
        les = [r for r in sub if r["truth"] != "normal"]; nor = [r for r in sub if r["truth"] == "normal"]
        pred = lambda r: max(r["probs"], key=r["probs"].get)
        def veto(r):
            p = pred(r)
            if p == "normal" and r["det_rule"] != "normal":
                q = {k: v for k, v in r["probs"].items() if k != "normal"}
                return max(q, key=q.get)
            return p
        for tag, f in (("fusion", pred), ("fusion+veto", veto), ("detector", lambda r: r["det_rule"])):
            acc = np.mean([f(r) == r["truth"] for r in sub])
            print(f"{name:28s} {center:20s} {tag:12s} n={len(sub):3d} acc={acc:.3f} lesions->normal {sum(f(r)=='normal' for r in les)}/{len(les)} normals kept {sum(f(r)=='normal' for r in nor)}/{len(nor)}")

P_pack = FusionParams.from_json(open("/work/main/echo_agent/assets/fusion/breast.json").read())
evaluate("packaged on val", load("/tmp/pg/runs_packaged_val.jsonl"), P_pack)
P_busi = FusionParams.from_json(open("/tmp/xc/oof/fusion_busi_oof.json").read())
evaluate("BUSI OOF fusion, in-center", load("/tmp/xc/oof/runs_busi.jsonl"), P_busi)
evaluate("BUSI models -> BrEaST val", load("/tmp/xc/runs_busi_only_on_breast_val.jsonl"), P_busi)
