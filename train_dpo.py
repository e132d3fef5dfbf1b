"""Direct Preference Optimization (DPO): prefer the chosen reply over the rejected one, without a reward model.

    python train_dpo.py --from_weight out/sft --data_path dataset/default/dpo.jsonl --out_dir out/dpo --beta 0.1

The policy starts as a copy of the SFT model; a frozen copy (the reference) keeps it from drifting too far.
Reads top to bottom: args -> setup -> policy and reference -> data -> resume -> loop -> save.
"""
import argparse

import torch
from tqdm import tqdm

from minimind import cli, runtime
from minimind.checkpoint import load_model, unwrap
from minimind.data import Sampler, batches_over, holdout, load_dpo, pad_batch, step_batches
from minimind.flags import add_common_args, add_conversation_args
from minimind.formats import record_reader
from minimind.loss import dpo_loss, token_logprobs
from minimind.resume import RunState, resume, run_fingerprint
from minimind.runlog import announce
from minimind.runtime import autocast
from minimind.tokenizer import Tokenizer
from minimind.train import (RunControl, build_model, configure_optimizer, evaluate, lr_schedule, prepare_model,
                            total_steps, train_step)


def sequence_logprobs(model, x, y):
    """Sum of log p(reply token) over each sequence's supervised positions: (rows,)."""
    return token_logprobs(model(x), y).sum(dim=-1)


@torch.no_grad()
def reference_logprobs(reference, pairs, batch_size, pad_id, device, dtype) -> torch.Tensor:
    """--precompute_ref: the reference's sequence log-probs of every pair, once, before training: (pairs, 2).

    The reference never changes, so scoring each pair once is enough; training then keeps no reference model
    in memory and spends no forward pass on it. Pairs are scored in length order to waste little padding.
    """
    reference.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i][0].ids), len(pairs[i][1].ids)))
    for s in tqdm(range(0, len(order), batch_size), desc="reference log-probs", unit=" batch", leave=False):
        chunk = order[s:s + batch_size]
        x, y = pad_batch([pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk], pad_id)
        with autocast(device, dtype):
            lp = sequence_logprobs(reference, x.to(device), y.to(device)).float().cpu()
        out[chunk, 0], out[chunk, 1] = lp[:len(chunk)], lp[len(chunk):]
    return out


def dpo_batch_loss(policy, reference, batch, beta: float, label_smoothing: float = 0.0, ipo: bool = False):
    """DPO loss of one batch [chosen rows; rejected rows] (+ precomputed reference log-probs as a third item).

    One forward of the policy scores chosen and rejected together; the reference (if not precomputed) scores
    them under no_grad, so gradients flow only through the policy. Returns (loss, metrics): the implicit
    rewards' margin (chosen - rejected) and how often chosen wins, which train_step averages over micro-batches.
    """
    x, y, *ref = batch
    policy_lp = sequence_logprobs(policy, x, y)
    if ref:
        ref_lp = ref[0]
    else:
        with torch.no_grad():  # the reference only scores: no graph, no gradient
            ref_lp = sequence_logprobs(reference, x, y)
    b = x.shape[0] // 2
    loss, r_chosen, r_rejected = dpo_loss(policy_lp[:b], policy_lp[b:], ref_lp[:b], ref_lp[b:], beta,
                                          label_smoothing, ipo)
    return loss, {"reward_margin": (r_chosen - r_rejected).mean(),
                  "reward_accuracy": (r_chosen > r_rejected).float().mean()}


