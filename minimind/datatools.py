"""Data tools: look at a corpus (stats), clean it (exact + near-duplicate removal, quality filters), cut it (sample).

Every tool streams the JSONL file line by line (minimind.data.read_jsonl: tqdm progress, one-line FILE:LINE errors),
so a 10 GB file never sits in memory; what is kept per document is a few numbers in numpy arrays. Outputs are
written to a temp file beside the target and renamed into place, so an interrupted run leaves no half file.
Lines are copied byte for byte: a tool removes or keeps records, it never rewrites them.

The CLI is prepare_data.py (stats / dedup / sample / filter / convert / scrub / mix); each function here returns
its counts. convert and scrub write records they changed as new JSON; everything else is copied byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import unicodedata
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from . import formats, scrub
from .data import DataError, read_jsonl, with_reasoning
from .errors import UsageError
from .jsonio import json_lines

KINDS = ("pretrain", "sft", "dpo")


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: format detection, the text of a record, atomic output
# ---------------------------------------------------------------------------------------------------------------
def detect_kind(path: str) -> str:
    """pretrain / sft / dpo from the keys of the first non-blank line."""
    for lineno, _, obj in json_lines(path):
        if isinstance(obj, dict):
            if "conversations" in obj:
                return "sft"
            if "chosen" in obj or "rejected" in obj:
                return "dpo"
            if "text" in obj:
                return "pretrain"
        raise DataError(f"{path}:{lineno}: cannot tell the format: expected a 'text' (pretrain), "
                        f"'conversations' (sft) or 'chosen'/'rejected' (dpo) key; or pass --kind")
    raise DataError(f"{path}: the file has no records")


def record_text(rec: dict, kind: str) -> str:
    """The text of a record: pretrain 'text'; sft every turn's content; dpo the shared prompt + both replies."""
    if kind == "pretrain":
        return rec["text"]
    if kind == "sft":  # reasoning_content included, as training sees it by default
        return "\n".join(m["content"] for m in with_reasoning(rec["conversations"]))
    return "\n".join([m["content"] for m in rec["chosen"]] + [rec["rejected"][-1]["content"]])


def normalize(text: str) -> str:
    """For duplicate detection: Unicode NFKC (full-width -> ASCII forms), case-folded, whitespace runs -> one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@contextmanager
def atomic_output(path: str):
    """Open a binary temp file beside `path`; on success rename it onto `path`, on error delete it."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output should be readable like any file we write
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _file_state(path: str):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _check_unchanged(path: str, state) -> None:
    if _file_state(path) != state:
        raise DataError(f"{path}: the file changed while it was being read twice; run again when nothing writes it")


def _copy_selected(path: str, kind: str, keep: np.ndarray, out_path: str) -> None:
    """Second pass: copy the lines of the records whose index is marked in `keep`, unchanged."""
    with atomic_output(out_path) as out:
        for i, (_, raw, _) in enumerate(read_jsonl(path, kind, with_lines=True)):
            if keep[i]:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")


# ---------------------------------------------------------------------------------------------------------------
# stats: documents, characters, tokens, length histogram, what --max_seq_len would cut
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    path: str
    kind: str
    bytes: int
    documents: int = 0
    characters: int = 0
    tokens: int | None = None          # None without a tokenizer
    supervised: int | None = None      # sft/dpo: tokens the loss is computed on (assistant replies)
    max_seq_len: int = 0
    over: int = 0                      # pretrain: documents longer than max_seq_len tokens; sft/dpo: conversations
                                       # that lose supervised tokens at max_seq_len (the trainer's "truncated")
    dropped: int = 0                   # sft/dpo: conversations with no supervised token left after truncation
    supervised_cut: int = 0            # sft/dpo: supervised tokens beyond max_seq_len
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per document, tokens (or chars)
    unit: str = "tokens"


