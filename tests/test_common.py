"""common.py: JSONL with file:line errors and kill -9 recovery, atomic JSON, flags, prompts, loading."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
import common  # noqa: E402


def test_read_jsonl_skips_blank_lines_and_reports_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert common.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert common.read_jsonl(path, with_lines=True) == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"a": \n', "d.jsonl:2: malformed JSON"),
    (b'[1, 2]\n', "d.jsonl:1: expected a JSON object"),
    (b'{"a": 1}\n\xff\xfe\x00garbage\n', "d.jsonl:2: not UTF-8 text"),
    (b'{"a": "\\ud800"}\n', "d.jsonl:1: holds a lone surrogate escape"),
    (b'{"a": 1}\n' + b"[" * 100_000 + b"\n", "d.jsonl:2: malformed JSON"),  # deep nesting
])
def test_read_jsonl_dies_with_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        common.read_jsonl(path)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_complete_lines_skips_a_half_written_last_line_and_merge_parts_repairs_it(tmp_path):
    path = tmp_path / "d.jsonl"
    assert common.complete_lines(path) == []
    common.append_jsonl(path, [{"a": 1}, {"b": "é"}])
    with open(path, "a") as f:
        f.write('{"c": ')  # what a kill -9 in the middle of a write leaves
    assert common.complete_lines(path) == [{"a": 1}, {"b": "é"}]
    assert path.read_text(encoding="utf-8").endswith('{"c": ')  # only viewed: the file is left as it was
    common.merge_parts(str(path), key=lambda r: next(iter(r)))  # the stage's explicit repair on resume
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "c.json"
    common.write_json(path, {"x": 1})
    common.write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2} and not os.path.exists(f"{path}.tmp")


def test_flags_mirror_the_configuration(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--max-new-tokens", "7", "--beta", "0.5", "--merge"])
    got = common.parse_flags({"max_new_tokens": 128, "beta": 0.4, "merge": False, "out_dir": "out"}, "doc")
    assert got == {"max_new_tokens": 7, "beta": 0.5, "merge": True, "out_dir": "out"}


def test_device_and_dtype_defaults():
    assert common.pick_dtype("auto", "cpu") == torch.float32
    assert common.pick_dtype("auto", "cuda") == torch.bfloat16
    assert common.pick_dtype("bf16", "cpu") == torch.bfloat16
    assert common.position_ids(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_chat_prompt_is_qwen_style(tiny_models):
    tok = common.load_tokenizer(tiny_models["expert"])
    assert tok.padding_side == "left" and tok.pad_token is not None
    text = tok.decode(common.chat_prompt_ids(tok, "What is 2+2?", "Please reason step by step."))
    assert text == ("<|im_start|>system\nPlease reason step by step.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_loading_something_that_is_not_a_model_dies(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.load_model(str(tmp_path), "cpu", torch.float32)
    assert e.value.code == 2 and "not a model" in capsys.readouterr().err


def test_download_uses_the_cache_and_fails_clearly(tmp_path, capsys):
    cached = tmp_path / "train.jsonl"
    cached.write_text("{}\n")
    assert common.download("http://127.0.0.1:9/none", str(cached)) == str(cached)  # no network touched
    with pytest.raises(SystemExit) as e:
        common.download("http://127.0.0.1:9/none", str(tmp_path / "x" / "t.jsonl"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "put the file at" in err and not (tmp_path / "x" / "t.jsonl").exists()


def test_write_jsonl_rewrites_whole_lines_atomically(tmp_path):
    path = tmp_path / "d.jsonl"
    common.append_jsonl(path, [{"a": 1}, {"b": 2}])
    common.write_jsonl(path, [{"b": "é"}])
    assert path.read_text(encoding="utf-8") == '{"b": "é"}\n' and not os.path.exists(f"{path}.tmp")


# -----------------------------------------------------------------------------
# bad input ends in one line: flags, files that are not what they should be, damaged side files


@pytest.mark.parametrize("argv, message", [
    (["--beta", "nan"], "--beta: invalid finite number value: 'nan'"),
    (["--beta", "inf"], "--beta: invalid finite number value: 'inf'"),
    (["--max-new-tokens", "1.5"], "--max-new-tokens: invalid int value: '1.5'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_end_in_one_line_not_a_usage_block(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["x", *argv])
    with pytest.raises(SystemExit) as e:
        common.parse_flags({"max_new_tokens": 128, "beta": 0.4, "merge": False}, "doc")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err


def test_valid_surrogate_pairs_are_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "\\ud83d\\ude00"}\n')
    assert common.read_jsonl(path) == [{"a": "\U0001F600"}]


def test_a_directory_where_a_file_should_be(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.read_jsonl(tmp_path, "samples file")
    assert e.value.code == 2 and "is a directory, not a file" in capsys.readouterr().err


def test_an_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        common.make_dir(str(tmp_path / "f"))
    assert e.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b'{"config": {"beta": 0.4', b"[1, 2]\n", b"\x00\xff"])
def test_damaged_side_json_says_what_to_do(tmp_path, capsys, content):
    path = tmp_path / "sample_config.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        common.read_json(path, fix="delete it to start over")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is damaged" in err and "delete it to start over" in err


def test_a_damaged_line_inside_our_own_file_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "rollouts.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": \n{"index": 2}\n')
    with pytest.raises(SystemExit) as e:
        common.complete_lines(path)
    assert e.value.code == 2 and "rollouts.jsonl:2" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_ends_in_one_line_and_leaves_no_temporary_file(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["x", "--completions", os.fsdecode(b"vllm\xff.jsonl")])
    with pytest.raises(SystemExit) as e:
        common.parse_flags({"completions": ""}, "doc")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--completions b'vllm\\xff.jsonl' is not UTF-8" in err
    with pytest.raises(UnicodeEncodeError):
        common.write_json(str(tmp_path / "run.json"), {"completions": os.fsdecode(b"vllm\xff.jsonl")})
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# one run per output directory


def test_a_second_run_on_a_locked_dir_stops_and_a_dead_owners_lock_is_taken_over(tmp_path):
    hold = ("import sys, time; sys.path.insert(0, sys.argv[1]); import common; "
            "common.lock_dir(sys.argv[2], 'sample'); print('locked', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", hold, ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-c", hold, ROOT, str(tmp_path)], capture_output=True, text=True)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"error: {tmp_path} is in use by another sample run (pid {owner.pid}); "
            "wait for it to end, or pass another --out-dir"]
    finally:
        owner.kill()  # as kill -9: the OS drops the lock
        owner.wait()
    common.lock_dir(str(tmp_path), "sample")  # taken over
    assert (tmp_path / ".sample.lock").read_text() == str(os.getpid())


# -----------------------------------------------------------------------------
# models from the hub: fail fast when it cannot be reached


def test_an_unreachable_hub_fails_in_one_line_quickly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import common; common.load_tokenizer('nobody/nothing')"
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.time() - t < 30
    assert proc.stderr.strip().splitlines() == [
        "error: cannot load nobody/nothing: it is not in the local cache and 127.0.0.1 cannot be reached "
        "([Errno 111] Connection refused); download it once with hub access, or pass a local model directory"]


# -----------------------------------------------------------------------------
# pages


def test_page_escapes_data_and_a_failing_page_never_stops_the_stage(tmp_path, capsys):
    path = tmp_path / "p.html"
    assert common.write_page(str(path), lambda: common.page("<b>", common.esc("<script>alert(1)</script>")))
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "<title>&lt;b&gt;</title>" in text
    assert not common.write_page(str(path), lambda: 1 / 0)
    assert "could not write" in capsys.readouterr().err and path.read_text() == text  # old page kept
    assert common.heat(0, 1) == "rgb(255,255,255)" and common.heat(5, 1) == common.heat(1, 1) != common.heat(0.5, 1)


def test_esc_shows_bidi_controls_by_name_so_they_cannot_reorder_a_page():
    assert common.esc("\\boxed{\u202e81}") == "\\boxed{[U+202E]81}"  # shown as "18" without the guard
    controls = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    assert common.esc(controls) == "".join(f"[U+{ord(c):04X}]" for c in controls)
    assert common.esc("שלום 5 <b>") == "שלום 5 &lt;b&gt;"  # right-to-left letters themselves are text


# -----------------------------------------------------------------------------
# several processes


def test_torchrun_ranks_join_sum_and_only_rank_0_reports_an_error(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\nimport common\n"
                      "dev = common.init_distributed('cpu')\n"
                      "sys.stdout.write(f'sum {common.sum_over_ranks([common.RANK + 1, 1], dev)}\\n'); sys.stdout.flush()\n"
                      "common.barrier()\n"
                      "common.die('bad input')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # torchrun's own exit code (1), after its report of the failed rank
    assert proc.stdout.count("sum [3.0, 2.0]") == 2
    assert proc.stderr.startswith("error: bad input\n") and proc.stderr.count("error: bad input") == 1
    assert 'job.py", line' not in proc.stderr  # no traceback from our processes (torchrun prints its own)


# -----------------------------------------------------------------------------
# the run directory: fingerprints, start_run, finish_run, part files


def test_fingerprint_follows_content_not_path_and_weights_go_by_size(tmp_path, monkeypatch):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"question": "1+1"}\n')
    b.write_text('{"question": "1+1"}\n')
    first = common.fingerprint(str(a))
    assert first.startswith("sha256:") and first == common.fingerprint(str(b))  # the bytes, not the name
    assert common.fingerprint("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id is its own
    a.write_text('{"question": "1+2"}\n')  # same size, other content
    assert common.fingerprint(str(a)) != first
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 100)
    (model / ".sample.lock").write_text("123")
    before = common.fingerprint(str(model))
    (model / ".sample.lock").write_text("456")  # dot files are not content
    assert common.fingerprint(str(model)) == before
    (model / "config.json").write_text('{"a": 1}')
    assert common.fingerprint(str(model)) != before
    monkeypatch.setattr(common, "WEIGHTS_BYTES", 10)  # the weights are now "big": read by size only
    big = common.fingerprint(str(model))
    (model / "model.safetensors").write_bytes(b"y" * 100)
    assert common.fingerprint(str(model)) == big
    (model / "model.safetensors").write_bytes(b"y" * 101)
    assert common.fingerprint(str(model)) != big


def test_start_run_writes_resumes_and_refuses_a_changed_input_or_results_without_record(tmp_path, capsys):
    data, out = tmp_path / "q.jsonl", tmp_path / "out"
    data.write_text('{"question": "1+1"}\n')
    config = lambda: dict(beta=0.4, inputs={str(data): common.fingerprint(str(data))})  # noqa: E731
    results = [str(out / "samples.jsonl")]
    try:
        assert common.start_run(str(out), "rec.json", config(), results, "test", extra=1) is None
        saved = json.loads((out / "rec.json").read_text())
        assert saved == {"config": config(), "extra": 1, "totals": None}  # written before any result
        (out / "samples.jsonl").write_text("{}\n")
        common.release_locks()
        assert common.start_run(str(out), "rec.json", config(), results, "test") == saved  # same: resumed
        common.release_locks()
        data.write_text('{"question": "1+3"}\n')  # the input's content changes, its path does not
        with pytest.raises(SystemExit) as e:
            common.start_run(str(out), "rec.json", config(), results, "test")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and f"inputs[{data}]" in err and f"delete {out}" in err
        common.release_locks()
        with pytest.raises(SystemExit):
            common.start_run(str(out), "rec.json", dict(config(), beta=0.5), results, "test")
        assert "beta" in capsys.readouterr().err
        common.release_locks()
        (out / "rec.json").unlink()  # results, but nothing says what made them
        with pytest.raises(SystemExit) as e:
            common.start_run(str(out), "rec.json", config(), results, "test")
        err = capsys.readouterr().err
        assert e.value.code == 2 and "holds samples.jsonl but no rec.json" in err and not (out / "rec.json").exists()
        common.release_locks()
        (out / "rec.json").write_text('{"config": ')
        with pytest.raises(SystemExit):
            common.start_run(str(out), "rec.json", config(), results, "test")
        assert "rec.json is damaged" in capsys.readouterr().err
    finally:
        common.release_locks()
    (out / "rec.json").write_text(json.dumps(saved))
    common.finish_run(str(out), "rec.json", {"n": 3}, extra=2)
    assert json.loads((out / "rec.json").read_text()) == dict(saved, extra=2, totals={"n": 3})


def test_merge_parts_folds_every_ranks_file_in_order_once(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    common.append_jsonl(path, [{"i": 2}])
    common.append_jsonl(path + ".rank0", [{"i": 0}, {"i": 2}])  # question 2 twice (a kill during a merge)
    common.append_jsonl(path + ".rank1", [{"i": 1}])
    with open(path + ".rank1", "a") as f:
        f.write('{"i": 3')  # a half line a kill left
    rows = common.merge_parts(path, key=lambda r: r["i"])
    assert sorted(rows) == [0, 1, 2] and not list(tmp_path.glob("*.rank*"))
    assert open(path).read() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'


def test_the_lenient_loaders_never_die_and_a_page_survives_a_die_inside(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n[1]\n\xff\n{"b": \n\n{"c": 2}\n')
    assert common.peek_jsonl(str(path)) == ([{"a": 1}, {"c": 2}], 3)
    assert common.peek_jsonl(str(tmp_path / "none.jsonl")) == ([], 0)
    before = path.read_bytes()
    ok = common.write_page(str(tmp_path / "p.html"), lambda: common.die("a damaged file"))
    assert ok is False and "could not write" in capsys.readouterr().err and path.read_bytes() == before


def test_first_line_and_the_sampled_expert(tmp_path):
    assert common.first_line(ValueError("bad\nmore")) == "bad" and common.first_line(KeyError()) == "KeyError"
    assert common.sampled_expert(str(tmp_path)) == common.DEFAULT_EXPERT == "Qwen/Qwen2.5-Math-1.5B"
    common.write_json(str(tmp_path / "sample_config.json"), {"config": {"expert": "me/x"}, "totals": None})
    assert common.sampled_expert(str(tmp_path)) == "me/x"
