"""The demo report (demo_report.py) and its question set (build_default.demo_set): held-out really is held out,
the scoring rules, and the report's structure on three small random models."""
import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "dataset"))
import build_default  # noqa: E402
import demo_report  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return build_default.demo_set(seed=0, tiny=True)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stated(q, replies: str) -> bool:
    """Whether some training reply states the question's fact, in any of the builder's answer forms."""
    if q["kind"] == "sig":
        return f"`{q['expected']}`" in replies
    name = q["question"].split("`")[1]
    forms = [build_default.BUILTIN_ANSWER] if q["expected"] == "builtins" else build_default.MODULE_ANSWERS
    return any(f.format(n=name, m=q["expected"]) in replies for f in forms)


def test_demo_set_is_deterministic_and_held_out(demo, tiny_data):
    again = build_default.demo_set(seed=0, tiny=True)
    assert again == demo
    qs = demo["questions"]
    assert len(qs) >= 20 and len({q["question"] for q in qs}) == len(qs)
    for kind in ("module", "sig"):
        for group in ("seen", "rephrased", "new"):
            assert sum(q["kind"] == kind and q["group"] == group for q in qs) == 10
    # against the files build() wrote (the demo rebuilt them in memory)
    sft, dpo, pre = _read(tiny_data["sft"]), _read(tiny_data["dpo"]), _read(tiny_data["pretrain"])
    sft_users = {m["content"] for r in sft for m in r["conversations"] if m["role"] == "user"}
    dpo_users = {m["content"] for r in dpo for m in r["chosen"] if m["role"] == "user"}
    replies = "\n".join(m["content"] for r in sft for m in r["conversations"] if m["role"] == "assistant")
    replies += "\n".join(m["content"] for r in dpo for m in r["chosen"] if m["role"] == "assistant")
    for q in qs:
        if q["group"] == "seen":
            assert q["question"] in sft_users
        else:   # held out: the question is in no training file
            assert q["question"] not in sft_users and q["question"] not in dpo_users
        if q["group"] != "seen":        # rephrased: a training reply states the fact; new: none does
            assert stated(q, replies) == (q["group"] == "rephrased"), q
        assert demo_report.hit(q, q["reference"])              # the data's own answer scores as a hit
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4 and q["choices"][0] == q["reference"]
        assert not any(demo_report.hit(q, c) for c in q["choices"][1:])   # the wrong choices are wrong
    pre_text = "\n".join(r["text"] for r in pre)
    assert demo["texts"] and not any(t in pre_text for t in demo["texts"])
    train_mods = set(build_default.MODULES) | set(build_default.TINY_MODULES)
    assert not train_mods & set(build_default.HELDOUT_MODULES)
    assert demo["chats"] and all(c[0]["content"] not in sft_users for c in demo["chats"])


def test_scoring_rules():
    mod = dict(kind="module", question="Which module provides `deque`?", expected="collections")
    assert demo_report.hit(mod, "`deque` is in the `collections` module.")
    assert demo_report.hit(mod, "It comes from the `collections` module, so write `from collections import deque`.")
    assert not demo_report.hit(mod, "`deque` is in the `os` module; or `collections` module")   # first one counts
    assert not demo_report.hit(mod, "collections")                                            # no answer form
    assert demo_report.named_module("`len` is a built-in, so no import is needed.") == "builtins"
    sig = dict(kind="sig", question="How do I call `math.gcd`?", expected="math.gcd(*integers)")
    assert demo_report.hit(sig, "Call it as `math.gcd(*integers)`.")
    assert not demo_report.hit(sig, "`math.gcd(a, b)`") and not demo_report.hit(sig, "`xmath.gcd(*integers)`")
    zero = dict(kind="sig", question="What is the signature of `str.lower`?", expected="str.lower()")
    assert demo_report.trivial_guess(zero, []) and not demo_report.trivial_guess(sig, [])
    assert demo_report.trivial_guess(mod, ["os", "collections", "collections"])


def test_report_on_three_small_models(tmp_path, tokenizer, capsys):
    from minimind.checkpoint import save_model
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    for i, stage in enumerate(demo_report.STAGES):
        torch.manual_seed(i)
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        save_model(MiniMindForCausalLM(cfg), tokenizer, str(tmp_path / stage))
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 9, "loss": 2.5}\n')
    with torch.no_grad():
        demo_report.main([str(tmp_path), "--tiny", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    for head in ("[1] training loss", "[2] the same prompts", "[3] identity", "[4] 60 fixed questions",
                 "[5] the same 60 questions as multiple choice", "[6] held-out perplexity"):
        assert head in out
    assert "5.00 -> 2.50 after 9 steps" in out and "pretrain  no metrics.jsonl" in out
    assert "(right)  `collections`" in out and "(right)  `math.gcd(" in out   # the data's answers, beside
    assert out.count("👤") == len(demo_report.COMPARE_PROMPTS) + len(demo_report.IDENTITY_PROMPTS)
    report = json.loads((tmp_path / "demo" / "report.json").read_text(encoding="utf-8"))
    assert set(report["stages"]) == set(demo_report.STAGES)
    assert set(report["hit_rates"]) == set(demo_report.STAGES) | {"trivial"}
    assert report["hit_rates"]["dpo"]["seen_all"][1] == 20 and report["hit_rates"]["dpo"]["held_all"][1] == 40
    for s in report["stages"].values():
        assert s["heldout_total"] == 40 and 0 <= s["heldout_hits"] <= 40
        assert s["ppl_heldout_text"] > 1 and s["ppl_heldout_chat"] > 1
    assert 0 <= report["choice_rates"]["sft"]["held_all"][0] <= 40 and report["form_rates"]["dpo"][1] == 60
    assert len(_read(tmp_path / "demo" / "heldout_text.jsonl")) == len(build_default.demo_set(tiny=True)["texts"])


def test_report_refuses_a_directory_without_models(tmp_path):
    from conftest import run_script
    proc = run_script("demo_report.py", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "pretrain/" in proc.stderr and len(proc.stderr.splitlines()) == 1
