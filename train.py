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
    python train.py --label expert --out-dir out/expert   # ablation: train towards π_E instead of v_C
    python train.py --out-dir out_sft --max-steps 250     # the SFT baseline (sample.py --select sft):
                                                      # cross-entropy on every token of its right answers
    torchrun --standalone --nproc_per_node 4 train.py # 4 GPUs share each step's 16 records (DDP)

Writes out/lora (the adapter, loadable with PeftModel.from_pretrained), out/train_log.jsonl (one line
per optimiser step), out/checkpoints/, out/train_config.json and out/train.html (the curves). All
kept positions of one question lie on the same expert rollout, so one forward pass serves all of
them ("packing").
"""
import contextlib
import functools
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (RANK, WORLD_SIZE, append_jsonl, barrier, chat_prompt_ids, chat_prompt_text, complete_lines,
                    device_name, die, differing, esc, init_distributed, load_model, load_tokenizer, lock_dir, make_dir,
                    master, page, parse_flags, pick_device, pick_dtype, read_config, read_jsonl,
                    sum_over_ranks, write_json, write_jsonl, write_page)

# -----------------------------------------------------------------------------
# configuration: the defaults reproduce the paper (its reference script's Trainer settings)
expert = ""  # π_E to tune; empty: the expert recorded in sample_config.json, else Qwen/Qwen2.5-Math-1.5B
samples = ""  # kept positions from stage 1 (or an official LightReasoner file); empty: <out-dir>/samples.jsonl
out_dir = "out"
label = "contrast"  # target at a kept position: contrast = v_C (paper), expert = π_E over V, greedy = argmax π_E
max_steps = 1000  # optimiser steps (reference: 1000)
batch_size = 8  # records (kept positions) per micro-batch (reference: 8)
grad_accum = 2  # micro-batches per optimiser step (reference: 2), so 16 records a step, dealt to the processes
lr = 5e-5  # AdamW learning rate, linear decay to 0, no warmup, weight decay 0 (reference: 5e-5)
lora_r = 8  # LoRA rank (reference: 8)
lora_alpha = 16  # LoRA scaling α (reference: 16)
lora_dropout = 0.05  # dropout on the LoRA branch (reference: 0.05)
target_modules = "q_proj,v_proj"  # comma-separated layers that get an adapter (reference: q_proj, v_proj)
save_every = 200  # checkpoint every N steps (reference: 200)
resume = False  # continue the run in out_dir from its latest checkpoint
merge = False  # also write out_dir/merged: the expert with the adapter merged in
device = "auto"  # cuda if available, else cpu
dtype = "auto"  # bfloat16 autocast on cuda (as the reference), float32 on cpu; the loss is always float32; no float16
seed = 1337  # LoRA init, record shuffling and dropout
force = False  # train even if --expert is not the model the samples were drawn with
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5: noise
DEFAULT_SYSTEM_PROMPT = "Please reason step by step."  # the reference's, for files without a sample_config.json

# -----------------------------------------------------------------------------
# the method


def read_samples(path, label="contrast"):
    """The records of a samples file, checked line by line. Stage 1's records carry the expert's
    exact tokens (`prefix_ids`); the official LightReasoner files carry only the text (`prefix`) and
    the question in `prompt_id`. Each record gets its `target` for --label. Returns (records, official)."""
    if not os.path.exists(path):
        die(f"samples file {path} does not exist; run sample.py first or pass --samples")
    rows = read_jsonl(path, "samples file", with_lines=True)
    if not rows:
        die(f"samples file {path} holds no records; run sample.py (a lower --beta keeps more positions)")
    official = "prefix_ids" not in rows[0][1] and "prompt_id" in rows[0][1]
    if official and label != "contrast":
        die(f"{path} is an official LightReasoner sample file: it has no \"p_expert\" (π_E over V), which --label "
            f"{label} trains towards; use --label contrast, or samples from sample.py")
    fields = ("prompt_id", "prefix") if official else ("question", "prefix_ids")
    records = []
    for n, row in rows:
        question, prefix = row.get(fields[0]), row.get(fields[1])
        ids, w, p = row.get("token_ids"), row.get("weights"), row.get("p_expert")
        if not isinstance(question, str) or not (isinstance(prefix, str) if official else is_ids(prefix)):
            die(f"{path}:{n}: needs \"{fields[0]}\" and \"{fields[1]}\" like the lines before it; fix or remove that line")
        if not is_ids(ids) or not ids or not isinstance(w, list) or len(w) != len(ids):
            die(f"{path}:{n}: \"token_ids\" must be a non-empty list of token ids (ints ≥ 0) and \"weights\" a list as long")
        if not is_probs(w, len(ids)) or len(set(ids)) < len(ids):  # a repeated id would count its weight twice
            die(f"{path}:{n}: weights must be finite, ≥ 0 and ≤ 1, over distinct token ids (a soft label v_C is a "
                "distribution)")
        if abs(sum(w) - 1) > 1e-3:
            die(f"{path}:{n}: weights sum to {sum(w):.6f}, not 1 (within 1e-3); v_C must be a distribution")
        if label != "contrast" and not (is_probs(p, len(ids)) and sum(p) > 0):  # π_E(a) for a in V, from sample.py
            die(f"{path}:{n}: --label {label} trains towards π_E: \"p_expert\" must list a probability ≥ 0 (not all 0) "
                "for each of \"token_ids\" (sample.py writes it); or use --label contrast")
        records.append(dict(line=n, question=question, prefix=prefix if official else None, token_ids=ids,
                            prefix_ids=None if official else prefix, weights=[float(x) for x in w],
                            target=target([float(x) for x in w], p, label)))
    return records, official


def target(v_C, p_expert, label):
    """What the expert is tuned towards at a kept position, over the same V. contrast: v_C (the paper);
    expert: π_E renormalised over V (the amateur's contrast removed); greedy: one-hot on the expert's
    own most likely token (plain self-distillation at the selected positions)."""
    if label == "contrast":
        return v_C
    if label == "expert":
        return [x / sum(p_expert) for x in p_expert]
    best = max(range(len(p_expert)), key=p_expert.__getitem__)  # argmax π_E (the first on ties)
    return [float(a == best) for a in range(len(p_expert))]


def is_probs(x, n):
    return isinstance(x, list) and len(x) == n and all(  # ≤ 1 with float rounding; also no nan, inf, 10**400
        isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 + 1e-3 for a in x)


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


def packed_hidden(model, rows, pad_id):
    """One forward pass over the packed rows, right-padded: the model whose lm_head reads the states
    (its base model: LoRA layers stay in place), and the decoder's last hidden states, (R, L, H)."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=model.device)  # (R, L)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def soft_label_kl(model, inputs, soft_labels, pad_id):
    """KL(v_C‖π_θ) of each record, (N,), from packed forward passes; and the tokens processed.
    inputs: token-id lists (prompt + prefix); soft_labels: (token_ids, weights) = v_C over the
    plausible set V. The lm_head runs only at the N positions read, never over (B, L, V)."""
    rows, where = pack(inputs)
    dev = model.device
    base, hidden = packed_hidden(model, rows, pad_id)  # (R, L, H)
    row, col = torch.tensor(where, device=dev).T
    logits = base.get_output_embeddings()(hidden[row, col])  # (N, V_out), at each record's own position
    log_pi = logits.float().log_softmax(-1)  # log π_θ over the full output layer, float32
    k = max(len(t) for t, _ in soft_labels)
    token_ids = torch.tensor([t + t[:1] * (k - len(t)) for t, _ in soft_labels], device=dev)  # (N, K)
    v_C = torch.tensor([w + [0.0] * (k - len(w)) for _, w in soft_labels], device=dev)  # (N, K), 0 off V
    kl = (torch.xlogy(v_C, v_C) - v_C * log_pi.gather(-1, token_ids)).sum(-1)  # Σ_a v_C(a)(log v_C(a) − log π_θ(a))
    return kl, sum(map(len, rows))


def answer_nll(model, inputs, starts, pad_id):
    """The SFT baseline's loss: each record's cross-entropy to its own answer, −Σ_t log π_θ(x_t | x_<t)
    summed over the answer tokens x_t (those from starts[i] on), (N,); and the tokens processed. Packed
    as soft_label_kl is; the lm_head runs only at the answer's positions (column t − 1 predicts token t)."""
    rows, where = pack(inputs)
    dev = model.device
    base, hidden = packed_hidden(model, rows, pad_id)  # (R, L, H)
    reads = [(r, t - 1, x[t], i)  # (row, column, target token, record) of every answer token
             for i, ((r, _), x, s) in enumerate(zip(where, inputs, starts)) for t in range(s, len(x))]
    row, col, target, owner = torch.tensor(reads, device=dev).T  # (T,) each
    nll = F.cross_entropy(base.get_output_embeddings()(hidden[row, col]).float(), target, reduction="none")
    return torch.zeros(len(inputs), device=dev).index_add(0, owner, nll), sum(map(len, rows))


class PackedKL(torch.nn.Module):
    """soft_label_kl (or answer_nll, for SFT) as a module. DistributedDataParallel syncs the gradients of
    what runs inside its wrapped module's forward, and soft_label_kl calls the decoder and lm_head directly."""
    def __init__(self, model, loss=soft_label_kl):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, inputs, soft_labels, pad_id):
        return self.loss(self.model, inputs, soft_labels, pad_id)


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
                    scheduler=scheduler.state_dict()), os.path.join(tmp, "state.pt"))
    for f in os.listdir(tmp):
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a step redone after a resume from an older checkpoint
    os.replace(tmp, final)
    write_json(os.path.join(ckpt_dir, "latest.json"), dict(step=step, dir=name))
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp"))
    for old in done[:-2]:  # keep two, as the reference's save_total_limit=2
        shutil.rmtree(os.path.join(ckpt_dir, old))


