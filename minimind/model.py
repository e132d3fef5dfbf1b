"""The decoder-only transformer, written out by hand.

Shape of one block (pre-norm, as in Llama / Qwen):  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
Parameter names follow Hugging Face's Llama/Qwen2/Qwen3 layout (model.layers.0.self_attn.q_proj.weight, ...),
so our checkpoints load in transformers and theirs load here without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .loss import cross_entropy


class RMSNorm(nn.Module):
    """RMSNorm: scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the mean of squares in low precision loses too much; do it in fp32
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# RoPE: rotate pairs of dims by position-dependent angles, so q.k depends only on the distance between positions.
# ---------------------------------------------------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds theta^(-2i/d), and the attention scale YaRN asks for (1.0 without scaling)."""
    d, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv_freq.float(), 1.0
    factor = float(rs["factor"])
    if kind == "linear":  # position interpolation: every pair slows down by `factor`
        return (inv_freq / factor).float(), 1.0
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (use 'yarn' or 'linear')")
    # YaRN: pairs that turn many times within the original context keep their speed (extrapolate),
    # slow pairs are interpolated (divided by factor), with a linear ramp between; see Peng et al. 2023.
    orig = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast", 32.0), rs.get("beta_slow", 1.0)

    def dim_of(num_rotations):  # the pair index that turns `num_rotations` times over `orig` positions
        return (d * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(dim_of(beta_fast)), 0)
    high = min(math.ceil(dim_of(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(config)
        # Not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq

    def forward(self, position_ids: torch.Tensor):
        """position_ids (B, T) -> cos, sin of shape (B, T, head_dim), in fp32."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * self.inv_freq          # (B, T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)                        # HF layout: halves, not interleaved
        return angles.cos() * self.scale, angles.sin() * self.scale


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, T, heads, head_dim); cos/sin (B, T, head_dim)."""
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------------
# KV cache: keys/values of past tokens, so decoding one token costs O(context) instead of a full re-run.
# ---------------------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated (static) cache for every layer: shape (layers, batch, kv_heads, max_len, head_dim)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions already written (all rows advance together)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, kv_heads, T, head_dim) at the current position; return everything so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (GQA): K/V heads are shared by groups of Q heads."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        if config.qk_norm:  # normalising q and k per head keeps attention logits bounded (Qwen3)
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # SDPA picks a fused kernel (flash / memory-efficient) when it can; enable_gqa avoids copying K/V per group.
        # mask=None with is_causal means plain causal attention over a fresh sequence (the training fast path).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and k.shape[2] == T and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixture of experts: a router sends each token to its top-k expert MLPs and mixes their outputs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)   # the router
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)
        probs = self.gate(x).float().softmax(dim=-1)                 # (N, E) router probabilities
        weights, chosen = probs.topk(self.top_k, dim=-1)             # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # Batched dispatch: sort the N*k (token, expert) pairs by expert, so each expert runs one matmul.
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        pieces = x[token_of].split(counts.tolist())
        y = torch.cat([expert(p) for expert, p in zip(self.experts, pieces)])
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))
        # Load-balancing loss (Switch Transformer): E * sum_i (share of tokens sent to i) * (mean prob of i);
        # it is smallest when routing is uniform, which keeps every expert trained.
        share = counts.float() / flat.numel()
        self.aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()
        return out.view(B, T, H)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.use_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding -> blocks -> final norm. Named `model` inside the LM, as in Hugging Face."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


def build_attention_mask(T: int, start: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, T, start+T): True = may attend. None when plain causal attention suffices.

    Query i (absolute position start+i) sees keys 0..start+i that are not padding. A token always sees itself,
    so rows of left padding never become all-False (which would give NaN).
    """
    S = start + T
    if attention_mask is None and (start == 0 or T == 1):
        return None  # fresh causal sequence, or one new token that may see the whole cache
    q_pos = torch.arange(start, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]                               # (1, 1, T, S) causal
    if attention_mask is not None:
        keep = attention_mask[:, None, None, :S].bool()               # (B, 1, 1, S) not padding
        mask = (mask & keep) | (k_pos == q_pos)[None, None]
    return mask


class MiniMindForCausalLM(nn.Module):
    """The language model: decoder + output head. forward() returns logits, or the loss when given targets."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:  # one matrix both reads tokens in and scores them out
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0):
        """input_ids (B, T). targets (B, T): the token that should follow each position, -100 = no loss there.

        cache: a KVCache to read past keys from and append to. attention_mask (B, cache+T): 1 real, 0 padding.
        logits_to_keep: return logits for only the last N positions (generation needs only the last).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary(position_ids)
        mask = build_attention_mask(T, start, attention_mask, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        x = self.model.norm(x)
        if cache is not None:
            cache.length += T
        if targets is not None:
            loss = cross_entropy(x, self.lm_head.weight, targets)
            if self.config.use_moe and self.training:
                loss = loss + self.config.router_aux_loss_coef * self.aux_loss()
            return loss
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def aux_loss(self) -> torch.Tensor:
        return sum(layer.mlp.aux_loss for layer in self.model.layers if isinstance(layer.mlp, MoE))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
