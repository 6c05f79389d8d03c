"""Stage 1: the contrast itself, the selection ablations, the single teacher-forced pass, greedy
generation, and sample.py end to end on the tiny models: output files, resume after a kill, several
processes under torchrun, tokenizer pairs, the page, and bad input."""
import copy
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
from html.parser import HTMLParser

import pytest
import torch

from conftest import CHAT_TEMPLATE, GSM8K_FIXTURE, ROOT, build_model, questions, run_script, run_torchrun

sys.path.insert(0, ROOT)
import common  # noqa: E402
import sample  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run in this process: one thread each (two threads on two busy cores can be 20× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# the contrast and the selection, by hand


def test_contrast_matches_hand_computed_kl_plausible_set_and_soft_label():
    p_E = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_A = torch.tensor([0.25, 0.25, 0.25, 0.25])
    kl, plausible, soft_label = sample.contrast(p_E.log(), p_A.log(), alpha=0.2)
    # KL(π_E‖π_A) = Σ π_E log(π_E/π_A) = 0.5 ln2 + 0.3 ln1.2 + 0.15 ln0.6 + 0.05 ln0.2
    expected_kl = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.15 * math.log(0.6) + 0.05 * math.log(0.2)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)  # ≈ 0.2142
    assert sample.select_positions([kl.item()], "kl", 0.4, 0, 0) == []  # 0.214 ≤ β = 0.4: not a special moment
    # plausible: π_E ≥ 0.2 · 0.5 = 0.1 -> the first three tokens
    assert plausible.tolist() == [True, True, True, False]
    # v_C ∝ π_E/π_A on the plausible set: 2, 1.2, 0.6 -> divided by 3.8
    assert soft_label.tolist() == pytest.approx([2 / 3.8, 1.2 / 3.8, 0.6 / 3.8, 0.0], abs=1e-6)


def test_contrast_keeps_a_position_above_beta_and_special_tokens_in_the_soft_label():
    # Token 0 plays <|endoftext|>: the expert wants to stop, the amateur does not. It must stay in V.
    p_E = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]) + 1e-9
    p_A = torch.tensor([[0.01, 0.09, 0.5, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p_E = p_E / p_E.sum(-1, keepdim=True)
    kl, plausible, soft_label = sample.contrast(p_E.log(), p_A.log(), alpha=0.2)
    assert kl[0].item() == pytest.approx(0.6 * math.log(60) + 0.4 * math.log(0.4 / 0.09), abs=1e-5)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-6)
    assert sample.select_positions(kl.tolist(), "kl", 0.4, 0, 0) == [0]
    assert plausible[0].tolist() == [True, True, False, False]
    w0, w1 = 60.0, 0.4 / 0.09  # π_E/π_A of the two plausible tokens
    assert soft_label[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1), 0, 0], abs=1e-5)
    assert soft_label[1].tolist() == pytest.approx([0.25] * 4, abs=1e-6)  # all plausible, no contrast


def test_plausible_set_carries_soft_label_and_both_probabilities_most_contrastive_first():
    p_E = torch.tensor([[[0.15, 0.3, 0.5, 0.05], [0.25] * 4]])  # (B=1, c=2, V=4): positions 5 and 6
    p_A = torch.tensor([[[0.25, 0.125, 0.5, 0.125], [0.25] * 4]])
    kl, plausible, soft_label = sample.contrast(p_E.log(), p_A.log(), alpha=0.2)
    where, values = sample.plausible_entries(plausible, soft_label, p_E.log(), p_A.log(), t0=5)
    rollout = dict(kl=[0.0] * 5 + kl[0].tolist(), kept=[5])  # position 6 is not kept: it gets no label
    labels = sample.label_positions([rollout], where, values)[0]["labels"]
    # V = {0, 1, 2} (π_E ≥ 0.1); π_E/π_A = 0.6, 2.4, 1.0 -> v_C = that / 4.0, sorted by v_C
    assert list(labels) == [5] and labels[5]["token_ids"] == [1, 2, 0]
    assert labels[5]["weights"] == pytest.approx([2.4 / 4, 1.0 / 4, 0.6 / 4], abs=1e-6)
    assert labels[5]["p_expert"] == pytest.approx([0.3, 0.5, 0.15], abs=1e-6)  # not renormalised
    assert labels[5]["p_amateur"] == pytest.approx([0.125, 0.5, 0.25], abs=1e-6)
    assert kl[0, 0].item() == pytest.approx(sum(e * math.log(e / a) for e, a in zip(p_E[0, 0].tolist(),
                                                                                   p_A[0, 0].tolist())), abs=1e-6)