def load_checkpoint(ckpt_dir):
    """(name, adapter weights, state) of the newest readable checkpoint, on the CPU: the one
    latest.json names, else (gone or damaged) the one before it, with a one-line notice. None when
    there is no checkpoint yet; a one-line stop when there are some but none can be read."""
    if not os.path.isdir(ckpt_dir):
        return None
    for f in os.listdir(ckpt_dir):
        if f.endswith(".tmp"):  # a save, or a latest.json, that a kill cut short
            path = os.path.join(ckpt_dir, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    try:
        with open(os.path.join(ckpt_dir, "latest.json"), encoding="utf-8") as f:
            newest = str(json.load(f)["dir"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet (killed during the first save), or damaged
        newest = None
    names = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("step-") and (newest is None or d <= newest)),
                   reverse=True)
    problems = [f"{newest} (named by latest.json) is gone"] if newest and newest not in names else []
    for name in names:
        path = os.path.join(ckpt_dir, name)
        try:
            if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
                raise FileNotFoundError("no adapter_model.safetensors")
            weights = load_peft_weights(path, device="cpu")
            state = torch.load(os.path.join(path, "state.pt"), map_location="cpu")
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
            problems.append(f"{name} cannot be read ({(str(e).strip().splitlines() or [type(e).__name__])[0][:100]})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}: resuming from {name}, the checkpoint before", file=sys.stderr)
        return name, weights, state
    if problems:
        die(f"no readable checkpoint in {ckpt_dir}: {'; '.join(problems)}; delete {ckpt_dir} to --resume from "
            "step 0, or pass a fresh --out-dir")
    return None


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
# the run, step by step, as __main__ at the end calls them; the training loop itself is written out there


def check_flags():
    if min(max_steps, batch_size, grad_accum, save_every, lora_r, lora_alpha) < 1:
        die("--max-steps, --batch-size, --grad-accum, --save-every, --lora-r and --lora-alpha must be ≥ 1")
    if not 0 <= lr <= 1 or not 0 <= lora_dropout < 1 or label not in ("contrast", "expert", "greedy"):
        die(f"--lr {lr} must be in [0, 1] (AdamW moves each weight by about lr a step), --lora-dropout "
            f"{lora_dropout} in [0, 1) and --label {label} one of contrast, expert, greedy")
    if grad_accum % WORLD_SIZE:
        die(f"--grad-accum {grad_accum} does not divide among {WORLD_SIZE} processes: each takes an equal share of "
            f"a step's micro-batches; pass a multiple of {WORLD_SIZE} (and a smaller --batch-size to keep the step)")


def read_answers(path):
    """The SFT baseline's records (sample.py --select sft), checked line by line: a question and the
    expert's whole right answer, `completion_ids`, each of whose tokens is a target (as input and output
    ids: check_vocab checks both). None when the file holds other records (its first line tells)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, RecursionError):  # missing, binary, malformed: read_samples says which
        return None
    if not (isinstance(first, dict) and "completion_ids" in first and "prefix_ids" not in first):
        return None
    if label != "contrast":
        die(f"{path} holds whole answers (sample.py --select sft): they are tuned by cross-entropy to their own "
            f"tokens, so --label {label} does not apply; leave it out")
    records = []
    for n, row in read_jsonl(path, "samples file", with_lines=True):
        ids = row.get("completion_ids")
        if not isinstance(row.get("question"), str) or not is_ids(ids) or not ids:
            die(f"{path}:{n}: an SFT record needs \"question\" and a non-empty \"completion_ids\" (token ids ≥ 0), "
                "like the lines before it; fix or remove that line")
        records.append(dict(line=n, question=row["question"], prefix=None, prefix_ids=ids, token_ids=ids,
                            target=None))
    return records


def read_run_samples():
    """The samples, and the expert they were drawn with (the one we must tune) and its system prompt."""
    path = samples or os.path.join(out_dir, "samples.jsonl")
    answers = read_answers(path)  # the SFT baseline's whole answers, or None
    records, official = (answers, False) if answers is not None else read_samples(path, label)
    config = os.path.join(os.path.dirname(path), "sample_config.json")
    sampled = {} if official or not os.path.exists(config) else read_config(
        config, fix="it is stage 1's record of the expert and system prompt; restore it from that run",
        strings=("expert", "system_prompt"))
    name = expert or sampled.get("expert") or "Qwen/Qwen2.5-Math-1.5B"
    if sampled.get("expert") and not same_model(name, sampled["expert"]) and not force:
        die(f"--expert {name} is not {sampled['expert']}, the expert these samples were drawn with; LightReasoner "
            "tunes the very model whose moves were labelled (pass --force to train anyway)")
    return path, records, official, sampled.get("system_prompt", DEFAULT_SYSTEM_PROMPT), name, answers is not None


def prepare_out_dir(run_config):
    """One run at a time in out_dir; continue a run with its own flags, never overwrite another. Rank 0
    alone reads the checkpoint to resume from (and trims the log to it) before the processes join: a
    stop here, like one on the lock, ends the others quietly instead of in a broken collective."""
    config_path, log_path = os.path.join(out_dir, "train_config.json"), os.path.join(out_dir, "train_log.jsonl")
    if master:
        make_dir(out_dir)
        lock_dir(out_dir, "train")
    if not resume and any(os.path.exists(p) for p in (config_path, log_path, os.path.join(out_dir, "checkpoints"),
                                                      os.path.join(out_dir, "lora"))):
        die(f"{out_dir} already holds a training run (train_config.json, lora/ or checkpoints/); "
            "pass --resume to continue it, or a fresh --out-dir")
    if resume and os.path.exists(config_path):
        old = read_config(config_path, fix="delete it to resume with the flags of this command (they must be the "
                                           "run's own), or pass a fresh --out-dir")
        if diff := differing(old, run_config):
            die(f"{out_dir} holds a training run with another configuration ({', '.join(diff)} differ); "
                "run with the same flags to resume, or pass a fresh --out-dir")
    found = load_checkpoint(os.path.join(out_dir, "checkpoints")) if resume and master else None
    if master and os.path.exists(log_path):
        step = found[2]["step"] if found else 0
        write_jsonl(log_path, [row for row in complete_lines(log_path) if row["step"] <= step])  # steps a kill undid
    return found


def lora_model(name, dev, torch_dtype, records, samples_path):
    """The expert with LoRA adapters on --target-modules, the only weights trained; first the checks
    that every id of the samples and every target layer exists in it."""
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    model = load_model(name, dev, torch_dtype)
    check_vocab(records, samples_path, model.get_input_embeddings().num_embeddings,
                model.get_output_embeddings().out_features)
    layers = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [m for m in targets if m not in layers]
    if unknown or not targets:
        die(f"--target-modules {target_modules}: {', '.join(unknown) or 'none given'} not in {name}; "
            f"its linear layers are {', '.join(sorted(layers))}")
    torch.manual_seed(seed)  # the same initialisation in every process
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if master:
        print(f"LoRA r={lora_r} on {','.join(targets)}: {n_train:,} trainable parameters "
              f"({100 * n_train / sum(p.numel() for p in model.parameters()):.2f}%)"
              + (f"; {WORLD_SIZE} processes" if WORLD_SIZE > 1 else ""))
    return model.train()


def resume_from(found, model, optimizer, scheduler):
    """Load the checkpoint rank 0 found (load_checkpoint) into the model, optimiser and schedule of
    every process. Returns (step, position in the record stream, elapsed seconds)."""
    found = [found]
    if WORLD_SIZE > 1:
        dist.broadcast_object_list(found)  # from rank 0 to all
    if not found[0]:
        if master:
            print(f"no checkpoint in {out_dir}: starting from step 0")
        return 0, 0, 0.0
    name, weights, state = found[0]
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if master:
        print(f"resuming {out_dir} from {name} (step {state['step']})")
    return state["step"], state["position"], state["elapsed_s"]


def forward_backward(loss_fn, inputs, targets_V, step, position, autocast, pad_id, sizes=None):
    """This process's micro-batches of one step, from `position` in the stream of shuffled records:
    their KL(target‖π_θ), backpropagated. With `sizes` (SFT: the answer tokens of each record) the step's
    loss is the mean cross-entropy over all its answer tokens instead. Returns (the sum of the KL,
    tokens processed, what the step's sum is divided by)."""
    loss_sum, tokens = 0.0, 0
    mine = range(RANK, grad_accum, WORLD_SIZE)  # this process's micro-batches of the step
    batches = [[epoch_order(len(inputs), seed, p // len(inputs))[p % len(inputs)]
                for p in range(position + k * batch_size, position + (k + 1) * batch_size)]
               for k in range(grad_accum)]  # every micro-batch of the step (SFT divides by all their tokens)
    per = batch_size * len(mine) if sizes is None else sum(sizes[i] for b in batches for i in b) / WORLD_SIZE
    for k in mine:
        batch = batches[k]
        torch.manual_seed(seed + 1_000_003 * (step * grad_accum + k + 1))  # dropout masks: fixed per micro-batch
        with loss_fn.no_sync() if WORLD_SIZE > 1 and k != mine[-1] else contextlib.nullcontext():  # sync once
            with autocast:
                kl, n_tokens = loss_fn([inputs[i] for i in batch], [targets_V[i] for i in batch], pad_id)
            # "batchmean" over the step's records (SFT: its tokens); DDP averages the gradients over the processes
            (kl.sum() / per).backward()
        loss_sum, tokens = loss_sum + kl.sum().item(), tokens + n_tokens
    return loss_sum, tokens, per * WORLD_SIZE


def log_step(row, bar, run_config, model, optimizer, scheduler, position):
    """Rank 0, after each step: its line in the log, and every save_every steps a checkpoint and the page."""
    config_path = os.path.join(out_dir, "train_config.json")
    if not os.path.exists(config_path):  # the first step worked: from here on out_dir holds this run
        write_json(config_path, {"config": run_config, "totals": None})
    append_jsonl(os.path.join(out_dir, "train_log.jsonl"), [row])
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", rec_s=f"{row['records_per_s']:.1f}")
    if row["step"] % save_every == 0 or row["step"] == max_steps:
        save_checkpoint(os.path.join(out_dir, "checkpoints"), row["step"], model, optimizer, scheduler, position,
                        row["elapsed_s"])
        write_page(os.path.join(out_dir, "train.html"), lambda: train_page(out_dir))


def finish(model, tok, run_config, n_records, start_step, processed, t_start, elapsed, tuned=None):
    """Rank 0, at the end: the adapter (and the merged model), the totals, the page, a summary line.
    The totals hold the costs the efficiency table reads: tuned tokens (`tuned`, the answer tokens of
    the SFT baseline's steps; else one position per record), training time over all runs, device."""
    lora_dir, merged_dir = os.path.join(out_dir, "lora"), os.path.join(out_dir, "merged")
    device = device_name(str(model.device))
    save_model(lora_dir, model, tok)
    if merge:
        save_model(merged_dir, model.merge_and_unload(), tok)
    wall, seen = time.time() - t_start, max_steps * batch_size * grad_accum
    log = complete_lines(os.path.join(out_dir, "train_log.jsonl"))
    totals = dict(steps=max_steps, records_seen=seen, tuned_tokens=seen if tuned is None else tuned,
                  records=n_records, final_loss=log[-1]["loss"] if log else None, wall_time_s=elapsed + wall,
                  device=device, processes=WORLD_SIZE)
    write_json(os.path.join(out_dir, "train_config.json"), {"config": run_config, "totals": totals})
    write_page(os.path.join(out_dir, "train.html"), lambda: train_page(out_dir))
    seen_text = f"{seen} records seen = {seen} tuned tokens (one position each)" if tuned is None else (
        f"{seen} answers seen, {tuned} tuned tokens (all of theirs)")
    print(f"trained {max_steps} steps ({max_steps - start_step} this run): {seen_text}, "
          f"{processed} tokens processed this run; {wall:.0f}s this run -> {lora_dir}"
          + (f", {merged_dir}" if merge else ""))


# -----------------------------------------------------------------------------
# out/train.html: a view of train_log.jsonl and train_config.json, rebuilt at every checkpoint and at
# the end (common.write_page: a failure here prints one warning and never stops training)


def train_page(out_dir):
    with open(os.path.join(out_dir, "train_log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out_dir, "train_config.json"), encoding="utf-8") as f:
        run = json.load(f)
    steps, loss = [r["step"] for r in log], [r["loss"] for r in log]
    k = max(5, len(loss) // 20)  # the smoothed line: mean of the last k steps
    smooth = [sum(loss[max(0, i + 1 - k):i + 1]) / min(k, i + 1) for i in range(len(loss))]
    totals = run.get("totals") or {"steps so far": steps[-1], "of": run["config"]["max_steps"]}
    body = (f"<p>{len(log)} steps; last loss {loss[-1]:.4f}, mean of the last {k} steps {smooth[-1]:.4f}</p>"
            + chart(f"loss: mean KL(target‖π_θ) of each step's records (grey), mean of the last {k} steps (red)", steps,
                    [("loss", loss, "#aaa"), ("smooth", smooth, "#c22")])
            + chart("learning rate", steps, [("lr", [r["lr"] for r in log], "#36c")])
            + chart("records/s", steps, [("rate", [r["records_per_s"] for r in log], "#393")])
            + table("configuration", run["config"]) + table("totals", totals))
    return page("LightReasoner stage 2: training", body)


def chart(title, steps, lines, w=720, h=170):
    """An inline SVG line chart over the steps: one polyline per (class, values, colour); the value
    range and the step range are written at the axes."""
    lo, hi = min(min(v) for _, v, _ in lines), max(max(v) for _, v, _ in lines)
    x = lambda s: 70 + (w - 80) * (s - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
    y = lambda v: h - 20 - (h - 30) * (v - lo) / ((hi - lo) or 1)  # noqa: E731
    svg = "".join(f'<polyline class="{c}" fill="none" stroke="{colour}" stroke-width="1.5" points="'
                  + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values)) + '"/>' for c, values, colour in lines)
    axes = (f'<text x="64" y="14" text-anchor="end">{hi:.4g}</text><text x="64" y="{h - 20}" text-anchor="end">{lo:.4g}'
            f'</text><text x="70" y="{h - 4}">step {steps[0]}</text><text x="{w - 10}" y="{h - 4}" text-anchor="end">'
            f'step {steps[-1]}</text><line x1="70" y1="10" x2="70" y2="{h - 20}" stroke="#ccc"/>')
    return f'<h2>{esc(title)}</h2>\n<svg width="{w}" height="{h}" font-size="11">{axes}{svg}</svg>\n'


def table(title, d):
    rows = "".join(f"<tr><th>{esc(k)}</th><td class=\"mono\">{esc(v)}</td></tr>" for k, v in d.items())
    return f"<h2>{esc(title)}</h2>\n<table>{rows}</table>\n"


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    check_flags()
    samples, records, official, system_prompt, expert, sft = read_run_samples()
    torch_dtype = pick_dtype(dtype, pick_device(device))
    if torch_dtype == torch.float16:
        die("--dtype float16 is not supported for training (no loss scaling: small gradients underflow); "
            "use bfloat16, as the paper did, or float32")

    # ---- the output directory, and the checkpoint to resume from
    run_config = {k: globals()[k] for k in ["expert", "samples", "label", "max_steps", "batch_size", "grad_accum",
                                            "lr", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "seed"]}
    run_config.update(records=len(records), system_prompt=system_prompt, dtype=str(torch_dtype).removeprefix("torch."))
    run_config["label"] = "sft" if sft else label  # whole answers: cross-entropy to their own tokens
    found = prepare_out_dir(run_config)
    dev = init_distributed(device)  # under torchrun: join the process group, take GPU LOCAL_RANK

    # ---- the expert with LoRA, and what it reads at each kept position and should match there
    tok = load_tokenizer(expert)
    model = lora_model(expert, dev, torch_dtype, records, samples)
    if master and official:
        print(f"{samples} is an official LightReasoner sample file (no prefix_ids): each input is the chat "
              "prompt + the prefix text, tokenized together as the reference does")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max_steps))  # linear to 0
    autocast = torch.autocast(dev.split(":")[0], dtype=torch_dtype, enabled=torch_dtype != torch.float32)
    inputs = [input_ids(tok, r, system_prompt, official) for r in records]
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if long := next((r for r, x in zip(records, inputs) if len(x) > context), None):  # positions it never learnt
        die(f"{samples}:{long['line']}: the prompt and prefix are longer than the expert's context ({context} tokens); "
            "remove that line, or sample with a shorter --max-new-tokens")
    targets_V = [(r["token_ids"], r["target"]) for r in records]  # v_C (or the --label ablation) over V
    sizes = [len(r["prefix_ids"]) for r in records] if sft else None  # SFT: every answer token is a target
    if sft:  # its targets: where each answer starts, after the prompt; its loss: cross-entropy (answer_nll)
        targets_V = [len(x) - len(r["prefix_ids"]) for x, r in zip(inputs, records)]

    # ---- resume: adapter, optimiser, schedule and the position in the record stream
    step, position, elapsed = resume_from(found, model, optimizer, scheduler) if resume else (0, 0, 0.0)
    loss_fn = PackedKL(model, answer_nll if sft else soft_label_kl)
    loss_fn = loss_fn if WORLD_SIZE == 1 else DistributedDataParallel(loss_fn)

    # ---- train: each step averages KL(target‖π_θ) over batch_size × grad_accum records; its
    # micro-batches are dealt to the processes (all to the one, without torchrun)
    t_start, start_step, processed, n = time.time(), step, 0, batch_size * grad_accum
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True, disable=not master)
    while step < max_steps:
        t_step = time.time()
        try:
            loss_sum, tokens, divisor = forward_backward(loss_fn, inputs, targets_V, step, position, autocast,
                                                         tok.pad_token_id, sizes)
        except torch.cuda.OutOfMemoryError:
            bar.close()
            die(f"out of GPU memory at step {step + 1} with --batch-size {batch_size}; lower --batch-size and raise "
                f"--grad-accum so that they still multiply to {n} records a step", every_rank=True)
        position += n
        loss_sum, tokens = sum_over_ranks([loss_sum, tokens], dev)  # the whole step's, in every process
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # the Trainer default the reference runs with
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            bar.close()
            die(f"step {step + 1}: the loss is {loss_sum / n} and the gradient norm {grad_norm:.4g}; stopped before "
                "the update, nothing of this step saved; lower --lr, or --resume from the last checkpoint")
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, processed, now = step + 1, processed + int(tokens), time.time()
        row = dict(step=step, loss=loss_sum / divisor, lr=lr_now, records=n, tokens=int(tokens),
                   records_per_s=n / (now - t_step), elapsed_s=elapsed + now - t_start)
        if master:
            log_step(row, bar, run_config, model, optimizer, scheduler, position)
    bar.close()

    # ---- the adapter (and the merged model), the totals and the page: rank 0 writes them
    if master:
        tuned = sizes and sum(sizes[epoch_order(len(sizes), seed, p // len(sizes))[p % len(sizes)]]
                              for p in range(max_steps * n))  # the answer tokens of every step's records
        finish(model, tok, run_config, len(records), start_step, processed, t_start, elapsed, tuned)
    barrier()  # the other processes wait for rank 0's files
