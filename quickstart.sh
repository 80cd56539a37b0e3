#!/usr/bin/env bash
# The README's quick start, end to end on the built-in synthetic data (~11 minutes on 2 CPU cores):
# install, extract the evaluation and pre-training shards, pre-train, then the report of the run.
# Rerunning reuses what is done: finished shards, the finished run, cached features.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
python extract.py --src synthetic --out shards/synthetic8 --frames 8 --split train,val                          # 1. evaluation clips
python extract.py --src synthetic --out shards/synthetic8_2k --frames 8 --split train,val --limit train=2000    # 2. pre-training clips
python pretrain.py --recipe recipes/quick_tiny.yaml                                                            # 3. pre-train
python finetune.py report --recipe recipes/probe_tiny.yaml --data_path shards/synthetic8/ \
    --finetune runs/quick_tiny/encoder.pth                                                                     # 4. report
