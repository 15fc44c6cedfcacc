"""The Python stack on one document page, for `medvl-bench page` to be read against (same card, same command).

transformers' Qwen2.5-VL-7B with random weights, in bf16 and in NF4 (bitsandbytes, blocksize 64, double
quantization, bf16 compute: every linear layer but lm_head, as `BitsAndBytesConfig(load_in_4bit=True, ...)` does),
on the same synthetic page as medvl-bench (840x1176 px = 1,260 image tokens, 1232x1764 px = 2,772), the same
extraction prompt, 256 new tokens forced (min_new_tokens), greedy, batch 1. Per case: preprocessing (image
processor + template + tokenizer), time to first token (preprocessing + `generate` of 1 token), decode tokens/s
(255 / (t(256) - t(1))), page + 256 tokens end to end avg/min/max over --runs after a warm-up, weights and peak
memory from torch's allocator and, as medvl-bench reads it, from the driver (`nvidia-smi`'s memory in use on the
device, sampled every 20 ms from before torch touches the card, so the CUDA context counts: after loading, and the
peak from then to the end of the runs). Writes JSON (--out) and prints a table.

NF4 needs bitsandbytes (the GPU machine has none installed: scripts/bnb-wheel.sh fetches the wheel here and
scripts/gpu-check.sh installs it there); without it only bf16 runs.
"""

import argparse
import gzip
import os
import random
import subprocess
import threading
import time

import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from decode_baseline import TEXT, VISION, write_report

PROMPT = ("Extract all medical information from this document: diagnoses, medications with dose, route and "
          "frequency, laboratory values with units and reference ranges, vital signs and procedures.")
PAGES = {1260: (840, 1176), 2772: (1232, 1764)}
IMAGE_PAD = 151655


def page(width, height, seed):
    """White page with dark word-sized marks on text lines (the same kind of page as medvl-bench draws)."""
    rng = random.Random(seed)
    img = Image.new("L", (width, height), 255)
    px = img.load()
    margin, y = width // 12, height // 14
    while y + 14 < height - height // 14:
        x = margin
        while x < width - margin:
            word = min(rng.randrange(12, 70), width - margin - x)
            for dy in range(12):
                for dx in range(word):
                    px[x + dx, y + dy] = rng.randrange(0, 90)
            x += word + rng.randrange(6, 14)
        y += rng.randrange(20, 34)
    return img.convert("RGB")


