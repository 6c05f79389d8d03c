"""Stage 2 (train.py) on the tiny models: the packed loss is the per-record KL(v_C‖π_θ), training
lowers it, the adapter and the merged model reload, resume is exact, bad inputs end in one line."""
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import GSM8K_FIXTURE, ROOT, run_script

sys.path.insert(0, ROOT)
import train  # noqa: E402
from common import chat_prompt_ids, load_model, load_tokenizer  # noqa: E402

STEPS = ["--max-steps", 30, "--lr", 1e-2, "--save-every", 10]  # a few dozen steps, fast enough to learn


def train_main(*args):
    """Run train.py in this process, as `python train.py ARGS` would; return its globals (the
    in-memory model included)."""
    argv, sys.argv = sys.argv, ["train.py", *map(str, args)]
    try:
        return runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    finally:
        sys.argv = argv


def dies(capsys, *args):
    """train.py's one-line error for these flags (after checking it exits with code 2)."""
    with pytest.raises(SystemExit) as e:
        train_main(*args)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def samples(tiny_models, tmp_path_factory):
    """A stage-1 output directory: samples.jsonl and sample_config.json from the tiny models."""
    out = tmp_path_factory.mktemp("sampled")
    run_script("sample.py", "--expert", tiny_models["expert"], "--amateur", tiny_models["amateur"],
               "--data", GSM8K_FIXTURE, "--max-questions", 4, "--max-new-tokens", 16, "--beta", 7, "--out-dir", out)
    return str(out)


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory):
    """One uninterrupted training run, then `--resume --merge` on the finished run (no more steps:
    it only writes merged/). The out dir and the globals of both runs (their in-memory models)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    g = train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", out, *STEPS)
    g_merge = train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", out, "--resume", "--merge", *STEPS)
    return out, g, g_merge


def records_and_inputs(tiny_models, samples):
    tok = load_tokenizer(tiny_models["expert"])
    records, official = train.read_samples(os.path.join(samples, "samples.jsonl"))
    assert not official
    return tok, records, [train.input_ids(tok, r, "Please reason step by step.", False) for r in records]


def mean_kl(model, inputs, soft_labels, pad_id):
    with torch.no_grad():
        return train.soft_label_kl(model.eval(), inputs, soft_labels, pad_id)[0].mean().item()


def read_log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# the loss


def test_packed_loss_and_gradients_equal_one_record_per_forward(tiny_models, samples):
    from peft import LoraConfig, get_peft_model
    tok, records, inputs = records_and_inputs(tiny_models, samples)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_models["expert"], "cpu", torch.float32),  # B ≠ 0: every LoRA weight gets a gradient
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    # several positions from each of the four questions (prompts of different lengths), step 0 included
    by_question = {}
    for i, r in enumerate(records):
        by_question.setdefault(r["question"], []).append(i)
    batch = [i for ids in by_question.values() for i in ids[:1] + ids[-3:]]
    batch = batch[1::2] + batch[::2]  # interleaved across questions
    assert len(by_question) == 4 and len({len(inputs[i]) for i in batch}) > 4 and any(not records[i]["prefix_ids"] for i in batch)
    x, labels = [inputs[i] for i in batch], [(records[i]["token_ids"], records[i]["weights"]) for i in batch]
    rows, where = train.pack(x)
    assert len(rows) == 4  # one forward row per question

    kl_packed, tokens_packed = train.soft_label_kl(model, x, labels, tok.pad_token_id)
    kl_packed.mean().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    kl_single, tokens_single = [], 0
    for xi, li in zip(x, labels):
        kl, tokens = train.soft_label_kl(model, [xi], [li], tok.pad_token_id)
        (kl.sum() / len(x)).backward()
        kl_single.append(kl[0].detach())
        tokens_single += tokens
    torch.testing.assert_close(kl_packed.detach(), torch.stack(kl_single), rtol=1e-5, atol=1e-5)
    assert len(grads_packed) == 8 and all(g.abs().sum() > 0 for g in grads_packed.values())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads_packed[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    assert tokens_packed == sum(map(len, rows)) < tokens_single / 2


def test_loss_is_kl_of_soft_label_to_expert_distribution_by_hand(tiny_models, samples):
    """KL(v_C‖π) = Σ_a v_C(a)(log v_C(a) − log π(a)), π over the full output layer: ids past the
    tokenizer's are kept, and a zero weight contributes 0·log 0 = 0."""
    tok, records, inputs = records_and_inputs(tiny_models, samples)
    model = load_model(tiny_models["expert"], "cpu", torch.float32)
    r = next(r for r, x in zip(records, inputs) if len(r["token_ids"]) >= 2)
    x = inputs[records.index(r)]
    with torch.no_grad():
        logits = model(torch.tensor([x])).logits[0, -1].double()
    log_pi = (logits - torch.logsumexp(logits, 0)).tolist()
    n_out = model.get_output_embeddings().out_features
    assert n_out > len(tok)
    for ids, w in [(r["token_ids"], r["weights"]), ([5, n_out - 1, 7], [0.25, 0.75, 0.0])]:
        by_hand = sum(wa * (math.log(wa) - log_pi[a]) for a, wa in zip(ids, w) if wa > 0)
        with torch.no_grad():
            kl, tokens = train.soft_label_kl(model, [x], [(ids, w)], tok.pad_token_id)
        assert tokens == len(x)
        assert kl.item() == pytest.approx(by_hand, rel=1e-5, abs=1e-6)


