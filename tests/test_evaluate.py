"""
Stage 3 (evaluate.py). The grader must give the official Qwen2.5-Math toolkit's labels: the
expected values below (and in tests/data/eval/) were produced by running the toolkit's own
parser.py/grader.py (sympy 1.12, antlr4 4.11) on the same inputs.
"""
import json
import os
import runpy
import subprocess
import sys
import time

import pytest
import sympy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # our evaluate.py, not a package of the same name
import evaluate as E  # noqa: E402
EVAL_DATA = os.path.join(ROOT, "tests", "data", "eval")


def run_cli(args, cwd=None, check=True):
    """evaluate.py as a separate process, as a user runs it (no network: any download fails fast)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"evaluate.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_inprocess(args, capsys, monkeypatch):
    """evaluate.py's command line in this process (fast: torch is already imported); -> (code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, args)])
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
    return e.value.code, capsys.readouterr().err


# -----------------------------------------------------------------------------
# questions and ground truths, on real records of every benchmark


@pytest.mark.parametrize("name", E.BENCHMARKS)
def test_question_and_gt_parsing_matches_the_toolkit_on_real_records(name):
    expected = json.load(open(os.path.join(EVAL_DATA, "expected_parse.json")))[name]
    records = [json.loads(line) for line in open(os.path.join(EVAL_DATA, name, "test.jsonl"))]
    assert len(records) == len(expected) >= 3
    for record, want in zip(records, expected):
        assert E.parse_question(dict(record), name) == want["question"]
        assert E.parse_gt(dict(record), name) == want["gt"]


def test_question_formats_per_benchmark():
    svamp = {"Body": "There are 5 apples", "Question": "How many?", "Answer": 5.0}
    assert E.parse_question(svamp, "svamp") == "There are 5 apples. How many?"  # a period is added
    asdiv = {"body": "Tessa has 4 apples.", "question": "Is that enough?", "answer": "Yes"}
    assert E.parse_question(asdiv, "asdiv") == "Tessa has 4 apples. Is that enough? (Yes or No)"
    assert E.parse_gt({"body": "", "question": "", "answer": "9 (apples)"}, "asdiv") == "9"
    mmlu = {"question": "Pick one", "choices": ["a", "b", "c", "d"], "answer": 3}
    assert E.parse_question(mmlu, "mmlu_stem") == "Pick one\nAnswer Choices: (A) a (B) b (C) c (D) d"
    assert E.parse_gt(mmlu, "mmlu_stem") == "D"
    assert E.parse_gt({"final_answer": ["$\\frac{1}{2}$"]}, "olympiadbench") == "\\frac{1}{2}"
    assert E.parse_gt({"final_answer": ["True"], "question": "q"}, "olympiadbench") == "True"
    assert E.parse_question({"final_answer": ["True"], "question": "Is it?"}, "olympiadbench") == "Is it? (True or False)"
    assert E.parse_gt({"solution": "so \\boxed{\\frac{3}{4}} and \\boxed{\\{1,2\\}}"}, "math") == "{1,2}"
    assert E.parse_gt({"answer": "Work...\n#### 1,000"}, "gsm8k") == "1,000"  # commas are not removed


def test_prompt_is_the_toolkits_qwen25_math_cot_format():
    assert E.PROMPT.format(question="What is 1+1?") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")


# -----------------------------------------------------------------------------
# extraction and equivalence: (benchmark, completion, ground truth) -> the toolkit's (pred, correct)

CASES = json.load(open(os.path.join(EVAL_DATA, "grading_cases.json"), encoding="utf-8"))


@pytest.mark.parametrize("name,completion,gt,pred,correct", CASES, ids=[f"{c[0]}:{c[1][-40:]}" for c in CASES])
def test_grading_case_matches_the_toolkit(name, completion, gt, pred, correct):
    assert E.predict(completion, name, gt) == pred
    assert E.math_equal(pred, gt) == correct


