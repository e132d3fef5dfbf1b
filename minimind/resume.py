"""Training checkpoints and exact resume: everything `--from_resume 1` needs to continue a run where it stopped.

A run is a pure function of (flags, data, step): batches are addressed by (epoch, step, micro) (data.Sampler), the
LR by step (train.lr_at). So a checkpoint needs the step, the weights, the optimizer and the random streams, and a
resumed run computes the very same numbers as one never stopped: bit-identical weights on CPU.
RunState bundles what a checkpoint captures, so the functions here (and train.py's step) take one argument.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import (atomic_dir, is_fsdp, load_state_dict, load_weights_into, retie, save_model,
                         state_dict_for_save, unwrap, write_model_files)
from .errors import CheckpointError, UsageError
from .runtime import Runtime, control_barrier, gather_to_rank0
from .tokenizer import Tokenizer


@dataclass
class RunState:
    """One training run: flags, where it runs, and everything a checkpoint saves and restores."""
    args: argparse.Namespace
    rt: Runtime
    model: torch.nn.Module          # possibly wrapped: DDP, FSDP, torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tokenizer: Tokenizer
    sampler: object = None          # data.Sampler: the batch layout, mapped onto the data position on resume
    fingerprint: dict | None = None  # run_fingerprint(): what must not change between a checkpoint and a resume
    tokens: int = 0                  # input positions trained on so far, all ranks (metrics.jsonl's `tokens`)


# ---------------------------------------------------------------------------------------------------------------
# On disk
# ---------------------------------------------------------------------------------------------------------------
# OUT_DIR/checkpoints/step_000120/ is a complete model directory (load_model and eval_model.py read it) plus:
#   optimizer.pt        optimizer and loss-scaler state (torch.save; loaded with weights_only=True)
#   rng.pt              every random stream (python, numpy, torch CPU, CUDA) of every rank
#   trainer_state.json  step, epoch, samples and tokens consumed, batch layout and the run's fingerprint
#                       (human-readable)
# Each one is written into a temp dir and renamed (atomic_dir): a crash mid-save leaves the previous ones intact.
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CHECKPOINTS, f"step_{step:06d}")


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints under out_dir/checkpoints, oldest first (temp dirs of an interrupted save are skipped)."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _STEP_DIR.match(name)) and os.path.isfile(os.path.join(root, name, "trainer_state.json"))]
    return [path for _, path in sorted(found)]


def _fsync_tree(path: str) -> None:
    """Flush files to disk before the rename, so a power cut cannot leave a renamed but empty checkpoint."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _debug_stall(step: int) -> None:
    """Test hook: MINIMIND_DEBUG_SAVE_STALL='STEP:SECONDS' sleeps inside the temp dir of checkpoint STEP, before
    the rename, so a test can kill the writer mid-save (tests/test_engine.py). Not for normal use."""
    hook = os.environ.get("MINIMIND_DEBUG_SAVE_STALL")
    if hook and int(hook.split(":")[0]) == step:
        time.sleep(float(hook.split(":")[1]))


def save_training_checkpoint(out_dir: str, step: int, config, model_state: dict,
                             tokenizer: Tokenizer | None, optimizer_state: dict, rng_states: list,
                             trainer_state: dict, keep: int = 2) -> str:
    """Write OUT_DIR/checkpoints/step_N atomically, then delete all but the newest `keep`. Returns its path."""
    path = checkpoint_path(out_dir, step)
    with atomic_dir(path) as tmp:
        write_model_files(tmp, config, model_state, tokenizer)
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_states, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2, ensure_ascii=False)
        _fsync_tree(tmp)
        _debug_stall(step)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_checkpoint(path: str) -> dict:
    """{'state': trainer_state.json, 'model': tensors, 'optimizer': ..., 'rng': [per-rank states]}; one-line errors."""
    out = {}
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            out["state"] = json.load(f)
        out["model"] = load_state_dict(path)
        for name in ("optimizer", "rng"):
            out[name] = torch.load(os.path.join(path, f"{name}.pt"), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # missing file, truncated pickle, bad JSON: say which checkpoint and why
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to resume from "
                              f"the one before") from None
    return out


def clean_partial_checkpoints(out_dir: str) -> int:
    """Remove temp dirs left by a save that was killed before its rename. Returns how many were removed."""
    root = os.path.join(out_dir, CHECKPOINTS)
    stale = [n for n in (os.listdir(root) if os.path.isdir(root) else [])
             if n.startswith(".step_") and (".tmp-" in n or ".old-" in n)]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return len(stale)


