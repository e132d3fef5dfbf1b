"""GRPO / CISPO: reinforcement learning from verifiable rewards, no value network and no reward model needed.

    python train_grpo.py --from_weight out/sft --data_path dataset/default/rl.jsonl --out_dir out/grpo
    python train_grpo.py --from_weight out/sft --data_path rlaif.jsonl --reward my_rewards:score   # MiniMind's file

Each step: every prompt gets --num_generations replies from the batched engine; each reply is scored
(minimind/rewards.py); advantages are rewards relative to the prompt's group; the policy is pushed toward the
better replies (minimind/rl.py). Reads top to bottom: args -> setup -> policy and reference -> data -> resume ->
loop (rollout -> score -> pack -> update) -> save.
"""
import argparse

import torch
import torch.distributed as dist

from minimind import cli, runtime
from minimind.checkpoint import load_model, unwrap
from minimind.data import Sampler, step_batches
from minimind.errors import UsageError
from minimind.flags import add_common_args
from minimind.resume import RunState, resume, run_fingerprint
from minimind.rewards import RewardWeights, load_reward_fn, score
from minimind.rl import (group_advantages, heldout_reward, load_prompts, pack_rollouts, policy_loss, reply_logprobs,
                         rollout, rollout_seeds, rollout_turns)
from minimind.runlog import announce
from minimind.runtime import autocast
from minimind.tokenizer import Tokenizer
from minimind.tools import ToolRegistry, calculator
from minimind.train import RunControl, build_model, configure_optimizer, lr_schedule, prepare_model, total_steps, \
    train_step


