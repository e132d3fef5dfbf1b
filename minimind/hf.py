"""Hugging Face interop: our model directories are transformers checkpoints, and theirs load here.

Our decoder is, maths for maths, one of four standard transformers classes, picked from the config:

    MoE MLPs                      -> Qwen3MoeForCausalLM   (q/k RMSNorm, softmax router, top-k, optional renorm)
    q/k RMSNorm (MiniMind-3)      -> Qwen3ForCausalLM
    no q/k norm, q/k/v bias       -> Qwen2ForCausalLM      (Qwen2 / Qwen2.5)
    no q/k norm, no bias          -> LlamaForCausalLM

Parameter names are already Hugging Face's, so export is a config.json translation, and import is the reverse plus
a few checks. MiniMind's own checkpoints (its `.pth` state dicts and its transformers-format `minimind` dirs) load
through the same path. Anything the config asks for that our model cannot compute exactly (an output bias, sliding
windows, dense layers inside an MoE model, another activation...) is refused with a one-line CheckpointError that
names the key or tensor: a model that loads, loads exactly.

The command-line converter is the top-level script `convert_model.py`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .jsonio import read_json_object

# model_type -> architecture class, for the families we can compute exactly
ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "minimind": "MiniMindForCausalLM",   # jingyaogong/minimind's own transformers format (MiniMind2 / MiniMind-3)
}
# In these families `attention_bias` puts a bias on q, k, v AND o; ours is q/k/v only (Qwen2 style). We export the
# o bias as zeros (exact) and, on import, accept it only if it is zero.
_BIAS_ON_O = ("qwen3", "qwen3_moe", "llama")

# MiniMind's YaRN settings, switched on by `inference_rope_scaling` in its config (model_minimind.py).
MINIMIND_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                 "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Export: ModelConfig -> config.json
# ---------------------------------------------------------------------------------------------------------------
def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    """The transformers class whose maths equals ours for this config: (architecture, model_type)."""
    if config.use_moe:
        return "Qwen3MoeForCausalLM", "qwen3_moe"
    if config.qk_norm:
        return "Qwen3ForCausalLM", "qwen3"
    if config.attention_bias:
        return "Qwen2ForCausalLM", "qwen2"
    return "LlamaForCausalLM", "llama"


def _rope_dict(config: ModelConfig) -> dict | None:
    """rope_scaling in the form transformers' rope init reads (rope_type + its parameters), or None."""
    rs = dict(config.rope_scaling or {})
    kind = rs.pop("rope_type", rs.pop("type", None))
    if kind in (None, "default"):
        return None
    return {"rope_type": kind, **rs}


def to_hf_config(config: ModelConfig) -> dict:
    """config.json for transformers / vLLM / llama.cpp: only the keys of the chosen architecture, HF meanings."""
    if config.use_moe and not config.qk_norm:
        # No transformers class has MoE without q/k norm (Qwen3-MoE always normalises q and k). Save our own
        # format rather than fail at the end of a training run: minimind loads it, transformers will not.
        return {**config.to_dict(), "_comment": "MoE without q/k norm has no transformers twin; load with minimind"}
    arch, model_type = hf_architecture(config)
    rope = _rope_dict(config)
    d = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,            # always explicit: Qwen3's default is 128, not hidden/heads
        "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "initializer_range": 0.02,
        # RoPE twice: rope_theta/rope_scaling for transformers 4.x, vLLM and llama.cpp; rope_parameters for 5.x.
        "rope_theta": config.rope_theta, "rope_scaling": rope,
        "rope_parameters": {**(rope or {"rope_type": "default"}), "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings, "attention_dropout": config.dropout,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "use_cache": True, "torch_dtype": config.torch_dtype,
    }
    if model_type in _BIAS_ON_O:
        d["attention_bias"] = config.attention_bias   # q/k/v/o in HF: o_proj.bias is exported as zeros
    if model_type == "llama":
        d["mlp_bias"] = False
    else:  # the Qwen families: full attention everywhere
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    if config.use_moe:
        d.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                 moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                 router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
                 decoder_sparse_step=1, mlp_only_layers=[])   # every layer is an MoE layer, as in ours
    return d


def export_extra_tensors(config: ModelConfig, sd: dict) -> dict[str, torch.Tensor]:
    """Tensors the HF class has and we do not: zero o_proj biases where HF's attention_bias covers o."""
    if not config.attention_bias or hf_architecture(config)[1] not in _BIAS_ON_O:
        return {}
    ref = sd["model.embed_tokens.weight"]
    return {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(config.hidden_size, dtype=ref.dtype)
            for i in range(config.num_hidden_layers)}


# ---------------------------------------------------------------------------------------------------------------
# Import: config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------------------------
def read_config_file(file: str) -> ModelConfig:
    """Load a config.json written by us, by transformers (the four families above) or by MiniMind."""
    return read_config(file)[0]


