"""Interop: our model directories are Hugging Face checkpoints, and theirs (and MiniMind's) load here exactly.

Round trips are checked against transformers itself (the test extra `transformers`; those tests skip cleanly
without it): logits within 1e-4 in fp32, the same tokenizer ids and chat rendering, the same greedy generation.
Bad checkpoints must fail with one line naming the key or tensor, never load partially.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minimind import DEFAULT_TOKENIZER, hf
from minimind.checkpoint import CheckpointError, load_config, load_model, save_model
from minimind.config import ModelConfig
from minimind.model import AttentionMask, MiniMindForCausalLM, rope_inv_freq
from minimind.tokenizer import CHAT_TEMPLATE, Tokenizer, chatml_profile

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 logits, ours vs transformers


# ---------------------------------------------------------------------------------------------------------------
# helpers (prefixed interop_ to stay clear of other test files' fixtures)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="interop tests need the test extra: pip install transformers")


def interop_config(**kw) -> ModelConfig:
    base = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=512)
    return ModelConfig(**{**base, **kw})


def interop_perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm gains away from 1 and biases away from 0, so a mapping that ignored them would show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(torch.zeros_like(p) if "o_proj" in name else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def interop_inputs(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


def interop_hf_load(transformers, path, **kw):
    """AutoModelForCausalLM in fp32; fails if transformers had to invent or drop any tensor."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                   output_loading_info=True, **kw)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"transformers {key}: {info[key]}"
    return model.eval()


def interop_max_diff(ours: MiniMindForCausalLM, theirs, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - theirs(x).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Export: ours -> transformers
# ---------------------------------------------------------------------------------------------------------------
EXPORTS = {  # name: (our config overrides, the transformers class it must become)
    "qwen3-tied": (dict(qk_norm=True, tie_word_embeddings=True), "Qwen3ForCausalLM"),
    "qwen3-untied-qkv-bias": (dict(qk_norm=True, attention_bias=True, tie_word_embeddings=False),
                              "Qwen3ForCausalLM"),
    "qwen3-head_dim-yarn": (dict(qk_norm=True, head_dim=32, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}), "Qwen3ForCausalLM"),
    "qwen2-tied": (dict(qk_norm=False, attention_bias=True, rope_theta=1e6), "Qwen2ForCausalLM"),
    "llama-untied-linear": (dict(qk_norm=False, tie_word_embeddings=False, rope_theta=1e4,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}), "LlamaForCausalLM"),
    "qwen3moe-top2-norm": (dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                           "Qwen3MoeForCausalLM"),
    "qwen3moe-top2-nonorm-untied": (dict(use_moe=True, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                         moe_intermediate_size=32, tie_word_embeddings=False),
                                    "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits(transformers, tmp_path, name):
    overrides, arch = EXPORTS[name]
    torch.manual_seed(0)
    cfg = interop_config(**overrides)
    ours = interop_perturb(MiniMindForCausalLM(cfg))
    save_model(ours, None, str(tmp_path))
    theirs = interop_hf_load(transformers, tmp_path)
    assert type(theirs).__name__ == arch
    assert interop_max_diff(ours, theirs, interop_inputs(cfg.vocab_size)) < TOL
    # the config transformers parsed says what ours says
    c = theirs.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert c.tie_word_embeddings == cfg.tie_word_embeddings
    if cfg.use_moe:
        assert (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, c.decoder_sparse_step, c.mlp_only_layers) \
            == (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, 1, [])
    # and importing our own export gives back the same config
    assert load_config(str(tmp_path)) == cfg


@pytest.mark.parametrize("name, dtype", [("qwen3moe-top2-norm", torch.bfloat16), ("llama-untied-linear", torch.float16),
                                         ("qwen2-tied", torch.bfloat16)])
def test_export_in_half_precision(transformers, tmp_path, name, dtype):
    """bf16/fp16 exports: config.json says so, and both libraries read the same rounded weights alike."""
    torch.manual_seed(0)
    cfg = interop_config(**EXPORTS[name][0])
    save_model(interop_perturb(MiniMindForCausalLM(cfg)).to(dtype), None, str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["torch_dtype"] == str(dtype).replace("torch.", "")
    assert all(v.dtype == dtype for v in load_file(str(tmp_path / "model.safetensors")).values())
    ours = load_model(str(tmp_path)).eval()                   # cast to fp32 on load
    assert interop_max_diff(ours, interop_hf_load(transformers, tmp_path), interop_inputs(cfg.vocab_size)) < TOL


def test_export_config_json_carries_hf_meanings(tmp_path):
    """Our attention_bias is q/k/v only; Qwen3's covers o too, so the export adds zero o biases; Qwen2 needs none."""
    for overrides, model_type, o_bias in [(dict(qk_norm=True, attention_bias=True), "qwen3", True),
                                          (dict(qk_norm=False, attention_bias=True), "qwen2", False),
                                          (dict(qk_norm=False), "llama", False)]:
        cfg = interop_config(**overrides)
        save_model(MiniMindForCausalLM(cfg), None, str(tmp_path / model_type))
        d = json.loads((tmp_path / model_type / "config.json").read_text())
        assert d["model_type"] == model_type and d["architectures"] == [hf.ARCHITECTURES[model_type]]
        assert d["head_dim"] == cfg.head_dim and d["hidden_act"] == "silu"
        assert "qk_norm" not in d and "use_moe" not in d          # only keys transformers understands
        assert d["rope_theta"] == d["rope_parameters"]["rope_theta"] == cfg.rope_theta
        tensors = load_file(str(tmp_path / model_type / "model.safetensors"))
        o = [k for k in tensors if k.endswith("o_proj.bias")]
        assert bool(o) == o_bias and all(not tensors[k].any() for k in o)
        if model_type == "qwen3":
            assert d["attention_bias"] is True
        if model_type == "llama":
            assert d["attention_bias"] is False and d["mlp_bias"] is False


def test_moe_without_qk_norm_still_saves_and_loads(tmp_path):
    """No transformers class is MoE without q/k norm: the model is saved in our own format instead of failing."""
    cfg = interop_config(use_moe=True, qk_norm=False, moe_intermediate_size=32)
    model = interop_perturb(MiniMindForCausalLM(cfg))
    save_model(model, None, str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text())
    assert "architectures" not in d and d["use_moe"] and not d["qk_norm"]
    x = interop_inputs(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path)).eval()(x), model(x))


