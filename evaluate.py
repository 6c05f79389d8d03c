"""
Stage 3 of LightReasoner (Wang et al., arXiv 2510.07962): zero-shot pass@1 on the paper's math
benchmarks, generated and graded like the official Qwen2.5-Math evaluation toolkit (prompt
`qwen25-math-cot`, greedy decoding, up to 2048 new tokens per call, up to 4 calls with the model's
Python code run in between), so our numbers compare with the paper's.

    python evaluate.py --bench math                   # base model and base+out/lora, side by side
    python evaluate.py --bench gsm8k,svamp --limit 100
    python evaluate.py --bench all --adapter none --model out/merged
    python evaluate.py --bench math --completions vllm_out.jsonl   # grade saved outputs, no model
    torchrun --standalone --nproc_per_node 8 evaluate.py --bench all   # one process per GPU

Benchmarks: data/<bench>/test.jsonl (the toolkit's files, downloaded once). Writes out/eval/<tag>/
<bench>.jsonl (a graded row per problem), summary.json and run.json (what made the rows), and the
pages out/eval/report.html and out/eval/<bench>.html. Kill it at any moment and run it again: graded
problems are kept. Like the toolkit it runs the model's Python: in another process, 5 s and 4 GiB at
most, in a box (Linux namespaces: no network, no secrets, read-only files but its scratch dir);
--no-code-exec, --unboxed.
"""
import contextlib
import ctypes
import functools
import glob
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import sympy
import torch
from tqdm import tqdm

from common import (append_jsonl, barrier, complete_lines, die, download, dtype_name, esc,
                    fingerprint, finish_run, first_line, greedy_generate, init_distributed, left_pad,
                    load_model, load_tokenizer, make_dir, master, merge_parts, page, parse_flags,
                    part_path, peek_json, peek_jsonl, pick_dtype, read_json, read_jsonl,
                    sampled_expert, start_run, stop_token_ids, sum_over_ranks, write_json,
                    write_page, RANK, WORLD_SIZE)


# -----------------------------------------------------------------------------
# configuration: the defaults reproduce the paper's evaluation
bench = "math"  # one of BENCHMARKS, a comma list, or "all"
model = ""  # base model; "" = the expert of out/sample_config.json, else Qwen/Qwen2.5-Math-1.5B
adapter = ""  # LoRA dir; "" = out/lora if there (then base AND base+adapter, merged); "none"
completions = ""  # grade this JSONL of {"idx", "completion"} instead of generating (no model)
limit = ""  # evaluate only the first N problems of each benchmark ("" = all)
max_new_tokens = 2048  # new tokens per call of the model (toolkit: 2048 per call, up to 4 calls)
batch_size = 0  # prompts generated together (per process); 0 = 64 on a GPU, 16 on the CPU
no_code_exec = False  # do not run the model's Python blocks (toolkit: runs them, up to 4 rounds)
unboxed = False  # run them under a guard only, where the kernel cannot box them (README)
grade_timeout = 3.0  # seconds one answer's grading may take before it counts as wrong (toolkit: 3)
data_dir = "data"  # benchmark files: <data_dir>/<bench>/test.jsonl
out_dir = "out"
device = "auto"  # cuda if available, else cpu (under torchrun: GPU LOCAL_RANK)
dtype = "auto"  # bfloat16 on cuda, float32 on cpu
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))]