BUILTIN_TOOLS = {"calculator": calculator}   # --tools: opt-in, each one safe to run on a model's arguments


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/rl.jsonl", out_dir="out/grpo", from_weight="out/sft",
                    epochs=1, batch_size=2, learning_rate=3e-7, max_seq_len=768)
    g = p.add_argument_group("GRPO (MiniMind's flag names; --batch_size counts prompts, --max_seq_len the prompt)")
    g.add_argument("--num_generations", type=int, default=6, help="replies sampled per prompt (the GRPO group)")
    g.add_argument("--max_gen_len", type=int, default=1024, help="most new tokens per reply")
    g.add_argument("--loss_type", default="cispo", choices=["grpo", "cispo"],
                   help="grpo = PPO-style clipped ratio; cispo = clipped, stop-gradient importance weight times "
                        "log-prob (every token keeps a gradient). MiniMind's default is cispo")
    g.add_argument("--epsilon", type=float, default=0.2, help="GRPO: the ratio is clipped to [1-epsilon, 1+epsilon]")
    g.add_argument("--epsilon_high", type=float, default=5.0, help="CISPO: the importance weight is capped here")
    g.add_argument("--beta", type=float, default=0.1,
                   help="weight of the KL penalty to the frozen starting model (k3 estimator); 0 = no reference "
                        "model is loaded at all")
    g.add_argument("--num_iterations", type=int, default=1,
                   help="optimizer updates per batch of rollouts (TRL's name). 1 = on-policy (the ratio is 1 and "
                        "clipping never triggers); > 1 reuses the rollouts, and the clip keeps the updates close")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the rollouts (1 = off)")
    g.add_argument("--scale_rewards", type=int, default=1, choices=[0, 1],
                   help="1 = advantage (r - mean) / std within the group (GRPO); 0 = r - mean only (Dr. GRPO)")
    g.add_argument("--thinking_ratio", type=float, default=0.0,
                   help="share of prompts rendered with thinking switched on (MiniMind's flag; seeded per prompt)")
    g.add_argument("--max_turns", type=int, default=1,
                   help="replies per conversation: > 1 runs the tool calls a reply makes and lets the model continue "
                        "with their results (MiniMind's train_agent.py uses 3); tool results are not trained on")
    g.add_argument("--tools", default="",
                   help="built-in tools the rollouts may run, comma-separated: calculator (safe arithmetic, no eval). "
                        "Calls to other tools get an error back. Default: none")
    g.add_argument("--rollout_batch", type=int, default=0,
                   help="engine slots decoded together (0 = all replies of a micro-batch at once)")
    g = p.add_argument_group("rewards (minimind/rewards.py)")
    g.add_argument("--reward", default=None,
                   help="module:function (or path/to/file.py:function) called as fn(prompt_messages, reply, record) "
                        "-> float and added to the built-in reward; required for files without answers "
                        "(MiniMind's rlaif.jsonl)")
    g.add_argument("--format_weight", type=float, default=0.5, help="penalty for unbalanced <think>/<tool_call> tags")
    g.add_argument("--tool_weight", type=float, default=0.5, help="reward spread between valid and invalid tool calls")
    g.add_argument("--repetition_weight", type=float, default=0.5, help="penalty per share of repeated word 3-grams")
    g.add_argument("--eval_prompts", type=int, default=32,
                   help="with --eval_interval: held-out prompts (the last ones) scored greedily every N steps "
                        "(one turn each, also with --max_turns)")
    args = p.parse_args()
    if args.num_generations < 2:
        raise UsageError("--num_generations must be >= 2: GRPO compares replies to the same prompt")
    if args.num_iterations < 1:
        raise UsageError("--num_iterations must be >= 1")
    if args.max_turns < 1:
        raise UsageError("--max_turns must be >= 1")
    unknown = set(filter(None, args.tools.split(","))) - set(BUILTIN_TOOLS)
    if unknown:
        raise UsageError(f"--tools {args.tools}: unknown {', '.join(sorted(unknown))} (built in: "
                         f"{', '.join(BUILTIN_TOOLS)})")
    registry = ToolRegistry([BUILTIN_TOOLS[name]() for name in filter(None, args.tools.split(","))])
    if args.fsdp:  # the engine samples from whole weights; FSDP's are sharded across ranks
        raise UsageError("--fsdp 1 is not supported by train_grpo.py (rollouts need the whole model on each rank); "
                         "use DDP (torchrun without --fsdp)")

    # --- setup: device, precision, ranks (torchrun), threads, seeds -----------------------------------------
    rt = runtime.start(args.device, args.dtype, args.num_threads, args.seed)

    # --- policy and frozen reference ------------------------------------------------------------------------
    if args.from_weight == "none":
        raise UsageError("--from_weight: RL starts from a model that can already answer (e.g. out/sft)")
    tokenizer = Tokenizer.load(args.from_weight)
    model = prepare_model(build_model(args, tokenizer.vocab_size).to(rt.device), args, rt, dynamic=True)
    policy = unwrap(model)   # the bare model: the engine samples from it (no DDP/compile wrapper needed)
    reference = load_model(args.from_weight, device=rt.device).eval().requires_grad_(False) if args.beta else None
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, rt.device,
                                    kind=args.optimizer, muon_lr=args.muon_lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    # --- data: prompts (rendered once) and how each reply is scored -----------------------------------------
    user_fn = load_reward_fn(args.reward) if args.reward else None
    prompts, dropped = load_prompts(args.data_path, tokenizer, args.max_seq_len, args.thinking_ratio, args.seed,
                                    need_reference=user_fn is None)
    weights = RewardWeights(args.format_weight, args.tool_weight, args.repetition_weight)
    reward_of = lambda text, pr: score(text, vars(pr), weights, user_fn)  # noqa: E731
    n_val = min(args.eval_prompts, len(prompts) // 5) if args.eval_interval else 0
    train_prompts, val_prompts = prompts[:len(prompts) - n_val], prompts[len(prompts) - n_val:]
    sampler = Sampler(len(train_prompts), args.batch_size, args.accumulation_steps, rt.world, rt.rank,
                      seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    run = RunState(args, rt, model, optimizer, scaler, tokenizer, sampler,
                   run_fingerprint("grpo", policy.config, tokenizer, args, len(train_prompts)))
    start = resume(run)
    announce(run, f"data {len(prompts)} prompts ({dropped} dropped: longer than --max_seq_len; {n_val} held out) | "
             f"{steps} steps x {args.batch_size * args.accumulation_steps * rt.world} prompts x "
             f"{args.num_generations} replies | loss {args.loss_type} | KL beta {args.beta}")

    G = args.num_generations

    def make_rollouts(step: int, micro: int, idx: list[int]):
        """Rollout -> rewards -> group advantages -> one packed row, for the prompts of one micro-batch."""
        batch = [train_prompts[i] for i in idx]
        seeds = rollout_seeds(args.seed, step, micro * rt.world + rt.rank, len(batch) * G)
        if args.max_turns > 1:   # multi-turn: tool calls run, the model continues (MiniMind's train_agent.py)
            ro = rollout_turns(policy, tokenizer, batch, G, args.max_gen_len, registry, args.max_turns,
                               args.temperature, args.top_p, seeds, args.rollout_batch or None)
        else:
            ro = rollout(policy, tokenizer, [pr.ids for pr in batch], G, args.max_gen_len, args.temperature,
                         args.top_p, seeds, args.rollout_batch or None)
        scored = [reward_of(text, batch[i // G]) for i, text in enumerate(ro.texts)]
        rewards = torch.tensor([r for r, _ in scored])
        correct = [parts["correct"] for _, parts in scored if parts["correct"] is not None]
        adv = group_advantages(rewards, G, bool(args.scale_rewards))
        x, y, doc, adv_tok = pack_rollouts(ro.prompt_ids, ro.reply_ids, adv, ro.reply_masks)
        stats = torch.tensor([rewards.sum().item(), sum(correct), len(correct), len(rewards), ro.new_tokens,
                              ro.seconds], dtype=torch.float64)
        return [t.to(rt.device) for t in (x, y, doc, adv_tok)], stats

    @torch.no_grad()
    def score_tokens(net, batches):
        """Log-probs of every micro-batch's reply tokens under a model that is not being trained right now."""
        with autocast(rt.device, rt.dtype):
            return [reply_logprobs(net, x, y, doc).float() for x, y, doc, *_ in batches]

    # --- loop -----------------------------------------------------------------------------------------------
    schedule = lr_schedule(args)  # step -> learning rate (warm-up, then decay)
    get_prompts = lambda idx: (torch.as_tensor(idx, dtype=torch.long),)  # noqa: E731 - the sampler's indices
    with RunControl(run, steps, start, "grpo") as ctl:
        for step, micro_prompts in step_batches(get_prompts, sampler, start, steps, "cpu"):
            # 1. rollouts with the current policy, one packed row per micro-batch
            made = [make_rollouts(step, m, idx.tolist()) for m, (idx,) in enumerate(micro_prompts)]
            batches, stats = [b for b, _ in made], sum(s for _, s in made)
            model.train()
            # 2. the normaliser: reply tokens of the whole step on all ranks (token-level loss, see policy_loss)
            tokens = torch.tensor([float(sum(len(b[3]) for b in batches))], device=rt.device)
            if rt.world > 1:
                dist.all_reduce(tokens)
            # DDP averages gradients over ranks and train_step over micro-batches: undo both in the normaliser
            norm = tokens.item() / (rt.world * len(batches))
            # 3. fixed per-token numbers: the reference's log-probs, and pi_old when rollouts are reused
            refs = score_tokens(reference, batches) if reference is not None else [None] * len(batches)
            olds = score_tokens(model, batches) if args.num_iterations > 1 else [None] * len(batches)
            for k, b in enumerate(batches):
                b += [refs[k], olds[k]]

            def loss_fn(net, batch):  # runs under train_step's autocast
                x, y, doc, adv, ref_lp, old_lp = batch
                logp = reply_logprobs(net, x, y, doc)
                return policy_loss(logp, logp.detach() if old_lp is None else old_lp, adv, ref_lp, args.loss_type,
                                   args.epsilon, args.epsilon_high, args.beta, max(norm, 1.0))

            # 4. update (num_iterations times on the same rollouts)
            for _ in range(args.num_iterations):
                out = train_step(run, batches, schedule(step, steps), loss_fn, poison=step == args.debug_nan_at_step)
            # 5. what the bar and metrics.jsonl show: the step's rollouts over all ranks
            if rt.world > 1:
                stats = stats.to(rt.device)
                dist.all_reduce(stats)
            r_sum, c_sum, c_n, n, new_tok, secs = stats.tolist()
            out.metrics.update(reward=torch.tensor(r_sum / n), response_len=torch.tensor(new_tok / n),
                               rollout_tokens_per_s=torch.tensor(new_tok / max(secs / rt.world, 1e-9)))
            if c_n:
                out.metrics["accuracy"] = torch.tensor(c_sum / c_n)
            if ctl.step_done(step, out):  # log, checkpoint when due; NaN guard; SIGTERM: save and stop
                break
            if val_prompts and args.eval_interval and ((step + 1) % args.eval_interval == 0 or step + 1 == steps):
                val_r, val_acc = heldout_reward(policy, tokenizer, val_prompts, reward_of, args.max_gen_len)
                ctl.log.log(step, val_reward=val_r, **({"val_accuracy": val_acc} if val_acc is not None else {}))
                model.train()

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish()


if __name__ == "__main__":
    cli.run(main)