def compute_stats(path: str, kind: str | None = None, tokenizer=None, max_seq_len: int = 512, limit: int = 0,
                  batch: int = 512, reader=None) -> Stats:
    """One streaming pass. Token counts are what training sees: pretrain [bos] text [eos]; sft/dpo the rendered
    ChatML conversation (dpo: the longer of chosen/rejected decides truncation; tokens count both).
    reader: reader(path, kind) yielding records converted from another format (minimind.formats.record_reader);
    then `kind` must be given."""
    kind = kind or detect_kind(path)
    st = Stats(path, kind, os.path.getsize(path), max_seq_len=max_seq_len,
               unit="tokens" if tokenizer is not None else "characters")
    lengths = array("q")
    if tokenizer is not None:
        st.tokens = 0
        st.supervised = 0 if kind != "pretrain" else None
    pending: list[str] = []

    def flush_pretrain():  # batch-encode: the Rust tokenizer runs a batch on all cores
        for ids in tokenizer.encode_batch(pending):
            n = len(ids) + 2
            st.tokens += n
            lengths.append(n)
            st.over += n > max_seq_len
        pending.clear()

    def reply_tokens(messages, last_only):  # (length, supervised, supervised kept within max_seq_len)
        ids, mask = tokenizer.render_chat(with_reasoning(messages), last_reply_only=last_only)
        return len(ids), sum(mask[1:]), sum(mask[1:max_seq_len + 1])  # targets are tokens 1.. of the window

    for rec in (reader or read_jsonl)(path, kind):
        st.documents += 1
        text = record_text(rec, kind)
        st.characters += len(text)
        if tokenizer is None:
            lengths.append(len(text))
        elif kind == "pretrain":
            pending.append(rec["text"])
            if len(pending) == batch:
                flush_pretrain()
        else:
            sides = [reply_tokens(rec["conversations"], False)] if kind == "sft" else \
                [reply_tokens(rec["chosen"], True), reply_tokens(rec["rejected"], True)]
            n = max(s[0] for s in sides)
            st.tokens += sum(s[0] for s in sides)
            st.supervised += sum(s[1] for s in sides)
            st.supervised_cut += sum(s[1] - s[2] for s in sides)
            lost = any(s[2] == 0 for s in sides)  # dropped: no supervised token inside the window
            st.dropped += lost
            st.over += not lost and any(s[1] > s[2] for s in sides)  # kept, but a reply is cut ('truncated')
            lengths.append(n)
        if limit and st.documents >= limit:
            break
    if pending:
        flush_pretrain()
    st.lengths = np.frombuffer(lengths, dtype=np.int64) if len(lengths) else np.zeros(0, np.int64)
    return st


def histogram(lengths: np.ndarray, width: int = 30) -> list[tuple[str, int, float, str]]:
    """Power-of-two length buckets: [(range label, count, share, text bar)], empty buckets at the ends dropped."""
    if len(lengths) == 0:
        return []
    top = max(int(lengths.max()), 1)
    edges = [0] + [2 ** k for k in range(4, max(5, math.ceil(math.log2(top + 1)) + 1))]
    if edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(lengths, bins=edges)
    nz = np.flatnonzero(counts)
    rows, peak = [], counts.max()
    for i in range(nz[0], nz[-1] + 1):
        share = counts[i] / len(lengths)
        rows.append((f"{edges[i]:,}-{edges[i + 1] - 1:,}", int(counts[i]), share,
                     "█" * max(int(round(width * counts[i] / peak)), 1 if counts[i] else 0)))
    return rows


