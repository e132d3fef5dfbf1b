"""GGUF export: a model directory -> one .gguf file that stock llama.cpp (and so Ollama, LM Studio...) runs as is.

GGUF is llama.cpp's single-file format: key/value metadata (architecture sizes, tokenizer, chat template) followed
by the tensors, each in its own dtype (f32, f16 or a block-quantized type such as q8_0). We never write the bytes
ourselves: the `gguf` package published by llama.cpp's authors (PyPI `gguf`, optional extra `pip install
minimind[gguf]`) does, so the file is exactly what llama.cpp expects.

What has to line up for llama.cpp to compute what we compute:
  architecture  our decoder is, maths for maths, Qwen3 / Qwen3-MoE / Qwen2 / Llama (hf.hf_architecture); llama.cpp
                has a graph for each (`qwen3`, `qwen3moe`, `qwen2`, `llama`).
  tensors       renamed with gguf's own HF -> GGUF name map. Two layout changes: Llama's q/k rows are permuted
                (llama.cpp's `llama` graph rotates adjacent pairs, HF/our RoPE rotates the two halves), and MoE
                experts are stacked into one 3-D tensor per projection, as llama.cpp's MoE kernels want.
  tokenizer     byte-level BPE ("gpt2" model in llama.cpp) with our vocabulary and merges, special tokens marked
                as control tokens, and a *pre-tokenizer type* naming the regex that splits text before BPE. Ours is
                the GPT-2 regex (ByteLevel with use_regex), which llama.cpp knows as "gpt-2"; a Qwen tokenizer's
                is "qwen2". An unknown regex is refused: llama.cpp would silently split text differently.
  chat          the Jinja chat template (llama.cpp and llama-cpp-python render it) and <|im_end|> as end of turn.

Beside the .gguf we write an Ollama `Modelfile` (FROM, TEMPLATE in Go template syntax equal to our ChatML
rendering, stop tokens, parameters), so `ollama create NAME -f Modelfile` works from the same folder.
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import torch

from .checkpoint import load_model
from .config import ModelConfig
from .errors import CheckpointError, UsageError
from .hf import hf_architecture
from .tokenizer import Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")

# llama.cpp architecture per our transformers twin (hf.hf_architecture's model_type).
GGUF_ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "qwen2": "qwen2", "llama": "llama"}

# Pre-tokenizer regexes llama.cpp knows, by the name it knows them under (its llama-vocab.cpp). The GPT-2 regex
# is what `tokenizers`' ByteLevel(use_regex=True) uses, i.e. ours (tokenizer.train_bpe).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _gguf():
    """The gguf package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UsageError("--to gguf needs the gguf package (llama.cpp's own writer): pip install gguf "
                         "(or pip install -e '.[gguf]')") from None
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# Architecture: ModelConfig -> llama.cpp hyper-parameters
# ---------------------------------------------------------------------------------------------------------------
def gguf_arch(config: ModelConfig) -> str:
    """llama.cpp's architecture name for this config; refuses what llama.cpp would compute differently."""
    if config.use_moe and not config.qk_norm:
        raise UsageError("an MoE model without q/k norm (e.g. MiniMind2-MoE) has no llama.cpp architecture: "
                         "qwen3moe, the only one with our router, normalises q and k; it cannot be exported to GGUF")
    if config.use_moe and not config.norm_topk_prob:
        # llama.cpp's qwen3moe graph always renormalises the top-k router weights (build_moe_ffn norm_w=true).
        raise UsageError("norm_topk_prob = false is not exported to GGUF: llama.cpp's qwen3moe always renormalises "
                         "the chosen experts' weights, so its outputs would differ from ours")
    rope = dict(config.rope_scaling or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UsageError(f"rope_scaling {kind!r} is not exported to GGUF (llama.cpp's YaRN scales attention "
                         f"differently from transformers'); export a model without it, or with 'linear'")
    return GGUF_ARCH[hf_architecture(config)[1]]


def _add_hparams(w, config: ModelConfig, arch: str, file_type: int, name: str) -> None:
    gguf = _gguf()
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)      # explicit: head_dim need not be hidden / heads (Qwen3)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(config.head_dim)
    rope = dict(config.rope_scaling or {})
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if config.use_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)


