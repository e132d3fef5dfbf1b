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

try:  # FlexAttention (torch >= 2.5): attention with a mask_mod, compiled into a kernel that skips masked-out tiles
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch: document masking falls back to SDPA with a dense boolean mask
    create_block_mask = flex_attention = None


class RMSNorm(nn.Module):
    """RMSNorm: scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # mean of squares in fp32 at least (fp64 stays fp64)
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

    def forward(self, x, cos, sin, mask: "AttentionMask", cache: KVCache | None = None):
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
        y = mask.attend(q, k, v, self.dropout if self.training else 0.0)
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

    def forward(self, x):
        """-> (output, load-balancing loss of this layer's routing)."""
        B, T, H = x.shape
        x = x.reshape(-1, H)
        probs = self.gate(x).to(torch.promote_types(x.dtype, torch.float32)).softmax(dim=-1)  # (N, E), fp32+
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
        aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()
        return out.view(B, T, H), aux_loss


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.use_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask: "AttentionMask", cache=None):
        """-> (x, MoE load-balancing loss or None for a dense MLP)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        y = self.mlp(self.post_attention_layernorm(x))
        y, aux = y if isinstance(self.mlp, MoE) else (y, None)
        return x + y, aux


class Decoder(nn.Module):
    """Embedding -> blocks -> final norm. Named `model` inside the LM, as in Hugging Face.

    Training (MiniMindForCausalLM.forward) and the decode engine (generate.py) both run it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids, mask: "AttentionMask", cache=None):
        """input_ids, position_ids (B, T) -> (hidden states (B, T, hidden), summed MoE aux loss or None).

        cache: keys/values of earlier positions are read from it and this call's are written to it."""
        cos, sin = self.rotary(position_ids)
        x = self.embed_tokens(input_ids)
        aux_loss = None
        for layer in self.layers:
            x, aux = layer(x, cos, sin, mask, cache)
            if aux is not None:
                aux_loss = aux if aux_loss is None else aux_loss + aux
        return self.norm(x), aux_loss


