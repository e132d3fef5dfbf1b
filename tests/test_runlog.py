"""What a run shows: swanlab goes where the user's login says (no network here), MiniMind's --use_wandb spelling
works, and metrics.jsonl carries tokens/s for every stage."""
import argparse
import json
import types

import pytest
import torch

from minimind.flags import add_common_args
from minimind.runlog import RunLog, announce, swanlab_mode


def parse(*argv):
    p = argparse.ArgumentParser()
    add_common_args(p, data_path="d.jsonl", out_dir="out", from_weight="none", epochs=1, batch_size=2,
                    learning_rate=1e-3, max_seq_len=32)
    return p.parse_args(list(argv))


def test_use_wandb_is_minimind_spelling_of_use_swanlab():
    assert parse("--use_wandb", "1").use_swanlab == 1
    assert parse("--use_swanlab", "1").use_swanlab == 1
    assert parse().use_swanlab == 0 and parse().swanlab_mode == "auto"


def test_swanlab_mode_follows_the_login(tmp_path, monkeypatch):
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                 # no ~/.swanlab/.netrc: never logged in
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / ".swanlab"))
    monkeypatch.chdir(tmp_path)
    mode, why = swanlab_mode("auto")
    assert mode == "offline" and "swanlab login" in why
    monkeypatch.setenv("SWANLAB_API_KEY", "a-key")             # what `swanlab login` / CI secrets provide
    assert swanlab_mode("auto") == ("online", "logged in")
    assert swanlab_mode("cloud")[0] == "online" and swanlab_mode("offline")[0] == "offline"
    assert swanlab_mode("local")[0] == "local"


def test_tokens_per_second_from_the_running_token_count(tmp_path, monkeypatch):
    args = types.SimpleNamespace(out_dir=str(tmp_path), use_swanlab=0)
    clock = iter([0.0, 0.0, 2.0, 3.0])                          # t0, first log line, second, third
    monkeypatch.setattr("minimind.runlog.time.perf_counter", lambda: next(clock))
    with RunLog(args, total=3, enabled=True, desc="sft") as log:
        log.log(0, loss=1.0, tokens=100)
        log.log(1, loss=0.9, tokens=500)                        # 400 tokens in 2 s
        log.log(2, val_loss=0.95)                               # evaluation lines carry no throughput
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "tokens_per_s" not in rows[0] and rows[1]["tokens_per_s"] == 200 and "tokens_per_s" not in rows[2]


def test_announce_prints_only_on_rank_zero(capsys):
    model = torch.nn.Linear(2, 2)
    model.num_parameters = lambda: 6
    for rank, expect in ((0, 2), (1, 0)):
        run = types.SimpleNamespace(model=model, rt=types.SimpleNamespace(main=rank == 0, device="cpu",
                                                                         dtype=torch.float32, world=2),
                                    args=types.SimpleNamespace(out_dir="out/x"))
        announce(run, "data 3 windows")
        out = capsys.readouterr().out.splitlines()
        assert len(out) == expect
        if expect:
            assert "ranks 2" in out[0] and out[1] == "data 3 windows"


@pytest.mark.parametrize("script,extra", [("train_full_sft.py", []), ("train_dpo.py", [])])
def test_every_stage_logs_tokens_per_second(script, extra, tmp_path, tiny_data):
    """Not only pretraining: SFT and DPO lines carry tokens/s (and DPO its margin, averaged per step)."""
    from conftest import run_script
    from minimind import DEFAULT_TOKENIZER
    from minimind.checkpoint import save_model
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import Tokenizer
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save_model(MiniMindForCausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)),
               tok, str(base))
    data = tiny_data["sft" if script == "train_full_sft.py" else "dpo"]
    r = run_script(script, "--from_weight", base, "--data_path", data, "--out_dir", tmp_path / "out",
                   "--max_steps", 3, "--log_interval", 1, "--batch_size", 2, "--max_seq_len", 128,
                   "--accumulation_steps", 2, "--dtype", "float32", *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["tokens_per_s"] > 0 for row in rows[1:] if "loss" in row)
    assert rows[-1]["tokens"] > 0
    if script == "train_dpo.py":
        assert all("reward_margin" in row and 0 <= row["reward_accuracy"] <= 1 for row in rows if "loss" in row)
