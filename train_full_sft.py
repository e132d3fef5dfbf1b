"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format.

    python train_full_sft.py --from_weight out/pretrain --data_path dataset/default/sft.jsonl --out_dir out/sft

Loss only on the assistant's replies: prompts are context, not something to imitate.
Reads top to bottom: args -> setup -> model -> data -> loop -> save.
"""
import argparse

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minimind import cli
from minimind.checkpoint import save_model
from minimind.data import Prefetcher, Sampler, load_sft, pad_batch
from minimind.tokenizer import Tokenizer
from minimind.train import (RunLog, add_common_args, build_model, configure_optimizer, describe, init_distributed,
                            lr_at, pick_device, pick_dtype, seed_everything, set_lr, total_steps, train_step)


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/sft.jsonl", out_dir="out/sft", from_weight="out/pretrain",
                    epochs=2, batch_size=16, learning_rate=1e-4, max_seq_len=512)
    args = p.parse_args()

    # --- setup ----------------------------------------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)

    # --- model ----------------------------------------------------------------------------------------------
    if args.from_weight == "none":
        raise cli.UsageError("--from_weight: SFT starts from a pretrained model directory (e.g. out/pretrain)")
    tokenizer = Tokenizer.load(args.from_weight)
    model = build_model(args, tokenizer.vocab_size).to(device)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if args.use_compile:
        model = torch.compile(model, dynamic=True)  # batch lengths vary: compile for dynamic shapes
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # --- data: render each conversation to ids + assistant-only targets -------------------------------------
    examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len)
    sampler = Sampler(len(examples), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)
    spe = sampler.steps_per_epoch
    keys = [(s // spe, s % spe, m) for s in range(steps) for m in range(args.accumulation_steps)]
    make = lambda e, s, m: pad_batch([examples[i] for i in sampler.indices(e, s, m)], tokenizer.pad_id)  # noqa
    batches = iter(Prefetcher(make, keys, device))
    if rank == 0:
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"data {len(examples)} conversations ({dropped} dropped: no reply within --max_seq_len) | "
              f"{steps} steps")

    # --- loop -----------------------------------------------------------------------------------------------
    log = RunLog(args, steps, enabled=rank == 0, desc="sft")
    model.train()
    for step in range(steps):
        lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
        set_lr(optimizer, lr)
        micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
        loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip)
        log.update()
        if step % args.log_interval == 0 or step == steps - 1:
            log.log(step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item())
        if rank == 0 and args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < steps:
            save_model(model, tokenizer, args.out_dir)
    log.close()

    # --- save -----------------------------------------------------------------------------------------------
    if rank == 0:
        save_model(model, tokenizer, args.out_dir)
        print(f"saved {args.out_dir}")


if __name__ == "__main__":
    cli.run(main)