def read_config(file: str) -> tuple[ModelConfig, str | None]:
    """(ModelConfig, the source's model_type: 'qwen3', 'minimind', ... or None for our own dataclass layout)."""
    d = _read_json(file)
    return from_hf_config(d, file), (None if _own_format(d) else model_type_of(d, file))


def _read_json(file: str) -> dict:
    return read_json_object(file, CheckpointError)


def model_type_of(d: dict, source: str) -> str:
    arch = (d.get("architectures") or [None])[0]
    model_type = d.get("model_type")
    by_arch = {v: k for k, v in ARCHITECTURES.items()}
    if model_type is None and arch in by_arch:
        model_type = by_arch[arch]
    if model_type not in ARCHITECTURES or (arch is not None and arch not in by_arch):
        name = arch or model_type or "(none: no 'architectures' or 'model_type' key)"
        raise CheckpointError(f"{source}: architecture {name} is not supported; minimind loads "
                              f"{', '.join(ARCHITECTURES.values())}")
    if arch is not None and by_arch[arch] != model_type:
        raise CheckpointError(f"{source}: architectures says {arch} but model_type is {model_type!r}")
    return model_type


def _own_format(d: dict) -> bool:
    """Our dataclass's own layout (ModelConfig.to_dict(), e.g. an MoE model without q/k norm): no HF architecture."""
    return "model_type" not in d and "architectures" not in d and "qk_norm" in d


def from_hf_config(d: dict, source: str = "config.json") -> ModelConfig:
    """Translate a config.json dict to our ModelConfig, refusing what our model cannot compute exactly."""
    if _own_format(d):
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return _build({k: v for k, v in d.items() if k in names}, {}, source)
    model_type = model_type_of(d, source)
    if model_type == "minimind":
        return _from_minimind_config(d, source)

    def need(key):
        if d.get(key) is None:
            raise CheckpointError(f"{source}: missing key '{key}' (needed by {ARCHITECTURES[model_type]})")
        return d[key]

    def refuse_if(cond: bool, key: str, why: str):
        if cond:
            raise CheckpointError(f"{source}: '{key}' = {json.dumps(d.get(key))} is not supported: {why}")

    refuse_if(d.get("hidden_act", "silu") != "silu", "hidden_act", "minimind's MLP is SwiGLU (silu)")
    refuse_if(bool(d.get("quantization_config")), "quantization_config",
              "quantized checkpoints cannot be trained or loaded exactly; use the original bf16/fp32 weights")
    refuse_if(bool(d.get("use_sliding_window")), "use_sliding_window", "minimind attends over the full context")
    refuse_if(any(t != "full_attention" for t in d.get("layer_types") or []), "layer_types",
              "minimind attends over the full context in every layer")
    refuse_if(bool(d.get("mlp_bias")), "mlp_bias", "minimind's MLP has no biases")
    refuse_if(d.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor", "RoPE covers the whole head")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    cfg = dict(
        vocab_size=need("vocab_size"), hidden_size=hidden, num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
        # transformers' defaults where the key is absent: Qwen3 128, the others hidden / heads
        head_dim=d.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads),
        max_position_embeddings=d.get("max_position_embeddings") or (2048 if model_type == "llama" else 32768),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        dropout=float(d.get("attention_dropout") or 0.0), qk_norm=model_type in ("qwen3", "qwen3_moe"),
        # Qwen2 always has q/k/v biases; in the others attention_bias adds q/k/v/o biases (o must be zero, see import)
        attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
        **_rope_from_hf(d, source), **_special_ids(d),
    )
    if model_type == "qwen3_moe":
        refuse_if(d.get("decoder_sparse_step", 1) != 1, "decoder_sparse_step",
                  "minimind puts experts in every layer (a step > 1 mixes in dense layers)")
        refuse_if(bool(d.get("mlp_only_layers")), "mlp_only_layers", "minimind puts experts in every layer")
        experts = d.get("num_experts", d.get("num_local_experts"))
        if experts is None:
            raise CheckpointError(f"{source}: missing key 'num_experts' (needed by Qwen3MoeForCausalLM)")
        cfg.update(use_moe=True, num_experts=experts, num_experts_per_tok=need("num_experts_per_tok"),
                   moe_intermediate_size=need("moe_intermediate_size"),
                   intermediate_size=d.get("intermediate_size") or need("moe_intermediate_size"),
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))
    else:
        cfg["intermediate_size"] = need("intermediate_size")
    return _build(cfg, d, source)