BENCHMARKS = ["gsm8k", "math", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem"]
DATA_URL = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/{}/test.jsonl"
# the toolkit's `qwen25-math-cot` prompt, a plain string: base and tuned models see the same text
PROMPT = ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
          "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
STOP_WORDS = ["</s>", "<|im_end|>", "<|endoftext|>"]  # where the toolkit cuts a completion
MAX_ROUNDS = 4  # the toolkit's max_func_call: calls of the model, code run in between
CODE_TIMEOUT = 5  # seconds a program may run (the toolkit's PythonExecutor: 5)
CODE_MEMORY = 4 << 30  # bytes of address space a program may take (the toolkit sets no limit)
CODE_ENV = dict(PATH="/usr/bin:/bin", LANG="C.UTF-8", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
code_box = "box"  # how the model's code is shut in: "box" or "guard" (--unboxed), see run_program


# -----------------------------------------------------------------------------
# benchmarks: questions and ground truths as the toolkit reads them (its parser.py), from its files

def parse_question(record, name):
    if name == "gsm8k" or name == "olympiadbench":
        question = record["question"]
    elif name in ("math", "minerva_math"):
        question = record["problem"]
    elif name == "svamp":
        body = record["Body"].strip()
        question = (body if body.endswith(".") else body + ".") + " " + record["Question"].strip()
    elif name == "asdiv":
        question = record["body"].strip() + " " + record["question"].strip()
    elif name == "mmlu_stem":
        options = " ".join(f"({l}) {str(o).strip()}" for l, o in zip("ABCD", record["choices"]))
        question = record["question"].strip() + "\nAnswer Choices: " + options
    gt = parse_gt(record, name).lower()  # the toolkit tells the model which words it expects
    yes_no = " (Yes or No)" if gt in ("yes", "no") else ""
    return (question + (" (True or False)" if gt in ("true", "false") else yes_no)).strip()

def parse_gt(record, name):
    """The reference answer as the toolkit compares it: normalised twice (math_eval.py, then its
    evaluate() on the saved sample), none for minerva."""
    if name in ("math", "minerva_math"):
        gt = extract_answer(record["solution"], name)  # last \boxed{} of the reference solution
        if name == "minerva_math":
            return gt.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
        return gt
    if name == "gsm8k":
        gt = record["answer"].split("####")[1]
    elif name == "svamp":
        gt = record["Answer"]  # a float such as 145.0; normalising turns it into "145"
    elif name == "asdiv":
        gt = re.sub(r"\(.*?\)", "", record["answer"])  # "9 (apples)" -> "9 "
    elif name == "olympiadbench":
        gt = record["final_answer"][0].strip("$")
    elif name == "mmlu_stem":
        gt = "ABCD"[record["answer"]]
    return normalize(normalize(gt))

def load_benchmark(name):
    """(path, [{idx, question, gt}]) of one benchmark, its file downloaded once (by rank 0)."""
    path, url = os.path.join(data_dir, name, "test.jsonl"), DATA_URL.format(name)
    if master and not os.path.exists(path):
        download(url, path)
    barrier()
    problems = {}
    for n, record in read_jsonl(path, f"{name} benchmark file", with_lines=True):
        idx = check_idx(record.get("idx", n - 1), f"{path}:{n}")
        if idx in problems:
            die(f"{path}:{n}: idx {idx!r} appears twice; every problem needs its own idx")
        try:
            question, gt = parse_question(record, name), parse_gt(record, name)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            die(f"{path}:{n}: not a {name} record in the toolkit's format ({type(e).__name__}: {e});"
                f" get the file from {url}")
        problems[idx] = dict(idx=idx, question=question, gt=gt)
    if not problems:
        die(f"{path} holds no problems; get the file from {url}")
    return path, list(problems.values())

def check_idx(idx, where):
    """A whole number or a string: true and 0.0 would otherwise pass for problems 1 and 0."""
    if isinstance(idx, bool) or not isinstance(idx, (int, str)):
        die(f"{where}: idx {json.dumps(idx)} is not a whole number (or a string); fix that line")
    return idx


# -----------------------------------------------------------------------------
# generation: the toolkit's rounds of greedy decoding, the model's code run in between

def generate(net, tok, prompts, stop_ids, budgets):
    """Greedy completions of prompts (token id lists) in one left-padded batch, each cut at its
    first stop token and after its own budget -> (texts, new tokens, which ran out of budget)."""
    ids, mask = left_pad(prompts, tok.pad_token_id, net.device)  # (B, T)
    out = greedy_generate(net, ids, mask, max(budgets), stop_ids, tok.pad_token_id,
                          desc=f"{len(prompts)} completions")
    texts, n_tokens, cut_off = [], 0, []
    for row, budget in zip(out.tolist(), budgets):
        cut = next((i for i, t in enumerate(row[:budget]) if t in stop_ids), len(row[:budget]))
        texts.append(tok.decode(row[:cut], skip_special_tokens=True))
        n_tokens += cut
        cut_off.append(cut == budget)  # no stop token within the budget: cut off mid-thought
    return texts, n_tokens, cut_off

def solve(net, tok, stop_ids, questions):
    """The toolkit's loop over one batch: up to MAX_ROUNDS calls of the model. A call that ends on
    a closed code block with no "boxed" in it gets the program's output appended and the model reads
    on (the last round adds "Reach max function call limit."). Each call may write max_new_tokens,
    within the model's context. -> (completions, programs run, cut off at the limit, new tokens)"""
    prompts = [PROMPT.format(question=q) for q in questions]
    texts, rounds, cut_off = [""] * len(prompts), [0] * len(prompts), [False] * len(prompts)
    n_tokens, todo = 0, list(range(len(prompts)))
    context = getattr(net.config, "max_position_embeddings", None) or 1 << 30  # vLLM: max_model_len
    for r in range(MAX_ROUNDS):
        ids = {i: tok(prompts[i] + texts[i], add_special_tokens=False)["input_ids"] for i in todo}
        for i in todo:
            cut_off[i] = len(ids[i]) >= context  # a full context ends a completion, cut off
        todo = [i for i in todo if not cut_off[i]]
        if not todo:
            break
        budgets = [min(max_new_tokens, context - len(ids[i])) for i in todo]
        try:
            outs, n, cuts = generate(net, tok, [ids[i] for i in todo], stop_ids, budgets)
        except torch.cuda.OutOfMemoryError:
            die(f"CUDA out of memory generating {len(todo)} prompts at once; pass a smaller "
                "--batch-size", every_rank=True)
        n_tokens += n
        for i, out, cut in zip(todo, outs, cuts):
            texts[i] += out.rstrip()
            cut_off[i] = cut  # what the last call did
        todo = [i for i, out in zip(todo, outs)
                if not no_code_exec and "boxed" not in out and out.rstrip().endswith("```")]
        for i in todo:  # one by one, as the toolkit
            texts[i] += f"\n```output\n{run_program(extract_program(prompts[i] + texts[i]))}\n```\n"
            texts[i] += "\nReach max function call limit." if r == MAX_ROUNDS - 1 else ""
            rounds[i] += 1
    return texts, rounds, cut_off, n_tokens

def extract_program(text):
    """The program the toolkit runs (its trajectory.py): the text so far, read line by line into
    text, ```python programs``` and ```output```s. Earlier programs whose output looks like a
    success run again, their print lines dropped; a failed one keeps only its import lines."""
    parts, role, buf, lines = [], "text", "", text.split("\n")
    for n, line in enumerate(lines):
        starts, output = line == "```python", line.startswith("```output")
        ends = line == "```" and role != "text"
        if (starts and role != "text") or (ends and role == "program" and not buf) \
                or (output and role == "output" and buf):
            return "raise ValueError('Invalid trajectory')"
        if starts or ends:
            parts += [(role, buf)] if buf or ends else []
            role, buf = "program" if starts else "output" if role == "program" else "text", ""
        elif not (output and role == "output"):
            buf += line + ("\n" if n < len(lines) - 1 else "")
    parts += [(role, buf)] if buf else []
    programs, imports = [], []
    failed = ("error", "exception", "no algorithms", "cannot", "nan", "...")
    for k, (role, content) in enumerate(parts):
        after = parts[k + 1][1].lower() if k + 1 < len(parts) else ""
        if role == "program" and any(w in after for w in failed):
            imports += [line for line in content.split("\n") if line.startswith(("import", "from"))]
        elif role == "program":
            programs.append(content)
    programs = programs or [""]
    programs[0] = "\n".join(imports) + "\n" + programs[0] if imports else programs[0]
    quiet = lambda p: "\n".join(x for x in p.split("\n") if not x.strip().startswith("print("))
    return "\n".join([quiet(p) for p in programs[:-1]] + programs[-1:])  # noqa: E731 (above)

# The child process that runs one program: the toolkit's executor, quirks included. With "print(" in
# the last line the whole program runs and its stdout is the result, else the last line's value is;
# globals start empty; "input(" is refused; an error reports its traceback's last line; result and
# report are stripped and cut to 200 + "..." + 200 characters. Before the program runs, the child
# shuts itself in: in the box (Linux namespaces), else under the guard (--unboxed).
CHILD = r"""
import contextlib, ctypes, errno, io, json, os, pickle, re, resource, select, signal, sys, traceback
timeout, memory, scratch, mode = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
parent, hide, libc = int(sys.argv[5]), sys.argv[6:], ctypes.CDLL(None, use_errno=True)
NOSUID, NODEV, NOEXEC, NOBODY, go = 2, 4, 8, 65534, []  # mount flags (= statvfs's); nobody's ids
def check(ret, what):  # a libc call that failed: its errno as an OSError
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
if sys.platform == "linux":  # PR_SET_PDEATHSIG: killed when evaluate.py ends, even by kill -9
    check(libc.prctl(1, signal.SIGKILL), "prctl")
    if os.getppid() != parent:  # it ended before that line
        os._exit(1)
code = sys.stdin.buffer.read().decode("utf-8", "replace").strip().split("\n")
out, null, sys.dont_write_bytecode = io.StringIO(), open(os.devnull, "w"), True
keep = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path)}
keep = [p for p in keep if os.path.isdir(p) and not any(p.startswith(k + "/") for k in keep)]

def mount(src, dst, kind=None, flags=0, data=None):
    enc = lambda s: s and s.encode()
    failed = libc.mount(enc(src), enc(dst), enc(kind), ctypes.c_ulong(flags), enc(data))
    check(failed, f"mount {dst}")
def read_only(path, flags):  # MS_REMOUNT | MS_BIND | MS_RDONLY, with flags it may not drop
    mount(None, path, None, 32 | 4096 | 1 | flags)
def new_user_namespace(kinds, ids=None):  # CLONE_NEWUSER and `kinds`; we keep our ids, or get `ids`
    uid, gid, pid = os.geteuid(), os.getegid(), os.getpid()
    helper = os.fork() if ids else 0  # still root on the host, it maps more ids than our own
    if helper == 0 and ids:
        os.close(go[1])  # so that it reads end of file if we die first
        with contextlib.suppress(OSError):
            os.read(go[0], 1)
            for name in "uid_map", "gid_map":
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(ids)
            os._exit(0)
        os._exit(1)
    failed = libc.unshare(0x10000000 | kinds)
    if ids:
        os.write(go[1], b"x")
        if os.waitpid(helper, 0)[1] != 0 and not failed:
            raise OSError(errno.EPERM, "cannot map the box's user ids")
    check(failed, "unshare")
    if ids:
        return
    for name, text in ("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
def enter_box():
    root, go[:] = os.geteuid() == 0, os.pipe()  # root passes RLIMIT_NPROC: it runs as nobody
    ids = f"0 0 1\n{NOBODY} {NOBODY} 1" if root else None
    new_user_namespace(0x20000 | 0x40000000 | 0x20000000 | 0x08000000, ids)  # mount, net, PID, IPC
    mount(None, "/", None, 0x4000 | 0x40000)  # MS_REC | MS_PRIVATE: our mounts stay in here
    fds = [(p, os.open(p, os.O_PATH)) for p in keep]  # opened while they can be: shown again below
    with open("/proc/self/mountinfo") as f:  # fields 5 and 6: mount point (octal escapes), options
        mounts = [line.split()[4:6] for line in f]
    for point, options in mounts:  # every file system read-only (one under another: out of reach)
        flags = sum(bit for bit, word in ((NOSUID, "nosuid"), (NODEV, "nodev"), (NOEXEC, "noexec"))
                    if word in options.split(","))
        with contextlib.suppress(FileNotFoundError):
            read_only(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point), flags)
    hidden = []
    for path in sorted(set(hide)):  # home, /tmp, the run's data and out dirs...: an empty directory
        if os.path.isdir(path):  # (not one inside a directory hidden already)
            mount("tmpfs", path, "tmpfs", NOSUID | NODEV, "size=64k,mode=755")
            hidden.append(path)
    for path, fd in fds:
        if not os.path.isdir(path):  # it was under a hidden directory: shown again, read-only
            os.makedirs(path)
            mount(f"/proc/self/fd/{fd}", path, None, 0x1000 | 0x4000)  # MS_BIND | MS_REC
            read_only(path, os.statvfs(path).f_flag & (NOSUID | NODEV | NOEXEC))
        os.close(fd)
    os.makedirs(scratch, exist_ok=True)
    owner = NOBODY if root else 0
    mount("tmpfs", scratch, "tmpfs", NOSUID | NODEV, f"size=64m,mode=700,uid={owner},gid={owner}")
    for path in hidden:  # the scratch dir is the one writable place
        read_only(path, NOSUID | NODEV)
    os.chdir(scratch)
    alive, pid = os.pipe(), os.fork()  # the waiter holds the pipe's write end until it dies
    if pid:  # outside the new PID namespace: waits for the program (PID 1 there: its end ends all)
        status = os.waitpid(pid, 0)[1]
        if os.WIFSIGNALED(status):  # die as it died: evaluate.py reads the same exit code
            with contextlib.suppress(OSError, ValueError):
                signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status))
    os.close(alive[1])
    os.setsid()  # its own process group: kill(0, ...) reaches no one outside
    try:
        mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)  # this namespace's processes only
    except OSError:
        mount("tmpfs", "/proc", "tmpfs", NOSUID | NODEV | NOEXEC | 1, "size=4k")  # or none at all
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        libc.prctl(4, 1)  # PR_SET_DUMPABLE, which setuid cleared: /proc/self/uid_map is ours again
    new_user_namespace(0x20000)  # a namespace inside ours: every mount above is locked for good
    read_only("/proc", NOSUID | NODEV | NOEXEC)
    check(libc.prctl(1, signal.SIGKILL), "prctl")  # dies with its waiter (setuid cleared it too)
    if select.select([alive[0]], [], [], 0)[0]:  # end of file: the waiter died before that line
        os._exit(1)

def guard():  # no box: audit hooks refuse what Python can do to the machine (C code passes them)
    real = lambda p: os.path.realpath(os.fsdecode(p)) + "/"
    under = lambda p, top: not isinstance(p, int) and any(real(p).startswith(d + "/") for d in top)
    inside = lambda p: isinstance(p, int) or under(p, [scratch])
    others = lambda p: re.match(r"/proc/\d+/", real(p)) and not under(p, [f"/proc/{os.getpid()}"])
    private = lambda p: not isinstance(p, int) and (under(p, hide) or others(p)) and not under(
        p, [scratch, *keep])  # what the box hides, and other processes' environment
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    changes = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.chmod", "os.chown",
               "os.utime", "os.truncate", "os.mkfifo", "os.mknod", "shutil.rmtree"}
    refused = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
               "resource.prlimit", "pty.spawn"}
    def hook(event, args):
        paths = [p for p in args if isinstance(p, (str, bytes, os.PathLike))]
        if (event in refused or event.split(".")[0] in ("socket", "ctypes", "subprocess")
                or event == "open" and (private(args[0]) or args[2] & write and not inside(args[0]))
                or event in ("os.listdir", "os.scandir") and args[0] is not None and private(args[0])
                or event in changes and not all(map(inside, paths))
                or event == "os.symlink" and not inside(args[1])):
            raise PermissionError(f"{event} is refused: the program runs under a guard (--unboxed)")
    sys.addaudithook(hook)
    import _posixsubprocess  # subprocess's fork and exec, which raise no event of their own
    _posixsubprocess.fork_exec = lambda *_: hook("os.exec", ())
    globals().pop("libc")  # and our own libc, whose functions are looked up already

if mode == "box":
    try:
        enter_box()
    except (OSError, AttributeError) as e:  # AttributeError: no unshare, mount, O_PATH (not Linux)
        os.write(1, ("\n" + json.dumps(f"no box: {e}") + "\n").encode())
        os._exit(0)  # the reason, as its output (the first program of a run: evaluate.py stops)
limits = [(resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)]
for limit, size in limits + [(resource.RLIMIT_NPROC, 1)] * (mode == "box"):  # box: one process
    resource.setrlimit(limit, (size, size))
if mode == "guard":
    guard()
class Alarm(AssertionError): pass  # as the toolkit's timeout_decorator error
def ring(*_): raise Alarm()
body = code if "print(" in code[-1] else code[:-1]
signal.signal(signal.SIGALRM, ring)
signal.setitimer(signal.ITIMER_REAL, timeout)
try:
    if "input(" in "\n".join(body):
        raise RuntimeError()
    with contextlib.redirect_stdout(out if body is code else null):
        exec("\n".join(body), g := {})
        result = out.getvalue() if body is code else eval(code[-1], g)
    text, report = str(result), "Done"
    pickle.dumps(result)
except BaseException as e:
    out.close()  # what a flood of output took, given back
    text, report = "", traceback.format_exc().split("\n")[-2]
    if isinstance(e, Alarm):
        report = "timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'"
signal.setitimer(signal.ITIMER_REAL, 0)
cut = lambda s: s[:200] + "..." + s[-200:] if len(s) > 400 else s
os.write(1, ("\n" + json.dumps(cut(text.strip()) or cut(report.strip())) + "\n").encode())
"""

def run_program(program):
    """The text the toolkit appends after running `program` (see CHILD): in a new Python process,
    CODE_TIMEOUT s, CODE_MEMORY bytes, 16 MiB a file, CODE_ENV, a scratch HOME and working dir, in
    the box or under the guard (README, Errors and safety). Past its alarm it is killed ("Timeout
    Error", as the toolkit's pool says); whatever it leaves in its scratch dir is removed."""
    scratch = tempfile.mkdtemp(prefix="evaluate-code-")
    hide = {os.path.expanduser("~"), tempfile.gettempdir(), os.path.abspath(data_dir),
            os.path.abspath(out_dir), "/root", "/home", "/tmp", "/var/tmp", "/run", "/dev/shm", "/mnt",
            "/media"} - {"/"}
    command = [sys.executable, "-c", CHILD, str(CODE_TIMEOUT), str(CODE_MEMORY), scratch, code_box,
               str(os.getpid()), *sorted(hide)]
    env = dict(CODE_ENV, HOME=scratch, TMPDIR=scratch)
    try:
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(command, cwd=scratch, stdin=subprocess.PIPE, stdout=out,
                                    stderr=subprocess.DEVNULL, env=env, start_new_session=True)
            try:
                proc.communicate(program.encode("utf-8", "replace"), timeout=CODE_TIMEOUT + 1)
            except subprocess.TimeoutExpired:  # stuck, or stopped (SIGSTOP): our own deadline
                return "Timeout Error"
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its children too (the box's die with it)
                proc.wait()
            out.seek(max(0, out.seek(0, 2) - 8192))
            last = out.read().decode("utf-8", "replace").rstrip("\n").rsplit("\n", 1)[-1]
    finally:
        remove_tree(scratch)
    with contextlib.suppress(ValueError, RecursionError):
        if proc.returncode == 0 and isinstance(text := json.loads(last), str):
            text = text.strip()  # cut here too: a program can write a line of its own and exit
            return text[:200] + "..." + text[-200:] if len(text) > 400 else text
    return f"RuntimeError: the program ended without a result (exit code {proc.returncode})"

def remove_tree(path):
    """rm -rf, whatever a program made of its scratch dir (a link in its place, a tree deeper than
    the recursion limit or PATH_MAX): one directory open at a time, by descriptor."""
    with contextlib.suppress(OSError):
        os.unlink(path)  # a link or a file in its place
    names, flags, fd = [], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, None
    with contextlib.suppress(OSError):
        fd = os.open(path, flags)
        while True:
            entry = next(iter(os.listdir(fd)), None)
            if entry is not None:
                try:
                    child = os.open(entry, flags, dir_fd=fd)
                except OSError:  # not a directory
                    os.unlink(entry, dir_fd=fd)
                    continue
                os.close(fd)
                fd, names = child, names + [entry]
            elif names:  # an emptied directory: up, and remove it
                up = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = up
                os.rmdir(names.pop(), dir_fd=fd)
            else:
                break
    if fd is not None:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)

def choose_code_box():
    """Once, before a run executes code: the box, tried on "print(1)" (none: one line, exit 2), or
    with --unboxed the guard, whose limits are said in one line."""
    global code_box
    code_box = "guard" if unboxed else "box"
    if unboxed and master:
        print("warning: --unboxed: the model's code gets a clean environment, a scratch HOME and "
              "working dir, time, memory and file-size limits, and a guard in Python that refuses "
              "subprocess, exec, fork, signals, sockets, ctypes, writes outside its scratch dir and "
              "reads of home, /tmp and the run's dirs; NOT enforced: what C code (a compiled "
              "extension) does, and any way around Python's own calls", file=sys.stderr, flush=True)
    elif not unboxed and (why := run_program("print(1)")) != "1":
        die(f"cannot box the model's code here ({why}); pass --unboxed to run it under a guard "
            "only (README: Errors and safety), or --no-code-exec")


# -----------------------------------------------------------------------------
# grading many answers: each completion (extraction, normalisation, comparison) in a worker process
# under a time limit, as the toolkit does for comparisons (sympy can take minutes, or hang in C
# code, on a pathological expression; a megabyte of digits is slow in any regular expression)

def grade_worker(conn, parent_end, parent):
    """Grades jobs until None; the answer goes first, so that a comparison out of time still shows
    it. An error counts as wrong (the toolkit's pool would stop the run). It never outlives us."""
    parent_end.close()  # so that recv() ends when the parent's end closes (not Linux)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: even in mid-comparison
    while os.getppid() == parent and (job := conn.recv()) is not None:  # (gone before prctl: stop)
        completion, gt, name = job
        pred = correct = None
        with contextlib.suppress(Exception):
            pred = predict(completion, name, gt)
        conn.send(pred)
        with contextlib.suppress(Exception):
            correct = math_equal(pred, gt)
        conn.send(bool(correct))

class Grader:
    """grade(completion, gt, name) -> (pred, correct, timed_out), in a forked worker, replaced when
    it overruns `timeout` seconds (then wrong; pred None if not even extracted). It forks at once:
    create it before a model touches CUDA."""

    def __init__(self, timeout):
        self.timeout, self.timeouts = timeout, 0
        self.start()

    def start(self):
        self.conn, child = multiprocessing.Pipe()
        self.worker = multiprocessing.get_context("fork").Process(
            target=grade_worker, daemon=True, args=(child, self.conn, os.getpid()))
        self.worker.start()
        child.close()  # the worker's end, ours no longer: a worker that dies reads as EOF at once

    def grade(self, completion, gt, name):
        self.conn.send((completion, gt, name))
        deadline, answers = time.monotonic() + self.timeout, []
        with contextlib.suppress(EOFError):  # the worker died (out of memory?): as if out of time
            while len(answers) < 2 and self.conn.poll(max(0.0, deadline - time.monotonic())):
                answers.append(self.conn.recv())
        if len(answers) == 2:
            return answers[0], answers[1], False
        self.worker.kill()
        self.worker.join()
        self.timeouts += 1
        self.start()  # the next answer's worker, forked now
        return (answers or [None])[0], False, True

    def close(self):
        if self.worker.is_alive():
            self.conn.send(None)
            self.worker.join()

def key_of(row):  # a job's or row's key: its idx; a saved completion's its line (an idx may repeat)
    return row.get("line", row["idx"])

def run_jobs(name, jobs, rows_path, grader, desc, make=None):
    """Grade `jobs` (problems with a "completion", or make(questions) -> (completions, programs
    run, cut off, new tokens) writes them) into rows_path, keeping rows already there. Under
    torchrun batch k goes to rank k mod N, which appends its rows to its part file; rank 0 merges
    them. -> (rows of these jobs on rank 0, new tokens)"""
    keys = [key_of(j) for j in jobs]
    if master:
        merge_parts(rows_path, key_of, keys)  # what a killed run left (any number of processes)
    barrier()
    done = {key_of(r) for r in complete_lines(rows_path)}
    order = sorted(jobs, key=lambda j: -len(j["question"]))  # similar lengths batched: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][RANK::WORLD_SIZE]
    part, n_tokens, graded, correct, t0 = part_path(rows_path), 0, 0, 0, time.time()
    bar = tqdm(total=sum(map(len, batches)), desc=desc, unit="problem", dynamic_ncols=True,
               disable=not master)
    for batch in batches:
        todo = [j for j in batch if key_of(j) not in done]
        saved = ([j.get("completion") for j in todo], [0] * len(todo), [None] * len(todo), 0)
        texts, rounds, cut_off, n = make([j["question"] for j in todo]) if make and todo else saved
        rows = []
        for j, text, k, cut in zip(todo, texts, rounds, cut_off):
            pred, ok, late = grader.grade(text, j["gt"], name)
            rows.append({f: j[f] for f in ("idx", "line", "question", "gt") if f in j})
            rows[-1].update(completion=text, pred=pred, correct=ok, rounds=k, timed_out=late)
            rows[-1].update({} if cut is None else dict(cut_off=cut))  # saved ones: not known
        append_jsonl(part, rows)
        n_tokens, graded = n_tokens + n, graded + len(rows)
        correct += sum(r["correct"] for r in rows)
        bar.update(len(batch))
        bar.set_postfix(acc=f"{100 * correct / max(graded, 1):.1f}%",
                        tok_s=f"{n_tokens / (time.time() - t0):.0f}")
    bar.close()
    barrier()
    rows = merge_parts(rows_path, key_of, keys) if master else {}
    return [rows[k] for k in keys if k in rows], n_tokens

def save_summary(tag_dir, name, rows):
    """One benchmark's totals in summary.json: accuracy, gradings out of time (counted wrong), and
    how many completions ran 0, 1, ..., MAX_ROUNDS programs. -> these totals"""
    path = os.path.join(tag_dir, "summary.json")
    summary = read_json(path) if os.path.exists(path) else {}
    n, correct = len(rows), sum(r["correct"] for r in rows)
    rounds = [sum(r["rounds"] == k for r in rows) for k in range(MAX_ROUNDS + 1)]
    summary[name] = dict(n=n, correct=correct, accuracy=round(100 * correct / max(n, 1), 2),
                         grade_timeouts=sum(r["timed_out"] for r in rows), code_rounds=rounds)
    write_json(path, summary)
    return summary[name]

def print_table(results):
    """results: {tag: {bench: totals}} -> benchmark, n, accuracy (%) per model, 2 models' delta."""
    tags, names = list(results), list(results[next(iter(results))])
    acc = lambda t, b: 100 * results[t][b]["correct"] / max(results[t][b]["n"], 1)  # noqa: E731
    rows = {b: (results[tags[0]][b]["n"], [acc(t, b) for t in tags]) for b in names}
    if len(names) > 1:
        rows["average"] = ("", [sum(a[k] for _, a in rows.values()) / len(names)
                               for k in range(len(tags))])
    width, delta = max(12, *(len(t) + 2 for t in tags)), len(tags) == 2
    head = "".join(t.rjust(width) for t in tags)
    print("benchmark".ljust(14) + "n".rjust(6) + head + "delta".rjust(8) * delta)
    for b, (n, a) in rows.items():
        print(b.ljust(14) + str(n).rjust(6) + "".join(f"{x:.1f}".rjust(width) for x in a)
              + f"{a[-1] - a[0]:+.1f}".rjust(8) * delta)


# -----------------------------------------------------------------------------
# what to evaluate: runs (tag, adapter, the record of what makes its rows) and their problems

def check_flags():
    """The benchmarks of --bench, once every flag makes sense (else one line, exit 2)."""
    names = BENCHMARKS if bench == "all" else [b.strip() for b in bench.split(",") if b.strip()]
    for b in names or [bench]:
        if b not in BENCHMARKS:
            die(f"unknown benchmark {b!r}; choose from {', '.join(BENCHMARKS)} (a comma list), all")
    if limit != "" and not (re.fullmatch("[0-9]+", limit) and int(limit) >= 1):  # "²": isdigit()
        die(f"--limit {limit} must be a whole number ≥ 1 (leave it out to evaluate every problem)")
    if max_new_tokens < 1 or batch_size < 0 or grade_timeout <= 0:
        die("--max-new-tokens must be ≥ 1, --batch-size ≥ 0 (0: sized for the device), "
            "--grade-timeout > 0")
    if completions and len(names) != 1:
        die("--completions grades one benchmark; pass --bench with a single name")
    return names

def saved_runs(name, cut):
    """--completions: one run named after the file, a job per line of it (an idx may repeat)."""
    path, problems = load_benchmark(name)
    by_idx, wanted, jobs = {p["idx"]: p for p in problems}, {p["idx"] for p in problems[:cut]}, []
    for n, row in read_jsonl(completions, "completions file", with_lines=True):
        if "idx" not in row or not isinstance(row.get("completion"), str):
            die(f"{completions}:{n}: a line needs \"idx\" and a string \"completion\", like "
                "{\"idx\": 0, \"completion\": \"... \\\\boxed{18}\"}")
        if check_idx(row["idx"], f"{completions}:{n}") not in by_idx:
            die(f"{completions}:{n}: idx {row['idx']!r} is not a problem of {name} ({path})")
        if row["idx"] in wanted:
            jobs.append(dict(by_idx[row["idx"]], line=n, completion=row["completion"]))
    if not jobs:
        die(f"{completions} holds no completions{f' of the first {cut} problems' if cut else ''}; "
            "write one {\"idx\": ..., \"completion\": ...} per line")
    config = dict(completions=os.path.abspath(completions), grade_timeout=grade_timeout,
                  inputs={completions: fingerprint(completions)})
    tag = os.path.splitext(os.path.basename(completions))[0]
    return [(tag, None, config)], {name: (path, jobs)}

def model_runs(names, cut, dev):
    """The base model (--model, else sample.py's expert) and, with an adapter (--adapter, else
    out/lora if train.py wrote it), base + adapter: their records, the same jobs for both."""
    fix = "it is sample.py's record of the expert; restore it from that run, or pass --model"
    base, default = model or sampled_expert(out_dir, fix), os.path.join(out_dir, "lora")
    adapter_dir = adapter or (default if os.path.isdir(default) else None)
    adapter_dir = None if adapter == "none" else adapter_dir
    if adapter_dir and not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        die(f"{adapter_dir} is not a peft adapter (no adapter_config.json); pass the directory "
            "train.py wrote (out/lora) or --adapter none")
    where = lambda p: os.path.abspath(p) if os.path.isdir(p) else p  # noqa: E731 (a dir, or a hub id)
    name = lambda p: os.path.basename(where(p).rstrip("/"))  # noqa: E731 ("." is its dir's name)
    config = dict(model=where(base), adapter=None, dtype=dtype_name(pick_dtype(dtype, dev)),
                  max_new_tokens=max_new_tokens, code_exec=not no_code_exec, unboxed=unboxed,
                  grade_timeout=grade_timeout, prompt=PROMPT, inputs={base: fingerprint(base)})
    runs = [(name(base), None, config)]
    if adapter_dir:
        run_dir, label = os.path.dirname(os.path.abspath(adapter_dir)), name(adapter_dir)
        if label == "lora" and run_dir != os.path.abspath(out_dir):  # another run's (out_sft/lora)
            label = os.path.basename(run_dir)
        inputs = dict(config["inputs"], **{adapter_dir: fingerprint(adapter_dir)})
        tuned = dict(config, adapter=where(adapter_dir), inputs=inputs)
        runs.append((f"{runs[0][0]}+{label}", adapter_dir, tuned))
    benchmarks = {}
    for b in names:
        path, problems = load_benchmark(b)
        benchmarks[b] = (path, problems[:cut])
    return runs, benchmarks

def open_run(tag_dir, config, benchmarks):
    """Rows resume only if made the same way (README, Resuming a run): common's run record, and
    beside its config the fingerprint of each benchmark file graded against (a benchmark new to
    this directory joins them, so that a later run may add benchmarks)."""
    files = {b: fingerprint(path) for b, (path, _) in benchmarks.items()}
    record = start_run(tag_dir, "run.json", config, glob_rows(tag_dir), "evaluate", benchmarks=files)
    if record is None:  # a fresh directory, its record written with these files
        return
    graded = record.get("benchmarks") if isinstance(record.get("benchmarks"), dict) else {}
    for b, (path, _) in benchmarks.items():
        if graded.get(b, files[b]) != files[b] and glob_rows(tag_dir, b):
            die(f"{tag_dir} holds {b} rows graded against another {b} file than {path} (see its "
                f"run.json); delete {tag_dir} or pass another --out-dir")
    write_json(os.path.join(tag_dir, "run.json"), dict(record, benchmarks={**graded, **files}))

def glob_rows(tag_dir, name="*"):
    return glob.glob(os.path.join(glob.escape(tag_dir), f"{name}.jsonl*"))

def merge_adapter(net, path):
    """The LoRA adapter merged into the weights, as the paper's merge.py does before inference."""
    from peft import PeftModel
    try:
        return PeftModel.from_pretrained(net, path).merge_and_unload().eval()
    except Exception as e:  # a mismatched adapter fails in many ways (sizes, module names, files)
        die(f"cannot apply the adapter {path} to {net.name_or_path}: {first_line(e)}")

def run_costs(adapter_path):
    """What made an adapter (the paper's Figure 1): the totals of train_config.json beside it and
    of the sample_config.json beside its samples (the path train.py recorded, else its run dir).
    None when those records are missing or not complete (an adapter from elsewhere, a run going on).
    """
    try:
        run_dir = os.path.dirname(os.path.normpath(adapter_path))
        trained = peek_json(os.path.join(run_dir, "train_config.json"))
        dirs = [os.path.dirname(trained["config"]["samples"]), run_dir]
        paths = [p for p in (os.path.join(d, "sample_config.json") for d in dirs) if os.path.isfile(p)]
        sampled = peek_json(paths[0] if paths else "")
        t, s = trained["totals"], sampled["totals"]
        select, label = sampled["config"]["select"], trained["config"]["label"]
        method = "SFT" if select == "sft" else "LightReasoner" if (select, label) == ("kl", "contrast") \
            else f"--select {select} --label {label}"
        devices = list(dict.fromkeys([s["device"], t["device"]]))  # one name if the same
        return dict(method=method, sampled=s["questions"], kept=s["questions_kept"],
                    positions=s["kept_positions"], tuned=t["tuned_tokens"], sample_s=s["sampling_time_s"],
                    train_s=t["wall_time_s"], time_s=s["sampling_time_s"] + t["wall_time_s"],
                    device=" / ".join(devices))
    except (OSError, ValueError, KeyError, TypeError):
        return None

def efficiency(eval_dir):
    """A row per tuned model <base>+<adapter> with costs on record and <base> evaluated: its mean
    accuracy and gain over the benchmarks both have, its costs and their ratio to SFT's (if any)."""
    load = lambda *path: peek_json(os.path.join(eval_dir, *path))  # noqa: E731
    accuracy = lambda s, b: 100 * s[b]["correct"] / max(s[b]["n"], 1)  # noqa: E731
    rows = []
    for tag in sorted(t for t in os.listdir(eval_dir) if "+" in t):
        base = tag.rsplit("+", 1)[0]
        try:  # a model without records, or a damaged file, has no row (page and run carry on)
            cost = run_costs(load(tag, "run.json")["config"]["adapter"])
            tuned, before = load(tag, "summary.json"), load(base, "summary.json")
            benches = [b for b in BENCHMARKS if b in tuned and b in before]
            mean = sum(accuracy(tuned, b) for b in benches) / len(benches)
            gain = mean - sum(accuracy(before, b) for b in benches) / len(benches)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
        if cost:
            rows.append(dict(cost, tag=tag, base=base, accuracy=mean, gain=gain, benchmarks=benches))
    for r in rows:
        sft = next((x for x in rows if x["method"] == "SFT" and x["base"] == r["base"]), None)
        r["vs_sft"] = sft and r is not sft and {k: r[k] / sft[k] if sft[k] else None
                                                 for k in ("time_s", "sampled", "tuned")}
    return rows

EFFICIENCY_HEADER = ["model", "method", "accuracy", "gain", "benchmarks", "time = sampling + training",
                     "sampled problems", "kept problems", "kept positions", "tuned tokens", "device"]

def efficiency_cells(r):
    """A row of the table as text: model, method, accuracy, gain, each cost and its ratio to SFT."""
    def hours(s):
        return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"

    def vs(key, text):
        ratio = (r["vs_sft"] or {}).get(key)
        return text + (f" ({ratio:.2f}× SFT)" if ratio is not None else "")
    return [r["tag"], r["method"], f"{r['accuracy']:.1f}", f"{r['gain']:+.1f}", f"{len(r['benchmarks'])}",
            vs("time_s", f"{hours(r['time_s'])} = {hours(r['sample_s'])} + {hours(r['train_s'])}"),
            vs("sampled", f"{r['sampled']:,}"), f"{r['kept']:,}", f"{r['positions']:,}",
            vs("tuned", f"{r['tuned']:,}"), r["device"]]

def print_efficiency(eval_dir):
    """The efficiency table in the terminal (nothing when no tuned model has its run records)."""
    rows = [EFFICIENCY_HEADER] + [efficiency_cells(r) for r in efficiency(eval_dir)]
    widths = [max(len(row[k]) for row in rows) for k in range(len(EFFICIENCY_HEADER))]
    if len(rows) > 1:
        print("\nefficiency: mean accuracy (%), gain over the base model (points), and what each tuned "
              "model cost")
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# -----------------------------------------------------------------------------
# the pages, rebuilt after each run from the files in out/eval alone: report.html (the comparison
# table, the efficiency table, then per benchmark the views a reader wants first, each with its
# count and first SHOWN problems) and <bench>.html (every problem). Everything from data or a model
# goes through esc(); a damaged file or line is left out and the page says so.

SHOWN = 10  # problems of each view shown in report.html (every one is in <bench>.html)
REPORT_CSS = (".models { display: grid; grid-template-columns: repeat(auto-fit, minmax(26em, 1fr)); "
              "gap: 1em; } pre { background: #f6f6f6; padding: 0.5em; } summary { cursor: pointer; } "
              ".ok { color: #070; } .no { color: #b00; } .python, .output { display: block; } "
              ".python { background: #e4ebfa; } .output { background: #e2f2e2; } "
              ".ans { unicode-bidi: bidi-override; direction: ltr; } "
              "details[open] { border-left: 3px solid #ddd; padding-left: 0.6em; }")
MARKS = {"timed_out": "grading timed out", "cut_off": "cut off at the token limit"}  # field: its view

def read_rows(path, notes):
    """The rows of a rows file with an idx and a verdict; how many lines were not goes to notes."""
    if not os.access(path, os.R_OK):
        notes.append(f"{path} cannot be read; its rows are left out")
        return []
    rows, damaged = peek_jsonl(path)
    good = [r for r in rows if isinstance(r.get("idx"), (int, str)) and type(r.get("correct")) is bool]
    if damaged or len(good) < len(rows):
        notes.append(f"{path}: {damaged + len(rows) - len(good)} damaged line(s) left out")
    return good

def load_eval(eval_dir):
    """({tag: summary}, {tag: {bench: rows}}, notes) of each model directory with a summary."""
    summary, rows, notes = {}, {}, []
    for tag in sorted(os.listdir(eval_dir)):
        path = os.path.join(eval_dir, tag, "summary.json")
        if not os.path.isfile(path):
            continue
        s = peek_json(path)
        valid = lambda v: isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float))  # noqa
        if not (isinstance(s, dict) and all(map(valid, s.values()))):
            notes.append(f"{path} is damaged; {tag} is left out")
            continue
        summary[tag] = s
        rows[tag] = {b: read_rows(os.path.join(eval_dir, tag, f"{b}.jsonl"), notes)
                     for b in s if b in BENCHMARKS}
    return summary, rows, notes

