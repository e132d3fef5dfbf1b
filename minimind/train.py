"""The plain functions every train_*.py shares: flags, device and precision, DDP, model, optimizer, LR, logging.

No trainer class: each script keeps its own loop, top to bottom, and calls these.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import load_model, unwrap
from .cli import UsageError
from .config import PRESETS, preset
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
    g.add_argument("--num_workers", type=int, default=1, help="background threads preparing batches (0 = inline)")
    g = p.add_argument_group("model (used when starting from scratch)")
    g.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size preset")
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
    g.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="1 = torch.compile the model")
    g = p.add_argument_group("logging and saving")
    g.add_argument("--log_interval", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--save_interval", type=int, default=0, help="also save the model every N steps (0 = at end)")
    g.add_argument("--use_swanlab", type=int, default=0, choices=[0, 1],
                   help="1 = log to swanlab (offline mode, no network; `swanlab sync` uploads later)")
    g.add_argument("--swanlab_project", default="minimind", help="swanlab project name")


# ---------------------------------------------------------------------------------------------------------------
# Device, precision, distributed
# ---------------------------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size). Under torchrun, joins the process group; otherwise (0, 0, 1)."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


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
        return torch.bfloat16  # measured: bf16 matmul runs ~2.5x fp32 on recent x86 CPUs (dev/LOG.md)
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


def is_main(rank: int) -> bool:
    return rank == 0


# ---------------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------------------------
def build_model(args, vocab_size: int) -> MiniMindForCausalLM:
    """Load --from_weight, or build a fresh model from --preset and the size overrides."""
    if args.from_weight and args.from_weight != "none":
        return load_model(args.from_weight)
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


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                        betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms' gains and biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"  # one kernel for all parameters instead of one per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step: int, total: int, warmup: int, max_lr: float, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from max_lr to max_lr * min_ratio at the last step."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
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
    return norm


def no_sync_unless(model, sync: bool):
    """Under DDP, skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model, optimizer, scaler, micro_batches, device, dtype, grad_clip: float, loss_fn=None):
    """One optimizer step over a list of micro-batches (gradient accumulation). Returns (last loss, grad norm).

    loss_fn(model, batch) -> loss; the default is next-token loss on batch = (inputs, targets).
    Each micro-batch's loss is divided by their count, so the summed gradient is the mean over micro-batches.
    """
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        with no_sync_unless(model, i == n - 1):
            with autocast(device, dtype):
                loss = loss_fn(model, batch) if loss_fn else model(batch[0], targets=batch[1])
            scaler.scale(loss / n).backward()
    return loss.detach(), optimizer_step(model, optimizer, scaler, grad_clip)


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int) -> int:
    n = steps_per_epoch * epochs
    return min(n, max_steps) if max_steps > 0 else n


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
        if self.tokens_per_step and step > self.last[1]:
            metrics["tokens_per_s"] = round(self.tokens_per_step * (step - self.last[1]) / (now - self.last[0]))
        self.last = (now, step)
        metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()},
                             refresh=False)
        self.file.write(json.dumps({"step": step, "time": round(time.perf_counter() - self.t0, 3), **metrics}) + "\n")
        self.file.flush()
        if self.swan is not None:
            import swanlab
            swanlab.log(metrics, step=step)

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