def format_stats(st: Stats) -> str:
    """The table prepare_data.py stats prints."""
    n = max(st.documents, 1)
    rows = [("file", f"{st.path} ({st.kind}, {st.bytes / 2 ** 20:,.1f} MB)"),
            ("documents", f"{st.documents:,}"),
            ("characters", f"{st.characters:,}  (mean {st.characters / n:,.1f} per document)")]
    if st.tokens is not None:
        rows.append(("tokens", f"{st.tokens:,}  (mean {st.tokens / n:,.1f} per document, "
                               f"{st.characters / max(st.tokens, 1):.2f} characters per token)"))
    if st.supervised is not None:
        rows.append(("supervised tokens", f"{st.supervised:,}  ({100 * st.supervised / max(st.tokens, 1):.1f}% of "
                                          f"tokens: the assistant replies the loss is computed on)"))
    if len(st.lengths):
        p = np.percentile(st.lengths, [50, 90, 99])
        rows.append((f"length ({st.unit})", f"min {st.lengths.min():,} | p50 {p[0]:,.0f} | p90 {p[1]:,.0f} | "
                                            f"p99 {p[2]:,.0f} | max {st.lengths.max():,}"))
    if st.tokens is None:
        rows.append(("over --max_seq_len", "n/a (needs a tokenizer)"))
    elif st.kind == "pretrain":
        rows.append((f"over --max_seq_len {st.max_seq_len}",
                     f"{st.over:,} documents ({100 * st.over / n:.1f}%): packing splits them across windows, "
                     f"nothing is lost"))
    else:
        rows.append((f"over --max_seq_len {st.max_seq_len}", f"{st.over:,} conversations ({100 * st.over / n:.1f}%) "
                                                             f"lose the end of a reply (cut at the window's end)"))
        cut = 100 * st.supervised_cut / max(st.supervised, 1)
        rows.append(("supervised tokens cut", f"{st.supervised_cut:,} ({cut:.1f}% of supervised tokens lie beyond "
                                              f"the window)"))
        rows.append(("dropped", f"{st.dropped:,} ({100 * st.dropped / n:.1f}%): no reply token left within the window"))
    w = max(len(k) for k, _ in rows)
    out = [f"{k:<{w}}  {v}" for k, v in rows]
    hist = histogram(st.lengths)
    if hist:
        out.append(f"histogram of length in {st.unit}:")
        lw = max(len(r[0]) for r in hist)
        cw = max(len(f"{r[1]:,}") for r in hist)
        out += [f"  {label:>{lw}}  {count:>{cw},}  {100 * share:5.1f}%  {bar}" for label, count, share, bar in hist]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# dedup: exact (hash of the normalised text) + near duplicates (MinHash + LSH over character n-grams)
# ---------------------------------------------------------------------------------------------------------------
# MinHash: the Jaccard similarity of two shingle sets equals the probability that both sets have the same minimum
# under a random hash function. With num_perm hash functions, the share of equal minima estimates the similarity.
# LSH: cut the signature into `bands` bands of `rows` values; two documents become candidates when any band is
# equal, which happens with probability 1 - (1 - J^rows)^bands: an S-curve that is steep around the threshold.
# Candidates are then verified against the threshold with the full signature (few false positives survive).
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: scrambles uint64s so every output bit depends on every input bit (wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint64 hashes of every character n-gram of `text` (characters, not words: works for Chinese too)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = min(ngram, len(cp))
    if n == 0:
        return _mix64(np.zeros(1, np.uint64))
    m = len(cp) - n + 1
    h = np.zeros(m, np.uint64)
    for k in range(n):  # polynomial hash of each window, all windows at once
        h = h * np.uint64(0x100000001B3) + cp[k:k + m]
    return _mix64(h)


@dataclass
class MinHasher:
    """num_perm hash functions h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 (multiply-shift hashing; a_i odd)."""
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, 2 ** 63, self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2 ** 63, self.num_perm, dtype=np.uint64)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures; the texts of a batch are hashed in one vectorised go."""
        shingles = [shingle_hashes(t, self.ngram) for t in texts]
        starts = np.cumsum([0] + [len(s) for s in shingles[:-1]])
        x = np.concatenate(shingles)
        out = np.empty((self.num_perm, len(texts)), np.uint32)
        step = max(1, (1 << 22) // len(x))  # hash functions per chunk: bounds the (chunk x shingles) matrix to 32 MB
        for i in range(0, self.num_perm, step):
            h = (self.a[i:i + step, None] * x[None, :] + self.b[i:i + step, None]) >> np.uint64(32)
            out[i:i + step] = np.minimum.reduceat(h, starts, axis=1)  # min over each document's shingles
        return out.T


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive + false-negative areas
    of the S-curve around the threshold (datasketch's rule). Candidates are verified afterwards, so a false
    positive only costs a comparison while a false negative is a duplicate kept: weigh misses 9x more.
    At threshold 0.8, 128 perms: 14 bands x 9 rows, a pair at J=0.8 is a candidate 87% of the time, at 0.9 99.9%."""
    s = np.linspace(0, 1, 1001)
    best = None
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1 - (1 - s ** r) ** b  # probability of becoming a candidate at similarity s
        fp = np.trapezoid(np.where(s < threshold, p, 0), s)
        fn = np.trapezoid(np.where(s >= threshold, 1 - p, 0), s)
        cost = fp_weight * fp + (1 - fp_weight) * fn
        if best is None or cost < best[0]:
            best = (cost, b, r)
    return best[1], best[2]


