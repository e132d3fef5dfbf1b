"""The plain functions every train_*.py shares: flags, device and precision, DDP, model, optimizer, LR, logging.

No trainer class: each script keeps its own loop, top to bottom, and calls these.
Sections: flags -> device/precision/distributed -> model and optimizer -> the step -> faults (NaN, signals) ->
checkpoints and exact resume -> evaluation -> logging.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import (CheckpointError, checkpoint_path, clean_partial_checkpoints, list_checkpoints,
                         load_config, load_model, load_training_checkpoint, load_weights_into, save_model,
                         save_training_checkpoint, state_dict_for_save, unwrap)
from .cli import UsageError
from .config import PRESETS, preset
from .loss import IGNORE
from .model import MiniMindForCausalLM


# ---------------------------------------------------------------------------------------------------------------
# Flags (MiniMind's names where they exist, so its tutorials still apply)
# ---------------------------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser, *, data_path: str, out_dir: str, from_weight: str, epochs: int,
                    batch_size: int, learning_rate: float, max_seq_len: int) -> None:
    g = p.add_argument_group("data and output")
    g.add_argument("--data_path", default=data_path, help="JSONL training file (MiniMind format)")
    g.add_argument("--out_dir", default=out_dir, help="output model directory (config.json, model.safetensors, tokenizer)")
    g.add_argument("--from_weight", default=from_weight,
                   help="model directory to start from ('none' = random init from --preset)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, used when --from_weight is 'none' (default: the bundled one)")
    g.add_argument("--num_workers", type=int, default=1,
                   help="accepted for MiniMind compatibility: batches are cheap memmap slices, built ahead by one "
                        "background thread whatever this says (more workers measured no faster, dev/LOG.md)")
    g = p.add_argument_group("model (used when starting from scratch)")
    g.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size preset")
    g.add_argument("--config", default=None, help="config.json giving the whole shape instead of --preset: ours, "
                   "a transformers one (Qwen3, Qwen3-MoE, Qwen2, Llama) or MiniMind's")
    g.add_argument("--hidden_size", type=int, default=None, help="override the preset's hidden size")
    g.add_argument("--num_hidden_layers", type=int, default=None, help="override the preset's layer count")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="1 = mixture-of-experts MLPs")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the data")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="micro-batch size per device")
    g.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_seq_len", type=int, default=max_seq_len, help="tokens per training sequence")
    g.add_argument("--learning_rate", type=float, default=learning_rate, help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to learning_rate * this")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, default=42, help="random seed (init, shuffling, dropout)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast precision (auto: bfloat16 where supported, else float16 on GPU / float32)")
    g.add_argument("--use_compile", type=int, default=0, choices=[0, 1],
                   help="1 = torch.compile the model (fuses small ops; measured 1.1-1.4x on a 2-core CPU at 30M after "
                        "~1 minute of compiling)")
    g.add_argument("--grad_checkpointing", type=int, default=0, choices=[0, 1],
                   help="1 = recompute each block's activations during backward: much less memory, ~1/3 more compute")
    g.add_argument("--fsdp", type=int, default=0, choices=[0, 1],
                   help="1 = under torchrun, shard parameters, gradients and optimizer state across ranks "
                        "(PyTorch fully_shard) instead of replicating them (DDP): for models that do not fit one GPU")
    g.add_argument("--num_threads", type=int, default=0,
                   help="CPU threads for math (0 = PyTorch's default: one per core). On a CPU shared with other "
                        "programs, also export OMP_WAIT_POLICY=PASSIVE (dev/LOG.md)")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log_interval", type=int, default=10,
                   help="log every N optimizer steps (reading the loss waits for the GPU, so not every step)")
    g.add_argument("--eval_interval", type=int, default=0,
                   help="compute the loss on held-out data every N steps and at the end (0 = never; then no data "
                        "is held out)")
    g.add_argument("--val_ratio", type=float, default=0.02,
                   help="share of the data held out for --eval_interval (the last windows / examples)")
    g.add_argument("--eval_iters", type=int, default=20, help="held-out batches per evaluation (at most)")
    g.add_argument("--save_interval", type=int, default=0,
                   help="write a resumable checkpoint to OUT_DIR/checkpoints/step_N every N steps (0 = none; one "
                        "is also written on SIGTERM/Ctrl-C; the final model always goes to OUT_DIR)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="keep only the newest K checkpoints (0 = all)")
    g.add_argument("--from_resume", type=int, default=0, choices=[0, 1],
                   help="1 = continue from the newest checkpoint in OUT_DIR/checkpoints (weights, optimizer, "
                        "random streams, data position: the run continues as if never stopped); a fresh start if "
                        "there is none")
    g.add_argument("--use_swanlab", type=int, default=0, choices=[0, 1],
                   help="1 = log to swanlab (offline mode, no network; `swanlab sync` uploads later)")
    g.add_argument("--swanlab_project", default="minimind", help="swanlab project name")
    g.add_argument("--debug_nan_at_step", type=int, default=-1,
                   help="testing only: make the loss NaN at this step, to exercise the non-finite guard")


# ---------------------------------------------------------------------------------------------------------------
# Device, precision, distributed
# ---------------------------------------------------------------------------------------------------------------
_CONTROL_GROUP = None  # a CPU (gloo) process group for small control messages: no GPU sync needed


def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size). Under torchrun, joins the process group; otherwise (0, 0, 1)."""
    global _CONTROL_GROUP
    if "RANK" not in os.environ:
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # NCCL needs each process on its own GPU before the first collective
        dist.init_process_group("nccl")
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        _CONTROL_GROUP = dist.group.WORLD
    return dist.get_rank(), local_rank, dist.get_world_size()