def test_selection_modes_kl_all_and_random_of_the_same_size():
    kl = [0.1, 0.5, 0.4, 0.9, 0.41, 0.0, 0.2]
    assert sample.select_positions(kl, "kl", 0.4, 1337, 3) == [1, 3, 4]  # strictly above β (0.4 itself is not)
    assert sample.select_positions(kl, "all", 0.4, 1337, 3) == list(range(7))  # β ignored
    draws = [sample.select_positions(kl, "random", 0.4, 1337, i) for i in range(40)]
    assert all(len(d) == 3 and d == sorted(set(d)) and set(d) <= set(range(7)) for d in draws)
    assert draws == [sample.select_positions(kl, "random", 0.4, 1337, i) for i in range(40)]  # reproducible
    assert len({tuple(d) for d in draws}) > 10 and {t for d in draws for t in d} == set(range(7))
    assert draws != [sample.select_positions(kl, "random", 0.4, 7, i) for i in range(40)]  # --seed matters
    assert sample.select_positions([9.0, 9.0], "random", 0.4, 0, 0) == [0, 1]


def test_the_lm_head_runs_in_float32_and_keeps_its_bias(models):
    tok, expert, _, prompts = models
    bf16 = copy.deepcopy(expert).to(torch.bfloat16)
    ids = torch.tensor([prompts[0]])
    h = sample.hidden_states(bf16, ids, torch.ones_like(ids))  # (1, L, H) in bf16
    got = sample.log_probs(bf16, h, 10**6)
    want = (h.float() @ bf16.lm_head.weight.float().T).log_softmax(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    rounded = bf16.lm_head(h).float().log_softmax(-1)  # what a bf16 lm_head gives
    assert (got - rounded).abs().max() > 1e-3
    head = torch.nn.Linear(4, 6, bias=True)
    fake = types.SimpleNamespace(get_output_embeddings=lambda: head)
    x = torch.randn(1, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(sample.log_probs(fake, x, 5), head(x).log_softmax(-1)[..., :5])


# -----------------------------------------------------------------------------
# the models: one teacher-forced pass, greedy generation, batching


@pytest.fixture(scope="module")
def models(tiny_models):
    tok = common.load_tokenizer(tiny_models["expert"])
    expert = common.load_model(tiny_models["expert"], "cpu", torch.float32)
    amateur = common.load_model(tiny_models["amateur"], "cpu", torch.float32)
    prompts = [common.chat_prompt_ids(tok, q, sample.system_prompt) for q in questions()[:5]]
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
    padded = range(len(tok), expert.get_output_embeddings().out_features)  # ids only the padded head has
    ids, mask = common.left_pad([prompt], tok.pad_token_id, "cpu")
    got = common.greedy_generate(expert, ids, mask, 12, stop, tok.pad_token_id, suppress=padded)[0].tolist()
    # The argmax of the raw logits, one token at a time, with no cache and no processors.
    seq = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            logits = expert(torch.tensor([seq])).logits[0, -1, :len(tok)]
        seq.append(int(logits.argmax()))
        if seq[-1] in stop:
            break
    assert got[:len(seq) - len(prompt)] == seq[len(prompt):]


def test_the_hidden_states_kept_from_generate_are_a_teacher_forced_pass(models):
    """π_E is read from generate's own steps (hidden=True): at every generated position the state
    equals one teacher-forced pass over prompt + completion, in a left-padded batch of two."""
    tok, expert, amateur, prompts = models
    stop = common.stop_token_ids(tok, expert)
    ids, mask = common.left_pad(prompts[:2], tok.pad_token_id, "cpu")
    new, kept = common.greedy_generate(expert, ids, mask, 10, stop, tok.pad_token_id, hidden=True)
    assert kept.shape == (2, new.shape[1], expert.config.hidden_size)
    lengths = sample.completion_lengths(new, stop)
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, (torch.arange(new.shape[1])[None] < torch.tensor(lengths)[:, None]).long()], 1)
    forced = sample.hidden_states(expert, full, full_mask)[:, ids.shape[1] - 1:-1]  # column W-1+t predicts t
    for b, n in enumerate(lengths):
        torch.testing.assert_close(kept[b, :n], forced[b, :n], atol=1e-5, rtol=1e-4)


def test_batched_generation_gives_the_same_tokens_as_one_question_at_a_time(models, monkeypatch):
    tok, expert, amateur, prompts = models
    stop = common.stop_token_ids(tok, expert)
    for name, value in dict(max_new_tokens=20, alpha=0.2, beta=7.0, chunk=7).items():  # chunks cut across
        monkeypatch.setattr(sample, name, value)
    batched = sample.sample_batch(expert, amateur, prompts, range(len(prompts)), tok.pad_token_id, stop, len(tok))
    assert any(b["kept"] for b in batched)
    for i, (prompt, b) in enumerate(zip(prompts, batched)):
        alone = sample.sample_batch(expert, amateur, [prompt], [i], tok.pad_token_id, stop, len(tok))[0]
        assert b["completion_ids"] == alone["completion_ids"]
        assert b["kl"] == pytest.approx(alone["kl"], abs=1e-4)
        assert b["kept"] == alone["kept"] == [t for t, k in enumerate(b["kl"]) if k > 7]
        assert {t: V["token_ids"] for t, V in b["labels"].items()} == {
            t: V["token_ids"] for t, V in alone["labels"].items()}


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
            "--max-questions", 12, "--max-new-tokens", 20, "--beta", 7, "--batch-size", 2, "--out-dir", out_dir, *extra]


