"""Look at, clean and cut JSONL training data (pretrain / sft / dpo, detected from the keys).

    python prepare_data.py stats  --data_path dataset/default/sft.jsonl --max_seq_len 512
    python prepare_data.py dedup  --data_path raw.jsonl --out_path dedup.jsonl --threshold 0.8
    python prepare_data.py filter --data_path dedup.jsonl --out_path clean.jsonl --min_chars 50 \\
                                  --max_repeated_line_ratio 0.3
    python prepare_data.py sample --data_path clean.jsonl --out_path small.jsonl --max_mb 50 --seed 42
    python prepare_data.py convert --data_path train.json --out_path sft.jsonl --from columns \\
                                   --map prompt=content,response=summary
    python prepare_data.py scrub  --data_path sft.jsonl --out_path sft.clean.jsonl
    python prepare_data.py mix    en.jsonl:0.6 zh.jsonl:0.2 code.jsonl:0.2 --out_path mix.jsonl \\
                                  --total_tokens 50000000

Every subcommand streams the file (any size), stops at the first bad line with `error: FILE:LINE: ...`,
copies kept lines unchanged and writes its output atomically. The work is done by minimind/datatools.py
(record conversion: minimind/formats.py, personal-data patterns: minimind/scrub.py).
"""
import argparse
import os
import re

from minimind import DEFAULT_TOKENIZER, cli
from minimind import datatools as dt
from minimind import formats
from minimind import plot
from minimind import scrub as pii
from minimind.tokenizer import Tokenizer


def add_io(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--data_path", required=output, nargs="+" if not output else None,
                   help="input JSONL file" + ("(s)" if not output else ""))
    if output:
        p.add_argument("--out_path", required=True, help="output JSONL file (written atomically)")
    p.add_argument("--kind", default="auto", choices=["auto", *dt.KINDS],
                   help="record format; auto = from the first line's keys (text / conversations / chosen)")


