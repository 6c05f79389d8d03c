"""
Benchmark (not a test): sample.py's single teacher-forced amateur pass vs the reference's per-prefix
baseline (decode each prefix, re-tokenize prompt + prefix, run the amateur on each, 64 prefixes a
forward), on the tiny test models, for the same expert rollouts.

    python tests/bench_sample.py                      # 8 questions, 128 new tokens
    python tests/bench_sample.py --questions 16 --max-new-tokens 128

Prints amateur tokens processed and wall time of each, and their ratios; also the whole stage
(generation included) done ours (batched) vs the reference's way (one question at a time).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import conftest  # noqa: E402
import sample  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--questions", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=128)
args = parser.parse_args()
torch.set_num_threads(max(1, os.cpu_count() or 1))

# ---- the tiny models of the tests
tmp = tempfile.mkdtemp()
tok = conftest.build_tokenizer(conftest.questions())
eos = [tok.convert_tokens_to_ids("<|endoftext|>")]
expert = conftest.build_model(len(tok) + 16, 64, 2, 4, 1, eos)
amateur = conftest.build_model(len(tok) + 4, 32, 1, 2, 2, eos)
stop = common.stop_token_ids(tok, expert)
vocab = len(tok) + 4
questions = (conftest.questions() * 10)[:args.questions]
prompts = [common.chat_prompt_ids(tok, q, sample.system_prompt) for q in questions]
T = args.max_new_tokens


def rollouts():
    pad = tok.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = sample.greedy_generate(expert, ids, mask, T, stop, pad, vocab)
    lengths = sample.completion_lengths(gen, stop)
    return [gen[b, :lengths[b]].tolist() for b in range(len(prompts))]


completions = rollouts()
print(f"{len(prompts)} questions, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
      f"{sum(map(len, completions))} generated tokens")


# ---- amateur distributions, ours: one teacher-forced pass over prompt + completion, all questions
@torch.no_grad()
def ours():
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    h = sample.hidden_states(amateur, ids, mask)
    for t0 in range(0, T, sample.chunk):  # the distributions at the generated positions, chunked
        sample.log_probs(amateur, h[:, width - 1 - T + t0: width - 1 - T + t0 + sample.chunk], vocab)
    return int(mask.sum())


# ---- amateur distributions, the reference's way: every prefix decoded, re-tokenized, run alone
@torch.no_grad()
def per_prefix():
    n_tokens = 0
    for p, c in zip(prompts, completions):
        prompt_text = tok.decode(p)
        inputs = [torch.tensor(tok(prompt_text + tok.decode(c[:t]), add_special_tokens=False)["input_ids"])
                  for t in range(len(c))]
        for i in range(0, len(inputs), 64):
            part = inputs[i:i + 64]
            padded = torch.nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=tok.pad_token_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in part], batch_first=True)
            logits = amateur(padded, attention_mask=mask).logits
            for j, x in enumerate(part):
                logits[j, len(x) - 1].float().softmax(-1)
            n_tokens += int(mask.sum())
    return n_tokens


def timed(fn, repeat=3):
    fn()  # warm up
    t = time.perf_counter()
    for _ in range(repeat):
        n = fn()
    return n, (time.perf_counter() - t) / repeat


n_ours, t_ours = timed(ours)
n_base, t_base = timed(per_prefix)
print(f"amateur side   ours: {n_ours:7d} tokens {t_ours * 1e3:8.1f} ms | per-prefix: {n_base:7d} tokens "
      f"{t_base * 1e3:8.1f} ms | {n_base / n_ours:.1f}x fewer tokens, {t_base / t_ours:.1f}x less time")


# ---- the whole stage: ours (batched generation + two teacher-forced passes + contrast) vs the
# reference's way (one question at a time: generate, then the per-prefix amateur passes)
def whole_ours():
    sample.sample_batch(expert, amateur, prompts, tok.pad_token_id, stop, vocab, T, 0.2, 0.4, sample.chunk)


def whole_reference():
    global prompts, completions
    saved = prompts, completions
    for p in saved[0]:
        prompts = [p]
        completions = rollouts()
        per_prefix()
    prompts, completions = saved


_, t_whole_ours = timed(whole_ours, 1)
_, t_whole_ref = timed(whole_reference, 1)
print(f"whole stage    ours: {t_whole_ours:.2f} s | reference's way: {t_whole_ref:.2f} s | "
      f"{t_whole_ref / t_whole_ours:.1f}x less time")