def read_lines(path):
    with open(path) as f:
        return f.readlines()


def run_main(script, args, capsys, all_lines=False):
    """Run a stage script in this process (no interpreter start-up): (exit code, stdout, last stderr
    line, or all of them but the progress bar's). The out-dir lock it takes is released afterwards,
    as the end of its process would."""
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    code = 0
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        common.release_locks()
    out, err = capsys.readouterr()
    err = [line for line in err.splitlines() if line.strip() and not line.startswith(("sampling", "\r"))]
    return code, out, err if all_lines else err[-1] if err else ""


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
    assert len(rollouts) == 12 and [r["index"] for r in rollouts] == list(range(12))
    assert 0 < len(samples) < sum(len(r["kl"]) for r in rollouts)  # β = 7 keeps some positions, not all
    for s in samples:
        r = rollouts[s["index"]]
        assert s["question"] == r["question"] == s["id"] == r["id"]  # default id = the question text
        assert s["prefix_ids"] == r["completion_ids"][:s["step"]]
        assert s["prefix"] == tok.decode(s["prefix_ids"])
        assert s["kl"] == r["kl"][s["step"]] and s["kl"] > 7 and s["step"] in r["kept"]
        n = len(s["token_ids"])
        assert n == len(s["tokens"]) == len(s["weights"]) == len(s["p_expert"]) == len(s["p_amateur"]) >= 1
        assert sum(s["weights"]) == pytest.approx(1, abs=1e-5) and s["weights"] == sorted(s["weights"], reverse=True)
        assert s["tokens"] == [tok.decode([a]) for a in s["token_ids"]]
        # v_C(a) = π_E(a)/π_A(a), normalised over V; V = {a : π_E(a) ≥ α·max π_E}; not renormalised
        ratio = [e / a for e, a in zip(s["p_expert"], s["p_amateur"])]
        assert s["weights"] == pytest.approx([x / sum(ratio) for x in ratio], rel=1e-4)
        assert min(s["p_expert"]) >= 0.2 * max(s["p_expert"]) - 1e-7 and sum(s["p_expert"]) <= 1 + 1e-6
    for r in rollouts:
        assert len(r["kl"]) == len(r["completion_ids"]) == len(r["tokens"]) <= 20
        assert r["tokens"] == [tok.decode([a]) for a in r["completion_ids"]]
        assert r["kept"] == [t for t, k in enumerate(r["kl"]) if k > 7]
        assert r["prompt"].startswith("<|im_start|>system\nPlease reason step by step.<|im_end|>")
    assert sum(len(r["kept"]) for r in rollouts) == len(samples)
    totals = config["totals"]
    assert config["config"]["beta"] == 7 and config["config"]["max_new_tokens"] == 20
    assert config["config"]["select"] == "kl" and config["tokenizers"]["added_tokens_differ"] == 0
    assert totals["questions"] == 12 and totals["kept_positions"] == len(samples) and totals["processes"] == 1
    assert totals["generated_tokens"] == sum(len(r["completion_ids"]) for r in rollouts)
    assert "sampled 12 questions" in proc.stdout
    assert not list(out.glob("*.rank*"))  # one process: no part files


def test_killed_and_restarted_run_ends_identical_to_an_uninterrupted_one(full_run, tiny_models, tmp_path, capsys):
    out, _ = full_run
    samples, rollouts = read_lines(out / "samples.jsonl"), read_lines(out / "rollouts.jsonl")
    # Kill points: inside a batch (question 5 of batches of 2), with question 5's samples half
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
        code, _, err = run_main("sample.py", sample_args(tiny_models, d), capsys)
        assert code == 0, err
        assert read_lines(d / "samples.jsonl") == samples, name
        assert read_lines(d / "rollouts.jsonl") == rollouts, name


def test_a_run_with_another_configuration_is_refused(full_run, tiny_models, tmp_path, capsys):
    out, _ = full_run
    d = tmp_path / "o"
    d.mkdir()
    for name in ("sample_config.json", "rollouts.jsonl"):  # a record and a result of another run
        (d / name).write_text((out / name).read_text())
    code, _, err = run_main("sample.py", sample_args(tiny_models, d, "--alpha", 0.5), capsys)
    assert code == 2 and err.startswith("error:") and "alpha" in err
    code, _, err = run_main("sample.py", sample_args(tiny_models, d, "--select", "random"), capsys)
    assert code == 2 and "select" in err
    (d / "rollouts.jsonl").unlink()  # a record with no result yet (a start that failed) is replaced
    code, _, err = run_main("sample.py", sample_args(tiny_models, d, "--alpha", 0.5, "--max-questions", 2), capsys)
    assert code == 0, err
    assert json.loads((d / "sample_config.json").read_text())["config"]["alpha"] == 0.5


