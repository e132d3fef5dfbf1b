"""Tests for dataset/build_default.py: the tiny build must follow MiniMind's JSONL formats and be reproducible."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dataset", "build_default.py")
FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl")


def _load_builder():
    # dataset/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("build_default", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bd = _load_builder()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    paths = bd.build(str(out), seed=0, tiny=True)
    return out, paths


def _read(path):
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n") and b"\r" not in raw
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert lines and all(lines), "no blank lines expected"
    return [json.loads(line) for line in lines]


def _check_messages(msgs):
    """MiniMind chat rules: optional leading system turn, then user/assistant alternating, ending with assistant."""
    assert isinstance(msgs, list) and len(msgs) >= 2
    for m in msgs:
        assert set(m) == {"role", "content"}
        assert isinstance(m["content"], str) and m["content"].strip()
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    assert all(m["role"] != "system" for m in body)
    assert len(body) >= 2 and len(body) % 2 == 0
    for i, m in enumerate(body):
        assert m["role"] == ("user" if i % 2 == 0 else "assistant")
        if m["role"] == "assistant":
            assert len(m["content"]) <= bd.ANSWER_CHARS + 10
    assert msgs[-1]["role"] == "assistant"


def test_build_returns_paths_and_only_final_files(tiny):
    out, paths = tiny
    assert set(paths) == {"pretrain", "sft", "dpo"}
    assert sorted(os.listdir(out)) == sorted(FILES)  # no temp files left behind
    for name, path in paths.items():
        assert os.path.samefile(path, out / f"{name}.jsonl")


def test_pretrain_schema(tiny):
    recs = _read(tiny[1]["pretrain"])
    assert 150 <= len(recs) <= 200
    texts = []
    for r in recs:
        assert set(r) == {"text"} and isinstance(r["text"], str) and r["text"].strip()
        assert len(r["text"]) <= bd.CHUNK_CHARS
        texts.append(r["text"])
    assert len(set(texts)) == len(texts), "exact duplicates must be removed"


def test_sft_schema(tiny):
    recs = _read(tiny[1]["sft"])
    assert 250 <= len(recs) <= 300
    n_system = n_multi = n_identity = 0
    for r in recs:
        assert set(r) == {"conversations"}
        msgs = r["conversations"]
        _check_messages(msgs)
        n_system += msgs[0]["role"] == "system"
        n_multi += sum(m["role"] == "user" for m in msgs) > 1
        n_identity += "minimind" in msgs[-1]["content"]
    assert n_system > 0 and n_multi > 0 and n_identity > 0


def test_dpo_schema(tiny):
    recs = _read(tiny[1]["dpo"])
    assert 80 <= len(recs) <= 100
    for r in recs:
        assert set(r) == {"chosen", "rejected"}
        chosen, rejected = r["chosen"], r["rejected"]
        _check_messages(chosen)
        _check_messages(rejected)
        assert len(chosen) == len(rejected)
        assert chosen[:-1] == rejected[:-1], "same prompt prefix"
        assert chosen[-1]["content"] != rejected[-1]["content"], "must differ in the final answer"


def _bytes(paths):
    out = {}
    for name, path in paths.items():
        with open(path, "rb") as f:
            out[name] = f.read()
    return out


def test_deterministic_in_process(tiny, tmp_path):
    again = bd.build(str(tmp_path), seed=0, tiny=True)
    assert _bytes(again) == _bytes(tiny[1])


def test_seed_changes_output(tiny, tmp_path):
    other = bd.build(str(tmp_path), seed=1, tiny=True)
    assert _bytes(other)["sft"] != _bytes(tiny[1])["sft"]


def test_cli_deterministic_across_hash_seeds(tiny, tmp_path):
    # A fresh interpreter with a different string-hash seed (set/dict-of-str order) must write the same bytes.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out_dir", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for name in ("pretrain", "sft", "dpo"):
        assert f"{name}.jsonl" in res.stdout  # one summary line per file
    assert _bytes({n: str(tmp_path / f"{n}.jsonl") for n in ("pretrain", "sft", "dpo")}) == _bytes(tiny[1])
