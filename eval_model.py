"""Talk to a trained model or measure it: chat, fixed prompts, perplexity, multiple choice, ROUGE-L/BLEU.

    python eval_model.py --load_from out/sft                           # interactive chat (history kept, streaming)
    python eval_model.py --load_from out/dpo --prompts                 # the built-in demo questions
    python eval_model.py --load_from out/sft --prompts "What does os.path.join do?"
    python eval_model.py --load_from out/sft --open_thinking 1                 # thinking on: 💭 shows the reasoning
    python eval_model.py --load_from out/sft --tools calculator --prompts "256 * 37 = ?"   # the model may call it
    python eval_model.py --load_from out/pretrain --ppl_path ../shared/data/pretrain/en_wiki.train.jsonl --limit 200
    python eval_model.py --load_from out/sft --mc_path ../shared/data/eval/en_mmlu.test.jsonl --shots 5 --limit 20
    python eval_model.py --load_from out/sft --mc_path ceval-exam/val --shots 5       # C-Eval / CMMLU CSV folders
    python eval_model.py --load_from out/sft --gen_path ../shared/data/eval/nc/zh_belle_eval.jsonl --limit 100
"""
import argparse
import json
import os
import tempfile

import torch

from minimind import cli
from minimind.checkpoint import load_model
from minimind.data import DataError
from minimind.lora import load_with_adapter
from minimind.generate import SamplingParams, complete_chats, quantize_int8
from minimind.tools import BUILTIN, ToolRegistry, chat_turn, tool_loop
from minimind.tokenizer import Tokenizer
from minimind.runtime import pick_device, pick_dtype

DEMO_PROMPTS = [
    "Who are you?",
    "What does `os.path.join` do?",
    "What is the signature of `json.dumps`?",
    "Which module provides `deque`?",
    "`math.sqrt` 是做什么的？",
]


