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

from minimind import cli, runtime
from minimind.checkpoint import unwrap
from minimind.data import Sampler, holdout, load_sft, sft_batches, split_validation, step_batches
from minimind.flags import add_common_args, add_conversation_args
from minimind.formats import record_reader
from minimind.lora import DEFAULT_TARGETS, cast_frozen, inject_lora, merge_to_dir, save_adapter, trainable_parameters
from minimind.resume import RunState
from minimind.runlog import announce
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, build_model, configure_optimizer, evaluate, lr_schedule, prepare_model,
                            total_steps, train_step)


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/sft.jsonl", out_dir="out/lora", from_weight="out/sft",
                    epochs=2, batch_size=16, learning_rate=1e-4, max_seq_len=512)
    add_conversation_args(p)  # --packing, --reasoning: the same data as train_full_sft.py
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

    # --- setup: device, precision, ranks (torchrun), threads, seeds -----------------------------------------
    rt = runtime.start(args.device, args.dtype, args.num_threads, args.seed)

    # --- model: load the base, wrap the target Linears, freeze everything but A and B -----------------------
    tokenizer = Tokenizer.load(args.from_weight)
    model = build_model(args, tokenizer.vocab_size)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    wrapped = inject_lora(model, targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
    model = model.to(rt.device)
    if args.base_dtype == "auto" and rt.dtype != torch.float32:
        cast_frozen(model, rt.dtype)  # frozen weights never need fp32: autocast would round them to dtype anyway
    model = prepare_model(model, args, rt, dynamic=not args.packing)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, rt.device,
                                    kind=args.optimizer, muon_lr=args.muon_lr)  # sees A/B only
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    # --- data: exactly as train_full_sft.py (replies supervised; packed or length-grouped) ------------------
    reader = record_reader(args, "sft")  # --format alpaca / sharegpt / columns: records -> ours as they are read
    examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len, args.reasoning, reader=reader)
    examples, val_batches = split_validation(examples, holdout(len(examples), args.val_ratio, args.eval_interval > 0),
                                             args.batch_size, args.eval_iters, tokenizer.pad_id)
    data, per_batch = sft_batches(examples, args.packing, args.batch_size, args.max_seq_len, tokenizer.pad_id)
    sampler = Sampler(len(data), per_batch, args.accumulation_steps, rt.world, rt.rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)
    run = RunState(args, rt, model, optimizer, scaler, tokenizer, sampler)
    n_train, n_all = trainable_parameters(model), sum(p.numel() for p in unwrap(model).parameters())
    announce(run, f"lora r={args.lora_rank} alpha={args.lora_alpha:g} on {len(wrapped)} Linear layers | trainable "
             f"{n_train / 1e6:.3f}M of {n_all / 1e6:.2f}M params ({100 * n_train / n_all:.2f}%)",
             f"data {len(examples)} conversations in {len(data)} {'windows' if args.packing else 'batches'} | "
             f"{sum(e.truncated for e in examples)} truncated | {dropped} dropped (no reply fits) | {steps} steps")

    def save(done: int) -> str:
        if rt.main:  # the adapter alone (A/B); the frozen base is never written
            save_adapter(model, args.out_dir, args.from_weight, targets,
                         extra={"steps": done, "data_path": args.data_path})
        return args.out_dir

    # --- loop: the SFT loss (train.lm_loss); only A and B get gradients -------------------------------------
    schedule = lr_schedule(args)  # step -> learning rate (warm-up, then decay)
    with RunControl(run, steps, 0, "lora", validate=lambda: evaluate(run, val_batches), save=save,
                    final=lambda: save(ctl.done), resumable=False) as ctl:
        for step, micro_batches in step_batches(data.get, sampler, 0, steps, rt.device):
            out = train_step(run, micro_batches, schedule(step, steps), poison=step == args.debug_nan_at_step)
            if ctl.step_done(step, out):  # log, evaluate, save the adapter when due; SIGTERM: save it and stop
                break

    # --- save: the adapter alone ----------------------------------------------------------------------------
    ctl.finish()
    if rt.main:
        print(f"adapter after {ctl.done}/{steps} steps in {args.out_dir}\nmerge it with: python train_lora.py "
              f"--merge 1 --from_weight {args.from_weight} --lora_path {args.out_dir} --out_dir {args.out_dir}_merged")


if __name__ == "__main__":
    cli.run(main)
