"""Data tools: dedup on planted duplicates, MinHash vs exact Jaccard, seeded sampling, per-rule filter counts,
stats against independent counts, and FILE:LINE errors through the CLI."""
import json
import os
import random
from collections import Counter

import numpy as np
import pytest

from conftest import run_script
from minimind import DEFAULT_TOKENIZER
from minimind import datatools as dt
from minimind.data import DataError, load_sft, sft_example
from minimind.tokenizer import Tokenizer, train_bpe


def dt_write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def dt_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def dt_random_text(rng: random.Random, n: int, chinese: bool = False) -> str:
    """Unrelated texts: random words (or random CJK characters) share almost no 5-character shingles."""
    if chinese:
        return "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(n))
    words = ("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(n))
    return " ".join(words)


def dt_mutate(rng: random.Random, text: str, k: int) -> str:
    """Change k characters at random positions (a typo-level edit)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), k):
        chars[i] = "Q" if chars[i] != "Q" else "Z"
    return "".join(chars)


def dt_jaccard(a: str, b: str, n: int = 5) -> float:
    sa = {a[i:i + n] for i in range(len(a) - n + 1)}
    sb = {b[i:i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def dt_corpus(tmp_path_factory):
    """60 unrelated documents + 6 exact copies (case/space changed) + 6 near copies (3 characters changed)."""
    rng = random.Random(0)
    base = [dt_random_text(rng, 300, chinese=True) if i % 3 == 0 else dt_random_text(rng, 80) for i in range(60)]
    records, planted = [{"text": t} for t in base], {"exact": set(), "near": set()}
    for i in rng.sample(range(60), 6):
        records.append({"text": "  " + base[i].upper().replace(" ", "   ") + "\n"})  # same after normalising
        planted["exact"].add(len(records))  # 1-based line number
    for i in rng.sample(range(60), 6):
        records.append({"text": dt_mutate(rng, base[i], 3)})
        planted["near"].add(len(records))
        assert dt_jaccard(dt.normalize(base[i]), dt.normalize(records[-1]["text"])) > 0.85  # clearly near
    path = dt_write(tmp_path_factory.mktemp("dt") / "corpus.jsonl", records)
    return path, records, planted


def test_minhash_estimates_jaccard():
    rng = random.Random(1)
    hasher = dt.MinHasher(num_perm=256)
    a = dt_random_text(rng, 60)
    for k in (2, 8, 20):
        b = dt_mutate(rng, a, k)
        sig = hasher.signatures([a, b])
        est = (sig[0] == sig[1]).mean()
        assert abs(est - dt_jaccard(a, b)) < 0.08, (k, est, dt_jaccard(a, b))  # ~3 sigma at 256 perms


def test_components_match_union_find():
    rng = np.random.default_rng(0)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for x, y in zip(a, b):
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    want = [min(j for j in range(n) if find(j) == find(i)) for i in range(n)]
    assert dt._components(n, a, b).tolist() == want


def test_dedup_removes_exactly_the_planted(dt_corpus, tmp_path):
    path, records, planted = dt_corpus
    out = str(tmp_path / "out.jsonl")
    r = dt.dedup(path, out, threshold=0.8)
    assert (r.documents, r.exact, r.near, r.kept) == (72, 6, 6, 60)
    src = dt_lines(path)
    removed = planted["exact"] | planted["near"]
    assert dt_lines(out) == [ln for i, ln in enumerate(src, 1) if i not in removed]  # order and bytes kept
    assert {ex[0] for ex in r.examples} <= planted["near"] and all(s >= 0.8 for _, _, s in r.examples)
    r = dt.dedup(path, out, near=False)
    assert (r.exact, r.near, r.kept) == (6, 0, 66)
    twice = tmp_path / "twice.jsonl"  # the whole file repeated: every copy goes, the result is unchanged
    twice.write_text("\n".join(src + src) + "\n", encoding="utf-8")
    r = dt.dedup(str(twice), str(tmp_path / "out2.jsonl"))
    assert (r.exact, r.near, r.kept) == (72 + 6, 6, 60)
    assert dt_lines(str(tmp_path / "out2.jsonl")) == [ln for i, ln in enumerate(src, 1) if i not in removed]


def test_dedup_threshold_decides(tmp_path):
    rng = random.Random(3)
    a = dt_random_text(rng, 60)
    b = dt_mutate(rng, a, 12)  # true Jaccard around 0.6
    j = dt_jaccard(dt.normalize(a), dt.normalize(b))
    assert 0.45 < j < 0.75
    path = dt_write(tmp_path / "x.jsonl", [{"text": a}, {"text": b}])
    assert dt.dedup(path, str(tmp_path / "o.jsonl"), threshold=0.9).near == 0
    assert dt.dedup(path, str(tmp_path / "o.jsonl"), threshold=0.4).near == 1


def test_dedup_sft_and_dpo_detected(tmp_path):
    conv = {"conversations": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]}
    path = dt_write(tmp_path / "s.jsonl", [conv, conv])
    assert dt.detect_kind(path) == "sft"
    assert dt.dedup(path, str(tmp_path / "o.jsonl")).exact == 1
    pair = {"chosen": conv["conversations"], "rejected": conv["conversations"]}
    assert dt.detect_kind(dt_write(tmp_path / "d.jsonl", [pair])) == "dpo"


def test_sample_by_count_is_seeded_and_uniform(tmp_path):
    path = dt_write(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    o1, o2, o3 = (str(tmp_path / f"o{i}.jsonl") for i in range(3))
    r = dt.sample(path, o1, n=10, seed=7)
    dt.sample(path, o2, n=10, seed=7)
    dt.sample(path, o3, n=10, seed=8)
    assert r.kept == 10 and len(dt_lines(o1)) == 10
    assert dt_lines(o1) == dt_lines(o2) != dt_lines(o3)
    src = dt_lines(path)
    assert [src.index(ln) for ln in dt_lines(o1)] == sorted(src.index(ln) for ln in dt_lines(o1))  # file order
    # reservoir sampling is uniform: over many seeds each record is picked n/N = 1/5 of the time
    small = dt_write(tmp_path / "small.jsonl", [{"text": str(i)} for i in range(5)])
    counts = Counter()
    for seed in range(500):
        dt.sample(small, o1, n=1, seed=seed)
        counts[dt_lines(o1)[0]] += 1
    assert len(counts) == 5 and all(60 < c < 140 for c in counts.values()), counts


def test_sample_by_size(tmp_path):
    rng = random.Random(0)
    path = dt_write(tmp_path / "in.jsonl", [{"text": dt_random_text(rng, rng.randint(5, 200))} for _ in range(300)])
    out = str(tmp_path / "o.jsonl")
    budget = 0.02  # MiB
    r = dt.sample(path, out, max_mb=budget, seed=1)
    size = os.path.getsize(out)
    assert size == r.bytes <= budget * 2 ** 20
    longest = max(len(ln.encode()) + 1 for ln in dt_lines(path))
    assert size > budget * 2 ** 20 - 8 * longest  # filled close to the budget, not stopped early
    assert set(dt_lines(out)) <= set(dt_lines(path))
    dt.sample(path, str(tmp_path / "o2.jsonl"), max_mb=budget, seed=1)
    assert dt_lines(out) == dt_lines(str(tmp_path / "o2.jsonl"))


def test_filter_counts_per_rule(tmp_path):
    good = "A perfectly ordinary paragraph of text.\nWith a second line that differs."
    recs = ([{"text": good}] * 5 + [{"text": "tiny"}] * 3 + [{"text": "x" * 500}] * 2 +
            [{"text": "same line\n" * 8 + "other"}] * 4 + [{"text": "☺☺☺☺☺☺ ☺☺☺☺ ok ☺☺☺☺☺☺☺☺☺☺☺☺"}] * 2 +
            [{"text": "As an AI language model, I cannot do that here."}] * 1)
    path = dt_write(tmp_path / "in.jsonl", recs)
    rules = dt.Rules(min_chars=10, max_chars=400, max_repeated_line_ratio=0.3, max_symbol_ratio=0.5,
                     drop_patterns=[r"(?i)as an ai language model"])
    r = dt.filter_file(path, str(tmp_path / "o.jsonl"), rules)
    assert r.documents == 17 and r.kept == 5
    assert list(r.removed.values()) == [3, 2, 4, 2, 1]
    assert dt_lines(str(tmp_path / "o.jsonl")) == dt_lines(path)[:5]
    assert dt.repeated_line_ratio("a\na\na\nb") == 0.5


def test_stats_against_independent_counts(tmp_path):
    if os.path.isfile(os.path.join(DEFAULT_TOKENIZER, "tokenizer.json")):
        tok = Tokenizer.load(DEFAULT_TOKENIZER)
    else:
        tok = train_bpe(iter([f"sample text number {i} 你好" for i in range(200)]), 400, show_progress=False)
    rng = random.Random(0)
    texts = [dt_random_text(rng, rng.randint(1, 120)) for _ in range(40)]
    p = dt_write(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    st = dt.compute_stats(p, None, tok, max_seq_len=64)
    lens = [len(tok.encode(t)) + 2 for t in texts]
    assert (st.documents, st.characters, st.tokens) == (40, sum(map(len, texts)), sum(lens))
    assert st.over == sum(n > 64 for n in lens)
    assert sum(c for _, c, _, _ in dt.histogram(st.lengths)) == 40
    convs = [[{"role": "user", "content": texts[i][:rng.choice([10, 200])]},  # some prompts fill the window
              {"role": "assistant", "content": texts[i + 1]}] for i in range(0, 40, 2)]
    s = dt_write(tmp_path / "s.jsonl", [{"conversations": c} for c in convs])
    st = dt.compute_stats(s, None, tok, max_seq_len=48)
    assert st.kind == "sft" and st.documents == 20
    assert 0 < st.dropped == sum(sft_example(tok, c, 48) is None for c in convs)
    examples, _ = load_sft(s, tok, 48)
    assert 0 < st.over == sum(e.truncated for e in examples)  # the count train_full_sft.py prints
    assert st.supervised == sum(sum(tok.render_chat(c)[1][1:]) for c in convs)
    table = dt.format_stats(st)
    assert "documents" in table and "supervised tokens cut" in table and "█" in table
    st = dt.compute_stats(s, None, None)  # no tokenizer: characters only
    assert st.tokens is None and st.unit == "characters"


def test_bad_line_is_file_line_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "fine too"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:4: 'text' must be a string"):
        dt.compute_stats(str(path), None, None)
    out = tmp_path / "out" / "o.jsonl"
    r = run_script("prepare_data.py", "dedup", "--data_path", path, "--out_path", out)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"error: {path}:4: 'text' must be a string"
    assert not out.exists() and os.listdir(out.parent) == []  # no half-written output, no temp files left
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    r = run_script("prepare_data.py", "stats", "--data_path", path, "--tokenizer", "none")
    assert r.returncode == 2 and f"error: {path}:2: invalid JSON" in r.stderr
    r = run_script("prepare_data.py", "sample", "--data_path", path, "--out_path", path, "--n", "1")
    assert r.returncode == 2 and "--out_path must differ" in r.stderr


def test_cli_runs_each_tool(dt_corpus, tmp_path):
    path = dt_corpus[0]
    out = tmp_path / "d.jsonl"
    r = run_script("prepare_data.py", "dedup", "--data_path", path, "--out_path", out)
    assert r.returncode == 0, r.stderr
    assert "exact duplicates removed   6" in r.stdout and "near duplicates removed    6" in r.stdout
    r = run_script("prepare_data.py", "filter", "--data_path", out, "--out_path", tmp_path / "f.jsonl",
                   "--min_chars", "100000")
    assert r.returncode == 0 and "removed by --min_chars 100000  60" in r.stdout
