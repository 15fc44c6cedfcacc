# medvl recipes. `just --list` shows them.

# CPU tests (what CI runs), with the cuda feature compiled in so that one build serves tests and GPU binaries;
# the CubeCL kernels run on Mesa's lavapipe (installed by the script when missing).
test:
    scripts/test

# Clippy as CI runs it.
lint:
    cargo clippy --workspace --all-targets --features cuda,medvl-kernels/wgpu -- -D warnings

# GPU checks on a machine with an NVIDIA GPU + CUDA 12/13 NVRTC: model fidelity against transformers (bf16) and
# the NF4 and decode kernels against their host references, the decode plan against transformers and burn.
test-cuda:
    cargo test -p medvl-model --features cuda --test fidelity -- --ignored --nocapture --exact gpu::cuda_bf16_matches_transformers gpu::cuda_f32_matches_transformers
    cargo test -p medvl-model --features cuda --test nf4 -- --ignored --nocapture
    cargo test -p medvl-kernels --features cuda --test nf4_gemv -- --ignored --nocapture
    cargo test -p medvl-kernels --features cuda --test decode -- --ignored --nocapture
    cargo test -p medvl-engine --features cuda --test plan -- --ignored --nocapture --test-threads 1

# Kernel benchmark: NF4 GEMV (1-8 rows) and tensor-core GEMM (16, 32 rows) GB/s at the 7B's decode shapes against the card's measured copy bandwidth.
bench-kernels:
    cargo run --release -p medvl-bench --features cuda -- kernels --out benchmarks/kernels.json

# CPU micro-benchmarks (criterion): a letter page through the image processor, the tokenizer over a prompt.
bench-cpu:
    cargo bench -p medvl-model --bench cpu

# Benchmarks on the GPU, 7B with random weights, each next to the Python stack on the same card (needs python3 with
# torch + transformers; bitsandbytes for the NF4 baselines: `pip install bitsandbytes==0.50.2`):
# a page end to end (bf16, NF4; 1,260 and 2,772 image tokens; 256 new tokens), then the decode step (bf16, NF4,
# NF4 + lm_head; batch 1, 8, 16, 32); then the report (`just report`).
bench:
    cargo run --release -p medvl-bench --features cuda -- page --concurrency 1,8,32 --out benchmarks/page.json
    python3 benches/python/page_baseline.py --image-tokens 1260,2772 --out benchmarks/page-python.json
    cargo run --release -p medvl-bench --features cuda -- decode --batches 1,8,16,32 --out benchmarks/decode.json
    python3 benches/python/decode_baseline.py --batches 1,8,16,32 --out benchmarks/decode-python.json
    just report benchmarks/page.json benchmarks/page-python.json benchmarks/decode.json benchmarks/decode-python.json

# docs/BENCHMARK_REPORT.md and its SVG charts (docs/BENCHMARK_REPORT/) from benchmark JSON reports, medvl's and
# the Python stack's side by side (CPU only).
report +files:
    cargo run -p medvl-bench -- report {{files}}

# Regenerate the reference fixtures with transformers (CPU is enough; installs fixtures/requirements.txt in a venv).
golden:
    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install -q -r fixtures/requirements.txt
    .venv-fixtures/bin/python fixtures/generate.py
    .venv-fixtures/bin/python fixtures/tensor_list.py
    .venv-fixtures/bin/python fixtures/nf4.py
    .venv-fixtures/bin/python fixtures/lora.py