def test_a_questions_file_with_other_content_under_the_same_path_is_refused(tiny_models, tmp_path, capsys):
    data, out = tmp_path / "q.jsonl", tmp_path / "o"
    data.write_text('{"question": "What is 2 + 3?"}\n{"question": "What is 4 + 4?"}\n')
    args = sample_args(tiny_models, out, "--data", data, "--max-new-tokens", 4)
    code, _, err = run_main("sample.py", args, capsys)
    assert code == 0, err
    rollouts = (out / "rollouts.jsonl").read_bytes()
    code, out_text, err = run_main("sample.py", args, capsys)  # the same command: resumed, nothing to do
    assert code == 0 and "sampled 2 questions" in out_text and (out / "rollouts.jsonl").read_bytes() == rollouts
    data.write_text('{"question": "What is 2 + 3?"}\n{"question": "What is 4 + 5?"}\n')  # same path
    code, _, err = run_main("sample.py", args, capsys)
    assert code == 2 and f"inputs[{data}]" in err and f"delete {out} or pass another --out-dir" in err
    assert (out / "rollouts.jsonl").read_bytes() == rollouts  # the old results are left as they were


def test_select_random_keeps_as_many_positions_as_kl_elsewhere(full_run, tiny_models, tmp_path, capsys):
    out, _ = full_run
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path, "--select", "random"), capsys)
    assert code == 0, err
    base = [json.loads(line) for line in read_lines(out / "rollouts.jsonl")]
    rand = [json.loads(line) for line in read_lines(tmp_path / "rollouts.jsonl")]
    samples = [json.loads(line) for line in read_lines(tmp_path / "samples.jsonl")]
    assert [r["completion_ids"] for r in rand] == [r["completion_ids"] for r in base]  # same rollouts
    assert [len(r["kept"]) for r in rand] == [len(r["kept"]) for r in base]  # as many positions as kl keeps
    assert [r["kept"] for r in rand] == [sample.select_positions(r["kl"], "random", 7, 1337, r["index"]) for r in rand]
    assert [r["kept"] for r in rand] != [r["kept"] for r in base]
    assert [(s["index"], s["step"]) for s in samples] == [(r["index"], t) for r in rand for t in r["kept"]]
    assert any(s["kl"] <= 7 for s in samples)  # positions below β are tuned too
    assert json.loads((tmp_path / "sample_config.json").read_text())["config"]["select"] == "random"


def test_select_all_keeps_every_position_and_the_cpu_batch_default_is_8(tiny_models, tmp_path, capsys):
    args = sample_args(tiny_models, tmp_path, "--select", "all", "--max-questions", 3, "--max-new-tokens", 6)
    args.remove("--batch-size")
    args.remove(2)
    code, _, err = run_main("sample.py", args, capsys)
    assert code == 0, err
    rollouts = [json.loads(line) for line in read_lines(tmp_path / "rollouts.jsonl")]
    samples = [json.loads(line) for line in read_lines(tmp_path / "samples.jsonl")]
    assert all(r["kept"] == list(range(len(r["kl"]))) for r in rollouts)
    assert len(samples) == sum(len(r["kl"]) for r in rollouts)
    assert json.loads((tmp_path / "sample_config.json").read_text())["totals"]["batch_size"] == 8


# -----------------------------------------------------------------------------
# tokenizer pairs: the base vocabulary must agree, added tokens may differ (DeepSeek-R1-Distill-Qwen)

