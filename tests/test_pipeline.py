"""README command 1, CI-sized: `bash train.sh --quick` runs every stage and ends with the demo report."""
import json
import os
import subprocess
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_train_sh_quick_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINIMIND_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "train.sh"), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every stage wrote a complete, loadable model directory
    for stage in ("pretrain", "sft", "dpo"):
        d = out / stage
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), f"{stage}/{name} missing"
        assert json.loads((d / "config.json").read_text())["architectures"]
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(m["loss"] == m["loss"] for m in metrics)  # logged, and never NaN
    # pretraining made progress on the tiny corpus
    pre = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert pre[-1]["loss"] < pre[0]["loss"] - 1.0, (pre[0]["loss"], pre[-1]["loss"])
    # the last stage is the demo report: every section, every stage's row, numbers that were measured
    import demo_report
    for head in ("[1] training loss", "[2] the same prompts, three models", "[3] identity", "[4] 60 fixed questions",
                 "[5] the same 60 questions as multiple choice", "[6] held-out perplexity"):
        assert head in proc.stdout, head
    for prompt in demo_report.COMPARE_PROMPTS + [q for q, _ in demo_report.IDENTITY_PROMPTS]:
        assert f"👤 {prompt}" in proc.stdout
    assert "trivial guesser" in proc.stdout
    assert "/pretrain/metrics.png" in proc.stdout or "not drawn (matplotlib missing" in proc.stdout
    report = json.loads((out / "demo" / "report.json").read_text(encoding="utf-8"))
    for stage in ("pretrain", "sft", "dpo"):
        s = report["stages"][stage]
        assert s["heldout_total"] == 40 and 0 <= s["heldout_hits"] <= 40 and s["loss"]["steps"] > 0
        assert 1 < s["ppl_heldout_text"] < 1e5 and 1 < s["ppl_heldout_chat"] < 1e5
    assert report["stages"]["sft"]["loss"]["last"] < report["stages"]["sft"]["loss"]["first"]
    # SFT taught the chat format: held-out Q&A chats are far less surprising after it
    assert report["stages"]["sft"]["ppl_heldout_chat"] < report["stages"]["pretrain"]["ppl_heldout_chat"]
    assert "done in" in proc.stdout


def test_train_sh_rejects_missing_data(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "train.sh"), "--pretrain_data", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "nope.jsonl" in proc.stderr
    assert not (tmp_path / "o").exists()
