"""Evaluation: perplexity vs a naive per-token loop, multiple choice on rigged models, CSV/JSONL readers,
ROUGE-L / BLEU against hand-computed values, and eval_model.py's modes end to end."""
import json
import math
import random
import sys

import pytest
import torch
import torch.nn as nn

from minimind import evaluate as ev
from minimind.config import ModelConfig
from minimind.data import DataError
from minimind.model import MiniMindForCausalLM


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    return MiniMindForCausalLM(cfg).double().eval()


def last_logprobs(model, context: list[int]) -> torch.Tensor:
    """Naive: one forward over exactly this context (no cache, no padding, no batching), log-softmax over the
    whole vocabulary at the last position, in float64."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([context]), logits_to_keep=1)[0, -1].double(), dim=-1)


TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
         "short", "Emoji 🙂 and numbers 3.14159 in one line."]


@pytest.mark.parametrize("max_len,batch_size", [(512, 4), (12, 3)], ids=["whole-docs", "rolling-windows"])
def test_perplexity_equals_naive_loop(model, tokenizer, max_len, batch_size):
    res = ev.perplexity(model, tokenizer, TEXTS, max_len=max_len, batch_size=batch_size, progress=False)
    nll, count, nbytes = 0.0, 0, 0
    for text in TEXTS:
        ids = tokenizer.encode(text)
        nbytes += len(text.encode("utf-8"))
        for i, tok in enumerate(ids):
            # the context rolling windows give token i: whole window (<= max_len tokens) before it
            if i < max_len:
                ctx = [tokenizer.bos_id] + ids[:i]
            else:
                end = min((i // max_len + 1) * max_len, len(ids))
                ctx = ids[max(0, end - max_len - 1):i]
            nll -= float(last_logprobs(model, ctx)[tok])
            count += 1
    assert res.tokens == count and res.bytes == nbytes and res.documents == len(TEXTS)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / nbytes, rel=1e-9)


def test_rolling_windows_score_every_token_once():
    toks = list(range(100, 137))
    windows = ev.rolling_windows(toks, 1, 10)
    scored = [t for ids, n in windows for t in ids[-n:]]
    assert scored == toks
    assert all(len(ids) <= 11 for ids, _ in windows)
    assert windows[0][0][0] == 1


def test_score_continuations_matches_naive(model):
    rng = random.Random(0)
    reqs = []
    for _ in range(9):
        ctx = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 20))]
        cont = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 4))]
        reqs.append((ctx + cont, len(cont)))
    reqs.append((reqs[0][0][:-1] + [7], 1))        # shares its input with request 0 when that one has n == 1
    got = ev.score_continuations(model, reqs, batch_size=4)
    for (ids, n), g in zip(reqs, got):
        want = sum(float(last_logprobs(model, ids[:k])[ids[k]]) for k in range(len(ids) - n, len(ids)))
        assert g == pytest.approx(want, abs=1e-9)


class Rigged(nn.Module):
    """The real model plus a huge bonus on the logits of some tokens: it 'believes' in those tokens."""

    def __init__(self, base, favoured: list[int], bonus: float = 50.0):
        super().__init__()
        self.base, self.config = base, base.config
        self.favoured, self.bonus = favoured, bonus

    def forward(self, *a, **k):
        logits = self.base(*a, **k).clone()
        logits[..., self.favoured] += self.bonus
        return logits


def make_questions(n=12):
    rng = random.Random(1)
    qs = []
    for i in range(n):
        ans = rng.randrange(4)
        choices = [f"option {j} of {i}" for j in range(4)]
        choices[ans] = f"correct {i}"              # the right answer always starts with " correct" (one token)
        qs.append(ev.Question(f"Question number {i}?", choices, ans, "math" if i % 2 else "history"))
    return qs


def test_multiple_choice_picks_what_the_model_prefers(model, tokenizer):
    qs = make_questions()
    for letter in "AC":
        tok = tokenizer.encode(" " + letter)
        assert len(tok) == 1
        res = ev.multiple_choice(Rigged(model, tok), tokenizer, qs, progress=False)
        for subject in ("math", "history"):
            want = sum(q.answer == "ABCD".index(letter) for q in qs if q.subject == subject)
            assert res.per_subject[subject] == (want, 6)
    correct = tokenizer.encode(" correct")
    assert len(correct) == 1
    res = ev.multiple_choice(Rigged(model, correct), tokenizer, qs, style="choice", shots=2, progress=False)
    assert res.accuracy == 1.0 and res.as_dict()["accuracy_norm"] == 1.0
    # --limit is per subject
    res = ev.multiple_choice(Rigged(model, correct), tokenizer, qs, style="choice", limit=2, progress=False)
    assert res.as_dict()["questions"] == 4


def test_prompt_format_and_shots():
    qs = make_questions(6)
    ctx, conts = ev.build_prompt(qs[2], [qs[0], qs[4]])
    assert ctx.startswith("The following are multiple choice questions (with answers) about history.\n\n")
    q = qs[2]
    block = f"Question number 2?\n" + "".join(f"{'ABCD'[i]}. {c}\n" for i, c in enumerate(q.choices)) + "Answer:"
    assert ctx.count("Answer:") == 3 and ctx.endswith("\n\n" + block)
    assert f"Answer: {'ABCD'[qs[0].answer]}\n\n" in ctx and conts == [" A", " B", " C", " D"]
    zh = ev.Question("中国的首都是？", ["上海", "北京", "广州", "深圳"], 1, "地理")
    ctx, conts = ev.build_prompt(zh, [])
    assert ctx == "以下是关于地理的单项选择题，请直接给出正确答案的选项。\n\n中国的首都是？\nA. 上海\nB. 北京\nC. 广州\nD. 深圳\n答案："
    assert conts == ["A", "B", "C", "D"]


def test_csv_and_jsonl_readers(tmp_path):
    cmmlu = tmp_path / "cmmlu" / "test"
    cmmlu.mkdir(parents=True)
    (cmmlu / "agronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,问题一,甲,乙,丙,丁,B\n1,\"多行\n问题\",1,2,3,4,D\n",
                                        encoding="utf-8")
    (tmp_path / "cmmlu" / "dev").mkdir()
    (tmp_path / "cmmlu" / "dev" / "agronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,例,1,2,3,4,A\n",
                                                             encoding="utf-8")
    qs = ev.load_questions(str(cmmlu))
    assert [(q.question, q.choices, q.answer, q.subject) for q in qs] == [
        ("问题一", ["甲", "乙", "丙", "丁"], 1, "agronomy"), ("多行\n问题", ["1", "2", "3", "4"], 3, "agronomy")]
    assert ev.find_dev_split(str(cmmlu)) == str(tmp_path / "cmmlu" / "dev")
    ceval = tmp_path / "computer_network_val.csv"
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,Q?,a,b,c,d,C,because\n", encoding="utf-8")
    (q,) = ev.load_questions(str(ceval))
    assert (q.subject, q.answer, q.choices) == ("computer_network", 2, ["a", "b", "c", "d"])
    mmlu = tmp_path / "anatomy_test.csv"
    mmlu.write_text("What is 1+1?,1,2,3,4,B\n", encoding="utf-8")
    (q,) = ev.load_questions(str(mmlu))
    assert (q.subject, q.question, q.answer) == ("anatomy", "What is 1+1?", 1)
    bad = tmp_path / "bad_test.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,Q,a,b,c,d,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_test.csv:2: answer '' .*val"):
        ev.load_questions(str(bad))
    js = tmp_path / "x.test.jsonl"
    js.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "B", "subject": "s"}) + "\n"
                  + json.dumps({"question": "q", "choices": ["a", "b"], "answer": "E"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.test.jsonl:2: answer 'E' is not one of A, B"):
        ev.load_questions(str(js))
    (tmp_path / "x.dev.jsonl").write_text("", encoding="utf-8")
    assert ev.find_dev_split(str(js)) == str(tmp_path / "x.dev.jsonl")


# --- ROUGE-L / BLEU --------------------------------------------------------------------------------------------
def test_segmentation():
    assert ev.segment("Hello, World! 你好世界 naïve 42") == ["hello", ",", "world", "!", "你", "好", "世", "界",
                                                               "naïve", "42"]


def test_lcs_bit_parallel_matches_dynamic_programming():
    assert ev.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4          # the textbook example
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 15))]
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 15))]
        dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
        assert ev.lcs_length(a, b) == dp[-1][-1]


def test_rouge_l_by_hand():
    # hyp 我很喜欢狗 / ref 我喜欢猫: LCS = 我喜欢 = 3; P = 3/5, R = 3/4; F = 2PR/(P+R) = 2/3
    assert ev.rouge_l(ev.segment("我很喜欢狗"), ev.segment("我喜欢猫")) == pytest.approx(2 / 3)
    assert ev.rouge_l(["a", "b"], ["c"]) == 0.0
    assert ev.generation_scores(["the cat"], ["the cat"])["rouge_l"] == pytest.approx(100.0)


def test_bleu_by_hand():
    hyp = "the cat sat on the mat today".split()
    ref = "the cat sat on a mat today".split()
    # clipped matches / totals: 1-grams 6/7 (the x2 clipped to 1), 2-grams 4/6, 3-grams 2/5, 4-grams 1/4
    want = 100 * math.exp((math.log(6 / 7) + math.log(4 / 6) + math.log(2 / 5) + math.log(1 / 4)) / 4)
    assert ev.corpus_bleu([hyp], [ref]) == pytest.approx(want)
    # shorter than the reference: brevity penalty exp(1 - r/c)
    hyp2, ref2 = "a b c d".split(), "a b c d e f".split()
    assert ev.corpus_bleu([hyp2], [ref2]) == pytest.approx(100 * math.exp(1 - 6 / 4))
    # no 4-gram match: sacreBLEU's exp smoothing gives that order 1 / (2 * total)
    hyp3, ref3 = "a b c x d".split(), "a b c y d".split()
    want3 = 100 * math.exp((math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / (2 * 2))) / 4)
    assert ev.corpus_bleu([hyp3], [ref3]) == pytest.approx(want3)
    # corpus-level: counts are summed before dividing
    both = ev.corpus_bleu([hyp, hyp2], [ref, ref2])
    p = [(6 + 4) / (7 + 4), (4 + 3) / (6 + 3), (2 + 2) / (5 + 2), (1 + 1) / (4 + 1)]
    assert both == pytest.approx(100 * math.exp(1 - 13 / 11) * math.exp(sum(map(math.log, p)) / 4))


def test_generation_set_reader(tmp_path):
    f = tmp_path / "gen.jsonl"
    rows = [{"conversations": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
            {"conversations": [{"role": "user", "content": "no reference"}]},
            {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                               {"role": "assistant", "content": "a2"}]}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    prompts, refs, skipped = ev.read_generation_set(str(f))
    assert refs == ["a1", "a2"] and skipped == 1 and prompts[1][-1]["content"] == "q2"
    f.write_text('{"conversations": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="gen.jsonl:1"):
        ev.read_generation_set(str(f))


# --- eval_model.py end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from minimind.checkpoint import save_model
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("eval-model") / "tiny"
    save_model(MiniMindForCausalLM(cfg), tokenizer, str(out))
    return str(out)


def run_eval(monkeypatch, capsys, *args, stdin: str | None = None):
    """eval_model.main() in this process (no new interpreter); returns (exit code, stdout, stderr)."""
    import io

    import eval_model
    from minimind import cli
    monkeypatch.setattr(sys, "argv", ["eval_model.py", *map(str, args)])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        cli.run(eval_model.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_model_chat_and_prompts(monkeypatch, capsys, model_dir):
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--prompts", "--max_new_tokens", 4)
    assert code == 0 and out.count("🤖") == 5          # the five built-in demo prompts
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--max_new_tokens", 4,
                            stdin="hello\n/reset\n你好\n\n")
    assert code == 0 and out.count("🤖") == 2 and "chatting with" in out
    code, _, err = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--prompts", "--top_p", "0")
    assert code == 2 and "error: top_p" in err
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--prompts", "hi", "--quantize", "int8",
                            "--temperature", "0.7", "--top_k", "20", "--seed", "1", "--max_new_tokens", 4)
    assert code == 0 and out.count("🤖") == 1


def test_eval_model_measurements(monkeypatch, capsys, model_dir, tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in TEXTS) + "\n", encoding="utf-8")
    out_json = tmp_path / "res" / "ppl.json"
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--ppl_path", texts, "--out", out_json,
                            "--max_seq_len", 16)
    assert code == 0 and "perplexity" in out and "bits per byte" in out
    res = json.loads(out_json.read_text(encoding="utf-8"))
    assert res["tokens"] > 0 and res["perplexity"] == pytest.approx(math.exp(res["nll"] / res["tokens"]))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"question": q.question, "choices": q.choices, "answer": "ABCD"[q.answer],
                                        "subject": q.subject}) for q in make_questions(6)) + "\n", encoding="utf-8")
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--mc_path", mc, "--shots", 1,
                            "--limit", 2)
    assert code == 0 and "4 questions, 2 subjects, 1-shot" in out and "accuracy" in out
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello there"}]}) + "\n",
                   encoding="utf-8")
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--gen_path", gen, "--max_new_tokens", 8)
    assert code == 0 and "ROUGE-L" in out and "BLEU-4" in out
    code, _, err = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--ppl_path", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl: no such file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    code, _, err = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--ppl_path", bad)
    assert code == 2 and "bad.jsonl:2:" in err


def test_eval_model_on_shared_mmlu(monkeypatch, capsys, model_dir, shared_data):
    path = shared_data / "eval" / "en_mmlu.test.jsonl"
    code, out, _ = run_eval(monkeypatch, capsys, "--load_from", model_dir, "--mc_path", path, "--shots", 1,
                            "--limit", 1, "--max_seq_len", 256)
    assert code == 0
    assert "(examples from" in out and "en_mmlu.dev.jsonl" in out     # the dev split was found and used
    assert "57 subjects" in out or "subjects" in out


def test_perplexity_reads_chats_as_the_tokenizers_template_writes_them(tmp_path, tokenizer):
    """--ppl_path on chat records scores what the model trained on: tool calls and tool turns included (plain
    ChatML would drop them), and a record the template cannot write is a FILE:LINE error."""
    from minimind.errors import DataError
    from minimind.evaluate import read_texts
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "21"}, {"role": "assistant", "content": "It is 21 °C."}]
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"conversations": conv}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    texts = read_texts(str(f), tokenizer)
    assert texts == [tokenizer.render_text(conv), "plain"] and "<tool_call>" in texts[0] and "21" in texts[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"role": "user", "content": None}]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: "):
        read_texts(str(bad), tokenizer)
