"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format.

    python train_full_sft.py --from_weight out/pretrain --data_path dataset/default/sft.jsonl --out_dir out/sft

Loss only on the assistant's replies: prompts are context, not something to imitate.
Reads top to bottom: args -> setup -> model -> data -> resume -> loop -> save.
"""
import argparse

import torch

from minimind import cli
from minimind.checkpoint import unwrap
from minimind.data import (REASONING, LengthGroupedBatches, PackedConversations, Prefetcher, Sampler, load_sft,
                           pad_batch)
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, RunLog, add_common_args, build_model,
                            configure_optimizer, describe, evaluate, holdout, init_distributed, lr_at, pick_device,
                            pick_dtype, prepare_model, resume, run_fingerprint, save_checkpoint, save_final_model,
                            seed_everything, set_lr, setup_hardware, total_steps, train_step)


TRUNCATION_POLICY = ("Truncation: a conversation longer than --max_seq_len tokens is cut at the END (the last reply "
                     "loses its tail and its <|im_end|>); one whose replies all start past --max_seq_len is dropped. "
                     "Both counts are printed before training.")


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=TRUNCATION_POLICY)
    add_common_args(p, data_path="dataset/default/sft.jsonl", out_dir="out/sft", from_weight="out/pretrain",
                    epochs=2, batch_size=16, learning_rate=1e-4, max_seq_len=512)
    g = p.add_argument_group("SFT")
    g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                   help="1 = pack several conversations per --max_seq_len window, attention kept inside each "
                        "(no padding waste); 0 = batches of similar length padded to the batch's longest")
    g.add_argument("--reasoning", default="keep", choices=REASONING,
                   help="assistant turns' reasoning_content: keep = train on '<think>...</think>' before the reply "
                        "(MiniMind-3 template), drop = ignore it")
    args = p.parse_args()

    # --- setup ----------------------------------------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    setup_hardware(device, args.num_threads)
    seed_everything(args.seed)

    # --- model ----------------------------------------------------------------------------------------------
    if args.from_weight == "none":
        raise cli.UsageError("--from_weight: SFT starts from a pretrained model directory (e.g. out/pretrain)")
    tokenizer = Tokenizer.load(args.from_weight)
    # compile: padded batches (--packing 0) vary in length, so compile for dynamic shapes there
    model = prepare_model(build_model(args, tokenizer.vocab_size).to(device), args, device, world, local_rank,
                          dynamic=not args.packing)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # --- data: render each conversation to ids + assistant-only targets, then pack or group them -------------
    examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len, args.reasoning)
    n_val = holdout(len(examples), args.val_ratio, args.eval_interval > 0)  # --eval_interval: the last ones
    examples, held_out = examples[:len(examples) - n_val], examples[len(examples) - n_val:]
    val_batches = [pad_batch(held_out[s:s + args.batch_size], tokenizer.pad_id)
                   for s in range(0, n_val, args.batch_size)][:args.eval_iters]
    truncated = sum(e.truncated for e in examples)
    if args.packing:  # fixed windows of max_seq_len, packed once; the Sampler shuffles windows each epoch
        data = PackedConversations(examples, args.max_seq_len, tokenizer.pad_id)
        sampler = Sampler(len(data), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
    else:             # fixed groups of batch_size similar-length conversations; the Sampler shuffles groups
        data = LengthGroupedBatches(examples, args.batch_size, tokenizer.pad_id)
        sampler = Sampler(len(data), 1, args.accumulation_steps, world, rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    fingerprint = run_fingerprint("sft", unwrap(model).config, tokenizer, args, len(data))
    start = resume(args, model, optimizer, scaler, sampler, fingerprint, rank, world)
    spe = sampler.steps_per_epoch
    keys = [(s // spe, s % spe, m) for s in range(start, steps) for m in range(args.accumulation_steps)]
    batches = iter(Prefetcher(lambda e, s, m: data.get(sampler.indices(e, s, m)), keys, device))
    if rank == 0:
        share = data.stats()
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"data {len(examples)} conversations in {len(data)} {'windows' if args.packing else 'batches'} "
              f"({share['real']:.1%} of positions are real tokens, {share['supervised']:.1%} supervised) | "
              f"{truncated} truncated at --max_seq_len (end of reply cut) | {dropped} dropped (no reply fits) | "
              f"{steps} steps")

    def sft_loss(model, batch):
        """Packed batches carry doc_ids: the model keeps attention inside each conversation."""
        x, y, *doc_ids = batch
        return model(x, targets=y, doc_ids=doc_ids[0] if doc_ids else None)

    # --- loop -----------------------------------------------------------------------------------------------
    ctl = RunControl(args, device, scaler, rank, world,
                     save=lambda done: save_checkpoint(args, done, model, optimizer, scaler, tokenizer, sampler,
                                                       fingerprint, rank, world),
                     final=lambda: save_final_model(model, tokenizer, args.out_dir, rank))
    done = start
    model.train()
    log = RunLog(args, steps, start=start, enabled=rank == 0, desc="sft")
    with log:  # closes the bar even on an error, so that `error: ...` gets a line of its own
        for step in range(start, steps):
            lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
            set_lr(optimizer, lr)
            micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
            loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip,
                                         sft_loss, poison=step == args.debug_nan_at_step)
            ctl.record(step, loss, grad_norm)
            log.update()
            done = step + 1  # optimizer steps completed; a checkpoint named step_N resumes at step N
            if step % args.log_interval == 0 or done == steps:
                ctl.check()
                log.log(step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item())
            if args.eval_interval and (done % args.eval_interval == 0 or done == steps):
                log.log(step, val_loss=evaluate(model, val_batches, device, dtype, sft_loss, world, rank))
            if ctl.step_done(done, steps):  # checkpoint when due; SIGTERM: save and stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish(done, steps)

if __name__ == "__main__":
    cli.run(main)
