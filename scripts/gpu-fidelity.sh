#!/usr/bin/env bash
# GPU fidelity on a machine without Rust (docs/GPU.md): run from the repository root with the test binary built
# on the build machine (`cargo test -p medvl-model --features cuda --no-run`, stripped) at .gpu/fidelity.
# Each named test runs in its own process, so a panic in one cannot poison the next.
# Usage: scripts/gpu-fidelity.sh gpu::cuda_bf16_matches_transformers [more test names]
export MEDVL_FIXTURES=$PWD/fixtures/tiny RUST_BACKTRACE=0 CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -f cubecl.toml ] || cp scripts/cubecl-cache.toml cubecl.toml
mkdir -p .gpu/cubecl-cache
for t in "$@"; do
  echo "=== $t"
  timeout ${TEST_TIMEOUT:-150} .gpu/fidelity --ignored --exact "$t" --nocapture 2>&1 | grep -vE "^\s+[0-9]+:|^\s+at |stack backtrace|RUST_BACKTRACE|Ordering is bigger|^$" | head -25
done
# Bring the kernel caches back with the results (carry .gpu next time).
if [ -n "${OUT:-}" ]; then tar czf "$OUT/cubecl-cache.tgz" .gpu/cubecl-cache; fi
