"""
Stage 3 (evaluate.py) as a run: generation with the toolkit's code-execution rounds, the executor,
the one grading/writing path (resume, several processes), the merged adapter, and every mistake a
user can make ending in one line. The grader is tested in test_evaluate.py, the pages in
test_evaluate_page.py.
"""
import contextlib
import html.parser
import importlib.util
import json
import multiprocessing
import os
import runpy
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import GSM8K_FIXTURE, ROOT, run_script, run_torchrun

sys.path.insert(0, ROOT)  # our evaluate.py, not a package of the same name
import common  # noqa: E402
import evaluate as E  # noqa: E402
EVAL_DATA = os.path.join(ROOT, "tests", "data", "eval")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper


def run_inprocess(args, capsys, monkeypatch):
    """evaluate.py's command line in this process (fast: torch is already imported) -> (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, args)])
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the runs it is compared with (one thread each)
    try:
        runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
        common.release_locks()  # the run's out-dir locks, released as its process would at exit
    return code, capsys.readouterr().err


def rows_of(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# -----------------------------------------------------------------------------
# one tiny model, base and base + adapter, in one process and under torchrun with two


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """The same evaluation (base + out/lora, two benchmarks, 3 problems, batches of 2) run by one process
    and by two under torchrun (one thread each, so the arithmetic is the same), and the merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = tmp_path_factory.mktemp("eval_runs")
    torch.manual_seed(0)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["expert"]),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for out in ("one", "two"):
        tuned.save_pretrained(root / out / "lora")  # where train.py writes it: picked up by default
    tuned.merge_and_unload().save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(tiny_models["expert"]).save_pretrained(root / "merged")
    args = ["--model", tiny_models["expert"], "--bench", "gsm8k,mmlu_stem", "--data-dir", EVAL_DATA,
            "--limit", 3, "--max-new-tokens", 8, "--batch-size", 2]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        one = run_script("evaluate.py", *args, "--out-dir", root / "one")
    two = run_torchrun("evaluate.py", *args, "--out-dir", root / "two")
    return SimpleNamespace(root=root, args=args, one=one, two=two, expert=tiny_models["expert"])


def test_base_and_merged_adapter_rows_summary_and_table(runs):
    base, tuned = runs.root / "one" / "eval" / "expert", runs.root / "one" / "eval" / "expert+lora"
    for tag_dir in (base, tuned):
        for name in ("gsm8k", "mmlu_stem"):
            rows = rows_of(tag_dir / f"{name}.jsonl")
            assert [r["idx"] for r in rows] == [0, 1, 2]
            assert set(rows[0]) == {"idx", "question", "gt", "completion", "pred", "correct", "rounds", "timed_out",
                                    "cut_off"}
        summary = json.load(open(tag_dir / "summary.json"))
        assert summary["gsm8k"]["n"] == 3 and summary["gsm8k"]["code_rounds"] == [3, 0, 0, 0, 0]
        assert summary["gsm8k"]["grade_timeouts"] == 0
    run = json.load(open(tuned / "run.json"))["config"]
    assert run["model"] == runs.expert and run["adapter"] == str(runs.root / "one" / "lora") and run["code_exec"]
    assert run["dtype"] == "float32" and run["grade_timeout"] == 3.0 and len(run["inputs"]) == 2  # model, adapter
    assert json.load(open(tuned / "run.json"))["totals"] == json.load(open(tuned / "summary.json"))
    header = next(line for line in runs.one.stdout.splitlines() if line.startswith("benchmark"))
    assert "expert" in header and "expert+lora" in header and "delta" in header
    completions = lambda d: [r["completion"] for r in rows_of(d / "gsm8k.jsonl")]  # noqa: E731
    assert completions(base) != completions(tuned)  # the adapter changes what the model writes
    assert not [f for f in os.listdir(base) if ".rank" in f]  # part files merged and gone


def test_the_run_writes_its_pages_and_counts_completions_cut_off_at_the_token_limit(runs):
    eval_dir = runs.root / "one" / "eval"
    rows = [r for t in ("expert", "expert+lora") for r in rows_of(eval_dir / t / "gsm8k.jsonl")]
    cut = len({r["idx"] for r in rows if r["cut_off"]})
    assert cut >= 1  # 8 new tokens: a random model's greedy completions run out of them
    assert f"gsm8k, cut off at the token limit: {cut}</h3>" in open(eval_dir / "report.html").read()
    assert open(eval_dir / "gsm8k.html").read().count("<details id=p") == 3  # every problem


def test_two_processes_under_torchrun_give_the_same_rows_and_summary(runs):
    for tag in ("expert", "expert+lora"):
        for f in ("gsm8k.jsonl", "mmlu_stem.jsonl", "summary.json", "run.json"):
            one, two = (open(runs.root / d / "eval" / tag / f).read() for d in ("one", "two"))
            assert one == two.replace(str(runs.root / "two"), str(runs.root / "one")), (tag, f)
    assert runs.two.stdout.count("benchmark ") == 1  # only rank 0 prints the table
    assert "expert+lora" in runs.two.stdout and not [f for f in os.listdir(runs.root / "two" / "eval" / "expert") if ".rank" in f]


