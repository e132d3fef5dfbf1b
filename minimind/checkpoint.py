"""Model directories: config.json + model.safetensors + tokenizer files, i.e. a Hugging Face-style checkpoint.

Writes are atomic: everything goes to a temp directory beside the target, which is then swapped in, so a crash
mid-save never leaves a half-written model where the old one was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time

import torch
from safetensors.torch import save_file

from . import hf
from .config import ModelConfig
from .errors import CheckpointError
from .model import MiniMindForCausalLM
from .tokenizer import Tokenizer




def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    """The transformers class whose maths equals ours for this config: (architecture, model_type). See hf.py."""
    return hf.hf_architecture(config)


def config_json(config: ModelConfig) -> dict:
    """config.json contents: the keys (and meanings) of that transformers class, nothing else (see hf.py)."""
    return hf.to_hf_config(config)


def atomic_dir(target: str, keep: tuple[str, ...] = ()):
    """Context manager: yields a temp dir; on success it replaces `target` (old contents removed).

    keep: names inside an existing `target` to carry into the new one (e.g. a run's checkpoints/ and
    metrics.jsonl beside its model files). They are hard-linked into the temp dir before the swap, so nothing is
    copied and a crash at any moment leaves either the old directory or the new one, each complete.
    """
    class _Atomic:
        def __enter__(self):
            parent = os.path.dirname(os.path.abspath(target)) or "."
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model dir should be readable like any other
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            for name in keep:
                src, dst = os.path.join(target, name), os.path.join(self.tmp, name)
                if os.path.lexists(src) and not os.path.lexists(dst):
                    _link_tree(src, dst)
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(self.tmp))
                os.rmdir(old)
                os.replace(target, old)
            os.replace(self.tmp, target)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return False
    return _Atomic()


def _link_tree(src: str, dst: str) -> None:
    """Hard-link a file or a directory tree (copy where the filesystem cannot link)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(src, dst)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors with HF names: unwraps DDP/compile, drops the tied head (safetensors stores it once)."""
    model = unwrap(model)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# What a training run keeps beside its model files in --out_dir; saving the final model must not delete them.
RUN_FILES = ("checkpoints", "metrics.jsonl", "swanlog")


def save_model(model: torch.nn.Module, tokenizer: Tokenizer | None, out_dir: str, extra_files: dict | None = None,
               state_dict: dict | None = None):
    """Write a complete model directory atomically. extra_files: {name: dict} saved as JSON beside it.

    state_dict: the tensors to save when they were gathered elsewhere (FSDP); default: the model's own.
    A run's checkpoints/, metrics.jsonl and swanlog/ already in out_dir are kept.
    """
    with atomic_dir(out_dir, keep=RUN_FILES) as tmp:
        write_model_files(tmp, unwrap(model).config, state_dict_for_save(model) if state_dict is None else state_dict,
                          tokenizer, extra_files)


def write_model_files(tmp: str, cfg: ModelConfig, sd: dict, tokenizer: Tokenizer | None = None,
                      extra_files: dict | None = None) -> None:
    """config.json + model.safetensors + generation_config.json (+ tokenizer files) into an existing directory."""
    if cfg.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # safetensors stores a shared tensor once
    sd = {**sd, **hf.export_extra_tensors(cfg, sd)}  # e.g. zero o_proj biases that the HF class expects
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    d = config_json(cfg)
    d["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, ensure_ascii=False)
    # Stop where our engine stops: the tokenizer's <|im_end|> and <|endoftext|> (by content: Qwen's ids differ).
    eos, pad = (tokenizer.eos_id, tokenizer.pad_id) if tokenizer is not None else (cfg.eos_token_id, cfg.pad_token_id)
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": [eos, pad], "pad_token_id": pad,
                   "do_sample": False}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, obj in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of a model directory (or of a config.json file): ours, transformers' or MiniMind's."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json (is this a model directory written by a train_*.py?)")
    return hf.read_config_file(file)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (model.safetensors, sharded or not, or pytorch_model.bin) or weight file,
    renamed to ours. Checking them against a config is load_weights_into's job."""
    return hf.load_checkpoint(path)[1]


def load_weights_into(model: MiniMindForCausalLM, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model; any missing, extra or mis-shaped tensor is a one-line error."""
    own = model.state_dict()
    if model.config.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)"
                                                                           if len(extra) > 1 else ""))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, "
                                  f"the config needs {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))


def load_model(path: str, device="cpu", dtype: torch.dtype | None = torch.float32,
               config: ModelConfig | None = None) -> MiniMindForCausalLM:
    """Build the model a checkpoint describes and load its weights, exactly or not at all.

    path: our model directory, a transformers one (Qwen3 / Qwen3-MoE / Qwen2 / Llama; safetensors, sharded or
    not, or pytorch_model.bin), MiniMind's transformers dir, or a MiniMind .pth state dict (its config is read
    off the tensor shapes unless `config` is given). dtype None keeps the stored dtype.
    """
    config, sd = hf.load_checkpoint(path, config)
    model = MiniMindForCausalLM(config)
    load_weights_into(model, sd, (hf.weights_file(path) or path) if os.path.isdir(path) else path)
    if dtype is None:
        dtype = getattr(torch, str(config.torch_dtype), None)
        dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: everything `--from_resume 1` needs to continue a run exactly where it stopped
# ---------------------------------------------------------------------------------------------------------------
# OUT_DIR/checkpoints/step_000120/ is a complete model directory (load_model and eval_model.py read it) plus:
#   optimizer.pt        optimizer and loss-scaler state (torch.save; loaded with weights_only=True)
#   rng.pt              every random stream (python, numpy, torch CPU, CUDA) of every rank
#   trainer_state.json  step, epoch, samples consumed, batch layout and the run's fingerprint (human-readable)
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


def save_training_checkpoint(out_dir: str, step: int, config: ModelConfig, model_state: dict,
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
