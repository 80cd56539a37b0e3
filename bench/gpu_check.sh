#!/usr/bin/env bash
# The GPU path in one call (issue #12): on a machine with one NVIDIA GPU, in under 8 minutes,
#   1. installs what the GPU path needs, skipping what is there: a CUDA build of torch (the image's if it has
#      one, else the pinned version), DALI, the toolkit's requirements, timm; from the wheels carried in .whl/
#      and .dali/ (bench/gpu_wheels.sh) where the machine reaches no package registry
#   2. runs the tests that hold the DALI GPU backend equal to the torch reference (tests/test_data.py -k dali)
#   3. the loader benchmark (bench/loader_bench.py: "ours" feeds the GPU from CPU workers, "ours dali"
#      decodes with nvJPEG and resizes on the GPU)
#   4. bench/train_bench.py's ViT-B bf16 step: clips/s and MFU, without and with torch.compile
#   5. a 30-step pretrain.py under torchrun on the GPU (synthetic shards extracted here)
# and writes what it measured, one row per step, as one markdown table: OUT/gpu_check.md (logs in OUT/logs/).
#
#   bash bench/gpu_check.sh OUT               # on the GPU machine
#   bash bench/gpu_check.sh --dry-run OUT     # anywhere: the plan and the table, nothing installed or run
#
# This workplace's GPU machines reach no package registry: first `bash bench/gpu_wheels.sh --dali` here,
# then carry .dali/part-00, part-01, ... one a call, back to back, and with the last part .dali/SHA256SUMS
# and .whl, running this script (bench/gpu_wheels.sh says why). Without .dali the DALI rows say so.
# A failed install or step is a row saying so; the script goes on with what it can run. No GPU: one line, exit 2.
# Time: the steps' limits add up to 480 s; installs (only what is missing) up to 240 s each on top.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-}"
if [ -z "$OUT" ]; then echo "usage: bash bench/gpu_check.sh [--dry-run] OUT_FOLDER" >&2; exit 2; fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || echo python)}"   # the GPU images' python3 holds their torch
TORCH_PIN="$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt)"

if [ "$DRY" = 0 ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU 0'; }; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi lists none): nothing run; bash bench/gpu_check.sh --dry-run $OUT shows the plan" >&2
    exit 2
fi
mkdir -p "$OUT/logs" || { echo "gpu_check: cannot write to $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
TABLE="$OUT/gpu_check.md"
START=$(date +%s)
ROWS=()

# step NAME SECONDS COMMAND...: run it under a time limit, log it, add a row (status, seconds, its last result line)
step() {
    local name="$1" limit="$2"; shift 2
    local log="$OUT/logs/$(echo "$name" | tr -c 'A-Za-z0-9\n' '_').log"
    if [ "$DRY" = 1 ]; then
        echo "would run ($limit s): $*" | tee "$log"
        ROWS+=("| $name | dry run | - | \`$(echo "$*" | sed 's/|/\\|/g')\` |")
        return 0
    fi
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 )) status="ok"
    [ $rc -eq 124 ] && status="timed out after $limit s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
    local result
    result="$(grep -v '^\s*$' "$log" | tail -n "${TAIL:-1}" | tr '\n' ' ' | tr '|' '/' | cut -c1-400)"
    ROWS+=("| $name | $status | $took | $result |")
    echo "gpu_check: $name: $status (${took} s)" >&2
}

# install NAME CHECK-PYTHON INSTALL-COMMAND...: skipped when CHECK passes; a failure is said and the run goes on
install() {
    local name="$1" check="$2"; shift 2
    if [ "$DRY" = 0 ] && "$PY" -c "$check" >/dev/null 2>&1; then
        ROWS+=("| install $name | already installed | 0 | |")
        return 0
    fi
    if [ "$DRY" = 0 ] && [ "$REGISTRY" = 0 ]; then
        ROWS+=("| install $name | not installed: no package registry reached and no carried wheel has it | 0 | |")
        echo "gpu_check: install $name: no package registry, no carried wheel: going on without it" >&2
        return 0
    fi
    step "install $name" 240 "$@"
    if [ "$DRY" = 0 ] && ! "$PY" -c "$check" >/dev/null 2>&1; then
        echo "gpu_check: install $name FAILED (see $OUT/logs): going on without it" >&2
    fi
}