DEEPSEEK_TEMPLATE = ("{{ '<｜begin▁of▁sentence｜>' }}{% for m in messages %}{% if m['role'] == 'system' %}"
                     "{{ m['content'] }}{% else %}{{ '<｜User｜>' + m['content'] }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


@pytest.fixture(scope="module")
def deepseek_pair(tmp_path_factory):
    """An expert whose added tokens are DeepSeek-R1-Distill-Qwen's and an amateur with Qwen's, on one
    byte-level BPE base vocabulary (300 ids); their chat templates differ too, as the real ones do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(questions(), trainers.BpeTrainer(vocab_size=300,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root, paths = tmp_path_factory.mktemp("pair"), {}
    for name, added, template, extra, seed in [
            ("expert", ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
             DEEPSEEK_TEMPLATE, 12, 4),
            ("amateur", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHAT_TEMPLATE, 4, 5)]:
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token=added[0],
                                      pad_token=added[0])
        tok.add_tokens(added[1:], special_tokens=True)
        tok.chat_template = template
        paths[name] = str(root / name)
        build_model(len(tok) + extra, 32, 1, 2, seed, [tok.eos_token_id]).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def test_a_pair_whose_added_tokens_differ_runs_with_the_experts_stop_tokens(deepseek_pair, tmp_path, capsys):
    args = ["--expert", deepseek_pair["expert"], "--amateur", deepseek_pair["amateur"], "--data", GSM8K_FIXTURE,
            "--max-questions", 2, "--max-new-tokens", 8, "--beta", 0, "--out-dir", tmp_path]
    code, _, err = run_main("sample.py", args, capsys, all_lines=True)
    assert code == 0, err
    # Every id from 300 on differs: the amateur has none of the expert's added tokens (and, loaded through
    # transformers' Qwen2 tokenizer class, the expert gains its default unk <|endoftext|> after them).
    n = max(len(common.load_tokenizer(deepseek_pair[m])) for m in ("expert", "amateur")) - 300
    notes = [line for line in err if "added tokens differ" in line]
    assert notes == [f"note: {n} added tokens differ between the tokenizers (ids 300–{299 + n}; id 300: expert "
                     "'<｜end▁of▁sentence｜>' vs amateur '<|endoftext|>', ...); compared id by id, as the reference does"]
    config = json.loads((tmp_path / "sample_config.json").read_text())
    assert config["tokenizers"] == {"base_vocab": 300, "added_tokens_differ": n,
                                    "example": "id 300: expert '<｜end▁of▁sentence｜>' vs amateur '<|endoftext|>'"}
    rollouts = [json.loads(line) for line in read_lines(tmp_path / "rollouts.jsonl")]
    assert len(rollouts) == 2
    assert rollouts[0]["prompt"].startswith("<｜begin▁of▁sentence｜>Please reason step by step.<｜User｜>")
    tok = common.load_tokenizer(deepseek_pair["expert"])
    model = common.load_model(deepseek_pair["expert"], "cpu", torch.float32)
    assert common.stop_token_ids(tok, model) == [300]  # <｜end▁of▁sentence｜>; the expert has no <|im_end|>
    assert all(len(r["completion_ids"]) == 8 or r["completion_ids"][-1] == 300 for r in rollouts)


def test_a_pair_whose_base_vocabulary_differs_is_refused(tiny_models, tmp_path, capsys):
    args = sample_args(tiny_models, tmp_path, "--amateur", tiny_models["other_tokenizer"])
    code, _, err = run_main("sample.py", args, capsys)
    assert code == 2 and err.startswith("error: the expert's and amateur's tokenizers differ in their base vocabulary")
    assert not os.path.exists(tmp_path / "sample_config.json")


# -----------------------------------------------------------------------------
# several processes (torchrun, Gloo on the CPU)


def children(pid):
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(p))
    return kids


def questions_in_parts(d):
    n = 0
    for p in d.glob("rollouts.jsonl.rank*"):
        try:
            n += p.read_bytes().count(b"\n")
        except FileNotFoundError:  # the merge removed it
            pass
    return n


def test_torchrun_killed_midway_and_resumed_writes_the_bytes_of_one_process(full_run, tiny_models, tmp_path, capsys):
    out, _ = full_run
    d = tmp_path / "tr"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), *map(str, sample_args(tiny_models, d))]
    for attempt in range(3):  # a kill that lands too late (a starved test process) is tried again
        shutil.rmtree(d, ignore_errors=True)
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while launcher.poll() is None and not questions_in_parts(d):  # until a question is done
            assert time.time() < deadline, "torchrun wrote no question in 300 s"
            time.sleep(0.005)
        for pid in children(launcher.pid) + [launcher.pid]:  # kill -9 the whole job: workers and launcher
            os.kill(pid, signal.SIGKILL)
        launcher.wait()
        if 0 < questions_in_parts(d) < 12 and not (d / "rollouts.jsonl").exists():
            break
    assert 0 < questions_in_parts(d) < 12, "the kill should land mid-way"
    shutil.copytree(d, tmp_path / "one")
    proc = run_torchrun("sample.py", *sample_args(tiny_models, d))  # resumed with 2 processes
    for name in ("samples.jsonl", "rollouts.jsonl"):
        assert (d / name).read_bytes() == (out / name).read_bytes(), name
    assert not list(d.glob("*.rank*")) and proc.stdout.count("sampled 12 questions") == 1
    config, ref = (json.loads((x / "sample_config.json").read_text()) for x in (d, out))
    drop = ("wall_time_s", "tokens_per_s", "processes", "sampling_time_s", "device")
    assert {k: v for k, v in config["totals"].items() if k not in drop} == {
        k: v for k, v in ref["totals"].items() if k not in drop}
    assert config["totals"]["processes"] == 2 and config["totals"]["device"] == "cpu ×2"
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path / "one"), capsys)  # resumed with 1
    assert code == 0, err
    for name in ("samples.jsonl", "rollouts.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (out / name).read_bytes(), name


def test_a_merge_cut_short_by_a_kill_is_redone(full_run, tiny_models, tmp_path, capsys):
    # A kill between the merge's two writes: samples.jsonl complete, rollouts.jsonl not yet, parts still there.
    out, _ = full_run
    samples, rollouts = read_lines(out / "samples.jsonl"), read_lines(out / "rollouts.jsonl")
    (tmp_path / "sample_config.json").write_text((out / "sample_config.json").read_text())
    (tmp_path / "samples.jsonl").write_text("".join(samples))
    (tmp_path / "rollouts.jsonl").write_text("".join(rollouts[:3]))
    for rank in (0, 1):
        mine = [r for r in rollouts if (json.loads(r)["index"] // 2) % 2 == rank]
        keep = {json.loads(r)["index"] for r in mine}
        (tmp_path / f"rollouts.jsonl.rank{rank}").write_text("".join(mine))
        (tmp_path / f"samples.jsonl.rank{rank}").write_text(
            "".join(s for s in samples if json.loads(s)["index"] in keep))
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path), capsys)
    assert code == 0, err
    assert read_lines(tmp_path / "samples.jsonl") == samples and read_lines(tmp_path / "rollouts.jsonl") == rollouts
    assert not list(tmp_path.glob("*.rank*"))


# -----------------------------------------------------------------------------
# the page: out/rollouts.html


class Page(HTMLParser):
    """The parts of rollouts.html the tests look at: tags seen, question blocks, kept tokens and the
    text of each kept token's plausible-set popup."""
    def __init__(self, text):
        super().__init__()
        self.tags, self.blocks, self.kept, self.popups, self.text, self._in = [], 0, 0, [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.blocks += tag == "div" and ("class", "q") in attrs
        self.kept += tag == "b" and ("tabindex", "0") in attrs
        if tag == "u":
            self.popups.append("")
        self._in.append(tag)

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data):
        self.text.append(data)
        if "u" in self._in:
            self.popups[-1] += data


def test_the_page_shows_every_question_kept_token_and_plausible_set(full_run):
    out, _ = full_run
    page = Page((out / "rollouts.html").read_text())
    samples = [json.loads(line) for line in read_lines(out / "samples.jsonl")]
    assert page.blocks == 12 and page.kept == len(samples) == len(page.popups)
    for s, popup in [(samples[0], page.popups[0]), (samples[-1], page.popups[-1])]:
        lines = popup.split("\n")
        assert lines[0] == f"KL {s['kl']:.3f}" and len(lines) == 1 + len(s["token_ids"])
        for line, a, pe, pa, w in zip(lines[1:], s["tokens"], s["p_expert"], s["p_amateur"], s["weights"]):
            cells = line.split(" ", 3)  # π_E π_A v_C token (the token as shown: control characters as pictures)
            assert cells == [f"{pe:.3g}", f"{pa:.3g}", f"{w:.3g}", a if a.isprintable() else cells[3]]
    assert "script" not in page.tags and "<svg" in (out / "rollouts.html").read_text()


def test_the_page_keeps_data_inert_and_is_written_with_zero_kept_positions(tiny_models, tmp_path, capsys):
    evil = ['<script>alert(1)</script> How many?', '<img src=x onerror="alert(2)"> & "quotes"?']
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "id": f"</div><b>{i}"}) + "\n" for i, q in enumerate(evil)))
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path / "o", "--data", data, "--beta", 1000), capsys)
    assert code == 0, err
    assert not (tmp_path / "o" / "samples.jsonl").read_text()  # β = 1000 keeps nothing
    page = Page((tmp_path / "o" / "rollouts.html").read_text())
    assert page.blocks == 2 and page.kept == 0 and not {"script", "img"} & set(page.tags)
    text = "".join(page.text)
    assert evil[0] in text and evil[1] in text and "</div><b>1" in text


