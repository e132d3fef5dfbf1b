"""Direct Preference Optimization (DPO): prefer the chosen reply over the rejected one, without a reward model.

    python train_dpo.py --from_weight out/sft --data_path dataset/default/dpo.jsonl --out_dir out/dpo --beta 0.1

The policy starts as a copy of the SFT model; a frozen copy (the reference) keeps it from drifting too far.
Reads top to bottom: args -> setup -> policy and reference -> data -> loop -> save.
"""
import argparse

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minimind import cli
from minimind.checkpoint import load_model, save_model
from minimind.data import Prefetcher, Sampler, load_dpo, pad_batch
from minimind.loss import dpo_loss, token_logprobs
from minimind.tokenizer import Tokenizer
from minimind.train import (RunLog, add_common_args, autocast, build_model, configure_optimizer, describe,
                            init_distributed, lr_at, pick_device, pick_dtype, seed_everything, set_lr, total_steps,
                            train_step)


def sequence_logprobs(model, x, y):
    """Sum of log p(reply token) over each sequence's supervised positions: (rows,)."""
    return token_logprobs(model(x), y).sum(dim=-1)


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/dpo.jsonl", out_dir="out/dpo", from_weight="out/sft",
                    epochs=1, batch_size=4, learning_rate=1e-6, max_seq_len=1024)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull toward the reference model (higher = stay closer)")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="conservative DPO: assumed share of flipped labels")
    g.add_argument("--ipo", type=int, default=0, choices=[0, 1], help="1 = IPO loss instead of DPO's log-sigmoid")
    args = p.parse_args()

    # --- setup ----------------------------------------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)

    # --- policy and frozen reference ------------------------------------------------------------------------
    if args.from_weight == "none":
        raise cli.UsageError("--from_weight: DPO starts from an SFT model directory (e.g. out/sft)")
    tokenizer = Tokenizer.load(args.from_weight)
    model = build_model(args, tokenizer.vocab_size).to(device)
    reference = load_model(args.from_weight, device=device).eval().requires_grad_(False)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if args.use_compile:
        model = torch.compile(model, dynamic=True)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # --- data: each batch is [chosen rows; rejected rows], so one forward scores both -----------------------
    pairs, dropped = load_dpo(args.data_path, tokenizer, args.max_seq_len)
    sampler = Sampler(len(pairs), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)
    spe = sampler.steps_per_epoch

    def make(e, s, m):
        chosen_rejected = [pairs[i] for i in sampler.indices(e, s, m)]
        return pad_batch([c for c, _ in chosen_rejected] + [r for _, r in chosen_rejected], tokenizer.pad_id)

    keys = [(s // spe, s % spe, m) for s in range(steps) for m in range(args.accumulation_steps)]
    batches = iter(Prefetcher(make, keys, device))
    if rank == 0:
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"data {len(pairs)} pairs ({dropped} dropped: no reply within --max_seq_len) | {steps} steps")

    stats = {}

    def loss_fn(model, batch):
        x, y = batch
        policy = sequence_logprobs(model, x, y)
        with torch.no_grad(), autocast(device, dtype):  # the reference only scores: no graph, no gradient
            ref = sequence_logprobs(reference, x, y)
        b = x.shape[0] // 2
        loss, r_chosen, r_rejected = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], args.beta,
                                              args.label_smoothing, bool(args.ipo))
        stats.update(margin=(r_chosen - r_rejected).mean(), accuracy=(r_chosen > r_rejected).float().mean())
        return loss

    # --- loop -----------------------------------------------------------------------------------------------
    log = RunLog(args, steps, enabled=rank == 0, desc="dpo")
    model.train()
    for step in range(steps):
        lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
        set_lr(optimizer, lr)
        micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
        loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip, loss_fn)
        log.update()
        if step % args.log_interval == 0 or step == steps - 1:
            log.log(step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), reward_margin=stats["margin"].item(),
                    reward_accuracy=stats["accuracy"].item())
        if rank == 0 and args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < steps:
            save_model(model, tokenizer, args.out_dir)
    log.close()

    # --- save -----------------------------------------------------------------------------------------------
    if rank == 0:
        save_model(model, tokenizer, args.out_dir)
        print(f"saved {args.out_dir}")


if __name__ == "__main__":
    cli.run(main)
