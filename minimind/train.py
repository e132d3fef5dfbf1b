"""The pieces every train_*.py shares: the model as trained, the optimizer step, run control and evaluation.

No trainer class: each script keeps its own loop, top to bottom, and calls these. Flags are flags.py; where it runs
(device, dtype, ranks) is runtime.py; optimizers and schedules are optim.py; checkpoints and exact resume are
resume.py; the progress bar and metrics are runlog.py.
Sections: model -> the step -> faults (NaN, signals, time budget) and run control -> evaluation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .checkpoint import load_config, load_model, unwrap
from .config import PRESETS, preset
from .errors import TrainingError, UsageError
from .flags import apply_batch_tokens
from .loss import IGNORE
from .model import MiniMindForCausalLM
from .optim import configure_optimizer, lr_at, lr_schedule, time_progress  # noqa: F401 - scripts import them here
from .resume import RunState, list_checkpoints, save_checkpoint, save_final_model
from .runlog import RunLog
from .runtime import Runtime, all_ranks_agree, autocast, cleanup_distributed, max_over_ranks


# ---------------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------------------------
def build_model(args, vocab_size: int) -> MiniMindForCausalLM:
    """Load --from_weight, or build a fresh model from --config (any config.json) or --preset + size overrides."""
    if args.from_weight and args.from_weight != "none":
        if getattr(args, "config", None):
            raise UsageError("--config builds a fresh model; --from_weight already has its own config.json")
        return load_model(args.from_weight)
    if getattr(args, "config", None):  # any architecture's config.json, e.g. Qwen2.5-0.5B's, trained from scratch
        if any(v is not None for v in (args.hidden_size, args.num_hidden_layers, args.use_moe)):
            raise UsageError("--config sets the whole shape; drop --hidden_size / --num_hidden_layers / --use_moe")
        cfg = load_config(args.config)
        if cfg.vocab_size < vocab_size:
            raise UsageError(f"--config {args.config}: vocab_size {cfg.vocab_size} is smaller than the "
                             f"tokenizer's {vocab_size} tokens")
        return MiniMindForCausalLM(cfg)
    cfg = preset(args.preset, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                 use_moe=bool(args.use_moe) if args.use_moe is not None else None, vocab_size=vocab_size)
    if args.hidden_size and args.hidden_size % cfg.num_attention_heads:
        raise UsageError(f"--hidden_size {args.hidden_size} must be a multiple of the preset's "
                         f"{cfg.num_attention_heads} attention heads")
    if args.hidden_size and args.hidden_size != PRESETS[args.preset].get("hidden_size"):
        # keep head_dim and the MLP width consistent with the new width
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        cfg.intermediate_size = cfg.moe_intermediate_size = math.ceil(cfg.hidden_size * math.pi / 64) * 64
    return MiniMindForCausalLM(cfg)


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing: keep only each block's input; recompute its insides during backward.

    Memory for activations drops from ~all layers to ~one layer, for one extra forward pass of compute.
    The block's forward is wrapped in place, so parameter names (and saved checkpoints) do not change.
    """
    from torch.utils.checkpoint import checkpoint
    for block in unwrap(model).model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():   # evaluation: nothing to save memory for
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        block.forward = forward


def prepare_model(model: torch.nn.Module, args, rt: Runtime, dynamic: bool | None = None):
    """Activation checkpointing -> FSDP sharding -> torch.compile -> DDP, as the flags ask. Build the optimizer
    AFTER this: fully_shard replaces parameters by sharded ones. dynamic: torch.compile's (True when batch
    shapes vary, e.g. padded SFT batches). Also turns --batch_tokens into --batch_size x --accumulation_steps."""
    if args.fsdp and getattr(args, "optimizer", "adamw") == "muon":
        raise UsageError("--optimizer muon: not supported with --fsdp 1 (Newton-Schulz needs each whole matrix, "
                         "FSDP holds shards): use --fsdp 0 (DDP) or --optimizer adamw")
    apply_batch_tokens(args, rt.world)  # before the scripts build their samplers from args.batch_size
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    if args.fsdp and rt.world > 1:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise UsageError("--fsdp 1 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
        # Shard every block, then the rest (embeddings, final norm): each block's parameters are gathered just
        # before it runs and freed right after, so only one block is ever whole in memory.
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    if args.use_compile:
        model = torch.compile(model, dynamic=dynamic)
    if rt.world > 1 and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank]
                                                          if rt.device.type == "cuda" else None)
    return model


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int) -> int:
    n = steps_per_epoch * epochs
    return min(n, max_steps) if max_steps > 0 else n


