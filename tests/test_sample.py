"""Stage 1: the contrast itself, the single teacher-forced pass, greedy generation, and sample.py end
to end on the tiny models (output files, resume after a kill, bad input)."""
import json
import math
import os
import runpy
import sys

import pytest
import torch

from conftest import GSM8K_FIXTURE, ROOT, run_script

sys.path.insert(0, ROOT)
import common  # noqa: E402
import sample  # noqa: E402


# -----------------------------------------------------------------------------
# the contrast, by hand


def test_contrast_matches_hand_computed_kl_plausible_set_and_soft_label():
    p_E = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_A = torch.tensor([0.25, 0.25, 0.25, 0.25])
    kl, keep, plausible, soft_label = sample.contrast(p_E.log(), p_A.log(), alpha=0.2, beta=0.4)
    # KL(π_E‖π_A) = Σ π_E log(π_E/π_A) = 0.5 ln2 + 0.3 ln1.2 + 0.15 ln0.6 + 0.05 ln0.2
    expected_kl = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.15 * math.log(0.6) + 0.05 * math.log(0.2)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)  # ≈ 0.2142
    assert not keep.item()  # 0.214 ≤ β = 0.4: not a special moment
    # plausible: π_E ≥ 0.2 · 0.5 = 0.1 -> the first three tokens
    assert plausible.tolist() == [True, True, True, False]
    # v_C ∝ π_E/π_A on the plausible set: 2, 1.2, 0.6 -> divided by 3.8
    assert soft_label.tolist() == pytest.approx([2 / 3.8, 1.2 / 3.8, 0.6 / 3.8, 0.0], abs=1e-6)


def test_contrast_keeps_a_position_above_beta_and_special_tokens_in_the_soft_label():
    # Token 0 plays <|endoftext|>: the expert wants to stop, the amateur does not. It must stay in V.
    p_E = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]) + 1e-9
    p_A = torch.tensor([[0.01, 0.09, 0.5, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p_E = p_E / p_E.sum(-1, keepdim=True)
    kl, keep, plausible, soft_label = sample.contrast(p_E.log(), p_A.log(), alpha=0.2, beta=0.4)
    assert kl[0].item() == pytest.approx(0.6 * math.log(60) + 0.4 * math.log(0.4 / 0.09), abs=1e-5)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-6)
    assert keep.tolist() == [True, False]
    assert plausible[0].tolist() == [True, True, False, False]
    w0, w1 = 60.0, 0.4 / 0.09  # π_E/π_A of the two plausible tokens
    assert soft_label[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1), 0, 0], abs=1e-5)
    assert soft_label[1].tolist() == pytest.approx([0.25] * 4, abs=1e-6)  # all plausible, no contrast


# -----------------------------------------------------------------------------
# the models: one teacher-forced pass, greedy generation, batching


@pytest.fixture(scope="module")
def models(tiny_models):
    tok = common.load_tokenizer(tiny_models["expert"])
    expert = common.load_model(tiny_models["expert"], "cpu", torch.float32)
    amateur = common.load_model(tiny_models["amateur"], "cpu", torch.float32)
    with open(GSM8K_FIXTURE) as f:
        questions = [json.loads(line)["question"] for line in f]
    prompts = [common.chat_prompt_ids(tok, q, sample.system_prompt) for q in questions[:5]]
    return tok, expert, amateur, prompts


def test_one_teacher_forced_pass_equals_running_the_amateur_on_every_prefix(models):
    tok, expert, amateur, prompts = models
    vocab = 100_000
    # Two sequences of different lengths, left-padded into one batch, as sample_batch builds them.
    seqs = [prompts[0] + [300, 301, 302, 303, 304, 305], prompts[1] + [310, 311, 312]]
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    logp = sample.log_probs(amateur, sample.hidden_states(amateur, ids, mask), vocab)  # (B, L, V)
    for b, s in enumerate(seqs):
        pad = width - len(s)
        for t in range(len(prompts[b]), len(s) + 1):  # every prefix that predicts a generated token
            with torch.no_grad():
                alone = amateur(torch.tensor([s[:t]])).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(logp[b, pad + t - 1], alone, atol=1e-5, rtol=1e-5)