def test_agreement_with_official_labels_on_realistic_completions():
    """Completions built from every benchmark's reference solutions and answers in many forms (and
    wrong ones; 80 of them rewritten by sympy: expanded, factored, decimal, Python syntax), labelled
    by the official toolkit. Our reader is smaller than sympy's grammars, so a few labels may differ
    (README, "where we differ"); at least 99.5% must agree."""
    rows = [json.loads(line) for line in open(os.path.join(EVAL_DATA, "agreement.jsonl"), encoding="utf-8")]
    assert len(rows) >= 300 and {r["bench"] for r in rows} == set(E.BENCHMARKS)
    bad = []
    for r in rows:
        pred = E.predict(r["completion"], r["bench"], r["gt"])
        if pred != r["pred"] or E.math_equal(pred, r["gt"]) != r["correct"]:
            bad.append((r["bench"], r["completion"][-60:], r["gt"], r["pred"], pred))
    assert len(bad) <= 0.005 * len(rows), bad


# what sympy 1.12's parse_latex returns for each text (run on the toolkit's pinned versions)
@pytest.mark.parametrize("text,expected", [
    ("2+", "2"), ("2,3", "2"), ("10{,}000", "10"), ("1,000", "1000"), ("15\\,840", "15840"), ("2 3", "23"),
    ("\\frac{1}{2}\\pi", "pi/2"), ("2x", "2*x"), ("x(x+1)", "x(x + 1)"), ("2^10", "2**10"), ("x^ab", "b*x**a"),
    ("10^-3", "10"), ("\\sqrt[3]{8}", "8**(1/3)"), ("\\log 100", "log(100, E)"), ("\\log_{2} 8", "log(8, 2)"),
    ("\\sin^2 x", "sin(x)**2"), ("\\sin x \\cos x", "sin(x)*cos(x)"), ("a_n", "a_{n}"),
    ("|x||y|", "Abs(x)*Abs(y)"), ("3!", "factorial(3)"), ("\\infty", "oo"), ("x=2", "Eq(x, 2)"), ("3\\sqrt2", "3"),
    ("1.5\\text{ cm}", "1.5*(text*(c*m))"), ("3:4", "3/4"), ("1.77e-6", "1.77*e - 6"),
    ("2\\times10^{5}", "2*10**5"), ("\\frac{1}{2}.Ihopethishelps!", "1/2"), ("2.5.3", "2.50000000000000"),
    ("1+(2", "1"), ("x_10", "x_{10}"), ("1\\ne 2", "1*(ne*2)"),
])
def test_math_reader_reads_like_sympy_parse_latex(text, expected):
    assert str(E.read_math(text)) == expected


@pytest.mark.parametrize("text", ["\\sqrt2", "(1,2)", "2=", "x_{1", "2 $", "\\frac{1}{2", "0.Hence", "", "2.", "((1)",
                                  "\\mathrm{~m}", "5\\%", "π", "2&3", "-"])
def test_math_reader_leaves_as_strings_what_sympy_parse_latex_rejects(text):
    assert E.read_math(text) == text


# where we knowingly differ (README, "Where we differ"): the official verdict, then ours
@pytest.mark.parametrize("pred,gt,toolkit,ours", [
    ("(2*n**2-2*n)+1", "2n^{2}-2n+1", True, False),  # Python syntax: the toolkit's parse_expr runs it
    ("\\int_0^1xdx", "\\frac{1}{2}", True, False),  # integrals and sums are not read
    ("\\sum_{i=1}^{3}i", "6", True, False),
    ("{1,2}", "{2,1}", True, True),  # but sets of plain items are (parse_expr reads "{1,2}" as a set)
    ("x**2+1", "x^2+1", False, False),  # parse_latex reads "x**2+1" as x: both say wrong
    # parse_latex quirks and rules we left out, each deciding almost none of the 25,465 checks (README)
    ("2x3", "6", True, False),  # parse_latex reads "2x3" as 2*3; we read 2*x*3
    ("\\log_2 8", "3", True, False),  # digits joined across the space: log_2 8 there, unread here
    ("\\tan^{-1}x", "\\arctan x", True, False),  # arctan there, 1/tan(x) here
    ("\\binom{5}{2}", "10", True, False),  # \binom is not read
    ("(A)5", "A", True, False),  # a letter in a longer answer (predict() has already found the letter)
])
def test_known_differences_from_the_toolkit(pred, gt, toolkit, ours):
    assert E.math_equal(pred, gt) == ours


