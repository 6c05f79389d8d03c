"""
Stage 1 of LightReasoner (Wang et al., arXiv 2510.07962): find the moments where the expert's
reasoning is special, and label them.

The expert answers each training question greedily. At every generated position t we compare its
next-token distribution π_E with the amateur's π_A on the same prefix. Where they disagree enough,
KL(π_E‖π_A) > β, the position is kept, with the soft label v_C = softmax(log π_E − log π_A) over
the expert's plausible tokens {a : π_E(a) ≥ α·max π_E}. Stage 2 (train.py) tunes the expert on them.

    python sample.py                                  # the paper: 1000 GSM8K train questions
    python sample.py --max-questions 50 --batch-size 16
    python sample.py --data my_questions.jsonl        # any JSONL with a "question" field

Writes out/samples.jsonl (one line per kept position), out/rollouts.jsonl (one line per question:
the completion and its KL at every position) and out/sample_config.json. Kill it at any moment and
run the same command again: it resumes where it stopped.
"""
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm
from common import (append_jsonl, chat_prompt_ids, complete_lines, die, download, greedy_config, load_model,
                    load_tokenizer, parse_flags, pick_device, pick_dtype, position_ids, read_json,
                    read_jsonl, stop_token_ids, write_json, write_jsonl)

# -----------------------------------------------------------------------------
# configuration: the defaults reproduce the paper
expert = "Qwen/Qwen2.5-Math-1.5B"  # π_E: the strong model that stage 2 fine-tunes
amateur = "Qwen/Qwen2.5-0.5B"  # π_A: the weak model whose mistakes make the expert's moves stand out
data = "gsm8k"  # "gsm8k" (GSM8K train, downloaded once) or a JSONL file with a "question" field
max_questions = 1000  # the first N questions (paper: 1000 GSM8K questions)
max_new_tokens = 128  # length of each expert rollout (paper: 128)
alpha = 0.2  # plausibility cut α: keep tokens with π_E(a) ≥ α·max π_E (paper: 0.2)
beta = 0.4  # KL threshold β: keep position t iff KL(π_E‖π_A) > β (paper: 0.4)
system_prompt = "Please reason step by step."  # system turn of the chat prompt (as the reference)
batch_size = 8  # questions generated together
chunk = 16  # generated positions whose full-vocabulary distributions are held at once (memory)
out_dir = "out"
device = "auto"  # cuda if available, else cpu
dtype = "auto"  # bfloat16 on cuda, float32 on cpu; distributions are always float32
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl"

# -----------------------------------------------------------------------------
# the method


@torch.no_grad()
def greedy_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_id, vocab):
    """The expert's greedy rollouts, (B, T) token ids. The generation config is spelled out so the
    sampling settings an instruct model ships (temperature, top-p, repetition penalty) never apply.
    Ids past `vocab` exist only in the expert's padded output layer (a trained model never picks
    them); they are suppressed so the amateur can read every generated token."""
    n_out = model.get_output_embeddings().out_features
    config = greedy_config(max_new_tokens, stop_ids, pad_id, suppress=range(vocab, n_out))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, input_ids.shape[1]:]


def completion_lengths(generated, stop_ids):
    """Tokens of each rollout up to and including its first stop token (the position that predicts
    the end is a real decision; everything after it is padding)."""
    is_stop = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, generated.shape[1])
    return first.tolist()