def test_rope_scaling_is_really_checked(transformers, tmp_path):
    """Control: the same export with rope_scaling removed from config.json gives different logits in transformers,
    so the 1e-4 agreement above is evidence the YaRN parameters were carried over."""
    overrides, _ = EXPORTS["qwen3-head_dim-yarn"]
    torch.manual_seed(0)
    cfg = interop_config(**overrides)
    ours = interop_perturb(MiniMindForCausalLM(cfg))
    save_model(ours, None, str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text())
    d["rope_scaling"], d["rope_parameters"] = None, {"rope_type": "default", "rope_theta": cfg.rope_theta}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert interop_max_diff(ours, interop_hf_load(transformers, tmp_path), interop_inputs(cfg.vocab_size)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Import: transformers -> ours
# ---------------------------------------------------------------------------------------------------------------
HF_SMALL = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=512)
IMPORTS = {  # name: (config class, overrides, saved dtype, max_shard_size)
    "qwen3-tied-fp32": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True), torch.float32, None),
    "qwen3-bias-bf16-sharded": ("Qwen3Config", dict(head_dim=16, attention_bias=True), torch.bfloat16, "20KB"),
    "qwen2-tied-fp16-sharded": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6), torch.float16,
                                "20KB"),
    "llama-untied-yarn-fp32": ("LlamaConfig", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), torch.float32, None),
    "llama-bias-bf16": ("LlamaConfig", dict(attention_bias=True, tie_word_embeddings=True), torch.bfloat16, None),
    "qwen3moe-norm-bf16-sharded": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=32, norm_topk_prob=True),
                                   torch.bfloat16, "20KB"),
    "qwen3moe-nonorm-fp32": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, norm_topk_prob=False),
                             torch.float32, None),
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_transformers_checkpoint_loads_into_ours(transformers, tmp_path, name):
    cls, overrides, dtype, shard = IMPORTS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**HF_SMALL, **overrides)
    model = interop_perturb(transformers.AutoModelForCausalLM.from_config(config))
    model.to(dtype).save_pretrained(str(tmp_path), **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    theirs = interop_hf_load(transformers, tmp_path)          # the same file, read by transformers, in fp32
    ours = load_model(str(tmp_path))                          # fp32 by default, whatever the stored dtype
    assert ours.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    x = interop_inputs(160)
    assert interop_max_diff(ours.eval(), theirs, x) < TOL
    # --from_weight goes through the same loader (train.build_model)
    from minimind.train import build_model
    args = argparse.Namespace(from_weight=str(tmp_path), config=None)
    again = build_model(args, 160).eval()
    assert torch.equal(again(x), ours(x))
    # and re-exporting an import is again a transformers checkpoint (Llama with biases becomes Qwen2: same maths)
    save_model(ours, None, str(tmp_path / "re"))
    assert interop_max_diff(ours, interop_hf_load(transformers, tmp_path / "re"), x) < TOL


def test_qwen3_moe_per_expert_names_on_disk(transformers, tmp_path):
    """transformers 5 fuses experts in memory (gate_up_proj) but writes per-expert tensors; we read both."""
    config = transformers.Qwen3MoeConfig(**HF_SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32)
    model = interop_perturb(transformers.AutoModelForCausalLM.from_config(config))
    model.save_pretrained(str(tmp_path))
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in on_disk
    fused = {k: v for k, v in model.state_dict().items()}
    if "model.layers.0.mlp.experts.gate_up_proj" in fused:   # this transformers version fuses: load that form too
        save_file({k: v.contiguous() for k, v in fused.items() if k != "lm_head.weight" or
                   not config.tie_word_embeddings}, str(tmp_path / "model.safetensors"))
        ours = load_model(str(tmp_path))
        assert interop_max_diff(ours.eval(), model.float(), interop_inputs(160)) < TOL


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------------------------
CONVS = [
    [{"role": "user", "content": "What does `os.path.join` do?"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "hi 🎉\nline two"},
     {"role": "assistant", "content": "Hello!\n\n    code()"}, {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def interop_chat_ids(hf_tok, conv, gen):
    out = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_autotokenizer_on_our_export_matches(transformers, tmp_path):
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    save_model(MiniMindForCausalLM(interop_config(vocab_size=tok.vocab_size)), tok, str(tmp_path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Hello, world!", "机器学习 🎉 emoji", "  def f(x):\n\treturn x\n", "<|im_start|>user\nhi<|im_end|>"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    for conv in CONVS:
        for gen in (False, True):
            assert hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == \
                Tokenizer.chat_text(conv, add_generation_prompt=gen)
            assert interop_chat_ids(hf_tok, conv, gen) == tok.render_chat(conv, add_generation_prompt=gen)[0]


# Qwen2.5-Instruct's chat template (ChatML; inserts a default system prompt when there is none).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
# MiniMind-3's (abridged, tools left out): every assistant turn opens with an empty think block.
MINIMIND3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if open_thinking is defined and open_thinking is true %}{{- '<think>\\n' }}"
    "{%- else %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
# Not ChatML-compatible: Llama-3 headers, and a Qwen3-style template that adds a think block to the last reply only.
LLAMA3_TEMPLATE = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
                   "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{%- endfor %}"
                   "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{%- endif %}")
QWEN3_LIKE_TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
                       "{%- if m.role == 'assistant' and loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
                       "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
                       "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def interop_qwen_like_tokenizer(folder: Path, template: str) -> Path:
    """A small byte-level BPE laid out like Qwen's: the ChatML specials come last, with large ids."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.normalizer = normalizers.NFC()           # Qwen2's pipeline: NFC, its split regex, then byte-level
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = ["hello world, the quick brown fox " * 5, "机器学习 你好 " * 5, "def f(x):\n    return x\n" * 5]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    n = tok.get_vocab_size()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
        "add_prefix_space": False, "chat_template": template,
        "added_tokens_decoder": {str(n - 3 + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                  "normalized": False, "single_word": False}
                                 for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}}))
    return folder


def test_foreign_chatml_template_is_honoured(transformers, tmp_path):
    """A Qwen-layout tokenizer (specials at the end, Qwen2.5's template with its default system prompt)."""
    folder = interop_qwen_like_tokenizer(tmp_path / "qwen", QWEN25_TEMPLATE)
    tok = Tokenizer.load(str(folder))
    n = tok.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (n - 3, n - 2, n - 1)     # looked up by content, not position
    assert tok.chat_profile() == ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    for conv in CONVS:
        for gen in (False, True):
            ids, mask = tok.render_chat(conv, add_generation_prompt=gen)
            assert tok.decode(ids) == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ids == interop_chat_ids(hf_tok, conv, gen)
            replies = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
            assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(replies)
    # saving (as every train_*.py does) keeps Qwen's own tokenizer settings
    tok.save(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "Qwen2Tokenizer" and saved["bos_token"] is None
    assert saved["chat_template"] == QWEN25_TEMPLATE
    back = Tokenizer.load(str(tmp_path / "saved"))
    assert back.render_chat(CONVS[1], True) == tok.render_chat(CONVS[1], True)


def test_qwen_instruct_like_model_fine_tunes_and_exports(transformers, tmp_path):
    """Import a Qwen2.5-Instruct-shaped checkpoint (its tokenizer, padded vocabulary, eos = <|im_end|>), take a
    training step on a chat with our loss, save: transformers reads the result with the same logits and stops
    generation on the same tokens as our engine."""
    import shutil
    src = interop_qwen_like_tokenizer(tmp_path / "qwen", QWEN25_TEMPLATE)
    n = Tokenizer.load(str(src)).vocab_size
    config = transformers.Qwen2Config(**{**HF_SMALL, "vocab_size": n + 61}, tie_word_embeddings=True,
                                      bos_token_id=n - 3, eos_token_id=n - 1, rope_theta=1e6)
    interop_perturb(transformers.AutoModelForCausalLM.from_config(config)).to(torch.bfloat16).save_pretrained(
        str(src))
    model, tok = load_model(str(src)), Tokenizer.load(str(src))
    assert model.config.vocab_size == n + 61 > tok.vocab_size and model.config.attention_bias
    ids, mask = tok.render_chat(CONVS[2])
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if m else -100 for t, m in zip(ids[1:], mask[1:])]])
    loss = model(x, targets=y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    save_model(model, tok, str(tmp_path / "out"))
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, tok.pad_id] == [n - 1, n - 3]
    saved_tok = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved_tok["chat_template"] == QWEN25_TEMPLATE and saved_tok["tokenizer_class"] == "Qwen2Tokenizer"
    theirs = interop_hf_load(transformers, tmp_path / "out")
    assert interop_max_diff(model.eval(), theirs, interop_inputs(n)) < TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert interop_chat_ids(hf_tok, CONVS[1], True) == tok.render_chat(CONVS[1], add_generation_prompt=True)[0]
    shutil.rmtree(src)


def test_reply_prefix_template_and_jinja_file(tmp_path):
    """MiniMind-3's template opens every reply with an empty think block; it may live in chat_template.jinja."""
    import jinja2
    folder = interop_qwen_like_tokenizer(tmp_path / "mm3", "")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").write_text(MINIMIND3_TEMPLATE)
    tok = Tokenizer.load(str(folder))
    assert tok.chat_template == MINIMIND3_TEMPLATE
    assert tok.chat_profile() == (None, "<think>\n\n</think>\n\n")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    for conv in CONVS:
        for gen in (False, True):
            ids, mask = tok.render_chat(conv, add_generation_prompt=gen)
            assert tok.decode(ids) == env.from_string(MINIMIND3_TEMPLATE).render(messages=conv,
                                                                                add_generation_prompt=gen)
            # the think block is the template's, not the model's: only the reply itself is supervised
            replies = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
            assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(replies)


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, QWEN3_LIKE_TEMPLATE, "{{ undefined_call() }}"])
def test_non_chatml_template_is_refused(tmp_path, template):
    folder = interop_qwen_like_tokenizer(tmp_path / "t", template)
    tok = Tokenizer.load(str(folder))            # loading is fine (pretraining needs no template) ...
    with pytest.raises(CheckpointError, match="chat_template") as e:
        tok.render_chat(CONVS[0], add_generation_prompt=True)   # ... rendering a chat is refused, in one line
    assert "\n" not in str(e.value)
    assert chatml_profile(CHAT_TEMPLATE) == (None, "")


# ---------------------------------------------------------------------------------------------------------------
# Generation: our engine and transformers' generate agree token for token
# ---------------------------------------------------------------------------------------------------------------
def test_greedy_generation_matches_transformers(transformers, tmp_path):
    from minimind.generate import generate_ids
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    torch.manual_seed(3)
    cfg = interop_config(vocab_size=tok.vocab_size, qk_norm=True)
    model = interop_perturb(MiniMindForCausalLM(cfg))
    with torch.no_grad():   # rigged: larger weights make a random model's greedy path varied, not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(12.0)
    save_model(model, tok, str(tmp_path))
    prompt = tok.render_chat([{"role": "user", "content": "What does os.path.join do?"}],
                             add_generation_prompt=True)[0]
    ours = list(generate_ids(model, prompt, max_new_tokens=24, stop_ids=(tok.eos_id, tok.pad_id)))
    hf_model = interop_hf_load(transformers, tmp_path)
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, eos_token_id=[tok.eos_id, tok.pad_id],
                            pad_token_id=tok.pad_id)
    theirs = [t for t in out[0, len(prompt):].tolist() if t not in (tok.eos_id, tok.pad_id)]
    assert len(set(ours)) >= 5, f"degenerate generation {ours}: the comparison would be too easy"
    assert tok.decode(ours) == tok.decode(theirs) and ours == theirs