def cleanup_distributed() -> None:
    """Leave the process group together: a rank that tears its connections down while a peer is still finishing
    (e.g. rank 0 saving the final model) can make that peer's gloo thread abort."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_hardware(device: torch.device, num_threads: int = 0) -> None:
    """Fast maths settings: TF32 for fp32 matmuls on Ampere+ GPUs (10 mantissa bits, plenty for training)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype. bf16 keeps fp32's range, so it needs no loss scaling; fp16 (old GPUs) does."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16  # measured: a whole step runs 1.6x fp32 on an avx512_bf16 CPU (dev/LOG.md)
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(unwrap(model), FSDPModule)


def prepare_model(model: torch.nn.Module, args, device: torch.device, world: int, local_rank: int,
                  dynamic: bool | None = None):
    """Activation checkpointing -> FSDP sharding -> torch.compile -> DDP, as the flags ask. Build the optimizer
    AFTER this: fully_shard replaces parameters by sharded ones. dynamic: torch.compile's (True when batch
    shapes vary, e.g. padded SFT batches)."""
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    if args.fsdp and world > 1:
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
    if world > 1 and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                          else None)
    return model


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                        betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms' gains and biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step updates every parameter (instead of several passes over each tensor): on GPU it
    # saves launches; on CPU it measured 5.8x faster than foreach for a 24M-parameter AdamW step (dev/LOG.md).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step: int, total: int, warmup: int, max_lr: float, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from max_lr to max_lr * min_ratio at the last step."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)  # the last step (total - 1) lands on the floor
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def optimizer_step(model, optimizer, scaler, grad_clip: float) -> torch.Tensor:
    """Unscale (fp16), clip, step, zero. Returns the pre-clip gradient norm (a tensor: no host sync here)."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(norm, "full_tensor"):  # FSDP: the norm is a replicated DTensor; a plain tensor is easier to use
        norm = norm.full_tensor()
    return norm


def no_sync_unless(model, sync: bool):
    """Under DDP, skip the gradient all-reduce on all but the last micro-step of an accumulation.

    (FSDP keeps reduce-scattering every micro-step: skipping would hold whole, unsharded gradients in memory,
    which is what FSDP is there to avoid.)"""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model, optimizer, scaler, micro_batches, device, dtype, grad_clip: float, loss_fn=None,
               poison: bool = False):
    """One optimizer step over a list of micro-batches (gradient accumulation). Returns (mean loss, grad norm).

    loss_fn(model, batch) -> loss; the default is next-token loss on batch = (inputs, targets).
    Each micro-batch's loss is divided by their count, so the summed gradient is the mean over micro-batches.
    Both results stay on the device (no host sync): read them with .item() only when logging.
    poison: testing only (--debug_nan_at_step): make this step's loss NaN.
    """
    n = len(micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        with no_sync_unless(model, i == n - 1):
            with autocast(device, dtype):
                loss = loss_fn(model, batch) if loss_fn else model(batch[0], targets=batch[1])
            if poison and i == 0:
                loss = loss * float("nan")
            scaler.scale(loss / n).backward()
        total = total + loss.detach()
    return total / n, optimizer_step(model, optimizer, scaler, grad_clip)


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int) -> int:
    n = steps_per_epoch * epochs
    return min(n, max_steps) if max_steps > 0 else n


# ---------------------------------------------------------------------------------------------------------------
# Faults: a diverging run, and a machine that asks us to stop
# ---------------------------------------------------------------------------------------------------------------
class TrainingError(UsageError):
    """The run cannot go on (e.g. the loss became NaN). Printed as one `error: ...` line, exit status 2."""


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
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
            flag = bool(t.item())
            self.signal = self.signal or ("SIGTERM" if flag else None)
        return flag


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ---------------------------------------------------------------------------------------------------------------
# A run is a pure function of (flags, data, step): batches are addressed by (epoch, step, micro) (data.Sampler), the
# LR by step (lr_at). So a checkpoint needs the step, the weights, the optimizer and the random streams, and a
# resumed run computes the very same numbers as one never stopped: bit-identical weights on CPU.
STRICT = ("stage", "model", "tokenizer", "data", "max_seq_len", "seed", "train_samples")   # refuse if different
SOFT = ("learning_rate", "min_lr_ratio", "warmup_iters", "weight_decay", "grad_clip", "epochs", "max_steps",
        "dtype", "batch_size", "accumulation_steps")                                   # allowed, with a note


def run_fingerprint(stage: str, config, tokenizer, args, train_samples: int) -> dict:
    """What must not change between a checkpoint and the run resuming it (compared key by key)."""
    st = os.stat(args.data_path)
    fp = {"stage": stage, "model": config.to_dict(), "tokenizer": tokenizer.fingerprint(),
          "data": {"path": os.path.abspath(args.data_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
          "max_seq_len": args.max_seq_len, "seed": args.seed, "train_samples": train_samples}
    return json.loads(json.dumps(fp))  # the JSON form, as stored in trainer_state.json


def check_fingerprint(saved: dict, now: dict, path: str) -> None:
    """Raise CheckpointError with a one-line reason if the checkpoint belongs to a different run."""
    names = {"stage": "training stage", "model": "model config", "tokenizer": "tokenizer", "data": "data file",
             "max_seq_len": "--max_seq_len", "seed": "--seed", "train_samples": "number of training samples "
             "(--val_ratio / --eval_interval or the data changed)"}
    for key in STRICT:
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = next(k for k in [*a, *b] if a.get(k) != b.get(k))  # the first differing field, in order
            detail = f"{diff}: {a.get(diff)!r} in the checkpoint, {b.get(diff)!r} now"
        else:
            detail = f"{a!r} in the checkpoint, {b!r} now"
        raise CheckpointError(f"{path}: cannot resume: the {names[key]} differs ({detail}); resume with the same "
                              f"settings, or start a new run with another --out_dir")


def _numpy_rng_to_torch(state):
    name, keys, pos, has_gauss, gauss = state
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loads with weights_only=True


def rng_state() -> dict:
    """Every random stream of this process."""
    s = {"python": random.getstate(), "numpy": _numpy_rng_to_torch(np.random.get_state()),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _gather_to_rank0(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_CONTROL_GROUP)
    return out


def model_state_dict(model, rank: int = 0) -> dict:
    """Full (unsharded) weights on the CPU, HF names, for rank 0 ({} elsewhere). Every rank calls it: under FSDP
    gathering the shards is a collective."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.cpu() for k, v in state_dict_for_save(model).items()} if rank == 0 else {}


