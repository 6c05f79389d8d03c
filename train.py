"""
Stage 2 of LightReasoner (Wang et al., arXiv 2510.07962): teach the expert its own special moves.

Stage 1 (sample.py) kept the positions where the expert π_E and the amateur π_A disagree, each with
a soft label v_C over the expert's plausible tokens. Here the expert, with LoRA adapters on its
attention, is tuned to match v_C at those positions only: the loss of a kept position is
KL(v_C‖π_θ) = Σ_a v_C(a) (log v_C(a) − log π_θ(a)), averaged over a batch of positions.

    python train.py                                   # the paper: 1000 steps on out/samples.jsonl
    python train.py --max-steps 200 --merge           # also write out/merged, a standalone model
    python train.py --resume                          # continue from the latest checkpoint
    python train.py --samples cd_dist_samples_gsm8k.jsonl --expert Qwen/Qwen2.5-Math-7B --out-dir run7b
                                                      # an official LightReasoner sample file
    python train.py --lr 0 --max-steps 20 --samples out/samples.jsonl --out-dir out/untrained
                                                      # the loss of the untrained expert

Writes out/lora (the adapter, loadable with PeftModel.from_pretrained), out/train_log.jsonl (one line
per optimiser step), out/checkpoints/ and out/train_config.json. All kept positions of one question
lie on the same expert rollout, so one forward pass serves all of them ("packing").
"""
import functools
import math
import os
import shutil
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict
from tqdm import tqdm

from common import (append_jsonl, chat_prompt_ids, chat_prompt_text, complete_lines, die, load_model, load_tokenizer,
                    parse_flags, pick_device, pick_dtype, read_json, read_jsonl, write_json, write_jsonl)

# -----------------------------------------------------------------------------
# configuration: the defaults reproduce the paper (its reference script's Trainer settings)
expert = ""  # π_E to tune; empty: the expert recorded in sample_config.json, else Qwen/Qwen2.5-Math-1.5B
samples = ""  # kept positions from stage 1 (or an official LightReasoner file); empty: <out-dir>/samples.jsonl
out_dir = "out"
max_steps = 1000  # optimiser steps (reference: 1000)
batch_size = 8  # records (kept positions) per micro-batch (reference: 8)
grad_accum = 2  # micro-batches per optimiser step (reference: 2), so 16 records a step
lr = 5e-5  # AdamW learning rate, linear decay to 0, no warmup, weight decay 0 (reference: 5e-5)
lora_r = 8  # LoRA rank (reference: 8)
lora_alpha = 16  # LoRA scaling α (reference: 16)
lora_dropout = 0.05  # dropout on the LoRA branch (reference: 0.05)
target_modules = "q_proj,v_proj"  # comma-separated layers that get an adapter (reference: q_proj, v_proj)
save_every = 200  # checkpoint every N steps (reference: 200)
resume = False  # continue the run in out_dir from its latest checkpoint
merge = False  # also write out_dir/merged: the expert with the adapter merged in
device = "auto"  # cuda if available, else cpu
dtype = "auto"  # bfloat16 autocast on cuda (as the reference), float32 on cpu; the loss is always float32
seed = 1337  # LoRA init, record shuffling and dropout
force = False  # train even if --expert is not the model the samples were drawn with
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5: noise
DEFAULT_SYSTEM_PROMPT = "Please reason step by step."  # the reference's, for files without a sample_config.json

# -----------------------------------------------------------------------------
# the method


