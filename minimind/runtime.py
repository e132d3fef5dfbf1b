"""Where the maths runs: device, precision (for training AND inference), processes (DDP), seeds, threads.

Training and inference both import this module; it imports only errors.py, so it sits at the bottom of the graph.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import UsageError

DTYPES = ("auto", "bfloat16", "float16", "float32")


# ---------------------------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------------------------
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' = this process's CUDA GPU, else Apple's MPS, else the CPU. A named device that is absent is refused."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def pick_dtype(name: str, device: torch.device, training: bool = True) -> torch.dtype:
    """The one precision policy. 'auto' on CUDA: bf16 (fp16 on GPUs without bf16; bf16 keeps fp32's range, so it
    needs no loss scaling, fp16 does). On the CPU, training autocasts to bf16 (a whole step measured 1.6x fp32 on
    an avx512_bf16 CPU, dev/LOG.md) while inference keeps fp32 weights: the CPU's attention and small-matrix
    kernels measured fastest in fp32 for decoding (dev/LOG.md), and bf16 weights would halve the bytes read only
    where the CPU multiplies bf16 natively. For a smaller, faster CPU model see generate.quantize_int8."""
    if name not in DTYPES:
        raise UsageError(f"--dtype {name}: use {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and training:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_hardware(device: torch.device, num_threads: int = 0) -> None:
    """Fast maths settings: TF32 for fp32 matmuls on Ampere+ GPUs (10 mantissa bits, plenty for training)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Processes: one per GPU under torchrun
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


def control_barrier() -> None:
    """Wait for every rank, over the CPU control group (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier(group=_CONTROL_GROUP)


@contextlib.contextmanager
def main_first(world: int, rank: int):
    """Rank 0 runs the block first (e.g. tokenizing into the shared cache); the others wait, then run it (and
    find the cache ready). A no-op in a single process."""
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def gather_to_rank0(obj, world: int) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere); [obj] in a single process."""
    if world == 1:
        return [obj]
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_CONTROL_GROUP)
    return out


def max_over_ranks(x: float, world: int) -> float:
    """The largest x over all ranks (a CPU all-reduce over the control group): every rank then uses one value."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return float(t.item())


def all_ranks_agree(flag: bool, world: int) -> bool:
    """True if flag is True on any rank (a CPU all-reduce over the control group): every rank decides alike."""
    return bool(max_over_ranks(float(flag), world))


# ---------------------------------------------------------------------------------------------------------------
# All of it at once, for a training script's setup section
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """What a training process knows about where it runs."""
    rank: int
    local_rank: int
    world: int
    device: torch.device
    dtype: torch.dtype      # autocast precision

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


def start(device: str, dtype: str, num_threads: int = 0, seed: int = 0) -> Runtime:
    """Join torchrun's process group (if any), pick device and precision, set maths flags and seeds."""
    rank, local_rank, world = init_distributed()
    dev = pick_device(device, local_rank)
    rt = Runtime(rank, local_rank, world, dev, pick_dtype(dtype, dev, training=True))
    setup_hardware(dev, num_threads)
    seed_everything(seed)
    return rt