def _band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of `rows` signature values."""
    sig = sig.astype(np.uint64)
    out = np.zeros((len(sig), bands), np.uint64)
    for j in range(bands):
        h = np.full(len(sig), np.uint64(j))
        for k in range(rows):
            h = _mix64(h * np.uint64(0x100000001B3) + sig[:, j * rows + k])
        out[:, j] = h
    return out


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (a[k], b[k]): label = the smallest index in the component.

    Union-find without a Python loop over edges: repeat "label = min over each edge" + pointer jumping.
    """
    labels = np.arange(n)
    while True:
        m = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


@dataclass
class DedupResult:
    documents: int
    exact: int                  # removed as exact duplicates (same normalised text as an earlier document)
    near: int                   # removed as near duplicates (estimated Jaccard >= threshold to a kept document)
    kept: int
    bands: int = 0
    rows: int = 0
    examples: list = field(default_factory=list)  # [(removed line, kept line, estimated similarity)]


def dedup(path: str, out_path: str, kind: str | None = None, near: bool = True, threshold: float = 0.8,
          num_perm: int = 128, bands: int = 0, ngram: int = 5, batch: int = 256, seed: int = 1,
          examples: int = 3) -> DedupResult:
    """Keep the first of each group of duplicates; write the survivors (unchanged lines, original order).

    Pass 1 keeps per document an 8-byte text hash, its line number and (near) a num_perm x uint32 MinHash
    signature + band hashes, spilled to temp files (memory-mapped), so memory stays flat for any file size.
    Pass 2 copies the kept lines. Near-duplicate groups are connected components: if A~B and B~C, only A stays.
    """
    kind = kind or detect_kind(path)
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    if near:
        if bands:
            if bands > num_perm:
                raise ValueError(f"bands ({bands}) cannot exceed num_perm ({num_perm})")
            rows = num_perm // bands
        else:
            bands, rows = lsh_params(threshold, num_perm)
    state = _file_state(path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    hasher = MinHasher(num_perm, ngram, seed) if near else None
    keys, linenos = array("Q"), array("Q")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_path)), prefix=".dedup-") as tmp:
        sig_file = os.path.join(tmp, "signatures.u32")
        band_file = os.path.join(tmp, "bands.u64")
        with open(sig_file, "wb") as fs, open(band_file, "wb") as fb:
            texts: list[str] = []

            def flush():
                sig = hasher.signatures(texts)
                sig.tofile(fs)
                _band_hashes(sig, bands, rows).tofile(fb)
                texts.clear()

            for lineno, _, rec in read_jsonl(path, kind, with_lines=True):
                norm = normalize(record_text(rec, kind))
                keys.append(int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little"))
                linenos.append(lineno)
                if near:
                    texts.append(norm)
                    if len(texts) == batch:
                        flush()
            if near and texts:
                flush()
        n = len(keys)
        # exact: a document is a duplicate when an earlier one has the same hash
        keys_np = np.frombuffer(keys, dtype=np.uint64) if n else np.zeros(0, np.uint64)
        exact_dup = np.ones(n, bool)
        exact_dup[np.unique(keys_np, return_index=True)[1]] = False
        keep = ~exact_dup
        result = DedupResult(n, int(exact_dup.sum()), 0, 0, bands if near else 0, rows if near else 0)
        if near and n:
            sig = np.memmap(sig_file, dtype=np.uint32, mode="r", shape=(n, num_perm))
            band_h = np.memmap(band_file, dtype=np.uint64, mode="r", shape=(n, bands))
            pa, pb = [], []
            alive = np.flatnonzero(~exact_dup)  # exact duplicates are gone already: keep them out of the LSH
            for j in range(bands):  # candidates: neighbours in the sorted order of one band's hashes
                col = np.asarray(band_h[:, j])[alive]
                order = np.argsort(col, kind="stable")
                same = col[order[1:]] == col[order[:-1]]
                pa.append(alive[order[:-1][same]])
                pb.append(alive[order[1:][same]])
            a, b = np.concatenate(pa), np.concatenate(pb)
            if len(a):
                pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)
                a, b = pairs[:, 0], pairs[:, 1]
                sim = np.concatenate([(sig[a[i:i + 65536]] == sig[b[i:i + 65536]]).mean(1)
                                      for i in range(0, len(a), 65536)])
                ok = sim >= threshold  # verify: estimated Jaccard from the full signature
                labels = _components(n, a[ok], b[ok])
                near_dup = (labels != np.arange(n)) & ~exact_dup
                keep &= ~near_dup
                result.near = int(near_dup.sum())
                for i in np.flatnonzero(near_dup)[:examples]:
                    j = labels[i]
                    result.examples.append((int(linenos[i]), int(linenos[j]), float((sig[i] == sig[j]).mean())))
            del sig, band_h
        result.kept = int(keep.sum())
        _check_unchanged(path, state)
        _copy_selected(path, kind, keep, out_path)
    return result