# ---------------------------------------------------------------------------------------------------------------
# The step: forward/backward over micro-batches (gradient accumulation), clip, update
# ---------------------------------------------------------------------------------------------------------------
def lm_loss(model, batch):
    """Next-token loss on batch = (inputs, targets[, doc_ids]); packed rows carry doc_ids, so attention stays
    inside each conversation. Every loss_fn returns (loss, metrics): metrics are tensors averaged per step."""
    x, y, *doc_ids = batch
    return model(x, targets=y, doc_ids=doc_ids[0] if doc_ids else None), {}


@dataclass
class StepResult:
    """One optimizer step's numbers. Tensors stay on the device (no host sync): read them only when logging."""
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    tokens: int                        # input positions processed by all ranks (padding included)
    metrics: dict = field(default_factory=dict)   # the loss_fn's extras (e.g. DPO's reward margin), averaged


def no_sync_unless(model, sync: bool):
    """Under DDP, skip the gradient all-reduce on all but the last micro-step of an accumulation.

    (FSDP keeps reduce-scattering every micro-step: skipping would hold whole, unsharded gradients in memory,
    which is what FSDP is there to avoid.)"""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(run: RunState, micro_batches: list, lr: float, loss_fn=lm_loss, poison: bool = False) -> StepResult:
    """Set the LR, then one optimizer step over a list of micro-batches (gradient accumulation).

    loss_fn(model, batch) -> (loss, metrics). Each micro-batch's loss is divided by their count, so the summed
    gradient is the mean over micro-batches; metrics are averaged the same way (not just the last one's).
    poison: testing only (--debug_nan_at_step): make this step's loss NaN.
    """
    model, optimizer, scaler, rt = run.model, run.optimizer, run.scaler, run.rt
    for g in optimizer.param_groups:  # lr_scale: Muon's groups run at --muon_lr, on the same schedule
        g["lr"] = lr * g.get("lr_scale", 1.0)
    n = len(micro_batches)
    total, metrics = 0.0, {}
    for i, batch in enumerate(micro_batches):
        with no_sync_unless(model, i == n - 1):
            with autocast(rt.device, rt.dtype):
                loss, extra = loss_fn(model, batch)
            if poison and i == 0:
                loss = loss * float("nan")
            scaler.scale(loss / n).backward()
        total = total + loss.detach()
        for k, v in extra.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float() / n
    # Unscale (fp16), clip, step, zero. The norm is the pre-clip one.
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    clip = run.args.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(norm, "full_tensor"):  # FSDP: the norm is a replicated DTensor; a plain tensor is easier to use
        norm = norm.full_tensor()
    tokens = sum(b[0].numel() for b in micro_batches) * rt.world
    return StepResult(total / n, norm, lr, tokens, metrics)


# ---------------------------------------------------------------------------------------------------------------
# Faults: a diverging run, and a machine that asks us to stop
# ---------------------------------------------------------------------------------------------------------------
class FiniteGuard:
    """Watches loss and gradient norm for inf/NaN without a host sync per step: the first bad step is recorded
    on the device, and check() (called when logging and before every save) raises, so nothing bad is saved."""

    def __init__(self, device: torch.device, check_grad: bool = True):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.check_grad = check_grad  # fp16 runs: a non-finite gradient only makes the loss scaler skip a step

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        if self.check_grad:
            bad = bad | ~torch.isfinite(grad_norm)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, world: int, last_good: str | None, resumable: bool = True) -> None:
        bad = self.first_bad.clone()
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        step = int(bad.item())
        if step < 0:
            return
        msg = (f"non-finite loss or gradient (inf/NaN) at step {step}: stopped, and nothing from that step on was "
               f"saved; last good checkpoint: {last_good or 'none'} (lower --learning_rate or raise "
               f"--warmup_iters, then " + ("continue with --from_resume 1)" if resumable else "start again)"))
        if dist.is_initialized() and dist.get_rank() != 0:
            sys.exit(2)  # rank 0 prints the one line
        raise TrainingError(msg)