def comparison_table(summary, base_of):
    """Accuracy per benchmark and model; in bold a tuned model <base>+<adapter>'s gain over <base>."""
    html = ["<table><tr><th>benchmark</th>" + "".join(f"<th>{esc(t)}</th>" for t in summary) + "</tr>"]
    for b in [b for b in BENCHMARKS if any(b in s for s in summary.values())]:
        html.append(f"<tr><td><a href=\"#{b}\">{b}</a></td>")
        for t in summary:
            s, base = summary[t].get(b), summary.get(base_of.get(t), {}).get(b)
            delta = f" <b>{s['accuracy'] - base['accuracy']:+.1f}</b>" if s and base else ""
            n = f" <span class=muted>n={esc(s.get('n'))}</span>" if s else ""
            html.append(f"<td>{s['accuracy']:.1f}{delta}{n}</td>" if s else "<td></td>")
        html.append("</tr>")
    html.append("</table><p class=muted>accuracy in %; in bold a tuned model's gain over its base, "
                "in points</p>")
    return "\n".join(html)

def efficiency_html(eval_dir):
    """The efficiency table for the report page ("" when no tuned model has its run records)."""
    rows = efficiency(eval_dir)
    cells = lambda row, tag: "<tr>" + "".join(f"<{tag}>{esc(c)}</{tag}>" for c in row) + "</tr>"  # noqa
    body = cells(EFFICIENCY_HEADER, "th") + "".join(cells(efficiency_cells(r), "td") for r in rows)
    return rows and (f"<h2>Efficiency: accuracy gain and what it cost (the paper's Figure 1)</h2>"
                     f"<table>{body}</table><p class=muted>accuracy, gain: means over the benchmarks "
                     "both models have (gain in points, over the base model); time: sampling + "
                     "training wall time (loading models and evaluating not counted); × SFT: this "
                     "cost over the SFT run's of the same base model</p>") or ""

