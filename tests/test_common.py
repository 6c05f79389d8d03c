"""common.py: JSONL with file:line errors and kill -9 recovery, atomic JSON, flags, prompts, loading."""
import json
import os
import sys

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


@pytest.mark.parametrize("text, message", [('{"a": 1}\n{"a": \n', "d.jsonl:2: malformed JSON"),
                                           ('[1, 2]\n', "d.jsonl:1: expected a JSON object")])
def test_read_jsonl_dies_with_file_and_line(tmp_path, capsys, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
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
