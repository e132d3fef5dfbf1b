"""LoRA: only A/B train, exact start (B = 0), merge equality, small adapter files that round-trip, the CLI."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from conftest import run_script
from minimind import DEFAULT_TOKENIZER
from minimind.checkpoint import CheckpointError, load_model, save_model
from minimind.cli import UsageError
from minimind.config import preset
from minimind.lora import (ADAPTER_WEIGHTS, LoRALinear, cast_frozen, inject_lora, load_with_adapter,
                           lora_layers, merge_lora, save_adapter, trainable_parameters)
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def lora_tok():
    """The bundled tokenizer when present; otherwise a small BPE trained here (keeps this file self-contained)."""
    if os.path.isfile(os.path.join(DEFAULT_TOKENIZER, "tokenizer.json")):
        return Tokenizer.load(DEFAULT_TOKENIZER)
    texts = [f"question {i}: what is {i} plus {i}? answer: {2 * i}. 你好，世界。" for i in range(300)]
    return train_bpe(iter(texts), vocab_size=400, show_progress=False)


LORA_VOCAB = 256  # in-memory tests need no tokenizer: a small vocabulary keeps them fast


def lora_tiny_model(vocab: int, seed: int = 0, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, **kw)
    return MiniMindForCausalLM(cfg)


@pytest.fixture(scope="module")
def lora_base_dir(lora_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "base"
    save_model(lora_tiny_model(lora_tok.vocab_size), lora_tok, str(d))
    return str(d)


def lora_batch(vocab, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (B, T), generator=g)
    return x, torch.roll(x, -1, dims=1)


def lora_train(model, vocab, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for s in range(steps):
        x, y = lora_batch(vocab, seed=s)
        model(x, targets=y).backward()
        opt.step()
        opt.zero_grad()


def test_only_a_and_b_train_and_count():
    V = LORA_VOCAB
    model = lora_tiny_model(V)
    wrapped = inject_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    assert len(wrapped) == 2 * 3 and all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj") for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for m in lora_layers(model).values())
    assert trainable_parameters(model) == expected
    x, y = lora_batch(V)
    model(x, targets=y).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    # B = 0 at init: dL/dA = (dL/dh B) ... is exactly zero, dL/dB is not; one step later A starts to move too
    for m in lora_layers(model).values():
        assert torch.count_nonzero(m.lora_A.weight.grad) == 0
        assert torch.count_nonzero(m.lora_B.weight.grad) > 0


def test_init_is_exactly_the_base():
    V = LORA_VOCAB
    base = lora_tiny_model(V)
    model = lora_tiny_model(V)
    inject_lora(model)
    x, _ = lora_batch(V)
    with torch.no_grad():
        assert torch.equal(base(x), model(x))


def test_lora_linear_matches_float64_reference():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12, bias=True), rank=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    ref = x.double() @ W.T + b + (6 / 3) * (x.double() @ A.T) @ B.T
    assert torch.allclose(layer(x).double(), ref, atol=1e-5)
    assert torch.allclose(layer.merged()(x).double(), ref, atol=1e-5)


def test_merge_equals_wrapped_after_training():
    V = LORA_VOCAB
    model = lora_tiny_model(V)
    inject_lora(model, rank=4, alpha=8)
    lora_train(model, V)
    x, _ = lora_batch(V, seed=99)
    with torch.no_grad():
        before = model(x)
        base = lora_tiny_model(V)(x)
        merged = merge_lora(model)
        assert not lora_layers(merged)
        after = merged(x)
    assert (before - base).abs().max() > 1e-3  # training moved the outputs: the check below is not vacuous
    assert (before - after).abs().max() <= 1e-5


def test_adapter_small_roundtrip_and_peft_names(lora_tok, lora_base_dir, tmp_path):
    V = lora_tok.vocab_size
    model = load_model(lora_base_dir)
    inject_lora(model, rank=4, alpha=8)
    lora_train(model, V)
    out = str(tmp_path / "adapter")
    save_adapter(model, out, lora_base_dir, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    files = sorted(os.listdir(out))
    assert files == ["adapter_base.json", "adapter_config.json", ADAPTER_WEIGHTS]
    size = os.path.getsize(os.path.join(out, ADAPTER_WEIGHTS))
    assert size < 0.25 * os.path.getsize(os.path.join(lora_base_dir, "model.safetensors"))
    assert 4 * trainable_parameters(model) <= size < 4 * trainable_parameters(model) + 16384  # A/B + header only
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors import safe_open
    with safe_open(os.path.join(out, ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    x, _ = lora_batch(V, seed=7)
    with torch.no_grad():
        want = model(x)
        wrapped = load_with_adapter(lora_base_dir, out, merge=False)
        assert torch.equal(wrapped(x), want)  # same tensors, same maths: bit-identical
        assert (load_with_adapter(None, out)(x) - want).abs().max() <= 1e-5  # base from the config, merged


def test_adapter_on_wrong_base(lora_tok, lora_base_dir, tmp_path, capsys):
    V = lora_tok.vocab_size
    model = load_model(lora_base_dir)
    inject_lora(model, ["q_proj"], rank=2, alpha=2)
    out = str(tmp_path / "a")
    save_adapter(model, out, lora_base_dir, ["q_proj"])
    other = str(tmp_path / "other")  # same shape, different weights: loads, with a warning
    save_model(lora_tiny_model(V, seed=5), lora_tok, other)
    load_with_adapter(other, out)
    assert "warning:" in capsys.readouterr().err
    load_with_adapter(lora_base_dir, out)
    assert "warning:" not in capsys.readouterr().err
    wider = str(tmp_path / "wider")  # another shape: a one-line CheckpointError naming the tensor
    torch.manual_seed(0)
    save_model(MiniMindForCausalLM(preset("tiny", vocab_size=V, hidden_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)),
               lora_tok, wider)
    with pytest.raises(CheckpointError, match="lora_A.weight has shape"):
        load_with_adapter(wider, out)


def test_bad_targets_are_usage_errors():
    with pytest.raises(UsageError, match="no Linear layer"):
        inject_lora(lora_tiny_model(LORA_VOCAB), ["qproj"])
    with pytest.raises(UsageError, match="lm_head"):
        inject_lora(lora_tiny_model(LORA_VOCAB), ["lm_head"])


def test_cast_frozen_is_exact_under_autocast():
    V = LORA_VOCAB
    a = lora_tiny_model(V)
    inject_lora(a, rank=4, alpha=8)
    for layer in lora_layers(a).values():
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    b = copy.deepcopy(a)
    cast_frozen(b, torch.bfloat16)
    assert b.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert b.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32
    assert b.model.embed_tokens.weight.dtype == torch.float32
    x, _ = lora_batch(V)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(a(x), b(x))


def test_train_lora_cli_and_merge(lora_tok, lora_base_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                  {"role": "assistant", "content": f"answer: {2 * i}."}]}) + "\n")
    ad, merged = tmp_path / "lora", tmp_path / "merged"
    r = run_script("train_lora.py", "--from_weight", lora_base_dir, "--data_path", data, "--out_dir", ad,
                   "--batch_size", 2, "--max_seq_len", 32, "--max_steps", 3, "--learning_rate", 1e-2, "--device", "cpu",
                   "--lora_rank", 4, "--lora_targets", "q_proj,v_proj", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(ad / ADAPTER_WEIGHTS) and os.path.isfile(ad / "metrics.jsonl")  # the log survives the save
    cfg = json.load(open(ad / "adapter_config.json"))
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["r"] == 4
    r = run_script("train_lora.py", "--merge", 1, "--from_weight", lora_base_dir, "--lora_path", ad,
                   "--out_dir", merged, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    x, _ = lora_batch(lora_tok.vocab_size)
    with torch.no_grad():
        want = load_with_adapter(lora_base_dir, str(ad), merge=False)(x)
        got = load_model(str(merged))(x)
        base = load_model(lora_base_dir)(x)
    assert (want - base).abs().max() > 1e-4  # the adapter learned something
    assert (want - got).abs().max() <= 1e-5
    r = run_script("train_lora.py", "--merge", 1, "--from_weight", lora_base_dir, "--out_dir", merged)
    assert r.returncode == 2 and r.stderr.startswith("error: --merge 1 needs --lora_path")


def test_peft_loads_our_adapter(lora_tok, lora_base_dir, tmp_path):
    """Interop (runs when the test extra has transformers + peft): PEFT on the HF twin gives our outputs."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    V = lora_tok.vocab_size
    model = load_model(lora_base_dir)
    inject_lora(model, rank=4, alpha=8)
    lora_train(model, V)
    out = str(tmp_path / "adapter")
    save_adapter(model, out, lora_base_dir, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(lora_base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    x, _ = lora_batch(V)
    with torch.no_grad():
        assert (peft_model(x).logits - model(x)).abs().max() <= 1e-4
