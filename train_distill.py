"""Knowledge distillation: train a small student to match a bigger teacher's next-token distributions.

    python train_distill.py --teacher out/sft_big --from_weight out/pretrain --data_path dataset/default/sft.jsonl \
        --out_dir out/distill --temperature 2.0 --alpha 0.5
    python train_distill.py --teacher out/sft_big --preset tiny --data_kind pretrain \
        --data_path dataset/default/pretrain.jsonl                     # a fresh student, on plain text

loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, data): the teacher's whole
distribution carries more signal per token than the one "right" token of the data. Teacher and student must
share the tokenizer (the same vocabulary, the same ids), or their distributions cannot be compared.
Reads top to bottom: args -> setup -> student and teacher -> data -> resume -> loop -> save.
"""
import argparse

import torch

from minimind import DEFAULT_TOKENIZER, cli
from minimind.checkpoint import load_model, unwrap
from minimind.data import (REASONING, LengthGroupedBatches, PackedConversations, PackedWindows, Prefetcher, Sampler,
                           load_sft, pad_batch, pretokenize)
from minimind.loss import distill_loss
from minimind.model import document_mask, document_positions
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, RunLog, add_common_args, build_model,
                            configure_optimizer, describe, evaluate, holdout, init_distributed, lr_at, pick_device,
                            pick_dtype, prepare_model, resume, run_fingerprint, save_checkpoint, save_final_model,
                            seed_everything, set_lr, setup_hardware, total_steps, train_step)


