"""
What the three LightReasoner stages share: flags, processes, models and greedy generation, files
that a kill never leaves half-written, the HTML pages, and the run directory (one record of what
made its results, one resume rule, one part-file scheme). Every mistake a user can make ends in
`die(...)`: one line on stderr naming the problem and the fix, exit code 2, no traceback.
"""
import argparse
import atexit
import hashlib
import html
import json
import math
import os
import re
import socket
import sys
import urllib.parse
import urllib.request
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

# peft on transformers 5 warns about a renamed transformers method whenever it wraps a model
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DEFAULT_EXPERT = "Qwen/Qwen2.5-Math-1.5B"  # π_E of the paper, when no sampling run names one
DEFAULT_SYSTEM_PROMPT = "Please reason step by step."  # the reference's system turn


# -----------------------------------------------------------------------------
# errors and the command line: one flag per configuration knob

def die(msg, every_rank=False):
    """One-line error for the user (file, what is wrong, the fix); exit code 2. Under torchrun only
    rank 0 says it, unless only this rank can see the problem (its own part file: every_rank)."""
    if every_rank and WORLD_SIZE > 1:
        msg = f"rank {RANK}: {msg}"
    if RANK == 0 or every_rank:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)

def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints its whole usage block; one line says enough
        die(f"{message} (see --help)")

def finite_float(text):
    """A float flag: nan and inf are numbers no setting here can use (a β of nan keeps nothing)."""
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(text)
    return x

finite_float.__name__ = "finite number"  # argparse names the type in its message

def parse_flags(defaults, doc):
    """Flags that mirror a script's configuration block one to one (`max_new_tokens` <->
    `--max-new-tokens`, same type and default) -> the configuration with the user's values in."""
    parser = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            kind = finite_float if isinstance(value, float) else type(value)
            parser.add_argument(flag, type=kind, default=value, help=f"default: {value}")
    config = vars(parser.parse_args())
    for name, value in config.items():  # a file name in another encoding cannot go into a record
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            die(f"--{name.replace('_', '-')} {value.encode('utf-8', 'surrogateescape')!r} is not "
                "UTF-8; rename the file (or directory) to a UTF-8 name")
    return config


# -----------------------------------------------------------------------------
# device, dtype and processes: `torchrun --nproc_per_node N script.py` sets RANK, LOCAL_RANK and
# WORLD_SIZE in each process's environment (as in nanoGPT); `python script.py` is rank 0 of 1

RANK = int(os.environ.get("RANK", 0))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))
master = RANK == 0  # the one process that prints summaries and writes shared files

def pick_device(device=None):
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    return device

def pick_dtype(dtype, device):
    """bfloat16 on a GPU (as the paper ran), float32 on the CPU (bf16 matmuls are slow there)."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        die(f"--dtype {dtype} is not one of {', '.join(table)}")
    return table[dtype]

def dtype_name(torch_dtype):
    return str(torch_dtype).removeprefix("torch.")  # how every record names it: "bfloat16"

def init_distributed(device):
    """Join torchrun's process group (NCCL on CUDA, Gloo on the CPU) -> this process's device."""
    dev = pick_device(device)
    if "RANK" not in os.environ:
        return dev
    if dev.startswith("cuda"):
        dev = f"cuda:{LOCAL_RANK}"
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dev

def device_name(dev):
    """What a run ran on, for the efficiency table: the GPU's name (or cpu), × N processes."""
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    return f"{name} ×{WORLD_SIZE}" if WORLD_SIZE > 1 else name

def barrier():
    if dist.is_initialized():
        dist.barrier()

def sum_over_ranks(values, device):
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# models, tokenizers (hub ids or local directories) and greedy generation