# ---------------------------------------------------------------------------------------------------------------
# sample: a seeded random subset by count (reservoir sampling) or by size (the seeds' sample_jsonl_by_size)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    documents: int
    kept: int
    bytes: int


def sample(path: str, out_path: str, n: int = 0, max_mb: float = 0.0, seed: int = 42,
           kind: str | None = None) -> SampleResult:
    """Exactly one of n / max_mb. Output keeps the file's order (shuffling is the trainer's job).

    n: reservoir sampling (Algorithm R), one pass: every subset of n records is equally likely, and only the n
    chosen lines are held in memory. max_mb: each record gets a seeded random key; records are taken in key order
    until the next one would pass max_mb MiB (like shuffling and cutting, MiniMind's sample_jsonl_by_size),
    using two passes and 16 bytes per record.
    """
    if (n > 0) == (max_mb > 0):
        raise ValueError("give exactly one of n or max_mb")
    kind = kind or detect_kind(path)
    rng = random.Random(seed)
    if n > 0:
        reservoir: list[tuple[int, bytes]] = []
        seen = 0
        for i, (_, raw, _) in enumerate(read_jsonl(path, kind, with_lines=True)):
            seen += 1
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            if i < n:
                reservoir.append((i, line))
            else:
                j = rng.randrange(i + 1)  # record i replaces a chosen one with probability n / (i + 1)
                if j < n:
                    reservoir[j] = (i, line)
        reservoir.sort()
        with atomic_output(out_path) as out:
            for _, line in reservoir:
                out.write(line)
        return SampleResult(seen, len(reservoir), sum(len(x) for _, x in reservoir))
    state = _file_state(path)
    keys, sizes = array("d"), array("q")
    for _, raw, _ in read_jsonl(path, kind, with_lines=True):
        keys.append(rng.random())
        sizes.append(len(raw.rstrip(b"\r\n")) + 1)
    order = np.argsort(np.frombuffer(keys, np.float64), kind="stable")
    total = np.cumsum(np.frombuffer(sizes, np.int64)[order])
    take = int(np.searchsorted(total, max_mb * 2 ** 20, side="right"))  # greedy: stop at the first overflow
    keep = np.zeros(len(keys), bool)
    keep[order[:take]] = True
    _check_unchanged(path, state)
    _copy_selected(path, kind, keep, out_path)
    return SampleResult(len(keys), take, int(total[take - 1]) if take else 0)


# ---------------------------------------------------------------------------------------------------------------
# filter: drop low-quality records by simple, explainable rules (Gopher-style heuristics)
# ---------------------------------------------------------------------------------------------------------------
def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (boilerplate, menus, loops of generated text)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are not letters, digits or punctuation (mojibake, markup, emoji walls)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    bad = sum(1 for c in chars if unicodedata.category(c)[0] not in "LNP")
    return bad / len(chars)


@dataclass
class Rules:
    """Each rule is off at its default. A record is charged to the first rule it fails, in this order."""
    min_chars: int = 0
    max_chars: int = 0
    max_repeated_line_ratio: float = 1.0
    max_symbol_ratio: float = 1.0
    drop_patterns: list[str] = field(default_factory=list)

    def checks(self):
        """[(rule name as a flag, predicate(text) -> True when the record must go)]."""
        out = []
        if self.min_chars:
            out.append((f"--min_chars {self.min_chars}", lambda t: len(t) < self.min_chars))
        if self.max_chars:
            out.append((f"--max_chars {self.max_chars}", lambda t: len(t) > self.max_chars))
        if self.max_repeated_line_ratio < 1:
            out.append((f"--max_repeated_line_ratio {self.max_repeated_line_ratio}",
                        lambda t: repeated_line_ratio(t) > self.max_repeated_line_ratio))
        if self.max_symbol_ratio < 1:
            out.append((f"--max_symbol_ratio {self.max_symbol_ratio}",
                        lambda t: symbol_ratio(t) > self.max_symbol_ratio))
        for pat in self.drop_patterns:
            rx = re.compile(pat)
            out.append((f"--drop_pattern {pat}", lambda t, rx=rx: rx.search(t) is not None))
        return out


