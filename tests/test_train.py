"""Stage 2 (train.py) on the tiny models: the packed loss is the per-record KL(v_C‖π_θ), training
lowers it, the adapter and the merged model reload, a rerun resumes exactly (also after damage,
also under torchrun) and refuses other settings or samples, the --label ablations train towards
their targets, bad inputs end in one line, and train.html shows the log."""
import fcntl
import html.parser
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
from safetensors.torch import load_file, save_file

from conftest import GSM8K_FIXTURE, ROOT, run_script, run_torchrun

sys.path.insert(0, ROOT)
import common  # noqa: E402
import train  # noqa: E402
from common import chat_prompt_ids, load_model, load_tokenizer  # noqa: E402

STEPS = ["--max-steps", 30, "--lr", 1e-2, "--save-every", 10]  # a few dozen steps, fast enough to learn


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the scripts these tests start: on 2 cores shared with other
    processes, two spinning OpenMP threads per process made the tiny runs up to 30x slower."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    os.environ.pop("OMP_NUM_THREADS") if env is None else os.environ.update(OMP_NUM_THREADS=env)


def train_main(*args):
    """Run train.py in this process, as `python train.py ARGS` would; return its globals (the
    in-memory model included). The out-dir lock, held for a process's life, is let go after each
    run, as the end of a `python train.py` process would."""
    argv, sys.argv = sys.argv, ["train.py", *map(str, args)]
    try:
        return runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    finally:
        sys.argv = argv
        common.release_locks()


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
    """One uninterrupted training run, then the same command with `--merge` on the finished run (no
    more steps: it only writes merged/). The out dir and the globals of both runs (their models)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    g = train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", out, *STEPS)
    g_merge = train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", out, "--merge", *STEPS)
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
    # renamed into place but not yet pointed at), latest.json at step 20 (its replacement half
    # written), the log cut mid-line
    shutil.rmtree(os.path.join(run, "lora"))
    shutil.rmtree(os.path.join(run, "merged"))
    ckpt = os.path.join(run, "checkpoints")
    shutil.copytree(os.path.join(ckpt, "step-000030"), os.path.join(ckpt, "step-000030.tmp"))
    os.truncate(os.path.join(ckpt, "step-000030.tmp", "adapter_model.safetensors"), 100)
    with open(os.path.join(ckpt, "latest.json"), "w") as f:
        json.dump({"step": 20, "dir": "step-000020"}, f)
    with open(os.path.join(ckpt, "latest.json.tmp"), "w") as f:  # a kill while latest.json was being replaced
        f.write('{"step": 30, "di')
    with open(os.path.join(run, "train_log.jsonl"), "a") as f:
        f.write('{"step": 31, "lo')
    train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", run, *STEPS)
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
    train_main(*args)  # the same command: it resumes
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
    (json.dumps(dict(GOOD, weights=[10 ** 400, 0])), "≤ 1"),  # no OverflowError from a 401-digit weight
    (json.dumps(dict(GOOD, token_ids=[3, 3], weights=[0.5, 0.5])), "distinct token ids"),  # else a KL below 0
])
def test_bad_record_is_named_by_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(SystemExit) as e:
        train.read_samples(str(path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}:2:" in err and message in err and err.count("\n") == 1


def test_a_bad_sft_record_is_named_by_file_and_line(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    for bad in ({"question": "q", "completion_ids": []}, {"question": "q", "completion_ids": [5, -1]}):
        path.write_text(json.dumps({"question": "q", "completion_ids": [5, 6]}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(SystemExit):
            train.read_samples(str(path))
        err = capsys.readouterr().err
        assert f"{path}:2: needs \"question\" and \"completion_ids\"" in err and err.count("\n") == 1
    path.write_text(json.dumps({"question": "q", "completion_ids": [5, 6]}) + "\n")
    assert [r["token_ids"] for r in train.read_samples(str(path))[0]] == [[5, 6]]


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
    # a failed start leaves its record and no result: the corrected command runs there
    assert sorted(os.listdir(tmp_path / "b")) == [".train.lock", "train_config.json"]
    train_main("--samples", s, "--out-dir", tmp_path / "b", "--max-steps", 1)
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["config"]["target_modules"] == "q_proj,v_proj"
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


def files_of(out):
    """Every file under a run directory (its lock left out) -> (size, mtime in ns)."""
    return {os.path.relpath(os.path.join(d, f), out): (os.stat(os.path.join(d, f)).st_size,
                                                       os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, names in os.walk(out) for f in names if f != ".train.lock"}


def test_a_finished_run_rerun_says_so_rewrites_nothing_and_refuses_other_settings(samples, trained, capsys):
    out, s = trained[0], os.path.join(samples, "samples.jsonl")
    before = files_of(out)
    assert "merged/model.safetensors" in before and "lora/adapter_model.safetensors" in before
    with pytest.raises(SystemExit) as e:
        train_main("--samples", s, "--out-dir", out, "--merge", *STEPS)
    assert e.value.code == 0 and "holds a finished run of 30 steps: nothing to do" in capsys.readouterr().out
    assert files_of(out) == before
    # --save-every changes no result, so only --lr is named
    err = dies(capsys, "--samples", s, "--out-dir", out, *STEPS[:-2], "--save-every", 5, "--lr", 0.5)
    assert "(lr differ" in err and err.count("\n") == 0 and files_of(out) == before


def test_a_rerun_on_changed_samples_is_refused_naming_the_file(samples, tmp_path, capsys):
    """The record holds the samples file's fingerprint: same path, same count, other content."""
    shutil.copytree(samples, tmp_path / "s")
    s, out = tmp_path / "s" / "samples.jsonl", tmp_path / "run"
    args = ["--samples", s, "--out-dir", out, "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1]
    train_main(*args, "--max-steps", 2)
    ckpt = os.path.join(out, "checkpoints")
    shutil.rmtree(os.path.join(ckpt, "step-000002"))  # as a kill after step 1 left it
    shutil.rmtree(os.path.join(out, "lora"))
    rows = s.read_text().splitlines()
    s.write_text("\n".join([json.dumps(dict(json.loads(rows[0]), kl=9.0))] + rows[1:]) + "\n")
    capsys.readouterr()
    err = dies(capsys, *args, "--max-steps", 2)
    assert f"inputs[{s}]" in err and err.count("\n") == 0 and not os.path.exists(os.path.join(out, "lora"))


def test_bad_numbers_dtype_and_paths_end_in_one_line(samples, tmp_path, capsys):
    s = os.path.join(samples, "samples.jsonl")
    for value in ("nan", "inf"):
        assert "invalid finite number value" in dies(capsys, "--samples", s, "--out-dir", tmp_path / "a", "--lr", value)
    assert "--lr 2.0 must be in [0, 1]" in dies(capsys, "--samples", s, "--out-dir", tmp_path / "a", "--lr", 2)
    assert "--label other" in dies(capsys, "--samples", s, "--out-dir", tmp_path / "a", "--label", "other")
    err = dies(capsys, "--samples", s, "--out-dir", tmp_path / "a", "--dtype", "float16")
    assert "--dtype float16 is not supported" in err and "bfloat16" in err
    (tmp_path / "file").write_text("")
    assert f"--out-dir {tmp_path / 'file'} is a file" in dies(capsys, "--samples", s, "--out-dir", tmp_path / "file")
    assert not os.path.exists(tmp_path / "a")


def test_running_out_of_gpu_memory_names_the_flags_and_leaves_no_run(samples, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB")
    monkeypatch.setattr(torch.Tensor, "log_softmax", oom)  # the first forward's log π_θ
    err = dies(capsys, "--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", tmp_path / "a", *STEPS)
    assert "Traceback" not in err and err.splitlines()[-1:] == ["error: out of GPU memory at step 1 with --batch-size 8; lower --batch-size and "
                                "raise --grad-accum so that they still multiply to 16 records a step"]
    assert sorted(os.listdir(tmp_path / "a")) == [".train.lock", "train_config.json"]  # no result


@pytest.mark.parametrize("kind, message", [("binary", "not UTF-8 text"), ("directory", "is a directory"),
                                           ("surrogate", "lone surrogate")])
def test_samples_that_are_not_text_lines_end_in_one_line(tmp_path, capsys, kind, message):
    path = tmp_path / "samples.jsonl"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD).replace('"q"', '"\\ud800"') + "\n")
    err = dies(capsys, "--samples", path, "--out-dir", tmp_path / "o")
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err and str(path) in err


