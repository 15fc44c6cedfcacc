#!/usr/bin/env bash
# Every GPU check and benchmark in one run on the GPU machine (binaries from scripts/gpu-build.sh in .gpu/).
# Writes full logs and the kernel benchmark JSON under $OUT and prints a short summary last.
#   P. the page benchmark, 7B with random weights, end to end through the engine (PAGE_FORMATS, default bf16,nf4,
#      empty for none; PAGE_TOKENS, default 1260,2772; PAGE_FLAGS, e.g. --compare-nf4-dequant; PAGE_PARALLEL=1: one process per format at once), then the Python stack on the same pages (PY_PAGE=1;
#      PY_PAGE_FORMATS, PY_PAGE_TOKENS, PY_PAGE_RUNS);
#   B. with bitsandbytes' wheel carried (.gpu/whl/repacked, from scripts/bnb-wheel.sh): installed for the Python
#      NF4 baselines; fixtures/nf4/tiny_logits_cuda_bf16.safetensors made when missing (copied to $OUT), and the
#      CUDA NF4 model test against it (NF4_MODEL_TEST=1);
#   0. the decode plan benchmark, 7B decoder with random weights (DECODE_FORMATS, default dense,nf4,nf4-lm-head,nf4-lora;
#      empty for none; DECODE_BATCHES, default 1,8,32), then the Python stack's decode on the same card
#      (PY_BASELINE=0 to skip), each alone on the card;
#   1. the kernel benchmark, bf16 and f32 activations (alone on the card, first; BENCH_FLAGS=--sweep for every
#      tiling);
#   2. the NF4 GEMV kernel tests, CUDA (f32 and bf16 activations; NF4_TEST_FILTER, e.g. cuda_mma, for some);
#   3. model fidelity on CUDA (FIDELITY_RUNS: bf16 and f32 by default, empty for none), each in its own process,
#      in parallel: on a fresh machine every kernel and autotune candidate is JIT-compiled, which takes minutes;
#   4. `medvl ask` on CUDA (ASK_DTYPES: bf16 f32 by default, empty for none) against the transformers greedy
#      tokens (fixtures/tiny/ask.json).
# Kernel caches: a fresh GPU machine JIT-compiles every burn and CubeCL kernel (and autotunes burn's), which takes
# minutes per process. CubeCL's PTX and autotune caches and the driver's compute cache are kept under .gpu/cache,
# restored from .gpu/cache-in/cache.txz.* when carried, and written back at the end as $OUT/cache.txz.* (parts of
# at most 15 MB: files come back at 16 MiB each; put them in .gpu/cache-in for the next call; KERNEL_CACHE=0 for
# none). CACHE_LOG=1 logs each kernel compilation (basic level) to
# $OUT/compile.log.
set -u
OUT=${OUT:-/tmp/medvl-gpu}
mkdir -p "$OUT"
# A GPU machine may be handed out again with an earlier session's files still under /tmp: a log left in $OUT
# would pass for this run's. Refuse a non-empty $OUT.
if [ -n "$(ls -A "$OUT" 2> /dev/null)" ]; then
  echo "gpu-check: $OUT is not empty (files from an earlier run?): use an empty directory" >&2
  exit 2
fi
tar -C .gpu -xJf .gpu/bin.tar.xz
bin=.gpu/bin
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
commit=$(cat .gpu/COMMIT 2>/dev/null | tr -d '\n' || echo unknown)
export MEDVL_FIXTURES=$PWD/fixtures/tiny RUST_BACKTRACE=0 CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
budget=${GPU_CHECK_SECONDS:-540}
start=$(date +%s)

if [ "${KERNEL_CACHE:-1}" = 1 ]; then
  mkdir -p .gpu/cache
  ls .gpu/cache-in/cache.txz.* > /dev/null 2>&1 && cat .gpu/cache-in/cache.txz.* | tar -C .gpu -xJf -
  du -sh .gpu/cache > "$OUT/cache-before.txt" 2>&1
  # Read by CubeCL from the working directory (and its parents); every binary here runs from the repository root.
  { printf '[compilation]\ncache = { file = "%s" }\n' "$PWD/.gpu/cache"
    [ "${CACHE_LOG:-0}" = 1 ] && printf 'logger = { level = "basic", file = "%s" }\n' "$OUT/compile.log"
    printf '[autotune]\ncache = { file = "%s" }\n' "$PWD/.gpu/cache"; } > cubecl.toml
  export CUDA_CACHE_PATH=$PWD/.gpu/cache/nv CUDA_CACHE_MAXSIZE=4294967296