@torch.no_grad()
def hidden_states(model, input_ids, attention_mask):
    """One teacher-forced pass over prompt + completion: the last hidden states, (B, L, H). We stop
    before the lm_head: full-vocabulary logits are made later, only where needed, a chunk at a time."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state


@torch.no_grad()
def log_probs(model, hidden, vocab):
    """log π over the model's full output vocabulary (softmax of the raw logits, in float32), then
    cut to the ids both models share: (B, c, H) -> (B, c, vocab)."""
    return model.get_output_embeddings()(hidden).float().log_softmax(-1)[..., :vocab]


def contrast(logp_expert, logp_amateur, alpha, beta):
    """The heart of LightReasoner, on (..., V) log-probabilities. Returns the KL at each position,
    which positions are kept, the plausible set and the soft label v_C (zero outside the set)."""
    p_expert = logp_expert.exp()
    kl = (p_expert * (logp_expert - logp_amateur)).sum(-1)  # KL(π_E‖π_A)
    keep = kl > beta  # only where the expert and the amateur really differ
    plausible = p_expert >= alpha * p_expert.max(-1, keepdim=True).values  # {a : π_E(a) ≥ α·max π_E}
    contrast_score = (logp_expert - logp_amateur).masked_fill(~plausible, float("-inf"))
    soft_label = contrast_score.softmax(-1)  # v_C = softmax over the plausible set of log π_E − log π_A
    return kl, keep, plausible, soft_label


@torch.no_grad()
def sample_batch(expert_model, amateur_model, prompts, pad_id, stop_ids, vocab, max_new_tokens, alpha, beta, chunk):
    """Roll out a batch of prompts (lists of token ids) with the expert and contrast it with the
    amateur. Returns, per prompt: completion ids, the KL at every position, and the kept positions
    as (step, token_ids, weights)."""
    dev = expert_model.device
    width = max(map(len, prompts))  # left padding: every prompt ends at column width-1
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    generated = greedy_generate(expert_model, input_ids, prompt_mask, max_new_tokens, stop_ids, pad_id, vocab)
    lengths = completion_lengths(generated, stop_ids)

    # Both models see exactly the same token ids: the prompt, then the expert's own tokens.
    steps = torch.arange(generated.shape[1], device=dev)
    full_ids = torch.cat([input_ids, generated], 1)  # (B, L)
    full_mask = torch.cat([prompt_mask, (steps[None] < torch.tensor(lengths, device=dev)[:, None]).long()], 1)
    h_expert = hidden_states(expert_model, full_ids, full_mask)  # (B, L, H_E)
    h_amateur = hidden_states(amateur_model, full_ids, full_mask)  # (B, L, H_A)

    results = [dict(completion_ids=generated[b, :lengths[b]].tolist(), kl=[], kept=[]) for b in range(len(prompts))]
    for t0 in range(0, max(lengths), chunk):
        cols = slice(width - 1 + t0, width - 1 + min(t0 + chunk, max(lengths)))  # column width-1+t predicts token t
        logp_E = log_probs(expert_model, h_expert[:, cols], vocab)  # (B, c, V) log π_E
        logp_A = log_probs(amateur_model, h_amateur[:, cols], vocab)  # (B, c, V) log π_A
        kl, keep, plausible, soft_label = contrast(logp_E, logp_A, alpha, beta)
        # V and v_C of all kept positions of the chunk at once (one nonzero, not one per position)
        row, token = plausible[keep].nonzero().unbind(1)  # (n,), (n,): kept position, token id a ∈ V
        weight = soft_label[keep][row, token]  # v_C(a)
        labels = {pos: ([], []) for pos in map(tuple, keep.nonzero().tolist())}
        kept_positions = list(labels)
        for i, a, w in zip(row.tolist(), token.tolist(), weight.tolist()):
            labels[kept_positions[i]][0].append(a)
            labels[kept_positions[i]][1].append(w)
        kl = kl.tolist()
        for b, r in enumerate(results):
            for c in range(min(chunk, lengths[b] - t0)):
                r["kl"].append(kl[b][c])
                if (b, c) in labels:
                    ids, weights = labels[b, c]
                    order = sorted(range(len(ids)), key=lambda j: -weights[j])  # most contrastive first
                    r["kept"].append((t0 + c, [ids[j] for j in order], [weights[j] for j in order]))
    return results


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    if not 0 < alpha <= 1:
        die(f"--alpha {alpha} must be in (0, 1]: the plausible set keeps tokens with π_E ≥ α·max π_E")
    if beta < 0:
        die(f"--beta {beta} must be ≥ 0: it is a KL threshold")
    if max_new_tokens < 1 or max_questions < 1 or batch_size < 1 or chunk < 1:
        die("--max-new-tokens, --max-questions, --batch-size and --chunk must be ≥ 1")
    torch.manual_seed(seed)

    # ---- the questions
    path = download(GSM8K_URL, os.path.join("data", "gsm8k", "train.jsonl")) if data == "gsm8k" else data
    rows = read_jsonl(path, with_lines=True)
    if not rows:
        die(f"{path} holds no questions; give a JSONL file with one {{\"question\": ...}} per line")
    for n, row in rows:
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            die(f"{path}:{n}: no \"question\" field (a non-empty string); every line needs one")
    questions = [dict(id=row.get("id", row["question"]), question=row["question"]) for _, row in rows][:max_questions]

    # ---- the models: one tokenizer for both, so they must agree on every shared id
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tok = load_tokenizer(expert)
    tok_amateur = load_tokenizer(amateur)
    shared = min(len(tok), len(tok_amateur))
    names_E, names_A = tok.convert_ids_to_tokens(list(range(shared))), tok_amateur.convert_ids_to_tokens(list(range(shared)))
    bad = next((i for i in range(shared) if names_E[i] != names_A[i]), None)
    if bad is not None:
        die(f"the expert's and amateur's tokenizers differ (id {bad}: {names_E[bad]!r} vs {names_A[bad]!r}); "
            "LightReasoner compares distributions token by token, so pick two models of one family")
    expert_model = load_model(expert, dev, torch_dtype)
    amateur_model = load_model(amateur, dev, torch_dtype)
    # Compare on the ids both output layers have (Qwen pads its vocabularies to different sizes).
    vocab = min(expert_model.get_output_embeddings().out_features, amateur_model.get_output_embeddings().out_features)
    stop_ids = stop_token_ids(tok, expert_model)

    # ---- the output directory: resume a run with the same configuration, refuse to mix two
    os.makedirs(out_dir, exist_ok=True)
    samples_path, rollouts_path = os.path.join(out_dir, "samples.jsonl"), os.path.join(out_dir, "rollouts.jsonl")
    config_path = os.path.join(out_dir, "sample_config.json")
    run_config = {k: globals()[k] for k in ["expert", "amateur", "data", "max_questions", "max_new_tokens",
                                            "alpha", "beta", "system_prompt", "seed"]}
    run_config["dtype"] = str(torch_dtype).removeprefix("torch.")
    if os.path.exists(config_path):
        old = read_json(config_path).get("config", {})
        diff = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
        if diff:
            die(f"{out_dir} holds a sampling run with another configuration ({', '.join(diff)} differ); "
                "pass a new --out-dir or delete the old one")
    elif os.path.exists(samples_path) or os.path.exists(rollouts_path):
        die(f"{out_dir} holds samples without a sample_config.json; pass a new --out-dir or delete the old files")
    write_json(config_path, {"config": run_config, "totals": None})
    # A question is done once its rollout line is written (after its samples). Samples written
    # after the last done question belong to one a kill interrupted: drop them; it is redone.
    rollouts = complete_lines(rollouts_path)
    assert [r["index"] for r in rollouts] == list(range(len(rollouts))), "rollouts.jsonl out of order"
    n_samples = sum(len(r["kept"]) for r in rollouts)
    write_jsonl(samples_path, complete_lines(samples_path)[:n_samples])
    done = len(rollouts)

    # ---- sample. Batches keep fixed boundaries, so a resumed run pads (and rounds) exactly like
    # an uninterrupted one; a half-written batch is recomputed and only its missing questions written.
    t_start, new_tokens = time.time(), 0
    n_kept, kl_sum, n_positions = n_samples, sum(sum(r["kl"]) for r in rollouts), sum(len(r["kl"]) for r in rollouts)
    bar = tqdm(total=len(questions), initial=done, desc="sampling", unit="q", dynamic_ncols=True)
    try:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            if start + len(batch) <= done:
                continue
            prompts = [chat_prompt_ids(tok, q["question"], system_prompt) for q in batch]
            for i, (q, prompt, r) in enumerate(zip(batch, prompts, sample_batch(
                    expert_model, amateur_model, prompts, tok.pad_token_id, stop_ids, vocab,
                    max_new_tokens, alpha, beta, chunk))):
                if start + i < done:
                    continue
                ids = r["completion_ids"]
                append_jsonl(samples_path, [dict(
                    id=q["id"], question=q["question"], step=t, prefix=tok.decode(ids[:t]), prefix_ids=ids[:t],
                    token_ids=token_ids, tokens=[tok.decode([a]) for a in token_ids], weights=weights, kl=r["kl"][t],
                ) for t, token_ids, weights in r["kept"]])
                append_jsonl(rollouts_path, [dict(  # written last: the mark that this question is done
                    index=start + i, id=q["id"], question=q["question"], prompt=tok.decode(prompt),
                    completion=tok.decode(ids), completion_ids=ids, kl=r["kl"], kept=[t for t, _, _ in r["kept"]],
                )])
                new_tokens += len(ids)
                n_kept, kl_sum, n_positions = n_kept + len(r["kept"]), kl_sum + sum(r["kl"]), n_positions + len(ids)
                bar.update(1)
                bar.set_postfix(kept=n_kept, mean_kl=f"{kl_sum / max(n_positions, 1):.3f}")
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {bar.n} questions are saved in {out_dir}; run the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    bar.close()

    # ---- totals, over the whole run (resumed parts included)
    rollouts = complete_lines(rollouts_path)
    kls = [k for r in rollouts for k in r["kl"]]
    wall = time.time() - t_start
    totals = dict(questions=len(rollouts), generated_tokens=len(kls), kept_positions=n_kept,
                  kept_fraction=n_kept / max(len(kls), 1), mean_kl=statistics.fmean(kls) if kls else 0.0,
                  median_kl=statistics.median(kls) if kls else 0.0, wall_time_s=wall,
                  tokens_per_s=new_tokens / wall if wall > 0 else 0.0)
    write_json(config_path, {"config": run_config, "totals": totals})
    print(f"sampled {totals['questions']} questions, {totals['generated_tokens']} tokens; kept {n_kept} positions "
          f"({100 * totals['kept_fraction']:.1f}%), mean KL {totals['mean_kl']:.3f}; {wall:.0f}s this run "
          f"({totals['tokens_per_s']:.1f} tokens/s) -> {samples_path}")
