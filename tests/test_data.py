"""Data: packed windows, pre-tokenization cache, SFT targets, padding, sampling, and bad input through the CLI."""
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from minimind.data import (DataError, Example, PackedWindows, Sampler, load_dpo, load_sft, pad_batch, pretokenize,
                           read_jsonl, sft_example)

IGNORE = -100


def write_jsonl(path, records):
    """records: dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: token stream and packed windows
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 7, 64])
def test_packed_windows_tile_the_stream_without_gaps_or_padding(T):
    stream = np.random.default_rng(T).integers(0, 6400, size=1003).astype(np.uint16)
    w = PackedWindows(stream, T)
    n = len(w)
    assert n == (len(stream) - 1) // T
    x, y = w.get(range(n))
    assert x.shape == y.shape == (n, T) and x.dtype == torch.long
    assert np.array_equal(x.reshape(-1).numpy(), stream[:n * T])          # every token, in order, once
    assert np.array_equal(y.reshape(-1).numpy(), stream[1:n * T + 1])     # shifted by one
    xs, ys = w.get([n - 1, 0])                                            # any order of windows
    assert torch.equal(xs[0], x[n - 1]) and torch.equal(ys[1], y[0])


def test_document_mask_scores_each_packed_document_as_if_it_were_alone():
    """--doc_mask 1 (pretraining's default): a document inside a packed window gets the logits it gets alone from
    position 0 (MiniMind's one-document row); without the mask its logits depend on the documents before it."""
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    rng = np.random.default_rng(0)
    bos, eos = 1, 2
    docs = [[bos, *rng.integers(3, 300, size=n).tolist(), eos] for n in (5, 11, 3, 20)]
    stream = np.array(sum(docs, []), dtype=np.uint16)
    T = 24
    w = PackedWindows(stream, T, bos_id=bos)
    x, y, doc_ids = w.get([0])
    assert doc_ids[0].tolist() == np.cumsum(stream[:T] == bos).tolist()   # a new id at every BOS
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=1)).eval()
    start = len(docs[0])                       # the second document: tokens [start, start + len) of window 0
    second = torch.tensor([docs[1]])
    with torch.no_grad():
        alone = model(second)
        masked = model(x, doc_ids=doc_ids)[:, start:start + len(docs[1])]
        plain = model(x)[:, start:start + len(docs[1])]
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)
    assert (plain - alone).abs().max() > 1e-3
    assert len(PackedWindows(stream, T).get([0])) == 2   # without bos_id: (x, y) only


def test_batch_size_counts_documents_as_minimind_does():
    """--batch_tokens -1 (pretraining's default): --batch_size B documents -> the windows that carry B documents'
    real tokens (each document cut at max_seq_len, as MiniMind's padded row cuts it)."""
    bos, eos = 1, 2
    short = [bos, *range(3, 11), eos]                      # 10 tokens: 4 per 40-token window
    w = PackedWindows(np.array(short * 100, dtype=np.uint16), 40)
    assert w.mean_document(eos) == 10.0
    assert w.rows_for_documents(16, w.mean_document(eos)) == 4   # 16 documents = 160 tokens = 4 windows
    assert w.rows_for_documents(1, 10.0) == 1                   # never below one window
    long = [bos, *([5] * 98), eos]                         # 100 tokens, longer than the window: cut at 40
    w = PackedWindows(np.array(long * 20, dtype=np.uint16), 40)
    assert w.mean_document(eos) == 40.0 and w.rows_for_documents(16, 40.0) == 16  # long documents: B windows


def test_packed_windows_refuse_a_stream_shorter_than_one_window():
    with pytest.raises(DataError, match="max_seq_len"):
        PackedWindows(np.arange(10, dtype=np.uint16), 10)


def test_pretokenize_wraps_each_document_and_reuses_its_cache(tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIMIND_CACHE", str(cache))
    docs = ["The first document.", "第二个文档，中文。", "", "emoji 🎉 and\ttabs\n\nnewlines", "last"]
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in docs])
    stream = pretokenize(path, tokenizer, batch_lines=2)       # several flushes
    want = [i for t in docs for i in [tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id]]
    assert stream.dtype == np.uint16
    assert stream.tolist() == want
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".bin"
    mtime = files[0].stat().st_mtime_ns

    def boom(_):
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(tokenizer, "encode_batch", boom)
    again = pretokenize(path, tokenizer)
    assert again.tolist() == want
    assert list(cache.iterdir()) == files and files[0].stat().st_mtime_ns == mtime
    monkeypatch.undo()
    monkeypatch.setenv("MINIMIND_CACHE", str(cache))
    # A changed file is tokenized again (new cache entry, new content).
    write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in docs + ["one more"]])
    changed = pretokenize(path, tokenizer)
    assert changed.tolist() == want + [tokenizer.bos_id, *tokenizer.encode("one more"), tokenizer.eos_id]
    assert len(list(cache.iterdir())) == 2


