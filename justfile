# medvl recipes. `just --list` shows them.

# CPU tests (what CI runs), with the cuda feature compiled in so that one build serves tests and GPU binaries.
test:
    cargo test --workspace --features cuda

# Clippy as CI runs it.
lint:
    cargo clippy --workspace --all-targets --features cuda -- -D warnings

# GPU fidelity: the tiny reference model on CUDA bf16 against transformers (needs an NVIDIA GPU + CUDA 12/13 NVRTC).
test-cuda:
    cargo test -p medvl-model --features cuda --test fidelity -- --ignored --nocapture gpu::cuda_bf16

# Regenerate the reference fixtures with transformers (CPU is enough; installs fixtures/requirements.txt in a venv).
golden:
    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install -q -r fixtures/requirements.txt
    .venv-fixtures/bin/python fixtures/generate.py
    .venv-fixtures/bin/python fixtures/tensor_list.py
    .venv-fixtures/bin/python fixtures/nf4.py
