"""PII scrubbing (real-looking positives, tricky negatives, checksums, counts, drop/replace, any format) and mixing
corpora by ratio (shares hold in tokens, seeded, upsampling only when asked, the CLI prints achieved shares)."""
import json
from collections import Counter

import numpy as np
import pytest

from conftest import run_script
from minimind import datatools as dt
from minimind.errors import DataError, UsageError
from minimind.scrub import find_pii, id_card_ok, luhn_ok, scrub_text, scrub_value


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


# (kind, text, the personal data inside it): shaped like what turns up in web text and chat logs
POSITIVES = [
    ("email", "有问题请发邮件至 zhang.san@example.com，我们会尽快回复。", "zhang.san@example.com"),
    ("email", "Contact: J.Doe+newsletter@mail.tsinghua.edu.cn for details", "J.Doe+newsletter@mail.tsinghua.edu.cn"),
    ("email", "邮箱zhangwei1988@qq.com", "zhangwei1988@qq.com"),
    ("phone", "联系电话：13800138000（微信同号）", "13800138000"),
    ("phone", "手机 +86 139-1234-5678", "+86 139-1234-5678"),
    ("phone", "办公室 010-62751234，传真 0755-86013388", "010-62751234"),
    ("phone", "Call us at +1 (415) 555-2671 today", "+1 (415) 555-2671"),
    ("phone", "UK office: +44 20 7946 0958.", "+44 20 7946 0958"),
    ("phone", "Reach me at 415-555-2671.", "415-555-2671"),
    ("id_card", "身份证号：11010519491231002X，住址北京市", "11010519491231002X"),
    ("bank_card", "请转账到工行卡 6250 9410 0652 8599 谢谢", "6250 9410 0652 8599"),
    ("bank_card", "card=4111111111111111;", "4111111111111111"),
    ("bank_card", "Amex 3782-822463-10005 is not grouped by 4", None),   # 4-6-5 grouping: not a card shape here
    ("ipv4", "Failed login from 192.168.10.24 at 03:12", "192.168.10.24"),
    ("ipv4", "服务器地址 10.0.0.12，端口 8080", "10.0.0.12"),
    ("ipv6", "client 2001:db8:85a3::8a2e:370:7334 connected", "2001:db8:85a3::8a2e:370:7334"),
    ("ipv6", "fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a"),
]

# Text that looks numeric or address-like but carries no personal data: none of it may be touched.
NEGATIVES = [
    "会议定于2023-10-01 14:30:00召开，截止日期20231015。",                 # dates, times
    "售价￥13,800.00元，原价$1,299.99，折后 3999 元",                       # prices
    "床前明月光，疑是地上霜。(1)\n举头望明月，低头思故乡。(2) 第12行 第1234567行",  # poem line numbers
    "print(a@b.T); y = W@x.shape; @property\ndef f(self): return self.x",   # matrix product, decorators
    "std::vector<int> v; Add::dec(); ts = 12:30:45; MAC 00:1A:2B:3C:4D:5E",  # C++ scopes, times, MAC
    "pi = 3.14159265358979, e = 2.718281828459045, timestamp 1700000000123",  # long decimals, ms timestamps
    "sha1 3f786850e387550fdab836ed7e6dc881de23001b, uuid 123e4567-e89b-12d3-a456-426614174000",  # hashes
    "see section 1.2.3.4 and version 2.0.1.0; python 3.11.7; 8.8.8.8 is Google's resolver",  # numbering
    "ISBN 978-3-16-148410-0, order no. 4111111111111112, 0x13800138000",     # Luhn fails, hex
    "身份证号格式：110105194912310021（校验位错误）",                          # 18 digits, wrong check digit
    "1234 5678 9012 3456 is a made-up number; room 101, tel ext. 8021",      # fails Luhn
    "https://example.com/path?id=42 and user@localhost are fine",           # no TLD
]


@pytest.mark.parametrize("kind,text,value", POSITIVES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVES)])
def test_finds_real_looking_personal_data(kind, text, value):
    hits = [(k, text[s:e]) for k, s, e in find_pii(text)]
    if value is None:
        assert all(k != kind for k, _ in hits)
    else:
        assert (kind, value) in hits


@pytest.mark.parametrize("text", NEGATIVES, ids=range(len(NEGATIVES)))
def test_leaves_numbers_dates_prices_line_numbers_and_code_alone(text):
    assert find_pii(text) == [] and scrub_text(text) == text