def check_out(args) -> None:
    if os.path.abspath(args.out_path) == os.path.abspath(args.data_path):
        raise cli.UsageError("--out_path must differ from --data_path (the input is read twice; keep the original)")


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stats", help="documents, characters, tokens, length histogram, truncation at --max_seq_len")
    add_io(s, output=False)
    s.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="tokenizer dir for token counts (default: the bundled one; 'none' = characters only)")
    s.add_argument("--max_seq_len", type=int, default=512, help="report what a window of this many tokens cuts")
    s.add_argument("--limit", type=int, default=0, help="look at the first N records only (0 = all)")
    s.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the per-record length histogram, --max_seq_len marked, as this PNG (needs matplotlib)")
    formats.add_format_args(s)

    d = sub.add_parser("dedup", help="remove exact and near duplicates (MinHash + LSH on character n-grams)")
    add_io(d)
    d.add_argument("--near", type=int, default=1, choices=[0, 1], help="0 = exact duplicates only")
    d.add_argument("--threshold", type=float, default=0.8,
                   help="near duplicates: estimated Jaccard similarity of character n-gram sets at or above this")
    d.add_argument("--num_perm", type=int, default=128, help="MinHash signature length (more = finer estimate)")
    d.add_argument("--bands", type=int, default=0,
                   help="LSH bands (rows = num_perm // bands); 0 = chosen from --threshold")
    d.add_argument("--ngram", type=int, default=5, help="shingle size in characters")
    d.add_argument("--show", type=int, default=3, help="print this many removed near duplicates with their match")

    f = sub.add_parser("filter", help="drop records by quality rules; prints how many each rule removed")
    add_io(f)
    f.add_argument("--min_chars", type=int, default=0, help="drop records shorter than this (0 = off)")
    f.add_argument("--max_chars", type=int, default=0, help="drop records longer than this (0 = off)")
    f.add_argument("--max_repeated_line_ratio", type=float, default=1.0,
                   help="drop records whose share of repeated lines is above this (Gopher uses 0.3; 1 = off)")
    f.add_argument("--max_symbol_ratio", type=float, default=1.0,
                   help="drop records whose share of non-letter/digit/punctuation characters is above this (1 = off)")
    f.add_argument("--drop_pattern", action="append", default=[],
                   help="drop records matching this regular expression (repeatable)")

    m = sub.add_parser("sample", help="a seeded random subset by count (--n) or size (--max_mb)")
    add_io(m)
    m.add_argument("--n", type=int, default=0, help="number of records (reservoir sampling)")
    m.add_argument("--max_mb", type=float, default=0.0, help="output size limit in MiB")
    m.add_argument("--seed", type=int, default=42, help="random seed (same seed, same subset)")

    c = sub.add_parser("convert", help="alpaca / sharegpt / column-mapped / dataset_info.json data -> MiniMind JSONL")
    c.add_argument("--data_path", default=None, help="input file: JSON Lines or one JSON array (not needed with "
                                                     "--dataset_info, whose entry names the file)")
    c.add_argument("--out_path", required=True, help="output JSONL file (written atomically)")
    c.add_argument("--kind", default="auto", choices=["auto", "sft", "dpo"],
                   help="insist on SFT conversations or DPO pairs; auto = DPO when records carry chosen/rejected")
    formats.add_format_args(c, flag="--from")

    r = sub.add_parser("scrub", help="replace personal data (e-mail, phone, ID/bank card, IP) by placeholders, "
                                     "or drop the records; any JSON format")
    r.add_argument("--data_path", required=True, help="input file: JSON Lines or one JSON array, any format")
    r.add_argument("--out_path", required=True, help="output JSONL file (written atomically)")
    r.add_argument("--kinds", default=",".join(pii.KINDS),
                   help=f"comma-separated kinds to look for (default all: {','.join(pii.KINDS)})")
    r.add_argument("--action", default="replace", choices=["replace", "drop"],
                   help="replace = typed placeholder ([EMAIL], [PHONE], [ID_CARD], [BANK_CARD], [IP]); "
                        "drop = leave out every record with a hit")
    r.add_argument("--show", type=int, default=5, help="print FILE:LINE (never the value) of the first N hits")

    x = sub.add_parser("mix", help="mix corpora by ratio (in tokens, or records), seeded; prints achieved shares")
    x.add_argument("sources", nargs="+", metavar="PATH:RATIO",
                   help="input JSONL files with their ratios, e.g. en.jsonl:0.6 zh.jsonl:0.2 code.jsonl:0.2 "
                        "(ratios are normalised to sum to 1)")
    x.add_argument("--out_path", required=True, help="output JSONL file (written atomically)")
    x.add_argument("--total_tokens", type=int, default=0,
                   help="size of the mix in tokens; shares hold in tokens (0 with --total_records 0 = the largest "
                        "mix that repeats no record)")
    x.add_argument("--total_records", type=int, default=0, help="size of the mix in records; shares hold in records")
    x.add_argument("--allow_repeat", type=int, default=0, choices=[0, 1],
                   help="1 = a source smaller than its share is used more than once (upsampling); 0 = error")
    x.add_argument("--seed", type=int, default=42, help="random seed (same seed, same mix)")
    x.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="tokenizer dir that counts the tokens (default: the bundled one; 'none' = characters)")
    x.add_argument("--kind", default="auto", choices=["auto", *dt.KINDS], help="record format; auto = from keys")
    args = p.parse_args()
    kind = None if getattr(args, "kind", "auto") == "auto" else args.kind

    # --- run ------------------------------------------------------------------------------------------------
    if args.command == "stats":
        tokenizer = load_tokenizer(args.tokenizer)
        if args.max_seq_len < 1:
            raise cli.UsageError("--max_seq_len must be at least 1")
        file, spec = formats.spec_from_args(args)
        if file is not None and args.data_path:
            raise cli.UsageError("--data_path: the --dataset_info entry names the file already; drop one")
        if file is None and not args.data_path:
            raise cli.UsageError("stats needs --data_path (or --dataset_info FILE --dataset NAME)")
        if args.plot:
            plot.require_matplotlib()   # fail before the (long) counting pass, not after
        lengths = {}
        for path in [file] if file else args.data_path:
            if not os.path.isfile(path):
                raise cli.UsageError(f"--data_path {path}: no such file")
            s = formats.resolve(path, spec)
            reader = k = None
            if s.format != "minimind" or formats.is_json_array(path):
                # other formats: counted as what they convert to (kind from the first usable record)
                reader, k = formats.make_reader(s, bool(args.strict)), formats.convert_kind(path, s)
            st = dt.compute_stats(path, kind or k, tokenizer, args.max_seq_len, args.limit, reader=reader)
            print(dt.format_stats(st))
            lengths[path] = st.lengths
        if args.plot:
            print(f"length histogram: {plot.plot_lengths(lengths, args.max_seq_len, args.plot, st.unit)}")
        return
    if args.command == "convert":
        file, spec = formats.spec_from_args(args)
        if file is not None:
            if args.data_path:
                raise cli.UsageError("--data_path: the --dataset_info entry names the file already; drop one")
            args.data_path = file
        if not args.data_path:
            raise cli.UsageError("convert needs --data_path (or --dataset_info FILE --dataset NAME)")
        check_out(args)
        rep = dt.convert_file(args.data_path, args.out_path, spec, kind, bool(args.strict))
        print(rep.summary())
        print(f"wrote {args.out_path}")
        return
    if args.command == "scrub":
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        bad = [k for k in kinds if k not in pii.KINDS]
        if bad or not kinds:
            raise cli.UsageError(f"--kinds {args.kinds!r}: use a comma-separated subset of {','.join(pii.KINDS)}")
        check_out(args)
        r = dt.scrub_file(args.data_path, args.out_path, kinds, args.action, args.show)
        print_table([("documents", r.documents), ("with personal data", r.changed),
                     ("dropped" if args.action == "drop" else "rewritten", r.changed),
                     ("kept", r.documents - r.dropped)], r.documents)
        print("found: " + ", ".join(f"{k} {n:,}" for k, n in r.counts.items()))
        for where, found in r.examples:
            print(f"  e.g. {where}: {', '.join(found)}")
        return
    if args.command == "mix":
        sources = [dt.parse_mix_source(t) for t in args.sources]
        tokenizer = load_tokenizer(args.tokenizer) if not args.total_records else None
        r = dt.mix(sources, args.out_path, tokenizer, args.total_tokens, args.total_records, args.seed,
                   bool(args.allow_repeat), kind)
        print(dt.format_mix(r))
        print(f"wrote {args.out_path} (seed {args.seed})")
        return

    check_out(args)
    if args.command == "dedup":
        if not 0 < args.threshold <= 1:
            raise cli.UsageError("--threshold must be in (0, 1]")
        if args.num_perm < 1 or args.ngram < 1 or not 0 <= args.bands <= args.num_perm:
            raise cli.UsageError("--num_perm and --ngram must be >= 1 and --bands between 0 and --num_perm")
        r = dt.dedup(args.data_path, args.out_path, kind, bool(args.near), args.threshold, args.num_perm,
                     args.bands, args.ngram, examples=args.show)
        how = (f"near: Jaccard >= {args.threshold} on {args.ngram}-char shingles, {args.num_perm} perms, "
               f"{r.bands} bands x {r.rows} rows") if args.near else "near: off"
        table = [("documents", r.documents), ("exact duplicates removed", r.exact),
                 ("near duplicates removed", r.near), ("kept", r.kept)]
        print_table(table, r.documents)
        print(how)
        for removed, kept, sim in r.examples:
            print(f"  e.g. {args.data_path}:{removed} ~ line {kept} (estimated similarity {sim:.2f})")
    elif args.command == "filter":
        for pat in args.drop_pattern:
            try:
                re.compile(pat)
            except re.error as e:
                raise cli.UsageError(f"--drop_pattern {pat!r}: invalid regular expression ({e})") from None
        rules = dt.Rules(args.min_chars, args.max_chars, args.max_repeated_line_ratio, args.max_symbol_ratio,
                         args.drop_pattern)
        if not rules.checks():
            raise cli.UsageError("no rule given: set at least one of --min_chars, --max_chars, "
                                 "--max_repeated_line_ratio, --max_symbol_ratio, --drop_pattern")
        r = dt.filter_file(args.data_path, args.out_path, rules, kind)
        print_table([("documents", r.documents), *[(f"removed by {k}", v) for k, v in r.removed.items()],
                     ("kept", r.kept)], r.documents)
    else:
        if (args.n > 0) == (args.max_mb > 0):
            raise cli.UsageError("give exactly one of --n (a count) or --max_mb (a size), as a positive number")
        r = dt.sample(args.data_path, args.out_path, args.n, args.max_mb, args.seed, kind)
        print_table([("documents", r.documents), ("kept", r.kept)], r.documents)
        print(f"wrote {args.out_path}: {r.bytes / 2 ** 20:,.2f} MiB (seed {args.seed})")


def load_tokenizer(path: str):
    """The tokenizer at `path`, or None for 'none' (and, with a note, when the bundled one is missing)."""
    if path == "none":
        return None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return Tokenizer.load(path)
    if path != DEFAULT_TOKENIZER:
        raise cli.UsageError(f"--tokenizer {path}: no tokenizer.json there")
    print(f"note: no bundled tokenizer at {path}; counting characters only")
    return None


def print_table(rows, total: int) -> None:
    w = max(len(k) for k, _ in rows)
    cw = max(len(f"{v:,}") for _, v in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v:>{cw},}  {100 * v / max(total, 1):5.1f}%")


if __name__ == "__main__":
    cli.run(main)