# ---------------------------------------------------------------------------------------------------------------
# What must match, and the random streams
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Gathering the state (every rank calls these: under FSDP gathering the shards is a collective)
# ---------------------------------------------------------------------------------------------------------------
def model_state_dict(model, rank: int = 0) -> dict:
    """Full (unsharded) weights on the CPU, HF names, for rank 0 ({} elsewhere)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Save, resume, and the finished model
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(run: RunState, step: int) -> str:
    """Write OUT_DIR/checkpoints/step_N (all ranks call this; rank 0 writes). Returns its path."""
    args, rt, sampler = run.args, run.rt, run.sampler
    weights = model_state_dict(run.model, rt.rank)
    optim = {"optimizer": optimizer_state_dict(run.model, run.optimizer, rt.rank), "scaler": run.scaler.state_dict()}
    rngs = gather_to_rank0(rng_state(), rt.world)
    path = checkpoint_path(args.out_dir, step)
    if rt.main:
        per_step = sampler.b * sampler.accum * sampler.world
        state = {"step": step, "epoch": step // sampler.steps_per_epoch,
                 "samples_into_epoch": (step % sampler.steps_per_epoch) * per_step,
                 "steps_per_epoch": sampler.steps_per_epoch, "samples_per_step": per_step, "world_size": rt.world,
                 "tokens": run.tokens, "fingerprint": run.fingerprint, "flags": {k: v for k, v in vars(args).items()
                                                           if isinstance(v, (int, float, str, bool, type(None)))},
                 "torch_version": torch.__version__, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        save_training_checkpoint(args.out_dir, step, unwrap(run.model).config, weights, run.tokenizer, optim, rngs,
                                 state, keep=args.keep_checkpoints)
    control_barrier()  # nobody reads or prunes checkpoints while rank 0 still writes
    return path


def resume(run: RunState) -> int:
    """The step to start at: 0 for a fresh run; with --from_resume 1, the newest checkpoint's step, after loading
    its weights, optimizer, scaler and random streams into this run (refused if it belongs to another run)."""
    args, rt, model, optimizer, sampler = run.args, run.rt, run.model, run.optimizer, run.sampler
    if rt.main:
        clean_partial_checkpoints(args.out_dir)  # temp dirs of a save that was killed before its rename
    control_barrier()
    found = list_checkpoints(args.out_dir)
    if not args.from_resume:
        if found:
            raise UsageError(f"{os.path.dirname(found[-1])} holds checkpoints of an earlier run (newest "
                             f"{os.path.basename(found[-1])}): continue it with --from_resume 1, or delete that "
                             f"folder (or pick another --out_dir) to start over")
        return 0
    if not found:
        if rt.main:
            print(f"resume: no checkpoint in {os.path.join(args.out_dir, CHECKPOINTS)}: starting from step 0")
        return 0
    path = found[-1]
    ck = load_training_checkpoint(path)
    state = ck["state"]
    check_fingerprint(state["fingerprint"], run.fingerprint, path)
    if rt.main:
        for k in SOFT:
            old, new = state.get("flags", {}).get(k), getattr(args, k, None)
            if old is not None and old != new:
                print(f"resume: note: --{k} was {old}, now {new} (allowed; the run will differ from an "
                      f"uninterrupted one)")

    # Weights and optimizer state into the (possibly wrapped / sharded) model.
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(unwrap(model), retie(ck["model"], unwrap(model).config), options=opts)
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
    if run.scaler.is_enabled() and ck["optimizer"]["scaler"]:
        run.scaler.load_state_dict(ck["optimizer"]["scaler"])
    rngs = ck["rng"]
    set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
    run.tokens = state.get("tokens", 0)   # the count goes on (checkpoints from before it was saved: from 0)

    # The data cursor: same layout -> the same step; another rank count or batch -> the same number of samples.
    step, per_step_now = state["step"], sampler.b * sampler.accum * sampler.world
    epoch, into = step // state["steps_per_epoch"], state["samples_into_epoch"]
    start = epoch * sampler.steps_per_epoch + into // per_step_now
    if rt.main:
        print(f"resume: {path} (step {step}, epoch {epoch})")
        if per_step_now != state["samples_per_step"] or rt.world != state["world_size"]:
            redo = into % per_step_now
            print(f"resume: cursor mapped: {state['world_size']} rank(s) x {state['samples_per_step']} samples/step, "
                  f"step {step} = {into} samples into epoch {epoch} -> {rt.world} rank(s) x {per_step_now} "
                  f"samples/step: step {start}" + (f" ({redo} samples of that step are seen again)" if redo else "")
                  + ("; random streams of ranks beyond the checkpoint's reuse rank 0's" if rt.world > len(rngs)
                     else ""))
    return start


def save_final_model(run: RunState) -> None:
    """The finished model to OUT_DIR (keeps its checkpoints/ and metrics.jsonl). Every rank calls it (FSDP)."""
    weights = model_state_dict(run.model, run.rt.rank)
    if run.rt.main:
        save_model(run.model, run.tokenizer, run.args.out_dir, state_dict=weights)
        print(f"saved {run.args.out_dir}")