@dataclass
class FilterResult:
    documents: int
    kept: int
    removed: dict  # rule -> count (each removed record counted once, under the first rule it failed)


def filter_file(path: str, out_path: str, rules: Rules, kind: str | None = None) -> FilterResult:
    kind = kind or detect_kind(path)
    checks = rules.checks()
    removed = {name: 0 for name, _ in checks}
    n = kept = 0
    with atomic_output(out_path) as out:
        for _, raw, rec in read_jsonl(path, kind, with_lines=True):
            n += 1
            text = record_text(rec, kind)
            failed = next((name for name, bad in checks if bad(text)), None)
            if failed is None:
                kept += 1
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                removed[failed] += 1
    return FilterResult(n, kept, removed)


# ---------------------------------------------------------------------------------------------------------------
# convert: alpaca / sharegpt / column-mapped files -> MiniMind JSONL (the record conversion is minimind/formats.py)
# ---------------------------------------------------------------------------------------------------------------
def convert_file(path: str, out_path: str, spec: "formats.Spec", kind: str | None = None,
                 strict: bool = False) -> "formats.Report":
    """Stream `path` through formats.convert_records into `out_path` (JSONL, written atomically).

    Returns the Report (read / converted / skipped per reason). A file where nothing converts is a DataError,
    not an empty output: that is almost always a wrong --from or --map.
    """
    report = formats.Report(path, spec.format)
    with atomic_output(out_path) as out:
        for _, rec in formats.convert_records(path, spec, kind, report, strict):
            out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        if report.converted == 0:  # raised inside the block: the temp file is deleted, nothing is written
            why = "; ".join(f"{r} ({n}, first at {report.first[r]})" for r, n in report.skipped.items())
            raise DataError(f"{path}: no record could be converted ({why}); check --from and --map")
    return report


# ---------------------------------------------------------------------------------------------------------------
# scrub: personal data (e-mail, phones, ID and bank cards, IPs) replaced by typed placeholders, or records dropped
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ScrubResult:
    documents: int = 0
    changed: int = 0                                   # records with at least one hit (rewritten, or dropped)
    dropped: int = 0
    counts: dict = field(default_factory=dict)         # kind -> occurrences
    examples: list = field(default_factory=list)       # [(FILE:LINE, kinds)]: where, never what (that is the PII)


def scrub_file(path: str, out_path: str, kinds=scrub.KINDS, action: str = "replace", show: int = 0) -> ScrubResult:
    """Scrub every string value of every record (any format: ours, alpaca, sharegpt), streaming, atomic output.

    action 'replace': each hit becomes its placeholder ([EMAIL], [PHONE], [ID_CARD], [BANK_CARD], [IP]) and the
    record is rewritten; 'drop': a record with any hit is left out. Records without a hit are copied byte for byte.
    """
    if action not in ("replace", "drop"):
        raise ValueError(f"action must be 'replace' or 'drop', got {action!r}")
    r = ScrubResult(counts={k: 0 for k in kinds})
    with atomic_output(out_path) as out:
        for lineno, raw, obj in formats.iter_json(path, with_raw=True):
            r.documents += 1
            found: dict = {}
            clean = scrub.scrub_value(obj, kinds, found)
            if not found:
                out.write(raw if raw is not None and raw.endswith(b"\n") else
                          raw + b"\n" if raw is not None else (json.dumps(obj, ensure_ascii=False) + "\n").encode())
                continue
            r.changed += 1
            for k, n in found.items():
                r.counts[k] += n
            if len(r.examples) < show:
                r.examples.append((f"{path}:{lineno}", sorted(found)))
            if action == "drop":
                r.dropped += 1
            else:
                out.write((json.dumps(clean, ensure_ascii=False) + "\n").encode("utf-8"))
    return r


