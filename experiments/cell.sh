#!/usr/bin/env bash
# One row of docs/results.md "Learning depth" (issue #23): pre-train the quick start's recipe with some keys
# changed into runs/i23/NAME, then its report (frozen read-outs against a random encoder) on EVAL_DATA.
#
#   bash experiments/cell.sh NAME EVAL_DATA [pretrain.py --key value ...]
#   bash experiments/cell.sh conv_s0 shards/synthetic8/ --patch_embed conv --seed 0
#   python experiments/cell.py summary runs/i23/q_base_s0 runs/i23/conv_s0      # the table: overall and per family
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; eval_data=$2; shift 2
python pretrain.py --recipe recipes/quick_tiny.yaml --output_dir runs/i23 --name "$name" "$@"
python finetune.py report --recipe recipes/probe_tiny.yaml --data_path "$eval_data" --finetune "runs/i23/$name/encoder.pth"