# Carried wheels (bench/gpu_wheels.sh): .whl/*.whl, and DALI's as .dali/part-* checked against .dali/SHA256SUMS.
# They go into the interpreter's environment (a GPU image is bare at each start); where that is read-only, into a
# folder of their own on PYTHONPATH (pip --target). DALI's CUDA libraries are parts of the `nvidia` package, some
# with an __init__.py, so beside the image's own `nvidia` libraries they are found only in the same environment.
CARRIED=()
[ -d .whl ] && CARRIED+=(.whl/*.whl)
DALI_PARTS="none carried (.dali/: bash bench/gpu_wheels.sh --dali)"
if [ -f .dali/SHA256SUMS ]; then
    total=$(wc -l < .dali/SHA256SUMS)
    if ! bad="$(cd .dali && sha256sum --quiet -c SHA256SUMS 2>&1)"; then
        DALI_PARTS="unusable: $(echo "$bad" | grep -v '^sha256sum' | tr '\n' ' ' | cut -c1-200)(of $total parts)"
    else
        DALI_PARTS="$total parts, checksums match"
        if [ "$DRY" = 0 ]; then
            mkdir -p /tmp/gpu_check_dali && cat $(sed 's/^[0-9a-f]*  /.dali\//' .dali/SHA256SUMS) | tar -C /tmp/gpu_check_dali -xf -
            CARRIED+=(/tmp/gpu_check_dali/*.whl)
        fi
    fi
fi
ROWS+=("| carried wheels | .whl: $(ls .whl/*.whl 2>/dev/null | wc -l) wheels; .dali: $DALI_PARTS | 0 | |")
if [ ${#CARRIED[@]} -gt 0 ]; then
    SITE=/tmp/gpu_check_site
    step "install the carried wheels (pip --no-index; --target $SITE if the environment is read-only)" 240 \
        bash -c '"$0" -m pip install -q --no-index --no-deps --no-compile "${@:2}" || "$0" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$1" "${@:2}"' \
        "$PY" "$SITE" "${CARRIED[@]}"
    [ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# a package registry: probed once (offline, each pip install would spend its retries)
REGISTRY=1
if [ "$DRY" = 0 ] && ! timeout 20 "$PY" -m pip download -q --no-deps --retries 0 --timeout 5 -d /tmp/gpu_check_probe \
        braceexpand==0.1.7 >/dev/null 2>&1; then
    REGISTRY=0
fi

install "a CUDA build of torch (pinned $TORCH_PIN; another version is used as it is)" \
    "import torch; assert torch.version.cuda and torch.cuda.is_available()" \
    bash -c "$PY -m pip install -q --force-reinstall --no-deps torch==$TORCH_PIN && $PY -m pip install -q torch==$TORCH_PIN"
# (--force-reinstall: pip takes an installed 2.13.0+cpu for ==2.13.0 and would keep the CPU build)
install "DALI" "import nvidia.dali" "$PY" -m pip install -q -r requirements-gpu.txt
install "the rest (requirements.txt, pytest)" "import webdataset, zstandard, pytest, fire, cv2, braceexpand, einops, rich, yaml" \
    "$PY" -m pip install -q -r requirements.txt pytest
install "timm (train_bench's baseline)" "import timm" "$PY" -m pip install -q timm
TORCH_USED="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
ROWS+=("| torch used | $TORCH_USED (requirements.txt pins $TORCH_PIN) | 0 | |")

if [ "$DRY" = 1 ] || "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
    step "tests: DALI GPU backend vs torch reference" 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_data.py -k dali
else
    ROWS+=("| tests: DALI GPU backend vs torch reference | skipped: DALI not installed | 0 | |")
fi
TAIL=8 step "loader_bench (ours: CPU workers, GPU targets; ours dali: nvJPEG + GPU resize), clips/s" 120 \
    "$PY" bench/loader_bench.py --videos 48 --batches 4 --repeats 1 --repeated_aug 1
TAIL=6 step "train_bench ViT-B bf16, eager" 45 "$PY" bench/train_bench.py --sizes base --batch 32 --steps 10
TAIL=6 step "train_bench ViT-B bf16, torch.compile" 90 "$PY" bench/train_bench.py --sizes base --batch 32 --steps 10 --compile
SHARDS="$OUT/synthetic"
step "extract 80 synthetic clips" 45 "$PY" extract.py --src synthetic --out "$SHARDS" --split train --limit 80
TAIL=3 step "pretrain.py, 30 steps, torchrun, 1 GPU" 90 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 pretrain.py --recipe recipes/tiny.yaml \
    --data_path "$SHARDS/" --epochs 3 --batch_size 8 --output_dir "$OUT/runs" --name gpu_check --resume false

{
    echo "# bench/gpu_check.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $( [ "$DRY" = 1 ] && echo "dry run, nothing ran" || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 ), $(nproc) CPU cores;" \
         "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null || echo '?')." \
         "Total $(( $(date +%s) - START )) s. Logs: logs/."
    echo
    echo "| step | status | s | result (last lines of its output) |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$TABLE"
echo "gpu_check: $TABLE" >&2