def test_pretokenize_bad_line_leaves_no_cache(tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIMIND_CACHE", str(cache))
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}] * 3 + ['{"text": 5}'])
    with pytest.raises(DataError, match=rf"^{path}:4: "):
        pretokenize(path, tokenizer, batch_lines=2)
    assert not cache.exists() or list(cache.iterdir()) == []     # no cache, no temp file


def test_tiny_default_data_pretokenizes_into_windows(tokenizer, tiny_data):
    stream = pretokenize(tiny_data["pretrain"], tokenizer)
    n_docs = sum(1 for _ in read_jsonl(tiny_data["pretrain"], "pretrain"))
    assert int((stream == tokenizer.bos_id).sum()) == int((stream == tokenizer.eos_id).sum()) == n_docs
    assert stream[0] == tokenizer.bos_id and stream[-1] == tokenizer.eos_id
    w = PackedWindows(stream, 128)
    x, y = w.get(range(len(w)))
    assert np.array_equal(x.reshape(-1).numpy(), stream[:len(w) * 128])
    assert np.array_equal(y.reshape(-1).numpy(), stream[1:len(w) * 128 + 1])


# ---------------------------------------------------------------------------------------------------------------
# SFT / DPO examples
# ---------------------------------------------------------------------------------------------------------------
def check_targets(tokenizer, conv, ids, targets, max_seq_len, last_reply_only=False):
    """targets[t] = ids[t+1] exactly where render_chat's mask is 1 at t+1; -100 everywhere else."""
    full_ids, mask = tokenizer.render_chat(conv, last_reply_only=last_reply_only)
    assert len(ids) == len(targets) <= max_seq_len
    assert ids == full_ids[:len(ids)]                               # a prefix of the rendered chat
    want = [full_ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids))]
    assert targets == want
    # Nothing supervised is lost unless the window was too short for it.
    n_sup = sum(mask[1:])
    if len(full_ids) - 1 <= max_seq_len:
        assert sum(t != IGNORE for t in targets) == n_sup


SFT_CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6, 当然。"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？🎉"},
     {"role": "user", "content": "trailing user turn"}],
]


@pytest.mark.parametrize("conv", SFT_CONVS)
@pytest.mark.parametrize("max_seq_len", [512, 30])
def test_sft_targets_are_ignored_exactly_outside_assistant_spans(tokenizer, conv, max_seq_len):
    ex = sft_example(tokenizer, conv, max_seq_len)
    assert ex is not None
    check_targets(tokenizer, conv, *ex, max_seq_len)
    dpo = sft_example(tokenizer, conv, max_seq_len, last_reply_only=True)
    if dpo is not None:
        check_targets(tokenizer, conv, *dpo, max_seq_len, last_reply_only=True)


def test_sft_example_without_reply_in_window_is_dropped(tokenizer):
    conv = [{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "ok"}]
    assert sft_example(tokenizer, conv, 8) is None


def test_tiny_default_sft_and_dpo_files(tokenizer, tiny_data):
    examples, dropped = load_sft(tiny_data["sft"], tokenizer, 256)
    records = list(read_jsonl(tiny_data["sft"], "sft"))
    assert len(examples) + dropped == len(records) and len(examples) > 0.5 * len(records)
    kept = [r for r in records if sft_example(tokenizer, r["conversations"], 256) is not None]
    for ex, rec in zip(examples, kept):
        check_targets(tokenizer, rec["conversations"], ex.ids, ex.targets, 256)
    pairs, dropped = load_dpo(tiny_data["dpo"], tokenizer, 256)
    recs = list(read_jsonl(tiny_data["dpo"], "dpo"))
    assert len(pairs) + dropped == len(recs) and pairs
    c, r = pairs[0]
    check_targets(tokenizer, recs[0]["chosen"], c.ids, c.targets, 256, last_reply_only=True)
    check_targets(tokenizer, recs[0]["rejected"], r.ids, r.targets, 256, last_reply_only=True)