def test_a_second_run_on_the_same_out_dir_is_refused(samples, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    with open(tmp_path / "o" / ".train.lock", "a+") as f:  # another train.py holds the directory
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242")
        f.flush()
        err = dies(capsys, "--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", tmp_path / "o")
    assert "in use by another train run (pid 4242)" in err


def test_grad_accum_that_does_not_divide_among_processes_is_refused(samples, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "WORLD_SIZE", 2)  # as under torchrun --nproc_per_node 2
    err = dies(capsys, "--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", tmp_path, "--grad-accum", 3)
    assert "--grad-accum 3 does not divide among 2 processes" in err


def test_damaged_train_config_on_a_rerun_ends_in_one_line(samples, tmp_path, capsys):
    (tmp_path / "train_config.json").write_text('{"config": {"expert": "x", "sam')
    err = dies(capsys, "--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", tmp_path)
    assert err.startswith(f"error: {tmp_path / 'train_config.json'} is damaged (not valid JSON); delete {tmp_path}")
    assert err.count("\n") == 0


@pytest.mark.parametrize("config", [{"config": []}, {"config": {"expert": 5}}, {"config": {"system_prompt": 7}}])
def test_a_sample_config_of_the_wrong_shape_ends_in_one_line(config, tmp_path, capsys):
    (tmp_path / "samples.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "sample_config.json").write_text(json.dumps(config))
    err = dies(capsys, "--samples", tmp_path / "samples.jsonl", "--out-dir", tmp_path / "o")
    assert err.startswith(f"error: {tmp_path / 'sample_config.json'} is damaged") and err.count("\n") == 0


def test_a_train_config_of_the_wrong_shape_on_a_rerun_ends_in_one_line(samples, tmp_path, capsys):
    (tmp_path / "train_config.json").write_text('{"config": []}')
    err = dies(capsys, "--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", tmp_path)
    assert err.startswith(f"error: {tmp_path / 'train_config.json'} is damaged") and err.count("\n") == 0


def test_a_prefix_longer_than_the_context_is_refused(tiny_models, tmp_path, capsys):
    from transformers import AutoConfig
    context = AutoConfig.from_pretrained(tiny_models["expert"]).max_position_embeddings
    long = dict(GOOD, prefix_ids=[5] * context)  # with the chat prompt, past the last position it has
    (tmp_path / "samples.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(long) + "\n")
    err = dies(capsys, "--samples", tmp_path / "samples.jsonl", "--out-dir", tmp_path / "o",
               "--expert", tiny_models["expert"])
    assert f"samples.jsonl:2: the prompt and prefix are longer than the expert's context ({context} tokens)" in err


def test_a_failed_first_step_leaves_no_result(samples, tmp_path, capsys):
    """A non-finite loss stops training with one line. At step 1 (here: a LoRA scaling that is inf
    in float32, so 0·inf = nan) nothing but the run's record is written, so the corrected command
    runs in the same directory (its record replaced: no result of the failed one exists)."""
    s, out = os.path.join(samples, "samples.jsonl"), tmp_path / "run"
    err = dies(capsys, "--samples", s, "--out-dir", out, "--max-steps", 2, "--lora-alpha", 10 ** 40)
    assert err.splitlines()[-1].startswith("error: step 1: the loss is nan") and "Traceback" not in err
    assert sorted(os.listdir(out)) == [".train.lock", "train_config.json"]  # a record, no result
    (out / "train.html").mkdir()  # and a page that cannot be written does not stop the run either
    train_main("--samples", s, "--out-dir", out, "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1)
    assert "warning: could not write" in capsys.readouterr().err
    assert len(read_log(out)) == 2 and os.path.exists(out / "lora" / "adapter_model.safetensors")


def cut_back(out, run, step):
    """A copy of the finished run `out` at `run`, as it stood when checkpoint `step` was the latest."""
    shutil.copytree(out, run)
    for d in ("lora", "merged"):
        shutil.rmtree(os.path.join(run, d), ignore_errors=True)
    ckpt = os.path.join(run, "checkpoints")
    for d in os.listdir(ckpt):
        if d.startswith("step-") and d > f"step-{step:06d}":
            shutil.rmtree(os.path.join(ckpt, d))
    with open(os.path.join(ckpt, "latest.json"), "w") as f:
        json.dump({"step": step, "dir": f"step-{step:06d}"}, f)
    return ckpt


def test_a_non_finite_loss_after_a_resume_saves_nothing_new(samples, trained, tmp_path, capsys):
    run = str(tmp_path / "run")
    ckpt = cut_back(trained[0], run, 20)
    adapter = os.path.join(ckpt, "step-000020", "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(adapter).items()}, adapter)  # a run gone bad
    err = dies(capsys, "--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", run, *STEPS)
    assert err.splitlines()[-1].startswith("error: step 21: the loss is nan") and "Traceback" not in err
    assert len(read_log(run)) == 20 and sorted(os.listdir(ckpt)) == ["latest.json", "step-000020"]
    assert json.load(open(os.path.join(ckpt, "latest.json")))["step"] == 20 and not os.path.exists(os.path.join(run, "lora"))


def test_unreadable_latest_checkpoint_falls_back_to_the_one_before(samples, trained, tmp_path, capsys):
    run = str(tmp_path / "run")
    ckpt = cut_back(trained[0], run, 30)
    os.truncate(os.path.join(ckpt, "step-000030", "state.pt"), 300)  # a disk that filled up, a bad copy
    train_main("--samples", os.path.join(samples, "samples.jsonl"), "--out-dir", run, *STEPS)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(notices) == 1 and "step-000030 cannot be read" in notices[0] and "resuming from step-000020" in notices[0]
    assert same_adapter(os.path.join(run, "lora"), os.path.join(trained[0], "lora"))
    assert [row["loss"] for row in read_log(run)] == [row["loss"] for row in read_log(trained[0])]


def test_latest_json_naming_a_gone_checkpoint_and_nothing_readable(trained, tmp_path, capsys):
    ckpt = cut_back(trained[0], str(tmp_path / "run"), 30)
    shutil.rmtree(os.path.join(ckpt, "step-000030"))
    name, weights, state = train.load_checkpoint(ckpt)
    assert name == "step-000020" and state["step"] == 20 and weights
    assert "step-000030 (named by latest.json) is gone: resuming from step-000020" in capsys.readouterr().err
    os.truncate(os.path.join(ckpt, "step-000020", "adapter_model.safetensors"), 10)
    with pytest.raises(SystemExit) as e:
        train.load_checkpoint(ckpt)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no readable checkpoint" in err
    assert "step-000020 cannot be read" in err and f"delete {ckpt} to start again from step 0" in err


# -----------------------------------------------------------------------------
# --label: what the expert is tuned towards (the paper's v_C, or an ablation)


def test_label_targets_by_hand(tmp_path, capsys):
    v_C, p = [0.5, 0.3, 0.2], [0.2, 0.5, 0.1]
    assert train.target(v_C, p, "contrast") == v_C
    assert train.target(v_C, p, "expert") == pytest.approx([0.25, 0.625, 0.125])
    assert train.target(v_C, p, "greedy") == [0.0, 1.0, 0.0]
    assert train.target(v_C, [0.4, 0.1, 0.4], "greedy") == [1.0, 0.0, 0.0]  # a tie: the first in V
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(dict(GOOD, p_expert=[0.1, 0.3])) + "\n")
    assert [r["target"] for r in train.read_samples(str(path), "expert")[0]] == [pytest.approx([0.25, 0.75])]
    assert [r["target"] for r in train.read_samples(str(path), "greedy")[0]] == [[0.0, 1.0]]
    assert [r["target"] for r in train.read_samples(str(path))[0]] == [[0.75, 0.25]]
    for line, message in [(GOOD, "sample.py writes it"), (dict(GOOD, p_expert=[0.1]), "for each of"),
                          (dict(GOOD, p_expert=[0.0, 0.0]), "not all 0"), (dict(GOOD, p_expert=[0.5, -1]), "≥ 0")]:
        path.write_text(json.dumps(dict(GOOD, p_expert=[0.1, 0.3])) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(SystemExit):
            train.read_samples(str(path), "greedy")
        err = capsys.readouterr().err
        assert f"{path}:2:" in err and message in err and err.count("\n") == 1


def test_official_sample_files_refuse_labels_that_need_p_expert(tmp_path, capsys):
    path = tmp_path / "cd_dist_samples.jsonl"
    path.write_text(json.dumps(dict(prompt_id="q", prefix=" p", token_ids=[3, 4], weights=[0.75, 0.25])) + "\n")
    for label in ("expert", "greedy"):
        err = dies(capsys, "--samples", path, "--out-dir", tmp_path / "o", "--label", label)
        assert "official LightReasoner sample file" in err and f"--label {label}" in err and "--label contrast" in err


@pytest.fixture(scope="module")
def samples_p(tiny_models, samples, tmp_path_factory):
    """The samples with "p_expert" and "p_amateur" (π_E(a), π_A(a) for a in V), as sample.py writes
    them; where this checkout's sample.py does not write them yet, they are computed here from the
    tiny models, one forward pass per record."""
    out = tmp_path_factory.mktemp("sampled_p")
    shutil.copy(os.path.join(samples, "sample_config.json"), out)
    tok, records, inputs = records_and_inputs(tiny_models, samples)
    rows = [json.loads(line) for line in open(os.path.join(samples, "samples.jsonl"))]
    if "p_expert" not in rows[0]:
        for name in ("expert", "amateur"):
            model = load_model(tiny_models[name], "cpu", torch.float32)
            for row, x in zip(rows, inputs):
                with torch.no_grad():
                    p = model(torch.tensor([x])).logits[0, -1].float().softmax(-1)
                row[f"p_{name}"] = p[row["token_ids"]].tolist()
    with open(out / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(out)


@pytest.mark.parametrize("label", ["expert", "greedy"])
def test_label_ablations_train_towards_their_target(tiny_models, samples_p, tmp_path, label):
    """With --lr 0 the logged loss is the untrained expert's KL to the step's targets: for expert,
    Σ t(a) log(t(a)/π(a)) with t = π_E renormalised over V; for greedy, −log π(argmax π_E)."""
    out = tmp_path / "run"
    g = train_main("--samples", os.path.join(samples_p, "samples.jsonl"), "--out-dir", out, "--label", label,
                   "--max-steps", 1, "--lr", 0)
    assert json.load(open(out / "train_config.json"))["config"]["label"] == label
    tok, records, inputs = records_and_inputs(tiny_models, samples_p)
    rows = [json.loads(line) for line in open(os.path.join(samples_p, "samples.jsonl"))]
    expert = load_model(tiny_models["expert"], "cpu", torch.float32)
    by_hand = []
    for i in [g["epoch_order"](len(records), 1337, 0)[p] for p in range(16)]:
        with torch.no_grad():
            logits = expert(torch.tensor([inputs[i]])).logits[0, -1].double()
        log_pi = (logits - torch.logsumexp(logits, 0)).tolist()
        ids, p = rows[i]["token_ids"], rows[i]["p_expert"]
        if label == "expert":
            by_hand.append(sum(pa / sum(p) * (math.log(pa / sum(p)) - log_pi[a]) for a, pa in zip(ids, p) if pa > 0))
        else:
            by_hand.append(-log_pi[ids[p.index(max(p))]])
    assert read_log(out)[0]["loss"] == pytest.approx(sum(by_hand) / 16, rel=1e-5)


# -----------------------------------------------------------------------------
# several processes: torchrun, DistributedDataParallel, the same numbers as one process


def adapter_close(a, b):
    wa, wb = load_file(os.path.join(a, "adapter_model.safetensors")), load_file(os.path.join(b, "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


def test_torchrun_resumes_a_run_and_matches_one_process(samples, trained, tmp_path):
    """The single-process run, cut back to its step-20 checkpoint, resumed under torchrun with 2
    processes (Gloo), each taking one micro-batch of every step: each step's logged (global) loss
    and the final adapter equal the single-process run's, LoRA dropout included (its masks are
    fixed per micro-batch). Rank 0 alone reads the checkpoint and writes the files. One launch
    covers resume and the two-process step, each launch costing seconds of start-up."""
    out, s = trained[0], os.path.join(samples, "samples.jsonl")
    run = str(tmp_path / "ddp")
    ckpt = cut_back(out, run, 20)
    os.remove(os.path.join(run, "train.html"))
    proc = run_torchrun("train.py", "--samples", s, "--out-dir", run, *STEPS)
    assert proc.stdout.count("resuming") == proc.stdout.count("trained 30 steps (10 this run)") == 1
    assert "2 processes" in proc.stdout
    one, two = read_log(out), read_log(run)
    assert [row["step"] for row in two] == list(range(1, 31)) and all(row["records"] == 16 for row in two)
    for a, b in zip(one[20:], two[20:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"]
    adapter_close(os.path.join(run, "lora"), os.path.join(out, "lora"))
    adapter_close(os.path.join(ckpt, "step-000030"), os.path.join(out, "checkpoints", "step-000030"))
    assert sorted(os.listdir(ckpt)) == ["latest.json", "step-000020", "step-000030"]
    assert os.path.exists(os.path.join(run, "train.html"))


# -----------------------------------------------------------------------------
# out/train.html


class Page(html.parser.HTMLParser):
    """The polylines of a page by class, its tags and its text."""
    def __init__(self, text):
        super().__init__()
        self.lines, self.tags, self.text = {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "polyline":
            a = dict(attrs)
            self.lines[a["class"]] = [tuple(map(float, p.split(","))) for p in a["points"].split()]

    def handle_data(self, data):
        self.text.append(data)


def test_train_page_shows_the_log_and_the_configuration(trained, tmp_path):
    out = trained[0]
    log, config = read_log(out), json.load(open(os.path.join(out, "train_config.json")))
    page = Page(open(os.path.join(out, "train.html"), encoding="utf-8").read())
    assert set(page.lines) == {"loss", "smooth", "lr", "rate"}
    assert all(len(points) == len(log) == 30 for points in page.lines.values())
    xs = [x for x, _ in page.lines["loss"]]
    assert xs == sorted(xs) and len(set(xs)) == 30
    ys = [y for _, y in page.lines["loss"]]  # SVG y grows downwards: the highest loss is at the top
    assert ys.index(min(ys)) == max(range(30), key=lambda i: log[i]["loss"])
    text = "".join(page.text)
    assert config["config"]["samples"] in text and str(config["totals"]["records_seen"]) in text
    # values from the files are escaped: a system prompt made of HTML stays text
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log[:3]))
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    (tmp_path / "train_config.json").write_text(json.dumps(dict(config, config=dict(config["config"], system_prompt=evil))))
    page = Page(train.train_page(str(tmp_path)))
    assert "script" not in page.tags and "img" not in page.tags and evil in "".join(page.text)
    assert len(page.lines["loss"]) == 3


# -----------------------------------------------------------------------------
# the SFT baseline: whole answers (sample.py --select sft), cross-entropy on every token


@pytest.fixture(scope="module")
def sft_samples(tiny_models, tmp_path_factory):
    """A samples file as sample.py --select sft writes it (beside its sample_config.json): six whole
    answers of 3 to 12 random tokens, ending on <|endoftext|>; the fifth is a prefix of the fourth's
    answer to the same question, so packing puts the two in one row."""
    out = tmp_path_factory.mktemp("sft_sampled")
    texts = [json.loads(line)["question"] for line in open(GSM8K_FIXTURE)][:5]
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(3, 400, (n,), generator=g).tolist() + [0] for n in (2, 11, 6, 9)]
    answers.append(answers[3][:5])
    rows = [dict(index=i, id=q, question=q, completion_ids=ids) for i, (q, ids) in enumerate(zip(texts, answers))]
    rows.append(dict(rows[3], index=5, completion_ids=answers[3][:5]))
    rows[4] = dict(rows[4], completion_ids=torch.randint(3, 400, (7,), generator=g).tolist())
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dict(expert=tiny_models["expert"], amateur=None, select="sft", system_prompt="Please reason step by step.")
    (out / "sample_config.json").write_text(json.dumps(dict(config=config, totals=None)))
    return str(out / "samples.jsonl"), rows


def answer_inputs(tiny_models, rows):
    tok = load_tokenizer(tiny_models["expert"])
    prompts = [chat_prompt_ids(tok, r["question"], "Please reason step by step.") for r in rows]
    return tok, [p + r["completion_ids"] for p, r in zip(prompts, rows)], [len(p) for p in prompts]


def test_sft_records_train_at_lr_0_with_the_loss_of_an_independent_cross_entropy(tiny_models, sft_samples, tmp_path,
                                                                                  capsys):
    path, rows = sft_samples
    out = tmp_path / "run"
    g = train_main("--samples", path, "--out-dir", out, "--max-steps", 3, "--batch-size", 2, "--lr", 0)
    tok, inputs, starts = answer_inputs(tiny_models, rows)
    expert = load_model(tiny_models["expert"], "cpu", torch.float32)
    stream = [g["epoch_order"](6, 1337, p // 6)[p % 6] for p in range(12)]  # 3 steps × 4 answers
    for row, step in zip(read_log(out), range(3)):
        nll, n = 0.0, 0
        for i in stream[4 * step:4 * step + 4]:  # −log π(x_t | x_<t) at every answer token, from full logits
            with torch.no_grad():
                logits = expert(torch.tensor([inputs[i]])).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[starts[i] - 1:-1], torch.tensor(inputs[i][starts[i]:]),
                                                     reduction="sum").item()
            n += len(inputs[i]) - starts[i]
        assert row["lr"] == 0 and row["records"] == 4 and row["loss"] == pytest.approx(nll / n, rel=1e-5)
    run = json.load(open(out / "train_config.json"))
    assert run["config"]["label"] == "sft" and run["config"]["records"] == 6
    assert run["totals"]["tuned_tokens"] == sum(len(rows[i]["completion_ids"]) for i in stream)
    assert run["totals"]["records_seen"] == 12 and run["totals"]["device"] == "cpu"
    assert "12 answers seen" in capsys.readouterr().out
    err = dies(capsys, "--samples", path, "--out-dir", tmp_path / "x", "--label", "greedy")
    assert "holds whole answers (sample.py --select sft)" in err and "--label greedy does not apply" in err


def test_sft_packed_loss_and_gradients_equal_one_answer_per_forward(tiny_models, sft_samples):
    from peft import LoraConfig, get_peft_model
    _, rows = sft_samples
    tok, inputs, starts = answer_inputs(tiny_models, rows)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_models["expert"], "cpu", torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    assert len(train.pack(inputs)[0]) == 5  # the answer that is a prefix of another shares its row
    nll, tokens = train.answer_nll(model, inputs, starts, tok.pad_token_id)
    n = sum(len(x) - s for x, s in zip(inputs, starts))  # the step's mean over answer tokens, as train.py takes it
    (nll.sum() / n).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    single = []
    for x, s in zip(inputs, starts):
        one, _ = train.answer_nll(model, [x], [s], tok.pad_token_id)
        (one.sum() / n).backward()
        single.append(one[0].detach())
    torch.testing.assert_close(nll.detach(), torch.stack(single), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(packed[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    assert tokens == sum(map(len, inputs)) - len(inputs[5])


def test_sft_steps_shared_by_two_processes_add_up_to_one_process(tiny_models, sft_samples, monkeypatch):
    """Under torchrun each process backpropagates its micro-batches' cross-entropy divided by the whole
    step's answer tokens / N (micro_batches gives both), and DDP averages the N gradients: together, one
    process's step. Simulated in this process (ranks 0 and 1 of 2, DDP's average by hand) to spare a launch."""
    from peft import LoraConfig, get_peft_model
    tok, inputs, starts = answer_inputs(tiny_models, sft_samples[1])
    sizes = [len(x) - s for x, s in zip(inputs, starts)]
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_models["expert"], "cpu", torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    loss_fn = train.PackedKL(model, train.answer_nll)
    monkeypatch.setattr(train, "batch_size", 2)

    def step(rank, world):  # the second step (records 4..7 of the stream), as process `rank` of `world` runs it
        monkeypatch.setattr(train, "RANK", rank)
        monkeypatch.setattr(train, "WORLD_SIZE", world)
        model.zero_grad()
        mine, per = train.micro_batches(len(inputs), 4, sizes)
        loss = 0.0
        for batch in mine.values():  # the loop of train.py's __main__ (DDP's mean taken by hand below)
            nll, _ = loss_fn([inputs[i] for i in batch], [starts[i] for i in batch], tok.pad_token_id)
            (nll.sum() / per).backward()
            loss += nll.sum().item()
        return loss, per * world, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (loss, divisor, grads), (loss_0, divisor_0, grads_0), (loss_1, divisor_1, grads_1) = step(0, 1), step(0, 2), step(1, 2)
    stream = [train.epoch_order(6, 1337, p // 6)[p % 6] for p in range(4, 8)]
    assert divisor == divisor_0 == divisor_1 == sum(sizes[i] for i in stream)  # the step's answer tokens
    assert loss_0 + loss_1 == pytest.approx(loss, rel=1e-6) and loss_0 != loss
    for n in grads:
        torch.testing.assert_close((grads_0[n] + grads_1[n]) / 2, grads[n], rtol=1e-5, atol=1e-6, msg=n)
