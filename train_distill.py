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

from minimind import DEFAULT_TOKENIZER, cli, runtime
from minimind.checkpoint import load_model, unwrap
from minimind.data import (PackedWindows, Sampler, batches_over, holdout, load_sft, pretokenize,
                           sft_batches, split_validation, step_batches)
from minimind.flags import add_common_args, add_conversation_args
from minimind.formats import record_reader
from minimind.loss import distill_loss
from minimind.model import AttentionMask, document_positions
from minimind.resume import RunState, resume, run_fingerprint
from minimind.runlog import announce
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, build_model, configure_optimizer, evaluate, lr_schedule, prepare_model,
                            total_steps, train_step)


def distill_batch_loss(student, teacher, batch, temperature: float, alpha: float):
    """(loss, metrics) of one batch (x, y[, doc_ids]). The teacher scores under no_grad: only the student learns."""
    x, y, *doc_ids = batch
    kw = {}
    if doc_ids:  # packed conversations: build the document mask once and give it to both models
        kw = dict(mask=AttentionMask.documents(doc_ids[0]), position_ids=document_positions(doc_ids[0]))
    with torch.no_grad():
        teacher_logits = teacher(x, **kw)
    loss, kl, ce = distill_loss(student(x, **kw), teacher_logits, y, temperature, alpha)
    return loss, {"kl": kl, "ce": ce}


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
    add_conversation_args(p)  # --data_kind sft: --packing, --reasoning
    args = p.parse_args()
    if args.temperature <= 0:
        raise cli.UsageError(f"--temperature {args.temperature}: must be > 0")
    if not 0 <= args.alpha <= 1:
        raise cli.UsageError(f"--alpha {args.alpha}: must be between 0 and 1")

    # --- setup: device, precision, ranks (torchrun), threads, seeds -----------------------------------------
    rt = runtime.start(args.device, args.dtype, args.num_threads, args.seed)

    # --- student and teacher: same tokenizer, or the two distributions mean different things ----------------
    tok_dir = args.from_weight if args.from_weight != "none" else (args.tokenizer or DEFAULT_TOKENIZER)
    tokenizer = Tokenizer.load(tok_dir)
    teacher_tokenizer = Tokenizer.load(args.teacher)
    if teacher_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise cli.UsageError(f"--teacher {args.teacher}: its tokenizer differs from the student's ({tok_dir}); "
                             f"distillation needs the same tokenizer (fingerprints "
                             f"{teacher_tokenizer.fingerprint()} vs {tokenizer.fingerprint()})")
    teacher = load_model(args.teacher, device=rt.device).eval().requires_grad_(False)
    student = build_model(args, tokenizer.vocab_size)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise cli.UsageError(f"--teacher {args.teacher}: vocab_size {teacher.config.vocab_size} differs from the "
                             f"student's {student.config.vocab_size}; their logits cannot be compared")
    model = prepare_model(student.to(rt.device), args, rt, dynamic=args.data_kind == "sft" and not args.packing)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, rt.device,
                                    kind=args.optimizer, muon_lr=args.muon_lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    # --- data: conversations (packed, assistant tokens supervised) or plain-text windows --------------------
    if args.data_kind == "sft":
        examples, dropped = load_sft(args.data_path, tokenizer, args.max_seq_len, args.reasoning,
                                     reader=record_reader(args, "sft"))
        n_val = holdout(len(examples), args.val_ratio, args.eval_interval > 0)
        examples, val_batches = split_validation(examples, n_val, args.batch_size, args.eval_iters,
                                                 tokenizer.pad_id)
        data, per_batch = sft_batches(examples, args.packing, args.batch_size, args.max_seq_len, tokenizer.pad_id)
        sampler = Sampler(len(data), per_batch, args.accumulation_steps, rt.world, rt.rank, seed=args.seed)
        summary = (f"{len(examples)} conversations in {len(data)} {'windows' if args.packing else 'batches'} | "
                   f"{sum(e.truncated for e in examples)} truncated at --max_seq_len (end of reply cut) | "
                   f"{dropped} dropped (no reply fits)")
    else:
        with runtime.main_first(rt.world, rt.rank):  # rank 0 tokenizes (once, cached); the others read it
            data = PackedWindows(pretokenize(args.data_path, tokenizer), args.max_seq_len)
        n_val = holdout(len(data), args.val_ratio, args.eval_interval > 0, min_val=args.batch_size)
        n_train = len(data) - n_val
        sampler = Sampler(n_train, args.batch_size, args.accumulation_steps, rt.world, rt.rank, seed=args.seed)
        val_batches = batches_over(data.get, n_train, len(data), args.batch_size, args.eval_iters)
        summary = f"{n_train} windows of {args.max_seq_len} tokens"
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    run = RunState(args, rt, model, optimizer, scaler, tokenizer, sampler,
                   run_fingerprint("distill", unwrap(model).config, tokenizer, args, sampler.n))
    start = resume(run)
    announce(run, f"teacher {args.teacher}: {teacher.num_parameters() / 1e6:.2f}M params | T {args.temperature} | "
             f"alpha {args.alpha}", f"data {summary} | {steps} steps")

    def loss_fn(model, batch):  # runs under train_step's autocast
        return distill_batch_loss(model, teacher, batch, args.temperature, args.alpha)

    # --- loop -----------------------------------------------------------------------------------------------
    schedule = lr_schedule(args)  # step -> learning rate (warm-up, then decay)
    with RunControl(run, steps, start, "distill", validate=lambda: evaluate(run, val_batches, loss_fn)) as ctl:
        for step, micro_batches in step_batches(data.get, sampler, start, steps, rt.device):
            out = train_step(run, micro_batches, schedule(step, steps), loss_fn, poison=step == args.debug_nan_at_step)
            if ctl.step_done(step, out):  # log (with KL and CE), evaluate, checkpoint when due; SIGTERM: stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish()


if __name__ == "__main__":
    cli.run(main)