# ---------------------------------------------------------------------------------------------------------------
# MiniMind's own checkpoints (.pth state dicts, transformers-format dirs)
# ---------------------------------------------------------------------------------------------------------------
def interop_minimind_pth(model: MiniMindForCausalLM, path: Path, wrap=None) -> Path:
    """What MiniMind's trainer writes: {name: fp16 tensor} of raw_model.state_dict() (tied head included)."""
    sd = {k: v.half() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd or not model.config.tie_word_embeddings
    torch.save(wrap(sd) if wrap else sd, path)
    return path


def interop_fp16_twin(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    twin = MiniMindForCausalLM(model.config)
    twin.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return twin.eval()


@pytest.mark.parametrize("kind", ["minimind3", "minimind3-moe", "minimind2", "orig_mod-resume"])
def test_minimind_pth_loads_with_config_from_shapes(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "minimind2":   # MiniMind2: no q/k norm, 8 heads, eps 1e-5
        cfg = interop_config(qk_norm=False, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5)
    elif kind == "minimind3-moe":
        cfg = interop_config(use_moe=True, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=96)
    else:                     # MiniMind-3: q/k norm, head_dim from q_norm, eps 1e-6
        cfg = interop_config(num_key_value_heads=1)
    model = interop_perturb(MiniMindForCausalLM(cfg))
    wrap = (lambda sd: {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "epoch": 1, "step": 10}) \
        if kind == "orig_mod-resume" else None
    pth = interop_minimind_pth(model, tmp_path / "full_sft_64.pth", wrap)
    ours = load_model(str(pth)).eval()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "qk_norm", "tie_word_embeddings", "use_moe", "rms_norm_eps"):
        assert getattr(ours.config, key) == getattr(cfg, key), key
    x = interop_inputs(cfg.vocab_size)
    with torch.no_grad():
        assert (ours(x) - interop_fp16_twin(model)(x)).abs().max().item() < TOL


def test_minimind_pth_with_shared_experts_is_refused(tmp_path):
    model = MiniMindForCausalLM(interop_config(use_moe=True, num_experts=2, moe_intermediate_size=32))
    sd = dict(model.state_dict())
    sd["model.layers.0.mlp.shared_experts.0.gate_proj.weight"] = torch.zeros(32, 64)
    torch.save(sd, tmp_path / "moe.pth")
    with pytest.raises(CheckpointError, match=r"shared_experts"):
        load_model(str(tmp_path / "moe.pth"))


def minimind_inv_freq(head_dim, base, rs, end):
    """MiniMind's precompute_freqs_cis frequencies (its YaRN), written from its formula in float64."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if end / rs["original_max_position_embeddings"] > 1.0:
        orig = rs["original_max_position_embeddings"]

        def inv_dim(b):
            return head_dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(inv_dim(rs["beta_fast"])), 0)
        high = min(math.ceil(inv_dim(rs["beta_slow"])), head_dim // 2 - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
        freqs = freqs * (1 - ramp + ramp / rs["factor"])
    return freqs


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_minimind_transformers_dir_loads(tmp_path, weights):
    """MiniMind-3's transformers format: model_type 'minimind', its own keys (flash_attn, inference_rope_scaling)."""
    torch.manual_seed(0)
    d = {"architectures": ["MiniMindForCausalLM"], "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig"},
         "model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 160, "intermediate_size": 96, "head_dim": 16, "dropout": 0.0,
         "flash_attn": True, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
         "rope_theta": 1e6, "tie_word_embeddings": True, "inference_rope_scaling": True, "use_moe": False,
         "num_experts": 4, "num_experts_per_tok": 1, "norm_topk_prob": True, "router_aux_loss_coef": 5e-4,
         "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", "transformers_version": "4.57.1"}
    cfg = hf.from_hf_config(d)
    assert cfg.qk_norm and cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 16
    # our rope for the mapped config is MiniMind's YaRN (independent float64 formula above)
    ours_freq, scale = rope_inv_freq(cfg)
    want = minimind_inv_freq(16, 1e6, hf.MINIMIND_YARN, d["max_position_embeddings"])
    assert torch.allclose(ours_freq.double(), want, rtol=1e-6) and scale == 1.0
    model = interop_perturb(MiniMindForCausalLM(cfg))
    (tmp_path / "config.json").write_text(json.dumps(d))
    sd = {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied: stored once
    if weights.endswith(".bin"):
        torch.save(sd, tmp_path / weights)
    else:
        save_file(sd, str(tmp_path / weights))
    ours = load_model(str(tmp_path)).eval()
    x = interop_inputs(160)
    with torch.no_grad():
        assert (ours(x) - interop_fp16_twin(model)(x)).abs().max().item() < TOL


def test_convert_cli_writes_a_transformers_checkpoint(tmp_path):
    """python convert_model.py SRC --out_dir DIR: a MiniMind .pth becomes a model directory; bad input is one line."""
    torch.manual_seed(0)
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    model = interop_perturb(MiniMindForCausalLM(interop_config(vocab_size=tok.vocab_size)))
    pth = interop_minimind_pth(model, tmp_path / "pretrain_64.pth")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "convert_model.py", str(pth), "--out_dir", str(tmp_path / "out"),
                          "--tokenizer", DEFAULT_TOKENIZER], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Qwen3ForCausalLM" in run.stdout
    out = load_model(str(tmp_path / "out"), dtype=None)
    assert next(out.parameters()).dtype == torch.float16       # --dtype keep
    assert Tokenizer.load(str(tmp_path / "out")).fingerprint() == tok.fingerprint()
    x = interop_inputs(tok.vocab_size)
    with torch.no_grad():
        assert (out.float().eval()(x) - interop_fp16_twin(model)(x)).abs().max().item() < TOL



def test_convert_cli_bad_input_is_one_line(tmp_path, capsys):
    from minimind.cli import run
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_model", ROOT / "convert_model.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    for argv, match in [([str(tmp_path / "nope.pth")], "no such model directory or weight file"),
                        ([str(tmp_path)], "--tokenizer: no tokenizer.json")]:
        with pytest.raises(SystemExit) as e:
            run(lambda: convert.main([*argv, "--out_dir", str(tmp_path / "o2"), *(
                ["--tokenizer", DEFAULT_TOKENIZER] if "nope" in argv[0] else [])]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints: one line naming the key or tensor, never a partial load
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def good_dir(tmp_path):
    save_model(MiniMindForCausalLM(interop_config(qk_norm=False, attention_bias=True)), None, str(tmp_path / "m"))
    return tmp_path / "m"


def interop_edit_config(folder: Path, **changes):
    d = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "GPT2LMHeadModel is not supported"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "MistralForCausalLM is not supported"),
    (dict(architectures=None, model_type=None), "not supported"),
    (dict(hidden_size=None), "missing key 'hidden_size'"),
    (dict(num_hidden_layers=None), "missing key 'num_hidden_layers'"),
    (dict(intermediate_size=None), "missing key 'intermediate_size'"),
    (dict(hidden_act="gelu"), "'hidden_act'"),
    (dict(use_sliding_window=True), "'use_sliding_window'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling type 'llama3'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}), "rope_scaling key 'mscale'"),
    (dict(quantization_config={"quant_method": "gptq"}), "'quantization_config'"),
    (dict(hidden_size="64"), "'hidden_size' must be a positive integer"),
])
def test_bad_config_is_one_line_naming_the_key(good_dir, changes, match):
    interop_edit_config(good_dir, **changes)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(str(good_dir))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_bad_moe_configs_are_refused(tmp_path):
    save_model(MiniMindForCausalLM(interop_config(use_moe=True, moe_intermediate_size=32)), None, str(tmp_path))
    for changes, match in [(dict(decoder_sparse_step=2), "'decoder_sparse_step'"),
                           (dict(mlp_only_layers=[0]), "'mlp_only_layers'"),
                           (dict(num_experts=None), "missing key 'num_experts'")]:
        d = json.loads((tmp_path / "config.json").read_text())
        interop_edit_config(tmp_path, **changes)
        with pytest.raises(CheckpointError, match=match):
            load_model(str(tmp_path))
        (tmp_path / "config.json").write_text(json.dumps(d))
    load_model(str(tmp_path))  # restored: loads


def interop_edit_tensors(folder: Path, fn):
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"), "missing tensor model.layers.1.self_attn.k_proj.bias"),
    (lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
     "unexpected tensor model.layers.0.mlp.extra.weight"),
    (lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}),
     r"tensor model.layers.0.mlp.up_proj.weight has shape \(95, 64\), the config needs \(96, 64\)"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(64, dtype=torch.int8)}),
     "tensor model.norm.weight has dtype int8"),
    (lambda sd: sd.update({"model.layers.0.self_attn.o_proj.bias": torch.ones(64)}), "unexpected tensor"),
])
def test_bad_tensors_are_one_line_naming_the_tensor(good_dir, edit, match):
    interop_edit_tensors(good_dir, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(str(good_dir))
    assert "\n" not in str(e.value)


def test_nonzero_output_bias_is_refused(tmp_path):
    """Qwen3/Llama attention_bias also biases o_proj: loadable only when that bias is zero."""
    save_model(MiniMindForCausalLM(interop_config(qk_norm=True, attention_bias=True)), None, str(tmp_path))
    load_model(str(tmp_path))
    interop_edit_tensors(tmp_path, lambda sd: sd["model.layers.1.self_attn.o_proj.bias"].fill_(0.5))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj.bias is nonzero"):
        load_model(str(tmp_path))


def test_bad_files_and_shards(good_dir, tmp_path):
    (good_dir / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(str(good_dir))
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(str(good_dir))
    # sharded: a shard file missing, or a tensor the index lists but the shard lacks
    model = MiniMindForCausalLM(interop_config())
    save_model(model, None, str(tmp_path / "s"))
    sd = load_file(str(tmp_path / "s" / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(tmp_path / "s" / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(tmp_path / "s" / "model-00002-of-00002.safetensors"))
    (tmp_path / "s" / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps(index))
    x = interop_inputs(160)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "s"))(x), model(x))     # the sharded copy loads exactly
    index["weight_map"]["model.ghost.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensor model.ghost.weight"):
        load_model(str(tmp_path / "s"))
    (tmp_path / "s" / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors is missing"):
        load_model(str(tmp_path / "s"))


def test_cli_bad_checkpoint_is_one_error_line(good_dir):
    interop_edit_tensors(good_dir, lambda sd: sd.pop("model.norm.weight"))
    run = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--load_from", str(good_dir), "--prompts",
                          "hi", "--device", "cpu"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "missing tensor model.norm.weight" in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------------------------
# --config: any supported shape from scratch, e.g. Qwen2.5-0.5B; a 151k vocabulary never makes full fp32 logits
# ---------------------------------------------------------------------------------------------------------------
QWEN25_05B = {  # Qwen/Qwen2.5-0.5B's config.json (the values that matter)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24,
    "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16", "attention_dropout": 0.0,
}


def interop_args(**kw):
    return argparse.Namespace(**{**dict(from_weight="none", config=None, preset="tiny", hidden_size=None,
                                        num_hidden_layers=None, use_moe=None), **kw})


def test_config_flag_builds_qwen25_05b_shape(tmp_path):
    from minimind.train import build_model
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    with torch.device("meta"):                      # the shape only: no 2 GB of fp32 weights in a unit test
        model = build_model(interop_args(config=str(tmp_path / "config.json")), vocab_size=151665)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (896, 24, 14, 2, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (4864, 151936, 1e6, True)
    assert c.attention_bias and not c.qk_norm and not c.use_moe
    assert model.num_parameters() == c.num_parameters() == 494_032_768   # Qwen2.5-0.5B: 0.49B, tied
    assert hf.hf_architecture(c)[0] == "Qwen2ForCausalLM"
    with pytest.raises(Exception, match="--config sets the whole shape"):
        build_model(interop_args(config=str(tmp_path / "config.json"), hidden_size=128), vocab_size=151665)
    with pytest.raises(Exception, match="smaller than the tokenizer"):
        build_model(interop_args(config=str(tmp_path / "config.json")), vocab_size=200000)


def test_config_flag_shape_matches_transformers(transformers, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    with torch.device("meta"):
        ours = MiniMindForCausalLM(load_config(str(tmp_path / "config.json")))
        theirs = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(str(tmp_path)))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()   # noqa: E731
                        if not k.endswith("inv_freq") and k != "lm_head.weight"}
    assert shapes(ours) == shapes(theirs)
    assert type(theirs).__name__ == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_train_pretrain_with_config_flag(transformers, tmp_path):
    """train_pretrain.py --config: a (tiny) Qwen2-shaped model from scratch, saved as a Qwen2 checkpoint."""
    vocab = Tokenizer.load(DEFAULT_TOKENIZER).vocab_size   # the tokenizer train_pretrain.py uses by default
    transformers.Qwen2Config(**{**HF_SMALL, "vocab_size": vocab}, tie_word_embeddings=True).save_pretrained(
        str(tmp_path / "cfg"))
    data = tmp_path / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i}: os.path.join joins paths; json.dumps writes JSON."})
                            + "\n" for i in range(40)))
    run = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), "--config",
                          str(tmp_path / "cfg" / "config.json"), "--data_path", str(data), "--out_dir",
                          str(tmp_path / "out"), "--max_steps", "2", "--batch_size", "2", "--max_seq_len", "32",
                          "--device", "cpu", "--dtype", "float32", "--num_workers", "0", "--val_ratio", "0"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                        "MINIMIND_CACHE": str(tmp_path / "cache")},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = interop_hf_load(transformers, tmp_path / "out")
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    ours = load_model(str(tmp_path / "out")).eval()
    assert ours.config.attention_bias and not ours.config.qk_norm
    assert interop_max_diff(ours, theirs, interop_inputs(vocab)) < TOL