# -----------------------------------------------------------------------------
# bad input: one line, exit code 2, no traceback (run in-process to save the interpreter start-up)


def test_the_flags_are_the_configuration_block_and_nothing_imported(capsys):
    code, out, _ = run_main("sample.py", ["--help"], capsys)
    flags = [w for line in out.splitlines() if line.startswith("  --") for w in line.split()[:1]]
    assert code == 0 and flags == ["--" + k.replace("_", "-") for k in sample.config_keys]
    assert flags[0] == "--expert" and flags[-1] == "--seed" and len(flags) == 15
    assert not {"--RANK", "--WORLD-SIZE", "--master", "--DEFAULT-SYSTEM-PROMPT"} & set(flags)


@pytest.mark.parametrize("extra, message", [
    (["--alpha", 0], "--alpha"), (["--alpha", 1.5], "--alpha"), (["--beta", -0.1], "--beta"),
    (["--max-new-tokens", 0], "--max-new-tokens"), (["--batch-size", -1], "--batch-size"),
    (["--beta", "nan"], "argument --beta: invalid finite number value: 'nan'"),
    (["--alpha", "inf"], "argument --alpha: invalid finite number value: 'inf'"),
    (["--select", "best"], "--select best is not one of kl, all, random"),
])
def test_bad_settings_are_refused(tiny_models, tmp_path, capsys, extra, message):
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path) + extra, capsys)
    assert code == 2 and err.startswith("error:") and message in err


