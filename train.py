"""
Stage 2 of LightReasoner (Wang et al., arXiv 2510.07962): teach the expert its own special moves.

Stage 1 (sample.py) kept the positions where the expert π_E and the amateur π_A disagree, each
with a soft label v_C over the expert's plausible tokens V. Here the expert, with LoRA adapters on
its attention, is tuned to match v_C at those positions only: the loss of a kept position is
KL(v_C‖π_θ) = Σ_a v_C(a) (log v_C(a) − log π_θ(a)), averaged over a batch of positions.

    python train.py                                  # the paper: 1000 steps on out/samples.jsonl
    python train.py --max-steps 200 --merge          # also write out/merged, a standalone model
    python train.py --label expert --out-dir out/expert  # ablation: train towards π_E, not v_C
    torchrun --standalone --nproc_per_node 4 train.py    # 4 GPUs share each step's 16 records

Killed? The same command again resumes from the latest checkpoint (README: "Resuming a run").
Writes out/lora (the adapter), out/train_log.jsonl (a line a step), out/checkpoints/,
out/train_config.json (the run's record) and out/train.html (the curves).
"""
import contextlib
import functools
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (DEFAULT_EXPERT, RANK, WORLD_SIZE, append_jsonl, barrier, chat_prompt_ids,
                    chat_prompt_text, complete_lines, device_name, die, dtype_name, esc, finish_run,
                    fingerprint, first_line, init_distributed, load_model, load_tokenizer, master,
                    page, parse_flags, peek_json, peek_jsonl, pick_device, pick_dtype, read_jsonl,
                    sampled_config, start_run, sum_over_ranks, write_json, write_jsonl, write_page)

# -----------------------------------------------------------------------------
# configuration: the defaults reproduce the paper (its reference script's Trainer settings)
expert = ""  # π_E to tune; empty: the one sample_config.json names, else Qwen/Qwen2.5-Math-1.5B
samples = ""  # stage 1's kept positions (or an official file); empty: <out-dir>/samples.jsonl
out_dir = "out"
label = "contrast"  # target at a kept position: contrast = v_C (paper), expert = π_E, greedy
max_steps = 1000  # optimiser steps (reference: 1000)
batch_size = 8  # records (kept positions) per micro-batch (reference: 8)
grad_accum = 2  # micro-batches per step (reference: 2): 16 records a step, dealt to the processes
lr = 5e-5  # AdamW, linear decay to 0, no warmup, weight decay 0 (reference: 5e-5)
lora_r = 8  # LoRA rank (reference: 8)
lora_alpha = 16  # LoRA scaling α (reference: 16)
lora_dropout = 0.05  # dropout on the LoRA branch (reference: 0.05)
target_modules = "q_proj,v_proj"  # layers that get an adapter (reference: q_proj, v_proj)
save_every = 200  # checkpoint every N steps (reference: 200)
merge = False  # also write out_dir/merged: the expert with the adapter merged in
device = "auto"  # cuda if available, else cpu
dtype = "auto"  # bf16 autocast on cuda (as the reference), else float32; loss float32; no float16
seed = 1337  # LoRA init, record shuffling and dropout
force = False  # train even if --expert is not the model the samples were drawn with
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]

# TODO(common): move to common.py, shared with sample.py's default system_prompt
DEFAULT_SYSTEM_PROMPT = "Please reason step by step."  # the reference's, if no sample_config.json

# -----------------------------------------------------------------------------
# the method: the target at a kept position, packing, the loss, the stream of records

def target(v_C, p_expert, label):
    """The target at a kept position, over V: v_C (the paper), π_E renormalised (the amateur's
    contrast removed) or one-hot on argmax π_E (plain self-distillation at those positions)."""
    if label == "contrast":
        return v_C
    if label == "expert":
        return [x / sum(p_expert) for x in p_expert]
    best = max(range(len(p_expert)), key=p_expert.__getitem__)  # argmax π_E (the first on ties)
    return [float(a == best) for a in range(len(p_expert))]

