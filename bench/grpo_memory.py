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
  minimind MiniMind's own trainer/train_grpo.py, unmodified, from a clone (--minimind_repo, default the
           git-ignored .bench_ref/minimind): its grpo_train_epoch() runs one step (its TorchRolloutEngine with
           HF generate, its per-token log-probs, its loss and AdamW step) on its MiniMindForCausalLM of the same
           shape. Two things are stubbed, because they cannot run here: the `datasets` import (not installed,
           and only used to read the JSONL, which we hand it as a list) and its 1.8B reward model
           (internlm2-1_8b-reward, scores here are 0; its rule-based rewards still run). Needs `transformers`.
Peak memory: CPU = the process's max RSS (ru_maxrss) at the end minus before the step (rollout included); CUDA =
max_memory_allocated. --spread 1 (default) cuts reply i to a length spread between 1/4 and all of --max_gen_len
for ours/padded (a random model never stops, real replies differ in length); the minimind variant generates its
own replies, so compare it with --spread 0.
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
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    ro = rollout(policy, tok, prompts, G, args.max_gen_len, 1.0, seeds=list(range(len(prompts) * G)))
    n = len(ro.reply_ids)
    replies = ([r[:max(1, args.max_gen_len * (n + 3 * i) // (4 * n))] for i, r in enumerate(ro.reply_ids)]
               if args.spread else ro.reply_ids)
    rollout_tps = ro.new_tokens / ro.seconds
    adv = group_advantages(torch.randn(n), G)
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


def minimind_step(args) -> dict:
    """One step of MiniMind's own grpo_train_epoch (trainer/train_grpo.py), timed and measured."""
    import argparse as ap
    repo = os.path.abspath(args.minimind_repo)
    if not os.path.isfile(os.path.join(repo, "trainer", "train_grpo.py")):
        sys.exit(f"error: {repo}: no trainer/train_grpo.py (clone github.com/jingyaogong/minimind there)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from minimind_shim import stub_datasets
    stub_datasets()                          # imported by it, used only by its JSONL loader (not called here)
    sys.path.insert(0, repo)
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM as TheirModel
    from transformers import AutoTokenizer
    import trainer.train_grpo as mm
    from trainer.rollout_engine import create_rollout_engine
    torch.manual_seed(0)
    dev = args.device
    G = args.num_generations
    mm.args = ap.Namespace(num_generations=G, max_seq_len=768, max_gen_len=args.max_gen_len, device=dev,
                           debug_mode=False, beta=0.1, loss_type="cispo", epsilon=0.2, epsilon_high=5.0,
                           accumulation_steps=1, grad_clip=1.0, log_interval=10**9, save_interval=10**9, epochs=1)
    mm.lm_config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                  max_seq_len=768 + args.max_gen_len)
    mm.tokenizer = AutoTokenizer.from_pretrained(os.path.join(repo, "model"))
    mm.model = TheirModel(mm.lm_config).to(dev)
    ref = TheirModel(mm.lm_config).to(dev).eval().requires_grad_(False)
    mm.optimizer = torch.optim.AdamW(mm.model.parameters(), lr=3e-7)
    mm.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(mm.optimizer, T_max=10)
    mm.autocast_ctx = __import__("contextlib").nullcontext()       # what it uses on CPU
    engine = create_rollout_engine(engine_type="torch", policy_model=mm.model, tokenizer=mm.tokenizer, device=dev,
                                   autocast_ctx=mm.autocast_ctx)
    timing = {"s": 0.0, "tokens": 0}
    inner = engine.rollout

    def timed(*a, **k):
        t = time.perf_counter()
        res = inner(*a, **k)
        timing["s"] += time.perf_counter() - t
        is_eos = res.completion_ids == mm.tokenizer.eos_token_id
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], is_eos.shape[1],
                                                                                     dtype=torch.long))
        timing["tokens"] += int(ends.sum())
        timing["positions"] = res.output_ids.numel()
        return res
    engine.rollout = timed

    class NoRewardModel:   # its LMForRewardModel loads internlm2-1_8b-reward: not available here
        def get_score(self, messages, response):
            return 0.0
    prompts = [mm.tokenizer.apply_chat_template([{"role": "user", "content": f"What is {17 + i} + {25 * i}? "
                                                  f"Explain step by step."}], tokenize=False,
                                                add_generation_prompt=True) for i in range(args.prompts)]
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    t0 = time.perf_counter()
    mm.grpo_train_epoch(0, [{"prompt": prompts}], 10**9, engine, ref, NoRewardModel())
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda") else rss_mb() - before
    return {"variant": "minimind", "train_s": round(total - timing["s"], 3), "peak_mb": round(peak, 1),
            "positions": timing["positions"], "real_tokens": None,
            "rollout_tokens_per_s": round(timing["tokens"] / timing["s"], 1), "replies": args.prompts * G}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (MiniMind's --batch_size default 2)")
    p.add_argument("--num_generations", type=int, default=6)
    p.add_argument("--max_gen_len", type=int, default=256)
    p.add_argument("--num_threads", type=int, default=0)
    p.add_argument("--spread", type=int, default=1, choices=[0, 1],
                   help="1 = cut ours/padded replies to lengths spread over 1/4..1 of --max_gen_len (see above)")
    p.add_argument("--minimind_repo", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           ".bench_ref", "minimind"),
                   help="a clone of github.com/jingyaogong/minimind, for the 'minimind' variant")
    p.add_argument("--variants", default="ours,padded,minimind", help="comma-separated: ours, padded, minimind")
    p.add_argument("--variant", default=None, choices=["ours", "padded", "minimind"],
                   help="(internal: run one variant)")
    args = p.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.variant:
        print(json.dumps(minimind_step(args) if args.variant == "minimind" else one_step(args)))
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", variant]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-2000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'variant':8} {'replies':>7} {'positions':>9} {'real':>6} {'train s':>8} {'peak MB':>8} {'rollout tok/s':>13}")
    for r in rows:
        print(f"{r['variant']:8} {r['replies']:7d} {r['positions']:9d} {str(r['real_tokens'] or '-'):>6} {r['train_s']:8.2f} "
              f"{r['peak_mb']:8.1f} {r['rollout_tokens_per_s']:13.1f}")


if __name__ == "__main__":
    main()