def read_samples(path):
    """The records of a samples file, checked line by line. Stage 1's records carry the expert's
    exact tokens (`prefix_ids`); the official LightReasoner files carry only the text (`prefix`) and
    the question in `prompt_id`. Returns (records, official)."""
    if not os.path.exists(path):
        die(f"samples file {path} does not exist; run sample.py first or pass --samples")
    rows = read_jsonl(path, "samples file", with_lines=True)
    if not rows:
        die(f"samples file {path} holds no records; run sample.py (a lower --beta keeps more positions)")
    official = "prefix_ids" not in rows[0][1] and "prompt_id" in rows[0][1]
    fields = ("prompt_id", "prefix") if official else ("question", "prefix_ids")
    records = []
    for n, row in rows:
        question, prefix = row.get(fields[0]), row.get(fields[1])
        ids, w = row.get("token_ids"), row.get("weights")
        if not isinstance(question, str) or not (isinstance(prefix, str) if official else is_ids(prefix)):
            die(f"{path}:{n}: needs \"{fields[0]}\" and \"{fields[1]}\" like the lines before it; fix or remove that line")
        if not is_ids(ids) or not ids or not isinstance(w, list) or len(w) != len(ids):
            die(f"{path}:{n}: \"token_ids\" must be a non-empty list of token ids (ints ≥ 0) and \"weights\" a list as long")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in w):
            die(f"{path}:{n}: weights must be finite and ≥ 0 (a soft label v_C is a distribution)")
        if abs(sum(w) - 1) > 1e-3:
            die(f"{path}:{n}: weights sum to {sum(w):.6f}, not 1 (within 1e-3); v_C must be a distribution")
        records.append(dict(line=n, question=question, prefix=prefix if official else None,
                            prefix_ids=None if official else prefix, token_ids=ids, weights=[float(x) for x in w]))
    return records, official


def is_ids(x):
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def check_vocab(records, path, n_in, n_out):
    """Every id must exist in the expert: prefix ids in its embedding, soft-label ids in its lm_head."""
    for r in records:
        for ids, n, where in ((r["token_ids"], n_out, "output"), (r["prefix_ids"] or [], n_in, "input")):
            bad = next((i for i in ids if i >= n), None)
            if bad is not None:
                die(f"{path}:{r['line']}: token id {bad} is outside the expert's {where} vocabulary (0..{n - 1}); "
                    "were these samples drawn with another model?")


def input_ids(tok, record, system_prompt, official):
    """What the expert reads before a kept position: the chat prompt of sampling, then the prefix.
    Stage 1 records give the rollout's exact tokens; the official files only its text, so (as the
    reference does) the prompt text and the prefix text are tokenized together."""
    if not official:
        return prompt_ids(tok, record["question"], system_prompt) + record["prefix_ids"]
    text = chat_prompt_text(tok, record["question"], system_prompt) + record["prefix"]
    return tok(text, add_special_tokens=False)["input_ids"]


prompt_ids = functools.lru_cache(maxsize=None)(chat_prompt_ids)  # one chat template per question, not per record


def pack(inputs):
    """Packing. All kept positions of a question lie on one expert rollout, so the input of each is a
    prefix of the longest one's, and with causal attention one pass over that longest input gives
    the logits at all of them. Returns the rows to run and, per record, (row, column) where its
    logits are read: the last token of its own input, never a padding column."""
    rows, where = [], [None] * len(inputs)
    for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i])):
        x = inputs[i]
        r = next((r for r, row in enumerate(rows) if row[:len(x)] == x), None)
        if r is None:
            rows.append(x)
            r = len(rows) - 1
        where[i] = (r, len(x) - 1)
    return rows, where


