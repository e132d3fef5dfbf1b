"""Pretraining: learn to predict the next token of plain text.

    python train_pretrain.py --data_path dataset/default/pretrain.jsonl --out_dir out/pretrain
    torchrun --nproc_per_node 4 train_pretrain.py --preset 64M --data_path pretrain_hq.jsonl   # many GPUs
    python train_pretrain.py ... --save_interval 500 --from_resume 1    # checkpoint often; continue after a stop

Reads top to bottom: args -> setup -> tokenizer and model -> data -> resume -> loop -> save.
"""
import argparse

import torch

from minimind import DEFAULT_TOKENIZER, cli, runtime
from minimind.checkpoint import unwrap
from minimind.config import pretrain_lr
from minimind.data import PackedWindows, Sampler, batches_over, holdout, pretokenize, step_batches
from minimind.flags import add_common_args
from minimind.resume import RunState, resume, run_fingerprint
from minimind.runlog import announce, packing_note
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, build_model, configure_optimizer, evaluate, lr_schedule, prepare_model,
                            total_steps, train_step)


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/pretrain.jsonl", out_dir="out/pretrain", from_weight="none",
                    epochs=1, batch_size=32, learning_rate=None, max_seq_len=340)
    p.add_argument("--doc_mask", type=int, default=1, choices=[0, 1],
                   help="1 = attention stays inside each document of a packed window and positions restart at each "
                        "one, as in MiniMind's one-document rows (poetry: held-out loss 0.037 bits/byte lower in the "
                        "same steps, no slower per step on a CPU); 0 = plain causal attention over the whole window")
    args = p.parse_args()
    if args.learning_rate is None:  # the preset's own (config.py says how each was chosen); a --config shape: 5e-4
        from_preset = args.config is None and args.from_weight == "none"
        args.learning_rate = pretrain_lr(args.preset if from_preset else None)

    # --- setup: device, precision, ranks (torchrun), threads, seeds -----------------------------------------
    rt = runtime.start(args.device, args.dtype, args.num_threads, args.seed)

    # --- tokenizer and model --------------------------------------------------------------------------------
    tok_dir = args.from_weight if args.from_weight != "none" else (args.tokenizer or DEFAULT_TOKENIZER)
    tokenizer = Tokenizer.load(tok_dir)
    model = prepare_model(build_model(args, tokenizer.vocab_size).to(rt.device), args, rt)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, rt.device,
                                    kind=args.optimizer, muon_lr=args.muon_lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)  # fp16 needs loss scaling

    # --- data: tokenize once to a memmap, then cut packed windows (no padding) ------------------------------
    with runtime.main_first(rt.world, rt.rank):  # rank 0 tokenizes (once, cached); the others read its memmap
        windows = PackedWindows(pretokenize(args.data_path, tokenizer), args.max_seq_len,
                                bos_id=tokenizer.bos_id if args.doc_mask else None)
    # --batch_size counts documents, as in MiniMind (one padded row each): a micro-batch is that many documents'
    # worth of packed windows, so MiniMind's flags give MiniMind's steps per epoch (--batch_tokens 0: whole windows)
    docs, mean = args.batch_size, windows.mean_document(tokenizer.eos_id)
    if args.batch_tokens < 0:
        args.batch_size = windows.rows_for_documents(docs, mean)
    n_val = holdout(len(windows), args.val_ratio, args.eval_interval > 0, min_val=args.batch_size)
    n_train = len(windows) - n_val  # the last n_val windows (the end of the corpus) are held out
    sampler = Sampler(n_train, args.batch_size, args.accumulation_steps, rt.world, rt.rank, seed=args.seed)
    val_batches = batches_over(windows.get, n_train, len(windows), args.batch_size, args.eval_iters)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    run = RunState(args, rt, model, optimizer, scaler, tokenizer, sampler,
                   run_fingerprint("pretrain", unwrap(model).config, tokenizer, args, n_train))
    start = resume(run)
    announce(run, f"data {n_train} windows of {args.max_seq_len} tokens (+{n_val} held out) | {steps} steps | "
             f"{args.batch_size * args.max_seq_len * args.accumulation_steps * rt.world} tokens/step",
             packing_note(args.max_seq_len, docs, mean, args.batch_size, args.batch_tokens))

    # --- loop -----------------------------------------------------------------------------------------------
    schedule = lr_schedule(args)  # step -> learning rate (warm-up, then decay)
    with RunControl(run, steps, start, "pretrain", validate=lambda: evaluate(run, val_batches)) as ctl:
        for step, micro_batches in step_batches(windows.get, sampler, start, steps, rt.device):
            out = train_step(run, micro_batches, schedule(step, steps), poison=step == args.debug_nan_at_step)
            if ctl.step_done(step, out):  # log, evaluate, checkpoint when due; SIGTERM: save and stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish()


if __name__ == "__main__":
    cli.run(main)
