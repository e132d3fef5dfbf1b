"""Convert a checkpoint into a minimind model directory (which is itself a transformers checkpoint).

    python convert_model.py SRC --out_dir DIR [--tokenizer DIR]   # Qwen3 / Qwen3-MoE / Qwen2 / Llama dir, MiniMind dir or .pth
    python convert_model.py MODEL_DIR --to gguf --outtype q8_0 --out_path model.gguf   # for llama.cpp / Ollama

Reads top to bottom: args -> tokenizer -> model -> checks -> save. `--to gguf` hands the model to
minimind/gguf_export.py instead, which also writes an Ollama Modelfile beside the .gguf.
"""
import argparse
import os

import torch

from minimind import cli
from minimind.checkpoint import load_model, save_model
from minimind.errors import UsageError
from minimind.hf import read_config_file, to_hf_config
from minimind.tokenizer import Tokenizer


def main(argv=None):
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(prog="python convert_model.py", description=(
        "Convert a checkpoint (Qwen3 / Qwen3-MoE / Qwen2 / Llama transformers dir, MiniMind's transformers dir "
        "or .pth state dict) into a minimind model directory, which is itself a transformers checkpoint."))
    p.add_argument("src", help="model directory, or a MiniMind .pth state dict")
    p.add_argument("--out_dir", default=None, help="where to write config.json, model.safetensors, tokenizer")
    p.add_argument("--to", default="minimind", choices=["minimind", "gguf"],
                   help="minimind: a model directory (default); gguf: one .gguf file for llama.cpp / Ollama, "
                        "plus an Ollama Modelfile beside it (needs: pip install gguf)")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"],
                   help="--to gguf: weight type of the matrices (norms stay f32); q8_0 is ~half of f16's size")
    p.add_argument("--out_path", default=None, help="--to gguf: the .gguf file to write")
    p.add_argument("--tokenizer", default=None,
                   help="directory with tokenizer.json (default: SRC's own; needed for a .pth file)")
    p.add_argument("--config", default=None,
                   help="config.json describing SRC (for a .pth whose head count / top-k differ from MiniMind's)")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="dtype of the written weights (keep = as stored in SRC)")
    args = p.parse_args(argv)
    if args.to == "gguf":
        return to_gguf(args)
    if args.out_dir is None:
        raise UsageError("--out_dir is required (where to write the model directory); or pass --to gguf --out_path "
                         "FILE.gguf for llama.cpp")

    # --- tokenizer ------------------------------------------------------------------------------------------
    tok_dir = args.tokenizer or (args.src if os.path.isdir(args.src) else None)
    if tok_dir is None or not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise UsageError(f"--tokenizer: no tokenizer.json in {tok_dir or args.src}; pass the directory holding "
                         f"the model's tokenizer (for MiniMind: its model/ folder)")
    tokenizer = Tokenizer.load(tok_dir)

    # --- model ----------------------------------------------------------------------------------------------
    config = read_config_file(args.config) if args.config else None
    model = load_model(args.src, dtype=None if args.dtype == "keep" else getattr(torch, args.dtype), config=config)
    dtype = next(model.parameters()).dtype
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"--tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: wrong tokenizer for this model")

    # --- save -----------------------------------------------------------------------------------------------
    save_model(model, tokenizer, args.out_dir)
    arch = (to_hf_config(model.config).get("architectures") or ["minimind's own format"])[0]
    print(f"wrote {args.out_dir} ({arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{str(dtype).replace('torch.', '')})")


def to_gguf(args):
    """--to gguf: one .gguf file (and an Ollama Modelfile) that stock llama.cpp loads; see minimind/gguf_export.py."""
    from minimind.gguf_export import export_model_dir   # late import: only this path needs the gguf package
    if not args.out_path:
        raise UsageError("--to gguf needs --out_path FILE.gguf (where to write the GGUF file)")
    if args.out_dir or args.dtype != "keep":
        raise UsageError("--out_dir/--dtype are for --to minimind; with --to gguf use --out_path and --outtype")
    config = read_config_file(args.config) if args.config else None
    s = export_model_dir(args.src, args.out_path, args.outtype, tokenizer_dir=args.tokenizer, config=config)
    kinds = ", ".join(f"{n} {k}" for k, n in s["tensors"].items())
    print(f"wrote {s['path']} ({s['arch']}, {args.outtype}: {kinds} tensors, {s['bytes'] / 1e6:.1f} MB; "
          f"tokenizer {s['tokens']} tokens, pre-tokenizer {s['pre']})")
    print(f"wrote {s['modelfile']} (Ollama: cd {os.path.dirname(s['modelfile']) or '.'} && "
          f"ollama create minimind -f Modelfile)")


if __name__ == "__main__":
    cli.run(main)