def test_151k_vocab_loss_never_materialises_full_logits():
    """The training loss with Qwen's vocabulary: no tensor of (tokens x vocab) is ever allocated, fwd or bwd."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minimind.loss import _chunk_rows

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    vocab, tokens = 151936, 2 * 240
    cfg = ModelConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, qk_norm=False, attention_bias=True)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg)
    x = torch.randint(0, vocab, (2, tokens // 2))
    y = torch.randint(0, vocab, (2, tokens // 2))
    rows = _chunk_rows(vocab)
    assert rows * 2 < tokens                      # several chunks, so the bound below is meaningful
    with LargestTensor() as probe:
        loss = model(x, targets=y)
        loss.backward()
    assert probe.largest <= rows * vocab < tokens * vocab
    # and the chunked loss is the plain cross-entropy (float64 reference, one row block at a time)
    with torch.no_grad():
        h = model.model(x, torch.arange(tokens // 2).expand(2, -1), AttentionMask.causal())[0]
        h = h.reshape(-1, 16).double()
        w = model.lm_head.weight.double()
        ref = sum(torch.nn.functional.cross_entropy(h[s:s + 64] @ w.t(), y.reshape(-1)[s:s + 64], reduction="sum")
                  for s in range(0, tokens, 64)) / tokens
    assert abs(loss.item() - ref.item()) < 1e-4