class StopRequest:
    """SIGTERM (preemption, `kill`, a scheduler's time limit) or Ctrl-C: finish the current step, save a
    checkpoint, exit cleanly. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name  # only set a flag: printing here could re-enter a print

    def requested(self, world: int = 1) -> bool:
        """True on every rank as soon as any rank got the signal (ranks must save at the same step)."""
        flag = self.signal is not None
        if world > 1:
            flag = all_ranks_agree(flag, world)
            self.signal = self.signal or ("SIGTERM" if flag else None)
        return flag


def saved_time_used(out_dir: str) -> float:
    """Seconds of --time_budget the newest checkpoint had used (0 for a checkpoint written without a budget)."""
    found = list_checkpoints(out_dir)
    if not found:
        return 0.0
    with open(os.path.join(found[-1], "trainer_state.json"), encoding="utf-8") as f:
        return float(json.load(f).get("flags", {}).get("time_used_s") or 0.0)


class TimeBudget:
    """--time_budget's clock. It keeps its numbers on args (time_used_s, step_time_s): lr_schedule reads them
    there (optim.time_progress), and checkpoints save them with the other scalar flags, so a resumed run goes on
    with the time that was left (the pause between stop and resume is not counted). Time counts from the loop's
    start: steps, evaluations and checkpoint saves, not the setup before (tokenizing, building the model)."""

    def __init__(self, args, start: int, world: int):
        self.args, self.world, self.start = args, world, start
        self.budget_s = 60.0 * getattr(args, "time_budget", 0.0)
        if not self.budget_s:
            return
        args.time_used_s = saved_time_used(args.out_dir) if start else 0.0
        args.step_time_s = 0.0
        self.t0, self.used0 = time.perf_counter(), args.time_used_s

    def tick(self, done: int) -> bool:
        """After a step (done = steps finished): update the clock. True = the budget is spent, stop now: either
        the step just run was the one the schedule put on the floor LR (its predicted end passed the budget), or
        the time really is up."""
        if not self.budget_s:
            return False
        on_floor = time_progress(self.args) >= 1  # the same numbers lr_schedule used for this step
        used = max_over_ranks(self.used0 + time.perf_counter() - self.t0, self.world)
        self.args.time_used_s = used
        self.args.step_time_s = (used - self.used0) / max(1, done - self.start)  # mean step, evals included
        return on_floor or used >= self.budget_s


class RunControl:
    """What every training loop does besides learning, in one place: the progress bar and metrics (RunLog), a
    metrics line every --log_interval steps, held-out loss every --eval_interval, a checkpoint every
    --save_interval, stop before saving a non-finite model (FiniteGuard), save and exit on SIGTERM/Ctrl-C
    (StopRequest), and the final save. The loop itself stays in each script: step_done() after each step,
    finish() after the loop.

    validate() -> held-out loss (or None: no evaluation). save(done) writes a checkpoint and returns its path;
    final() writes the finished model. Both default to the full-model versions (resume.py); LoRA passes adapter
    writers (and resumable=False).
    """

    def __init__(self, run: RunState, steps: int, start: int = 0, desc: str = "train", validate=None, save=None,
                 final=None, resumable: bool = True):
        self.run, self.args, self.world = run, run.args, run.rt.world
        self.steps, self.done = steps, start
        self.validate, self.resumable = validate, resumable
        self.save = save or (lambda done: save_checkpoint(run, done))
        self.final = final or (lambda: save_final_model(run))
        self.guard = FiniteGuard(run.rt.device, check_grad=not run.scaler.is_enabled())  # nothing bad is saved
        self.stop = StopRequest()                                                       # SIGTERM: save, exit
        self.log = RunLog(run.args, steps, start=start, enabled=run.rt.main, desc=desc)
        self.last_saved, self.stopping = None, False
        self.clock, self.out_of_time = TimeBudget(run.args, start, self.world), False  # --time_budget
        for g in run.optimizer.param_groups:  # a resumed optimizer keeps the saved ratio; the flags now must win
            if g.get("muon") and getattr(run.args, "muon_lr", None):
                g["lr_scale"] = run.args.muon_lr / run.args.learning_rate
        run.model.train()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.close()  # also on an error: the bar must end its line before `error: ...` is printed
        return False

    def check(self) -> None:
        """Stop with a one-line error if any step so far was non-finite (a host sync: only at log time)."""
        self.guard.check(self.world, self.last_saved, self.resumable)

    def step_done(self, step: int, out: StepResult) -> bool:
        """Bookkeeping after optimizer step `step`: log, evaluate and checkpoint when due. True = leave the loop."""
        self.guard.update(step, out.loss, out.grad_norm)   # on the device: no host sync
        self.done = step + 1                  # a checkpoint named step_N resumes at step N
        self.run.tokens += out.tokens         # on RunState: checkpoints save it, so a resumed run counts on
        self.out_of_time, self.last_lr = self.clock.tick(self.done), out.lr
        done, last, args = self.done, self.done == self.steps or self.out_of_time, self.args
        self.log.update()
        if step % args.log_interval == 0 or last:  # .item() waits for the GPU: only now and then
            self.check()
            self.log.log(step, loss=out.loss.item(), lr=out.lr, grad_norm=out.grad_norm.item(), tokens=self.run.tokens,
                         **{k: v.item() for k, v in out.metrics.items()})
        if self.validate and args.eval_interval and (done % args.eval_interval == 0 or last):
            self.log.log(step, val_loss=self.validate())
        self.stopping = self.stop.requested(self.world)
        every = args.save_interval
        if self.stopping or (every and done % every == 0 and not last):
            self.check()
            self.last_saved = self.save(done)
        return self.stopping or self.out_of_time

    def finish(self) -> None:
        """After the loop: the final save (unless stopped early), then leave the process group."""
        self.log.close()
        if self.stopping:
            if self.run.rt.main:
                hint = "; continue with the same command plus --from_resume 1" if self.resumable else ""
                print(f"stopped by {self.stop.signal} after step {self.done}/{self.steps}: saved {self.last_saved}"
                      f"{hint}")
        else:
            if self.out_of_time and self.run.rt.main:
                print(f"time budget: {self.args.time_budget:g} min used after step {self.done}/{self.steps} "
                      f"(last LR {self.last_lr:.3g}, the floor is "
                      f"{self.args.learning_rate * self.args.min_lr_ratio:.3g})")
            self.check()
            self.final()
            self.log.plot()  # loss curve PNG beside metrics.jsonl (when matplotlib is installed)
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on held-out data
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(run: RunState, batches: list, loss_fn=lm_loss, per_token: bool = True) -> float:
    """Mean held-out loss: per supervised token (batch = (inputs, targets, ...), loss = mean over its tokens),
    or per batch (per_token=False, e.g. DPO).

    Ranks split the batches when they divide evenly (every rank must run the same number of forwards: FSDP),
    otherwise each rank evaluates all of them.
    """
    model, rt = run.model, run.rt
    split = rt.world > 1 and len(batches) % rt.world == 0
    mine = batches[rt.rank::rt.world] if split else batches
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for batch in mine:
        batch = tuple(t.to(rt.device, non_blocking=True) for t in batch)
        with autocast(rt.device, rt.dtype):
            loss = loss_fn(model, batch)[0]
        weight = (batch[1] != IGNORE).sum() if per_token else torch.ones((), device=rt.device)
        total += torch.stack([loss.double() * weight, weight.double()])
    model.train(was_training)
    if split:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()