def views(problems, base_of):
    """The views a reader wants first, {title: [idx, ...]}: each tuned model's flips against its
    base, the problems every model got wrong, those whose grading ran out of time, and those with
    a completion cut off at the token limit (written before an answer, mostly)."""
    verdict = lambda p, t: next((r["correct"] for u, r in p if u == t), None)  # noqa: E731 (1st row)
    out = {}
    for tuned, base in base_of.items():
        for was in (True, False):
            title = f"{base} {'right' if was else 'wrong'} → {tuned} {'wrong' if was else 'right'}"
            out[title] = [i for i, p in problems.items()
                          if verdict(p, base) is was and verdict(p, tuned) is (not was)]
    out["wrong for every model"] = [i for i, p in problems.items() if not any(r["correct"] for _, r in p)]
    for field, title in MARKS.items():
        out[title] = [i for i, p in problems.items() if any(r.get(field) for _, r in p)]
    return out

def completion_html(text):
    """A completion as written, its programs and their outputs (```python, ```output) set off."""
    parts = re.split(r"(```(?:python|output)\n.*?```\n?)", text, flags=re.S)  # odd parts: blocks
    html = (f"<span class={p[3:9]}>{esc(p)}</span>" if k % 2 else esc(p) for k, p in enumerate(parts))
    return "<pre>" + "".join(html) + "</pre>"