# ---------------------------------------------------------------------------------------------------------------
# Tensors: our state dict -> GGUF names and layouts
# ---------------------------------------------------------------------------------------------------------------
def _llama_rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from "rotate halves" (HF/our RoPE) to "rotate adjacent pairs" (llama.cpp llama).

    Within each head our rotation pairs dimension i with i + d/2; llama.cpp's `llama` graph pairs 2i with 2i+1.
    Interleaving the two halves of each head's rows, (h, 2, d/2) -> (h, d/2, 2), makes its pairs our pairs. q.k
    is a sum over dimensions, so reordering both q and k the same way leaves attention unchanged.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(config: ModelConfig, sd: dict[str, torch.Tensor], arch: str):
    """Yield (gguf name, float32 numpy array in our (out, in) layout) for every tensor llama.cpp needs."""
    gguf = _gguf()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)   # gguf's own HF -> GGUF name table
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue   # tied head: llama.cpp reuses token_embd when output.weight is absent
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m:          # collected below into one (experts, out, in) tensor per layer and projection
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
            continue
        if arch == "llama" and re.search(r"self_attn\.(q|k)_proj\.", key):
            t = _llama_rope_permute(t, config.num_attention_heads if ".q_proj." in key else config.num_key_value_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"tensor {key} has no GGUF name for llama.cpp's {arch} architecture")
        yield name, t.float().numpy()
    for (layer, proj), per_expert in sorted(experts.items()):
        if len(per_expert) != config.num_experts:
            raise CheckpointError(f"layer {layer} has {len(per_expert)} {proj} experts, config says "
                                  f"{config.num_experts}")
        stacked = torch.stack([per_expert[e] for e in range(config.num_experts)])
        name = names.get_name(f"model.layers.{layer}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
        yield name, stacked.float().numpy()


def _encode(gguf, name: str, arr: np.ndarray, outtype: str):
    """(data, raw dtype or None) for one tensor. 1-D tensors (norm gains, biases) and the MoE router stay f32,
    as in llama.cpp's converter: they are tiny, and rounding them moves every activation."""
    if outtype == "f32" or arr.ndim == 1 or ".ffn_gate_inp." in name:
        return arr.astype(np.float32), None
    if outtype == "f16":
        return arr.astype(np.float16), None
    try:   # q8_0: blocks of 32 weights along a row, each with one f16 scale
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    except gguf.quants.QuantError:   # a row length not divisible by 32: f16, as llama.cpp's converter does
        return arr.astype(np.float16), None


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json -> tokenizer.ggml.* metadata
# ---------------------------------------------------------------------------------------------------------------
def pre_tokenizer_type(tok_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer regex ("gpt-2", "qwen2"), or UsageError."""
    pre, norm = tok_json.get("pre_tokenizer") or {}, tok_json.get("normalizer")
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges"):
        raise UsageError(f"tokenizer.json: model {model.get('type')} (byte_fallback={model.get('byte_fallback')}, "
                         f"ignore_merges={model.get('ignore_merges')}) is not plain byte-level BPE; GGUF export "
                         f"supports tokenizers from train_tokenizer.py and Qwen's")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space") and \
            norm is None:
        return "gpt-2"     # tokenizers' ByteLevel regex is GPT-2's
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" and \
            not steps[1].get("use_regex", True) and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_REGEX \
            and (norm is None or norm.get("type") == "NFC"):
        return "qwen2"     # Qwen2 / Qwen2.5 / Qwen3 (llama.cpp skips their NFC normaliser too)
    raise UsageError(f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp twin, so llama.cpp "
                     f"would split text differently; GGUF export supports train_tokenizer.py's (GPT-2 regex) "
                     f"and Qwen's")


def _add_tokenizer(w, tokenizer: Tokenizer, vocab_size: int) -> dict:
    gguf = _gguf()
    tok_json = json.loads(tokenizer.tok.to_str())
    pre = pre_tokenizer_type(tok_json)
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:      # the model's embedding is larger than the tokenizer: fillers llama.cpp never emits
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")           # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)    # <|im_end|>: ends a reply, so llama.cpp stops there
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)              # we never prepend a BOS token; llama.cpp must not either
    w.add_add_eos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    return {"pre": pre, "tokens": len(tokens), "merges": len(merges)}


# ---------------------------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------------
def modelfile_text(gguf_name: str, tokenizer: Tokenizer, num_ctx: int) -> str:
    """An Ollama Modelfile for the GGUF: TEMPLATE renders plain conversations (system/user/assistant turns, no
    tools, no reasoning) exactly as our tokenizer's chat template does (Tokenizer.chat_profile gives the quirks:
    a default system prompt, a fixed reply prefix). Tool calls are left to llama.cpp's own Jinja path."""
    default_system, reply_prefix = tokenizer.chat_profile()
    prefix = reply_prefix.replace("{{", "{{`{{`}}")  # Go template: literal braces must be escaped
    lines = [
        "# Ollama model file written by convert_model.py. Create the model from this folder with:",
        "#   ollama create minimind -f Modelfile      then:  ollama run minimind",
        f"FROM ./{gguf_name}",
        "",
        # Ollama passes the conversation as .Messages (system/user/assistant/tool); each turn is ChatML:
        # <|im_start|>ROLE\nCONTENT<|im_end|>\n, then the reply opens with <|im_start|>assistant\n (same as
        # tokenizer.CHAT_TEMPLATE and Tokenizer.chat_text).
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
        ('{{ if eq .Role "assistant" }}' + prefix + '{{ end }}' if prefix else "") + '{{ .Content }}<|im_end|>',
        "{{ end }}<|im_start|>assistant",
        prefix + '"""',
    ]
    if default_system is not None:
        lines.append('SYSTEM """' + default_system + '"""')
    lines += [
        "",
        'PARAMETER stop "<|im_end|>"',      # end of a reply (our eos)
        'PARAMETER stop "<|im_start|>"',    # a model that skips <|im_end|> and opens a new turn
        'PARAMETER stop "<|endoftext|>"',
        "PARAMETER temperature 0.7",        # serve_openai_api.py's default
        "PARAMETER top_p 1.0",
        f"PARAMETER num_ctx {num_ctx}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------------------------------------------
def _publish(tmp: str, path: str) -> None:
    """Rename a finished temp file into place, with the permissions a plain open() would have given it
    (mkstemp makes files private to the user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_gguf(model, tokenizer: Tokenizer, out_path: str, outtype: str = "f16", name: str = "minimind",
                modelfile: bool = True) -> dict:
    """Write `out_path` (.gguf) and, if modelfile, an Ollama `Modelfile` beside it. Returns a summary dict.

    model: a MiniMindForCausalLM (its config and weights are read, nothing is changed). The file appears only
    when complete: it is written to a temporary name in the same folder, then renamed.
    """
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise UsageError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    config = model.config
    arch = gguf_arch(config)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"--tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{config.vocab_size}: wrong tokenizer for this model")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out_path {out_path}: folder {folder} does not exist; create it first")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        _add_hparams(w, config, arch, int(file_type), name)
        tok_info = _add_tokenizer(w, tokenizer, config.vocab_size)
        counts: dict[str, int] = {}
        for tname, arr in gguf_tensors(config, sd, arch):
            data, raw = _encode(gguf, tname, arr, outtype)
            w.add_tensor(tname, data, raw_dtype=raw)
            kind = raw.name.lower() if raw is not None else str(data.dtype).replace("float", "f")
            counts[kind] = counts.get(kind, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _publish(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    summary = {"path": out_path, "arch": arch, "outtype": outtype, "tensors": counts,
               "bytes": os.path.getsize(out_path), **tok_info}
    if modelfile:
        mf = os.path.join(folder, "Modelfile")
        _atomic_write_text(mf, modelfile_text(os.path.basename(out_path), tokenizer,
                                              min(config.max_position_embeddings, 4096)))
        summary["modelfile"] = mf
    return summary


def export_model_dir(src: str, out_path: str, outtype: str = "f16", tokenizer_dir: str | None = None,
                     config: ModelConfig | None = None) -> dict:
    """convert_model.py --to gguf: load a model directory (or .pth + --tokenizer) and export it."""
    tok_dir = tokenizer_dir or (src if os.path.isdir(src) else None)
    if tok_dir is None or not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise UsageError(f"--tokenizer: no tokenizer.json in {tok_dir or src}; pass the directory holding the "
                         f"model's tokenizer")
    tokenizer = Tokenizer.load(tok_dir)
    model = load_model(src, dtype=torch.float32, config=config)
    name = os.path.basename(os.path.normpath(src)) if os.path.isdir(src) else "minimind"
    return export_gguf(model, tokenizer, out_path, outtype, name=name)