# ---------------------------------------------------------------------------------------------------------------
# mix: several corpora into one, by ratio of tokens (or records), seeded
# ---------------------------------------------------------------------------------------------------------------
def parse_mix_source(text: str) -> tuple[str, float]:
    """'data/en.jsonl:0.6' -> ('data/en.jsonl', 0.6); UsageError naming the argument if it is not PATH:RATIO."""
    path, sep, ratio = text.rpartition(":")
    try:
        value = float(ratio)
    except ValueError:
        value = None
    if not sep or not path or value is None or not math.isfinite(value) or value <= 0:
        raise UsageError(f"mix source {text!r}: expected PATH:RATIO with a positive ratio, e.g. en.jsonl:0.6")
    return path, value


@dataclass
class MixSource:
    path: str
    ratio: float                 # as given
    share: float = 0.0           # ratio / sum of ratios: the target share
    records: int = 0             # in the file
    tokens: int = 0              # in the file (characters without a tokenizer)
    taken_records: int = 0       # in the output (a repeated record counts each time)
    taken_tokens: int = 0
    target: int = 0              # tokens (or records) this source should contribute


@dataclass
class MixResult:
    kind: str
    unit: str                    # what the ratios hold in: 'tokens', 'characters' or 'records'
    total: int                   # the target total in that unit
    sources: list


def record_lengths(path: str, kind: str, tokenizer=None, batch: int = 512) -> np.ndarray:
    """Tokens per record, as training counts them (pretrain [bos] text [eos]; sft the rendered chat; dpo both
    sides); characters of record_text without a tokenizer."""
    out = array("q")
    pending: list[str] = []

    def flush():  # batch-encode pretrain text: the Rust tokenizer spreads a batch over all cores
        out.extend(len(ids) + 2 for ids in tokenizer.encode_batch(pending))
        pending.clear()

    for rec in read_jsonl(path, kind):
        if tokenizer is None:
            out.append(len(record_text(rec, kind)))
        elif kind == "pretrain":
            pending.append(rec["text"])
            if len(pending) == batch:
                flush()
        elif kind == "sft":
            out.append(len(tokenizer.render_chat(with_reasoning(rec["conversations"]))[0]))
        else:
            out.append(sum(len(tokenizer.render_chat(with_reasoning(rec[side]), last_reply_only=True)[0])
                           for side in ("chosen", "rejected")))
    if pending:
        flush()
    return np.frombuffer(out, dtype=np.int64).copy() if len(out) else np.zeros(0, np.int64)


def _take(lengths: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """How often each record is used so their lengths sum as close to `target` as whole records allow.

    Whole passes first (every record once per pass, only when the target exceeds the file), then a seeded random
    subset of one more pass: records in random order up to the target, plus the next one if that lands closer.
    """
    total = int(lengths.sum())
    full = target // total if total else 0
    counts = np.full(len(lengths), full, dtype=np.int64)
    rest = target - full * total
    order = rng.permutation(len(lengths))
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, rest, side="right"))   # cum[k-1] <= rest < cum[k]
    if k < len(cum) and cum[k] - rest < rest - (cum[k - 1] if k else 0):
        k += 1
    counts[order[:k]] += 1
    return counts


