"""
Benchmark (not a test), for a GPU: generation tokens/s of evaluate.py's left-padded batches through
model.generate, per batch size, on the full-size Qwen2.5-Math-1.5B architecture with random weights
(no download needed): what --batch-size buys.

    python tests/bench_generate.py                    # on a CUDA GPU, bf16
    python tests/bench_generate.py --tiny             # a smoke run of the script on the CPU

Random weights rarely emit an end token, so every completion runs to --max-new-tokens: this measures
raw decoding throughput, not what completions of unequal length cost a static batch.
"""
import argparse
import os
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from common import greedy_config  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--prompts", type=int, default=128)
parser.add_argument("--max-new-tokens", type=int, default=256)
parser.add_argument("--batch-sizes", default="16,64")
parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU, to check the script runs")
args = parser.parse_args()

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
if args.tiny:
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
else:  # Qwen2.5-Math-1.5B's config.json
    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
torch.manual_seed(0)
with torch.device(dev):
    model = Qwen2ForCausalLM(config).to(dtype).eval()
# prompts of GSM8K-like lengths (the qwen25-math-cot prompt + a question: about 60-250 tokens)
g = torch.Generator().manual_seed(0)
lengths = torch.randint(60, 250, (args.prompts,), generator=g).tolist()
prompts = [torch.randint(100, config.vocab_size - 100, (n,), generator=g).tolist() for n in lengths]
cfg = greedy_config(args.max_new_tokens, [0], 0)
print(f"{dev} {dtype}: {args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens, {args.max_new_tokens} new tokens each")


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def padded(batch_size):
    n = 0
    for i in range(0, len(prompts), batch_size):
        part = prompts[i:i + batch_size]
        width = max(map(len, part))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in part], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=dev)
        for row in model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, width:].tolist():
            n += next((i + 1 for i, t in enumerate(row) if t == 0), len(row))  # up to the end token
    return n


for b in map(int, args.batch_sizes.split(",")):
    sync()
    t = time.perf_counter()
    n = padded(b)
    sync()
    dt = time.perf_counter() - t
    print(f"generate, batch {b:<14d} {n:8d} tokens {dt:8.1f} s {n / dt:10.1f} tokens/s")
