#!/bin/bash
cd /tmp/pswt
export PYTHONPATH=/tmp/pswt ECHO_AGENT_DATA=/work/shared/data HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY=/work/main/.venv/bin/python
O=/work/main/runs/breast_presence_seg
E=docs/experiments/breast_presence_seg
t() { $PY tools/train_classifier.py $E/$1_only.yaml --mask-supervised --threads 1 --output $O/$2.onnx "${@:3}" > $O/$2.log 2>&1; }
q1() { t busi busi_seg0 --fold 0 --folds 3; t busi busi_seg1 --fold 1 --folds 3
       for k in 0 1 2; do t breast_lesions_usg breast_lesions_usg_seg$k --fold $k --folds 3; done; touch $O/q1.done; }
q2() { t busi busi_seg2 --fold 2 --folds 3; t busi busi_seg; t breast_lesions_usg breast_lesions_usg_seg; touch $O/q2.done; }
q1 & q2 & wait