def mix(sources: list[tuple[str, float]], out_path: str, tokenizer=None, total_tokens: int = 0,
        total_records: int = 0, seed: int = 42, allow_repeat: bool = False, kind: str | None = None) -> MixResult:
    """Write `out_path` with records from each source in proportion to its ratio, in tokens (or records).

    total_tokens: the output's size in tokens, the shares holding in tokens (what the model sees; lines differ
    in length across languages and domains). total_records: the shares hold in records instead. Neither (both
    0): the largest mix that needs no record twice. A source too small for its share is an error unless
    allow_repeat (its records are then used more than once, whole passes first). Records of the sources are
    interleaved at random (seeded), each source's records keeping their file order. Same seed, same file.
    """
    if total_tokens < 0 or total_records < 0 or (total_tokens and total_records):
        raise UsageError("give at most one of --total_tokens or --total_records, as a positive number")
    if len(sources) < 1:
        raise UsageError("mix: give at least one PATH:RATIO source")
    paths = [os.path.abspath(p) for p, _ in sources]
    if len(set(paths)) != len(paths):
        raise UsageError("mix: a file is named twice; give each source once with its whole ratio")
    if os.path.abspath(out_path) in paths:
        raise UsageError("--out_path must differ from every source (the sources are read twice)")
    try:
        kinds = [kind or detect_kind(p) for p, _ in sources]
    except DataError as e:
        if "cannot tell the format" not in str(e):
            raise
        raise DataError(f"{e}; mix reads MiniMind JSONL: bring other formats in with prepare_data.py convert "
                        f"first") from None
    if len(set(kinds)) > 1:
        detail = ", ".join(f"{p} is {k}" for (p, _), k in zip(sources, kinds))
        raise DataError(f"mix: the sources must be of one kind ({detail}); mix pretrain with pretrain, sft with sft")
    kind = kinds[0]
    unit = "records" if total_records else ("tokens" if tokenizer is not None else "characters")
    ratio_sum = sum(r for _, r in sources)
    src, lengths, states = [], [], []
    for p, r in sources:
        states.append(_file_state(p))
        n = record_lengths(p, kind, tokenizer)
        if len(n) == 0:
            raise DataError(f"{p}: the file has no records")
        src.append(MixSource(p, r, r / ratio_sum, len(n), int(n.sum())))
        lengths.append(n)
    unit_lengths = [np.ones_like(n) if unit == "records" else n for n in lengths]
    have = [int(u.sum()) for u in unit_lengths]
    largest = int(min(h / s.share for h, s in zip(have, src)))   # the biggest mix with no record used twice
    total = total_records or total_tokens or largest
    counts = []
    for i, (s, u, h) in enumerate(zip(src, unit_lengths, have)):
        s.target = int(round(total * s.share))
        if s.target > h and not allow_repeat:
            flag = "--total_records" if unit == "records" else "--total_tokens"
            raise UsageError(f"{s.path}: its share {s.share:.1%} of {total:,} {unit} is {s.target:,}, but the file "
                             f"has {h:,}; lower {flag} (at most {largest:,} for these ratios without repeating "
                             f"records) or pass --allow_repeat 1")
        c = _take(u, s.target, np.random.default_rng([seed, i]))
        s.taken_records, s.taken_tokens = int(c.sum()), int((c * lengths[i]).sum())
        counts.append(c)
    for (p, _), st in zip(sources, states):
        _check_unchanged(p, st)

    def lines(i):  # the chosen lines of source i, file order; pass e yields the records used more than e times
        for e in range(int(counts[i].max())):
            for j, (_, raw, _) in enumerate(read_jsonl(sources[i][0], kind, with_lines=True, progress=False)):
                if counts[i][j] > e:
                    yield raw if raw.endswith(b"\n") else raw + b"\n"

    rng = random.Random(seed)
    streams = [lines(i) for i in range(len(src))]
    left = [s.taken_records for s in src]
    with atomic_output(out_path) as out, tqdm(total=sum(left), desc=f"write {os.path.basename(out_path)}",
                                              unit=" rec", leave=False, disable=sum(left) < 100_000) as bar:
        while any(left):  # pick the next source with probability proportional to what it still has to give
            i = rng.choices(range(len(left)), weights=left)[0]
            out.write(next(streams[i]))
            left[i] -= 1
            bar.update()
    return MixResult(kind, unit, total, src)


def format_mix(r: MixResult) -> str:
    """The table prepare_data.py mix prints: per source, what it has, the target share and the achieved one."""
    tok = "tokens" if r.unit != "characters" else "characters"
    all_tok = max(sum(s.taken_tokens for s in r.sources), 1)
    all_rec = max(sum(s.taken_records for s in r.sources), 1)
    head = ["source", "records", tok, "target", "taken records", f"taken {tok}", f"{tok} share", "records share",
            "passes"]
    rows = [[s.path, f"{s.records:,}", f"{s.tokens:,}", f"{s.share:.1%}", f"{s.taken_records:,}",
             f"{s.taken_tokens:,}", f"{s.taken_tokens / all_tok:.1%}", f"{s.taken_records / all_rec:.1%}",
             f"{s.taken_records / s.records:.2f}"] for s in r.sources]
    rows.append(["total", "", "", "", f"{all_rec:,}", f"{all_tok:,}", "100.0%", "100.0%", ""])
    w = [max(len(row[k]) for row in [head] + rows) for k in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w[0]) if k == 0 else c.rjust(w[k]) for k, c in enumerate(row))  # noqa
    return "\n".join([fmt(head), *map(fmt, rows),
                      f"ratios hold in {r.unit} ({r.kind} records; target total {r.total:,} {r.unit}); "
                      f"'passes' > 1 means records were repeated"])
