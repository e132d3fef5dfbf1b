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
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import MiniMindForCausalLM
from .tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and tensor/key."""


def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    """The transformers class whose maths equals ours for this config: (architecture, model_type)."""
    if config.use_moe:
        return "Qwen3MoeForCausalLM", "qwen3_moe"
    if config.qk_norm:
        return "Qwen3ForCausalLM", "qwen3"
    if config.attention_bias:
        return "Qwen2ForCausalLM", "qwen2"
    return "LlamaForCausalLM", "llama"


def config_json(config: ModelConfig) -> dict:
    arch, model_type = hf_architecture(config)
    d = config.to_dict()
    d.update(architectures=[arch], model_type=model_type, hidden_act="silu", use_cache=True)
    return d


def atomic_dir(target: str):
    """Context manager: yields a temp dir; on success it replaces `target` (old contents removed)."""
    class _Atomic:
        def __enter__(self):
            parent = os.path.dirname(os.path.abspath(target)) or "."
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(self.tmp))
                os.rmdir(old)
                os.replace(target, old)
            os.replace(self.tmp, target)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return False
    return _Atomic()


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


def save_model(model: torch.nn.Module, tokenizer: Tokenizer | None, out_dir: str, extra_files: dict | None = None):
    """Write a complete model directory atomically. extra_files: {name: dict} saved as JSON beside it."""
    model = unwrap(model)
    cfg = model.config
    with atomic_dir(out_dir) as tmp:
        sd = state_dict_for_save(model)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        d = config_json(cfg)
        d["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": [cfg.eos_token_id, cfg.pad_token_id],
                       "pad_token_id": cfg.pad_token_id, "do_sample": False}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)


def load_config(path: str) -> ModelConfig:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json (is this a model directory written by a train_*.py?)")
    with open(file, encoding="utf-8") as f:
        try:
            return ModelConfig.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: {e}") from None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no model.safetensors")
    with safe_open(file, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


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


def load_model(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> MiniMindForCausalLM:
    """Build the model a directory describes and load its weights."""
    config = load_config(path)
    model = MiniMindForCausalLM(config)
    load_weights_into(model, load_state_dict(path), os.path.join(path, "model.safetensors"))
    return model.to(device=device, dtype=dtype)
