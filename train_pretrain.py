"""Pretraining: learn to predict the next token of plain text.

    python train_pretrain.py --data_path dataset/default/pretrain.jsonl --out_dir out/pretrain
    torchrun --nproc_per_node 4 train_pretrain.py --preset 64M --data_path pretrain_hq.jsonl   # many GPUs

Reads top to bottom: args -> setup -> tokenizer and model -> data -> loop -> save.
"""
import argparse
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minimind import cli
from minimind.checkpoint import save_model
from minimind.data import PackedWindows, Prefetcher, Sampler, pretokenize
from minimind.tokenizer import Tokenizer
from minimind.train import (RunLog, add_common_args, build_model, configure_optimizer, describe, init_distributed,
                            lr_at, pick_device, pick_dtype, seed_everything, set_lr, total_steps, train_step)
from minimind import DEFAULT_TOKENIZER


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/pretrain.jsonl", out_dir="out/pretrain", from_weight="none",
                    epochs=1, batch_size=32, learning_rate=5e-4, max_seq_len=340)
    args = p.parse_args()

    # --- setup ----------------------------------------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True

    # --- tokenizer and model --------------------------------------------------------------------------------
    tok_dir = args.from_weight if args.from_weight != "none" else (args.tokenizer or DEFAULT_TOKENIZER)
    tokenizer = Tokenizer.load(tok_dir)
    model = build_model(args, tokenizer.vocab_size).to(device)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    if args.use_compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # --- data: tokenize once to a memmap, then cut packed windows (no padding) ------------------------------
    windows = PackedWindows(pretokenize(args.data_path, tokenizer), args.max_seq_len)
    sampler = Sampler(len(windows), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)
    spe = sampler.steps_per_epoch
    keys = [(s // spe, s % spe, m) for s in range(steps) for m in range(args.accumulation_steps)]
    batches = iter(Prefetcher(lambda e, s, m: windows.get(sampler.indices(e, s, m)), keys, device))
    tokens_per_step = args.batch_size * args.max_seq_len * args.accumulation_steps * world
    if rank == 0:
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"data {len(windows)} windows of {args.max_seq_len} tokens | {steps} steps | "
              f"{tokens_per_step} tokens/step")

    # --- loop -----------------------------------------------------------------------------------------------
    log = RunLog(args, steps, enabled=rank == 0, desc="pretrain", tokens_per_step=tokens_per_step)
    model.train()
    for step in range(steps):
        lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
        set_lr(optimizer, lr)
        micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
        loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip)
        log.update()
        if step % args.log_interval == 0 or step == steps - 1:  # .item() waits for the GPU: only now and then
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