def _build(cfg: dict, d: dict, source: str) -> ModelConfig:
    if d.get("torch_dtype") or d.get("dtype"):
        cfg["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype"))
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size"):
        if k in ("head_dim", "intermediate_size") and cfg.get(k) is None:
            continue  # ModelConfig derives them
        if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] <= 0:
            raise CheckpointError(f"{source}: '{k}' must be a positive integer, got {json.dumps(cfg.get(k))}")
    try:
        return ModelConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def _special_ids(d: dict) -> dict:
    out = {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = d.get(k)
        if isinstance(v, list):   # transformers allows several eos ids; the config keeps the first
            v = v[0] if v else None
        if isinstance(v, int):
            out[k] = v
    if "pad_token_id" not in out and "eos_token_id" in out:
        out["pad_token_id"] = out["eos_token_id"]
    return out


def _rope_from_hf(d: dict, source: str) -> dict:
    """rope_theta and rope_scaling from either transformers 4.x keys or 5.x `rope_parameters`."""
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    scaling = d.get("rope_scaling") or {k: v for k, v in params.items() if k not in ("rope_theta",)}
    theta = d.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": None}
    if kind not in ("linear", "yarn"):
        raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (minimind computes 'default', "
                              f"'linear' and 'yarn' exactly as transformers does)")
    allowed = {"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
               "attention_factor", "truncate"} if kind == "yarn" else {"rope_type", "type", "factor"}
    extra = sorted(set(scaling) - allowed)
    if extra:
        raise CheckpointError(f"{source}: rope_scaling key '{extra[0]}' is not supported for {kind!r}")
    if scaling.get("truncate", True) is not True:
        raise CheckpointError(f"{source}: rope_scaling 'truncate' = false is not supported (YaRN's ramp is "
                              f"truncated here)")
    if not isinstance(scaling.get("factor"), (int, float)):
        raise CheckpointError(f"{source}: rope_scaling needs a numeric 'factor'")
    out = {k: v for k, v in scaling.items() if k not in ("type", "truncate")}
    out["rope_type"] = kind
    if kind == "yarn" and "original_max_position_embeddings" not in out and "original_max_position_embeddings" in d:
        out["original_max_position_embeddings"] = d["original_max_position_embeddings"]  # Phi-3 style top-level key
    return {"rope_theta": float(theta), "rope_scaling": out}


def _from_minimind_config(d: dict, source: str) -> ModelConfig:
    """jingyaogong/minimind's config: MiniMind-3 (q/k norm, num_experts) or MiniMind2 (n_routed_experts, no
    q/k norm, optional shared experts, which we refuse)."""
    v2 = "n_routed_experts" in d or "scoring_func" in d
    hidden = d.get("hidden_size", 512 if v2 else 768)
    heads = d.get("num_attention_heads", 8)
    if v2:
        inter = d.get("intermediate_size") or 64 * math.ceil(int(hidden * 8 / 3) / 64)
    else:
        inter = d.get("intermediate_size") or math.ceil(hidden * math.pi / 64) * 64
    use_moe = bool(d.get("use_moe", False))
    if use_moe and v2 and d.get("n_shared_experts", 1):
        raise CheckpointError(f"{source}: 'n_shared_experts' = {d.get('n_shared_experts', 1)} is not supported: "
                              f"minimind's MoE has routed experts only")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: 'hidden_act' = {json.dumps(d.get('hidden_act'))} is not supported: "
                              f"SwiGLU (silu)")
    cfg = dict(
        vocab_size=d.get("vocab_size", 6400), hidden_size=hidden, num_hidden_layers=d.get("num_hidden_layers", 8),
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads", 2 if v2 else 4),
        head_dim=d.get("head_dim") or hidden // heads, intermediate_size=inter,
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        rms_norm_eps=d.get("rms_norm_eps", 1e-5 if v2 else 1e-6), rope_theta=float(d.get("rope_theta", 1e6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), qk_norm=not v2, attention_bias=False,
        dropout=float(d.get("dropout", 0.0)), use_moe=use_moe,
        num_experts=d.get("num_experts", d.get("n_routed_experts", 4)),
        num_experts_per_tok=d.get("num_experts_per_tok", 2 if v2 else 1),
        moe_intermediate_size=d.get("moe_intermediate_size") or inter,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        router_aux_loss_coef=d.get("router_aux_loss_coef", d.get("aux_loss_alpha", 5e-4)),
        rope_scaling=_minimind_rope(d, source, hidden // heads if not d.get("head_dim") else d["head_dim"]),
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2), pad_token_id=0,
    )
    if v2 and use_moe and cfg["num_experts_per_tok"] == 1:
        cfg["norm_topk_prob"] = False  # MiniMind2 renormalises only when top_k > 1 (same maths: one weight stays p)
    return _build(cfg, d, source)


def _minimind_rope(d: dict, source: str, head_dim: int) -> dict | None:
    """MiniMind ignores a saved rope_scaling: YaRN is on iff inference_rope_scaling, with its fixed settings."""
    if not d.get("inference_rope_scaling"):
        return None
    rs = dict(MINIMIND_YARN)
    if d.get("max_position_embeddings", 32768) <= rs["original_max_position_embeddings"]:
        return None  # MiniMind applies the ramp only when the context is longer than the original one
    # MiniMind clamps the ramp's top at head_dim//2 - 1, transformers (and we) at head_dim - 1: same unless it binds.
    top = math.ceil(head_dim * math.log(rs["original_max_position_embeddings"] / (rs["beta_slow"] * 2 * math.pi))
                    / (2 * math.log(float(d.get("rope_theta", 1e6)))))
    if top > head_dim // 2 - 1:
        raise CheckpointError(f"{source}: this rope_theta/head_dim makes MiniMind's YaRN differ from the standard one")
    return rs


def to_minimind_names(sd: dict[str, torch.Tensor], config: ModelConfig, model_type: str | None,
                      source: str) -> dict[str, torch.Tensor]:
    """Rename/reshape a foreign state dict to ours. Exact or an error: nothing is silently dropped but derived
    buffers (RoPE tables) and biases that are provably zero."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):   # DDP / torch.compile wrappers in MiniMind's .pth files
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith("rotary_emb.inv_freq") or k in ("model.freqs_cos", "model.freqs_sin"):
            continue                               # RoPE tables: recomputed from the config
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: tensor {k} has dtype {str(v.dtype).replace('torch.', '')}; only float "
                                  f"weights (fp32/bf16/fp16) can be loaded")
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", k)
        if m and v.dim() == 3:                     # transformers 5 fused experts: (E, 2I, H) and (E, H, I)
            base, kind = m.groups()
            for e in range(v.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = v[e].chunk(2, dim=0)
                    out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = gate, up
                else:
                    out[f"{base}.{e}.down_proj.weight"] = v[e]
            continue
        if k.endswith("self_attn.o_proj.bias") and (model_type in _BIAS_ON_O or model_type is None):
            if torch.count_nonzero(v):
                raise CheckpointError(f"{source}: tensor {k} is nonzero: minimind's attention has no output bias, "
                                      f"so this model cannot be loaded exactly")
            continue
        out[k] = v
    if config.tie_word_embeddings and "model.embed_tokens.weight" not in out and "lm_head.weight" in out:
        out["model.embed_tokens.weight"] = out.pop("lm_head.weight")   # a tied matrix saved under the head's name
    if config.tie_word_embeddings and "lm_head.weight" in out and "model.embed_tokens.weight" in out:
        if not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"]):
            raise CheckpointError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                                  f"model.embed_tokens.weight; set it to false in config.json if the head is separate")
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """The ModelConfig of a bare MiniMind `.pth` state dict, read off the tensor shapes.

    Shapes fix everything but the head count when there is no q/k norm (MiniMind2): we use MiniMind's 8 heads.
    MiniMind-3 (q/k norm) is fully determined. Top-k routing is not in the shapes: MiniMind's defaults are used
    (1 for MiniMind-3, 2 for MiniMind2); pass a config.json to convert if yours differ.
    """
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}

    def shape(name):
        if name not in sd:
            raise CheckpointError(f"{source}: missing tensor {name} (is this a MiniMind model state dict?)")
        return tuple(sd[name].shape)

    vocab, hidden = shape("model.embed_tokens.weight")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in sd
    head_dim = shape("model.layers.0.self_attn.q_norm.weight")[0] if qk_norm else hidden // 8
    experts = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))})
    if any(".shared_experts." in k for k in sd):
        raise CheckpointError(f"{source}: tensor {next(k for k in sd if '.shared_experts.' in k)} is not supported: "
                              f"minimind's MoE has routed experts only")
    if experts:
        inter = shape("model.layers.0.mlp.experts.0.gate_proj.weight")[0]
    else:
        inter = shape("model.layers.0.mlp.gate_proj.weight")[0]
    head = sd.get("lm_head.weight")
    cfg = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=shape("model.layers.0.self_attn.q_proj.weight")[0] // head_dim,
               num_key_value_heads=shape("model.layers.0.self_attn.k_proj.weight")[0] // head_dim,
               head_dim=head_dim, intermediate_size=inter, moe_intermediate_size=inter, qk_norm=qk_norm,
               rms_norm_eps=1e-6 if qk_norm else 1e-5, rope_theta=1e6, max_position_embeddings=32768,
               attention_bias="model.layers.0.self_attn.q_proj.bias" in sd,
               tie_word_embeddings=head is None or torch.equal(head, sd["model.embed_tokens.weight"]),
               use_moe=bool(experts), num_experts=len(experts) or 4, num_experts_per_tok=1 if qk_norm else 2,
               torch_dtype=str(sd["model.embed_tokens.weight"].dtype).replace("torch.", ""))
    return _build(cfg, {}, source)