@pytest.mark.parametrize("content, message", [
    (b'{"question": "a?"}\n{"question": "b?"\n', "q.jsonl:2: malformed JSON"),
    (b'{"question": "a?"}\n\n{"answer": "3"}\n', 'q.jsonl:3: no "question" field'),
    (b"\n", "holds no questions"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "q.jsonl:1: not UTF-8 text"),
    (b'{"question": "a \\ud800 b?"}\n', "q.jsonl:1: holds a lone surrogate escape"),
    (b'{"question": "a?", "id": true}\n', 'q.jsonl:1: "id" is true; make it a string or an integer'),
    (b'{"question": "a?", "id": 1}\n{"question": "b?", "id": [1, 2]}\n', 'q.jsonl:2: "id" is [1, 2]'),
    (b'{"question": "a?", "id": 2.5}\n', 'q.jsonl:1: "id" is 2.5'),
])
def test_bad_questions_files_are_refused_with_file_and_line(tiny_models, tmp_path, capsys, content, message):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path / "out", "--data", path), capsys)
    assert code == 2 and err.startswith("error:") and message in err


def test_a_missing_file_or_a_directory_is_no_questions_file(tiny_models, tmp_path, capsys):
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path / "o", "--data", tmp_path / "none.jsonl"), capsys)
    assert code == 2 and "none.jsonl does not exist" in err
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path / "o", "--data", tmp_path), capsys)
    assert code == 2 and f"{tmp_path} is a directory, not a file" in err


@pytest.mark.parametrize("content", ['{"config": {"expert": "x", ', "[1, 2]\n", '{"config": [1]}\n', "\xff"])
def test_a_damaged_sample_config_says_what_to_delete(tiny_models, tmp_path, capsys, content):
    (tmp_path / "sample_config.json").write_text(content, encoding="latin-1")
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path), capsys)
    assert code == 2 and "sample_config.json is damaged" in err and f"delete {tmp_path}" in err


def test_an_out_dir_that_is_a_file_is_refused(tiny_models, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path / "f"), capsys)
    assert code == 2 and "--out-dir" in err and "is a file" in err


def test_bad_models_are_refused(tiny_models, tmp_path, capsys):
    args = sample_args(tiny_models, tmp_path / "out")
    code, _, err = run_main("sample.py", args + ["--expert", tmp_path], capsys)
    assert code == 2 and "not a model" in err
    code, _, err = run_main("sample.py", args + ["--amateur", "nobody-here/no-such-model"], capsys)
    assert code == 2 and "cannot load nobody-here/no-such-model" in err


def test_running_out_of_gpu_memory_names_the_flag_to_lower(tiny_models, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB")
    monkeypatch.setattr(common, "greedy_config", oom)  # sample.py imports it from common when it runs
    code, _, err = run_main("sample.py", sample_args(tiny_models, tmp_path), capsys)
    assert code == 2 and err.startswith("error: out of GPU memory with --batch-size 2; lower --batch-size")


def test_a_second_run_on_a_locked_out_dir_stops_in_one_line(tiny_models, tmp_path):
    # This test process holds the lock as a running sample.py would; a real second process is refused.
    common.lock_dir(str(tmp_path), "sample")
    try:
        proc = run_script("sample.py", *sample_args(tiny_models, tmp_path), check=False)
    finally:
        common.release_locks()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} is in use by another sample run (pid {os.getpid()}); wait for it to end, or pass another --out-dir"]
    assert not os.path.exists(tmp_path / "sample_config.json")


# -----------------------------------------------------------------------------
# the SFT baseline (--select sft): the expert's whole answers, kept when they end on GSM8K's number


@pytest.mark.parametrize("completion, answer, number, right", [
    ("so she makes \\boxed{18}.", "16 - 3 - 4 = 9\n#### 18", 18, True),
    ("\\boxed{1,000} dollars", "#### 1,000", 1000, True),  # commas inside numbers dropped, both sides
    ("The total is 72 clips.", "#### 72", 72, True),  # no \boxed: the last number of the text
    ("It costs $2.50 each, \\boxed{-2.5} in all", "#### -2.50", -2.5, True),
    ("\\boxed{18} since 3 + 15 = 18, and 5 more", "#### 18", 18, True),  # the box wins over later numbers
    ("\\boxed{17}", "#### 18", 17, False),
    ("She has 18 eggs and sells 3", "#### 18", 3, False),  # the answer's last number is what it says
    ("I cannot tell.", "#### 18", None, False),  # no number: rejected
    ("\\boxed{x}", "#### 4", None, False),
    ("4", "#### none", 4, False),  # no number in the ground truth: nothing can match
])
def test_the_sft_filter_reads_the_answers_final_number(completion, answer, number, right):
    assert sample.final_number(completion) == number
    assert sample.is_correct(completion, answer) is right