def problem_html(idx, pairs, anchor=""):
    """One problem, collapsed: each model's answer and verdict beside the ground truth. Open: the
    question, then per model the answer, marks and its completion (collapsed again)."""
    first = pairs[0][1]
    short = lambda x: f"<span class=ans>{esc(str(x)[:40] + '…' * (len(str(x)) > 40))}</span>"  # noqa
    mark = lambda r: "<b class=ok>right</b>" if r["correct"] else "<b class=no>wrong</b>"  # noqa: E731
    head = " · ".join(f"{esc(t)} {short(r.get('pred'))} {mark(r)}" for t, r in pairs)
    html = [f"<details{anchor}><summary>idx {esc(idx)} · ground truth {short(first.get('gt'))} · "
            f"{head}</summary><pre>{esc(first.get('question'))}</pre><div class=models>"]
    for t, r in pairs:
        text, rounds = str(r.get("completion")), r.get("rounds")
        marks = [f"line {esc(r['line'])}"] if "line" in r else []  # saved completions: their line
        marks += [f"{esc(rounds)} program(s) run"] * bool(rounds)
        marks += [m for f, m in MARKS.items() if r.get(f)]
        html.append(f"<div><b>{esc(t)}</b> {mark(r)}: <span class=ans>{esc(r.get('pred'))}</span>, "
                    f"ground truth <span class=ans>{esc(r.get('gt'))}</span> <span class=muted>"
                    f"{' · '.join(marks)}</span><details><summary>completion, {len(text):,} characters"
                    f"</summary>{completion_html(text)}</details></div>")
    return "\n".join(html) + "</div></details>"