fi
save_cache() {
  [ "${KERNEL_CACHE:-1}" = 1 ] || return 0
  du -sh .gpu/cache .gpu/cache/* > "$OUT/cache-after.txt" 2>&1
  # The driver's compute cache (SASS, ~0.5 GB for a page benchmark) stays behind: too big to come back.
  XZ_OPT=-T0 tar -C .gpu --exclude=cache/nv -cJf - cache | split -b 15000000 -a 1 - "$OUT/cache.txz."
}

if ls .gpu/whl/repacked/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/repacked/*.whl > "$OUT/bnb-install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -f fixtures/nf4/tiny_logits_cuda_bf16.safetensors ] && python3 -c "import bitsandbytes" 2> /dev/null; then
  timeout 120 python3 fixtures/nf4.py --cuda > "$OUT/nf4-fixture.log" 2>&1
  cp fixtures/nf4/tiny_logits_cuda_bf16.safetensors "$OUT/" 2>> "$OUT/nf4-fixture.log"
fi

page=${PAGE_FORMATS-bf16,nf4}
page_bench() {  # FORMATS NAME
  timeout ${PAGE_TIMEOUT:-400} $bin/medvl-bench page --formats "$1" --image-tokens "${PAGE_TOKENS:-1260,2772}" \
    --runs "${PAGE_RUNS:-3}" ${PAGE_FLAGS:-} --card "$card" --commit "$commit" --out "$OUT/$2.json" > "$OUT/$2.log" 2>&1
  echo "page bench exit $?" >> "$OUT/$2.log"
}
if [ -n "$page" ] && [ "${PAGE_PARALLEL:-0}" = 1 ]; then
  # One process per format at once: fills the kernel caches in half the time (timings not comparable).
  for f in ${page//,/ }; do page_bench "$f" "page-$f" & done
  wait
elif [ -n "$page" ]; then
  page_bench "$page" page
fi
if [ "${PY_PAGE:-0}" = 1 ]; then
  timeout 420 python3 benches/python/page_baseline.py --formats "${PY_PAGE_FORMATS:-bf16,nf4}" \
    --image-tokens "${PY_PAGE_TOKENS:-1260}" --runs "${PY_PAGE_RUNS:-2}" --out "$OUT/page-python.json" \
    > "$OUT/page-python.log" 2>&1; echo "python page baseline exit $?" >> "$OUT/page-python.log"
fi

formats=${DECODE_FORMATS-dense,nf4,nf4-lm-head,nf4-lora}
if [ -n "$formats" ]; then
  timeout ${DECODE_TIMEOUT:-300} $bin/medvl-bench decode --formats "$formats" --batches "${DECODE_BATCHES:-1,8,32}" --card "$card" \
    --commit "$commit" --out "$OUT/decode-bf16.json" > "$OUT/decode.log" 2>&1; echo "decode bench exit $?" >> "$OUT/decode.log"
fi
if [ "${PY_BASELINE:-1}" = 1 ]; then
  timeout 240 python3 benches/python/decode_baseline.py --batches "${DECODE_BATCHES:-1,8,32}" \
    --out "$OUT/decode-python-bf16.json" > "$OUT/python.log" 2>&1; echo "python baseline exit $?" >> "$OUT/python.log"
fi

for act in ${BENCH_ACTIVATIONS-bf16 f32}; do
  timeout 240 $bin/medvl-bench kernels ${BENCH_FLAGS:-} --activations $act --card "$card" --commit "$commit" \
    --out "$OUT/kernels-$act.json" >> "$OUT/bench.log" 2>&1; echo "bench $act exit $?" >> "$OUT/bench.log"
done

left=$(( budget - ($(date +%s) - start) - 20 ))
# Fidelity runs as ATTENTION:TEST (MEDVL_ATTENTION: flash = burn's flash attention, naive = softmax(QK^T)V).
runs=${FIDELITY_RUNS-"flash:cuda_bf16_matches_transformers flash:cuda_f32_matches_transformers"}
for run in $runs; do
  att=${run%%:*} t=${run#*:}
  ( MEDVL_ATTENTION=$att timeout $left $bin/test-fidelity --ignored --exact "gpu::$t" --nocapture \
      > "$OUT/$t-$att.log" 2>&1; echo "exit $?" >> "$OUT/$t-$att.log" ) &
done
if [ "${NF4_TESTS:-1}" = 1 ]; then
  ( timeout $left $bin/test-nf4_gemv --ignored ${NF4_TEST_FILTER:-} --nocapture --test-threads 1 > "$OUT/kernels-test.log" 2>&1
    echo "exit $?" >> "$OUT/kernels-test.log" ) &
fi
# The decode plan on CUDA (tiny model: transformers' tokens, burn's logits) and the decode kernels.
if [ "${PLAN_TESTS:-1}" = 1 ]; then
  for t in cuda::plan_on_cuda_f32_decodes_three_prompts_as_transformers cuda::plan_on_cuda_bf16_matches_burn \
      cuda::plan_on_cuda_bf16_nf4_runs_ten_sequences_on_tensor_cores cuda::plan_on_cuda_bf16_runs_lora_adapters_as_burn \
      ${PLAN_EXTRA_TESTS:-}; do
    ( timeout $left $bin/test-plan --ignored --exact $t --nocapture > "$OUT/plan-test-${t##*_on_cuda_}.log" 2>&1
      echo "exit $?" >> "$OUT/plan-test-${t##*_on_cuda_}.log" ) &
  done
  ( timeout $left $bin/test-decode --ignored --nocapture > "$OUT/decode-test.log" 2>&1
    echo "exit $?" >> "$OUT/decode-test.log" ) &
  # The engine's unit tests on CUDA (a plan sharing NF4 weights and their double-quantized scales).
  if [ -x $bin/test-engine-lib ]; then
    ( timeout $left $bin/test-engine-lib --ignored --nocapture > "$OUT/engine-lib-test.log" 2>&1
      echo "exit $?" >> "$OUT/engine-lib-test.log" ) &
  fi
fi
if [ "${NF4_MODEL_TEST:-1}" = 1 ]; then
  ( timeout $left $bin/test-nf4 --ignored --nocapture > "$OUT/nf4-model-test.log" 2>&1
    echo "exit $?" >> "$OUT/nf4-model-test.log" ) &
fi
# `medvl ask` on CUDA in each dtype.
for dtype in ${ASK_DTYPES-bf16 f32}; do
  ( timeout $left $bin/medvl ask fixtures/tiny/page.png --prompt "What is the diagnosis?" --model fixtures/tiny/v5 \
      --device cuda --dtype $dtype --max-new-tokens 32 --json > "$OUT/ask-cuda-$dtype.json" 2> "$OUT/ask-cuda-$dtype.log"
    echo "exit $?" >> "$OUT/ask-cuda-$dtype.log" ) &
done
# With KERNEL_SOURCE=1: the CUDA source CubeCL generates for the NF4 kernels (its compilation log).
if [ -n "${KERNEL_SOURCE:-}" ]; then
  ( mkdir -p /tmp/kernel-source && cd /tmp/kernel-source \
    && printf '[compilation]\nlogger = { level = "full", file = "/tmp/kernel-source/compile.log" }\n' > cubecl.toml \
    && timeout $left "$OLDPWD/$bin/test-nf4_gemv" --ignored --exact cuda::cuda_every_tiling > /dev/null 2>&1
    gzip -c /tmp/kernel-source/compile.log > "$OUT/kernel-source.log.gz" ) &
fi
wait
save_cache
echo "== $card ($commit), $(( $(date +%s) - start )) s"
for f in "$OUT"/page.log "$OUT"/page-*.log; do [ -f "$f" ] && grep -E "^\||on cuda|exit|rror|warm-up|ready|built" "$f"; done
[ -f "$OUT/page-python.log" ] && tail -8 "$OUT/page-python.log"
[ -f "$OUT/nf4-fixture.log" ] && tail -3 "$OUT/nf4-fixture.log"
[ -f "$OUT/nf4-model-test.log" ] && grep -E "against|rel Frobenius|^test |panicked|^exit" "$OUT/nf4-model-test.log"
[ -f "$OUT/decode.log" ] && grep -E "^\||decoder|exit|rror" "$OUT/decode.log"
[ -f "$OUT/python.log" ] && tail -8 "$OUT/python.log"
[ -f "$OUT/bench.log" ] && grep -E "copy probe|^\| [a-z]|exit" "$OUT/bench.log"
for f in "$OUT"/plan-test*.log "$OUT"/decode-test.log "$OUT"/engine-lib-test.log; do
  [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E "^test |step-1|tokens equal|panicked|^exit" "$f" | tail -16; }
done
[ -f "$OUT/kernels-test.log" ] && grep -E "^test |test result|panicked|worst error" "$OUT/kernels-test.log" | grep -v "worst error 0\.00" | tail -12
for f in "$OUT"/cuda_*.log; do [ -f "$f" ] || continue; echo "-- $(basename "$f")"; grep -E "vision max rel|: [0-9.]+ s$|panicked at crates|^exit" "$f" | tail -8; done
python3 - "$OUT"/ask-cuda-*.json <<'PY'
import itertools, json, sys
ref = json.load(open("fixtures/tiny/ask.json"))
for path in sys.argv[1:]:
    try:
        got = json.load(open(path))
    except Exception as e:
        print(path, "no JSON:", e); continue
    same = sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(got["token_ids"], ref["token_ids"])))
    print(f"{path.rsplit('/', 1)[-1]}: {same}/{len(ref['token_ids'])} greedy tokens equal transformers; "
          f"text equal: {got['text'] == ref['text']}; prefill {got.get('prefill_s')} s; "
          f"decode plan: {got.get('plan_decode')}")
PY
