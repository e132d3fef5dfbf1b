"""Pretraining: learn to predict the next token of plain text.

    python train_pretrain.py --data_path dataset/default/pretrain.jsonl --out_dir out/pretrain
    torchrun --nproc_per_node 4 train_pretrain.py --preset 64M --data_path pretrain_hq.jsonl   # many GPUs
    python train_pretrain.py ... --save_interval 500 --from_resume 1    # checkpoint often; continue after a stop

Reads top to bottom: args -> setup -> tokenizer and model -> data -> resume -> loop -> save.
"""
import argparse

import torch

from minimind import cli
from minimind.checkpoint import unwrap
from minimind.data import PackedWindows, Prefetcher, Sampler, pretokenize
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, RunLog, add_common_args, build_model,
                            configure_optimizer, describe, evaluate, holdout, init_distributed, lr_at, pick_device,
                            pick_dtype, prepare_model, resume, run_fingerprint, save_checkpoint, save_final_model,
                            seed_everything, set_lr, setup_hardware, total_steps, train_step)
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
    setup_hardware(device, args.num_threads)
    seed_everything(args.seed)

    # --- tokenizer and model --------------------------------------------------------------------------------
    tok_dir = args.from_weight if args.from_weight != "none" else (args.tokenizer or DEFAULT_TOKENIZER)
    tokenizer = Tokenizer.load(tok_dir)
    model = prepare_model(build_model(args, tokenizer.vocab_size).to(device), args, device, world, local_rank)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling

    # --- data: tokenize once to a memmap, then cut packed windows (no padding) ------------------------------
    if world > 1 and rank != 0:  # rank 0 tokenizes (once, cached); the others wait, then read its memmap
        torch.distributed.barrier()
    tokens = pretokenize(args.data_path, tokenizer)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    windows = PackedWindows(tokens, args.max_seq_len)
    n_val = holdout(len(windows), args.val_ratio, args.eval_interval > 0, min_val=args.batch_size)
    n_train = len(windows) - n_val  # the last n_val windows (the end of the corpus) are held out
    sampler = Sampler(n_train, args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
    val_batches = [windows.get(range(s, min(s + args.batch_size, len(windows))))
                   for s in range(n_train, len(windows), args.batch_size)][:args.eval_iters]
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)
    tokens_per_step = args.batch_size * args.max_seq_len * args.accumulation_steps * world

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    fingerprint = run_fingerprint("pretrain", unwrap(model).config, tokenizer, args, n_train)
    start = resume(args, model, optimizer, scaler, sampler, fingerprint, rank, world)
    spe = sampler.steps_per_epoch
    keys = [(s // spe, s % spe, m) for s in range(start, steps) for m in range(args.accumulation_steps)]
    batches = iter(Prefetcher(lambda e, s, m: windows.get(sampler.indices(e, s, m)), keys, device))
    if rank == 0:
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"data {n_train} windows of {args.max_seq_len} tokens (+{n_val} held out) | {steps} steps | "
              f"{tokens_per_step} tokens/step")

    # --- loop -----------------------------------------------------------------------------------------------
    ctl = RunControl(args, device, scaler, rank, world,
                     save=lambda done: save_checkpoint(args, done, model, optimizer, scaler, tokenizer, sampler,
                                                       fingerprint, rank, world),
                     final=lambda: save_final_model(model, tokenizer, args.out_dir, rank))
    done = start
    model.train()
    log = RunLog(args, steps, start=start, enabled=rank == 0, desc="pretrain", tokens_per_step=tokens_per_step)
    with log:  # closes the bar even on an error, so that `error: ...` gets a line of its own
        for step in range(start, steps):
            lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
            set_lr(optimizer, lr)
            micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
            loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip,
                                         poison=step == args.debug_nan_at_step)
            ctl.record(step, loss, grad_norm)
            log.update()
            done = step + 1  # optimizer steps completed; a checkpoint named step_N resumes at step N
            if step % args.log_interval == 0 or done == steps:  # .item() waits for the GPU: only now and then
                ctl.check()
                log.log(step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item())
            if args.eval_interval and (done % args.eval_interval == 0 or done == steps):
                log.log(step, val_loss=evaluate(model, val_batches, device, dtype, world=world, rank=rank))
            if ctl.step_done(done, steps):  # checkpoint when due; SIGTERM: save and stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish(done, steps)


if __name__ == "__main__":
    cli.run(main)
