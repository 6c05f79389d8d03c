"""
Packing, measured (a benchmark, not a test): forward + backward of KL(v_C‖π_θ) over the same kept
positions, one record per forward pass (as the reference runs them) vs packed (one pass per
question over prompt + its longest kept prefix), on the tiny expert of the test fixtures.

    python tests/bench_train.py
    python tests/bench_train.py --max-new-tokens 64 --beta 7.5 --device cuda

Prints records/s and tokens processed for both, and checks that both give the same loss.
"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import conftest  # noqa: E402
import train  # noqa: E402
from common import parse_flags, pick_device, stop_token_ids  # noqa: E402
import sample  # noqa: E402

# -----------------------------------------------------------------------------
questions = 12  # GSM8K questions of the test fixture (it has 12)
max_new_tokens = 128  # rollout length, as the paper's sampling
alpha = 0.2  # plausibility cut α (paper: 0.2)
beta = 7.0  # KL threshold β: the random tiny models disagree by KL ≈ 7 on average, so about half is kept
batch_size = 8  # records per micro-batch in train.py's shuffled order (the third line)
repeats = 1  # timed passes over all records; the best one counts
device = "cpu"
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]


def timed(model, groups, pad_id):
    """Forward + backward of every group (a list of (input, soft label)); returns the summed KL, the
    seconds and the tokens processed."""
    loss, tokens = 0.0, 0
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for group in groups:
        kl, n = train.soft_label_kl(model, [x for x, _ in group], [label for _, label in group], pad_id)
        kl.sum().backward()
        loss, tokens = loss + kl.sum().item(), tokens + n
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0, tokens


if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    from peft import LoraConfig, get_peft_model
    dev = pick_device(device)
    torch.manual_seed(seed)

    # ---- the tiny expert and amateur of the tests, and their kept positions (stage 1, in memory)
    texts = conftest.questions()[:questions]
    tok = conftest.build_tokenizer(conftest.questions())
    eos = [tok.convert_tokens_to_ids("<|endoftext|>")]
    expert = conftest.build_model(len(tok) + 16, 64, 2, 4, 1, eos).to(dev)
    amateur = conftest.build_model(len(tok) + 4, 32, 1, 2, 2, eos).to(dev)
    prompts = [train.prompt_ids(tok, q, train.DEFAULT_SYSTEM_PROMPT) for q in texts]
    for name, value in dict(max_new_tokens=max_new_tokens, alpha=alpha, beta=beta, seed=seed, chunk=16).items():
        setattr(sample, name, value)
    results = sample.sample_batch(expert, amateur, prompts, range(len(prompts)), tok.pad_token_id,
                                  stop_token_ids(tok, expert), len(tok) + 4)
    by_question = []  # per question: (prompt + prefix, (V, v_C)) of each kept position, as train.py reads them
    for p, r in zip(prompts, results):
        by_question += [[(p + r["completion_ids"][:t], (V["token_ids"], V["weights"]))
                         for t, V in r["labels"].items()]]
    by_question = [g for g in by_question if g]
    records = [rec for group in by_question for rec in group]
    n_positions = sum(len(r["completion_ids"]) for r in results)
    print(f"{len(texts)} questions, {n_positions} generated positions, {len(records)} kept (β={beta}); "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, device {dev}")

    # ---- the expert with LoRA, as train.py tunes it
    model = get_peft_model(expert, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model.train()
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    ways = {"one record per forward": [[rec] for rec in records],
            "packed, one pass per question": by_question,
            f"train.py's shuffled micro-batches of {batch_size}": [[records[i] for i in order[s:s + batch_size]]
                                                                  for s in range(0, len(order), batch_size)]}
    timed(model, by_question[:2], tok.pad_token_id)  # warm-up
    best = {}
    for _ in range(repeats):
        for name, groups in ways.items():
            model.zero_grad()
            loss, seconds, tokens = timed(model, groups, tok.pad_token_id)
            if name not in best or seconds < best[name][1]:
                best[name] = (loss, seconds, tokens)
    base_loss, base_s, base_tokens = best["one record per forward"]
    for name, (loss, seconds, tokens) in best.items():
        assert abs(loss - base_loss) <= 1e-4 * abs(base_loss), (name, loss, base_loss)
        print(f"{name:>42}: {len(records) / seconds:8.1f} records/s ({base_s / seconds:5.1f}x), "
              f"{tokens:7d} tokens processed ({base_tokens / tokens:5.1f}x fewer), {len(ways[name])} passes")
