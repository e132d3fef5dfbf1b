"""Talk to a trained model: fixed prompts (non-interactive) or a multi-turn chat that streams the reply.

    python eval_model.py --load_from out/dpo --prompts                 # the built-in demo questions
    python eval_model.py --load_from out/sft --prompts "What does os.path.join do?"
    python eval_model.py --load_from out/sft                           # interactive chat (history kept)
"""
import argparse
import sys

import torch

from minimind import cli
from minimind.checkpoint import load_model
from minimind.generate import stream_chat
from minimind.tokenizer import Tokenizer
from minimind.train import pick_device

DEMO_PROMPTS = [
    "Who are you?",
    "What does `os.path.join` do?",
    "What is the signature of `json.dumps`?",
    "Which module provides `deque`?",
    "`math.sqrt` 是做什么的？",
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load_from", default="out/dpo", help="model directory (output of a train_*.py)")
    p.add_argument("--prompts", nargs="*", default=None,
                   help="answer these prompts and exit (no values = the built-in demo prompts)")
    p.add_argument("--system", default=None, help="optional system message put before the conversation")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this mass")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help=">1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = p.parse_args()
    if args.max_new_tokens < 1:
        raise cli.UsageError("--max_new_tokens must be at least 1")

    device = pick_device(args.device)
    model = load_model(args.load_from, device=device).eval()
    tokenizer = Tokenizer.load(args.load_from)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    head = [{"role": "system", "content": args.system}] if args.system else []

    def reply(messages):
        pieces = []
        for piece in stream_chat(model, tokenizer, messages, **sampling):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        return "".join(pieces)

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
        history.append({"role": "assistant", "content": reply(history)})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run(main)