# model text that would run as Python in sympy's parse_expr/sympify; each must stay inert
INJECTIONS = [
    "__import__('os').system('touch {f}')",
    "sympify(\"open('{f}','w')\")",
    "sympify(srepr(Symbol(\"open('{f}','w')\")))",
    "sympify(sstr(Symbol('__import__(\\'os\\').system(\\'touch {f}\\')'))[7:-2])",
    "sympify(latex(Symbol(\"open('{f}','w')\")))",
    "S(\"open('{f}','w')\")",
    "parse_expr(str(Symbol(\"open('{f}','w')\")))",
    "(lambda: open('{f}','w'))()",
    "Symbol.__init__.__globals__['__builtins__']['open']('{f}','w')",
    "x.__class__.__mro__[1].__subclasses__()",
    "eval(chr(111)+chr(112)+chr(101)+chr(110)+'(\"{f}\",\"w\")')",
    "getattr(__builtins__, 'open')('{f}', 'w')",
    "ｏｐｅｎ('{f}','w')",  # full-width look-alikes, which Python folds to "open"
    "ℯxec(\"open('{f}','w')\")",
    "exec(\"open('{f}','w')\")",
    "[open('{f}','w') for x in [1]]",
    "sympify(srepr(Symbol)[0:4]+srepr(oo)[0:0])",  # slices of printed sympy objects, no quotes
    "sympify(sstr(Lambda)[8:14]+latex(pi)[1:3])",
]


@pytest.fixture(scope="module")
def grader():
    g = E.Grader(timeout=1.0)  # as in a run: sympy may spend the whole limit on a long product of letters
    yield g
    g.close()


@pytest.mark.parametrize("payload", INJECTIONS)
def test_model_text_is_never_run_as_python(payload, grader, tmp_path):
    target = tmp_path / "pwned"
    text = payload.format(f=target)
    for completion in (f"So \\boxed{{{text}}}", f"The answer is {text}"):
        assert grader.grade(completion, "\\frac{3}{7}", "math")[1] is False  # graded, as wrong
        grader.grade(completion, text, "math")  # against itself: no exception escapes either
    assert not target.exists()
    read = E.read_math(text)  # a plain string, or (like parse_latex) letters side by side: s*y*m*p*i*f*y
    assert isinstance(read, str) or read.free_symbols <= {sympy.Symbol(c) for c in text}


def test_a_huge_completion_is_cut_short_by_the_time_limit_and_counts_as_wrong():
    """The time limit covers the whole grading (extraction, normalisation, comparison): three
    megabytes of digits cannot finish in 0.1 s, and grade() still returns at once."""
    grader = E.Grader(timeout=0.1)
    t0 = time.time()
    pred, ok, timed_out = grader.grade("so \\boxed{" + "9" * 3_000_000 + "}", "7", "math")
    assert (ok, timed_out, grader.timeouts) == (False, True, 1) and time.time() - t0 < 2
    grader.timeout = 5.0
    assert grader.grade("\\boxed{\\frac{1}{2}}", "0.5", "math") == ("\\frac{1}{2}", True, False)
    grader.close()