def test_saved_completions_are_dealt_out_in_batches_and_merged_in_file_order(tmp_path, monkeypatch):
    """--completions under torchrun, one rank after the other: batch k goes to rank k mod 2, each writes
    its part file, rank 0 merges; the rows are a single process's."""
    jobs = [dict(idx=n % 3, line=n, question="q", gt=str(n % 2), completion=f"\\boxed{{{n % 2 + n // 6}}}")
            for n in range(1, 8)]
    grader = E.Grader(5.0)
    monkeypatch.setattr(E, "batch_size", 2)
    single = E.run_jobs("gsm8k", jobs, str(tmp_path / "one.jsonl"), grader, "one")[0]
    assert [r["line"] for r in single] == list(range(1, 8)) and [r["correct"] for r in single] == [True] * 5 + [False] * 2
    for module in (E, common):  # common names the part files
        monkeypatch.setattr(module, "WORLD_SIZE", 2)
    for rank in (1, 0):
        for module in (E, common):
            monkeypatch.setattr(module, "RANK", rank)
        monkeypatch.setattr(E, "master", rank == 0)
        E.run_jobs("gsm8k", jobs, str(tmp_path / "two.jsonl"), grader, "two")
        if rank == 1:  # batches 1 and 3: lines 3, 4 and 7
            assert [r["line"] for r in rows_of(tmp_path / "two.jsonl.rank1")] == [3, 4, 7]
    grader.close()
    assert open(tmp_path / "two.jsonl").read() == open(tmp_path / "one.jsonl").read()
    assert not os.path.exists(tmp_path / "two.jsonl.rank1") and not os.path.exists(tmp_path / "two.jsonl.rank0")


def test_tuned_model_is_evaluated_merged_like_a_saved_merged_model(runs, capsys, monkeypatch):
    out = runs.root / "merged_out"
    code, err = run_inprocess(["--model", runs.root / "merged", "--adapter", "none", *runs.args[2:], "--out-dir", out],
                              capsys, monkeypatch)
    assert code == 0, err
    for name in ("gsm8k", "mmlu_stem"):
        merged, tuned = rows_of(out / "eval" / "merged" / f"{name}.jsonl"), rows_of(runs.root / "one" / "eval" / "expert+lora" / f"{name}.jsonl")
        assert merged == tuned


def test_resume_folds_in_part_files_a_killed_run_left(runs, capsys, monkeypatch):
    """A run of two processes killed mid-way left rows in the main file, in a part file (half a line at
    its end) and none for a problem: one process picks up exactly the missing work."""
    out = runs.root / "resumed"
    shutil.copytree(runs.root / "one" / "eval", out / "eval", ignore=shutil.ignore_patterns(".*.lock"))
    rows_path = out / "eval" / "expert" / "gsm8k.jsonl"
    lines = open(rows_path).read().splitlines(keepends=True)
    open(rows_path, "w").write(lines[0])
    open(f"{rows_path}.rank1", "w").write(lines[2] + lines[1][:25])
    (out / "sample_config.json").write_text(json.dumps({"config": {"expert": runs.expert}}))  # no --model: this expert
    code, err = run_inprocess([*runs.args[2:], "--adapter", "none", "--out-dir", out], capsys, monkeypatch)
    assert code == 0, err
    assert open(rows_path).read() == "".join(lines) and not os.path.exists(f"{rows_path}.rank1")
    page = open(out / "eval" / "report.html").read()
    assert "<th>expert</th><th>expert+lora</th>" in page  # the page shows every model in out/eval


# -----------------------------------------------------------------------------
# the toolkit's code-execution rounds, with a stub model that reads its prompt


class CharTokenizer:
    """One id per character, so a stub model sees exactly the text it is given."""
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def stub_model(monkeypatch, reply, context=10**6):
    """E.generate replaced by reply(prompt text) -> completion text; returns the list of calls."""
    calls = []

    def generate(net, tok, prompts, stop_ids, budgets):
        texts = ["".join(map(chr, p)) for p in prompts]
        calls.append((texts, budgets))
        outs = [reply(t) for t in texts]
        return outs, sum(budgets), [len(o) >= b for o, b in zip(outs, budgets)]  # one token per character
    monkeypatch.setattr(E, "generate", generate)
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context)), calls


