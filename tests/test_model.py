"""Model maths against float64 references written out here by hand (naive attention, complex-number RoPE, ...)."""
import math

import pytest
import torch
import torch.nn.functional as F

import minimind.loss as mloss
from minimind.config import PRESETS, ModelConfig, preset
from minimind.model import (MLP, Attention, AttentionMask, KVCache, MiniMindForCausalLM, MoE, RotaryEmbedding, apply_rope,
                            rope_inv_freq)


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, rope_theta=1e4, max_position_embeddings=512)
    return ModelConfig(**{**base, **kw})


def small_model(seed=0, dtype=torch.float64, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(small_config(**kw)).to(dtype).eval()
    with torch.no_grad():  # norm gains away from 1 so a missing/misplaced norm cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def ids(B, T, V=97, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Hand-written references
# ---------------------------------------------------------------------------------------------------------------
def ref_cos_sin(positions, head_dim, theta):
    """fp64 cos/sin in the HF half-split layout: pair i is (x[i], x[i + d/2]), angle pos * theta^(-2i/d)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = positions.double()[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def ref_rope_complex(x, positions, inv_freq):
    """RoPE as complex multiplication: z_i = x[i] + j x[i+d/2] is multiplied by exp(j * pos * f_i). x (T, d)."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h], x[..., h:])
    z = z * torch.polar(torch.ones_like(inv_freq), positions.double()[:, None] * inv_freq)
    return torch.cat([z.real, z.imag], dim=-1)


def ref_rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_attention(attn: Attention, x, cos, sin, eps, key_mask=None):
    """Naive causal attention: explicit matmuls, K/V repeated per group, -inf above the diagonal, softmax."""
    B, T, _ = x.shape
    H, K, d = attn.n_heads, attn.n_kv, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, d)
    k = (x @ attn.k_proj.weight.T).view(B, T, K, d)
    v = (x @ attn.v_proj.weight.T).view(B, T, K, d)
    q, k = ref_rms(q, attn.q_norm.weight, eps), ref_rms(k, attn.k_norm.weight, eps)
    rot = lambda t: torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)  # noqa: E731
    c, s = cos[:, :, None], sin[:, :, None]
    q, k = q * c + rot(q) * s, k * c + rot(k) * s
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)   # query head h uses kv h // group
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool() | torch.eye(T, dtype=torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * d)
    return y @ attn.o_proj.weight.T


# ---------------------------------------------------------------------------------------------------------------
# Attention, GQA, RoPE
# ---------------------------------------------------------------------------------------------------------------
def test_sdpa_attention_equals_naive_causal_softmax():
    cfg = small_config()
    torch.manual_seed(0)
    attn = Attention(cfg, 0).double().eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    B, T = 3, 11
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)
    cos, sin = ref_cos_sin(torch.arange(T).expand(B, T), cfg.head_dim, cfg.rope_theta)
    want = ref_attention(attn, x, cos, sin, cfg.rms_norm_eps)
    with torch.no_grad():
        got_causal = attn(x, cos, sin, AttentionMask.causal())             # is_causal fast path
        bool_mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        got_masked = attn(x, cos, sin, AttentionMask.padded(bool_mask))    # explicit-mask path
    torch.testing.assert_close(got_causal, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_masked, want, rtol=0, atol=1e-12)