# ---------------------------------------------------------------------------------------------------------------
# Attention masks: which keys each query may see. One type, one dispatch point (AttentionMask.attend).
# ---------------------------------------------------------------------------------------------------------------
class AttentionMask:
    """Which keys each query may see, in one of three kinds:

      causal     a fresh sequence (or one new token that may see the whole cache): SDPA's is_causal path, nothing
                 materialised — the training fast path;
      padded     a boolean (B|1, 1, T, S) tensor, True = may attend: left-padded prompts, a cache with holes;
      documents  packed rows: attention stays inside each document (FlexAttention BlockMask on CUDA, per-document
                 SDPA elsewhere, or a dense reference mask).
    Every attention layer calls attend(); nothing else looks at the kind.
    """

    def __init__(self, kind: str, dense: torch.Tensor | None = None, block=None, segments=None):
        self.kind, self.dense, self.block, self.segments = kind, dense, block, segments

    @classmethod
    def causal(cls) -> "AttentionMask":
        return cls("causal")

    @classmethod
    def padded(cls, allowed: torch.Tensor) -> "AttentionMask":
        return cls("padded", dense=allowed)

    @classmethod
    def for_positions(cls, T: int, start: int, attention_mask: torch.Tensor | None, device) -> "AttentionMask":
        """T new queries at absolute positions start.. over a cache of start keys; attention_mask (B, start+T):
        1 = real, 0 = padding. Query i sees keys 0..start+i that are not padding. A token always sees itself, so
        rows of left padding never become all-False (which would give NaN)."""
        S = start + T
        if attention_mask is None and (start == 0 or T == 1):
            return cls.causal()
        q_pos = torch.arange(start, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]                               # (1, 1, T, S) causal
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :S].bool()               # (B, 1, 1, S) not padding
            mask = (mask & keep) | (k_pos == q_pos)[None, None]
        return cls.padded(mask)

    @classmethod
    def documents(cls, doc_ids: torch.Tensor, backend: str = "auto", dtype: torch.dtype | None = None):
        """Block-diagonal causal mask for packed rows: query i sees key j iff doc_ids[i] == doc_ids[j], j <= i.

        doc_ids (B, T): which document (conversation) each token belongs to; runs of equal ids, -1 for padding.
        backend 'flex': a FlexAttention BlockMask (default on CUDA): the kernel skips tiles that are fully
        masked, so attention costs ~sum(len_doc^2), not T^2. 'varlen': DocumentSegments (default elsewhere beyond
        512 tokens): the same saving with plain SDPA calls, one per group of similar-length documents. 'sdpa'
        (default elsewhere up to 512 tokens): the reference, a dense boolean mask (B, 1, T, T): simple and
        exact, but every one of the T^2 scores is computed; with
        `dtype`, its additive form (0 / -inf), which SDPA would otherwise rebuild in every layer.
        Build it once per batch; pair it with position_ids=document_positions(doc_ids).
        """
        if backend == "auto":  # CUDA: FlexAttention. Elsewhere the dense mask up to 512 tokens: on a 2-core CPU at
            # 256-512 tokens it ran as fast as no mask, where per-document SDPA calls cost 10-15%; at 768-1024 the
            # per-document calls are as fast or faster (bench/README.md, dev/LOG.md)
            backend = ("flex" if doc_ids.is_cuda and flex_attention is not None
                       else "sdpa" if doc_ids.shape[1] <= 512 else "varlen")
        if backend == "varlen":
            return cls("documents", segments=DocumentSegments(doc_ids))
        B, T = doc_ids.shape
        if backend == "flex":
            if flex_attention is None:
                raise RuntimeError("FlexAttention needs torch >= 2.5; use backend='sdpa'")

            def same_doc_causal(b, h, q, kv):
                return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)
            return cls("documents", block=create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device))
        if backend != "sdpa":
            raise ValueError(f"backend must be 'auto', 'flex', 'varlen' or 'sdpa', got {backend!r}")
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
        if dtype is not None:  # every row keeps its diagonal, so no row is all -inf (which would give NaN)
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device).masked_fill_(~allowed,
                                                                                                  float("-inf"))
        return cls("documents", dense=allowed)

    def attend(self, q, k, v, dropout: float = 0.0) -> torch.Tensor:
        """Scaled dot-product attention under this mask. q (B, heads, T, d); k, v (B, kv_heads, S, d) ->
        (B, heads, T, d). GQA: K/V heads are shared by groups of Q heads without copying them (enable_gqa)."""
        gqa = k.shape[1] != q.shape[1]
        if self.segments is not None:   # per-document SDPA works on (B, T, heads, d)
            y = self.segments.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout)
            return y.transpose(1, 2)
        if self.block is not None:
            if dropout:
                raise ValueError("FlexAttention has no attention dropout: build the mask with backend='varlen'")
            return _flex_attention(q, k, v, self.block, gqa)
        # SDPA picks a fused kernel (flash / memory-efficient) when it can. Causal over a fresh sequence needs no
        # mask at all; one new token against the cache (T == 1 < S) sees every key.
        T, S = q.shape[2], k.shape[2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense,
                                              is_causal=self.kind == "causal" and T == S and T > 1,
                                              dropout_p=dropout, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------------------------
# Document masking: several conversations packed in one row must not see each other.
# ---------------------------------------------------------------------------------------------------------------
class DocumentSegments:
    """Varlen attention without a varlen kernel: cut packed rows into their documents, batch documents of similar
    length together (lengths rounded up to a multiple of `multiple`, padded on the right), run plain causal SDPA
    on each such batch, and put the outputs back in place. Work ~ sum(len_doc^2) instead of T^2 per row, and no
    (B, T, T) mask in memory. Right padding is harmless under a causal mask: real queries never see it.
    Its shapes change with every batch, so torch.compile leaves it out of the graph (it runs eagerly).
    """

    @torch.compiler.disable
    def __init__(self, doc_ids: torch.Tensor, multiple: int = 32):
        B, T = doc_ids.shape
        flat = doc_ids.reshape(-1)
        first = torch.ones_like(flat, dtype=torch.bool)                    # where a document starts
        first[1:] = flat[1:] != flat[:-1]
        first[::T] = True                                                  # documents never span two rows
        starts = first.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=starts.new_tensor([B * T]))
        padded = (lengths + multiple - 1) // multiple * multiple
        self.groups = []                                                   # (documents, L) token indices
        where = torch.empty(B * T, dtype=torch.long, device=flat.device)   # token -> row of the concatenated output
        offset = 0
        for L in padded.unique().tolist():
            sel = (padded == L).nonzero().squeeze(1)
            ar = torch.arange(L, device=flat.device)
            idx = starts[sel, None] + ar
            valid = ar < lengths[sel, None]
            self.groups.append(torch.where(valid, idx, starts[sel, None]))  # padding re-reads a real token
            where[idx[valid]] = offset + torch.arange(idx.numel(), device=flat.device).view_as(idx)[valid]
            offset += idx.numel()
        self.where = where

    @torch.compiler.disable
    def attention(self, q, k, v, dropout: float = 0.0):
        """q (B, T, heads, d), k/v (B, T, kv_heads, d) -> (B, T, heads, d)."""
        B, T = q.shape[:2]
        qf, kf, vf = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
        outs = []
        for idx in self.groups:  # (n, L, heads, d) -> (n, heads, L, d) for SDPA
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (qf, kf, vf))
            y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, dropout_p=dropout,
                                               enable_gqa=ks.shape[1] != qs.shape[1])
            outs.append(y.transpose(1, 2).reshape(-1, *q.shape[2:]))
        return torch.cat(outs)[self.where].view(q.shape)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where a new document starts: RoPE sees each document as if alone.

    [[0,0,0,1,1,-1]] -> [[0,1,2,0,1,0]]: position = index - index of the document's first token.
    """
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


_compiled_flex = None


def _flex_attention(q, k, v, block_mask, enable_gqa: bool):
    """FlexAttention, compiled on GPU (uncompiled it materialises every score); eager elsewhere (tests)."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


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
                logits_to_keep: int = 0, doc_ids: torch.Tensor | None = None, mask: AttentionMask | None = None):
        """input_ids (B, T). targets (B, T): the token that should follow each position, -100 = no loss there.
        cache: a KVCache to read past keys from and append to. attention_mask (B, cache+T): 1 real, 0 padding.
        logits_to_keep: return logits for only the last N positions (generation needs only the last), or for the
        positions in a 1-D index tensor (RL scores only the reply tokens of packed rollouts).
        doc_ids (B, T): packed rows, document id per token: attention stays inside each document and positions
        restart per document. mask: an AttentionMask built already (e.g. shared by teacher and student); pass
        position_ids with it.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if doc_ids is not None:
            if cache is not None or attention_mask is not None or mask is not None:
                raise ValueError("doc_ids (packed training rows) cannot be combined with a KV cache, attention_mask "
                                 "or a prebuilt mask")
            # dropout is not supported by FlexAttention: use per-document SDPA when it is active
            backend = "varlen" if self.config.dropout and self.training else "auto"
            dev = input_ids.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.model.norm.weight.dtype
            mask = AttentionMask.documents(doc_ids, backend, dt)
            position_ids = document_positions(doc_ids) if position_ids is None else position_ids
        elif mask is None:
            mask = AttentionMask.for_positions(T, start, attention_mask, input_ids.device)
        elif position_ids is None:
            raise ValueError("a prebuilt mask needs position_ids (e.g. document_positions(doc_ids))")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x, aux_loss = self.model(input_ids, position_ids, mask, cache)
        if cache is not None:
            cache.length += T
        if targets is not None:
            loss = cross_entropy(x, self.lm_head.weight, targets)
            if aux_loss is not None and self.training:  # MoE: keep the router's load balanced
                loss = loss + self.config.router_aux_loss_coef * aux_loss
            return loss
        if isinstance(logits_to_keep, torch.Tensor):  # positions to score (as in transformers), e.g. RL replies
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
