"""
The three stages on a REAL expert/amateur pair, at small sizes: what must hold on real models and
fails on the random ones the other tests use. CI does not run it: it needs real weights.

    LR_EXPERT=pair/expert LR_AMATEUR=pair/amateur python -m pytest -q -rs tests/test_real_models.py
    LR_EXPERT=Qwen/Qwen2.5-Math-1.5B LR_AMATEUR=Qwen/Qwen2.5-0.5B python -m pytest -q -rs tests/test_real_models.py

LR_EXPERT / LR_AMATEUR name a hub id or a model directory (without both, every test here is skipped
and -rs prints why). Sizes, from the environment (defaults: 18 minutes on one thread of a CPU for a
1.5B/0.5B pair in float32): LR_QUESTIONS GSM8K train questions (4) ×
LR_TOKENS rollout tokens (64), LR_STEPS training steps (4), the first LR_EVAL GSM8K test problems (6,
at most 6: the fixture's) with up to LR_EVAL_TOKENS new tokens (320). The three stages run once, as
a user runs them, into one work directory; each test reads what they wrote.
"""
import json
import math
import os
import re
import shutil
import sys

import pytest
import torch

from conftest import DATA, GSM8K_FIXTURE, ROOT, run_script

sys.path.insert(0, ROOT)
from common import esc  # noqa: E402

EXPERT, AMATEUR = os.environ.get("LR_EXPERT"), os.environ.get("LR_AMATEUR")
pytestmark = pytest.mark.skipif(not (EXPERT and AMATEUR),
                                reason="no real pair: set LR_EXPERT and LR_AMATEUR (hub ids or model dirs)")
QUESTIONS, TOKENS = int(os.environ.get("LR_QUESTIONS", 4)), int(os.environ.get("LR_TOKENS", 64))
STEPS, N_EVAL = int(os.environ.get("LR_STEPS", 4)), int(os.environ.get("LR_EVAL", 6))
EVAL_TOKENS = int(os.environ.get("LR_EVAL_TOKENS", 320))
# Base accuracy on the first GSM8K test problems must be at least this fraction. Measured with the
# defaults: Qwen2.5-Coder-1.5B-Instruct gets 2 of the first 6 right (3 of the 6 run past 320 tokens and
# are cut off); a random model gets none.
FLOOR = 0.3


def numbers(text):
    return set(re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """sample.py, train.py and evaluate.py (base and tuned) on the real pair, into one directory."""
    work = tmp_path_factory.mktemp("real")
    shutil.copytree(os.path.join(DATA, "eval", "gsm8k"), work / "data" / "gsm8k")
    hours = 3 * 3600  # real models on a CPU take their time (the sizes above: 18 minutes in all)
    run_script("sample.py", "--expert", EXPERT, "--amateur", AMATEUR, "--data", GSM8K_FIXTURE,
               "--max-questions", QUESTIONS, "--max-new-tokens", TOKENS, cwd=work, timeout=hours)
    run_script("train.py", "--max-steps", STEPS, "--batch-size", 4, "--grad-accum", 1, "--save-every", STEPS,
               cwd=work, timeout=hours)
    run_script("evaluate.py", "--bench", "gsm8k", "--limit", N_EVAL, "--max-new-tokens", EVAL_TOKENS, cwd=work,
               timeout=hours)
    return work


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f] if path.endswith(".jsonl") else f.read()


def test_rollouts_are_text_that_restates_the_questions_numbers(run):
    rollouts = read(str(run / "out" / "rollouts.jsonl"))
    assert len(rollouts) == QUESTIONS
    for r in rollouts:  # a real model restates the question in words; a random one emits gibberish
        words = lambda text: {w.lower() for w in re.findall(r"[A-Za-z]{4,}", text)}  # noqa: E731
        assert len(words(r["question"]) & words(r["completion"])) >= 3, r["completion"]
    # and its numbers, soon (Qwen2.5-Coder-1.5B-Instruct: 3 of the first 4 within 64 tokens; one plans first)
    restated = [bool(numbers(r["question"]) & numbers(r["completion"])) for r in rollouts]
    assert sum(restated) >= len(rollouts) / 2, restated


def test_kl_is_finite_and_the_kept_fraction_lies_strictly_between_0_and_1(run):
    rollouts = read(str(run / "out" / "rollouts.jsonl"))
    assert all(math.isfinite(k) and k >= -1e-4 for r in rollouts for k in r["kl"])
    totals = json.loads(read(str(run / "out" / "sample_config.json")))["totals"]
    # random models disagree everywhere (KL ≈ 7, all kept); real ones mostly agree (the paper's premise)
    assert 0 < totals["kept_fraction"] < 1, totals
    samples = read(str(run / "out" / "samples.jsonl"))
    assert len(samples) == totals["kept_positions"] and all(s["kl"] > 0.4 for s in samples)
    assert all(abs(sum(s["weights"]) - 1) < 1e-4 for s in samples)


def test_training_loss_is_finite_and_the_adapter_changes_the_logits(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log = read(str(run / "out" / "train_log.jsonl"))
    assert len(log) == STEPS and all(math.isfinite(x["loss"]) and x["loss"] >= 0 for x in log)
    tok = AutoTokenizer.from_pretrained(EXPERT)
    ids = tok("Natalia sold 48 clips in April and half as many in May.", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(EXPERT, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(run / "out" / "lora")).eval()(ids).logits
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4


def test_base_accuracy_on_the_first_gsm8k_test_problems_is_clearly_above_zero(run):
    tags = sorted(os.listdir(run / "out" / "eval"))
    base = next(t for t in tags if os.path.isdir(run / "out" / "eval" / t) and "+" not in t)
    summary = json.loads(read(str(run / "out" / "eval" / base / "summary.json")))["gsm8k"]
    assert summary["n"] == min(N_EVAL, 6) and summary["correct"] >= FLOOR * summary["n"], summary
    rows = read(str(run / "out" / "eval" / base / "gsm8k.jsonl"))
    assert all(r["completion"].strip() for r in rows) and any("boxed" in r["completion"] for r in rows)


def test_the_pages_hold_the_real_text_escaped(run):
    rollouts = read(str(run / "out" / "rollouts.jsonl"))
    page = read(str(run / "out" / "rollouts.html"))
    for r in rollouts:  # the question as escaped text, and the completion's words among the tokens
        assert esc(r["question"]) in page and esc(r["tokens"][1]) in page
    assert "<script" not in page.lower()  # the data's text, never markup
    report = read(str(run / "out" / "eval" / "report.html"))
    every = read(str(run / "out" / "eval" / "gsm8k.html"))  # every problem, each model's completion
    rows = [r for t in os.listdir(run / "out" / "eval") if os.path.isdir(run / "out" / "eval" / t)
            for r in read(str(run / "out" / "eval" / t / "gsm8k.jsonl"))]
    assert "gsm8k" in report and len(rows) == 2 * min(N_EVAL, 6)  # base and tuned
    for r in rows:  # real reasoning text, escaped: its plain lines (outside code blocks) as they were written
        line = next(x for x in r["completion"].splitlines() if x.strip() and "```" not in x)
        assert esc(r["question"]) in every and esc(line) in every, line
    assert os.path.getsize(run / "out" / "train.html") > 0