def test_padding_mask_equals_naive_attention_with_key_mask():
    cfg = small_config()
    torch.manual_seed(3)
    model = small_model()
    attn = model.model.layers[0].self_attn
    B, T = 2, 9
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)
    key_mask = torch.ones(B, T, dtype=torch.long)
    key_mask[0, :4] = 0                                                      # left padding on row 0
    cos, sin = ref_cos_sin(torch.arange(T).expand(B, T), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        got = attn(x, cos, sin, AttentionMask.for_positions(T, 0, key_mask, x.device))
    want = ref_attention(attn, x, cos, sin, cfg.rms_norm_eps, key_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def gqa_to_mha_state(sd, cfg):
    """Repeat each K/V head's projection rows for every query head in its group."""
    H, K, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    out = {}
    for name, w in sd.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = w.view(K, d, h).repeat_interleave(H // K, dim=0).reshape(H * d, h)
        out[name] = w
    return out


@pytest.mark.parametrize("with_cache", [False, True])
def test_gqa_equals_mha_with_repeated_kv(with_cache):
    gqa = small_model(num_attention_heads=4, num_key_value_heads=2)
    mha = small_model(seed=5, num_attention_heads=4, num_key_value_heads=4)
    kv_rows = lambda m: m.model.layers[0].self_attn.k_proj.weight.shape[0]  # noqa: E731
    assert 2 * kv_rows(gqa) == kv_rows(mha)
    mha.load_state_dict(gqa_to_mha_state(gqa.state_dict(), gqa.config))
    x = ids(2, 10)
    with torch.no_grad():
        if with_cache:  # decode path: explicit mask + enable_gqa over the cache
            outs = []
            for m in (gqa, mha):
                cache = KVCache(m.config, 2, 10, dtype=torch.float64)
                outs.append(torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache)
                                                                    for t in range(6, 10)], 1))
            a, b = outs
        else:
            a, b = gqa(x), mha(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Negative control: MHA with *un*-repeated (different) K/V heads gives different logits.
    other = small_model(seed=5, num_attention_heads=4, num_key_value_heads=4)
    with torch.no_grad():
        assert (other(x) - b).abs().max() > 1e-4


def test_rope_matches_complex_rotation_and_module_cos_sin():
    cfg = small_config(head_dim=32)
    inv, scale = rope_inv_freq(cfg)
    assert scale == 1.0
    want_inv = 1.0 / cfg.rope_theta ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    torch.testing.assert_close(inv.double(), want_inv, rtol=1e-7, atol=0)
    pos = torch.tensor([0, 1, 7, 100, 511])
    x = torch.randn(len(pos), 32, dtype=torch.float64)
    cos, sin = ref_cos_sin(pos[None], 32, cfg.rope_theta)
    got = apply_rope(x[None, :, None, :], cos, sin)[0, :, 0]
    torch.testing.assert_close(got, ref_rope_complex(x, pos, want_inv), rtol=0, atol=1e-12)
    # The module's fp32 cos/sin agree with the fp64 ones to fp32 precision.
    mcos, msin = RotaryEmbedding(cfg)(pos[None])
    torch.testing.assert_close(mcos.double(), cos, rtol=0, atol=2e-6 * 511)
    torch.testing.assert_close(msin.double(), sin, rtol=0, atol=2e-6 * 511)


@pytest.mark.parametrize("m,n,s", [(0, 0, 5), (3, 10, 1), (17, 4, 123), (250, 1, 1000)])
def test_rope_scores_depend_only_on_relative_position(m, n, s):
    cfg = small_config()
    inv = rope_inv_freq(cfg)[0].double()
    g = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randn(cfg.head_dim, dtype=torch.float64, generator=g)
    k = torch.randn(cfg.head_dim, dtype=torch.float64, generator=g)

    def score(pq, pk):
        ang = torch.tensor([pq, pk], dtype=torch.float64)[:, None] * inv
        ang = torch.cat([ang, ang], -1)
        rq = apply_rope(q[None, None, None], ang[None, :1].cos(), ang[None, :1].sin())
        rk = apply_rope(k[None, None, None], ang[None, 1:].cos(), ang[None, 1:].sin())
        return (rq * rk).sum().item()

    a, b = score(m, n), score(m + s, n + s)
    assert abs(a - b) <= 1e-10 * (1 + abs(a))
    assert abs(score(m, n + 1) - a) > 1e-6  # a different distance gives a different score


# ---------------------------------------------------------------------------------------------------------------
# Decoding, causality, padding
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kv_cache_decoding_equals_full_forward(dtype, atol):
    model = small_model(dtype=dtype)
    B, T = 2, 16
    x = ids(B, T)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, B, T, dtype=dtype)
        pieces = [model(x[:, :5], cache=cache)]                 # prefill
        pieces.append(model(x[:, 5:8], cache=cache))            # a chunk with a cache before it (explicit mask)
        for t in range(8, T):                                   # then one token at a time
            pieces.append(model(x[:, t:t + 1], cache=cache))
        assert cache.length == T
        step = torch.cat(pieces, dim=1)
        last = model(x[:, :T - 1], cache=KVCache(model.config, B, T, dtype=dtype), logits_to_keep=1)
    assert step.shape == full.shape
    torch.testing.assert_close(step, full, rtol=0, atol=atol)
    torch.testing.assert_close(last[:, 0], full[:, T - 2], rtol=0, atol=atol)
    assert full.abs().max() > 1e-3  # not trivially zero