def to_nf4(model):
    """Every nn.Linear but lm_head -> bitsandbytes Linear4bit (NF4, double quant, bf16 compute), on the GPU."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not full.endswith("lm_head"):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                setattr(module, child_name, q.cuda())
                del child
    torch.cuda.empty_cache()
    return model


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def with_lora(model, rank):
    """PEFT LoRA (rank `rank`, alpha 2 * rank: the reference's r=64, alpha=128) on the 7 projections of every decoder
    layer, random A and B (init_lora_weights=False), unmerged: the reference's QLoRA model at inference."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        init_lora_weights=False)
    return get_peft_model(model, config).eval()


class DriverMemory:
    """Device memory in use as the driver reports it, in MB above the figure at start, sampled by `nvidia-smi -lms`
    (the device's figure: other processes on the card would count too). `None` figures without nvidia-smi."""

    def __init__(self, index=0):
        self.baseline = self.current = self.peak = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-lms", "20"], stdout=subprocess.PIPE, text=True)
        except OSError as e:
            print(f"no driver memory figures: {e}")
            self.proc = None
            return
        first = self.proc.stdout.readline()
        self.baseline = self.current = self.peak = float(first)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                used = float(line)
            except ValueError:
                continue
            self.current = used
            self.peak = max(self.peak, used)

    def used_mb(self):
        return None if self.baseline is None else (self.current - self.baseline) * 1.048576

    def peak_mb(self):
        return None if self.baseline is None else (self.peak - self.baseline) * 1.048576

    def reset_peak(self):
        if self.baseline is not None:
            time.sleep(0.05)
            self.peak = self.current


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default="bf16,nf4,nf4-lora")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--image-tokens", default="1260,2772")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--tokenizer", default=os.path.join(here, "../../fixtures/qwen/tokenizer.json.gz"))
    p.add_argument("--out")
    args = p.parse_args()
    driver = DriverMemory()
    card = torch.cuda.get_device_name()
    with gzip.open(args.tokenizer, "rt") as f:
        tok_json = f.read()
    tmp_tok = "/tmp/medvl-page-tokenizer.json"
    with open(tmp_tok, "w") as f:
        f.write(tok_json)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tmp_tok)
    # The hub preprocessor_config.json of Qwen2.5-VL-7B-Instruct (PIL backend: the GPU machine has no torchvision).
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    stack = f"transformers {__import__('transformers').__version__} + torch {torch.__version__}"
    formats = args.formats.split(",")
    try:
        import bitsandbytes
        stack += f" + bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        if any(f.startswith("nf4") for f in formats):
            print("bitsandbytes is not installed: NF4 skipped")
            formats = [f for f in formats if not f.startswith("nf4")]
    if "nf4-lora" in formats:
        import peft
        stack += f" + peft {peft.__version__}"
    print(f"{stack}, {card}")
    print(f"| weights | image tokens | weights MB | peak MB | preprocess s | TTFT s | decode tok/s | "
          f"page + {args.new_tokens} tokens s (min-max) |\n|---|---|---|---|---|---|---|---|")
    cases = []
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION)
    for fmt in formats:
        driver.reset_peak()
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
        if fmt.startswith("nf4"):
            model = to_nf4(model)
        if fmt == "nf4-lora":
            model = with_lora(model, args.lora_rank)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - start
        weights_mb = torch.cuda.memory_allocated() / 1e6
        time.sleep(0.05)
        driver_loaded_mb = driver.used_mb()
        driver.reset_peak()
        for tokens in [int(t) for t in args.image_tokens.split(",")]:
            width, height = PAGES[tokens]
            image = page(width, height, tokens)

            def prepare():
                pixels = processor(images=[image], return_tensors="pt")
                grid = pixels["image_grid_thw"]
                n = int(grid.prod()) // 4
                text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + PROMPT
                        + "<|im_end|>\n<|im_start|>assistant\n")
                ids = tokenizer(text, return_tensors="pt")["input_ids"].cuda()
                return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=pixels["pixel_values"].cuda().to(torch.bfloat16), image_grid_thw=grid.cuda(),
                            mm_token_type_ids=(ids == IMAGE_PAD).to(torch.int32)), n

            def timed(new_tokens):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                inputs, n = prepare()
                t1 = time.perf_counter()
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                torch.cuda.synchronize()
                return t1 - t0, time.perf_counter() - t0, n, inputs["input_ids"].shape[1]

            torch.cuda.reset_peak_memory_stats()
            _, _, n, prompt_tokens = timed(16)  # warm-up
            assert n == tokens, f"{width}x{height} gave {n} image tokens"
            runs = []
            for _ in range(args.runs):
                pre, first, _, _ = timed(1)
                _, total, _, _ = timed(args.new_tokens)
                runs.append(dict(preprocess_s=pre, time_to_first_token_s=first, total_s=total,
                                 decode_tokens_per_s=(args.new_tokens - 1) / (total - first)))
            spread = lambda k: dict(avg=sum(r[k] for r in runs) / len(runs), min=min(r[k] for r in runs),
                                    max=max(r[k] for r in runs))
            case = dict(format=fmt, image_tokens=tokens, width=width, height=height, prompt_tokens=prompt_tokens,
                        load_s=load_s, weights_mb=weights_mb, peak_mb=torch.cuda.max_memory_allocated() / 1e6,
                        driver_loaded_mb=driver_loaded_mb, driver_peak_mb=driver.peak_mb(),
                        total_s=spread("total_s"), time_to_first_token_s=spread("time_to_first_token_s"),
                        decode_tokens_per_s=spread("decode_tokens_per_s"), runs=runs)
            cases.append(case)
            print(f"| {fmt} | {tokens} | {weights_mb:.0f} | {case['peak_mb']:.0f} | "
                  f"{sum(r['preprocess_s'] for r in runs) / len(runs):.3f} | {case['time_to_first_token_s']['avg']:.3f} | "
                  f"{case['decode_tokens_per_s']['avg']:.1f} | {case['total_s']['avg']:.2f} "
                  f"({case['total_s']['min']:.2f}-{case['total_s']['max']:.2f}) |", flush=True)
        del model
        torch.cuda.empty_cache()
    report = dict(card=card, stack=stack, new_tokens=args.new_tokens, cases=cases)
    if args.out:
        write_report(args.out, report)


if __name__ == "__main__":
    main()
