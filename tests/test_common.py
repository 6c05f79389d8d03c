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


def test_complete_lines_cuts_a_half_written_last_line(tmp_path):
    path = tmp_path / "d.jsonl"
    assert common.complete_lines(path) == []
    common.append_jsonl(path, [{"a": 1}, {"b": "é"}])
    with open(path, "a") as f:
        f.write('{"c": ')  # what a kill -9 in the middle of a write leaves
    assert common.complete_lines(path) == [{"a": 1}, {"b": "é"}]
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