def optimizer_state_dict(model, optimizer, rank: int = 0) -> dict:
    """The optimizer's state for rank 0 ({} elsewhere); under FSDP gathered from all ranks, keyed by name."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict() if rank == 0 else {}


def save_checkpoint(args, step: int, model, optimizer, scaler, tokenizer, sampler, fingerprint: dict,
                    rank: int, world: int) -> str:
    """Write OUT_DIR/checkpoints/step_N (all ranks call this; rank 0 writes). Returns its path."""
    weights = model_state_dict(model, rank)
    optim = {"optimizer": optimizer_state_dict(model, optimizer, rank), "scaler": scaler.state_dict()}
    rngs = _gather_to_rank0(rng_state(), world)
    path = checkpoint_path(args.out_dir, step)
    if rank == 0:
        per_step = sampler.b * sampler.accum * sampler.world
        state = {"step": step, "epoch": step // sampler.steps_per_epoch,
                 "samples_into_epoch": (step % sampler.steps_per_epoch) * per_step,
                 "steps_per_epoch": sampler.steps_per_epoch, "samples_per_step": per_step, "world_size": world,
                 "fingerprint": fingerprint, "flags": {k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool, type(None)))},
                 "torch_version": torch.__version__, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        save_training_checkpoint(args.out_dir, step, unwrap(model).config, weights, tokenizer, optim, rngs, state,
                                 keep=args.keep_checkpoints)
    if world > 1:
        dist.barrier(group=_CONTROL_GROUP)  # nobody reads or prunes checkpoints while rank 0 still writes
    return path


def resume(args, model, optimizer, scaler, sampler, fingerprint: dict, rank: int, world: int) -> int:
    """The step to start at: 0 for a fresh run; with --from_resume 1, the newest checkpoint's step, after loading
    its weights, optimizer, scaler and random streams into this run (refused if it belongs to another run)."""
    if rank == 0:
        clean_partial_checkpoints(args.out_dir)  # temp dirs of a save that was killed before its rename
    if world > 1:
        dist.barrier(group=_CONTROL_GROUP)
    found = list_checkpoints(args.out_dir)
    if not args.from_resume:
        if found:
            raise UsageError(f"{os.path.dirname(found[-1])} holds checkpoints of an earlier run (newest "
                             f"{os.path.basename(found[-1])}): continue it with --from_resume 1, or delete that "
                             f"folder (or pick another --out_dir) to start over")
        return 0
    if not found:
        if rank == 0:
            print(f"resume: no checkpoint in {os.path.join(args.out_dir, 'checkpoints')}: starting from step 0")
        return 0
    path = found[-1]
    ck = load_training_checkpoint(path)
    state = ck["state"]
    check_fingerprint(state["fingerprint"], fingerprint, path)
    if rank == 0:
        for k in SOFT:
            old, new = state.get("flags", {}).get(k), getattr(args, k, None)
            if old is not None and old != new:
                print(f"resume: note: --{k} was {old}, now {new} (allowed; the run will differ from an "
                      f"uninterrupted one)")

    # Weights and optimizer state into the (possibly wrapped / sharded) model.
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        weights = dict(ck["model"])
        if unwrap(model).config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(unwrap(model), weights, options=opts)
        set_optimizer_state_dict(unwrap(model), optimizer, ck["optimizer"]["optimizer"], options=opts)
    else:
        load_weights_into(unwrap(model), ck["model"], os.path.join(path, "model.safetensors"))
        try:
            optimizer.load_state_dict(ck["optimizer"]["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}/optimizer.pt: does not fit this optimizer ({e})") from None
    # load_state_dict restores the saved hyper-parameters too; a changed --weight_decay (allowed) must win.
    for group in optimizer.param_groups:
        if group["weight_decay"]:
            group["weight_decay"] = args.weight_decay
    if scaler.is_enabled() and ck["optimizer"]["scaler"]:
        scaler.load_state_dict(ck["optimizer"]["scaler"])
    rngs = ck["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])

    # The data cursor: same layout -> the same step; another rank count or batch -> the same number of samples.
    step, per_step_now = state["step"], sampler.b * sampler.accum * sampler.world
    epoch, into = step // state["steps_per_epoch"], state["samples_into_epoch"]
    start = epoch * sampler.steps_per_epoch + into // per_step_now
    if rank == 0:
        print(f"resume: {path} (step {step}, epoch {epoch})")
        if per_step_now != state["samples_per_step"] or world != state["world_size"]:
            redo = into % per_step_now
            print(f"resume: cursor mapped: {state['world_size']} rank(s) x {state['samples_per_step']} samples/step, "
                  f"step {step} = {into} samples into epoch {epoch} -> {world} rank(s) x {per_step_now} "
                  f"samples/step: step {start}" + (f" ({redo} samples of that step are seen again)" if redo else "")
                  + ("; random streams of ranks beyond the checkpoint's reuse rank 0's" if world > len(rngs) else ""))
    return start


def save_final_model(model, tokenizer, out_dir: str, rank: int) -> None:
    """The finished model to OUT_DIR (keeps its checkpoints/ and metrics.jsonl). Every rank calls it (FSDP)."""
    weights = model_state_dict(model, rank)
    if rank == 0:
        save_model(model, tokenizer, out_dir, state_dict=weights)
        print(f"saved {out_dir}")


class RunControl:
    """What every training loop does besides learning, in one place: stop before saving a non-finite model
    (FiniteGuard), save and exit on SIGTERM/Ctrl-C (StopRequest), checkpoint every --save_interval steps, and
    the final save. The loop itself stays in each script: record() after each optimizer step, check() before
    logging, step_done() at the end of the step, finish() after the loop.

    save(done) writes a checkpoint and returns its path; final() writes the finished model. Both default to
    the full-model versions (save_checkpoint / save_final_model); LoRA passes adapter writers.
    """

    def __init__(self, args, device, scaler, rank: int, world: int, save, final, resumable: bool = True):
        self.guard = FiniteGuard(device, check_grad=not scaler.is_enabled())  # inf/NaN: nothing bad is saved
        self.stop = StopRequest()                                               # SIGTERM/Ctrl-C: save, then exit
        self.args, self.rank, self.world = args, rank, world
        self.save, self.final, self.resumable = save, final, resumable
        self.last_saved, self.stopping = None, False

    def check(self) -> None:
        """Stop with a one-line error if any step so far was non-finite (a host sync: call it only at log time)."""
        self.guard.check(self.world, self.last_saved, self.resumable)

    def record(self, step: int, loss, grad_norm) -> None:
        """Remember whether this step was finite (on the device: no host sync)."""
        self.guard.update(step, loss, grad_norm)

    def step_done(self, done: int, steps: int) -> bool:
        """Checkpoint when due or when asked to stop. True = leave the loop now."""
        self.stopping = self.stop.requested(self.world)
        every = self.args.save_interval
        if self.stopping or (every and done % every == 0 and done < steps):
            self.check()
            self.last_saved = self.save(done)
        return self.stopping

    def finish(self, done: int, steps: int) -> None:
        """After the loop: the final save (unless stopped early), then leave the process group."""
        if self.stopping:
            if self.rank == 0:
                hint = "; continue with the same command plus --from_resume 1" if self.resumable else ""
                print(f"stopped by {self.stop.signal} after step {done}/{steps}: saved {self.last_saved}{hint}")
        else:
            self.check()
            self.final()
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on held-out data
# ---------------------------------------------------------------------------------------------------------------
def holdout(n: int, val_ratio: float, enabled: bool, min_val: int = 1) -> int:
    """How many of n samples to hold out for validation (the last ones). 0 when evaluation is off."""
    if not enabled:
        return 0
    if not 0 < val_ratio < 1:
        raise UsageError(f"--val_ratio {val_ratio}: must be between 0 and 1")
    n_val = max(min_val, int(n * val_ratio))
    if n - n_val < 1:
        raise UsageError(f"--val_ratio {val_ratio}: only {n} samples, nothing left to train on")
    return n_val


@torch.no_grad()
def evaluate(model, batches: list, device, dtype, loss_fn=None, world: int = 1, rank: int = 0,
             per_token: bool = True) -> float:
    """Mean held-out loss: per supervised token (batch = (inputs, targets, ...), loss = mean over its tokens),
    or per batch (per_token=False, e.g. DPO).

    Ranks split the batches when they divide evenly (every rank must run the same number of forwards: FSDP),
    otherwise each rank evaluates all of them.
    """
    split = world > 1 and len(batches) % world == 0
    mine = batches[rank::world] if split else batches
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in mine:
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        with autocast(device, dtype):
            loss = loss_fn(model, batch) if loss_fn else model(batch[0], targets=batch[1])
        weight = (batch[1] != IGNORE).sum() if per_token else torch.ones((), device=device)
        total += torch.stack([loss.double() * weight, weight.double()])
    model.train(was_training)
    if split:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ---------------------------------------------------------------------------------------------------------------
# Logging: one tqdm bar, a metrics.jsonl beside the model, optional swanlab
# ---------------------------------------------------------------------------------------------------------------
class RunLog:
    """Progress bar + metrics.jsonl (+ swanlab). Only rank 0 logs."""

    def __init__(self, args, total: int, start: int = 0, enabled: bool = True, desc: str = "train",
                 tokens_per_step: int = 0):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.last = (time.perf_counter(), start)  # (time, step) of the previous log line, for throughput
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, disable=not enabled)
        self.file = None
        self.swan = None
        self.postfix = {}
        if not enabled:
            return
        os.makedirs(args.out_dir, exist_ok=True)
        self.file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if getattr(args, "use_swanlab", 0):
            import swanlab  # imported lazily: most runs do not need it
            self.swan = swanlab.init(project=args.swanlab_project, experiment_name=os.path.basename(args.out_dir),
                                     config=vars(args), mode="offline",
                                     logdir=os.path.join(args.out_dir, "swanlog"))
        self.t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if "loss" in metrics:  # throughput since the previous training-loss line (evaluation lines do not count)
            if self.tokens_per_step and step > self.last[1]:
                metrics["tokens_per_s"] = round(self.tokens_per_step * (step - self.last[1]) / (now - self.last[0]))
            self.last = (now, step)
        metrics = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}  # keeps 1e-7
        self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()})
        self.bar.set_postfix(self.postfix, refresh=False)  # loss, lr, tokens/s (+ val_loss); tqdm adds the ETA
        self.file.write(json.dumps({"step": step, "time": round(time.perf_counter() - self.t0, 3), **metrics}) + "\n")
        self.file.flush()
        if self.swan is not None:
            import swanlab
            swanlab.log(metrics, step=step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # also on an error: the bar must end its line before `error: ...` is printed
        return False

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.swan is not None:
            import swanlab
            swanlab.finish()


def describe(model, args, device, dtype, rank_world=(0, 1)) -> str:
    m = unwrap(model)
    return (f"model {m.num_parameters() / 1e6:.2f}M params | device {device} | dtype "
            f"{str(dtype).replace('torch.', '')} | ranks {rank_world[1]} | out {args.out_dir}")
