#!/usr/bin/env bash
# The re-check veto across centers, before and after, on the test splits (CROSS_CENTER.md).
# Run from the repository root after the two classifiers of CROSS_CENTER.md are trained.
set -euo pipefail
out=runs/xcv
python docs/experiments/veto_recheck/name_fusions.py "$out"
for seed in s0 s1; do
  for arm in before after; do
    echo-agent eval /tmp/echo_data/breast_lesions_usg/test.csv --organ breast --out "$out/eval/busi_to_breast_${seed}_${arm}" \
        --detector "$out/$seed/det_busi_only.onnx" --classifier "$out/cls_busi_only.onnx" \
        --fusion "$out/$seed/fusion_busi_${arm}.json"
    echo-agent eval /tmp/echo_data/busi/test.csv --organ breast --out "$out/eval/breast_to_busi_${seed}_${arm}" \
        --detector "$out/$seed/det_breast_only.onnx" --classifier "$out/cls_breast_only.onnx" \
        --fusion "$out/$seed/fusion_breast_${arm}.json"
  done
done
python docs/experiments/veto_recheck/cross_center_table.py "$out/eval"
