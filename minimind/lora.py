"""LoRA (Low-Rank Adaptation, Hu et al. 2021): fine-tune a few small matrices instead of the whole model.

A frozen weight W (out x in) gets a trainable low-rank update:  y = W x + (alpha / r) * B (A x)
with A (r x in) and B (out x r), r << in, out. Only A and B learn, so gradients and AdamW state exist for them
alone (a few MB), while the big frozen W needs no gradient and no optimizer state: that is the memory win.

Init: A ~ kaiming-uniform (like any nn.Linear), B = 0. With B = 0 the update B A is exactly zero, so training
starts from the base model's outputs bit for bit; A being random makes B's first gradient (dL/dB = g (A x)^T)
non-zero, so learning starts at once. (Both zero would leave both gradients zero forever.)
Scale alpha / r: the update's size stays about the same when you change the rank, so a learning rate tuned at
one rank still works at another (only alpha needs thinking about; alpha = 2r is a common choice).

Files: an adapter directory is what Hugging Face PEFT writes, so PEFT users can load it on the transformers
twin of the base model (tests/test_lora.py checks this when peft is installed):
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
  adapter_config.json        PEFT's LoraConfig fields: peft_type, r, lora_alpha, lora_dropout, target_modules, ...
  adapter_base.json          ours (PEFT has no field for it): the base's fingerprint and config, to catch an
                             adapter being loaded on a different base model
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import RUN_FILES, atomic_dir, load_config, load_model, save_model, unwrap, weights_file
from .errors import CheckpointError, UsageError
from .jsonio import read_json_object
from .tokenizer import Tokenizer

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_BASE = "adapter_model.safetensors", "adapter_config.json", "adapter_base.json"
PEFT_PREFIX = "base_model.model."  # PEFT saves keys relative to PeftModel -> LoraModel -> the HF model


class LoRALinear(nn.Module):
    """nn.Linear + a trainable low-rank update. Submodule names follow PEFT (base_layer, lora_A, lora_B)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=dev)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init (and PEFT's)
        nn.init.zeros_(self.lora_B.weight)                            # B = 0: the update starts at exactly zero

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix, (alpha / r) * B @ A, in fp32 (out x in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + (alpha / r) B A (bias unchanged)."""
        base = self.base_layer
        with torch.no_grad():
            w = (base.weight.float() + self.delta_weight()).to(base.weight.dtype)
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


# ---------------------------------------------------------------------------------------------------------------
# Wrapping, freezing, merging
# ---------------------------------------------------------------------------------------------------------------
def matches(name: str, targets) -> bool:
    """PEFT's rule for a list of targets: the module's name is a target or ends with '.' + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def inject_lora(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose name matches a target in a LoRALinear; freeze everything else.

    Returns the wrapped module names. After this, model.parameters() with requires_grad are exactly the A/Bs.
    """
    if rank < 1:
        raise UsageError(f"--lora_rank must be at least 1 (got {rank})")
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise UsageError("--lora_targets is empty; name the Linear layers to adapt, e.g. q_proj,v_proj")
    for t in targets:
        if t == "lm_head" or t.endswith("embed_tokens"):
            raise UsageError(f"--lora_targets {t}: only the Linear layers inside the blocks can be adapted "
                             f"(the fused loss reads lm_head's weight directly, and it is tied to the embedding)")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for t in targets:
        if not any(matches(n, [t]) for n in linears):
            names = sorted({n.rsplit(".", 1)[-1] for n in linears if n != "lm_head"})
            raise UsageError(f"--lora_targets {t}: no Linear layer of this model is named so; "
                             f"choose among {', '.join(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = [n for n in linears if n != "lm_head" and matches(n, targets)]
    for n in wrapped:
        _set_module(model, n, LoRALinear(linears[n], rank, alpha, dropout))
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen Linear weights of the blocks in `dtype` (bf16/fp16) to halve their memory.

    Exact under autocast: autocast casts a Linear's fp32 weight to the same dtype on every call anyway, so the
    matmuls see identical numbers (and skip that cast). Norms, embeddings and the A/B matrices stay fp32.
    """
    for block in unwrap(model).model.layers:
        for m in block.modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad:
                m.to(dtype)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the wrappers: a plain model, no extra matmuls."""
    m = unwrap(model)
    for name, layer in lora_layers(m).items():
        _set_module(m, name, layer.merged())
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Adapter files
# ---------------------------------------------------------------------------------------------------------------
def base_fingerprint(base: str) -> str:
    """A cheap content hash of a base model: its config.json + the weight file's size + 64 evenly spaced 4 KiB
    blocks of it. Reads at most 256 KiB, so it is instant even for a 1 GB model, yet retrained weights differ."""
    h = hashlib.sha1()
    cfg_file = os.path.join(base, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, "rb") as f:
            cfg = json.load(f)
        cfg.pop("torch_dtype", None)
        h.update(json.dumps(cfg, sort_keys=True).encode())
    path = (weights_file(base) or base) if os.path.isdir(base) else base
    if os.path.isfile(path):
        size = os.path.getsize(path)
        h.update(str(size).encode())
        with open(path, "rb") as f:
            for i in range(64):
                f.seek(size * i // 64)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A/B tensors under PEFT's key names, fp32, contiguous."""
    sd = {}
    for name, layer in lora_layers(model).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().contiguous().cpu()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().contiguous().cpu()
    return sd


def save_adapter(model: nn.Module, out_dir: str, base_dir: str, targets, extra: dict | None = None) -> None:
    """Write the adapter directory atomically: weights (A/B only) + PEFT config + our base fingerprint."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    first = next(iter(layers.values()))
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_dir,
        "r": first.rank, "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0,
        "target_modules": sorted(set(targets)), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    base_info = {"base_model_dir": base_dir, "base_fingerprint": base_fingerprint(base_dir),
                 "base_config": unwrap(model).config.to_dict(), "wrapped_modules": sorted(layers),
                 **(extra or {})}
    with atomic_dir(out_dir, keep=RUN_FILES) as tmp:  # keeps the run's metrics.jsonl beside the adapter
        save_file(adapter_state_dict(model), os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, obj in ((ADAPTER_CONFIG, peft_config), (ADAPTER_BASE, base_info)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)


def read_adapter_config(adapter_dir: str) -> dict:
    file = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (is this an adapter dir written by train_lora.py?)")
    cfg = read_json_object(file, CheckpointError)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {cfg['peft_type']!r} is not supported (only LORA)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{file}: missing '{key}'")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise CheckpointError(f"{file}: '{key}' adapters are not supported")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules",
                               "modules_to_save", "trainable_token_indices", "target_parameters", "lora_bias")
                   if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise CheckpointError(f"{file}: PEFT option '{unsupported[0]}' is not supported here (plain LoRA on "
                              f"Linear layers only)")
    if isinstance(cfg["target_modules"], str):
        raise CheckpointError(f"{file}: target_modules as a regex/'all-linear' string is not supported; "
                              f"use a list of module names")
    return cfg


def load_adapter(model: nn.Module, adapter_dir: str, base_dir: str | None = None) -> list[str]:
    """Wrap `model` as the adapter config says and load A/B from the adapter dir. Strict: every tensor must match.

    base_dir: the base model dir `model` came from; when given, its fingerprint is compared with the one the
    adapter was trained on, and a mismatch prints a warning (a legitimate use, e.g. a sibling fine-tune, but
    usually a mistake).
    """
    cfg = read_adapter_config(adapter_dir)
    wfile = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(wfile):
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    try:
        wrapped = inject_lora(model, cfg["target_modules"], int(cfg["r"]), float(cfg["lora_alpha"]), 0.0)
    except UsageError as e:  # a target this model lacks: the adapter belongs to another architecture
        raise CheckpointError(f"{adapter_dir}: {str(e).replace('--lora_targets ', 'target ')}") from None
    try:
        with safe_open(wfile, framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(f"{wfile}: unreadable ({type(e).__name__}: {e})") from None
    want = {}
    for name, layer in lora_layers(model).items():
        want[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        want[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    # PEFT files may carry the adapter name ('.lora_A.default.weight') when saved by hand; accept both
    sd = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in sd.items()}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        key, what = (missing[0], "missing") if missing else (extra[0], "unexpected")
        n = len(missing or extra)
        raise CheckpointError(f"{wfile}: {what} tensor {key}" + (f" (+{n - 1} more)" if n > 1 else "") +
                              " (was this adapter trained on a model of another shape?)")
    with torch.no_grad():
        for k, p in want.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise CheckpointError(f"{wfile}: tensor {k} has shape {tuple(sd[k].shape)}, this base model needs "
                                      f"{tuple(p.shape)} (was the adapter trained on another base?)")
            p.copy_(sd[k].to(p.dtype))
    if base_dir is not None:
        check_base(adapter_dir, base_dir)
    return wrapped


def check_base(adapter_dir: str, base_dir: str) -> bool:
    """Warn (stderr) when the base's fingerprint differs from the one recorded at training. True if it matches."""
    file = os.path.join(adapter_dir, ADAPTER_BASE)
    if not os.path.isfile(file):
        return True  # e.g. an adapter written by PEFT: nothing to compare against
    try:
        with open(file, encoding="utf-8") as f:
            recorded = json.load(f).get("base_fingerprint")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    actual = base_fingerprint(base_dir)
    if recorded and recorded != actual:
        print(f"warning: adapter {adapter_dir} was trained on a base with fingerprint {recorded}, but {base_dir} "
              f"has {actual}; its outputs will not be what was trained", file=sys.stderr)
        return False
    return True


def load_with_adapter(base_dir: str | None, adapter_dir: str, device="cpu", dtype: torch.dtype = torch.float32,
                      merge: bool = True) -> nn.Module:
    """Base model + adapter, ready for generation. One line for callers (eval_model.py, serve.py).

    base_dir None: the base recorded in the adapter config. merge=True folds A/B into the weights (merged in fp32,
    then cast to dtype), so generation costs exactly what the base costs; merge=False keeps the LoRA wrappers.
    """
    cfg = read_adapter_config(adapter_dir)
    base_dir = base_dir or cfg.get("base_model_name_or_path")
    if not base_dir or not os.path.exists(base_dir):
        raise CheckpointError(f"{adapter_dir}: base model dir {base_dir!r} not found; pass the base explicitly")
    model = load_model(base_dir)  # fp32 first: merging in low precision would round the small update away
    load_adapter(model, adapter_dir, base_dir)
    if merge:
        model = merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def merge_to_dir(base_dir: str, adapter_dir: str, out_dir: str) -> nn.Module:
    """Write base + adapter as one ordinary model directory (loads anywhere a model dir does, PEFT not needed).

    The merged weights are saved in the base's dtype (config.json torch_dtype): fp32 bases merge exactly.
    """
    model = load_with_adapter(base_dir, adapter_dir, merge=True)
    saved_dtype = getattr(torch, str(load_config(base_dir).torch_dtype), None) if os.path.isdir(base_dir) else None
    saved_dtype = saved_dtype if saved_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    save_model(model.to(saved_dtype), Tokenizer.load(base_dir), out_dir,
               extra_files={"merged_from.json": {"base": base_dir, "adapter": adapter_dir,
                                                 "base_fingerprint": base_fingerprint(base_dir)}})
    return model
