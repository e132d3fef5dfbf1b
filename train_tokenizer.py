"""Train a byte-level BPE tokenizer on JSONL text (any of the pretrain / sft / dpo formats).

    python train_tokenizer.py --data_path dataset/default/pretrain.jsonl --vocab_size 6400 --out_dir out/tokenizer

The result (tokenizer.json + tokenizer_config.json) is what train_pretrain.py --tokenizer reads. A tokenizer
trained by this script on the default data ships in minimind/default_tokenizer, so this step is optional.

Ids 0-2 are ChatML's <|endoftext|> <|im_start|> <|im_end|>, ids 3-8 the thinking and tool markup (<think>
</think> <tool_call> </tool_call> <tool_response> </tool_response>), each one token; tokenizer_config.json gets
minimind's Qwen3-style chat template (tokenizer.CHAT_TEMPLATE), which transformers renders exactly as
minimind's renderer does. docs/en/thinking_tools.md explains the layout.
"""
import argparse
import json
import os

from minimind import cli
from minimind.checkpoint import atomic_dir
from minimind.data import read_jsonl
from minimind.errors import DataError
from minimind.datatools import detect_kind
from minimind.tokenizer import train_bpe


def message_texts(m: dict) -> list[str]:
    """A message's strings as a model sees them: content, reasoning, and tool lists / calls as JSON text."""
    parts = [m["content"]]
    if isinstance(m.get("reasoning_content"), str):
        parts.append(m["reasoning_content"])
    for field in ("tools", "tool_calls"):
        if m.get(field):
            parts.append(m[field] if isinstance(m[field], str) else json.dumps(m[field], ensure_ascii=False))
    return parts


def texts(paths: list[str], max_chars: int):
    """Every string a model will see: pretrain text, and each message of sft/dpo records."""
    seen = 0
    for path in paths:
        kind = detect_kind(path)  # pretrain / sft / dpo, from the first record's keys
        for rec in read_jsonl(path, kind):
            if kind == "pretrain":
                parts = [rec["text"]]
            elif kind == "sft":
                parts = [t for m in rec["conversations"] for t in message_texts(m)]
            else:
                parts = [t for m in rec["chosen"] + rec["rejected"][-1:] for t in message_texts(m)]
            for t in parts:
                yield t
                seen += len(t)
                if max_chars and seen >= max_chars:
                    return


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", nargs="+", default=["dataset/default/pretrain.jsonl"],
                   help="one or more JSONL files")
    p.add_argument("--out_dir", default="out/tokenizer", help="where to write tokenizer.json")
    p.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size, special tokens included")
    p.add_argument("--min_frequency", type=int, default=2, help="a pair must occur this often to be merged")
    p.add_argument("--max_chars", type=int, default=0, help="read at most this many characters (0 = all)")
    args = p.parse_args()
    if args.vocab_size < 265:
        raise cli.UsageError("--vocab_size must be at least 265 (256 bytes + 9 special tokens)")
    for path in args.data_path:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file (build the default data with: python dataset/build_default.py)")

    tokenizer = train_bpe(texts(args.data_path, args.max_chars), args.vocab_size, args.min_frequency)
    with atomic_dir(args.out_dir) as tmp:
        tokenizer.save(tmp)
    sample = "def hello():\n    print('你好, world!')"
    ids = tokenizer.encode(sample)
    print(f"saved {args.out_dir}: vocab {tokenizer.vocab_size} | {len(sample)} chars -> {len(ids)} tokens on "
          f"{sample!r} | round trip {'ok' if tokenizer.decode(ids) == sample else 'FAILED'}")


if __name__ == "__main__":
    cli.run(main)