@pytest.fixture(scope="module")
def sft_expert(tiny_models, tmp_path_factory):
    """The tiny expert with "7" and "2" among its end tokens, so that many of its answers end (on a
    number) within a few tokens, as a real model's answers end on theirs."""
    path = tmp_path_factory.mktemp("sft_expert") / "expert"
    shutil.copytree(tiny_models["expert"], path)
    config = json.loads((path / "generation_config.json").read_text())
    tok = common.load_tokenizer(str(path))
    config["eos_token_id"] = [tok.eos_token_id, tok.convert_tokens_to_ids("7"), tok.convert_tokens_to_ids("2")]
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def test_sft_keeps_whole_finished_answers_that_end_on_the_ground_truth(sft_expert, tmp_path, capsys):
    args = ["--expert", sft_expert, "--select", "sft", "--max-questions", 12, "--max-new-tokens", 20, "--batch-size", 4]
    code, _, err = run_main("sample.py", [*args, "--data", GSM8K_FIXTURE, "--out-dir", tmp_path / "first"], capsys)
    assert code == 0, err
    first = [json.loads(line) for line in read_lines(tmp_path / "first" / "rollouts.jsonl")]
    tok = common.load_tokenizer(sft_expert)
    stops = common.stop_token_ids(tok, common.load_model(sft_expert, "cpu", torch.float32))
    ended = [r["completion_ids"][-1] in stops for r in first]
    assert 3 <= sum(ended) < 12 and any(r["pred"] is None for r in first)  # some ended, some have no number
    assert any(r["pred"] is not None and not e for r, e in zip(first, ended))  # and some stopped short on one
    # The ground truth: the answer's own final number for even questions and for answers that did not end,
    # one more for the odd ones that ended; so exactly the even questions that ended are right.
    data = tmp_path / "q.jsonl"
    truth = [(r["pred"] or 0) + (i % 2 and ended[i]) for i, r in enumerate(first)]
    data.write_text("".join(json.dumps(dict(question=r["question"], answer=f"so\n#### {t:g}")) + "\n"
                            for r, t in zip(first, truth)))
    out = tmp_path / "second"
    code, stdout, err = run_main("sample.py", [*args, "--data", data, "--out-dir", out], capsys)
    assert code == 0, err
    rollouts = [json.loads(line) for line in read_lines(out / "rollouts.jsonl")]
    samples = [json.loads(line) for line in read_lines(out / "samples.jsonl")]
    right = [i for i, r in enumerate(first) if ended[i] and i % 2 == 0 and r["pred"] is not None]
    assert [r["completion_ids"] for r in rollouts] == [r["completion_ids"] for r in first]  # the same greedy answers
    assert [r["correct"] for r in rollouts] == [i in right for i in range(12)] and [s["index"] for s in samples] == right
    for s in samples:  # one record per answer, its tokens once: no copy of a prefix per position
        assert s["completion_ids"] == rollouts[s["index"]]["completion_ids"] and "prefix_ids" not in s
        assert s["completion"] == tok.decode(s["completion_ids"]) and s["answer"] == f"{truth[s['index']]:g}"
    config = json.loads((out / "sample_config.json").read_text())
    totals = config["totals"]
    assert config["config"]["amateur"] is None and config["tokenizers"] is None  # no amateur loaded
    assert totals["questions"] == 12 and totals["questions_kept"] == len(right) and totals["device"] == "cpu"
    assert totals["kept_positions"] == sum(len(s["completion_ids"]) for s in samples)
    assert totals["generated_tokens"] == sum(len(r["completion_ids"]) for r in rollouts)
    assert totals["sampling_time_s"] == totals["wall_time_s"] > 0
    assert f"{len(right)} right answers" in stdout
    page = Page((out / "rollouts.html").read_text())
    assert "".join(page.text).count("kept:") == len(right) and "".join(page.text).count("rejected:") == 12 - len(right)
    # run again: nothing to do, the files stay, the sampling time is added up over the runs
    before = (out / "samples.jsonl").read_bytes()
    assert run_main("sample.py", [*args, "--data", data, "--out-dir", out], capsys)[0] == 0
    again = json.loads((out / "sample_config.json").read_text())["totals"]
    assert (out / "samples.jsonl").read_bytes() == before and again["sampling_time_s"] > totals["sampling_time_s"]
    # questions without a GSM8K answer to check against are refused
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"question": "a?"}\n')
    code, _, err = run_main("sample.py", [*args, "--data", plain, "--out-dir", tmp_path / "x"], capsys)
    assert code == 2 and 'plain.jsonl:1: --select sft checks answers against an "answer" field' in err