def test_a_turn_ending_on_code_runs_it_appends_the_output_and_generation_goes_on(monkeypatch):
    def reply(prompt):
        if "product" in prompt and "```output" not in prompt:
            return "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```\n\n"
        return "So the answer is \\boxed{42}." if "product" in prompt else "It is \\boxed{2}.\n```python\nprint(1)\n```"
    net, calls = stub_model(monkeypatch, reply)
    texts, rounds, *_ = E.solve(net, CharTokenizer(), [0], ["What is the product of 6 and 7?", "1+1?"])
    assert texts[0] == "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```\n```output\n42\n```\nSo the answer is \\boxed{42}."
    assert texts[1] == "It is \\boxed{2}.\n```python\nprint(1)\n```"  # a boxed answer: no code is run
    assert rounds == [1, 0] and len(calls) == 2 and len(calls[1][0]) == 1  # only the first goes on
    assert calls[1][0][0] == E.PROMPT.format(question="What is the product of 6 and 7?") + texts[0].split("So the")[0]


def test_four_rounds_at_most_then_the_toolkits_limit_line(monkeypatch):
    net, calls = stub_model(monkeypatch, lambda prompt: "```python\nprint(len('" + "x" * prompt.count("```output") + "'))\n```")
    texts, rounds, *_ = E.solve(net, CharTokenizer(), [0], ["loop"])
    assert rounds == [4] and len(calls) == 4
    assert texts[0].endswith("```\n```output\n3\n```\n\nReach max function call limit.")


def test_no_code_exec_grades_the_completion_as_it_stands(monkeypatch):
    net, calls = stub_model(monkeypatch, lambda prompt: "```python\nprint(42)\n```")
    monkeypatch.setattr(E, "no_code_exec", True)
    assert E.solve(net, CharTokenizer(), [0], ["q"])[:2] == (["```python\nprint(42)\n```"], [0]) and len(calls) == 1


def test_every_call_may_write_max_new_tokens_within_the_models_context(monkeypatch):
    prompt = E.PROMPT.format(question="q")
    net, calls = stub_model(monkeypatch, lambda p: "```python\nprint(1)\n```", context=len(prompt) + 40)
    texts, rounds, cut_off, _ = E.solve(net, CharTokenizer(), [0], ["q"])
    # 22 characters of code and 17 of output: 1 left for the second call, none for a third
    assert [budgets for _, budgets in calls] == [[40], [1]] and rounds == [2] and cut_off == [True]


def test_a_completion_that_writes_its_whole_budget_is_marked_cut_off(tiny_models):
    tok, net = E.load_tokenizer(tiny_models["expert"]), E.load_model(tiny_models["expert"], "cpu", torch.float32)
    prompts = [tok("Janet has 3 ducks")["input_ids"], tok("2 + 2")["input_ids"]]
    texts, n, cut_off = E.generate(net, tok, prompts, [], [5, 3])  # no stop token: each runs to its budget
    assert cut_off == [True, True] and n == 8
    every_token = list(range(net.config.vocab_size))
    texts, n, cut_off = E.generate(net, tok, prompts, every_token, [5, 3])  # the first token stops it
    assert cut_off == [False, False] and n == 0 and texts == ["", ""]