def test_changing_a_future_token_never_changes_earlier_logits():
    model = small_model()
    x = ids(2, 14)
    for t in (0, 6, 13):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % model.config.vocab_size
        with torch.no_grad():
            a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
        assert (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-8   # every later position does change


def test_left_padded_batch_equals_unpadded_sequences():
    model = small_model()
    seqs = [ids(1, 12, seed=3)[0], ids(1, 7, seed=4)[0], ids(1, 3, seed=5)[0]]
    T = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, T - len(s):], mask[i, T - len(s):] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = ids(len(seqs), 1, seed=9)
    with torch.no_grad():
        padded = model(x, attention_mask=mask, position_ids=pos)
        cache = KVCache(model.config, len(seqs), T + 1, dtype=torch.float64)
        model(x, cache=cache, attention_mask=mask, position_ids=pos)
        mask2 = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.long)], 1)
        stepped = model(nxt, cache=cache, attention_mask=mask2, position_ids=pos[:, -1:] + 1)
        for i, s in enumerate(seqs):
            alone = model(torch.cat([s, nxt[i]])[None])
            torch.testing.assert_close(padded[i, -1], alone[0, -2], rtol=0, atol=1e-10)
            torch.testing.assert_close(stepped[i, 0], alone[0, -1], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# MLP and MoE
# ---------------------------------------------------------------------------------------------------------------
def test_moe_with_one_expert_equals_dense_mlp():
    cfg = small_config(use_moe=True, num_experts=1, num_experts_per_tok=1)
    torch.manual_seed(0)
    moe, mlp = MoE(cfg).double(), MLP(cfg.hidden_size, cfg.intermediate_size).double()
    mlp.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 7, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], mlp(x), rtol=0, atol=1e-12)
        silu = lambda t: t / (1 + torch.exp(-t))  # noqa: E731
        w = mlp
        want = (silu(x @ w.gate_proj.weight.T) * (x @ w.up_proj.weight.T)) @ w.down_proj.weight.T
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=1e-12)
    # The whole model: the MoE model with one expert == the dense model with the same weights.
    dense = small_model()
    sparse = small_model(seed=7, use_moe=True, num_experts=1, num_experts_per_tok=1)
    sd = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    sd.update({k: v for k, v in sparse.state_dict().items() if k.endswith("mlp.gate.weight")})
    sparse.load_state_dict(sd)
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("E,k,norm", [(4, 1, True), (4, 2, True), (3, 2, False)])
def test_moe_equals_per_token_loop(E, k, norm):
    cfg = small_config(use_moe=True, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm)
    torch.manual_seed(E * 10 + k)
    moe = MoE(cfg).double()
    x = torch.randn(3, 5, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        got, got_aux = moe(x)
        flat = x.reshape(-1, cfg.hidden_size)
        want = torch.zeros_like(flat)
        counts = torch.zeros(E)
        prob_sum = torch.zeros(E, dtype=torch.float64)
        for n in range(flat.shape[0]):
            p = torch.softmax(flat[n] @ moe.gate.weight.T, -1)
            prob_sum += p
            top = sorted(range(E), key=lambda e: -p[e].item())[:k]
            z = sum(p[e] for e in top) if norm else 1.0
            for e in top:
                counts[e] += 1
                want[n] += p[e] / z * moe.experts[e](flat[n][None])[0]
        share = counts.double() / (flat.shape[0] * k)
        aux = E * (share * prob_sum / flat.shape[0]).sum()
    torch.testing.assert_close(got.reshape(-1, cfg.hidden_size), want, rtol=0, atol=1e-12)
    assert abs(got_aux.item() - aux.item()) < 1e-6   # token shares are counted in fp32
    assert counts.sum() == flat.shape[0] * k


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------------------
def hand_count(c: dict, vocab=6400) -> int:
    """Count tensor by tensor, as the module tree would, independently of ModelConfig.num_parameters()."""
    h, L, H, K = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    d = h // H
    inter = c.get("intermediate_size") or math.ceil(h * math.pi / 64) * 64
    tensors = [(vocab, h), (h,)]                                 # embed_tokens (tied lm_head), final norm
    for _ in range(L):
        tensors += [(H * d, h), (K * d, h), (K * d, h), (h, H * d)]       # q k v o
        tensors += [(d,), (d,)]                                           # q_norm, k_norm
        tensors += [(inter, h), (inter, h), (h, inter)]                   # gate up down
        tensors += [(h,), (h,)]                                           # input / post-attention norms
    return sum(math.prod(t) for t in tensors)


@pytest.mark.parametrize("name,millions,h,L,H,K", [("26M", 26, 512, 8, 8, 2), ("64M", 64, 768, 8, 8, 4)])
def test_preset_parameter_counts(name, millions, h, L, H, K):
    cfg = preset(name)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (h, L, H, K)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = MiniMindForCausalLM(cfg)
    built = model.num_parameters()
    assert built == sum(p.numel() for p in set(model.parameters()))
    assert built == cfg.num_parameters()
    assert built == hand_count(PRESETS[name])
    assert abs(built / 1e6 - millions) < 1.0, built


@pytest.mark.parametrize("kw", [dict(tie_word_embeddings=False), dict(attention_bias=True, qk_norm=False),
                                dict(use_moe=True, num_experts=3, moe_intermediate_size=32)])
def test_config_formula_matches_built_model_for_variants(kw):
    cfg = small_config(**kw)
    with torch.device("meta"):
        model = MiniMindForCausalLM(cfg)
    assert model.num_parameters() == cfg.num_parameters()


# ---------------------------------------------------------------------------------------------------------------
# YaRN
# ---------------------------------------------------------------------------------------------------------------
def test_yarn_factor_one_and_no_scaling_equal_default_rope():
    base_cfg = small_config(head_dim=64)
    inv, scale = rope_inv_freq(base_cfg)
    want = 1.0 / base_cfg.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(inv.double(), want, rtol=1e-7, atol=0)
    for rs in (None, {"rope_type": "default"}, {"rope_type": "yarn", "factor": 1.0,
                                                  "original_max_position_embeddings": 256}):
        inv2, scale2 = rope_inv_freq(small_config(head_dim=64, rope_scaling=rs))
        assert torch.equal(inv2, inv) and scale2 == scale == 1.0


def test_yarn_scaled_frequencies():
    factor, orig, d = 4.0, 256, 64
    cfg = small_config(head_dim=d, rope_scaling={"rope_type": "yarn", "factor": factor,
                                                 "original_max_position_embeddings": orig})
    inv, scale = rope_inv_freq(cfg)
    base = (1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
    assert torch.all(inv <= base * (1 + 1e-6)) and torch.all(inv >= base / factor * (1 - 1e-6))
    rotations = orig * base.double() / (2 * math.pi)    # turns of each pair over the original context
    fast, slow = rotations > 32, rotations < 1          # YaRN's beta_fast=32, beta_slow=1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(inv[fast], base[fast])             # high frequencies kept (extrapolated)
    torch.testing.assert_close(inv[slow], base[slow] / factor)    # low frequencies interpolated
    assert torch.all(inv[1:] <= inv[:-1])                          # still monotone
    # Reference (YaRN paper / HF _compute_yarn_parameters): the pair index that turns n times over the original
    # context is d/2 * log(orig / (2 pi n)) / log(theta); pairs between the beta_fast and beta_slow indices
    # (rounded outwards) blend linearly from keep to interpolate.
    idx = lambda n: (d / 2) * math.log(orig / (2 * math.pi * n)) / math.log(cfg.rope_theta)  # noqa: E731
    lo, hi = max(math.floor(idx(32)), 0), min(math.ceil(idx(1)), d - 1)
    want = []
    for i, f in enumerate(base.double().tolist()):
        r = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        want.append(f * (1 - r) + f / factor * r)
    torch.testing.assert_close(inv.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert scale == pytest.approx(0.1 * math.log(factor) + 1.0)
    cos, sin = RotaryEmbedding(cfg)(torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, scale))  # the YaRN attention factor scales cos/sin
    lin, _ = rope_inv_freq(small_config(head_dim=d, rope_scaling={"rope_type": "linear", "factor": factor}))
    torch.testing.assert_close(lin, base / factor)


# ---------------------------------------------------------------------------------------------------------------
# Chunked cross-entropy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [3, 1000])
def test_chunked_cross_entropy_equals_full_logits(monkeypatch, chunk):
    monkeypatch.setattr(mloss, "_chunk_rows", lambda vocab: chunk)
    g = torch.Generator().manual_seed(0)
    N, H, V = 17, 12, 31
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 4, 5, 16]] = -100
    loss = mloss.cross_entropy(h, w, t)
    (loss * 1.7).backward()          # a non-unit upstream gradient must scale the stored gradients
    gh, gw = h.grad.clone(), w.grad.clone()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = F.cross_entropy(h2 @ w2.T, t, ignore_index=-100)
    (want * 1.7).backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh, h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, w2.grad, rtol=0, atol=1e-12)
    assert torch.all(gh[[0, 4, 5, 16]] == 0)
    with torch.no_grad():             # the evaluation path (no autograd Function)
        torch.testing.assert_close(mloss.cross_entropy(h, w, t), want.detach(), rtol=0, atol=1e-12)


def test_model_loss_equals_cross_entropy_of_logits(monkeypatch):
    monkeypatch.setattr(mloss, "_chunk_rows", lambda vocab: 5)
    model = small_model().train()
    x = ids(2, 9)
    y = ids(2, 9, seed=2)
    y[0, :3] = -100
    loss = model(x, targets=y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = F.cross_entropy(model(x).reshape(-1, 97), y.reshape(-1), ignore_index=-100)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-11, msg=n)


def test_cross_entropy_under_bf16_autocast_is_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    t = torch.randint(0, 50, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mloss.cross_entropy(h, w, t)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = F.cross_entropy(h2 @ w2.T, t)
    want.backward()
    assert abs(loss.item() - want.item()) < 2e-2 * want.item()
    assert (h.grad.double() - h2.grad).norm() < 5e-2 * h2.grad.norm()
    assert (w.grad.double() - w2.grad).norm() < 5e-2 * w2.grad.norm()
