"""LoRA fine-tuning: adapt a trained model by learning small low-rank updates; the base weights stay frozen.

    python train_lora.py --from_weight out/sft --data_path dataset/default/sft.jsonl --out_dir out/lora
    python eval_model.py --load_from out/sft --lora_path out/lora --prompts          # chat with base + adapter
    python train_lora.py --merge 1 --from_weight out/sft --lora_path out/lora --out_dir out/lora_merged

The first command writes only the adapter (A/B matrices, a few MB, + adapter_config.json in PEFT's layout).
--merge 1 trains nothing: it folds an adapter into its base and writes an ordinary model directory.
Same data, packing and loss as train_full_sft.py (loss on assistant replies only); see minimind/lora.py.
Reads top to bottom: args -> setup -> model -> data -> loop -> save.
"""
import argparse

import torch

from minimind import cli
from minimind.checkpoint import unwrap
from minimind.data import REASONING, LengthGroupedBatches, PackedConversations, Prefetcher, Sampler, load_sft, pad_batch
from minimind.lora import DEFAULT_TARGETS, cast_frozen, inject_lora, merge_to_dir, save_adapter, trainable_parameters
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, RunLog, add_common_args, build_model,
                            configure_optimizer, describe, evaluate, holdout, init_distributed, lr_at, pick_device,
                            pick_dtype, prepare_model, seed_everything, set_lr, setup_hardware, total_steps,
                            train_step)


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/sft.jsonl", out_dir="out/lora", from_weight="out/sft",
                    epochs=2, batch_size=16, learning_rate=1e-4, max_seq_len=512)
    g = p.add_argument_group("SFT data (as train_full_sft.py)")
    g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                   help="1 = pack several conversations per --max_seq_len window, attention kept inside each; "
                        "0 = batches of similar length padded to the batch's longest")
    g.add_argument("--reasoning", default="keep", choices=REASONING,
                   help="assistant turns' reasoning_content: keep = train on '<think>...</think>', drop = ignore")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated Linear layer names to adapt (a module matches if its name ends with one)")
    g.add_argument("--lora_rank", type=int, default=8, help="rank r of the update B @ A")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="the update is scaled by lora_alpha / lora_rank")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the input of A (0 = off)")
    g.add_argument("--base_dtype", default="auto", choices=["auto", "float32"],
                   help="storage of the frozen Linear weights: auto = the autocast dtype (bf16/fp16: half the "
                        "memory, the same numbers), float32 = keep fp32")
    g.add_argument("--merge", type=int, default=0, choices=[0, 1],
                   help="1 = do not train: merge --lora_path into --from_weight and write a full model to --out_dir")
    g.add_argument("--lora_path", default=None, help="adapter directory to merge (with --merge 1)")
    args = p.parse_args()
    if args.from_weight == "none":
        raise cli.UsageError("--from_weight: LoRA adapts a trained model directory (e.g. out/sft)")

    # --- merge mode: base + adapter -> one ordinary model directory, then stop ------------------------------
    if args.merge:
        if not args.lora_path:
            raise cli.UsageError("--merge 1 needs --lora_path (the adapter directory to merge)")
        merge_to_dir(args.from_weight, args.lora_path, args.out_dir)
        print(f"merged {args.lora_path} into {args.from_weight} -> {args.out_dir}")
        return
    if args.lora_path:
        raise cli.UsageError("--lora_path is only read with --merge 1 (training always starts a fresh adapter)")
    if args.from_resume:
        raise cli.UsageError("--from_resume: LoRA runs do not resume; --save_interval / Ctrl-C save the adapter so "
                             "far to --out_dir, and a new run starts a fresh adapter")
    if args.fsdp:
        raise cli.UsageError("--fsdp: LoRA's trainable state is a few MB; under torchrun it uses DDP (drop --fsdp)")

    # --- setup ----------------------------------------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    setup_hardware(device, args.num_threads)
    seed_everything(args.seed)

    # --- model: load the base, wrap the target Linears, freeze everything but A and B -----------------------
    tokenizer = Tokenizer.load(args.from_weight)
    model = build_model(args, tokenizer.vocab_size)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    wrapped = inject_lora(model, targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
    model = model.to(device)
    if args.base_dtype == "auto" and dtype != torch.float32:
        cast_frozen(model, dtype)  # frozen weights never need fp32: autocast would round them to dtype anyway
    model = prepare_model(model, args, device, world, local_rank, dynamic=not args.packing)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)  # sees A/B only
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # --- data: render each conversation to ids + assistant-only targets, then pack or group them -------------
    examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len, args.reasoning)
    n_val = holdout(len(examples), args.val_ratio, args.eval_interval > 0)  # --eval_interval: the last ones
    examples, held_out = examples[:len(examples) - n_val], examples[len(examples) - n_val:]
    val_batches = [pad_batch(held_out[s:s + args.batch_size], tokenizer.pad_id)
                   for s in range(0, n_val, args.batch_size)][:args.eval_iters]
    if args.packing:
        data = PackedConversations(examples, args.max_seq_len, tokenizer.pad_id)
        sampler = Sampler(len(data), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
    else:
        data = LengthGroupedBatches(examples, args.batch_size, tokenizer.pad_id)
        sampler = Sampler(len(data), 1, args.accumulation_steps, world, rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)
    spe = sampler.steps_per_epoch
    keys = [(s // spe, s % spe, m) for s in range(steps) for m in range(args.accumulation_steps)]
    batches = iter(Prefetcher(lambda e, s, m: data.get(sampler.indices(e, s, m)), keys, device))
    if rank == 0:
        n_train, n_all = trainable_parameters(model), sum(p.numel() for p in unwrap(model).parameters())
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"lora r={args.lora_rank} alpha={args.lora_alpha:g} on {len(wrapped)} Linear layers | trainable "
              f"{n_train / 1e6:.3f}M of {n_all / 1e6:.2f}M params ({100 * n_train / n_all:.2f}%)")
        print(f"data {len(examples)} conversations in {len(data)} {'windows' if args.packing else 'batches'} | "
              f"{sum(e.truncated for e in examples)} truncated | {dropped} dropped (no reply fits) | {steps} steps")

    def sft_loss(model, batch):
        """Packed batches carry doc_ids: the model keeps attention inside each conversation."""
        x, y, *doc_ids = batch
        return model(x, targets=y, doc_ids=doc_ids[0] if doc_ids else None)

    def save(done: int) -> str:
        if rank == 0:  # the adapter alone (A/B); the frozen base is never written
            save_adapter(model, args.out_dir, args.from_weight, targets,
                         extra={"steps": done, "data_path": args.data_path})
        return args.out_dir

    # --- loop -----------------------------------------------------------------------------------------------
    done = 0
    ctl = RunControl(args, device, scaler, rank, world, save=save, final=lambda: save(done), resumable=False)
    model.train()
    with RunLog(args, steps, enabled=rank == 0, desc="lora") as log:
        for step in range(steps):
            lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
            set_lr(optimizer, lr)
            micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
            loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip,
                                         sft_loss, poison=step == args.debug_nan_at_step)
            ctl.record(step, loss, grad_norm)
            log.update()
            done = step + 1
            if step % args.log_interval == 0 or done == steps:
                ctl.check()
                log.log(step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item())
            if args.eval_interval and (done % args.eval_interval == 0 or done == steps):
                log.log(step, val_loss=evaluate(model, val_batches, device, dtype, sft_loss, world, rank))
            if ctl.step_done(done, steps):  # adapter saved when due; SIGTERM: save it and stop
                break

    # --- save: the adapter alone ----------------------------------------------------------------------------
    ctl.finish(done, steps)
    if rank == 0:
        print(f"adapter after {done}/{steps} steps in {args.out_dir}\nmerge it with: python train_lora.py --merge 1 "
              f"--from_weight {args.from_weight} --lora_path {args.out_dir} --out_dir {args.out_dir}_merged")


if __name__ == "__main__":
    cli.run(main)
