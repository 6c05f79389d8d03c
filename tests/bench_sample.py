"""
Benchmark (not a test): sample.py's single teacher-forced amateur pass vs the reference's per-prefix
baseline (decode each prefix, re-tokenize prompt + prefix, run the amateur on each, 64 prefixes a
forward), on the tiny test models, for the same expert rollouts.

    python tests/bench_sample.py                      # 8 questions, 128 new tokens
    python tests/bench_sample.py --questions 16 --max-new-tokens 128

Prints amateur tokens processed and wall time of each, and their ratios; also the whole stage
(generation included) done ours (batched) vs the reference's way (one question at a time).

    python tests/bench_sample.py --page               # rollouts.html of a synthetic 1,000 × 128-token run

--page writes synthetic samples.jsonl / rollouts.jsonl / sample_config.json (shaped like a real run:
KL drawn log-normal so that about --kept of the positions exceed β = 0.4, plausible sets of 1-4 tokens)
and times and sizes the page sample.py builds from them. --kept 1 is `--select all`, the largest page.
"""
import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from statistics import NormalDist

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import conftest  # noqa: E402
import sample  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--questions", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--page", action="store_true", help="time and size rollouts.html on a synthetic run")
parser.add_argument("--kept", type=float, default=0.3, help="--page: fraction of positions kept")
args = parser.parse_args()


def page_benchmark(n_questions=1000, T=128, beta=0.4):
    rng = random.Random(0)
    words = [" the", " of", " 12", " apples", ",", ".", "\n", "\n\n", " =", " +", " $", " \\frac", "<", "&", " She", "é"]
    mu = math.log(beta) - NormalDist().inv_cdf(min(max(1 - args.kept, 1e-6), 1 - 1e-6))  # P(KL > β) = --kept
    out = tempfile.mkdtemp()
    with open(os.path.join(out, "rollouts.jsonl"), "w") as fr, open(os.path.join(out, "samples.jsonl"), "w") as fs:
        for i in range(n_questions):
            ids = [rng.randrange(150000) for _ in range(T)]
            tokens = [rng.choice(words) for _ in range(T)]
            kl = [math.exp(rng.gauss(mu, 1.0)) for _ in range(T)]
            kept = [t for t in range(T) if kl[t] > beta]
            q = f"Question {i}: " + "".join(rng.choice(words) for _ in range(40))
            for t in kept:
                n = rng.randint(1, 4)
                w = sorted((rng.random() for _ in range(n)), reverse=True)
                record = dict(index=i, id=q, question=q, step=t, prefix="".join(tokens[:t]), prefix_ids=ids[:t],
                              token_ids=ids[:n], tokens=tokens[:n], weights=[x / sum(w) for x in w],
                              p_expert=[rng.random() for _ in range(n)],
                              p_amateur=[10 ** rng.uniform(-6, 0) for _ in range(n)], kl=kl[t])
                fs.write(json.dumps(record, ensure_ascii=False) + "\n")
            fr.write(json.dumps(dict(index=i, id=q, question=q, prompt=q, completion="".join(tokens),
                                     completion_ids=ids, tokens=tokens, kl=kl, kept=kept), ensure_ascii=False) + "\n")
    with open(os.path.join(out, "sample_config.json"), "w") as f:
        json.dump({"config": dict(expert="x", amateur="y", beta=beta, select="kl"), "totals": None}, f)
    t = time.perf_counter()
    assert common.write_page(os.path.join(out, "rollouts.html"), lambda: sample.rollouts_page(out))
    wall = time.perf_counter() - t
    mb = os.path.getsize(os.path.join(out, "rollouts.html")) / 1e6
    n_kept = sum(1 for _ in open(os.path.join(out, "samples.jsonl")))
    print(f"rollouts.html for {n_questions} questions x {T} tokens, {n_kept} kept positions "
          f"({100 * n_kept / (n_questions * T):.0f}%): {mb:.1f} MB, built in {wall:.1f} s (samples.jsonl "
          f"{os.path.getsize(os.path.join(out, 'samples.jsonl')) / 1e6:.0f} MB) -> {out}/rollouts.html")


if args.page:
    page_benchmark()
    sys.exit(0)
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
    sample.max_new_tokens = T
    sample.sample_batch(expert, amateur, prompts, range(len(prompts)), tok.pad_token_id, stop, vocab)


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