def soft_label_kl(model, inputs, soft_labels, pad_id):
    """KL(v_C‖π_θ) of each record, (N,), from packed forward passes; and the tokens processed.
    inputs: token-id lists (prompt + prefix); soft_labels: (token_ids, weights) = v_C over the
    plausible set V. The lm_head runs only at the N positions read, never over (B, L, V)."""
    rows, where = pack(inputs)
    dev = model.device
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=dev)  # (R, L), right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=dev)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers stay in place
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (R, L, H)
    row, col = torch.tensor(where, device=dev).T
    logits = base.get_output_embeddings()(hidden[row, col])  # (N, V_out), at each record's own position
    log_pi = logits.float().log_softmax(-1)  # log π_θ over the full output layer, float32
    k = max(len(t) for t, _ in soft_labels)
    token_ids = torch.tensor([t + t[:1] * (k - len(t)) for t, _ in soft_labels], device=dev)  # (N, K)
    v_C = torch.tensor([w + [0.0] * (k - len(w)) for _, w in soft_labels], device=dev)  # (N, K), 0 off V
    kl = (torch.xlogy(v_C, v_C) - v_C * log_pi.gather(-1, token_ids)).sum(-1)  # Σ_a v_C(a)(log v_C(a) − log π_θ(a))
    return kl, sum(map(len, rows))


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The records of one epoch, shuffled; epochs follow each other for as long as the steps need."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, position, elapsed):
    """Kill-safe: written to a temporary directory, synced, renamed into place, and only then does
    latest.json (itself replaced atomically) point at it. A kill leaves the old checkpoint current."""
    name = f"step-{step:06d}"
    tmp, final = os.path.join(ckpt_dir, name + ".tmp"), os.path.join(ckpt_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(dict(step=step, position=position, elapsed_s=elapsed, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
               os.path.join(tmp, "state.pt"))
    for f in os.listdir(tmp):
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a step redone after a resume from an older checkpoint
    os.replace(tmp, final)
    write_json(os.path.join(ckpt_dir, "latest.json"), dict(step=step, dir=name))
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp"))
    for old in done[:-2]:  # keep two, as the reference's save_total_limit=2
        shutil.rmtree(os.path.join(ckpt_dir, old))


def save_model(path, model, tok):
    """A model (or adapter) and the tokenizer, written beside and swapped in whole."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    model.save_pretrained(path + ".tmp")
    tok.save_pretrained(path + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)


def same_model(a, b):
    return os.path.realpath(a) == os.path.realpath(b) if os.path.isdir(a) and os.path.isdir(b) else a == b


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    if max_steps < 1 or batch_size < 1 or grad_accum < 1 or save_every < 1 or lora_r < 1:
        die("--max-steps, --batch-size, --grad-accum, --save-every and --lora-r must be ≥ 1")
    if lr < 0 or not 0 <= lora_dropout < 1:
        die(f"--lr {lr} must be ≥ 0 and --lora-dropout {lora_dropout} in [0, 1)")
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]

    # ---- the samples, and the expert they were drawn with: the one we must tune
    samples = samples or os.path.join(out_dir, "samples.jsonl")
    records, official = read_samples(samples)
    sample_config_path = os.path.join(os.path.dirname(samples), "sample_config.json")
    sampled = read_json(sample_config_path).get("config", {}) if os.path.exists(sample_config_path) and not official else {}
    system_prompt = sampled.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    expert = expert or sampled.get("expert") or "Qwen/Qwen2.5-Math-1.5B"
    if sampled.get("expert") and not same_model(expert, sampled["expert"]) and not force:
        die(f"--expert {expert} is not {sampled['expert']}, the expert these samples were drawn with; LightReasoner "
            "tunes the very model whose moves were labelled (pass --force to train anyway)")

    # ---- the output directory: continue one run, never overwrite another
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    config_path, log_path = os.path.join(out_dir, "train_config.json"), os.path.join(out_dir, "train_log.jsonl")
    ckpt_dir, lora_dir = os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "lora")
    run_config = {k: globals()[k] for k in ["expert", "samples", "max_steps", "batch_size", "grad_accum", "lr",
                                            "lora_r", "lora_alpha", "lora_dropout", "target_modules", "seed"]}
    run_config.update(records=len(records), system_prompt=system_prompt, dtype=str(torch_dtype).removeprefix("torch."))
    if not resume and any(os.path.exists(p) for p in (config_path, log_path, ckpt_dir, lora_dir)):
        die(f"{out_dir} already holds a training run (train_config.json, lora/ or checkpoints/); "
            "pass --resume to continue it, or a fresh --out-dir")
    if resume and os.path.exists(config_path):
        old = read_json(config_path).get("config", {})
        diff = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
        if diff:
            die(f"{out_dir} holds a training run with another configuration ({', '.join(diff)} differ); "
                "run with the same flags to resume, or pass a fresh --out-dir")

    # ---- the expert, with LoRA adapters: only they are trained
    tok = load_tokenizer(expert)
    model = load_model(expert, dev, torch_dtype)
    check_vocab(records, samples, model.get_input_embeddings().num_embeddings, model.get_output_embeddings().out_features)
    layers = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [m for m in targets if m not in layers]
    if unknown or not targets:
        die(f"--target-modules {target_modules}: {', '.join(unknown) or 'none given'} not in {expert}; "
            f"its linear layers are {', '.join(sorted(layers))}")
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    model.train()
    os.makedirs(ckpt_dir, exist_ok=True)  # all checks passed: from here on out_dir holds this run
    write_json(config_path, {"config": run_config, "totals": None})
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print(f"LoRA r={lora_r} on {','.join(targets)}: {n_train:,} trainable parameters ({100 * n_train / n_all:.2f}%)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max_steps))  # linear to 0
    autocast = torch.autocast(dev.split(":")[0], dtype=torch_dtype, enabled=torch_dtype != torch.float32)

    # ---- what the expert reads at each kept position, and the soft label v_C it should match there
    if official:
        print(f"{samples} is an official LightReasoner sample file (no prefix_ids): each input is the chat prompt "
              "+ the prefix text, tokenized together as the reference does")
    inputs = [input_ids(tok, r, system_prompt, official) for r in records]
    soft_labels = [(r["token_ids"], r["weights"]) for r in records]

    # ---- resume: adapter, optimiser, schedule, RNG and the position in the record stream
    step, position, elapsed = 0, 0, 0.0
    for d in [d for d in os.listdir(ckpt_dir) if d.endswith(".tmp")]:  # saves that a kill interrupted
        shutil.rmtree(os.path.join(ckpt_dir, d))
    latest = os.path.join(ckpt_dir, "latest.json")
    if resume and os.path.exists(latest):
        ckpt = os.path.join(ckpt_dir, read_json(latest)["dir"])
        set_peft_model_state_dict(model, load_peft_weights(ckpt, device=dev))
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step, position, elapsed = state["step"], state["position"], state["elapsed_s"]
        print(f"resuming {out_dir} from step {step}")
    elif resume:
        print(f"no checkpoint in {ckpt_dir}: starting from step 0")
    write_jsonl(log_path, [row for row in complete_lines(log_path) if row["step"] <= step])  # drop steps a kill undid

    # ---- train: each step averages KL(v_C‖π_θ) over batch_size × grad_accum records
    t_start, start_step, processed = time.time(), step, 0
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    while step < max_steps:
        t_step, loss_sum, tokens = time.time(), 0.0, 0
        for _ in range(grad_accum):
            batch = [epoch_order(len(records), seed, p // len(records))[p % len(records)]
                     for p in range(position, position + batch_size)]
            position += batch_size
            with autocast:
                kl, n_tokens = soft_label_kl(model, [inputs[i] for i in batch], [soft_labels[i] for i in batch],
                                             tok.pad_token_id)
            (kl.sum() / (batch_size * grad_accum)).backward()  # "batchmean" over the step's records
            loss_sum, tokens = loss_sum + kl.sum().item(), tokens + n_tokens
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the Trainer default the reference runs with
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, processed = step + 1, processed + tokens
        n, now = batch_size * grad_accum, time.time()
        row = dict(step=step, loss=loss_sum / n, lr=lr_now, records=n, tokens=tokens,
                   records_per_s=n / (now - t_step), elapsed_s=elapsed + now - t_start)
        append_jsonl(log_path, [row])
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", rec_s=f"{row['records_per_s']:.1f}")
        if step % save_every == 0 or step == max_steps:
            save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, position, row["elapsed_s"])
    bar.close()

    # ---- the adapter (and the merged model), and the totals
    save_model(lora_dir, model, tok)
    if merge:
        save_model(os.path.join(out_dir, "merged"), model.merge_and_unload(), tok)
    wall, seen = time.time() - t_start, max_steps * batch_size * grad_accum
    log = complete_lines(log_path)
    totals = dict(steps=max_steps, records_seen=seen, tuned_tokens=seen, records=len(records),
                  final_loss=log[-1]["loss"] if log else None, wall_time_s=elapsed + wall)
    write_json(config_path, {"config": run_config, "totals": totals})
    print(f"trained {max_steps} steps ({max_steps - start_step} this run): {seen} records seen = {seen} tuned tokens "
          f"(one position each), {processed} tokens processed this run; {wall:.0f}s this run -> {lora_dir}"
          + (f", {os.path.join(out_dir, 'merged')}" if merge else ""))