def test_generation_is_greedy_whatever_the_models_generation_config_says(models):
    tok, expert, amateur, prompts = models
    assert expert.generation_config.do_sample and expert.generation_config.repetition_penalty == 1.5
    stop = common.stop_token_ids(tok, expert)
    prompt = prompts[0]
    got = sample.greedy_generate(expert, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                                 12, stop, tok.pad_token_id, vocab=len(tok))[0].tolist()
    # The argmax of the raw logits, one token at a time, with no cache and no processors.
    seq = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            logits = expert(torch.tensor([seq])).logits[0, -1, :len(tok)]
        seq.append(int(logits.argmax()))
        if seq[-1] in stop:
            break
    assert got[:len(seq) - len(prompt)] == seq[len(prompt):]


def test_batched_generation_gives_the_same_tokens_as_one_question_at_a_time(models):
    tok, expert, amateur, prompts = models
    stop = common.stop_token_ids(tok, expert)
    args = (tok.pad_token_id, stop, len(tok), 20, 0.2, 0.4, 7)  # chunk 7: chunks cut across positions
    batched = sample.sample_batch(expert, amateur, prompts, *args)
    for prompt, b in zip(prompts, batched):
        alone = sample.sample_batch(expert, amateur, [prompt], *args)[0]
        assert b["completion_ids"] == alone["completion_ids"]
        assert b["kl"] == pytest.approx(alone["kl"], abs=1e-4)
        assert [k[0] for k in b["kept"]] == [k[0] for k in alone["kept"]]


def test_stop_tokens_include_the_chat_end_of_turn(models):
    tok, expert, _, _ = models
    stop = common.stop_token_ids(tok, expert)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop
    assert tok.convert_tokens_to_ids("<|endoftext|>") in stop
    gen = torch.tensor([[5, 6, stop[0], 9, 9], [5, 6, 7, 8, 9]])
    assert sample.completion_lengths(gen, stop) == [3, 5]  # the end token is kept, the rest dropped


# -----------------------------------------------------------------------------
# sample.py end to end


def sample_args(tiny_models, out_dir, *extra):
    return ["--expert", tiny_models["expert"], "--amateur", tiny_models["amateur"], "--data", GSM8K_FIXTURE,
            "--max-questions", 10, "--max-new-tokens", 20, "--beta", 7, "--batch-size", 4, "--out-dir", out_dir, *extra]


def read_lines(path):
    with open(path) as f:
        return f.readlines()


@pytest.fixture(scope="module")
def full_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_full")
    proc = run_script("sample.py", *sample_args(tiny_models, out))
    return out, proc


def test_sample_writes_consistent_samples_rollouts_and_config(full_run, tiny_models):
    out, proc = full_run
    tok = common.load_tokenizer(tiny_models["expert"])
    samples = [json.loads(line) for line in read_lines(out / "samples.jsonl")]
    rollouts = [json.loads(line) for line in read_lines(out / "rollouts.jsonl")]
    config = json.loads((out / "sample_config.json").read_text())
    assert len(rollouts) == 10 and [r["index"] for r in rollouts] == list(range(10))
    assert 0 < len(samples) < sum(len(r["kl"]) for r in rollouts)  # β = 7 keeps some positions, not all
    by_id = {r["id"]: r for r in rollouts}
    for s in samples:
        r = by_id[s["id"]]
        assert s["question"] == r["question"] == s["id"]  # default id = the question text
        assert s["prefix_ids"] == r["completion_ids"][:s["step"]]
        assert s["prefix"] == tok.decode(s["prefix_ids"])
        assert s["kl"] == r["kl"][s["step"]] and s["kl"] > 7 and s["step"] in r["kept"]
        assert len(s["token_ids"]) == len(s["tokens"]) == len(s["weights"]) >= 1
        assert sum(s["weights"]) == pytest.approx(1, abs=1e-5) and s["weights"] == sorted(s["weights"], reverse=True)
        assert s["tokens"] == [tok.decode([a]) for a in s["token_ids"]]
    for r in rollouts:
        assert len(r["kl"]) == len(r["completion_ids"]) <= 20
        assert r["kept"] == [t for t, k in enumerate(r["kl"]) if k > 7]
        assert r["prompt"].startswith("<|im_start|>system\nPlease reason step by step.<|im_end|>")
    assert sum(len(r["kept"]) for r in rollouts) == len(samples)
    totals = config["totals"]
    assert config["config"]["beta"] == 7 and config["config"]["max_new_tokens"] == 20
    assert totals["questions"] == 10 and totals["kept_positions"] == len(samples)
    assert totals["generated_tokens"] == sum(len(r["completion_ids"]) for r in rollouts)
    assert "sampled 10 questions" in proc.stdout