def test_pack_reads_each_record_at_its_own_last_token():
    rows, where = train.pack([[1, 2, 3], [9, 9], [1, 2, 3, 4, 5], [1, 2], [9, 9, 9]])
    assert rows == [[1, 2, 3, 4, 5], [9, 9, 9]]
    assert where == [(0, 2), (1, 1), (0, 4), (0, 1), (1, 2)]


# -----------------------------------------------------------------------------
# training, the adapter, the merged model


def test_training_lowers_the_loss_on_the_training_records(tiny_models, samples, trained):
    from peft import PeftModel
    out = trained[0]
    log = read_log(out)
    assert [row["step"] for row in log] == list(range(1, 31))
    assert set(log[0]) == {"step", "loss", "lr", "records", "tokens", "records_per_s", "elapsed_s"}
    assert log[0]["lr"] == pytest.approx(1e-2) and log[-1]["lr"] == pytest.approx(1e-2 / 30)  # linear decay to 0
    tok, records, inputs = records_and_inputs(tiny_models, samples)
    # packed: at most one row per question (4) in each of the step's 2 micro-batches of 8 records
    assert all(row["records"] == 16 and 0 < row["tokens"] <= 2 * 4 * max(map(len, inputs)) for row in log)
    soft_labels = [(r["token_ids"], r["weights"]) for r in records]
    before = mean_kl(load_model(tiny_models["expert"], "cpu", torch.float32), inputs, soft_labels, tok.pad_token_id)
    tuned = PeftModel.from_pretrained(load_model(tiny_models["expert"], "cpu", torch.float32), os.path.join(out, "lora"))
    after = mean_kl(tuned, inputs, soft_labels, tok.pad_token_id)
    assert after < 0.5 * before
    assert sum(row["loss"] for row in log[-5:]) < 0.5 * sum(row["loss"] for row in log[:5])
    totals = json.load(open(os.path.join(out, "train_config.json")))["totals"]
    assert totals["steps"] == 30 and totals["records_seen"] == totals["tuned_tokens"] == 480