def bench_section(b, problems, views):
    """report.html's part for one benchmark: each view, its count and its first SHOWN problems."""
    counts = " · ".join(f"<a href=\"#{b}{k}\">{esc(v)}</a>: {len(ids)}"
                        for k, (v, ids) in enumerate(views.items()))
    html = [f"<h2 id=\"{b}\">{b}: {len(problems)} problems</h2><p>{counts}; every problem in "
            f"<a href=\"{b}.html\">{b}.html</a></p>"]
    for k, (v, ids) in enumerate(views.items()):
        html.append(f"<h3 id=\"{b}{k}\">{b}, {esc(v)}: {len(ids)}</h3>")
        html += [problem_html(i, problems[i]) for i in ids[:SHOWN]]
        if len(ids) > SHOWN:
            more = f"<a href=\"{b}.html#view{k}\">{b}.html</a>"
            html.append(f"<p>… and {len(ids) - SHOWN} more in {more}</p>")
    return "\n".join(html)

def bench_page(b, problems, views):
    """<bench>.html: each view as a list of links, then every problem in the benchmark's order."""
    number = {i: n for n, i in enumerate(problems)}  # anchors p0, p1, ...: an idx may be any string
    html = [f"<p><a href=\"report.html\">report.html</a> · {len(problems)} problems</p>"]
    for k, (v, ids) in enumerate(views.items()):
        links = " ".join(f"<a href=\"#p{number[i]}\">{esc(i)}</a>" for i in ids)
        html.append(f"<h3 id=view{k}>{esc(v)}: {len(ids)}</h3><p>{links}</p>")
    html.append("<h2>every problem</h2>")
    html += [problem_html(i, p, f" id=p{number[i]}") for i, p in problems.items()]
    return page(f"LightReasoner evaluation: {b}", "\n".join(html), css=REPORT_CSS)

def report_page(eval_dir):
    """report.html's text: what was left out, the comparison table, the efficiency table, then each
    benchmark's views (its every problem goes to <bench>.html, written here)."""
    summary, rows, notes = load_eval(eval_dir)
    base_of = {t: t.rsplit("+", 1)[0] for t in summary if t.rsplit("+", 1)[0] in set(summary) - {t}}
    sections = [f"<p class=no>{esc(n)}</p>" for n in notes]
    sections += [comparison_table(summary, base_of), efficiency_html(eval_dir)]
    for b in [b for b in BENCHMARKS if any(b in r for r in rows.values())]:
        have = {t: r[b] for t, r in rows.items() if b in r}  # the models that ran b
        problems = {}  # idx -> [(tag, row), ...]
        for t, rs in have.items():
            for r in rs:
                problems.setdefault(r["idx"], []).append((t, r))
        v = views(problems, {t: base for t, base in base_of.items() if t in have and base in have})
        write_page(os.path.join(eval_dir, f"{b}.html"), lambda: bench_page(b, problems, v))
        sections.append(bench_section(b, problems, v))
    return page("LightReasoner evaluation", "\n".join(sections), css=REPORT_CSS)


# =============================================================================
# APPENDIX: grading as the toolkit does (its parser.py and grader.py, re-written)
#   predict(completion, name, gt) -> the answer the toolkit reads from a completion (or None)
#   math_equal(pred, gt)          -> the toolkit's verdict on it
# Agreement with the toolkit's own labels, measured on tests/data/eval/agreement.jsonl: 498 of 500
# (99.6%; asdiv 39/40, olympiadbench 169/170, the other five all), and 82 of 82 hand-picked cases
# (grading_cases.json); `python -m pytest -q tests/test_evaluate.py -k "agreement or case"` checks
# both. The two misses, and the 25,465 checks those cases come from, are in the README ("How
# grading matches the toolkit", "Where we differ").
# =============================================================================

def predict(completion, name, gt):
    """Cut at stop words, extracted and normalised (twice, as math_eval.py does), then the toolkit's
    multiple-choice repair: a letter ground truth makes it look for a letter in the whole text."""
    code = completion.strip()
    for stop in STOP_WORDS:
        code = code.split(stop)[0].strip()
    pred = None if not code or code == "error" else extract_answer(code, name)
    pred = None if pred is None else normalize(pred, skip_unit=name == "minerva_math")
    if gt in ("A", "B", "C", "D", "E") and pred not in ("A", "B", "C", "D", "E"):
        pred = choice_letter(code)
    elif pred is not None and all(c in "ABCDE" for c in gt) and not all(c in "ABCDE" for c in pred):
        pred = "".join(c for c in pred if c in "ABCDE")
    return pred

def extract_answer(text, name):
    """Last \\boxed{}, else "the answer is ...", else the last number (its parser.py)."""
    if name == "mmlu_stem":
        return choice_letter(text)
    marker = next((m for m in ("he answer is", "final answer is") if m in text), None)
    if "final answer is $" in text and "$. I hope" in text:  # Minerva's answer sentence
        pred = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        pred = last_boxed(text)
    elif marker:  # "The answer is 5", else "final answer is 5"
        pred = text.split(marker)[-1].strip()
    else:  # no marked answer: the last number, commas dropped
        numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred).removeprefix(":")
    pred = pred[:-1] if pred.endswith(".") else pred
    pred = pred[:-1] if pred.endswith("/") else pred
    return normalize(pred, skip_unit=name == "minerva_math")  # Minerva answers keep their units

def last_boxed(text):
    """Content of the last \\boxed{...}, nested braces included. The toolkit splits on the bare word
    'boxed' and, with no brace after it, reads up to the next '$' ("\\boxed 5$")."""
    tail = text.split("boxed")[-1]
    if not tail.startswith("{"):
        return tail.split("$")[0].strip()
    depth = 0
    for i, c in enumerate(tail):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return tail[1:i]
    return tail[1:]

def choice_letter(text):
    """The first A-E after the last "answer is"/"choice is", else the last standalone A-E anywhere
    (the toolkit upper-cases first, so a lone "a" counts too)."""
    if text.count("choice is") > 1 or text.count("answer is") > 1:
        text = text.strip("\n").split("\n\n")[0]  # the toolkit's few-shot guard: the first block
    parts = re.split("choice is|answer is", text.strip("\n"))
    text = parts[-1].strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", text.upper())
    pred = (letters[0] if len(parts) > 1 else letters[-1]) if letters else text.strip().strip(".")
    return pred.rstrip(".").rstrip("/")


# ---- normalisation (the toolkit's strip_string): both sides pass through it before comparing
# Unit words (mostly from MathQA) deleted as whole words, in the toolkit's order, then their plurals.
# They are regular expressions there ("a ." deletes "a" plus any one character), so here too.
UNIT_WORDS = ("east|degree|mph|kmph|ft|m sqaure| m east|sq m|deg|mile|q .|monkey|prime|ratio|"
              "profit of rs|rd|o|gm|p . m|lb|tile|per|dm|lt|gain|ab|way|west|a .|b .|c .|d .|e .|f .|"
              "g .|h .|t|a|h|no change|men|soldier|pie|bc|excess|st|inches|noon|percent|by|gal|kmh|c|"
              "acre|rise|a . m|th|π r 2|sq|mark|l|toy|coin|sq . m|gallon|° f|profit|minw|yr|women|feet|"
              "am|pm|hr|cu cm|square|v â € ™|are|rupee|rounds|cubic|cc|mtr|s|ohm|number|kmph|day|hour|"
              "minute|min|second|man|woman|sec|cube|mt|sq inch|mp|∏ cm ³|hectare|more|sec|unit|cu . m|"
              "cm 2|rs .|rs|kg|g|month|km|m|cm|mm|apple|liter|loss|yard|pure|year|increase|decrease|d|"
              "less|Surface|litre|pi sq m|s .|metre|meter|inch").split("|")
UNIT_RES = [re.compile(r"(^|\W)" + u + r"($|\W)") for u in UNIT_WORDS + [u + "s" for u in UNIT_WORDS]]
ANY_UNIT = re.compile(r"(^|\W)(" + "|".join(UNIT_WORDS) + r")s?($|\W)")  # one search skips them all
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS.update({w: 10 * i for i, w in enumerate(TENS, 2)})
NUMBER_WORDS.update(hundred=100, thousand=1000, million=10**6, billion=10**9)

