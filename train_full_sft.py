"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format.

    python train_full_sft.py --from_weight out/pretrain --data_path dataset/default/sft.jsonl --out_dir out/sft

Loss only on the assistant's replies: prompts are context, not something to imitate.
Reads top to bottom: args -> setup -> model -> data -> resume -> loop -> save.
"""
import argparse

import torch

from minimind import cli, runtime
from minimind.checkpoint import unwrap
from minimind.data import Sampler, holdout, load_sft, sft_batches, split_validation, step_batches
from minimind.flags import add_common_args, add_conversation_args
from minimind.formats import record_reader
from minimind.resume import RunState, resume, run_fingerprint
from minimind.runlog import announce
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, build_model, configure_optimizer, evaluate, lm_loss, lr_schedule,
                            prepare_model, total_steps, train_step)


TRUNCATION_POLICY = ("Truncation: a conversation longer than --max_seq_len tokens is cut at the END (the last reply "
                     "loses its tail and its <|im_end|>); one whose replies all start past --max_seq_len is dropped. "
                     "Both counts are printed before training.")


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=TRUNCATION_POLICY)
    add_common_args(p, data_path="dataset/default/sft.jsonl", out_dir="out/sft", from_weight="out/pretrain",
                    epochs=2, batch_size=16, learning_rate=1e-4, max_seq_len=512)
    add_conversation_args(p)  # --packing, --reasoning
    args = p.parse_args()

    # --- setup: device, precision, ranks (torchrun), threads, seeds -----------------------------------------
    rt = runtime.start(args.device, args.dtype, args.num_threads, args.seed)

    # --- model ----------------------------------------------------------------------------------------------
    if args.from_weight == "none":
        raise cli.UsageError("--from_weight: SFT starts from a pretrained model directory (e.g. out/pretrain)")
    tokenizer = Tokenizer.load(args.from_weight)
    # compile: padded batches (--packing 0) vary in length, so compile for dynamic shapes there
    model = prepare_model(build_model(args, tokenizer.vocab_size).to(rt.device), args, rt, dynamic=not args.packing)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, rt.device,
                                    kind=args.optimizer, muon_lr=args.muon_lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    # --- data: render each conversation to ids + assistant-only targets, then pack or group them -------------
    reader = record_reader(args, "sft")  # --format alpaca / sharegpt / columns: records -> ours as they are read
    examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len, args.reasoning, reader=reader)
    n_val = holdout(len(examples), args.val_ratio, args.eval_interval > 0)  # --eval_interval: the last ones
    examples, val_batches = split_validation(examples, n_val, args.batch_size, args.eval_iters, tokenizer.pad_id)
    # packed: fixed windows of max_seq_len, the Sampler shuffles windows; else groups of similar length
    data, per_batch = sft_batches(examples, args.packing, args.batch_size, args.max_seq_len, tokenizer.pad_id)
    sampler = Sampler(len(data), per_batch, args.accumulation_steps, rt.world, rt.rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    run = RunState(args, rt, model, optimizer, scaler, tokenizer, sampler,
                   run_fingerprint("sft", unwrap(model).config, tokenizer, args, len(data)))
    start = resume(run)
    share = data.stats()
    announce(run, f"data {len(examples)} conversations in {len(data)} {'windows' if args.packing else 'batches'} "
             f"({share['real']:.1%} of positions are real tokens, {share['supervised']:.1%} supervised) | "
             f"{sum(e.truncated for e in examples)} truncated at --max_seq_len (end of reply cut) | {dropped} "
             f"dropped (no reply fits) | {steps} steps")

    # --- loop: next-token loss on the replies only (packed rows keep attention inside each conversation) ------
    schedule = lr_schedule(args)  # step -> learning rate (warm-up, then decay)
    with RunControl(run, steps, start, "sft", validate=lambda: evaluate(run, val_batches, lm_loss)) as ctl:
        for step, micro_batches in step_batches(data.get, sampler, start, steps, rt.device):
            out = train_step(run, micro_batches, schedule(step, steps), lm_loss, poison=step == args.debug_nan_at_step)
            if ctl.step_done(step, out):  # log, evaluate, checkpoint when due; SIGTERM: save and stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish()


if __name__ == "__main__":
    cli.run(main)