def main():
    # --- args -----------------------------------------------------------------------------------------------
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, data_path="dataset/default/dpo.jsonl", out_dir="out/dpo", from_weight="out/sft",
                    epochs=1, batch_size=4, learning_rate=1e-6, max_seq_len=1024)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull toward the reference model (higher = stay closer)")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="conservative DPO: assumed share of flipped labels")
    g.add_argument("--ipo", type=int, default=0, choices=[0, 1], help="1 = IPO loss instead of DPO's log-sigmoid")
    g.add_argument("--precompute_ref", type=int, default=0, choices=[0, 1],
                   help="1 = score every pair with the reference once before training and free it (saves a model's "
                        "memory and a forward per step); 0 = score each batch on the fly, no grad")
    add_conversation_args(p, packing=False)  # --reasoning
    args = p.parse_args()

    # --- setup: device, precision, ranks (torchrun), threads, seeds -----------------------------------------
    rt = runtime.start(args.device, args.dtype, args.num_threads, args.seed)

    # --- policy and frozen reference ------------------------------------------------------------------------
    if args.from_weight == "none":
        raise cli.UsageError("--from_weight: DPO starts from an SFT model directory (e.g. out/sft)")
    tokenizer = Tokenizer.load(args.from_weight)
    model = prepare_model(build_model(args, tokenizer.vocab_size).to(rt.device), args, rt,
                          dynamic=True)  # padded batches vary in length: compile for dynamic shapes
    reference = load_model(args.from_weight, device=rt.device).eval().requires_grad_(False)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, rt.device,
                                    kind=args.optimizer, muon_lr=args.muon_lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    # --- data: each batch is [chosen rows; rejected rows], so one forward scores both -----------------------
    reader = record_reader(args, "dpo")  # --format: prompt/chosen/rejected strings, sharegpt pairs -> ours
    pairs, dropped = load_dpo(args.data_path, tokenizer, args.max_seq_len, args.reasoning, reader=reader)
    ref_cache = None
    if args.precompute_ref:  # score everything once, then drop the reference model
        ref_cache = reference_logprobs(reference, pairs, 2 * args.batch_size, tokenizer.pad_id, rt.device, rt.dtype)
        reference = None
    n_val = holdout(len(pairs), args.val_ratio, args.eval_interval > 0)  # --eval_interval: the last pairs
    n_train = len(pairs) - n_val
    sampler = Sampler(n_train, args.batch_size, args.accumulation_steps, rt.world, rt.rank, seed=args.seed)
    steps = total_steps(sampler.steps_per_epoch, args.epochs, args.max_steps)

    def batch_of(idx):
        idx = list(idx)
        x, y = pad_batch([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], tokenizer.pad_id)
        if ref_cache is None:
            return x, y
        return x, y, torch.cat([ref_cache[idx, 0], ref_cache[idx, 1]])  # reference log-probs, same row order

    val_batches = batches_over(batch_of, n_train, len(pairs), args.batch_size, args.eval_iters)

    # --- resume: weights, optimizer, random streams and data position of the newest checkpoint -------------
    run = RunState(args, rt, model, optimizer, scaler, tokenizer, sampler,
                   run_fingerprint("dpo", unwrap(model).config, tokenizer, args, n_train))
    start = resume(run)
    announce(run, f"data {len(pairs)} pairs ({dropped} dropped: no reply within --max_seq_len) | {steps} steps | "
             f"reference log-probs {'precomputed' if args.precompute_ref else 'per batch'}")

    def loss_fn(model, batch):  # runs under train_step's autocast
        return dpo_batch_loss(model, reference, batch, args.beta, args.label_smoothing, bool(args.ipo))

    # --- loop -----------------------------------------------------------------------------------------------
    schedule = lr_schedule(args)  # step -> learning rate (warm-up, then decay)
    validate = lambda: evaluate(run, val_batches, loss_fn, per_token=False)  # noqa: E731 - the mean DPO loss
    with RunControl(run, steps, start, "dpo", validate=validate) as ctl:
        for step, micro_batches in step_batches(batch_of, sampler, start, steps, rt.device):
            out = train_step(run, micro_batches, schedule(step, steps), loss_fn, poison=step == args.debug_nan_at_step)
            if ctl.step_done(step, out):  # log (with reward margin/accuracy), evaluate, checkpoint; SIGTERM: stop
                break

    # --- save -----------------------------------------------------------------------------------------------
    ctl.finish()


if __name__ == "__main__":
    cli.run(main)
