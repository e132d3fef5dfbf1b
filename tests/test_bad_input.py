"""Every class of bad input ends in one line, `error: PATH[:LINE]: what is wrong, and what to do`, exit status 2:
no traceback, and nothing half-written. One test per class, run through the scripts as a user calls them."""
import json
import runpy
import sys

import pytest
import torch

from conftest import ROOT, run_script
from minimind import DEFAULT_TOKENIZER, cli
from minimind.checkpoint import save_model
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import Tokenizer


def call(script: str, argv: list, capsys, monkeypatch) -> str:
    """Run script's main() in this process as `python script argv...`; return its one stderr line."""
    main = runpy.run_path(str(ROOT / script), run_name="bad_input_test")["main"]
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) >= 1 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny real model directory (random weights) with the bundled tokenizer."""
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    out = tmp_path_factory.mktemp("model") / "m"
    save_model(model, tok, str(out))
    return out


# --- data files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "\n\n   \n"], ids=["empty", "blank-lines-only"])
def test_empty_pretrain_file(tmp_path, capsys, monkeypatch, content):
    data = tmp_path / "pretrain.jsonl"
    data.write_text(content)
    err = call("train_pretrain.py", ["--data_path", data, "--out_dir", tmp_path / "out"], capsys, monkeypatch)
    assert f"{data}: no records" in err and "empty" in err
    assert not (tmp_path / "out").exists()                       # nothing half-written


def test_empty_sft_file(tmp_path, capsys, monkeypatch, model_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n")
    err = call("train_full_sft.py", ["--from_weight", model_dir, "--data_path", data, "--out_dir", tmp_path / "o"],
               capsys, monkeypatch)
    assert err.startswith(f"error: {data}: ") and "no records" in err
    assert not (tmp_path / "o").exists()


def test_directory_where_a_file_belongs(tmp_path, capsys, monkeypatch):
    err = call("train_pretrain.py", ["--data_path", tmp_path, "--out_dir", tmp_path / "out"], capsys, monkeypatch)
    assert f"{tmp_path}: is a directory" in err and "--data_path FILE" in err


def test_bad_json_line_names_file_and_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "pretrain.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken}\n')
    err = call("prepare_data.py", ["stats", "--data_path", data], capsys, monkeypatch)
    assert f"{data}:2: invalid JSON" in err


# --- weights, configs, tokenizers ------------------------------------------------------------------------------
def test_garbage_weight_file(tmp_path, capsys, monkeypatch, model_dir):
    bad = tmp_path / "m"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((model_dir / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    err = call("convert_model.py", [bad, "--out_dir", tmp_path / "o"], capsys, monkeypatch)
    assert f"{bad}/model.safetensors: not a readable safetensors file" in err
    assert not (tmp_path / "o").exists()


def test_truncated_weight_file(tmp_path, capsys, monkeypatch, model_dir):
    bad = tmp_path / "m"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(w[:len(w) // 2])     # a download or copy cut short
    err = call("eval_model.py", ["--load_from", bad, "--prompts", "hi"], capsys, monkeypatch)
    assert f"{bad}/model.safetensors: not a readable safetensors file" in err


def test_config_that_does_not_match_its_weights(tmp_path, capsys, monkeypatch, model_dir):
    bad = tmp_path / "m"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (bad / "config.json").write_text(json.dumps(cfg))
    err = call("convert_model.py", [bad, "--out_dir", tmp_path / "o"], capsys, monkeypatch)
    assert "model.safetensors: tensor model.layers.0.mlp" in err and "the config needs" in err


def test_broken_tokenizer_json(tmp_path, capsys, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')   # cut short
    err = call("train_pretrain.py", ["--tokenizer", tok, "--out_dir", tmp_path / "out", "--max_steps", 1],
               capsys, monkeypatch)
    assert f"{tok}/tokenizer.json: not a readable tokenizer.json" in err and "train_tokenizer.py" in err


# --- evaluation files ------------------------------------------------------------------------------------------
def test_mc_csv_without_answer_column(tmp_path, capsys, monkeypatch, model_dir):
    csv = tmp_path / "law_test.csv"
    csv.write_text("id,question,A,B,C,D\n0,Which?,a,b,c,d\n")       # C-Eval's test split: answers withheld
    err = call("eval_model.py", ["--load_from", model_dir, "--mc_path", csv], capsys, monkeypatch)
    assert f"{csv}:1: the header has no 'answer' column" in err and "evaluate on val" in err


def test_mc_answer_that_is_not_a_choice(tmp_path, capsys, monkeypatch, model_dir):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "C"}) + "\n")
    err = call("eval_model.py", ["--load_from", model_dir, "--mc_path", f], capsys, monkeypatch)
    assert f"{f}:1: answer 'C' is not one of A, B" in err


def test_mc_jsonl_missing_field(tmp_path, capsys, monkeypatch, model_dir):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "answer": "A"}) + "\n")
    err = call("eval_model.py", ["--load_from", model_dir, "--mc_path", f], capsys, monkeypatch)
    assert f"{f}:1: missing field 'choices'" in err


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The same path as a user's shell sees it: a separate process, stderr holds exactly one line."""
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    r = run_script("train_pretrain.py", "--data_path", data, "--out_dir", tmp_path / "out", timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: {data}: no records") and "Traceback" not in r.stderr
