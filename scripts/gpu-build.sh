#!/usr/bin/env bash
# Builds, on this (CPU) machine, everything scripts/gpu-check.sh runs on the GPU machine (which has no Rust), with
# the same features as the README's test command so one build serves both, and packs it into .gpu/bin.tar.xz
# (stripped, xz-compressed: the device tool carries at most 64 MiB). Then: run `scripts/gpu-check.sh` there with
# `.gpu` carried. GPU_BINS (names as in .gpu/bin, space-separated, e.g. "medvl-bench") packs only those, to leave
# room in a carry for the kernel caches and bitsandbytes' wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
features=cuda,medvl-kernels/wgpu
rm -rf .gpu/bin && mkdir -p .gpu/bin
{ cargo build --workspace --features "$features" --message-format=json 2>/dev/null
  # Test binaries only when some are wanted.
  case "${GPU_BINS:-test-}" in *test-*)
    cargo test --workspace --features "$features" --no-run --message-format=json 2>/dev/null ;; esac; } \
  | jq -r 'select(.reason == "compiler-artifact" and .executable != null)
           | select(.target.name == "fidelity" or .target.name == "nf4_gemv" or .target.name == "medvl" or .target.name == "segments"
                    or .target.name == "nf4"
                    or .target.name == "medvl-bench" or .target.name == "plan" or .target.name == "decode"
                    or .target.name == "medvl_engine")
           | "\(.target.name) \(.executable)"' \
  | while read -r name exe; do
      # Test binaries and bins can share a target name (medvl): keep bins under their own name.
      case "$exe" in
        */deps/medvl_engine-*) dst=".gpu/bin/test-engine-lib" ;;  # the engine's unit tests (share.rs on CUDA)
        */deps/medvl-*|*/deps/medvl_*) continue ;;  # the bins' own unit tests
        */deps/*) dst=".gpu/bin/test-$name" ;;
        *) dst=".gpu/bin/$name" ;;
      esac
      cp "$exe" "$dst" && strip "$dst"
    done
git rev-parse --short HEAD > .gpu/COMMIT
git diff --quiet HEAD || echo "+dirty" >> .gpu/COMMIT
if [ -n "${GPU_BINS:-}" ]; then
  for f in .gpu/bin/*; do
    case " $GPU_BINS " in *" $(basename "$f") "*) ;; *) rm "$f" ;; esac
  done
fi
ls -la .gpu/bin
tar -C .gpu -cJf .gpu/bin.tar.xz bin
ls -la .gpu/bin.tar.xz
