"""
What the three LightReasoner stages share: device/dtype choice, loading a model and its tokenizer,
the chat prompt, stop tokens, JSONL/JSON reading and writing, and downloading data once.

Every mistake a user can make (missing file, malformed line, model that is not there) ends in
`die(...)`: one line on stderr naming the problem and the fix, exit code 2, no traceback.
"""
import argparse
import json
import os
import sys
import urllib.request

import torch

# -----------------------------------------------------------------------------
# errors


def die(msg):
    """One-line error for the user (file, what is wrong, how to fix it); exit code 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# command line: one flag per configuration knob


def parse_flags(defaults, doc):
    """Flags that mirror a script's configuration block one to one (`max_new_tokens` <->
    `--max-new-tokens`, same type and default), so the top of each script documents its CLI.
    Returns the configuration with the user's values in."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default: {value}")
    return vars(parser.parse_args())


# -----------------------------------------------------------------------------
# device and dtype


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


# -----------------------------------------------------------------------------
# models and tokenizers (hub ids or local directories)


def _check_model_name(name):
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            die(f"{name} is a directory but not a model (no config.json); "
                "pass a hub id such as Qwen/Qwen2.5-0.5B or a directory written by save_pretrained")
    elif os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1:
        die(f"{name} is not a model directory or a hub id (like Qwen/Qwen2.5-Math-1.5B)")


def _load_error(name, e):
    die(f"cannot load {name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
        "(offline? download it once with hub access, or pass a local model directory)")


def load_tokenizer(name):
    """The tokenizer, padding on the left so a batch of prompts ends where generation starts."""
    from transformers import AutoTokenizer
    _check_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError offline, ValueError on broken files, ...
        _load_error(name, e)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else "<|endoftext|>"
    return tok


def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # our own bars are the ones worth watching
    _check_model_name(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as e:
        _load_error(name, e)
    return model.to(device).eval()


def chat_prompt_text(tok, question, system_prompt):
    """The chat prompt: system + user turn, then the opening of the assistant turn."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tok, question, system_prompt):
    return tok(chat_prompt_text(tok, question, system_prompt), add_special_tokens=False)["input_ids"]


def stop_token_ids(tok, model):
    """Where a completion ends: the model's eos ids, the tokenizer's eos, `<|endoftext|>` and the
    chat template's end of turn `<|im_end|>` (base models list only `<|endoftext|>`, and without
    `<|im_end|>` they run on into an invented next turn)."""
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None) if model is not None else None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    for t in ("<|endoftext|>", "<|im_end|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return sorted(ids)


def greedy_config(max_new_tokens, stop_ids, pad_id, suppress=()):
    """A generation config that is greedy whatever the model's generation_config.json says: transformers
    fills every knob left unset from the model's own file (instruct models ship temperature, top-p,
    top-k and a repetition penalty), so each one is set here to its neutral value."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            eos_token_id=list(stop_ids), pad_token_id=pad_id, temperature=1.0, top_p=1.0,
                            top_k=50, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            suppress_tokens=list(suppress) or None)


def position_ids(attention_mask):
    """Positions that skip left padding: the first real token of every row is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# JSON lines: read with file:line errors, append safely, recover from a kill -9


def read_jsonl(path, what="data file", with_lines=False):
    """Rows of a JSONL file (blank lines skipped); with_lines=True gives (line number, row) pairs
    so later checks can point at file:line too."""
    if not os.path.exists(path):
        die(f"{what} {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove that line")
            if not isinstance(row, dict):
                die(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row) if with_lines else row)
    return rows


def complete_lines(path):
    """Rows of a JSONL file we write ourselves, after cutting off a half-written last line (what a
    kill -9 in the middle of a write leaves behind). A missing file has no rows."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def append_jsonl(path, rows):
    """Append whole lines and push them to disk before returning, so a line is either all there or
    (after complete_lines) not there at all."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path, rows):
    """Rewrite a whole JSONL file atomically (a temporary file renamed over the old one)."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def write_json(path, obj):
    """Write JSON atomically: a temporary file renamed over the old one, never a half file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# data, downloaded once into a cache


def download(url, path):
    """Return `path`, downloading `url` there first if it is not already cached."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except Exception as e:
        die(f"cannot download {url} ({e}); put the file at {path} by hand and run again")
    with open(f"{path}.tmp", "wb") as f:
        f.write(data)
    os.replace(f"{path}.tmp", path)
    return path
