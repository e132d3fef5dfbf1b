"""Model configuration: one dataclass whose field names are Hugging Face's config.json names.

The names match, but some meanings do not (Qwen3's `attention_bias` also biases o_proj; Qwen2 always has q/k/v
biases), so config.json files go through hf.py both ways. Presets give the sizes used in the docs and tutorials.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None      # SwiGLU width; None -> ceil(hidden * pi / 64) * 64 (MiniMind-3 rule)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2               # GQA: fewer K/V heads than Q heads shrinks the KV cache
    head_dim: int | None = None                # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None           # e.g. {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 2048}
    tie_word_embeddings: bool = True           # output head shares the embedding matrix (saves vocab x hidden params)
    qk_norm: bool = True                       # RMSNorm on each head's q and k (Qwen3 / MiniMind-3); False = Llama
    attention_bias: bool = False               # bias on q/k/v projections (Qwen2 style)
    dropout: float = 0.0
    # Mixture of experts (ignored unless use_moe)
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None   # None -> intermediate_size
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    # Special token ids (kept here so an exported config.json is complete)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float32"               # dtype of the saved weights, as HF names it

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    # --- JSON ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_parameters(self) -> int:
        """Parameter count from the formula (tests check it against the built model)."""
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * d
        if self.use_moe:
            mlp = h * self.num_experts + self.num_experts * 3 * h * self.moe_intermediate_size
        else:
            mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h                       # + two RMSNorm weights
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + L * per_layer + h + head               # + final norm

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls (fwd+bwd) + 12*L*d*T for attention scores (PaLM)."""
        n = self.num_parameters()
        if not self.tie_word_embeddings:   # untied: the input embedding is a lookup, not a matmul
            n -= self.vocab_size * self.hidden_size
        if self.use_moe:                   # only the routed experts do work for a token
            n -= (self.num_experts - self.num_experts_per_tok) * 3 * self.hidden_size * \
                self.moe_intermediate_size * self.num_hidden_layers
        attn_dim = self.num_attention_heads * self.head_dim
        return 6 * n + 12 * self.num_hidden_layers * attn_dim * seq_len


# Presets: names used by --preset in the train scripts and train.sh.
PRESETS: dict[str, dict] = {
    # A few million parameters: the whole pipeline runs in minutes on a 2-core CPU.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704),
    # MiniMind2-small shape: d512 L8, 8 heads / 2 KV heads.
    "26M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408),
    # MiniMind-3 shape: d768 L8, 8 heads / 4 KV heads, intermediate ceil(768*pi/64)*64 = 2432.
    "64M": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    # MiniMind2 shape: d768 L16.
    "104M": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2048),
    # MiniMind-3-MoE shape: 4 experts, top-1 routing.
    "moe": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                use_moe=True, num_experts=4, num_experts_per_tok=1),
    # Qwen2.5-0.5B architecture (q/k/v bias, no q/k norm, 151k vocabulary).
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, qk_norm=False,
                         attention_bias=True, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                         pad_token_id=151643),
}


# Pretraining's peak learning rate when --learning_rate is not given (AdamW, the default --batch_size of 32
# documents, cosine). How each was chosen (dev/LOG.md, "learning rate per preset"):
#   tiny: a sweep on a 2-core CPU, one epoch of 8,000 zh_poetry lines (MiniMind's tokenizer, 236 steps of ~4,000
#         tokens), held-out loss after the epoch: 5e-4 4.339, 1e-3 4.282, 2e-3 4.381 (a parabola
#         in log LR through the three has its minimum at 0.9e-3).
#   the rest: MiniMind's 5e-4, which its authors use for these shapes at the same tokens per step (32 rows of up
#         to 340 tokens); not swept here (no GPU). Wider models want a smaller AdamW step, not a larger one.
PRETRAIN_LR: dict[str, float] = {"tiny": 1e-3, "26M": 5e-4, "64M": 5e-4, "104M": 5e-4, "moe": 5e-4,
                                 "qwen2.5-0.5b": 5e-4}
FALLBACK_PRETRAIN_LR = 5e-4   # a shape from --config / --from_weight: MiniMind's default


def pretrain_lr(preset_name: str | None) -> float:
    """The default peak LR of pretraining for a preset (None: a shape given some other way)."""
    return PRETRAIN_LR.get(preset_name, FALLBACK_PRETRAIN_LR)


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})