def test_lr_0_logs_the_untrained_loss_of_each_steps_records(tiny_models, samples, tmp_path):
    out = tmp_path / "run"
    g = train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", out, "--max-steps", 2, "--lr", 0)
    log = read_log(out)
    assert [row["lr"] for row in log] == [0, 0]
    tok, records, inputs = records_and_inputs(tiny_models, samples)
    expert = load_model(tiny_models["expert"], "cpu", torch.float32)
    for row, start in zip(log, (0, 16)):  # step s trains on records s·16 .. s·16+15 of the shuffled stream
        batch = [g["epoch_order"](len(records), 1337, p // len(records))[p % len(records)] for p in range(start, start + 16)]
        loss = mean_kl(expert, [inputs[i] for i in batch], [(records[i]["token_ids"], records[i]["weights"]) for i in batch],
                       tok.pad_token_id)
        assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_saved_adapter_and_merged_model_reproduce_the_trained_model(tiny_models, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, g, g_merge = trained
    x = torch.tensor([max(g["inputs"], key=len)])
    with torch.no_grad():
        in_memory = g["model"].eval()(x).logits  # (1, L, V), logits up to ~20 in size
        reloaded = PeftModel.from_pretrained(load_model(tiny_models["expert"], "cpu", torch.float32),
                                             os.path.join(out, "lora")).eval()(x).logits
        merged_in_memory = g_merge["model"].eval()(x).logits
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()(x).logits
        untrained = load_model(tiny_models["expert"], "cpu", torch.float32)(x).logits
    torch.testing.assert_close(reloaded, in_memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, merged_in_memory, rtol=1e-5, atol=1e-5)
    # W·x + B·(A·x) and (W + B·A)·x round differently in float32: ~1e-4 on these logits
    torch.testing.assert_close(merged, in_memory, rtol=1e-5, atol=1e-3)
    assert (untrained - in_memory).abs().max() > 1e-2  # the adapter did change the model
    for d in ("lora", "merged"):
        assert AutoTokenizer.from_pretrained(os.path.join(out, d)).chat_template is not None
    cfg = json.load(open(os.path.join(out, "lora", "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


# -----------------------------------------------------------------------------
# checkpoints and resume


def same_adapter(a, b):
    wa, wb = load_file(os.path.join(a, "adapter_model.safetensors")), load_file(os.path.join(b, "adapter_model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_kill_during_a_save_gives_the_same_adapter(samples, trained, tmp_path):
    out = trained[0]
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    # as a kill -9 while saving step 30 leaves it: the step-30 directory half written (and one
    # renamed into place but not yet pointed at), latest.json at step 20, the log cut mid-line
    shutil.rmtree(os.path.join(run, "lora"))
    shutil.rmtree(os.path.join(run, "merged"))
    ckpt = os.path.join(run, "checkpoints")
    shutil.copytree(os.path.join(ckpt, "step-000030"), os.path.join(ckpt, "step-000030.tmp"))
    os.truncate(os.path.join(ckpt, "step-000030.tmp", "adapter_model.safetensors"), 100)
    with open(os.path.join(ckpt, "latest.json"), "w") as f:
        json.dump({"step": 20, "dir": "step-000020"}, f)
    with open(os.path.join(run, "train_log.jsonl"), "a") as f:
        f.write('{"step": 31, "lo')
    train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", run, "--resume", *STEPS)
    assert same_adapter(os.path.join(run, "lora"), os.path.join(out, "lora"))
    assert len(read_log(run)) == 30 and read_log(run) == [dict(row, elapsed_s=mine["elapsed_s"], records_per_s=mine["records_per_s"])
                             for row, mine in zip(read_log(out), read_log(run))]
    assert sorted(os.listdir(ckpt)) == ["latest.json", "step-000020", "step-000030"]


def test_resume_after_kill_9_gives_the_same_adapter(samples, trained, tmp_path):
    out = trained[0]
    run = str(tmp_path / "run")
    args = ["--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", run, *STEPS]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(run, "checkpoints", "latest.json")
    deadline = time.time() + 60
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(run, "lora")), "the run ended before it could be killed"
    train_main(*args, "--resume")
    assert same_adapter(os.path.join(run, "lora"), os.path.join(out, "lora"))
    assert [row["loss"] for row in read_log(run)] == [row["loss"] for row in read_log(out)]


# -----------------------------------------------------------------------------
# the official LightReasoner sample files


def test_official_sample_format_is_accepted(tiny_models, samples, tmp_path):
    with open(os.path.join(samples, "samples.jsonl")) as f, open(tmp_path / "cd_dist_samples.jsonl", "w") as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps(dict(prompt_id=r["question"], step=r["step"], prefix=r["prefix"], tokens=r["tokens"],
                                    token_ids=r["token_ids"], weights=r["weights"], kl_divergence=r["kl"])) + "\n")
    out = tmp_path / "run"
    proc = run_script("train.py", "--expert", tiny_models["expert"], "--samples", tmp_path / "cd_dist_samples.jsonl",
                      "--out-dir", out, "--max-steps", 3, "--batch-size", 4, "--grad-accum", 1)
    assert proc.stdout.count("official LightReasoner sample file") == 1
    assert os.path.exists(out / "lora" / "adapter_model.safetensors") and len(read_log(out)) == 3
    # the input is the prompt text + the prefix text tokenized together, as the reference does
    tok = load_tokenizer(tiny_models["expert"])
    records, official = train.read_samples(str(tmp_path / "cd_dist_samples.jsonl"))
    assert official
    prompt = chat_prompt_ids(tok, records[0]["question"], train.DEFAULT_SYSTEM_PROMPT)
    x = train.input_ids(tok, records[0], train.DEFAULT_SYSTEM_PROMPT, True)
    assert x == tok(tok.decode(prompt) + records[0]["prefix"], add_special_tokens=False)["input_ids"]


# -----------------------------------------------------------------------------
# mistakes end in one line, exit 2


GOOD = {"question": "q", "prefix_ids": [5], "token_ids": [3, 4], "weights": [0.75, 0.25]}


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    (json.dumps(dict(GOOD, weights=[1.25, -0.25])), "≥ 0"),
    ('{"question": "q", "prefix_ids": [5], "token_ids": [3, 4], "weights": [NaN, 1.0]}', "finite"),
    (json.dumps(dict(GOOD, weights=[0.5, 0.4])), "sum to 0.9"),
    (json.dumps(dict(GOOD, weights=[1.0])), "a list as long"),
    (json.dumps(dict(GOOD, token_ids=[3, -4])), "ints ≥ 0"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "prefix_ids"}), "prefix_ids"),
])
def test_bad_record_is_named_by_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(SystemExit) as e:
        train.read_samples(str(path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}:2:" in err and message in err and err.count("\n") == 1


def test_missing_or_empty_samples_file(tmp_path, capsys):
    assert "does not exist" in dies(capsys, "--samples", tmp_path / "nope.jsonl", "--out-dir", tmp_path / "o")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "no records" in dies(capsys, "--samples", tmp_path / "empty.jsonl", "--out-dir", tmp_path / "o")


def test_malformed_file_from_the_command_line_has_no_traceback(tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    proc = run_script("train.py", "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'samples.jsonl'}:2: malformed JSON (Expecting property name " \
                                  "enclosed in double quotes); fix or remove that line"


def test_bad_flags_and_out_of_vocabulary_ids(tiny_models, samples, tmp_path, capsys):
    s = os.path.join(samples, "samples.jsonl")
    assert "--max-steps" in dies(capsys, "--samples", s, "--out-dir", tmp_path / "a", "--max-steps", 0)
    err = dies(capsys, "--samples", s, "--out-dir", tmp_path / "b", "--target-modules", "q_proj,qkv_proj")
    assert "qkv_proj not in" in err and "k_proj" in err
    assert not os.path.exists(tmp_path / "b")  # a failed start leaves nothing that blocks the corrected command
    bad = tmp_path / "bad" / "samples.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps(dict(GOOD, token_ids=[3, 416])) + "\n")
    err = dies(capsys, "--samples", bad, "--expert", tiny_models["expert"], "--out-dir", tmp_path / "c")
    assert f"{bad}:1: token id 416 is outside" in err and "0..415" in err


def test_other_expert_than_the_sampled_one_is_refused_unless_forced(tiny_models, samples, tmp_path, capsys):
    s = os.path.join(samples, "samples.jsonl")
    err = dies(capsys, "--samples", s, "--expert", tiny_models["amateur"], "--out-dir", tmp_path / "a")
    assert "the expert these samples were drawn with" in err and "--force" in err
    train_main("--samples", s, "--expert", tiny_models["amateur"], "--out-dir", tmp_path / "b", "--force",
               "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1)
    assert json.load(open(tmp_path / "b" / "train_config.json"))["config"]["expert"] == tiny_models["amateur"]


def test_a_finished_run_is_never_overwritten(samples, trained, capsys):
    out = trained[0]
    s = os.path.join(samples, "samples.jsonl")
    assert "already holds a training run" in dies(capsys, "--samples", s, "--out-dir", out, *STEPS)
    err = dies(capsys, "--samples", s, "--out-dir", out, "--resume", *STEPS[:-2], "--save-every", 5, "--lr", 1)
    assert "another configuration (lr differ)" in err