def test_pad_batch_pads_inputs_with_pad_id_and_targets_with_ignore():
    exs = [Example([5, 6, 7], [6, 7, IGNORE]), Example([9], [3]), Example([1, 2, 3, 4, 5], [IGNORE, 3, 4, 5, 2])]
    x, y = pad_batch(exs, pad_id=0)
    assert x.shape == y.shape == (3, 5) and x.dtype == y.dtype == torch.long
    for row, e in enumerate(exs):
        n = len(e.ids)
        assert x[row, :n].tolist() == e.ids and y[row, :n].tolist() == e.targets
        assert (x[row, n:] == 0).all() and (y[row, n:] == IGNORE).all()


# ---------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,b,accum,world", [(103, 4, 2, 3), (50, 5, 1, 1), (64, 2, 4, 2)])
def test_sampler_is_disjoint_complete_and_deterministic(n, b, accum, world):
    ranks = [Sampler(n, b, accum, world, r, seed=7) for r in range(world)]   # one object per process, as in DDP
    spe = ranks[0].steps_per_epoch
    assert spe == n // (b * accum * world)
    for epoch in (0, 1):
        seen = []
        for step in range(spe):
            one_step = [i for s in ranks for m in range(accum) for i in s.indices(epoch, step, m).tolist()]
            assert len(one_step) == b * accum * world
            assert len(set(one_step)) == len(one_step)          # ranks and micro-steps never overlap
            seen += one_step
        assert len(set(seen)) == len(seen) == spe * b * accum * world    # each sample at most once per epoch
        assert all(0 <= i < n for i in seen)
    fresh = Sampler(n, b, accum, world, world - 1, seed=7)                 # e.g. after a resume
    for epoch, step, m in [(1, spe - 1, accum - 1), (0, 0, 0), (1, 0, 0)]:
        assert np.array_equal(fresh.indices(epoch, step, m), ranks[-1].indices(epoch, step, m))
    e0 = np.concatenate([ranks[0].indices(0, s, 0) for s in range(spe)])
    e1 = np.concatenate([ranks[0].indices(1, s, 0) for s in range(spe)])
    assert not np.array_equal(e0, e1)                                      # a new shuffle each epoch


def test_sampler_refuses_too_little_data():
    with pytest.raises(DataError, match="batch_size"):
        Sampler(7, 4, 2, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Malformed input through the CLI: one line `error: FILE:LINE: ...`, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------------
GOOD_SFT = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_SFT = {
    "bad_json": '{"conversations": [',
    "not_object": '[1, 2]',
    "missing_field": json.dumps({"messages": GOOD_SFT["conversations"]}),
    "wrong_role": json.dumps({"conversations": [{"role": "robot", "content": "x"}, GOOD_SFT["conversations"][1]]}),
    "empty_conversation": json.dumps({"conversations": []}),
    "non_string_content": json.dumps({"conversations": [{"role": "user", "content": ["x"]},
                                                        GOOD_SFT["conversations"][1]]}),
    "missing_content": json.dumps({"conversations": [{"role": "user"}, GOOD_SFT["conversations"][1]]}),
}
BAD_PRETRAIN = {
    "bad_json": '{"text": "unterminated',
    "missing_field": '{"content": "no text key"}',
    "non_string": '{"text": 42}',
    "not_object": '"just a string"',
}
BAD_LINE = 4   # line 3 is blank: line numbers must count it


def bad_file(tmp_path, good, bad):
    return write_jsonl(tmp_path / "data.jsonl", [good, good, "", bad, good])


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A minimal model directory (with tokenizer) for scripts that need --from_weight."""
    from minimind.checkpoint import save_model
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)
    out = str(tmp_path_factory.mktemp("model") / "tiny")
    save_model(MiniMindForCausalLM(cfg), tokenizer, out)
    return out


def run_in_process(script, args, capsys, monkeypatch):
    """Run a script's `cli.run(main)` in this process (fast); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def visible_lines(err: str) -> list[str]:
    """Non-blank stderr lines as a terminal shows them: text before a carriage return is overwritten
    (a progress bar that tqdm cleared with leave=False leaves nothing visible)."""
    return [seg.split("\r")[-1] for seg in err.split("\n") if seg.split("\r")[-1].strip()]


def assert_one_line_error(code, err, path, line, out_dir):
    lines = visible_lines(err)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}:{line}: "), lines[0]
    assert "Traceback" not in err
    assert not os.path.exists(out_dir)
    parent = os.path.dirname(out_dir)
    assert not [p for p in os.listdir(parent) if p.startswith(".")], os.listdir(parent)   # no temp dirs either