def pack(inputs):
    """Packing: a question's kept positions lie on one rollout, so (causal attention) one pass over
    its longest input gives all their logits. -> rows, (row, column) of each record's last token."""
    rows, where = [], [None] * len(inputs)
    for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i])):
        x = inputs[i]
        r = next((r for r, row in enumerate(rows) if row[:len(x)] == x), len(rows))
        if r == len(rows):  # no row starts with this input yet
            rows.append(x)
        where[i] = (r, len(x) - 1)
    return rows, where

def packed_hidden(model, inputs, pad_id):
    """One pass over the packed inputs, right-padded -> the base model (its lm_head; LoRA layers
    stay in place), the last hidden states (R, L, H), where each record is read, the tokens run."""
    rows, where = pack(inputs)
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=model.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    return base, out.last_hidden_state, where, sum(map(len, rows))

def soft_label_kl(model, inputs, soft_labels, pad_id):
    """KL(v_C‖π_θ) of each record, (N,), and the tokens processed; soft_labels: (token_ids,
    weights) = v_C over the plausible set V. The lm_head runs at the N positions only, not (B, L, V)."""
    base, hidden, where, n_tokens = packed_hidden(model, inputs, pad_id)  # hidden: (R, L, H)
    dev = hidden.device
    row, col = torch.tensor(where, device=dev).T
    logits = base.get_output_embeddings()(hidden[row, col])  # (N, V_out), at each record's position
    log_pi = logits.float().log_softmax(-1)  # log π_θ over the full output layer, float32
    k = max(len(t) for t, _ in soft_labels)
    token_ids = torch.tensor([t + t[:1] * (k - len(t)) for t, _ in soft_labels], device=dev)
    v_C = torch.tensor([w + [0.0] * (k - len(w)) for _, w in soft_labels], device=dev)  # (N, K)
    # Σ_a v_C(a) (log v_C(a) − log π_θ(a)), with 0 log 0 = 0
    kl = (torch.xlogy(v_C, v_C) - v_C * log_pi.gather(-1, token_ids)).sum(-1)
    return kl, n_tokens

def answer_nll(model, inputs, starts, pad_id):
    """The SFT baseline's loss, −Σ_t log π_θ(x_t | x_<t) over each record's answer tokens (from
    starts[i] on), (N,), and the tokens processed; the lm_head runs at the answer positions only."""
    base, hidden, where, n_tokens = packed_hidden(model, inputs, pad_id)  # hidden: (R, L, H)
    dev = hidden.device
    reads = [(r, t - 1, x[t], i) for i, ((r, _), x, s) in enumerate(zip(where, inputs, starts))
             for t in range(s, len(x))]  # (row, column, target token, record) of each answer token
    row, col, target, owner = torch.tensor(reads, device=dev).T  # (T,) each
    logits = base.get_output_embeddings()(hidden[row, col]).float()  # (T, V_out)
    nll = F.cross_entropy(logits, target, reduction="none")
    return torch.zeros(len(inputs), device=dev).index_add(0, owner, nll), n_tokens

class PackedKL(torch.nn.Module):
    """The loss as a module, for DistributedDataParallel, which syncs what runs in its forward."""
    def __init__(self, model, loss=soft_label_kl):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, inputs, soft_labels, pad_id):
        return self.loss(self.model, inputs, soft_labels, pad_id)

