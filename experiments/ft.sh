#!/usr/bin/env bash
# A fine-tuned row of docs/results.md "Learning depth" (issue #23): every layer of an encoder (or a random
# one: ENCODER null) fine-tuned on DATA's labelled clips for EPOCHS epochs with recipes/finetune_learn_tiny.yaml
# at the quick start's 8 frames, scored on DATA's validation videos, into runs/i23/NAME.
#
#   bash experiments/ft.sh NAME ENCODER DATA EPOCHS [finetune.py --key value ...]
#   bash experiments/ft.sh ft_q_base runs/i23/q_base_s0/encoder.pth shards/synthetic8/ 10
#   bash experiments/ft.sh ft_scratch_2k null shards/synthetic8_2k/ 16 --layer_decay 1.0   # the supervised ceiling
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; encoder=$2; data=$3; epochs=$4; shift 4
python finetune.py full --recipe recipes/finetune_learn_tiny.yaml --num_frames 8 --data_path "$data" \
    --finetune "$encoder" --epochs "$epochs" --output_dir runs/i23 --name "$name" "$@"