def test_normalisation_is_linear_in_long_digit_runs():
    t0 = time.time()  # the toolkit's strip_string: 74 s on 40,000 digits (two quadratic patterns)
    assert E.normalize("1" * 40_000 + ".00x") == "1" * 40_000 + "x"
    assert E.normalize("2" * 40_000 + ".0") == "2" * 40_000
    assert time.time() - t0 < 1


@pytest.mark.parametrize("text,expected", [
    ("five", "5"), ("two apples", "2"), ("twenty-one", "21"), ("one hundred five", "105"),
    ("three thousand two hundred", "3200"), ("one point five", "1.5"), ("007", "7"), ("point", "0"),
    ("hello", "hello"), ("two million three hundred thousand", "2300000"), ("\\text{two}", "\\text{two}"),
])
def test_number_words_follow_word2number(text, expected):
    assert E.words_to_number(text) == expected


def test_normalize_strips_like_strip_string():
    assert E.normalize("\\left( \\dfrac{1}{2}, 3 \\right)") == "(\\frac{1}{2},3)"
    assert E.normalize("5\\text{ cm}") == "5"
    assert E.normalize("90^\\circ") == "90"
    assert E.normalize("\\$1,000.00") == "1,000"
    assert E.normalize("x = \\frac12") == "\\frac{1}{2}"
    assert E.normalize("3/4") == "\\frac{3}{4}"
    assert E.normalize("\\sqrt2") == "\\sqrt{2}"
    assert E.normalize(".5") == "0.5"
    assert E.normalize("5 \\mathrm{~cm}", skip_unit=True) == "5\\mathrm{~cm}"  # Minerva keeps units


def test_a_slow_comparison_times_out_as_wrong_and_grading_goes_on():
    grader = E.Grader(timeout=0.001)  # far too short for sympy
    pred, ok, timed_out = grader.grade("\\boxed{\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{2\\sqrt{33}+15}}", "\\sqrt{2}", "math")
    assert (ok, timed_out, grader.timeouts) == (False, True, 1)
    assert pred in (None, "\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{2\\sqrt{33}+15}")  # None: not even extracted in time
    grader.timeout = 5.0
    assert grader.grade("\\boxed{0.5}", "\\frac{1}{2}", "math") == ("0.5", True, False)
    grader.close()


# -----------------------------------------------------------------------------
# --completions: grade any engine's outputs without a model


def test_completions_mode_grades_every_line_in_order_duplicates_included(tmp_path):
    lines = [{"idx": 0, "completion": "so \\boxed{18}"},
             {"idx": 2, "completion": "The answer is 70,000."},
             {"idx": 0, "completion": "\\boxed{17}"},  # a second sample of problem 0
             {"idx": 1, "completion": "3 bolts"}]
    path = tmp_path / "vllm_out.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_cli(["--bench", "gsm8k", "--completions", path, "--data-dir", EVAL_DATA, "--out-dir", tmp_path / "out"])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "vllm_out" / "gsm8k.jsonl")]
    assert [(r["idx"], r["pred"], r["correct"]) for r in rows] == [(0, "18", True), (2, "70,000", True),
                                                                   (0, "17", False), (1, "3", True)]
    assert rows[0]["gt"] == "18" and rows[0]["question"].startswith("Janet")
    summary = json.load(open(tmp_path / "out" / "eval" / "vllm_out" / "summary.json"))
    assert summary["gsm8k"] == {"n": 4, "correct": 3, "accuracy": 75.0, "grade_timeouts": 0, "code_rounds": [4, 0, 0, 0, 0]}
    assert "gsm8k" in proc.stdout and "75.0" in proc.stdout


# (a tiny model end to end, several processes, code execution: tests/test_evaluate_run.py)


# -----------------------------------------------------------------------------
# mistakes end in one line and exit code 2