def _from_pretrained(cls, name, **kwargs):
    """cls.from_pretrained(name): a local directory or the hub cache first; the hub only after one
    quick check that it answers (unreachable, its client retries for a minute, a line a try)."""
    from huggingface_hub import constants
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        die(f"{name} is a directory but not a model (no config.json); pass a hub id such as "
            "Qwen/Qwen2.5-0.5B or a directory written by save_pretrained")
    if not os.path.isdir(name) and (os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1):
        die(f"{name} is not a model directory or a hub id (like Qwen/Qwen2.5-Math-1.5B)")
    fix = "download it once with hub access, or pass a local model directory"
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception as e:  # not cached (OSError), or broken files (ValueError, ...)
        if os.path.isdir(name) or constants.HF_HUB_OFFLINE:
            die(f"cannot load {name}: {first_line(e)} (offline? {fix})")
    host = urllib.parse.urlparse(constants.ENDPOINT)
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    try:
        if not proxied:  # behind a proxy only the hub client itself can tell
            socket.create_connection((host.hostname, host.port or 443), timeout=5).close()
    except OSError as e:
        die(f"cannot load {name}: it is not in the local cache and {host.hostname} cannot be "
            f"reached ({e}); {fix}")
    try:
        return cls.from_pretrained(name, **kwargs)
    except Exception as e:
        die(f"cannot load {name}: {first_line(e)} (offline? {fix})")