def normalize(s, skip_unit=False):
    """The toolkit's strip_string, rule for rule and in its order (order matters: units go before
    '\\text{}' is unwrapped, "x=" prefixes before spaces are removed, ...)."""
    s = str(s).strip().replace("\n", "").rstrip(".").replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)  # every matrix becomes a pmatrix
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s).replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    t = re.sub(r"\\text{.*?}$", "", s).strip()  # a trailing \text{...} is a unit: "5\text{ cm}"
    s = t or s
    if not skip_unit and ANY_UNIT.search(s):
        for _ in range(2):
            for unit in UNIT_RES:
                s = unit.sub(r"\1\2", s) or s  # never let a unit rule empty the answer
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")  # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = words_to_number(s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for prefix in ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"):
        s = s.replace(prefix, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")  # percentages compare as plain numbers (see below)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    s = s if "\\infty" in s else s.replace("inf", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")  # "1 and 2" -> "1 2" (also inside words)
    s = re.sub(r"\\mbox{.*?}", "", s)
    s = s.replace("j", "i") if "j" in s and "i" not in s else s  # engineers' imaginary unit
    # "2.0" -> "2", "3.00x" -> "3x"; (?<!\d) starts at a run of digits only: the toolkit's
    # pattern is the same without it, and quadratic in the length of a run (40,000 digits: 74 s)
    s = re.sub(r"(?<!\d)(\d+)\.0*([^\d])", r"\1\2", s)
    s = re.sub(r"(?<!\d)(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "k = 5" -> " 5"
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    return fix_slash(fix_fracs(s.replace(" ", "")))

def words_to_number(text):
    """The toolkit's word2number reads the number words anywhere in the string, ignoring the others
    ("two apples" -> "2", "one point five" -> "1.5"). We read them the usual way; its slips on odd
    orders ("twenty one hundred" is 120 there, 2100 here) and refusals are not kept (README)."""
    s = text.replace("-", " ").lower()
    if s.isdigit():
        return str(int(s)) if len(s) < 4000 else text  # "007" -> "7" (int() refuses huge numbers)
    words = [w for w in s.split() if w in NUMBER_WORDS or w == "point"]
    if not words or words.count("point") > 1:
        return text
    whole, _, decimals = " ".join(words).partition("point")
    total = part = 0
    for value in (NUMBER_WORDS[w] for w in whole.split()):
        if value >= 1000:  # "two hundred thousand": the part so far times a thousand
            total, part = total + max(part, 1) * value, 0
        else:  # "two hundred" is 2 * 100, "twenty one" is 20 + 1
            part = max(part, 1) * value if value == 100 else part + value
    digits = [NUMBER_WORDS[w] for w in decimals.split()]  # "point one five" -> .15
    fraction = float("0." + "".join(map(str, digits))) if digits and max(digits) < 10 else 0
    return str(total + part + fraction)

def fix_fracs(s):
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; with under two characters after a
    \\frac the toolkit leaves the whole string as it is."""
    if re.search(r"\\frac(?!\{).?(\\frac|$)", s):
        return s
    braced = lambda m: "\\frac{" + m[1] + "}" + (m[2] if m[2] == "{" else "{" + m[2] + "}")  # noqa
    return re.sub(r"\\frac([^{])(.)", braced, s)

def fix_slash(s):
    """'3/4' -> '\\frac{3}{4}' when both sides are integers written plainly (or contain sqrt)."""
    parts = s.split("/")
    if len(parts) == 2 and all("sqrt" in x or re.fullmatch(r"-?[1-9][0-9]*|0", x) for x in parts):
        return "\\frac{%s}{%s}" % tuple(parts)
    return s


# ---- equivalence (the toolkit's grader.py): strings, numbers, structures, then sympy

def math_equal(pred, gt):
    """In the toolkit's order: same string, same number (the ground truth also read as a
    percentage: x/100, x, 100x; relative tolerance 1e-4), same text without brackets, element-wise
    tuples/intervals and matrices, equations, and finally symbolic equality with sympy."""
    if pred is None:
        return False
    if pred.strip().lower() == gt.strip().lower():
        return True
    p, g = to_float(pred), to_float(gt)
    if p is not None and g is not None:  # two numbers: decided here, never by sympy
        return any(math.isclose(x, p, rel_tol=1e-4) for x in (g / 100, g, g * 100))
    if not pred:
        return False
    pred, gt = pred.strip(), gt.strip()
    p, g = pred, gt
    if (pred.startswith("[") and pred.endswith("]") and not gt.startswith("(")) or \
            (pred.startswith("(") and pred.endswith(")") and not gt.startswith("[")):
        p, g = p.strip("[]()"), g.strip("[]()")  # an interval's bracket type does not count...
    if re.sub(r"[{}()]", "", p).lower() == re.sub(r"[{}()]", "", g).lower():
        return True  # ...and neither do braces and parentheses
    list_re = r"(\(|\[).+(\)|\])"
    if re.match(list_re, pred) and re.match(list_re, gt):  # tuples and intervals, element-wise
        ps, gs = pred[1:-1].split(","), gt[1:-1].split(",")
        if len(ps) == len(gs) and all(math_equal(a, b) for a, b in zip(ps, gs)):
            return True
    pm, gm = matrix_cells(pred), matrix_cells(gt)
    if pm is not None and gm is not None and len(pm) == len(gm) and all(
            len(a) == len(b) and all(math_equal(x, y) for x, y in zip(a, b)) for a, b in zip(pm, gm)):
        return True
    if pred.count("=") == 1 and gt.count("=") == 1:  # two equations: equal up to sign
        dp, dg = ("{} - ({})".format(*(x.strip() for x in e.split("="))) for e in (pred, gt))
        if symbolic_equal(dp, dg) or symbolic_equal(f"-({dp})", dg):
            return True
    elif pred.count("=") == 1 and len(pred.split("=")[0].strip()) <= 2 and "=" not in gt:
        if math_equal(pred.split("=")[1], gt):  # "k=5" against "5"
            return True
    elif gt.count("=") == 1 and len(gt.split("=")[0].strip()) <= 2 and "=" not in pred:
        if math_equal(pred, gt.split("=")[1]):
            return True
    return symbolic_equal(pred, gt)

def to_float(s):
    """A plain number ("1,234.5", "12%" -> 0.12, "12\\%" too), else None."""
    s = str(s).replace(",", "")
    percent = s.endswith("%")
    try:
        return float(s[:-1].removesuffix("\\") if percent else s) / (100 if percent else 1)
    except ValueError:
        return None

def matrix_cells(s):
    """Rows of cells of a pmatrix/bmatrix, or None when s is not one."""
    if not (s.startswith(("\\begin{pmatrix}", "\\begin{bmatrix}"))
            and s.endswith(("\\end{pmatrix}", "\\end{bmatrix}"))):
        return None
    body = s[len("\\begin{pmatrix}"):-len("\\end{pmatrix}")]
    rows = [r.strip() for r in body.split("\\\\") if r.strip()]
    return [r.split("&") for r in rows]

def symbolic_equal(a, b):
    """Both sides read into sympy (read_math): same printout, simplify(a - b) == 0, same equation,
    or the same number to 1e-4. What cannot be read stays a string and only equals the same string
    (the toolkit would hand it to sympy's eval-based sympify; we never do)."""
    a, b = read_math(a), read_math(b)
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    checks = (lambda: str(a) == str(b) or a == b,
              lambda: a.equals(b) or sympy.simplify(a - b) == 0,
              lambda: abs(a.lhs - a.rhs).equals(abs(b.lhs - b.rhs)),
              lambda: math.isclose(float(sympy.N(b)), float(sympy.N(a)), rel_tol=1e-4))
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # an undecidable or ill-typed comparison is no verdict (as in the toolkit)
            pass
    return False


# ---- reading an answer into sympy. The toolkit tries sympy's parse_latex, then parse_expr, which
# runs the text as Python (a model's answer could create files). Our own small parser builds sympy
# objects from a fixed vocabulary: numbers, letters, \commands as symbols, + - * / : ^ ! |x|
# \lfloor \lceil, \frac \sqrt and a list of functions. Anything else is not math and stays a
# string, as in the toolkit when its parsers fail. parse_latex's quirks that change verdicts are
# kept ("quirk"); the first: it reads the longest prefix that parses ("2,3" is 2, "10{,}000" is 10).

JOIN_DIGITS = re.compile(r"(?<=\d)(?:\s|\\[,:;! ])+(?=\d)")  # quirk: "15\,840", "2 3" are one number
TOKEN = re.compile(r"(?P<skip>(?:\s|\\[,:;! ]|\\(?:left|right|quad|qquad|displaystyle)(?![a-zA-Z]))+)"
                   r"|(?P<num>\d+(?:,\d{3})*(?:\.\d*)?)|\\[a-zA-Z]+|\\[{}]|[a-zA-Z]"
                   r"|[-+*/^_!()\[\]{}|=<>:,.']|(?P<bad>.)", re.ASCII | re.DOTALL)
FUNCTIONS = dict(arcsin=sympy.asin, arccos=sympy.acos, arctan=sympy.atan, ln=sympy.log,
                 **{f: getattr(sympy, f) for f in "sin cos tan csc sec cot sinh cosh tanh exp log".split()})
RELATIONS = {"=": sympy.Eq, "<": sympy.Lt, ">": sympy.Gt, "\\le": sympy.Le, "\\leq": sympy.Le,
             "\\ge": sympy.Ge, "\\geq": sympy.Ge, "\\neq": sympy.Ne}  # quirk: "\ne" is a symbol
TIMES, DIVIDE = ("*", "\\times", "\\cdot"), ("/", "\\div", ":")  # quirk: "3:4" is 3/4
GROUPS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}", "|": "|", "\\lfloor": "\\rfloor",
          "\\lceil": "\\rceil"}
BRACKET_FUNCTIONS = {"|": sympy.Abs, "\\lfloor": sympy.floor, "\\lceil": sympy.ceiling}
NOT_SYMBOLS = {"frac", "dfrac", "sqrt", "binom", "times", "cdot", "div", "int", "sum", "lim", "to", "begin",
               "lfloor", "rfloor", "lceil", "rceil"} | set(FUNCTIONS)

class NotMath(ValueError): pass  # not math we read: the answer stays a string
class NoMatch(NotMath): pass  # a rule does not match here: an optional part just ends (see maybe)