def write_json(path: str, obj) -> None:
    """Atomically: a temp file beside the target, then os.replace (never a half-written result)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eval-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--load_from", default="out/dpo", help="model directory (output of a train_*.py)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompts", nargs="*", default=None,
                      help="answer these prompts and exit (no values = the built-in demo prompts)")
    mode.add_argument("--ppl_path", default=None,
                      help="perplexity and bits per byte on a JSONL file of {\"text\"} (or chat) records")
    mode.add_argument("--mc_path", default=None,
                      help="multiple-choice accuracy: JSONL {question, choices, answer, subject}, a C-Eval / "
                           "CMMLU / MMLU CSV, or a directory of them")
    mode.add_argument("--gen_path", default=None,
                      help="ROUGE-L / BLEU of the replies to an SFT-format JSONL (last assistant turn = reference)")
    # chat and generation
    p.add_argument("--system", default=None, help="optional system message put before the conversation")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this mass")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help=">1 discourages repeating tokens")
    p.add_argument("--stop", nargs="*", default=[], help="extra stop strings (the reply ends before them)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    p.add_argument("--open_thinking", type=int, choices=[0, 1], default=None,
                   help="thinking switch of the chat template (MiniMind-3's name; 1 = think first, 0 = answer "
                        "directly; default: the template's own default)")
    p.add_argument("--tools", nargs="+", choices=sorted(BUILTIN), default=None,
                   help="built-in tools the model may call in chat (opt-in): the calls are run and their results "
                        "sent back until the model answers")
    p.add_argument("--max_tool_rounds", type=int, default=4, help="--tools: at most this many replies per question")
    # evaluation
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N records (--mc_path: the first N questions of each subject)")
    p.add_argument("--shots", type=int, default=0, help="--mc_path: worked examples before each question")
    p.add_argument("--dev_path", default=None, help="--mc_path: where the few-shot examples come from "
                   "(default: the matching dev split if there is one, e.g. X.dev.jsonl or ../dev/, else the "
                   "first questions of the same subject)")
    p.add_argument("--mc_style", choices=["letter", "choice"], default="letter",
                   help="letter: list the options and score ' A'/' B'/... (MMLU/C-Eval standard); choice: score "
                        "each option's text (ARC-style; also reports length-normalised accuracy)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max_seq_len", type=int, default=2048, help="longest sequence scored (longer is split or "
                                                                 "truncated from the left)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    # runtime
    p.add_argument("--lora_path", default=None,
                   help="LoRA adapter directory (from train_lora.py) to apply on top of --load_from")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 on CPU (about 3x faster decoding, slightly different outputs)")
    args = p.parse_args()
    if args.max_new_tokens < 1:
        raise cli.UsageError("--max_new_tokens must be at least 1")
    if args.batch_size < 1 or args.max_seq_len < 2:
        raise cli.UsageError("--batch_size must be >= 1 and --max_seq_len >= 2")
    if args.limit is not None and args.limit < 1:
        raise cli.UsageError("--limit must be at least 1")
    if args.shots < 0:
        raise cli.UsageError("--shots must be >= 0")
    if args.max_tool_rounds < 1:
        raise cli.UsageError("--max_tool_rounds must be at least 1")
    thinking = None if args.open_thinking is None else bool(args.open_thinking)
    registry = ToolRegistry([BUILTIN[name]() for name in args.tools]) if args.tools else None

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, training=False)
    if args.lora_path:  # base + adapter, merged into plain weights so generation costs what the base costs
        model = load_with_adapter(args.load_from, args.lora_path, device=device, dtype=dtype).eval()
    else:
        model = load_model(args.load_from, device=device, dtype=dtype).eval()
    if args.quantize == "int8":
        if device.type != "cpu":
            raise cli.UsageError("--quantize int8 is for CPU; on a GPU use --dtype bfloat16")
        quantize_int8(model)
    tokenizer = Tokenizer.load(args.load_from)
    max_len = min(args.max_seq_len, model.config.max_position_embeddings)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    head = [{"role": "system", "content": args.system}] if args.system else []

    # --- measurements -------------------------------------------------------------------------------------
    if args.ppl_path or args.mc_path or args.gen_path:
        from minimind import evaluate as ev
        if args.ppl_path:
            texts = ev.read_texts(args.ppl_path, tokenizer, limit=args.limit)
            res = ev.perplexity(model, tokenizer, texts, max_len=max_len, batch_size=args.batch_size)
            print(f"{args.ppl_path}: perplexity {res.perplexity:.3f} | bits per byte {res.bits_per_byte:.4f} | "
                  f"{res.tokens:,} tokens, {res.bytes:,} bytes, {res.documents:,} documents")
            result = {"task": "perplexity", "path": args.ppl_path, **res.as_dict()}
        elif args.mc_path:
            questions = ev.load_questions(args.mc_path)
            dev_path = args.dev_path or (ev.find_dev_split(args.mc_path) if args.shots else None)
            dev = ev.load_questions(dev_path) if dev_path and args.shots else None
            res = ev.multiple_choice(model, tokenizer, questions, dev, args.shots, args.limit, args.mc_style,
                                     max_len, args.batch_size)
            d = res.as_dict()
            source = f"{dev_path}" if dev else "the same subject" if args.shots else "none"
            print(f"{args.mc_path}: {d['questions']} questions, {len(d['subjects'])} subjects, {args.shots}-shot "
                  f"(examples from {source}), style {args.mc_style}")
            width = max(len(s) for s in d["subjects"])
            for s, v in d["subjects"].items():
                print(f"  {s:{width}}  {v['correct']:5d}/{v['total']:<5d}  {100 * v['accuracy']:6.2f}%")
            print(f"accuracy {100 * d['accuracy']:.2f}% (macro over subjects {100 * d['macro_accuracy']:.2f}%)"
                  + (f", length-normalised {100 * d['accuracy_norm']:.2f}%" if "accuracy_norm" in d else ""))
            result = {"task": "multiple_choice", "path": args.mc_path, "shots": args.shots,
                      "style": args.mc_style, "dev_path": dev_path if dev else None, **d}
        else:
            prompts, refs, skipped = ev.read_generation_set(args.gen_path, args.limit)
            if not prompts:
                raise DataError(f"{args.gen_path}: no record ends with an assistant reply to compare against")
            replies = complete_chats(model, tokenizer, [head + c for c in prompts], stop=args.stop,
                                     batch_size=args.batch_size, thinking=thinking, **sampling)
            scores = ev.generation_scores(replies, refs)
            print(f"{args.gen_path}: ROUGE-L {scores['rouge_l']:.2f} | BLEU-4 {scores['bleu']:.2f} | "
                  f"{scores['samples']} replies" + (f" ({skipped} records without a reference skipped)"
                                                    if skipped else "")
                  + " [tokens: words, and single CJK characters]")
            result = {"task": "generation", "path": args.gen_path, "skipped": skipped, **scores,
                      "samples_out": [{"prompt": c[-1]["content"], "reference": r, "reply": h}
                                      for c, r, h in zip(prompts, refs, replies)]}
        if args.out:
            write_json(args.out, {"model": args.load_from, **result})
            print(f"results written to {args.out}")
        return

    # --- talking ------------------------------------------------------------------------------------------
    dim = "\033[2m" if os.isatty(1) else ""      # reasoning in grey on a terminal
    undim = "\033[0m" if dim else ""
    shown = {"kind": None}

    def show(d):
        """Print one parser delta: 💭 reasoning, then the reply, 🔧 each tool call."""
        kind = "call" if "tool_call" in d else "reasoning" if "reasoning_content" in d else "content"
        if kind != shown["kind"] and shown["kind"] is not None:
            print(undim + "\n   ", end="")
        if kind == "call":
            fn = d["tool_call"]["function"]
            print(f"🔧 {fn['name']}({fn['arguments']})", end="", flush=True)
        else:
            if kind != shown["kind"]:
                print(f"{dim}💭 " if kind == "reasoning" else "", end="")
            print(d.get("content", d.get("reasoning_content")), end="", flush=True)
        shown["kind"] = kind

    def result(call, text):
        print(f"{undim}\n   📎 {text}\n🤖 ", end="", flush=True)
        shown["kind"] = None

    def reply(messages) -> list[dict]:
        """The new messages of one answer: the assistant's turn(s), and the tool turns in between."""
        shown["kind"] = None
        if registry:
            new = tool_loop(model, tokenizer, messages, registry, args.max_tool_rounds, thinking, on_delta=show,
                            on_result=result, stop=args.stop, **sampling)
        else:
            new = [chat_turn(model, tokenizer, messages, thinking=thinking, stop=args.stop, on_delta=show,
                             **sampling).message()]
        print(undim)
        return new

    if args.prompts is not None:  # fixed prompts, one independent conversation each
        for prompt in args.prompts or DEMO_PROMPTS:
            print(f"👤 {prompt}\n🤖 ", end="", flush=True)
            reply(head + [{"role": "user", "content": prompt}])
            print()
        return

    print(f"chatting with {args.load_from} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params); "
          f"empty line or Ctrl-D to quit, /reset to clear the history")
    history = list(head)
    while True:
        try:
            prompt = input("👤 ").strip()
        except EOFError:
            print()
            break
        if not prompt:
            break
        if prompt == "/reset":
            history = list(head)
            continue
        history.append({"role": "user", "content": prompt})
        print("🤖 ", end="", flush=True)
        history += reply(history)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run(main)
