#!/usr/bin/env bash
# Downloads bitsandbytes 0.50.2 (the Python stack's NF4) for the GPU machine, which has no network and no
# bitsandbytes: the manylinux wheel, repacked without the libraries that machine cannot use (CUDA 11/12, ROCm,
# XPU), to .gpu/whl/ (about 6 MB, under the device tool's 64 MiB carry). scripts/gpu-check.sh installs it there.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu/whl
mkdir -p "$dir"
wheel=bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
[ -f "$dir/$wheel" ] || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_24_x86_64 -d "$dir" bitsandbytes==0.50.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$dir/$wheel" "$work/$wheel" <<'PY'
import re, sys, zipfile
drop = re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not drop.search(item.filename):
            dst.writestr(item, src.read(item.filename))
PY
mkdir -p "$dir/repacked"
mv "$work/$wheel" "$dir/repacked/$wheel"
ls -la "$dir/repacked"