@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """One epoch of the records, shuffled; epochs follow each other as long as the steps need."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()

def micro_batches(n, position, sizes=None):
    """This process's micro-batches {k: record indices} of the step from `position` on (k mod N),
    and the divisor making DDP's mean of N gradients the step's mean (SFT, `sizes`: per token)."""
    stream = [epoch_order(n, seed, p // n)[p % n] for p in range(position, position + grad_accum * batch_size)]
    batches = [stream[k * batch_size:(k + 1) * batch_size] for k in range(grad_accum)]
    mine = range(RANK, grad_accum, WORLD_SIZE)
    per = batch_size * len(mine) if sizes is None else sum(sizes[i] for i in stream) / WORLD_SIZE
    return {k: batches[k] for k in mine}, per


# -----------------------------------------------------------------------------
# run plumbing: the samples, the out dir and its checkpoints, the model

def read_samples(path, label="contrast"):
    """The records of a samples file, checked line by line -> (records, official): stage 1's (exact
    `prefix_ids`), official ones (text `prefix`, question `prompt_id`), or SFT's whole answers."""
    if not os.path.exists(path):
        die(f"samples file {path} does not exist; run sample.py first or pass --samples")
    rows = read_jsonl(path, "samples file", with_lines=True)
    if not rows:
        die(f"samples file {path} holds no records; run sample.py (a lower --beta keeps more)")
    first = rows[0][1]
    sft = "completion_ids" in first and "prefix_ids" not in first  # sample.py --select sft
    official = not sft and "prefix_ids" not in first and "prompt_id" in first
    if (sft or official) and label != "contrast":  # neither has the π_E that the ablations need
        what = ("holds whole answers (sample.py --select sft), tuned to all their tokens" if sft
                else "is an official LightReasoner sample file, without \"p_expert\" (π_E over V)")
        die(f"{path} {what}: --label {label} does not apply; use --label contrast (the default)")
    fields = (("question", "completion_ids") if sft else ("prompt_id", "prefix") if official
              else ("question", "prefix_ids"))
    records = []
    for n, row in rows:
        question, prefix, where = row.get(fields[0]), row.get(fields[1]), f"{path}:{n}:"
        ids, w, p = row.get("token_ids"), row.get("weights"), row.get("p_expert")
        if not isinstance(question, str) or not (isinstance(prefix, str) if official
                                                 else is_ids(prefix) and (prefix or not sft)):
            die(f"{where} needs \"{fields[0]}\" and \"{fields[1]}\" like the lines before; fix or remove it")
        if sft:  # a whole answer: its tokens are the input and each a target
            records.append(dict(line=n, question=question, prefix=None, prefix_ids=prefix,
                                token_ids=prefix, answer=True))
            continue
        if not is_ids(ids) or not ids or not isinstance(w, list) or len(w) != len(ids):
            die(f"{where} \"token_ids\" must be a non-empty list of ints ≥ 0, \"weights\" a list as long")
        if not is_probs(w, len(ids)) or len(set(ids)) < len(ids):  # a repeated id counts twice
            die(f"{where} weights must be finite, ≥ 0 and ≤ 1, on distinct token ids (v_C is a distribution)")
        if abs(sum(w) - 1) > 1e-3:
            die(f"{where} weights sum to {sum(w):.6f}, not 1 (within 1e-3); v_C is a distribution")
        if label != "contrast" and not (is_probs(p, len(ids)) and sum(p) > 0):  # π_E(a), a in V
            die(f"{where} --label {label} needs \"p_expert\": a probability ≥ 0 (not all 0) for "
                "each of \"token_ids\" (sample.py writes it); or use --label contrast")
        w = [float(x) for x in w]
        records.append(dict(line=n, question=question, prefix=prefix if official else None,
                            prefix_ids=None if official else prefix, token_ids=ids, weights=w,
                            target=target(w, p, label)))
    return records, official

def is_probs(x, n):
    return isinstance(x, list) and len(x) == n and all(  # ≤ 1 with rounding; no nan, inf, 10**400
        isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 + 1e-3 for a in x)

def is_ids(x):
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                       for i in x)

def input_ids(tok, record, system_prompt, official):
    """The chat prompt of sampling, then the prefix: its exact tokens, or (official files, only
    text) the prompt text and the prefix text tokenized together, as the reference does."""
    if not official:
        return prompt_ids(tok, record["question"], system_prompt) + record["prefix_ids"]
    text = chat_prompt_text(tok, record["question"], system_prompt) + record["prefix"]
    return tok(text, add_special_tokens=False)["input_ids"]

prompt_ids = functools.lru_cache(maxsize=None)(chat_prompt_ids)  # one chat template per question