def test_checksums_are_what_decides():
    assert id_card_ok("11010519491231002X") and not id_card_ok("110105194912310021")
    assert luhn_ok("4111111111111111") and luhn_ok("6250941006528599") and not luhn_ok("4111111111111112")
    # the same shape with the right check character is hit, with a wrong one it is not
    assert [k for k, _, _ in find_pii("id 11010519491231002X")] == ["id_card"]
    assert find_pii("id 11010519491231002Y") == [] and find_pii("id 110105194912310021") == []
    # an 18-digit ID is not also reported as a bank card or a phone number (one span, one kind)
    assert len(find_pii("11010519491231002X")) == 1


def test_fast_path_finds_exactly_what_a_full_scan_finds():
    """find_pii runs the digit patterns only around digit runs; on random digit soup (with the separators, letters,
    CJK, dots) and on every example above, that must give the very spans a scan of the whole text gives."""
    rng = np.random.default_rng(0)
    alphabet = list("0123456789" * 4 + " ().+-Xx" + "ab.:@中")
    pieces = [v for _, _, v in POSITIVES if v] + ["11010519491231002X", "6250941006528599", "+86 138 0013 8000"]
    texts = [t for _, t, _ in POSITIVES] + NEGATIVES
    for _ in range(3000):
        t = "".join(rng.choice(alphabet, int(rng.integers(1, 40))))
        if rng.random() < 0.5:
            k = int(rng.integers(0, len(t) + 1))
            t = t[:k] + pieces[int(rng.integers(len(pieces)))] + t[k:]
        texts.append(t)
    hits = 0
    for t in texts:
        fast, full = find_pii(t), find_pii(t, windowed=False)
        assert fast == full, t
        hits += bool(full)
    assert hits > 200   # the soup does contain plenty of hits, so the comparison means something


def test_placeholders_counts_and_nested_values():
    counts = {}
    text = "mail a.b@example.org, tel 13800138000, ip 192.168.1.20 and again a.b@example.org"
    assert scrub_text(text, counts=counts) == "mail [EMAIL], tel [PHONE], ip [IP] and again [EMAIL]"
    assert counts == {"email": 2, "phone": 1, "ipv4": 1}
    rec = {"conversations": [{"role": "user", "content": "我的手机是13912345678"},
                               {"role": "assistant", "content": "好的", "tool_calls": [{"function": {
                                   "name": "call", "arguments": {"to": "13912345678"}}}]}]}
    counts = {}
    out = scrub_value(rec, counts=counts)
    assert out["conversations"][0]["content"] == "我的手机是[PHONE]" and counts == {"phone": 2}
    assert out["conversations"][1]["tool_calls"][0]["function"]["arguments"]["to"] == "[PHONE]"
    assert out["conversations"][1]["role"] == "assistant"                       # keys and roles untouched
    only = {}
    assert scrub_text(text, kinds=("phone",), counts=only) == text.replace("13800138000", "[PHONE]")