def test_killed_and_restarted_run_ends_identical_to_an_uninterrupted_one(full_run, tiny_models, tmp_path):
    out, _ = full_run
    samples, rollouts = read_lines(out / "samples.jsonl"), read_lines(out / "rollouts.jsonl")
    # Kill points: inside a batch (question 5 of batches of 4), with question 5's samples half
    # written and a half line at the end; and with the rollouts file ending in half a line.
    done = 5
    n_done = sum(len(json.loads(r)["kept"]) for r in rollouts[:done])
    n_next = len(json.loads(rollouts[done])["kept"])
    assert n_next >= 2, "fixture should keep several positions of question 5"
    crashes = {
        "mid_samples": (samples[:n_done + 1] + [samples[n_done + 1][:30]], rollouts[:done]),
        "half_rollout": (samples[:n_done + n_next], rollouts[:done] + [rollouts[done][:50]]),
        "nothing_yet": ([], []),
    }
    for name, (s_lines, r_lines) in crashes.items():
        d = tmp_path / name
        d.mkdir()
        (d / "samples.jsonl").write_text("".join(s_lines))
        (d / "rollouts.jsonl").write_text("".join(r_lines))
        (d / "sample_config.json").write_text((out / "sample_config.json").read_text())
        run_script("sample.py", *sample_args(tiny_models, d))
        assert read_lines(d / "samples.jsonl") == samples, name
        assert read_lines(d / "rollouts.jsonl") == rollouts, name


def test_a_run_with_another_configuration_is_refused(full_run, tiny_models, tmp_path):
    out, _ = full_run
    d = tmp_path / "o"
    d.mkdir()
    (d / "sample_config.json").write_text((out / "sample_config.json").read_text())
    proc = run_script("sample.py", *sample_args(tiny_models, d, "--alpha", 0.5), check=False)
    assert proc.returncode == 2 and "alpha" in proc.stderr and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# bad input: one line, exit code 2, no traceback (run in-process to save the interpreter start-up)


def run_main(script, args, capsys):
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ""


@pytest.mark.parametrize("extra, message", [
    (["--alpha", 0], "--alpha"), (["--alpha", 1.5], "--alpha"), (["--beta", -0.1], "--beta"),
    (["--max-new-tokens", 0], "--max-new-tokens"),
])
def test_bad_settings_are_refused(tiny_models, tmp_path, capsys, extra, message):
    code, err = run_main("sample.py", sample_args(tiny_models, tmp_path) + extra, capsys)
    assert code == 2 and err.startswith("error:") and message in err


def test_bad_data_files_are_refused_with_file_and_line(tiny_models, tmp_path, capsys):
    def data(text):
        path = tmp_path / "q.jsonl"
        path.write_text(text)
        return run_main("sample.py", sample_args(tiny_models, tmp_path / "out") + ["--data", path], capsys)
    code, err = run_main("sample.py", sample_args(tiny_models, tmp_path) + ["--data", tmp_path / "none.jsonl"], capsys)
    assert code == 2 and "none.jsonl does not exist" in err
    code, err = data('{"question": "a?"}\n{"question": "b?"\n')
    assert code == 2 and "q.jsonl:2: malformed JSON" in err
    code, err = data('{"question": "a?"}\n\n{"answer": "3"}\n')
    assert code == 2 and "q.jsonl:3" in err and '"question"' in err
    code, err = data("\n")
    assert code == 2 and "no questions" in err


def test_bad_models_are_refused(tiny_models, tmp_path, capsys):
    args = sample_args(tiny_models, tmp_path / "out")
    code, err = run_main("sample.py", args + ["--amateur", tiny_models["other_tokenizer"]], capsys)
    assert code == 2 and "tokenizers differ" in err
    code, err = run_main("sample.py", args + ["--expert", tmp_path], capsys)
    assert code == 2 and "not a model" in err
    code, err = run_main("sample.py", args + ["--amateur", "nobody-here/no-such-model"], capsys)
    assert code == 2 and "cannot load nobody-here/no-such-model" in err


def test_bad_input_ends_without_a_traceback_in_a_real_process(tiny_models, tmp_path):
    proc = run_script("sample.py", *sample_args(tiny_models, tmp_path), "--data", tmp_path / "x.jsonl", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data file {tmp_path / 'x.jsonl'} does not exist"]
