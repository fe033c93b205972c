"""Exploratory (after the test look, on the pool only): BI-RADS agreement of out-of-fold fusion
probabilities on the 204 BrEaST train + val images, with the malignancy probability among lesions
recalibrated by a temperature. Needs the runs cache of DECISION.md at /tmp/bp/runs.jsonl."""
import json
from collections import Counter

import numpy as np

from echo_agent.eval.datasets import load_split
from echo_agent.eval.metrics import category_agreement
from echo_agent.organs import get_organ
from echo_agent.training.fusion_fit import LOGISTIC, Candidate, RunRecord, cross_validate, feature_subset

spec = get_organ("breast")
recs = [RunRecord(**json.loads(line)) for line in open("/tmp/bp/runs.jsonl") if line.strip()]
cat = {im.key: im.category for s in ("train", "val") for c in ("busi", "breast_lesions_usg") for im in load_split(c, s)}
labels = list(spec.image_labels)
feats = [r.features() for r in recs]
names = sorted({n for f in feats for n in f})
X_all = np.array([[f.get(n, 0.0) for n in names] for f in feats])
y = np.array([labels.index(r.label) for r in recs])
groups = [r.group for r in recs]
cand = Candidate(LOGISTIC, "classifier", 10.0, False)
sub = feature_subset(names, "classifier")
X = X_all[:, [names.index(n) for n in sub]]
P = cross_validate(cand, X, {}, y, groups, 3, folds=5, seeds=[0], sw=np.ones(len(y)))[0]
pm = P[:, 2]
idx = [i for i, r in enumerate(recs) if cat.get(r.key)]
truth = [cat[recs[i].key] for i in idx]
order = spec.category_scale


def cats(p, lesion):
    return [spec.category_for(float(pp), lesion_found=bool(found)) for pp, found in zip(p, lesion, strict=True)]



lesion = [recs[i].label != "normal" or P[i].argmax() != 0 for i in idx]
a = category_agreement(truth, cats(pm[idx], lesion), order)
print(f"n {a.n} current: exact {a.exact:.3f} within {a.within_one:.3f}")
# lesion-conditional probability with a temperature fitted on lesion images (all centers, OOF)
les = np.array([r.label != "normal" for r in recs])
logit = np.log(np.clip(P[:, 2], 1e-9, 1)) - np.log(np.clip(P[:, 1], 1e-9, 1))
for T in (1.0, 0.8, 0.6, 0.5, 0.4):
    q = 1 / (1 + np.exp(-logit / T))
    a = category_agreement(truth, cats(q[idx], lesion), order)
    ll = -np.mean(np.where(y[les] == 2, np.log(q[les]), np.log(1 - q[les])))
    print(f"T {T}: lesion log-loss {ll:.3f}  exact {a.exact:.3f} within {a.within_one:.3f}")
print(Counter(truth))