def test_out_of_memory_ends_in_one_line_naming_the_flag(monkeypatch, capsys):
    def generate(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(E, "generate", generate)
    with pytest.raises(SystemExit) as e:
        E.solve(SimpleNamespace(config=SimpleNamespace()), CharTokenizer(), [0], ["q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--batch-size" in err


# -----------------------------------------------------------------------------
# the executor: the toolkit's program extraction and report, in a separate process


def test_program_extraction_follows_the_toolkits_trajectory():
    text = ("prompt\n```python\nimport math\nfrom sympy import S\nx = 1/0\n```\n```output\nZeroDivisionError: division by zero\n```\n"
            "Again.\n```python\ny = 2\nprint(y)\n```\n```output\n2\n```\nLast.\n```python\nprint(y + 1)\n```")
    assert E.extract_program(text) == "import math\nfrom sympy import S\ny = 2\n\nprint(y + 1)\n"
    assert E.extract_program("```python\n```python\n```") == "raise ValueError('Invalid trajectory')"
    assert E.extract_program("no code") == ""


@pytest.mark.parametrize("program,expected", [
    ("x = 6 * 7\nprint(x)", "42"),
    ("x = 6 * 7\nx + 1", "43"),  # no print on the last line: its value
    ("print()", "Done"),  # nothing printed: the report
    ("print(y)", "NameError: name 'y' is not defined"),  # the last line of the traceback
    ("x = input()\nprint(x)", "RuntimeError"),  # the toolkit refuses input()
    ("if __name__ == '__main__':\n    print(1)", "Done"),  # globals start empty: __name__ is "builtins"
    ("print('a' * 1000)", "a" * 200 + "..." + "a" * 200),
    ("(i for i in range(3))", "TypeError: cannot pickle 'generator' object"),
])
def test_the_executor_reports_what_the_toolkits_does(program, expected):
    assert E.run_program(program) == expected


def test_a_program_that_hangs_crashes_or_floods_costs_one_answer(monkeypatch):
    monkeypatch.setattr(E, "CODE_TIMEOUT", 0.5)
    monkeypatch.setattr(E, "CODE_MEMORY", 256 << 20)
    assert E.run_program("while True:\n    pass\nprint(1)") == "timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'"
    assert E.run_program("while True:\n    pass") == "IndentationError: expected an indented block after 'while' statement on line 1"
    stuck = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\nprint(1)"
    assert E.run_program(stuck) == "Timeout Error"  # deaf to its alarm (as in C code): killed from outside
    assert E.run_program("import ctypes\nprint(ctypes.string_at(0))").startswith("RuntimeError: the program ended")
    assert E.run_program("import os\nwhile True: os.write(1, b'x' * 65536)\nprint(1)").startswith("RuntimeError: the program ended")
    assert E.run_program("while True: print('x' * 10**8)") == "MemoryError"
    assert E.run_program("open('f', 'w').write('x')\nprint(1)") == "1" and not os.path.exists("f")  # in a temporary dir


# -----------------------------------------------------------------------------
# the code box: what a program may not do, in the box (Linux namespaces) and under the guard (--unboxed)

LINUX = pytest.mark.skipif(sys.platform != "linux", reason="the box needs Linux user namespaces")


def leftovers(mark):
    """Live processes (anywhere on the machine) that named themselves `mark`, or "pid N"'s."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = open(f"/proc/{pid}/stat").read()
            found += [pid] if (f"({mark})" in stat or mark == f"pid {pid}") and ") Z " not in stat else []
    return found


NAME = "import ctypes, os\nctypes.CDLL(None).prctl(15, b'MARK')\n"  # PR_SET_NAME: findable in /proc
ATTACKS = {  # program -> what a refused attack gives (the box's error, or the guard's PermissionError)
    "secret": ("import os\nprint(os.environ.get('HF_TOKEN'), [p for p in os.listdir('/proc') if p.isdigit() and "
               "b'hf_' in open(f'/proc/{p}/environ', 'rb').read()])", ("None []", "PermissionError")),
    "home": ("print(open('TOKEN').read())", ("FileNotFoundError", "PermissionError")),
    "write": ("open('OUTSIDE', 'w').write('x')\nprint(1)", ("OSError: [Errno 30]", "PermissionError")),
    "pth": ("import site\nopen(site.getsitepackages()[0] + '/box_escape.pth', 'w').write('import os')\nprint(1)",
            ("OSError: [Errno 30]", "PermissionError")),
    "socket": ("import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)\nprint(1)",
               ("OSError: [Errno 101] Network is unreachable", "PermissionError")),
    "subprocess": ("import subprocess\nprint(subprocess.run(['id'], capture_output=True).stdout)",
                   ("BlockingIOError", "PermissionError")),
    "orphan": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    " + NAME.replace("\n", "\n    ") +
               "time.sleep(30)\nprint(1)", ("BlockingIOError", "PermissionError")),
    "bomb": (NAME + "while True:\n    os.fork()\nprint(1)", ("BlockingIOError", "PermissionError")),
    "stop": ("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nprint(1)",
             ("1", "PermissionError")),
    "deaf": (NAME + "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\nprint(1)",
             ("Timeout Error", "PermissionError")),
}


@LINUX
@pytest.mark.parametrize("mode", ["box", "guard"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_of_a_program_is_refused(attack, mode, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "code_box", mode)
    monkeypatch.setattr(E, "CODE_TIMEOUT", 1)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    token = tmp_path / "home" / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_secret")
    outside, mark = os.path.join(ROOT, f"box_escape_{os.getpid()}"), f"box{os.getpid() % 10 ** 6}{attack[:4]}"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0)
    program, refused = ATTACKS[attack]
    t0 = time.time()
    try:
        for word, value in dict(TOKEN=token, OUTSIDE=outside, PORT=listener.getsockname()[1], MARK=mark).items():
            program = program.replace(word, str(value))
        text = E.run_program(program)
        assert text.startswith(refused[mode == "guard"]), text
        deadline = time.time() + 2  # a program killed from outside takes a moment to go
        while leftovers(mark) and time.time() < deadline:
            time.sleep(0.05)
        assert "hf_secret" not in text and not os.path.exists(outside) and not leftovers(mark)
        assert not os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "box_escape.pth"))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came
        assert time.time() - t0 < E.CODE_TIMEOUT + 1.5  # stopped or stuck: ended by our own deadline
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.remove(outside)


@LINUX
@pytest.mark.parametrize("mode", ["box", "guard"])
def test_ordinary_programs_run_alike_in_the_box_and_under_the_guard(mode, monkeypatch):
    monkeypatch.setattr(E, "code_box", mode)
    programs = {"from sympy import factorint, Rational\nprint(factorint(360), Rational(3, 6))":
                "{2: 3, 3: 2, 5: 1} 1/2",
                "from fractions import Fraction\nimport math, itertools\nsum(Fraction(1, math.comb(4, k)) for k in "
                "range(5)) + len(list(itertools.permutations('abc')))": "26/3",
                "import numpy as np\nprint(np.linalg.det(np.eye(3) * 2))": "7.999999999999998",
                "import os\nopen('f', 'w').write('x')\nprint(open(os.path.expanduser('~/f')).read())": "x",
                "1 / 0": "ZeroDivisionError: division by zero"}
    if importlib.util.find_spec("numpy") is None:
        programs = {p: r for p, r in programs.items() if "numpy" not in p}
    assert {p: E.run_program(p) for p in programs} == programs


@LINUX
def test_a_program_that_wrecks_its_scratch_dir_or_forges_its_result_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "code_box", "guard")  # in the box the scratch dir is a tmpfs of its own
    link = ("import os, shutil\nhome = os.getcwd()\nos.chdir('/')\nshutil.rmtree(home)\nos.symlink('/', home)\n"
            "print(home)")
    home = E.run_program(link)
    assert home.startswith(tempfile.gettempdir()) and not os.path.lexists(home)
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(1100):  # deeper than the recursion limit and PATH_MAX (4,400 characters)
        os.mkdir("ddd", dir_fd=fd)
        fd, old = os.open("ddd", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.symlink("/", "up", dir_fd=fd)
    os.close(fd)
    E.remove_tree(str(tmp_path / "ddd"))
    assert os.listdir(tmp_path) == []
    forged = "import os\nos.write(1, b'\\n\"' + b'x' * 7000 + b'\"\\n')\nos._exit(0)"
    assert E.run_program(forged) == "x" * 200 + "..." + "x" * 200


def test_without_a_box_the_run_stops_in_one_line_or_says_what_the_guard_holds(monkeypatch, capsys):
    monkeypatch.setattr(E, "run_program", lambda program: "no box: [Errno 1] unshare: Operation not permitted")
    with pytest.raises(SystemExit) as e:
        E.choose_code_box()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unshare: Operation not permitted" in err
    assert "--unboxed" in err and "--no-code-exec" in err
    monkeypatch.setattr(E, "unboxed", True)
    E.choose_code_box()
    err = capsys.readouterr().err
    assert E.code_box == "guard" and err.count("\n") == 1 and "NOT enforced" in err


@LINUX
def test_a_killed_evaluate_leaves_no_grading_worker_and_no_lock(tmp_path):
    """As kill -9 of evaluate.py mid-grading: the worker (one re-forked after a timeout, as in the issue)
    dies with it, and the out dir's lock is free at once for the rerun."""
    def evaluate(conn):
        common.lock_dir(str(tmp_path), "evaluate")
        grader = E.Grader(0.2)
        grader.grade("\\boxed{10^{10^{10}}}", "1", "gsm8k")  # runs out of time: a new worker is forked
        conn.send(grader.worker.pid)
        grader.grade("\\boxed{10^{10^{10}}}", "1", "gsm8k")
    ours, theirs = multiprocessing.Pipe()
    run = multiprocessing.get_context("fork").Process(target=evaluate, args=(theirs,))
    run.start()
    worker = ours.recv()
    run.kill()
    run.join()
    deadline = time.time() + 3
    while leftovers(f"pid {worker}") and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() < deadline, "the grading worker outlived its evaluate.py"
    common.lock_dir(str(tmp_path), "evaluate")  # the rerun's lock: not held by any orphan
    common.release_locks()


# -----------------------------------------------------------------------------
# pages, parsed with the standard library


class Page(html.parser.HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


# -----------------------------------------------------------------------------
# the efficiency table: each tuned model's gain beside what its sampling and training runs recorded


def recorded_run(root, name, select, label, sampled, trained):
    """<root>/<name>: lora/, and the records train.py and sample.py write there (their costs only)."""
    os.makedirs(root / name / "lora")
    (root / name / "sample_config.json").write_text(json.dumps(dict(config=dict(select=select), totals=sampled)))
    config = dict(samples=str(root / name / "samples.jsonl"), label=label)
    (root / name / "train_config.json").write_text(json.dumps(dict(config=config, totals=trained)))
    return root / name / "lora"


def test_the_costs_are_read_from_the_records_sample_and_train_write(tiny_models, tmp_path, monkeypatch, capsys):
    out, threads = tmp_path / "out", torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models run in this process (two threads on two busy cores: far slower)
    steps = (("sample.py", ["--amateur", tiny_models["amateur"], "--data", GSM8K_FIXTURE, "--beta", 7,
                            "--max-questions", 3, "--max-new-tokens", 6]), ("train.py", ["--max-steps", 2]))
    try:
        for script, args in steps:
            monkeypatch.setattr(sys, "argv", [script, "--expert", tiny_models["expert"], "--out-dir", str(out),
                                              *map(str, args)])
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            common.release_locks()
    finally:
        torch.set_num_threads(threads)
        common.release_locks()
    sampled, trained = (json.load(open(out / f))["totals"] for f in ("sample_config.json", "train_config.json"))
    assert E.run_costs(str(out / "lora")) == dict(
        method="LightReasoner", sampled=3, kept=sampled["questions_kept"], positions=sampled["kept_positions"],
        tuned=32, sample_s=sampled["sampling_time_s"], train_s=trained["wall_time_s"],
        time_s=sampled["sampling_time_s"] + trained["wall_time_s"], device="cpu")
    assert trained["tuned_tokens"] == 32 and 0 < sampled["questions_kept"] <= 3 and sampled["kept_positions"] > 0


def test_the_efficiency_table_shows_gains_and_the_costs_on_record_with_ratios_to_sft(tmp_path, capsys):
    evil = "<script>alert(1)</script>"
    light = recorded_run(tmp_path, "out", "kl", "contrast",
                         dict(questions=1000, questions_kept=998, kept_positions=16422, sampling_time_s=1500.0,
                              device="H100"), dict(tuned_tokens=16000, wall_time_s=300.0, device="H100"))
    sft = recorded_run(tmp_path, "out_sft", "sft", "sft",
                       dict(questions=7473, questions_kept=3952, kept_positions=1180000, sampling_time_s=9000.0,
                            device="H100"), dict(tuned_tokens=1770000, wall_time_s=6000.0, device=evil))
    unrecorded = recorded_run(tmp_path, "damaged", "kl", "contrast", {}, {})
    (tmp_path / "damaged" / "train_config.json").write_text('{"config": ')
    eval_dir = tmp_path / "eval"
    for tag, adapter, correct in (("m", None, (4, 3)), ("m+lora", light, (7, 6)), ("m+out_sft", sft, (6, 4)),
                                  ("m+damaged", unrecorded, (9, 9)), ("other+lora", light, (1, 1))):
        os.makedirs(eval_dir / tag)
        (eval_dir / tag / "run.json").write_text(json.dumps(dict(config=dict(adapter=adapter and str(adapter)))))
        (eval_dir / tag / "summary.json").write_text(json.dumps(
            {b: dict(n=10, correct=c, accuracy=10.0 * c) for b, c in zip(("gsm8k", "math"), correct)}))
        for b in ("gsm8k", "math"):  # the page also reads the rows (none here)
            (eval_dir / tag / f"{b}.jsonl").write_text("")
    rows = E.efficiency(str(eval_dir))  # no costs on record, or no base model evaluated: no row
    assert [(r["tag"], r["method"]) for r in rows] == [("m+lora", "LightReasoner"), ("m+out_sft", "SFT")]
    ours, theirs = rows
    assert ours["gain"] == pytest.approx(30.0) and theirs["gain"] == pytest.approx(15.0)  # mean over gsm8k, math
    assert ours["accuracy"] == pytest.approx(65.0) and theirs["accuracy"] == pytest.approx(50.0)
    assert (ours["sampled"], ours["kept"], ours["positions"], ours["tuned"]) == (1000, 998, 16422, 16000)
    assert (ours["time_s"], theirs["time_s"], ours["device"], theirs["device"]) == (1800, 15000, "H100", f"H100 / {evil}")
    assert ours["vs_sft"] == pytest.approx(dict(time_s=1800 / 15000, sampled=1000 / 7473, tuned=16000 / 1770000))
    assert not theirs["vs_sft"]
    E.print_efficiency(str(eval_dir))
    title, header, *lines = capsys.readouterr().out.strip().splitlines()
    assert title.startswith("efficiency:") and header.split()[:4] == ["model", "method", "accuracy", "gain"]
    assert len(lines) == 2 and lines[0].split()[:5] == ["m+lora", "LightReasoner", "65.0", "+30.0", "2"]
    for cell in ("30.0 min = 25.0 min + 5.0 min (0.12× SFT)", "1,000 (0.13× SFT)", " 998 ", "16,422",
                 "16,000 (0.01× SFT)"):
        assert cell in lines[0]
    assert lines[1].split()[:5] == ["m+out_sft", "SFT", "50.0", "+15.0", "2"] and "SFT)" not in lines[1]
    assert "4.17 h = 2.50 h + 1.67 h" in lines[1] and "1,770,000" in lines[1] and "3,952" in lines[1]
    page = Page(E.report_page(str(eval_dir)))
    text = "".join(page.text)
    assert "Efficiency" in text and "30.0 min = 25.0 min + 5.0 min (0.12× SFT)" in text and evil in text
    assert not [t for t, _ in page.tags if t == "script"]


def test_an_adapter_of_another_run_is_named_after_that_run(tmp_path, monkeypatch):
    for d in ("out/lora", "out_sft/lora", "mine"):
        os.makedirs(tmp_path / d)
        (tmp_path / d / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(E, "data_dir", EVAL_DATA)
    monkeypatch.setattr(E, "out_dir", str(tmp_path / "out"))
    monkeypatch.setattr(E, "model", "Qwen/Qwen2.5-Math-1.5B")
    tags = []
    for d in ("out/lora", "out_sft/lora", "mine"):
        monkeypatch.setattr(E, "adapter", str(tmp_path / d))
        tags.append(E.model_runs(["gsm8k"], 1, "cpu")[0][1][0])
    assert tags == ["Qwen2.5-Math-1.5B+lora", "Qwen2.5-Math-1.5B+out_sft", "Qwen2.5-Math-1.5B+mine"]


# -----------------------------------------------------------------------------
# mistakes end in one line and exit code 2, stale or shared rows are refused


def one_line_error(code, err, *words):
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def write_bench(tmp_path, lines, mode="w"):
    os.makedirs(tmp_path / "data" / "gsm8k", exist_ok=True)
    with open(tmp_path / "data" / "gsm8k" / "test.jsonl", mode + ("b" if isinstance(lines, bytes) else "")) as f:
        f.write(lines)
    return ["--bench", "gsm8k", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out"]


@pytest.mark.parametrize("idx", ["true", "0.0", "[1]", "{}"])
def test_an_idx_that_is_no_whole_number_is_refused_in_benchmark_files(idx, tmp_path, capsys, monkeypatch):
    args = write_bench(tmp_path, '{"question": "q", "answer": "#### 1"}\n{"idx": %s, "question": "q", "answer": "#### 1"}\n' % idx)
    one_line_error(*run_inprocess([*args, "--completions", "c.jsonl"], capsys, monkeypatch), "test.jsonl:2", "idx")


@pytest.mark.parametrize("content,words", [
    ('{"idx": true, "completion": "1"}\n', ["c.jsonl:1", "idx true"]),  # today: graded as problem 1
    ('{"idx": 0.0, "completion": "1"}\n', ["c.jsonl:1", "idx 0.0"]),
    ('{"idx": 0, "completion": "\\ud800"}\n', ["c.jsonl:1", "surrogate"]),
    ('', ["holds no completions"]),
    ('\n\n', ["holds no completions"]),
])
def test_a_bad_completions_file_is_refused_by_line(content, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "c.jsonl").write_text(content)
    one_line_error(*run_inprocess(["--bench", "gsm8k", "--completions", tmp_path / "c.jsonl", "--data-dir", EVAL_DATA,
                                   "--out-dir", tmp_path], capsys, monkeypatch), *words)


def test_binary_duplicate_and_directory_files(tmp_path, capsys, monkeypatch):
    args = write_bench(tmp_path, b'{"question": "q", "answer": "#### 1"}\n\x89PNG\r\n\x1a\n\xff\xfe')
    one_line_error(*run_inprocess([*args, "--completions", "c.jsonl"], capsys, monkeypatch), "test.jsonl:2", "UTF-8")
    args = write_bench(tmp_path, '{"idx": 3, "question": "q", "answer": "#### 1"}\n{"idx": 3, "question": "q", "answer": "#### 1"}\n')
    one_line_error(*run_inprocess([*args, "--completions", "c.jsonl"], capsys, monkeypatch), "test.jsonl:2", "twice")
    one_line_error(*run_inprocess(["--bench", "gsm8k", "--data-dir", EVAL_DATA, "--completions", tmp_path],
                                  capsys, monkeypatch), "directory")


def test_non_finite_grade_timeout(capsys, monkeypatch):
    one_line_error(*run_inprocess(["--bench", "gsm8k", "--grade-timeout", "nan"], capsys, monkeypatch), "--grade-timeout")


def test_stale_rows_are_refused_naming_what_differs(tiny_models, tmp_path, capsys, monkeypatch):
    args = ["--model", tiny_models["expert"], "--bench", "gsm8k", "--data-dir", EVAL_DATA, "--adapter", "none",
            "--out-dir", tmp_path, "--max-new-tokens", 8]
    tag_dir = tmp_path / "eval" / "expert"
    os.makedirs(tag_dir)
    (tag_dir / "gsm8k.jsonl").write_text("")
    one_line_error(*run_inprocess(args, capsys, monkeypatch), "no run.json")
    for name, value in dict(model=tiny_models["expert"], data_dir=EVAL_DATA, adapter="none", max_new_tokens=8).items():
        monkeypatch.setattr(E, name, value)
    config = dict(E.model_runs(["gsm8k"], None, "cpu")[0][0][2], model=str(tmp_path / "elsewhere" / "expert"), max_new_tokens=16)
    (tag_dir / "run.json").write_text(json.dumps(dict(config=config, totals=None)))
    one_line_error(*run_inprocess(args, capsys, monkeypatch), "max_new_tokens, model", str(tag_dir))


def test_a_rerun_with_another_grade_timeout_or_benchmark_file_stops_in_one_line(tmp_path, capsys, monkeypatch):
    """The two resumes that went wrong silently: rows graded under another --grade-timeout (they
    kept accuracy 0), or against a changed benchmark file (old and new ground truths in one file)."""
    os.makedirs(tmp_path / "data" / "gsm8k")
    bench_file = tmp_path / "data" / "gsm8k" / "test.jsonl"
    shutil.copy(os.path.join(EVAL_DATA, "gsm8k", "test.jsonl"), bench_file)
    (tmp_path / "c.jsonl").write_text(json.dumps({"idx": 0, "completion": "\\boxed{18}"}) + "\n")
    args = ["--bench", "gsm8k", "--completions", tmp_path / "c.jsonl", "--data-dir", tmp_path / "data",
            "--out-dir", tmp_path]
    code, err = run_inprocess([*args, "--grade-timeout", 0.0001], capsys, monkeypatch)
    assert code == 0, err
    one_line_error(*run_inprocess([*args, "--grade-timeout", 3], capsys, monkeypatch), "grade_timeout",
                   str(tmp_path / "eval" / "c"))
    first, *rest = bench_file.read_text(encoding="utf-8").splitlines(keepends=True)
    bench_file.write_text(first.replace("#### 18", "#### 19") + "".join(rest), encoding="utf-8")
    one_line_error(*run_inprocess([*args, "--grade-timeout", 0.0001], capsys, monkeypatch), "gsm8k", "delete")
    shutil.rmtree(tmp_path / "eval" / "c")  # as the line says: then the same command starts afresh
    code, err = run_inprocess([*args, "--grade-timeout", 3], capsys, monkeypatch)
    assert code == 0, err
    assert [(r["gt"], r["correct"]) for r in rows_of(tmp_path / "eval" / "c" / "gsm8k.jsonl")] == [("19", False)]
    record = json.load(open(tmp_path / "eval" / "c" / "run.json"))
    assert record["config"]["grade_timeout"] == 3.0 and record["totals"]["gsm8k"]["n"] == 1


def test_a_model_that_does_not_load_leaves_no_record_behind(tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "expert")  # a directory, but no model in it: the corrected command must run
    args = ["--model", tmp_path / "expert", "--bench", "gsm8k", "--data-dir", EVAL_DATA, "--adapter", "none",
            "--no-code-exec", "--out-dir", tmp_path / "out"]
    one_line_error(*run_inprocess(args, capsys, monkeypatch), "not a model")
    assert not os.path.exists(tmp_path / "out" / "eval" / "expert" / "run.json")


def test_a_later_run_may_add_a_benchmark_to_a_models_directory(tmp_path):
    tag_dir, config = str(tmp_path / "m"), dict(model="m", inputs={})
    files = {b: (os.path.join(EVAL_DATA, b, "test.jsonl"), []) for b in ("gsm8k", "math")}
    try:
        E.open_run(common.make_dir(tag_dir), config, {"gsm8k": files["gsm8k"]})
        open(os.path.join(tag_dir, "gsm8k.jsonl"), "w").write("")
        common.release_locks()
        E.open_run(tag_dir, config, files)  # gsm8k's rows kept, math joins the record
    finally:
        common.release_locks()
    record = json.load(open(os.path.join(tag_dir, "run.json")))
    assert record["config"] == config and set(record["benchmarks"]) == {"gsm8k", "math"}


def test_a_model_being_evaluated_in_the_same_out_dir_is_refused(tiny_models, tmp_path, capsys, monkeypatch):
    from common import lock_dir
    os.makedirs(tmp_path / "eval" / "vllm_out")
    lock_dir(str(tmp_path / "eval" / "vllm_out"), "evaluate")  # held by this process as another run would
    (tmp_path / "vllm_out.jsonl").write_text('{"idx": 0, "completion": "1"}\n')
    one_line_error(*run_inprocess(["--bench", "gsm8k", "--completions", tmp_path / "vllm_out.jsonl", "--data-dir", EVAL_DATA,
                                   "--out-dir", tmp_path], capsys, monkeypatch), "in use")


def test_grading_that_runs_out_of_time_counts_wrong_and_is_counted(tmp_path, capsys, monkeypatch):
    slow = "\\boxed{\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{2\\sqrt{33}+15}}"
    (tmp_path / "c.jsonl").write_text(json.dumps({"idx": 0, "completion": slow}) + "\n" +
                                      json.dumps({"idx": 1, "completion": "\\boxed{3}"}) + "\n")
    code, err = run_inprocess(["--bench", "gsm8k", "--completions", tmp_path / "c.jsonl", "--data-dir", EVAL_DATA,
                               "--out-dir", tmp_path, "--grade-timeout", 0.01], capsys, monkeypatch)
    assert code == 0, err
    rows = rows_of(tmp_path / "eval" / "c" / "gsm8k.jsonl")
    assert [(r["line"], r["correct"], r["timed_out"]) for r in rows][0] == (1, False, True)
    assert "cut_off" not in rows[0]  # a saved completion: whether it was cut off is not known
    assert json.load(open(tmp_path / "eval" / "c" / "summary.json"))["gsm8k"]["grade_timeouts"] >= 1