def load_tokenizer(name):
    """The tokenizer, padding on the left so a batch of prompts ends where generation starts."""
    from transformers import AutoTokenizer
    tok = _from_pretrained(AutoTokenizer, name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else "<|endoftext|>"
    return tok

def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # our own bars are the ones worth watching
    return _from_pretrained(AutoModelForCausalLM, name, dtype=dtype).to(device).eval()

def chat_prompt_text(tok, question, system_prompt):
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

def chat_prompt_ids(tok, question, system_prompt):
    return tok(chat_prompt_text(tok, question, system_prompt), add_special_tokens=False)["input_ids"]

def stop_token_ids(tok, model):
    """Where a completion ends: the model's and the tokenizer's eos, and `<|endoftext|>` and the end
    of turn `<|im_end|>` where this tokenizer has them (Qwen base models list only the first and
    run on into an invented next turn; DeepSeek-R1-Distill-Qwen's own eos ends its turns)."""
    eos = getattr(model.generation_config, "eos_token_id", None) if model is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    for t in ("<|endoftext|>", "<|im_end|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return sorted(ids)

def greedy_config(max_new_tokens, stop_ids, pad_id, suppress=()):
    """Greedy whatever the model's generation_config.json says: transformers fills every knob left
    unset from it (instruct models ship temperature, top-p, ...), so each is set to neutral here."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            eos_token_id=list(stop_ids), pad_token_id=pad_id, temperature=1.0, top_p=1.0,
                            top_k=50, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            suppress_tokens=list(suppress) or None)

class StepBar:
    """A streamer for model.generate: a second, passing bar that moves once per decoding step (a
    batch can take minutes on a CPU). generate hands over the prompt first, then each step."""
    def __init__(self, steps, desc):
        self.bar = tqdm(total=steps, desc=desc, unit="tok", leave=False, position=1,
                        dynamic_ncols=True, disable=not master)
        self.prompt = True

    def put(self, value):
        if not self.prompt:
            self.bar.update(1)
        self.prompt = False

    def end(self):
        self.bar.close()

def position_ids(attention_mask):
    """Positions that skip left padding: the first real token of every row is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def left_pad(prompts, pad_id, device):
    """Prompts (lists of token ids) padded on the left into one batch -> (ids, mask), (B, T) each."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask

@torch.no_grad()
def greedy_generate(model, ids, mask, max_new_tokens, stop_ids, pad_id, suppress=(), desc="this batch",
                    hidden=False):
    """Greedy completions of a left-padded batch -> only the new token ids, (B, T'), each row padded
    after its stop token; `suppress`: ids never to pick. hidden=True also returns the model's last
    hidden state at the column that predicted each new token, (B, T', H): generate computes it
    anyway, one step at a time, and a hook keeps each step's newest column (the prompt's last
    column predicts token 0), so no second pass over the completion is needed."""
    config, steps = greedy_config(max_new_tokens, stop_ids, pad_id, suppress), []
    keep = lambda module, args, out: steps.append(out.last_hidden_state[:, -1:])  # noqa: E731
    hook = model.get_decoder().register_forward_hook(keep) if hidden else None
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             streamer=StepBar(max_new_tokens, desc))[:, ids.shape[1]:]
    finally:
        if hook:
            hook.remove()
    return (out, torch.cat(steps, 1)[:, :out.shape[1]]) if hidden else out


# -----------------------------------------------------------------------------
# files: written whole, JSON lines read with file:line errors, appended line by line

def atomic_write(path, data):
    """Write a whole file (bytes or str): it holds the old content or the new, never half. This is
    why every stage is kill-safe: the data goes to <path>.tmp, is pushed to disk (fsync) and renamed
    over `path` (os.replace is atomic on POSIX), so a kill -9 at any moment leaves at most a stray
    .tmp beside an intact file. Results are written here or appended a whole line at a time
    (append_jsonl), so the same command run again finds only whole files and resumes."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    with open(f"{path}.tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)

def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

def append_jsonl(path, rows):
    """Append whole lines, on disk before returning: after a kill a line is all there, or skipped."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

def read_bytes(path, what):
    if not os.path.exists(path):
        die(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        die(f"{what} {path} is a directory, not a file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        die(f"{what} {path} cannot be read ({e.strerror})")

def parse_jsonl_line(line, where):
    """One line of JSONL -> a dict, or a one-line error at `where` (file:line). A lone surrogate
    escape ("\\ud800") is refused too: it is no text, and writing it back would fail later."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:  # malformed, a 5000-digit number, [[[[... too deep
        die(f"{where}: malformed JSON ({getattr(e, 'msg', type(e).__name__)}); fix or remove that line")
    if not isinstance(row, dict):
        die(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "\\ud" in line.lower():  # only then can a surrogate be in there
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            die(f"{where}: holds a lone surrogate escape (like \"\\ud800\"), which is not text; "
                "fix or remove that line")
    return row

def _jsonl_rows(data, path, not_text):  # the one JSONL decode loop: (line number, row)
    for n, line in enumerate(data.split(b"\n"), 1):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            die(f"{path}:{n}: not UTF-8 text; {not_text}")
        if line.strip():
            yield n, parse_jsonl_line(line, f"{path}:{n}")

def read_jsonl(path, what="data file", with_lines=False):
    """Rows of a JSONL file; with_lines=True gives (line number, row) pairs, for file:line errors."""
    rows = _jsonl_rows(read_bytes(path, what), path, f"is {path} really a JSONL {what}?")
    return [(n, row) if with_lines else row for n, row in rows]

def complete_lines(path):
    """Rows of a JSONL file we write, but a half-written last line (a kill during an append), which
    is skipped: the file is only read here (merge_parts rewrites it). Missing: no rows."""
    if not os.path.exists(path):
        return []
    data = read_bytes(path, "file")
    fix = "this file is damaged: delete it (or its directory) and run again"
    return [row for _, row in _jsonl_rows(data[:data.rfind(b"\n") + 1], path, fix)]

def read_json(path, fix="delete it and run again"):
    """A JSON object written by write_json; a damaged one stops the run with `fix`."""
    try:
        obj = json.loads(read_bytes(path, "file").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        die(f"{path} is damaged (not valid JSON); {fix}")
    if not isinstance(obj, dict):
        die(f"{path} is damaged (not a JSON object); {fix}")
    return obj

def read_config(path, fix, strings=()):
    """The "config" object of a stage's record, its `strings` keys (where present) strings."""
    config = read_json(path, fix).get("config", {})
    if not isinstance(config, dict) or any(not isinstance(config.get(k, ""), str) for k in strings):
        kind = f"an object with string {', '.join(strings)}" if strings else "an object"
        die(f"{path} is damaged (its \"config\" is not {kind}); {fix}")
    return config

def sampled_config(run_dir, fix):
    """What sample.py recorded in run_dir ({} if nothing): the expert, the system prompt, ..."""
    path = os.path.join(run_dir, "sample_config.json")
    return read_config(path, fix, strings=("expert", "system_prompt")) if os.path.exists(path) else {}

def sampled_expert(run_dir, fix="it is sample.py's record of the expert; restore it from that run"):
    return sampled_config(run_dir, fix).get("expert") or DEFAULT_EXPERT

def download(url, path):
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            atomic_write(path, r.read())
    except Exception as e:
        die(f"cannot download {url} ({e}); put the file at {path} by hand and run again")
    return path


# -----------------------------------------------------------------------------
# HTML pages: one self-contained file per stage (no scripts or styles from elsewhere), a view of
# the JSON files read leniently: it never stops or changes a stage, whatever it finds. Everything
# from data or a model goes through esc(): a question holding "<script>" shows as text.

PAGE_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }
pre, .mono { font-family: ui-monospace, monospace; white-space: pre-wrap; } .muted { color: #888; }
"""
# Unicode's bidi controls (ALM, LRM, RLM, LRE ... RLO, LRI ... PDI) reorder the text around them: a
# model's "\u202e81" would display as "18". esc() shows each one by name, as text.
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

def _loads(data):
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # a UnicodeDecodeError is a ValueError
        return None

def peek_json(path):
    try:
        with open(path, "rb") as f:
            return _loads(f.read())
    except OSError:
        return None

def peek_jsonl(path):
    """A JSONL file for a view -> (its JSON-object rows, how many non-blank lines are not one)."""
    try:
        with open(path, "rb") as f:
            rows = [_loads(line) for line in f if line.strip()]
    except OSError:
        return [], 0
    return [r for r in rows if isinstance(r, dict)], sum(not isinstance(r, dict) for r in rows)

def esc(x):
    """Text from data or a model, safe inside HTML (attributes too), bidi controls made visible."""
    return BIDI.sub(lambda m: f"[U+{ord(m[0]):04X}]", html.escape(str(x), quote=True))

def heat(x, hi):
    """A background colour for x on a white-to-red scale that saturates at hi (KL values, ...)."""
    f = 0.0 if not (hi > 0 and math.isfinite(x)) else max(0.0, min(1.0, x / hi))
    return f"rgb(255,{round(255 - 180 * f)},{round(255 - 200 * f)})"

def page(title, body, css=""):
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{PAGE_CSS}{css}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n")

def write_page(path, make):
    """Write the page `make()` builds; if that fails (a die() inside too), warn in one line."""
    try:
        atomic_write(path, make())
        return True
    except (Exception, SystemExit) as e:  # noqa: BLE001 (only Ctrl-C passes)
        print(f"warning: could not write {path} ({type(e).__name__}: {e}); the JSON files are "
              "complete", file=sys.stderr)
        return False


# -----------------------------------------------------------------------------
# the run directory. One rule in every stage: rerun the same command and a stage resumes, keeping
# every finished result and doing only what is missing; a changed setting or input stops it with
# one line naming it. Its record holds every setting that changes a result and a fingerprint of
# each input: {"config": {..., "inputs": {path: fingerprint}}, "totals": null until the end}.

WEIGHTS_BYTES = 64 << 20  # files above this (a model's weights) are fingerprinted by name and size

def fingerprint(path):
    """An input's content: "sha256:<hex>" of a file's bytes; of a directory, of its files' names,
    sizes and bytes (dot files left out; one over WEIGHTS_BYTES by name and size: a 3 GB model is
    not read every run, a LoRA adapter is). A path that is not there (a hub id) stands for itself."""
    if not os.path.exists(path):
        return path
    h = hashlib.sha256()
    if os.path.isfile(path):
        _hash_file(h, path)
        return "sha256:" + h.hexdigest()
    names = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)
    for name in [n for n in names if not any(p.startswith(".") for p in n.split(os.sep))]:
        size = os.path.getsize(os.path.join(path, name))
        h.update(f"{name}\0{size}\0".encode("utf-8", "surrogateescape"))
        if size <= WEIGHTS_BYTES:
            _hash_file(h, os.path.join(path, name))
    return "sha256:" + h.hexdigest()

def _hash_file(h, path):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)

def differing(old, new):
    """The keys whose values differ between two configurations, a changed input by its path."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if "inputs" in keys and isinstance(old.get("inputs"), dict) and isinstance(new.get("inputs"), dict):
        keys.remove("inputs")
        keys += [f"inputs[{p}]" for p in differing(old["inputs"], new["inputs"])]
    return keys

def start_run(out_dir, record_name, config, results, stage, **extra):
    """Rank 0, before a stage's first result: make and lock out_dir, then by the rule above: no
    record, or one of a start that failed before any of `results` (paths) existed -> write the
    record (and `extra` keys), return None; a record of the same config -> return it (a resume);
    results of another config, or without a record, stop in one line.
    Other ranks return None at once (they wait for rank 0 at a barrier where the stage needs it)."""
    if not master:
        return None
    make_dir(out_dir)
    lock_dir(out_dir, stage)  # a second run on this directory stops here
    path, afresh = os.path.join(out_dir, record_name), f"delete {out_dir} or pass another --out-dir"
    config = json.loads(json.dumps(config))  # as it reads back: tuples are lists
    found = [p for p in results if os.path.exists(p)]
    if os.path.exists(path):
        record = read_json(path, f"{afresh} and run again")
        if not isinstance(record.get("config"), dict):
            die(f"{path} is damaged (no \"config\" object); {afresh} and run again")
        diff = differing(record["config"], config)
        if not diff:
            return record
        if found:  # results of other settings: never mixed
            die(f"{out_dir} holds a {stage} run with other settings ({', '.join(diff)} differ; see "
                f"{path}); rerun with those settings to resume, or {afresh}")
        # else a start that failed before its first result (a typo, out of memory): nothing to mix
    elif found:
        die(f"{out_dir} holds {os.path.basename(found[0])} but no {record_name} saying what made "
            f"it; {afresh}")
    write_json(path, dict(config=config, **extra, totals=None))
    return None

def finish_run(out_dir, record_name, totals, **extra):  # rank 0, at the end
    path = os.path.join(out_dir, record_name)
    record = read_json(path, f"delete {out_dir} or pass another --out-dir, and run again")
    write_json(path, {**record, **extra, "totals": totals})

def part_path(path):
    """Where this process appends its rows of `path`: <path>.rank<k> under torchrun, else path."""
    return f"{path}.rank{RANK}" if WORLD_SIZE > 1 else path

def merge_parts(path, key, order=None):
    """Fold every part file <path>.rank<k> (of any run, any number of processes) into `path`,
    rewritten whole in `order` of key(row) (no order: sorted by key; others last), and remove the
    parts. A row found twice is kept once and a half line dropped: the repair before appending."""
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    parts = sorted(os.path.join(folder, p) for p in os.listdir(folder) if p.startswith(name + ".rank"))
    rows = {key(r): r for p in [path] + parts for r in complete_lines(p)}
    position = {k: n for n, k in enumerate(sorted(rows) if order is None else order)}
    write_jsonl(path, sorted(rows.values(), key=lambda r: position.get(key(r), len(position))))
    for p in parts:
        os.remove(p)
    return rows

def make_dir(path, what="--out-dir"):
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        die(f"{what} {path} is a file, not a directory; pass a directory path")
    except PermissionError:
        die(f"{what} {path}: permission denied; pass a directory you can write to")
    return path

def lock_dir(path, name):
    """One run at a time per directory: <path>/.<name>.lock, held with flock for the life of this
    process, holds its pid. The OS drops it when the process ends, even by kill -9."""
    import fcntl  # POSIX; the scripts run on Linux
    f = open(os.path.join(path, f".{name}.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        die(f"{path} is in use by another {name} run (pid {f.read().strip() or 'unknown'}); wait for "
            "it to end, or pass another --out-dir")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS.append(f)  # kept open (and locked) until the process exits

_LOCKS = []

def release_locks():  # as the process's end would (for a script a test runs in-process)
    while _LOCKS:
        _LOCKS.pop().close()

os.register_at_fork(after_in_child=release_locks)  # a forked grading worker holds no lock
