import json, sys
def row(path):
    m = json.load(open(path))["organs"]["breast"]["overall"]
    a, d = m["agent"], m["detector"]
    c = a["classification"]; labels = c["confusion"]["labels"]; M = c["confusion"]["matrix"]
    ni = labels.index("normal")
    les_normal = sum(M[i][ni] for i in range(len(labels)) if i != ni); n_les = sum(sum(M[i]) for i in range(len(labels)) if i != ni)
    nor_kept = M[ni][ni]; n_nor = sum(M[ni])
    return dict(loc=a["localization"]["f1"], acc=c["accuracy"], det_acc=d["classification"]["accuracy"], auc=a["auc"]["value"],
                ece=a["calibration"]["ece"], les_normal=f"{les_normal}/{n_les}", nor_kept=f"{nor_kept}/{n_nor}",
                referred=a["referral"]["referred_rate"])
for label, before, after in [a.split(",") for a in sys.argv[1:]]:
    b, v = row(before), row(after)
    print(label)
    for k in b:
        fb = f"{b[k]:.3f}" if isinstance(b[k], float) else b[k]; fa = f"{v[k]:.3f}" if isinstance(v[k], float) else v[k]
        print(f"   {k:10s} {fb:>8s} -> {fa:>8s}")
