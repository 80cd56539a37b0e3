#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine that reaches no package registry, made here, where pip
# reaches PyPI. The target is this workplace's lent GPU machines (x86-64, Python 3.12, an image whose
# python3 holds a CUDA 13 torch, OpenCV, NumPy, PyYAML, rich, einops, matplotlib, tensorboard, timm, pytest);
# what the toolkit needs beyond that image goes into two git-ignored folders that travel with a device call:
#
#   bash bench/gpu_wheels.sh            # .whl/: webdataset, braceexpand, fire, termcolor, zstandard (~6 MB)
#   bash bench/gpu_wheels.sh --dali     # and .dali/: DALI for CUDA 13 with its libraries (~260 MB), as
#                                       # part-00, part-01, ... of at most 56 MiB and SHA256SUMS
#
# A device call carries at most 64 MiB, so DALI travels over several calls made back to back (the machine
# keeps what earlier calls carried while it stays warm, 30 s after each): carry .dali/part-00, then
# .dali/part-01, ..., and with the last part also .dali/SHA256SUMS and .whl, run `bash bench/gpu_check.sh
# OUT`. gpu_check.sh checks the parts against SHA256SUMS and installs from them with pip --no-index;
# without .dali (or with a part missing) it says so in its table and measures the rest.
# Other targets: PYTHON_VERSION (default 3.12) and DALI (default nvidia-dali-cuda130==2.4.0).
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
PYV="${PYTHON_VERSION:-3.12}"
DALI_REQ="${DALI:-nvidia-dali-cuda130==2.4.0}"
WEBDATASET="$(sed -n 's/^\(webdataset==[0-9.]*\).*/\1/p' requirements.txt)"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {   # download DEST ARGS...: binary wheels for the target Python and platform
    local dest="$1"; shift
    "$PY" -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp "${PLATFORMS[@]}" -d "$dest" "$@"
}

rm -rf .whl && mkdir -p .whl
# --no-deps: their other needs (numpy, pyyaml) are in the image
download .whl --no-deps "$WEBDATASET" braceexpand "fire>=0.6" termcolor "zstandard>=0.22"
echo "gpu_wheels: .whl/: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)"

if [ "${1:-}" = "--dali" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    download "$tmp" "$DALI_REQ"
    # what the image already has travels for nothing (and a second numpy would shadow the image's)
    (cd "$tmp" && rm -f numpy-* packaging-* pyyaml-* PyYAML-* six-* typing_extensions-* wheel-*)
    rm -rf .dali && mkdir -p .dali
    tar -C "$tmp" -cf - . | split -b 56M -d - .dali/part-
    (cd .dali && sha256sum part-* > SHA256SUMS)
    echo "gpu_wheels: .dali/: $(ls "$tmp" | wc -l) wheels in $(ls .dali/part-* | wc -l) parts ($(du -sh .dali | cut -f1)):" \
         "carry one part a call, SHA256SUMS and .whl with the last"
fi
