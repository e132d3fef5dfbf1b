"""Model directories: config.json + model.safetensors + tokenizer files, i.e. a Hugging Face-style checkpoint.

Writes are atomic: everything goes to a temp directory beside the target, which is then swapped in, so a crash
mid-save never leaves a half-written model where the old one was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from . import hf
from .config import ModelConfig
from .errors import CheckpointError
from .model import MiniMindForCausalLM
from .tokenizer import Tokenizer




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


# A tied head IS the embedding matrix (model.py): files store it once, under the embedding's name.
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def untie(sd: dict, config: ModelConfig) -> dict:
    """The state dict as files hold it: without lm_head.weight when the head is tied to the embedding."""
    return {k: v for k, v in sd.items() if k != HEAD} if config.tie_word_embeddings else dict(sd)


def retie(sd: dict, config: ModelConfig) -> dict:
    """The reverse of untie: the head's entry back, for loaders that expect every parameter by name (FSDP)."""
    return {**sd, HEAD: sd[EMBEDDING]} if config.tie_word_embeddings else dict(sd)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors with HF names: unwraps DDP/compile, drops the tied head (safetensors stores it once)."""
    model = unwrap(model)
    return untie({k: v.detach().contiguous() for k, v in model.state_dict().items()}, model.config)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when fully_shard split the model's parameters across ranks (saving/loading then gathers them)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(unwrap(model), FSDPModule)


# ---------------------------------------------------------------------------------------------------------------
# Reading weights: files -> one state dict with our names (hf.py renames foreign ones)
# ---------------------------------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def weights_file(path: str) -> str | None:
    """The weight file (or shard index) of a model directory, in transformers' order of preference."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a model directory or weight file: safetensors (sharded or not), pytorch_model.bin, .pth."""
    if os.path.isdir(path):
        file = weights_file(path)
        if file is None:
            raise CheckpointError(f"{path}: no model.safetensors (nor a sharded model.safetensors.index.json or "
                         f"pytorch_model.bin)")
    elif os.path.isfile(path):
        file = path
    else:
        raise CheckpointError(f"{path}: no such model directory or weight file")
    if file.endswith(".index.json"):
        return _read_sharded(file)
    return _read_one(file)


def _read_one(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(file, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    try:  # .pth / .bin: weights only, so a checkpoint cannot run code on load
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle; all mean "unreadable"
        reason = f"{type(e).__name__}: {e}".split("\n")[0]
        raise CheckpointError(f"{file}: not a readable PyTorch weight file ({reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # MiniMind's *_resume.pth
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a state dict (name -> tensor)")
    return obj


def _read_sharded(index_file: str) -> dict[str, torch.Tensor]:
    """transformers' sharded layout: the index maps each tensor name to the shard file holding it."""
    try:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a shard index with a 'weight_map' ({e})") from None
    folder, sd = os.path.dirname(index_file), {}
    for shard in sorted(set(weight_map.values())):
        shard_file = os.path.join(folder, shard)
        if not os.path.isfile(shard_file):
            raise CheckpointError(f"{index_file}: shard {shard} is missing")
        tensors = _read_one(shard_file)
        for name, where in weight_map.items():
            if where == shard:
                if name not in tensors:
                    raise CheckpointError(f"{shard_file}: missing tensor {name} (listed in "
                                          f"{os.path.basename(index_file)})")
                sd[name] = tensors[name]
    return sd


def read_checkpoint(path: str, config: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict with our names) for a model directory or a weight file (.pth/.bin/.safetensors)."""
    model_type = None
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if config is None:
            if not os.path.isfile(cfg_file):
                raise CheckpointError(f"{path}: no config.json (is this a model directory written by a train_*.py?)")
            config, model_type = hf.read_config(cfg_file)
        sd = read_weights(path)
        source = weights_file(path)
        if model_type == "minimind":  # MiniMind2 (no q/k norm) vs MiniMind-3: clearest from the tensors themselves
            config.qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in sd)
    else:
        sd = read_weights(path)
        source = path
        config = config or hf.config_from_state_dict(sd, path)
    return config, hf.to_minimind_names(sd, config, model_type, source)


# ---------------------------------------------------------------------------------------------------------------
# Writing and loading model directories
# ---------------------------------------------------------------------------------------------------------------
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
    sd = untie(sd, cfg)  # safetensors stores a shared tensor once
    sd = {**sd, **hf.export_extra_tensors(cfg, sd)}  # e.g. zero o_proj biases that the HF class expects
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    d = hf.to_hf_config(cfg)   # the keys (and meanings) of the transformers class whose maths equals ours
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
    return read_checkpoint(path)[1]


def load_weights_into(model: MiniMindForCausalLM, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model; any missing, extra or mis-shaped tensor is a one-line error."""
    own, sd = untie(model.state_dict(), model.config), untie(sd, model.config)
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
    config, sd = read_checkpoint(path, config)
    model = MiniMindForCausalLM(config)
    load_weights_into(model, sd, (weights_file(path) or path) if os.path.isdir(path) else path)
    if dtype is None:
        dtype = getattr(torch, str(config.torch_dtype), None)
        dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return model.to(device=device, dtype=dtype)