def distill_batch_loss(student, teacher, batch, temperature: float, alpha: float):
    """(loss, kl, ce) of one batch (x, y[, doc_ids]). The teacher scores under no_grad: only the student learns."""
    x, y, *doc_ids = batch
    kw = {}
    if doc_ids:  # packed conversations: build the document mask once and give it to both models
        kw = dict(doc_ids=document_mask(doc_ids[0]), position_ids=document_positions(doc_ids[0]))
    with torch.no_grad():
        teacher_logits = teacher(x, **kw)
    return distill_loss(student(x, **kw), teacher_logits, y, temperature, alpha)


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/sft.jsonl", out_dir="out/distill", from_weight="none",
                    epochs=1, batch_size=16, learning_rate=5e-4, max_seq_len=512)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", required=True, help="teacher model directory (same tokenizer as the student)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature T for both models in the KL term (>1 = softer, shows the teacher's "
                        "ranking of unlikely tokens)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the KL-to-teacher term; 1 - alpha weights the cross-entropy on the data")
    g.add_argument("--data_kind", default="sft", choices=["sft", "pretrain"],
                   help="sft = conversations, loss on assistant tokens only; pretrain = plain text, every token")
    g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                   help="sft data: 1 = pack conversations into --max_seq_len windows (document masking); "
                        "0 = length-grouped padded batches")
    g.add_argument("--reasoning", default="keep", choices=REASONING, help="sft data: keep or drop reasoning_content")
    args = p.parse_args()
    if args.temperature <= 0:
        raise cli.UsageError(f"--temperature {args.temperature}: must be > 0")
    if not 0 <= args.alpha <= 1:
        raise cli.UsageError(f"--alpha {args.alpha}: must be between 0 and 1")

    # --- setup ----------------------------------------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    setup_hardware(device, args.num_threads)
    seed_everything(args.seed)

    # --- student and teacher: same tokenizer, or the two distributions mean different things ----------------
    tok_dir = args.from_weight if args.from_weight != "none" else (args.tokenizer or DEFAULT_TOKENIZER)
    tokenizer = Tokenizer.load(tok_dir)
    teacher_tokenizer = Tokenizer.load(args.teacher)
    if teacher_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise cli.UsageError(f"--teacher {args.teacher}: its tokenizer differs from the student's ({tok_dir}); "
                             f"distillation needs the same tokenizer (fingerprints "
                             f"{teacher_tokenizer.fingerprint()} vs {tokenizer.fingerprint()})")
    teacher = load_model(args.teacher, device=device).eval().requires_grad_(False)
    student = build_model(args, tokenizer.vocab_size)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise cli.UsageError(f"--teacher {args.teacher}: vocab_size {teacher.config.vocab_size} differs from the "
                             f"student's {student.config.vocab_size}; their logits cannot be compared")
    model = prepare_model(student.to(device), args, device, world, local_rank,
                          dynamic=args.data_kind == "sft" and not args.packing)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # --- data: conversations (packed, assistant tokens supervised) or plain-text windows --------------------
    if args.data_kind == "sft":
        examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len, args.reasoning)
        n_val = holdout(len(examples), args.val_ratio, args.eval_interval > 0)
        examples, held_out = examples[:len(examples) - n_val], examples[len(examples) - n_val:]
        val_batches = [pad_batch(held_out[s:s + args.batch_size], tokenizer.pad_id)
                       for s in range(0, n_val, args.batch_size)][:args.eval_iters]
        if args.packing:
            data = PackedConversations(examples, args.max_seq_len, tokenizer.pad_id)
            sampler = Sampler(len(data), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
        else:
            data = LengthGroupedBatches(examples, args.batch_size, tokenizer.pad_id)
            sampler = Sampler(len(data), 1, args.accumulation_steps, world, rank, seed=args.seed)
        summary = (f"{len(examples)} conversations in {len(data)} {'windows' if args.packing else 'batches'} | "
                   f"{sum(e.truncated for e in examples)} truncated at --max_seq_len (end of reply cut) | "
                   f"{dropped} dropped (no reply fits)")
    else:
        data = PackedWindows(pretokenize(args.data_path, tokenizer), args.max_seq_len)
        n_val = holdout(len(data), args.val_ratio, args.eval_interval > 0, min_val=args.batch_size)
        n_train = len(data) - n_val
        sampler = Sampler(n_train, args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
        val_batches = [data.get(range(s, min(s + args.batch_size, len(data))))
                       for s in range(n_train, len(data), args.batch_size)][:args.eval_iters]
        summary = f"{n_train} windows of {args.max_seq_len} tokens"
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    fingerprint = run_fingerprint("distill", unwrap(model).config, tokenizer, args, sampler.n)
    start = resume(args, model, optimizer, scaler, sampler, fingerprint, rank, world)
    spe = sampler.steps_per_epoch
    keys = [(s // spe, s % spe, m) for s in range(start, steps) for m in range(args.accumulation_steps)]
    batches = iter(Prefetcher(lambda e, s, m: data.get(sampler.indices(e, s, m)), keys, device))
    if rank == 0:
        print(describe(model, args, device, dtype, (rank, world)))
        print(f"teacher {args.teacher}: {teacher.num_parameters() / 1e6:.2f}M params | T {args.temperature} | "
              f"alpha {args.alpha}")
        print(f"data {summary} | {steps} steps")

    stats = {}

    def loss_fn(model, batch):  # runs under train_step's autocast
        loss, kl, ce = distill_batch_loss(model, teacher, batch, args.temperature, args.alpha)
        stats.update(kl=kl, ce=ce)
        return loss

    # --- loop -----------------------------------------------------------------------------------------------
    ctl = RunControl(args, device, scaler, rank, world,
                     save=lambda done: save_checkpoint(args, done, model, optimizer, scaler, tokenizer, sampler,
                                                       fingerprint, rank, world),
                     final=lambda: save_final_model(model, tokenizer, args.out_dir, rank))
    done = start
    model.train()
    log = RunLog(args, steps, start=start, enabled=rank == 0, desc="distill")
    with log:  # closes the bar even on an error, so that `error: ...` gets a line of its own
        for step in range(start, steps):
            lr = lr_at(step, steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
            set_lr(optimizer, lr)
            micro_batches = [next(batches) for _ in range(args.accumulation_steps)]
            loss, grad_norm = train_step(model, optimizer, scaler, micro_batches, device, dtype, args.grad_clip,
                                         loss_fn, poison=step == args.debug_nan_at_step)
            ctl.record(step, loss, grad_norm)
            log.update()
            done = step + 1  # optimizer steps completed; a checkpoint named step_N resumes at step N
            if step % args.log_interval == 0 or done == steps:
                ctl.check()
                log.log(step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), kl=stats["kl"].item(),
                        ce=stats["ce"].item())
            if args.eval_interval and (done % args.eval_interval == 0 or done == steps):
                log.log(step, val_loss=evaluate(model, val_batches, device, dtype, loss_fn, world, rank))
            if ctl.step_done(done, steps):  # checkpoint when due; SIGTERM: save and stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish(done, steps)


if __name__ == "__main__":
    cli.run(main)