def read_math(s):
    """s as a sympy object, or s itself when it is not math we read (tried with '\\\\' made '\\'
    first, as the toolkit does)."""
    for text in (s.replace("\\\\", "\\"), s):
        try:
            return MathReader(text).relation()
        except Exception:  # NotMath, or sympy refusing what we built (deep nesting: RecursionError)
            pass
    if re.fullmatch(r"\{[-.,0-9a-zA-Z]+\}", s):  # quirk: parse_expr reads "{1,2}" as a set: "{2,1}"
        items = [read_math(x) for x in s[1:-1].split(",")]
        if not any(isinstance(x, str) for x in items):
            return sympy.FiniteSet(*items)
    return s

class MathReader:
    """Recursive descent, one method per rule of parse_latex's grammar (sympy's LaTeX.g4):
    relation > expr (+ -) > term (* / :) > unary (signs; side by side is times) > factor (^ !)
    > comp (brackets, |x|, functions) > atom (numbers, \\frac, \\sqrt, symbols)."""

    def __init__(self, text):  # tokens; None where the lexer fails: "$", "~", "&", "2." ...
        self.toks = [None if m["bad"] or (m["num"] or "").endswith(".") else m[0]
                     for m in TOKEN.finditer(JOIN_DIGITS.sub("", text)) if not m["skip"]]
        self.pos = 0

    def peek(self, k=0):
        t = self.toks[self.pos + k] if self.pos + k < len(self.toks) else ""
        if t is None:
            raise NotMath()  # quirk: the lexer's error is fatal once the parser looks that far
        return t

    def eat(self, t=None):
        if self.peek() == "" or t is not None and self.peek() != t:
            raise NoMatch()
        self.pos += 1
        return self.toks[self.pos - 1]

    def maybe(self, rule, *args):  # an optional part: if it does not parse, it is not there
        start = self.pos
        try:
            return rule(*args)
        except NoMatch:
            self.pos = start

    def relation(self):  # unlike + or *, a relation must be complete ("x=" is not read)
        lhs = self.expr()
        while self.peek() in RELATIONS:
            lhs = RELATIONS[self.eat()](lhs, self.expr())
        return lhs

    def chain(self, ops, operand, combine):  # "2+" is 2: an operator with no operand ends it
        lhs = operand()
        while self.peek() in ops and (op_rhs := self.maybe(lambda: (self.eat(), operand()))):
            lhs = combine(lhs, *op_rhs)
        return lhs

    def expr(self):
        neg = lambda b: -1 * b if b.is_Atom else sympy.Mul(-1, b, evaluate=False)
        add = lambda a, op, b: sympy.Add(a, b if op == "+" else neg(b), evaluate=False)  # noqa: E731
        return self.chain(("+", "-"), self.term, add)

    def term(self, nofunc=False):
        inv = lambda b: sympy.Pow(b, -1, evaluate=False)
        return self.chain(TIMES + DIVIDE, lambda: self.unary(nofunc),
                          lambda a, op, b: sympy.Mul(a, b if op in TIMES else inv(b), evaluate=False))

    def unary(self, nofunc=False):
        if self.peek() in ("+", "-"):
            return self.unary(nofunc) if self.eat() == "+" else -self.unary(nofunc)
        items = [self.factor(nofunc)]
        while (item := self.maybe(self.factor, nofunc)) is not None:
            items.append(item)
        out = items.pop()
        while items:  # Mul(a, Mul(b, c)), as parse_latex builds it
            out = sympy.Mul(items.pop(), out, evaluate=False)
        return out

    def factor(self, nofunc):
        e = self.comp(nofunc)
        while self.peek() == "^" and (p := self.maybe(self.script)) is not None:
            e = sympy.Pow(e, p, evaluate=False)
        while self.peek() == "!":
            e = sympy.factorial((self.eat(), e)[1], evaluate=False)
        return e

    def script(self):  # ^ or _, then {an expression} or one letter, number, \symbol ("x^ab": x^a b)
        self.eat()
        return self.braced() if self.peek() == "{" else self.atom(nofunc=True)

    def braced(self):
        return (self.eat("{"), self.expr(), self.eat("}"))[1]

    def comp(self, nofunc):
        t = self.peek()
        if t in GROUPS:
            e = (self.eat(), self.expr(), self.eat(GROUPS[t]))[1]
            return BRACKET_FUNCTIONS[t](e, evaluate=False) if t in BRACKET_FUNCTIONS else e
        if t[1:] in FUNCTIONS and t[0] == "\\" and not nofunc:
            return self.function(self.eat()[1:])
        return self.atom(nofunc)

    def function(self, name):  # \sin x, \sin^2(x), \log_{2} 8, \ln x
        scripts = {}
        while self.peek() in ("_", "^") and self.peek() not in scripts:
            scripts.update([(self.peek(), self.script())])  # (the key is read before script() moves)
        arg = self.maybe(lambda: (self.eat("("), self.expr(), self.eat(")"))[1]) if self.peek() == "(" else None
        if arg is None:  # "\sin 2x" is sin(2x); "\sin x \cos x" a product
            arg = self.term(nofunc=True)
        f = sympy.log(arg, scripts.get("_", sympy.E), evaluate=False) if name in ("log", "ln") else \
            FUNCTIONS[name](arg, evaluate=False)  # quirk: \log is natural
        return sympy.Pow(f, scripts["^"], evaluate=False) if "^" in scripts else f

    def atom(self, nofunc=False):
        t = self.eat()
        if t[:1].isdigit():  # "1,000" is 1000 ("2." is no number: the lexer fails on it, above)
            digits = t.replace(",", "")
            return sympy.Float(digits) if "." in t else sympy.Integer(int(digits))
        if t in ("\\frac", "\\dfrac"):
            top, inverse = self.braced(), sympy.Pow(self.braced(), -1, evaluate=False)
            return inverse if top == 1 else sympy.Mul(top, inverse, evaluate=False)
        if t == "\\sqrt":
            root = (self.eat(), self.expr(), self.eat("]"))[1] if self.peek() == "[" else None
            base = self.braced()
            if root is None:
                return sympy.sqrt(base, evaluate=False)
            return sympy.root(base, root, evaluate=False)
        if t == "\\infty":
            return sympy.oo
        if not (t[:1].isalpha() or t[:1] == "\\" and t[1:].isalpha() and t[1:] not in NOT_SYMBOLS):
            raise NoMatch()  # an operator or a closing bracket: no atom here
        name = t.lstrip("\\")  # quirk: \pi, \alpha, \text, \mathrm... are symbols (\pi is no 3.14)
        if self.peek() == "_":
            name += "_{" + str(self.script()) + "}"
        if self.peek() == "(" and not nofunc and (args := self.maybe(self.call_args)) is not None:
            return sympy.Function(name)(*args)  # quirk: "f(x)" and "x(x+1)" are function calls
        return sympy.Symbol(name)

    def call_args(self):
        args = [(self.eat("("), self.expr())[1]]
        while self.peek() == ",":
            args.append((self.eat(), self.expr())[1])
        self.eat(")")
        return args


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    names = check_flags()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork grading workers
    grader = Grader(grade_timeout)  # forks its worker now, before anything touches CUDA
    if not no_code_exec and not completions:
        choose_code_box()
    dev = init_distributed(device)
    batch_size = batch_size or (64 if dev.startswith("cuda") else 16)
    t_start, eval_dir, cut = time.time(), os.path.join(out_dir, "eval"), int(limit) if limit else None
    runs, benchmarks = saved_runs(names[0], cut) if completions else model_runs(names, cut, dev)
    if not completions:  # loaded first: a model that does not load leaves no record behind
        tok = load_tokenizer(runs[0][2]["model"])
        net = load_model(runs[0][2]["model"], dev, pick_dtype(dtype, dev))
        stop_ids = stop_token_ids(tok, net)
    for tag, _, config in runs:  # every model's record checked before the first row is made
        if master:
            open_run(make_dir(os.path.join(eval_dir, tag)), config, benchmarks)
    barrier()

    # ---- generate (or take) the completions, grade them, write rows and totals, model by model
    results, n_tokens = {}, 0
    for tag, adapter_path, _ in runs:  # base, then tuned: the merge changes the weights in place
        if adapter_path:
            net = merge_adapter(net, adapter_path)
        make = None if completions else functools.partial(solve, net, tok, stop_ids)  # this model
        tag_dir = os.path.join(eval_dir, tag)
        for name in names:
            rows_path = os.path.join(tag_dir, f"{name}.jsonl")
            rows, n = run_jobs(name, benchmarks[name][1], rows_path, grader, f"{tag} {name}", make)
            n_tokens += n
            if master:
                results.setdefault(tag, {})[name] = save_summary(tag_dir, name, rows)
        if master:
            finish_run(tag_dir, "run.json", read_json(os.path.join(tag_dir, "summary.json")))
    grader.close()
    n_tokens, timeouts = map(int, sum_over_ranks([n_tokens, grader.timeouts], dev))
    wall = time.time() - t_start
    if master:
        print_table(results)
        print_efficiency(eval_dir)
        speed = f", {n_tokens} tokens generated ({n_tokens / wall:.1f} tokens/s)"
        print(f"{len(runs)} model(s) x {len(names)} benchmark(s) in {wall:.0f}s{'' if completions else speed}; "
              f"{timeouts} answer(s) whose grading ran out of time (counted wrong); rows, summary.json and "
              f"the pages (report.html) in {eval_dir}")
        write_page(os.path.join(eval_dir, "report.html"), lambda: report_page(eval_dir))
    barrier()  # all processes end together, after rank 0's files and page (Gloo's exit can abort)
