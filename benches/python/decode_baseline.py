"""The Python stack's decode speed on the same card, for `medvl-bench decode` to be read against.

transformers' Qwen2.5-VL-7B with random weights (bf16), a text-only prompt of --context random token ids per
sequence, greedy `generate` forced to produce N tokens. Decode tokens/s = batch * (N2 - N1) / (t(N2) - t(N1)), so
the prefill and the first token cancel out. Writes JSON (--out) and prints a table.

NF4 needs bitsandbytes (not installed on the GPU machine by default); bf16 is what this script measures.
"""

import argparse
import json
import os
import subprocess
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# Qwen2.5-VL-7B-Instruct's architecture (../shared/REFERENCE.md section 1).
TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    tie_word_embeddings=False,
)
VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
)


def environment():
    """The card, compute capability, driver and CUDA versions and the Python packages, as medvl-bench records its
    own (`environment` in the report)."""
    major, minor = torch.cuda.get_device_capability()
    try:
        driver = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        driver = None
    packages = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    for name in ("bitsandbytes", "peft"):
        try:
            packages[name] = __import__(name).__version__
        except ImportError:
            pass
    return dict(gpu=dict(name=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}", driver=driver,
                         cuda=torch.version.cuda,
                         memory_mb=torch.cuda.get_device_properties(0).total_memory / 1e6),
                packages=packages)


def write_report(path, report):
    """Writes the JSON report atomically (a temporary file renamed into place), with `environment()` added."""
    report = dict(report, environment=environment())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def timed_generate(model, ids, new_tokens):
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=1300)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    weights_mb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e6
    card = torch.cuda.get_device_name()
    cases = []
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, {card}")
    print("| batch | decode tokens/s | step ms | peak MB |\n|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, 150000, (batch, args.context), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        timed_generate(model, ids, 2)  # warm-up
        short = timed_generate(model, ids, 2)
        long = timed_generate(model, ids, 2 + args.tokens)
        step_s = (long - short) / args.tokens
        case = dict(batch=batch, context=args.context, tokens=args.tokens, step_ms=step_s * 1e3,
                    tokens_per_s=batch / step_s, peak_mb=torch.cuda.max_memory_allocated() / 1e6)
        cases.append(case)
        print(f"| {batch} | {case['tokens_per_s']:.1f} | {case['step_ms']:.2f} | {case['peak_mb']:.0f} |", flush=True)
    report = dict(card=card, stack=f"transformers {__import__('transformers').__version__} + torch {torch.__version__}",
                  weights="bf16", weights_mb=weights_mb, cases=cases)
    if args.out:
        write_report(args.out, report)


if __name__ == "__main__":
    main()