def test_scrub_file_replace_drop_and_untouched_lines_byte_for_byte(tmp_path):
    clean = {"text": "床前明月光  (spacing kept)"}
    src = tmp_path / "raw.jsonl"
    lines = [json.dumps(clean, ensure_ascii=False, indent=None, separators=(", ", ":  ")),   # odd spacing
             json.dumps({"text": "电话 13800138000，邮箱 li@example.com"}, ensure_ascii=False),
             json.dumps({"instruction": "IP?", "output": "192.168.0.100"})]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    r = dt.scrub_file(str(src), str(out), show=5)
    assert (r.documents, r.changed, r.dropped) == (3, 2, 0)
    assert r.counts == {"email": 1, "id_card": 0, "bank_card": 0, "phone": 1, "ipv4": 1, "ipv6": 0}
    assert r.examples == [(f"{src}:2", ["email", "phone"]), (f"{src}:3", ["ipv4"])]
    got = out.read_text(encoding="utf-8").splitlines()
    assert got[0] == lines[0]                                                   # copied byte for byte
    assert json.loads(got[1]) == {"text": "电话 [PHONE]，邮箱 [EMAIL]"} and "192.168" not in got[2]
    r = dt.scrub_file(str(src), str(out), action="drop")
    assert r.dropped == 2 and out.read_text(encoding="utf-8").splitlines() == [lines[0]]
    # the CLI: counts per kind, where (never what), one-line errors
    r = run_script("prepare_data.py", "scrub", "--data_path", src, "--out_path", out)
    assert r.returncode == 0, r.stderr
    assert "found: email 1, id_card 0, bank_card 0, phone 1, ipv4 1, ipv6 0" in r.stdout
    assert f"{src}:2: email, phone" in r.stdout and "13800138000" not in r.stdout
    r = run_script("prepare_data.py", "scrub", "--data_path", src, "--out_path", out, "--kinds", "email,ssn")
    assert r.returncode == 2 and r.stderr.startswith("error: --kinds")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=rf"^{bad}:2: invalid JSON"):   # (cli.run prints it as one line, exit 2)
        dt.scrub_file(str(bad), str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()                              # nothing half-written


# ---------------------------------------------------------------------------------------------------------------
# mix
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three pretrain corpora with very different record lengths: ratios in lines would be far off in tokens."""
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    en = [{"text": " ".join(["the quick brown fox jumps"] * int(rng.integers(20, 60)))} for _ in range(300)]
    zh = [{"text": "床前明月光，疑是地上霜。" * int(rng.integers(1, 4))} for _ in range(400)]
    code = [{"text": f"def f{i}(x):\n    return x * {i}\n" * int(rng.integers(2, 8))} for i in range(200)]
    return {k: write_jsonl(d / f"{k}.jsonl", v) for k, v in {"en": en, "zh": zh, "code": code}.items()}


def test_mix_shares_hold_in_tokens_and_are_seeded(corpora, tokenizer, tmp_path):
    out = tmp_path / "mix.jsonl"
    sources = [(corpora["en"], 0.6), (corpora["zh"], 0.2), (corpora["code"], 0.2)]
    r = dt.mix(sources, str(out), tokenizer, total_tokens=20000, seed=1)
    # measured independently: tokenize the output and attribute every line to its source
    origin = {}
    for name, path in corpora.items():
        for line in open(path, encoding="utf-8"):
            origin[line] = name
    tokens = {"en": 0, "zh": 0, "code": 0}
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    for line in lines:
        tokens[origin[line]] += len(tokenizer.encode(json.loads(line)["text"])) + 2
    total = sum(tokens.values())
    assert abs(total - 20000) / 20000 < 0.02
    for (name, want) in [("en", 0.6), ("zh", 0.2), ("code", 0.2)]:
        assert abs(tokens[name] / total - want) < 0.01, (name, tokens)
    assert [s.taken_tokens for s in r.sources] == [tokens["en"], tokens["zh"], tokens["code"]]
    # in lines the shares are nothing like 60/20/20: the reason to count tokens
    counts = {n: sum(origin[x] == n for x in lines) for n in tokens}
    assert counts["en"] / len(lines) < 0.4
    # interleaved, not three blocks; same seed same bytes, another seed another mix
    first_half = {origin[x] for x in lines[:len(lines) // 2]}
    assert first_half == {"en", "zh", "code"}
    again = tmp_path / "again.jsonl"
    dt.mix(sources, str(again), tokenizer, total_tokens=20000, seed=1)
    assert again.read_bytes() == out.read_bytes()
    dt.mix(sources, str(again), tokenizer, total_tokens=20000, seed=2)
    assert again.read_bytes() != out.read_bytes()


def test_mix_by_records_default_size_and_repeats(corpora, tmp_path):
    out = tmp_path / "mix.jsonl"
    r = dt.mix([(corpora["en"], 1), (corpora["zh"], 1)], str(out), None, total_records=500, seed=0)
    assert [s.taken_records for s in r.sources] == [250, 250] and r.unit == "records"
    assert len(out.read_text().splitlines()) == 500
    # no size given: the largest mix that repeats nothing; the short zh records bound a 50/50 mix in characters
    r = dt.mix([(corpora["en"], 1), (corpora["zh"], 1)], str(out), None, seed=0, total_records=0)
    en, zh = r.sources
    assert r.unit == "characters" and zh.taken_records == zh.records and zh.tokens < en.tokens
    assert abs(en.taken_tokens - zh.taken_tokens) < 2 * max(json.loads(x)["text"].__len__()
                                                            for x in open(corpora["en"]))
    with pytest.raises(UsageError, match=r"en.jsonl: its share 50.0% .* --allow_repeat 1"):
        dt.mix([(corpora["en"], 1), (corpora["zh"], 1)], str(out), None, total_records=1000)
    r = dt.mix([(corpora["en"], 1), (corpora["zh"], 1)], str(out), None, total_records=1000, allow_repeat=True)
    assert [s.taken_records for s in r.sources] == [500, 500]
    got = Counter(out.read_text().splitlines())
    en = Counter(open(corpora["en"]).read().splitlines())   # (the toy corpus repeats some lines itself)
    assert all(m <= got[x] <= 2 * m for x, m in en.items())  # whole passes first: every record once, some twice


def test_mix_errors_and_cli(corpora, tiny_data, tmp_path):
    for spec, msg in [("a.jsonl", "PATH:RATIO"), ("a.jsonl:-1", "positive"), ("a.jsonl:x", "PATH:RATIO")]:
        with pytest.raises(UsageError, match=msg):
            dt.parse_mix_source(spec)
    assert dt.parse_mix_source("C:/data/en.jsonl:0.6") == ("C:/data/en.jsonl", 0.6)
    with pytest.raises(DataError, match="must be of one kind"):
        dt.mix([(corpora["en"], 1), (tiny_data["sft"], 1)], str(tmp_path / "m.jsonl"), None, total_records=10)
    out = tmp_path / "m.jsonl"
    r = run_script("prepare_data.py", "mix", f"{corpora['en']}:0.6", f"{corpora['zh']}:0.2",
                   f"{corpora['code']}:0.2", "--out_path", out, "--total_tokens", 8000, "--seed", 3)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith(("/", "total"))}
    assert rows[corpora["en"]][3] == "60.0%" and abs(float(rows[corpora["en"]][6].rstrip("%")) - 60) < 1.5
    assert "ratios hold in tokens" in r.stdout and out.is_file()
    r = run_script("prepare_data.py", "mix", f"{corpora['en']}:1", "--out_path", corpora["en"])
    assert r.returncode == 2 and r.stderr.startswith("error: --out_path must differ")


def test_mix_shared_corpora_60_20_20(shared_data, tokenizer, tmp_path):
    """Real corpora (first lines of each, copied to tmp): 60% English prose, 20% Chinese poetry, 20% Chinese law."""
    parts = {}
    for name, rel, n in [("en", "pretrain/en_gutenberg.train.jsonl", 150),
                         ("zh", "pretrain/zh_poetry.train.jsonl", 1500), ("law", "pretrain/zh_laws.train.jsonl", 80)]:
        src = shared_data / rel
        if not src.is_file():
            pytest.skip(f"{src} not found")
        with open(src, encoding="utf-8") as f:
            parts[name] = write_jsonl(tmp_path / f"{name}.jsonl", [json.loads(next(f)) for _ in range(n)])
    r = dt.mix([(parts["en"], 0.6), (parts["zh"], 0.2), (parts["law"], 0.2)], str(tmp_path / "mix.jsonl"),
               tokenizer, total_tokens=60000, seed=0)
    total = sum(s.taken_tokens for s in r.sources)
    biggest = max(int(dt.record_lengths(p, "pretrain", tokenizer).max()) for p in parts.values())
    # whole records: each source lands within half its longest record of its target (law chunks are ~1k tokens)
    for s in r.sources:
        assert abs(s.taken_tokens - s.target) <= biggest / 2 + 1, (s.path, s.taken_tokens, s.target)
    assert abs(total - 60000) <= 1.5 * biggest and abs(r.sources[0].taken_tokens / total - 0.6) < 0.015


def test_mix_sft_and_dpo_count_rendered_conversation_tokens(tiny_data, tokenizer, tmp_path):
    chat = [{"conversations": [{"role": "user", "content": f"问题 {i}？"},
                               {"role": "assistant", "content": "回答。" * (1 + i % 7)}]} for i in range(200)]
    other = write_jsonl(tmp_path / "chat.jsonl", chat)
    lengths = dt.record_lengths(other, "sft", tokenizer)
    assert lengths.tolist() == [len(tokenizer.render_chat(r["conversations"])[0]) for r in chat]
    r = dt.mix([(tiny_data["sft"], 0.7), (other, 0.3)], str(tmp_path / "sft_mix.jsonl"), tokenizer,
               total_tokens=int(lengths.sum()), seed=0)
    total = sum(s.taken_tokens for s in r.sources)
    assert r.kind == "sft" and abs(r.sources[1].taken_tokens / total - 0.3) < 0.01
    pairs = [{"chosen": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": "no"}]}
             for i in range(50)]
    dpo = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    n = dt.record_lengths(dpo, "dpo", tokenizer)
    assert n[0] == sum(len(tokenizer.render_chat(pairs[0][side], last_reply_only=True)[0])
                       for side in ("chosen", "rejected"))
    r = dt.mix([(tiny_data["dpo"], 1), (dpo, 1)], str(tmp_path / "dpo_mix.jsonl"), tokenizer, total_records=60)
    assert r.kind == "dpo" and [s.taken_records for s in r.sources] == [30, 30]