def common_flags(out_dir):
    return ["--out_dir", out_dir, "--max_steps", 2, "--batch_size", 1, "--max_seq_len", 32, "--device", "cpu",
            "--dtype", "float32", "--num_workers", 0, "--log_interval", 1]


@pytest.mark.parametrize("case", sorted(BAD_PRETRAIN))
def test_pretrain_cli_stops_on_a_malformed_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    path = bad_file(tmp_path, {"text": "a good document"}, BAD_PRETRAIN[case])
    out_dir = str(tmp_path / "out" / "pretrain")
    os.makedirs(os.path.dirname(out_dir))
    code, _, err = run_in_process("train_pretrain.py", ["--data_path", path, "--hidden_size", 32,
                                                        "--num_hidden_layers", 1, *common_flags(out_dir)],
                                  capsys, monkeypatch)
    assert_one_line_error(code, err, path, BAD_LINE, out_dir)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("case", sorted(BAD_SFT))
def test_sft_cli_stops_on_a_malformed_line(case, tmp_path, capsys, monkeypatch, tiny_model_dir):
    path = bad_file(tmp_path, GOOD_SFT, BAD_SFT[case])
    out_dir = str(tmp_path / "out" / "sft")
    os.makedirs(os.path.dirname(out_dir))
    code, _, err = run_in_process("train_full_sft.py", ["--data_path", path, "--from_weight", tiny_model_dir,
                                                        *common_flags(out_dir)], capsys, monkeypatch)
    assert_one_line_error(code, err, path, BAD_LINE, out_dir)


@pytest.mark.parametrize("script,good,bad", [
    ("train_pretrain.py", {"text": "a good document"}, BAD_PRETRAIN["bad_json"]),
    ("train_full_sft.py", GOOD_SFT, BAD_SFT["wrong_role"]),
])
def test_cli_subprocess_malformed_line(script, good, bad, tmp_path, tiny_model_dir):
    """The same, as a user runs it: a real process, its exit status and its whole stderr."""
    path = bad_file(tmp_path, good, bad)
    out_dir = str(tmp_path / "out" / "run")
    os.makedirs(os.path.dirname(out_dir))
    extra = ["--from_weight", tiny_model_dir] if "sft" in script else ["--hidden_size", 32, "--num_hidden_layers", 1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MINIMIND_CACHE": str(tmp_path / "cache")}
    # bytes, not text=True: universal newlines would turn a progress bar's carriage returns into line breaks
    proc = subprocess.run([sys.executable, str(ROOT / script), "--data_path", path, *map(str, extra),
                           *map(str, common_flags(out_dir))], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr.decode(), path, BAD_LINE, out_dir)


def test_sft_cli_trains_on_good_data(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """Control for the tests above: the same command on a clean file succeeds and writes the model."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_SFT] * 4)
    out_dir = str(tmp_path / "out" / "sft")
    code, out, err = run_in_process("train_full_sft.py", ["--data_path", path, "--from_weight", tiny_model_dir,
                                                          *common_flags(out_dir)], capsys, monkeypatch)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out_dir))


@pytest.mark.parametrize("flags,peak", [([], "0.001"),                                  # tiny preset's own default
                                        (["--preset", "26M", "--num_hidden_layers", 1], "0.0005"),
                                        (["--learning_rate", "3e-3"], "0.003")])       # given: kept
def test_pretrain_learning_rate_defaults_per_preset(flags, peak, tmp_path, capsys, monkeypatch):
    """No --learning_rate: pretraining takes the preset's (config.PRETRAIN_LR: tiny 1e-3 from a sweep, larger presets
    MiniMind's 5e-4); the step line says which peak the run uses."""
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": f"document number {i}, some words."} for i in range(40)])
    out_dir = str(tmp_path / "out")
    code, out, err = run_in_process("train_pretrain.py", ["--data_path", path, *flags, *common_flags(out_dir)],
                                    capsys, monkeypatch)
    assert code in (0, None), err
    step = [ln for ln in out.splitlines() if ln.startswith("step:")]
    assert len(step) == 1 and f"cosine LR (peak {peak})" in step[0], out