def write_dir(path, *savers):
    """`path` written by each saver(dir) beside it, synced and swapped in whole (a kill: a .tmp)."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    for save in savers:
        save(path + ".tmp")
    for f in os.listdir(path + ".tmp"):
        with open(os.path.join(path + ".tmp", f), "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(path, ignore_errors=True)  # a step redone after a resume from an older checkpoint
    os.replace(path + ".tmp", path)

def save_checkpoint(step, model, optimizer, scheduler, position, elapsed):
    """The checkpoint (write_dir), then latest.json naming it: a kill leaves the old one current."""
    name = f"step-{step:06d}"
    state = dict(step=step, position=position, elapsed_s=elapsed, optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict())
    write_dir(os.path.join(ckpt_dir, name), model.save_pretrained,
              lambda d: torch.save(state, os.path.join(d, "state.pt")))
    write_json(os.path.join(ckpt_dir, "latest.json"), dict(step=step, dir=name))
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and "." not in d)
    for old in done[:-2]:  # keep two, as the reference's save_total_limit=2
        shutil.rmtree(os.path.join(ckpt_dir, old))

def load_checkpoint(ckpt_dir):
    """(name, adapter weights, state) on the CPU of the checkpoint latest.json names, else (gone or
    damaged) of the one before, with a notice; None if there is none; a stop if none can be read."""
    newest = peek_json(os.path.join(ckpt_dir, "latest.json"))  # None: killed in the first save
    newest = str(newest["dir"]) if isinstance(newest, dict) and "dir" in newest else None
    names = sorted(os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [], reverse=True)
    names = [d for d in names if d.startswith("step-") and "." not in d  # step-N.tmp: a cut save
             and (newest is None or d <= newest)]
    problems = [f"{newest} (named by latest.json) is gone"] * bool(newest and newest not in names)
    for name in names:
        path = os.path.join(ckpt_dir, name)
        try:
            if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
                raise FileNotFoundError("no adapter_model.safetensors")
            weights = load_peft_weights(path, device="cpu")
            state = torch.load(os.path.join(path, "state.pt"), map_location="cpu")
        except Exception as e:  # noqa: BLE001 (truncated, corrupt, not ours: read the one before)
            problems.append(f"{name} cannot be read ({first_line(e)[:100]})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}: resuming from {name}, the checkpoint before",
                  file=sys.stderr)
        return name, weights, state
    if problems:
        die(f"no readable checkpoint in {ckpt_dir}: {'; '.join(problems)}; delete {ckpt_dir} to "
            "start again from step 0, or pass another --out-dir")
    return None

def lora_model(name, dev, torch_dtype, records, samples_path):
    """The expert with LoRA adapters on --target-modules (the only weights trained), once every id
    of the samples and every target layer is found in it."""
    model = load_model(name, dev, torch_dtype)
    n_in = model.get_input_embeddings().num_embeddings
    n_out = model.get_output_embeddings().out_features
    for r in records:  # prefix ids must be in its embedding, soft-label ids in its lm_head
        for ids, n, where in ((r["token_ids"], n_out, "output"), (r["prefix_ids"] or [], n_in, "input")):
            if (bad := next((i for i in ids if i >= n), None)) is not None:
                die(f"{samples_path}:{r['line']}: token id {bad} is outside the expert's {where} "
                    f"vocabulary (0..{n - 1}); were these samples drawn with another model?")
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    layers = {n.rsplit(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if (unknown := [m for m in targets if m not in layers]) or not targets:
        die(f"--target-modules {target_modules}: {', '.join(unknown) or 'none given'} not in "
            f"{name}; its linear layers are {', '.join(sorted(layers))}")
    torch.manual_seed(seed)  # the same initialisation in every process
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if master:
        print(f"LoRA r={lora_r} on {','.join(targets)}: {n_train:,} trainable parameters "
              f"({100 * n_train / sum(p.numel() for p in model.parameters()):.2f}%)"
              + (f"; {WORLD_SIZE} processes" if WORLD_SIZE > 1 else ""))
    return model.train()


# -----------------------------------------------------------------------------
# out/train.html: a view of train_log.jsonl and train_config.json, rebuilt at every checkpoint
# and at the end; read leniently (a page never stops training, whatever it finds)

def train_page(out_dir):
    log, damaged = peek_jsonl(os.path.join(out_dir, "train_log.jsonl"))
    run = peek_json(os.path.join(out_dir, "train_config.json")) or {}
    config, title = run.get("config") or {}, "LightReasoner stage 2: training"
    if not log:
        return page(title, "<p>no steps logged yet</p>")
    steps, loss = [r["step"] for r in log], [r["loss"] for r in log]
    k = max(5, len(loss) // 20)  # the smoothed line: mean of the last k steps
    smooth = [sum(loss[max(0, i + 1 - k):i + 1]) / min(k, i + 1) for i in range(len(loss))]
    totals = run.get("totals") or {"steps so far": steps[-1], "of": config.get("max_steps")}
    return page(title, f"<p>{len(log)} steps; last loss {loss[-1]:.4f}, mean of the last {k} steps "
                f"{smooth[-1]:.4f}{f'; {damaged} damaged lines left out' if damaged else ''}</p>"
                + chart(f"loss: mean KL(target‖π_θ) of each step's records (grey), mean of the "
                        f"last {k} steps (red)", steps,
                        [("loss", loss, "#aaa"), ("smooth", smooth, "#c22")])
                + chart("learning rate", steps, [("lr", [r["lr"] for r in log], "#36c")])
                + chart("records/s", steps, [("rate", [r["records_per_s"] for r in log], "#393")])
                + table("configuration", config) + table("totals", totals))

def chart(title, steps, lines, w=720, h=170):
    """An inline SVG chart, one polyline per (class, values, colour), its ranges at the axes."""
    lo, hi = min(min(v) for _, v, _ in lines), max(max(v) for _, v, _ in lines)
    x = lambda s: 70 + (w - 80) * (s - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
    y = lambda v: h - 20 - (h - 30) * (v - lo) / ((hi - lo) or 1)  # noqa: E731
    svg = "".join(f'<polyline class="{c}" fill="none" stroke="{colour}" stroke-width="1.5" points="'
                  + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values)) + '"/>'
                  for c, values, colour in lines)
    axes = (f'<text x="64" y="14" text-anchor="end">{hi:.4g}</text>'
            f'<text x="64" y="{h - 20}" text-anchor="end">{lo:.4g}</text>'
            f'<text x="70" y="{h - 4}">step {steps[0]}</text>'
            f'<text x="{w - 10}" y="{h - 4}" text-anchor="end">step {steps[-1]}</text>'
            f'<line x1="70" y1="10" x2="70" y2="{h - 20}" stroke="#ccc"/>')
    return f'<h2>{esc(title)}</h2>\n<svg width="{w}" height="{h}" font-size="11">{axes}{svg}</svg>\n'

def table(title, d):
    rows = "".join(f"<tr><th>{esc(k)}</th><td class=\"mono\">{esc(v)}</td></tr>" for k, v in d.items())
    return f"<h2>{esc(title)}</h2>\n<table>{rows}</table>\n"


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    if min(max_steps, batch_size, grad_accum, save_every, lora_r, lora_alpha) < 1:
        die("--max-steps, --batch-size, --grad-accum, --save-every, --lora-r and --lora-alpha must be ≥ 1")
    if not (0 <= lr <= 1 and 0 <= lora_dropout < 1 and label in ("contrast", "expert", "greedy")):
        die(f"--lr {lr} must be in [0, 1], --lora-dropout {lora_dropout} in [0, 1) and --label "
            f"{label} one of contrast, expert, greedy")
    if grad_accum % WORLD_SIZE:  # each process takes an equal share of a step's micro-batches
        die(f"--grad-accum {grad_accum} does not divide among {WORLD_SIZE} processes; pass a "
            f"multiple of {WORLD_SIZE} (and a smaller --batch-size to keep the step)")
    samples = samples or os.path.join(out_dir, "samples.jsonl")
    records, official = read_samples(samples, label)
    sft = "answer" in records[0]  # whole answers: cross-entropy on every token of each
    # the expert the samples were drawn with (the one to tune) and its system prompt
    sampled = {} if official else sampled_config(os.path.dirname(samples), "restore it from stage 1")
    expert, drawn = expert or sampled.get("expert") or DEFAULT_EXPERT, sampled.get("expert")
    local = drawn and os.path.isdir(expert) and os.path.isdir(drawn)  # two paths to one model?
    if drawn and not force and not (os.path.samefile(expert, drawn) if local else expert == drawn):
        die(f"--expert {expert} is not {drawn}, the expert these samples were drawn with; "
            "LightReasoner tunes the very model whose moves were labelled (--force trains anyway)")
    system_prompt = sampled.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    torch_dtype = pick_dtype(dtype, pick_device(device))
    if torch_dtype == torch.float16:
        die("--dtype float16 is not supported for training (no loss scaling: small gradients "
            "underflow); use bfloat16, as the paper did, or float32")

    # ---- the run record (every setting that changes the adapter), and where to resume from
    log_path, ckpt_dir, lora_dir, merged_dir = (
        os.path.join(out_dir, f) for f in ("train_log.jsonl", "checkpoints", "lora", "merged"))
    run_config = {k: globals()[k] for k in ("expert samples label max_steps batch_size grad_accum lr "
                                            "lora_r lora_alpha lora_dropout target_modules seed").split()}
    run_config.update(label="sft" if sft else label, records=len(records),
                      system_prompt=system_prompt, dtype=dtype_name(torch_dtype),
                      inputs={samples: fingerprint(samples)})
    found, finished = None, False  # rank 0 alone reads the out dir, before the processes join: a
    if master:  # stop here ends the others quietly instead of in a broken collective
        record = start_run(out_dir, "train_config.json", run_config, [log_path, ckpt_dir, lora_dir], "train")
        finished = bool(record) and record.get("totals") is not None and os.path.isdir(lora_dir)
        found = load_checkpoint(ckpt_dir) if record and (merge or not finished) else None
        if record and not finished:
            step = found[2]["step"] if found else 0
            print(f"resuming {out_dir} from {found[0]} (step {step})" if found
                  else f"no checkpoint in {out_dir} yet: starting from step 0")
            if os.path.exists(log_path):  # back to the checkpoint: a kill undid the steps after it
                write_jsonl(log_path, [r for r in complete_lines(log_path) if r["step"] <= step])
    dev = init_distributed(device)  # under torchrun: join the process group, take GPU LOCAL_RANK
    plan = [(found, finished)]
    if WORLD_SIZE > 1:
        dist.broadcast_object_list(plan)  # rank 0's checkpoint, to every process
    found, finished = plan[0]
    if finished and (not merge or os.path.isdir(merged_dir)):
        if master:
            print(f"{out_dir} holds a finished run of {max_steps} steps: nothing to do")
        sys.exit(0)

    # ---- the expert with LoRA, and what it reads at each kept position and should match there
    tok = load_tokenizer(expert)
    model = lora_model(expert, dev, torch_dtype, records, samples)
    if master and official:
        print(f"{samples} is an official LightReasoner sample file (no prefix_ids): each input is "
              "the chat prompt + the prefix text, tokenized together as the reference does")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max_steps))
    autocast = torch.autocast(dev.split(":")[0], torch_dtype, enabled=torch_dtype != torch.float32)
    inputs = [input_ids(tok, r, system_prompt, official) for r in records]
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if long := next((r for r, x in zip(records, inputs) if len(x) > context), None):  # never learnt
        die(f"{samples}:{long['line']}: the prompt and prefix are longer than the expert's context "
            f"({context} tokens); remove that line, or sample with a shorter --max-new-tokens")
    sizes = [len(r["prefix_ids"]) for r in records] if sft else None  # SFT: its answer tokens
    # what each record is tuned to match: v_C (or the --label ablation) over V; SFT: its answer
    targets = [len(x) - s for x, s in zip(inputs, sizes)] if sft else [
        (r["token_ids"], r["target"]) for r in records]

    # ---- resume: the adapter, optimiser, schedule and the position in the record stream
    step, position, elapsed = 0, 0, 0.0
    if found:
        set_peft_model_state_dict(model, found[1])
        optimizer.load_state_dict(found[2]["optimizer"])
        scheduler.load_state_dict(found[2]["scheduler"])
        step, position, elapsed = found[2]["step"], found[2]["position"], found[2]["elapsed_s"]
    loss_fn = PackedKL(model, answer_nll if sft else soft_label_kl)
    loss_fn = loss_fn if WORLD_SIZE == 1 else DistributedDataParallel(loss_fn)

    # ---- train: each step averages KL(target‖π_θ) over batch_size × grad_accum records; its
    # micro-batches are dealt to the processes (all to the one, without torchrun)
    t_start, start_step, processed, n = time.time(), step, 0, batch_size * grad_accum
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not master)
    while step < max_steps:
        t_step, loss_sum, tokens = time.time(), 0.0, 0
        mine, per = micro_batches(len(inputs), position, sizes)
        try:
            for k, batch in mine.items():
                torch.manual_seed(seed + 1_000_003 * (step * grad_accum + k + 1))  # dropout masks
                sync = WORLD_SIZE == 1 or k == max(mine)  # DDP: all-reduce once, after the last
                with contextlib.nullcontext() if sync else loss_fn.no_sync():
                    with autocast:
                        kl, n_tokens = loss_fn([inputs[i] for i in batch],
                                               [targets[i] for i in batch], tok.pad_token_id)
                    (kl.sum() / per).backward()  # "batchmean" over the step's records (SFT: tokens)
                loss_sum, tokens = loss_sum + kl.sum().item(), tokens + n_tokens
        except torch.cuda.OutOfMemoryError:
            bar.close()
            die(f"out of GPU memory at step {step + 1} with --batch-size {batch_size}; lower --batch-size "
                f"and raise --grad-accum so that they still multiply to {n} records a step", every_rank=True)
        position += n
        loss_sum, tokens = sum_over_ranks([loss_sum, tokens], dev)  # the whole step's, everywhere
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # the reference's Trainer default
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            bar.close()
            die(f"step {step + 1}: the loss is {loss_sum / n}, the gradient norm {grad_norm:.4g}; "
                "stopped before the update, nothing of it saved; lower --lr in another --out-dir")
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, processed, now = step + 1, processed + int(tokens), time.time()
        if master:  # the step's line in the log; every save_every steps a checkpoint and the page
            row = dict(step=step, loss=loss_sum / (per * WORLD_SIZE), lr=lr_now, records=n,
                       tokens=int(tokens), records_per_s=n / (now - t_step),
                       elapsed_s=elapsed + now - t_start)
            append_jsonl(log_path, [row])
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", rec_s=f"{row['records_per_s']:.1f}")
            if step % save_every == 0 or step == max_steps:
                save_checkpoint(step, model, optimizer, scheduler, position, row["elapsed_s"])
                write_page(os.path.join(out_dir, "train.html"), lambda: train_page(out_dir))
    bar.close()

    # ---- rank 0: the adapter, the totals (with the costs the efficiency table reads; tuned
    # tokens: one position per record, for SFT all answer tokens), the page; then --merge (a kill
    # in there leaves a finished run, whose rerun merges)
    if master and not finished:
        wall, seen = time.time() - t_start, max_steps * n
        tuned = sizes and sum(sizes[epoch_order(len(sizes), seed, p // len(sizes))[p % len(sizes)]]
                              for p in range(seen))  # SFT: the answer tokens of every record seen
        write_dir(lora_dir, model.save_pretrained, tok.save_pretrained)
        log = complete_lines(log_path)
        finish_run(out_dir, "train_config.json", dict(
            steps=max_steps, records_seen=seen, tuned_tokens=seen if tuned is None else tuned,
            records=len(records), final_loss=log[-1]["loss"] if log else None,
            wall_time_s=elapsed + wall, device=device_name(str(dev)), processes=WORLD_SIZE))
        write_page(os.path.join(out_dir, "train.html"), lambda: train_page(out_dir))
        seen_text = (f"{seen} records seen = {seen} tuned tokens (one position each)" if tuned is None
                     else f"{seen} answers seen, {tuned} tuned tokens (all of theirs)")
        print(f"trained {max_steps} steps ({max_steps - start_step} this run): {seen_text}, "
              f"{processed} tokens processed this run; {wall:.0f}s this run -> {lora_dir}")
    if master and merge:
        write_dir(merged_dir, model.merge_and_unload().save_pretrained, tok.save_pretrained)
        print(f"merged the adapter into the expert -> {merged_dir}")
    barrier()  # the other processes wait for rank 0's files
