"""The flags every train_*.py shares, with MiniMind's names where they exist (so its tutorials still apply).

Each script adds its own group (DPO's --beta, LoRA's --lora_rank, ...) after these.
"""
from __future__ import annotations

import argparse
import math

from .config import PRESETS, PRETRAIN_LR
from .data import REASONING
from .formats import add_format_args
from .errors import UsageError
from .optim import OPTIMIZERS, SCHEDULES
from .runtime import DTYPES


def add_common_args(p: argparse.ArgumentParser, *, data_path: str, out_dir: str, from_weight: str, epochs: int,
                    batch_size: int, learning_rate: float | None, max_seq_len: int) -> None:
    """learning_rate None: the script picks a default after parsing (pretraining: per --preset, config.pretrain_lr)."""
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
    g.add_argument("--learning_rate", type=float, default=learning_rate,
                   help="peak learning rate" + (" (default: the --preset's, minimind/config.py PRETRAIN_LR: tiny "
                                                f"{PRETRAIN_LR['tiny']:g}, larger presets {PRETRAIN_LR['26M']:g})"
                                                if learning_rate is None else ""))
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="the schedule ends at learning_rate * this")
    g.add_argument("--lr_schedule", default="cosine", choices=SCHEDULES,
                   help="after warm-up: cosine = decay all the way; wsd = warmup-stable-decay: hold the peak, then "
                        "decay linearly over the last --decay_ratio of the run (fits --time_budget)")
    g.add_argument("--decay_ratio", type=float, default=0.2, help="wsd: share of the run spent decaying")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw, or muon = Muon (orthogonalised momentum) for hidden matrices + AdamW for embeddings, "
                        "head, norms and biases (minimind/optim.py)")
    g.add_argument("--muon_lr", type=float, default=0.02,
                   help="--optimizer muon: peak LR of the hidden matrices (Keller Jordan's 0.02); it follows the "
                        "same schedule, scaled by muon_lr / learning_rate")
    g.add_argument("--time_budget", type=float, default=0,
                   help="minutes of training (0 = none): the schedule is laid out over the time, so the run stops on "
                        "its floor LR when the time is up (or at --epochs / --max_steps, if sooner)")
    g.add_argument("--batch_tokens", type=int, default=-1,
                   help="tokens per optimizer step, all ranks: sets --accumulation_steps, with --batch_size rows as "
                        "the per-device micro-batch cap. -1 (default) = pretraining counts --batch_size in documents "
                        "as MiniMind does (a micro-batch = that many documents' worth of packed windows, so MiniMind's "
                        "flags give its steps per epoch), other stages in rows; 0 = --batch_size rows everywhere")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, default=42, help="random seed (init, shuffling, dropout)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES),
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
    g.add_argument("--use_swanlab", "--use_wandb", type=int, default=0, choices=[0, 1], dest="use_swanlab",
                   help="1 = log to swanlab (--use_wandb: MiniMind's spelling of the same switch). Where it goes: "
                        "see --swanlab_mode")
    g.add_argument("--swanlab_mode", default="auto", choices=["auto", "cloud", "offline", "local"],
                   help="auto = the cloud when `swanlab login` has been run on this machine, else offline (files "
                        "in OUT_DIR/swanlog, `swanlab sync` uploads them later); local = swanlab's own local mode")
    g.add_argument("--swanlab_project", default="minimind", help="swanlab project name")
    g.add_argument("--debug_nan_at_step", type=int, default=-1,
                   help="testing only: make the loss NaN at this step, to exercise the non-finite guard")


def apply_batch_tokens(args, world: int) -> None:
    """--batch_tokens N -> rows per micro-batch and micro-batches per step (args.batch_size, .accumulation_steps).

    A step then holds ~N token positions (--max_seq_len per row, padding included), whatever the device count:
    rows = N / (max_seq_len x world), split into ceil(rows / batch_size) micro-batches of equal size."""
    n = getattr(args, "batch_tokens", 0)
    if n <= 0:   # 0: --batch_size rows; -1: the same here (train_pretrain.py turns documents into windows)
        return
    per_row = args.max_seq_len * world
    if n < per_row:
        raise UsageError(f"--batch_tokens {n}: less than one row per rank ({args.max_seq_len} tokens x {world} "
                         f"rank(s) = {per_row}); raise it or lower --max_seq_len")
    if args.accumulation_steps != 1:
        raise UsageError("--batch_tokens sets --accumulation_steps itself: drop one of the two flags")
    rows = round(n / per_row)
    args.accumulation_steps = math.ceil(rows / args.batch_size)
    args.batch_size = round(rows / args.accumulation_steps)


def add_conversation_args(p: argparse.ArgumentParser, packing: bool = True) -> None:
    """How conversations become training rows: SFT, LoRA and distillation (packing too), DPO (reasoning only);
    and which shape the file has (--format alpaca|sharegpt|columns|..., formats.py)."""
    add_format_args(p)
    g = p.add_argument_group("conversations")
    if packing:
        g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                       help="1 = pack several conversations per --max_seq_len window, attention kept inside each "
                            "(no padding waste); 0 = batches of similar length padded to the batch's longest")
    g.add_argument("--reasoning", default="keep", choices=REASONING,
                   help="assistant turns' reasoning: keep = train on it as the tokenizer's template writes it "
                        "('<think>...</think>' before the reply), drop = remove it (the reasoning_content field and "
                        "inline <think> blocks)")
