"""Throughput of prepare_data.py scrub, mix and convert on the shared corpora (../shared/data); prints a table.

    python bench/data_tools_throughput.py                       # all three, every shared train file for scrub
    python bench/data_tools_throughput.py --only scrub --repeat 3

Each figure is wall time of the library call the CLI makes (datatools.scrub_file / mix / convert_file), outputs
to a temporary directory, best of --repeat runs (the machine is shared: the best run is the least disturbed).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimind import DEFAULT_TOKENIZER  # noqa: E402
from minimind import datatools as dt  # noqa: E402
from minimind.formats import Spec  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402

SCRUB_FILES = ["pretrain/zh_poetry.train.jsonl", "pretrain/zh_laws.train.jsonl", "pretrain/en_gutenberg.train.jsonl",
               "pretrain/en_c4.train.jsonl", "pretrain/en_wiki.train.jsonl", "sft/en_gsm8k.train.jsonl",
               "dpo/en_hh_harmless.train.jsonl", "dpo/zh_dpo_pairs.train.jsonl"]
MIX = [("pretrain/en_gutenberg.train.jsonl", 0.6), ("pretrain/zh_poetry.train.jsonl", 0.2),
       ("pretrain/zh_laws.train.jsonl", 0.2)]


def best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                      "shared", "data"), help="the shared corpora")
    p.add_argument("--only", choices=["scrub", "mix", "convert"], default=None, help="run one benchmark")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure (the best is reported)")
    p.add_argument("--total_tokens", type=int, default=0,
                   help="size of the mix (0 = the largest that repeats no record)")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.data_dir, "SOURCES.md")):
        sys.exit(f"no shared corpora at {args.data_dir} (pass --data_dir)")
    tmp = tempfile.mkdtemp(prefix="bench-data-")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; best of {args.repeat}")
    rows = []

    if args.only in (None, "scrub"):
        total_mb = total_docs = 0
        total_s = 0.0
        hits: dict = {}
        for rel in SCRUB_FILES:
            path = os.path.join(args.data_dir, rel)
            s, r = best(lambda: dt.scrub_file(path, os.path.join(tmp, "scrub.jsonl")), args.repeat)
            mb = os.path.getsize(path) / 2 ** 20
            total_mb, total_docs, total_s = total_mb + mb, total_docs + r.documents, total_s + s
            for k, n in r.counts.items():
                hits[k] = hits.get(k, 0) + n
            found = ", ".join(f"{k} {n}" for k, n in r.counts.items() if n) or "none"
            rows.append((f"scrub {rel}", f"{mb:.1f} MB, {r.documents:,} records", f"{s:.2f} s",
                         f"{mb / s:.2f} MB/s", f"{r.changed} records hit ({found})"))
        rows.append(("scrub, all of the above", f"{total_mb:.1f} MB, {total_docs:,} records", f"{total_s:.2f} s",
                     f"{total_mb / total_s:.2f} MB/s", ", ".join(f"{k} {n}" for k, n in hits.items())))

    if args.only in (None, "mix"):
        tok = Tokenizer.load(DEFAULT_TOKENIZER)
        sources = [(os.path.join(args.data_dir, rel), ratio) for rel, ratio in MIX]
        mb = sum(os.path.getsize(p) for p, _ in sources) / 2 ** 20
        s, r = best(lambda: dt.mix(sources, os.path.join(tmp, "mix.jsonl"), tok, total_tokens=args.total_tokens,
                                   seed=0), args.repeat)
        read_tokens = sum(x.tokens for x in r.sources)
        total = sum(x.taken_tokens for x in r.sources)
        shares = " / ".join(f"{x.taken_tokens / total:.1%}" for x in r.sources)
        rows.append(("mix en_gutenberg:0.6 zh_poetry:0.2 zh_laws:0.2", f"{mb:.1f} MB in, {read_tokens:,} tokens "
                     f"counted", f"{s:.2f} s", f"{mb / s:.2f} MB/s ({read_tokens / s:,.0f} tokens/s)",
                     f"{total:,} tokens out, shares {shares}"))

    if args.only in (None, "convert"):
        # the shared alpaca-GPT4 demo rebuilt in LLaMA-Factory's alpaca shape (a JSON array), then converted back
        src = os.path.join(args.data_dir, "sft", "nc", "en_alpaca_gpt4_demo.train.jsonl")
        recs = [json.loads(x)["conversations"] for x in open(src, encoding="utf-8")]
        alpaca = [{"instruction": c[0]["content"], "input": "", "output": c[1]["content"]} for c in recs] * 20
        path = os.path.join(tmp, "alpaca.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(alpaca, f, ensure_ascii=False, indent=2)
        mb = os.path.getsize(path) / 2 ** 20
        s, r = best(lambda: dt.convert_file(path, os.path.join(tmp, "sft.jsonl"), Spec("alpaca")), args.repeat)
        rows.append(("convert alpaca JSON array -> sft.jsonl", f"{mb:.1f} MB, {r.read:,} records", f"{s:.2f} s",
                     f"{mb / s:.2f} MB/s ({r.read / s:,.0f} records/s)", f"{r.converted:,} converted"))

    print("| what | input | time | throughput | result |\n|---|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
