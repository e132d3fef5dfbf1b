"""GRPO step: peak memory and rollout tokens/s of train_grpo.py's path, next to MiniMind's padded way of scoring.

    python bench/grpo_memory.py                                     # CPU, MiniMind-3 small shape, 2 x 6 replies
    python bench/grpo_memory.py --device cuda --hidden_size 768 --num_hidden_layers 8 --max_gen_len 1024

One GRPO step = rollout (num_generations replies per prompt) + the policy's forward/backward over the rollouts
(+ the reference's forward). Each variant runs in its own process, so its peak memory is its own:
  ours     rl.rollout (batched static-cache Engine) -> rl.pack_rollouts (all sequences in ONE row, doc_ids, no
           padding) -> rl.reply_logprobs (output head on reply tokens only) -> rl.policy_loss, backward
  padded   MiniMind's train_grpo.py scoring, re-implemented on our model: the rollouts right-padded to the longest,
           model(outputs, attention_mask) -> logits over EVERY position [B*G, T, V] -> log_softmax -> gather, for
           the policy and the reference (a padding mask disables the flash/varlen kernel: dense masked attention)
Peak memory: CPU = the process's max RSS (ru_maxrss) after the step minus before it; CUDA = max_memory_allocated.
MiniMind's own script cannot run here: it needs `transformers` and `datasets` and loads a 1.8B reward model
(internlm2-1_8b-reward) from disk; see bench/README.md.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimind import DEFAULT_TOKENIZER  # noqa: E402
from minimind.config import ModelConfig  # noqa: E402
from minimind.model import MiniMindForCausalLM  # noqa: E402
from minimind.rl import group_advantages, pack_rollouts, policy_loss, reply_logprobs, rollout  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_step(args) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                      num_attention_heads=8, num_key_value_heads=4)
    policy = MiniMindForCausalLM(cfg).to(dev)
    reference = MiniMindForCausalLM(cfg).to(dev).eval().requires_grad_(False)
    prompts = [tok.render_chat([{"role": "user", "content": f"What is {17 + i} + {25 * i}? Explain step by step."}],
                               add_generation_prompt=True)[0] for i in range(args.prompts)]
    G = args.num_generations
    # Rollouts (both variants use the same engine: what differs is how the rollouts are scored for training).
    # A random model rarely stops, so replies run to max_gen_len: the worst case for padding is avoided on purpose
    # by cutting reply i to a length spread between 1/4 and all of max_gen_len (as real replies differ).
    ro = rollout(policy, tok, prompts, G, args.max_gen_len, 1.0, seeds=list(range(len(prompts) * G)))
    n = len(ro.reply_ids)
    replies = [r[:max(1, args.max_gen_len * (n + 3 * i) // (4 * n))] for i, r in enumerate(ro.reply_ids)]
    rollout_tps = ro.new_tokens / ro.seconds
    adv = group_advantages(torch.randn(n), G)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    t0 = time.perf_counter()
    policy.train()
    if args.variant == "ours":
        x, y, doc, adv_tok = (t.to(dev) for t in pack_rollouts(ro.prompt_ids, replies, adv))
        with torch.no_grad():
            ref = reply_logprobs(reference, x, y, doc)
        logp = reply_logprobs(policy, x, y, doc)
        loss, _ = policy_loss(logp, logp.detach(), adv_tok, ref, "cispo", beta=0.1)
        positions = x.numel()
    else:
        seqs = [p + r for p, r in zip(ro.prompt_ids, replies)]
        T = max(len(s) for s in seqs)
        out = torch.full((n, T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        comp = torch.zeros(n, T - 1)
        for i, (s, p) in enumerate(zip(seqs, ro.prompt_ids)):
            out[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            comp[i, len(p) - 1:len(s) - 1] = 1
        out, mask, comp = out.to(dev), mask.to(dev), comp.to(dev)

        def logps(m):   # MiniMind: F.log_softmax(res.logits[:, :-1, :], dim=-1).gather(2, outputs[:, 1:])
            return torch.log_softmax(m(out, attention_mask=mask)[:, :-1].float(), -1).gather(
                2, out[:, 1:, None]).squeeze(-1)
        with torch.no_grad():
            ref = logps(reference)
        logp = logps(policy)
        a = adv.to(dev)[:, None]
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -(torch.clamp(torch.exp(logp - logp.detach()), max=5.0).detach() * a * logp - 0.1 * kl)
        loss = (per_token * comp).sum() / comp.sum()
        positions = out.numel()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb() - before
    return {"variant": args.variant, "train_s": round(time.perf_counter() - t0, 3), "peak_mb": round(peak, 1),
            "positions": positions, "real_tokens": sum(len(p) + len(r) - 1 for p, r in zip(ro.prompt_ids, replies)),
            "rollout_tokens_per_s": round(rollout_tps, 1), "replies": n}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (MiniMind's --batch_size default 2)")
    p.add_argument("--num_generations", type=int, default=6)
    p.add_argument("--max_gen_len", type=int, default=256)
    p.add_argument("--num_threads", type=int, default=0)
    p.add_argument("--variant", default=None, choices=["ours", "padded"], help="(internal: run one variant)")
    args = p.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.variant:
        print(json.dumps(one_step(args)))
        return
    rows = []
    for variant in ("ours", "padded"):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", variant]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-2000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'variant':8} {'replies':>7} {'positions':>9} {'real':>6} {'train s':>8} {'peak MB':>8} {'rollout tok/s':>13}")
    for r in rows:
        print(f"{r['variant']:8} {r['replies']:7d} {r['positions']:9d} {r['real_tokens']:6d} {r['train_s']:8.2f} "
              f"{r['peak_mb']:8.1f} {r['rollout_tokens_per_s']:13.1f}")


if __name__ == "__main__":
    main()