def test_unknown_benchmark_lists_the_valid_ones(capsys, monkeypatch):
    code, err = run_inprocess(["--bench", "gsm8k,aime"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "'aime'" in err and "olympiadbench" in err


def test_a_real_run_exits_2_without_traceback():
    proc = run_cli(["--bench", "nope"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


@pytest.mark.parametrize("limit", ["0", "-3", "abc", "²"])  # isdigit() takes "²", int() does not
def test_limit_below_one_is_refused(limit, capsys, monkeypatch):
    code, err = run_inprocess(["--bench", "gsm8k", "--limit", limit], capsys, monkeypatch)
    assert code == 2 and "--limit" in err


def test_a_bench_list_with_no_name_is_refused_before_any_model_loads(capsys, monkeypatch):
    code, err = run_inprocess(["--bench", ","], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "unknown benchmark ','" in err


@pytest.mark.parametrize("config", [{"config": []}, {"config": {"expert": 5}}])
def test_a_sample_config_of_the_wrong_shape_ends_in_one_line(config, tmp_path, capsys, monkeypatch):
    (tmp_path / "sample_config.json").write_text(json.dumps(config))
    code, err = run_inprocess(["--bench", "gsm8k", "--out-dir", tmp_path, "--data-dir", EVAL_DATA], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'sample_config.json'} is damaged" in err


def test_a_local_model_gets_its_directory_name_as_tag(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "merged")
    monkeypatch.chdir(tmp_path / "merged")
    for name, value in dict(model=".", adapter="none", data_dir=EVAL_DATA, dtype="auto").items():
        monkeypatch.setattr(E, name, value)
    runs, _ = E.model_runs(["gsm8k"], None, "cpu")
    assert [tag for tag, _, _ in runs] == ["merged"]  # not ".": its rows would land in out/eval itself


def test_missing_benchmark_file_offline_names_the_path(tmp_path, capsys, monkeypatch):
    code, err = run_inprocess(["--bench", "svamp", "--completions", "x.jsonl", "--data-dir", tmp_path], capsys, monkeypatch)
    last = err.strip().splitlines()[-1]  # after the "downloading ..." notice
    assert code == 2 and last.startswith("error:") and os.path.join(str(tmp_path), "svamp", "test.jsonl") in last


def test_malformed_benchmark_file_points_at_the_line(tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "gsm8k")
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{"question": \n')
    code, err = run_inprocess(["--bench", "gsm8k", "--completions", "x.jsonl", "--data-dir", tmp_path], capsys, monkeypatch)
    assert code == 2 and "test.jsonl:2" in err
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "no answer"}\n')
    code, err = run_inprocess(["--bench", "gsm8k", "--completions", "x.jsonl", "--data-dir", tmp_path], capsys, monkeypatch)
    assert code == 2 and "test.jsonl:2" in err


@pytest.mark.parametrize("content,message", [
    ('{"idx": 0, "completion": "1"}\nnot json\n', "c.jsonl:2"),
    ('{"idx": 0}\n', "c.jsonl:1"),
    ('{"idx": 0, "completion": "1"}\n{"idx": 99, "completion": "1"}\n', "c.jsonl:2: idx 99 is not a problem"),
])
def test_bad_completions_file_points_at_the_line(content, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "c.jsonl").write_text(content)
    code, err = run_inprocess(["--bench", "gsm8k", "--completions", tmp_path / "c.jsonl", "--data-dir", EVAL_DATA,
                               "--out-dir", tmp_path], capsys, monkeypatch)
    assert code == 2 and message in err and err.count("\n") == 1


def test_completions_need_a_single_benchmark(tmp_path, capsys, monkeypatch):
    code, err = run_inprocess(["--bench", "gsm8k,svamp", "--completions", "c.jsonl"], capsys, monkeypatch)
    assert code == 2 and "one benchmark" in err


def test_adapter_dir_that_is_not_a_peft_adapter(tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "lora")
    code, err = run_inprocess(["--bench", "gsm8k", "--adapter", tmp_path / "lora", "--data-dir", EVAL_DATA],
                              capsys, monkeypatch)
    assert code == 2 and "not a peft adapter" in err
