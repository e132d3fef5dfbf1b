"""GGUF export, checked against stock llama.cpp itself (through llama-cpp-python, which compiles it unmodified).

Without llama-cpp-python (`bash .ci/install_llama_cpp.sh` builds and caches it) the llama.cpp tests skip; the
file-format tests need only the `gguf` package (test extra). What llama.cpp must do with our file:
  - split and merge text into exactly our token ids (English, Chinese, code, emoji, special tokens);
  - compute our logits: fp32 within 1e-4 for every architecture we export (qwen3, llama, qwen2, qwen3moe);
  - greedy-decode the same 32 tokens as minimind.generate, in f32 and in q8_0;
  - chat with our ChatML template and stop at <|im_end|>.

Why q8_0 can be compared token for token: llama.cpp rounds weights (and activations) to 8 bits, which moved the
logits of the trained test model by up to ~0.3, while the model's greedy choices win by >= 5 logits (it has
memorised its few training texts). On random, untrained models the winner's lead along a greedy path drops to
~0.1 logit (median over 5 seeds of the smallest lead); q8_0 still matched all 15 such runs when measured, but
nothing guarantees it, and a flip there would be rounding, not a wrong export. So the test uses a trained model.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minimind import DEFAULT_TOKENIZER
from minimind.checkpoint import save_model
from minimind.config import ModelConfig
from minimind.errors import UsageError
from minimind.generate import complete_chats, generate
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package: pip install gguf")
from minimind import gguf_export  # noqa: E402  (after the skip: it is only usable with gguf installed)

ROOT = Path(__file__).resolve().parents[1]

# Mixed sample for the tokenizer comparison: every pre-tokenizer branch (contractions, letters, digits,
# punctuation runs, whitespace runs incl. trailing), CJK, emoji sequences (ZWJ, flags, variation selectors),
# special tokens inside text, and code.
SAMPLE = [
    "Hello, world! It's 2024; we'll see what they've done (I'm sure you'd agree).",
    "机器学习很有趣。深度学习使用多层神经网络，参数量达到 26M 或 104M！",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 递归\n",
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flag 🇨🇳 heart ❤️ and ½ ² ①",
    "  leading spaces, trailing spaces   \n\n\n\ttabs\tand\r\nCRLF  \u00a0nbsp\u3000全角",
    "<|im_start|>user\n你好 hi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm</think>\n<tool_call>{}</tool_call>",
    "naïve café Ωmega ∑∫≠→ 日本語のテキスト、한국어 텍스트 mixed中文English混合123abc",
    "x = {'a': [1, 2.5e-3], \"b\": None}  ;;  a+=1 || b&&c  ->  >>> print(x)",
]

# Training data of the test model: three documents and two chats, memorised in a few seconds.
TEXTS = [
    "The quick brown fox jumps over the lazy dog, then runs back home to sleep under the old oak tree until "
    "the sun goes down.",
    "机器学习是人工智能的一个分支，它让计算机从数据中学习规律，而不需要人为地编写每一条规则。深度学习使用多层神经网络。",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in "
    "range(10)])  # 🎉\n",
]
CHATS = [
    [{"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am MiniMind, a small language model trained from scratch. 我是 MiniMind。"}],
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是 MiniMind，一个从零训练的小语言模型。"}],
]


VOCAB = Tokenizer.load(DEFAULT_TOKENIZER).vocab_size


def gguf_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=256)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp checks need llama-cpp-python: "
                                                    "bash .ci/install_llama_cpp.sh")


@pytest.fixture(scope="module")
def trained(tok):
    """A 0.5M-parameter model that memorises TEXTS and CHATS (150 full-batch AdamW steps, ~5 s on one core)."""
    torch.manual_seed(0)
    seqs = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in TEXTS] + [tok.render_chat(c)[0] for c in CHATS]
    model = MiniMindForCausalLM(gguf_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = sum(torch.nn.functional.cross_entropy(model(torch.tensor([s[:-1]]))[0], torch.tensor(s[1:]))
                   for s in seqs) / len(seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, f"test model did not memorise its data (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module")
def trained_gguf(trained, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: gguf_export.export_gguf(trained, tok, str(out / f"model-{t}.gguf"), t)["path"]
            for t in gguf_export.OUTTYPES}


def load_llama(llama_cpp, path, f32_cache=False, **kw):
    """Stock llama.cpp on one thread. f32_cache: keep the KV cache in fp32 (its default, f16, rounds K and V)."""
    if f32_cache:
        kw.update(type_k=0, type_v=0)   # GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=256, verbose=False, **kw)


def perturbed(config: ModelConfig, seed: int) -> MiniMindForCausalLM:
    """Random model with norm gains away from 1 and nonzero biases, so a mapping that dropped them would show."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The file itself (gguf's own reader): metadata llama.cpp reads
# ---------------------------------------------------------------------------------------------------------------
def read_fields(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def test_metadata_tokenizer_and_tensor_types(trained_gguf, tok):
    fields, tensors = read_fields(trained_gguf["q8_0"])
    cfg = gguf_config()
    assert fields["general.architecture"] == "qwen3"
    assert (fields["qwen3.block_count"], fields["qwen3.embedding_length"], fields["qwen3.attention.head_count"],
            fields["qwen3.attention.head_count_kv"], fields["qwen3.attention.key_length"]) == \
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tok.tok.to_str())["model"]["merges"])
    types = fields["tokenizer.ggml.token_type"]
    added = {a["id"]: a["special"] for a in json.loads(tok.tok.to_str())["added_tokens"]}
    assert types == [int(gguf.TokenType.NORMAL if i not in added else gguf.TokenType.CONTROL if added[i] else
                         gguf.TokenType.USER_DEFINED) for i in range(len(vocab))]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.chat_template
    # tied embeddings: no output.weight; matrices q8_0, norms f32
    assert "output.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    _, f16 = read_fields(trained_gguf["f16"])
    assert f16["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    sizes = {t: os.path.getsize(p) for t, p in trained_gguf.items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_modelfile_beside_gguf(trained_gguf):
    text = (Path(trained_gguf["f16"]).parent / "Modelfile").read_text()
    assert "FROM ./model-" in text   # the last export in that folder
    # Go template of ChatML: each message <|im_start|>ROLE\nCONTENT<|im_end|>\n, then the reply opener
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' \
           '<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


# ---------------------------------------------------------------------------------------------------------------
# Stock llama.cpp reads it as we do
# ---------------------------------------------------------------------------------------------------------------
def test_llama_cpp_tokenizes_exactly_like_us(llama_cpp, trained_gguf, tok):
    llm = load_llama(llama_cpp, trained_gguf["f32"], vocab_only=True)
    total = 0
    for text in SAMPLE:
        ours = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == ours, f"llama.cpp splits {text!r} differently"
        assert tok.decode(theirs) == text
        total += len(ours)
    assert total > 200
    # special tokens are single control tokens, and no BOS is added when llama.cpp is asked to add "special" ones
    assert llm.tokenize(b"<|im_start|>", add_bos=True, special=True) == [tok.bos_id]
    assert llm.token_eos() == tok.eos_id


def qwen_like_tokenizer() -> Tokenizer:
    """A small BPE with Qwen2's pipeline (NFC, its split regex, byte-level without regex), as a fine-tuned Qwen has."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    t = HFTok(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_export.QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(SAMPLE * 3 + TEXTS * 3, trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(t)


def test_llama_cpp_tokenizes_a_qwen_style_tokenizer_like_us(llama_cpp, tmp_path):
    qtok = qwen_like_tokenizer()
    model = MiniMindForCausalLM(gguf_config(vocab_size=qtok.vocab_size))
    path = gguf_export.export_gguf(model, qtok, str(tmp_path / "q.gguf"), "f32")["path"]
    assert read_fields(path)[0]["tokenizer.ggml.pre"] == "qwen2"
    llm = load_llama(llama_cpp, path, vocab_only=True)
    for text in SAMPLE + ["12345 digits one by one", "a\n\n\nb  \n c"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == qtok.encode(text), text


ARCHS = {  # our config -> the llama.cpp graph that must compute it
    "qwen3": dict(),
    "llama": dict(qk_norm=False),                                        # q/k rows permuted for its RoPE
    "qwen2": dict(qk_norm=False, attention_bias=True),                   # q/k/v biases
    "qwen3moe": dict(use_moe=True, num_experts=4, num_experts_per_tok=2),   # stacked experts, renormalised top-2
    "llama-untied-linear-rope": dict(qk_norm=False, tie_word_embeddings=False,
                                     rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3-padded-vocab": dict(vocab_size=VOCAB + 58),                   # embedding rows the tokenizer lacks
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_llama_cpp_fp32_logits_equal_ours(llama_cpp, tok, tmp_path, name):
    model = perturbed(gguf_config(**ARCHS[name]), seed=len(name))
    path = gguf_export.export_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")["path"]
    assert read_fields(path)[0]["general.architecture"] == name.split("-")[0]
    llm = load_llama(llama_cpp, path, f32_cache=True, logits_all=True)
    ids = tok.encode(" ".join(SAMPLE[:4]))[:200]
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    diff = float(np.abs(theirs - ours).max())
    assert diff < 1e-4, f"{name}: llama.cpp logits differ from ours by {diff:.2e}"


@pytest.mark.parametrize("outtype, tol", [("f16", 0.05), ("q8_0", 1.0)])
def test_llama_cpp_rounded_logits_stay_close(llama_cpp, trained, trained_gguf, tok, outtype, tol):
    ids = [tok.bos_id] + tok.encode(TEXTS[2])
    llm = load_llama(llama_cpp, trained_gguf[outtype], logits_all=True)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = trained(torch.tensor([ids]))[0].numpy()
    assert float(np.abs(theirs - ours).max()) < tol
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()   # the same next token at every position


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_greedy_32_tokens_equal_ours(llama_cpp, trained, trained_gguf, tok, outtype):
    llm = load_llama(llama_cpp, trained_gguf[outtype])   # llama.cpp's defaults (f16 KV cache), as users run it
    for text in TEXTS:
        prompt = ([tok.bos_id] + tok.encode(text))[:6]
        ours = generate(trained, [prompt], max_new_tokens=32)[0]
        stream = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        theirs = [next(stream) for _ in range(32)]
        assert len(ours) == 32 and theirs == ours, f"{outtype}: {tok.decode(theirs)!r} != {tok.decode(ours)!r}"


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_chat_uses_our_template_and_stops_at_im_end(llama_cpp, trained, trained_gguf, tok, outtype):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llm = load_llama(llama_cpp, trained_gguf[outtype])
    assert llm.chat_format == "chat_template.default"   # picked up from the GGUF's tokenizer.chat_template
    template = llm.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    prompts = [c[:1] for c in CHATS] + [[{"role": "system", "content": "Be brief."}, *CHATS[0],
                                         {"role": "user", "content": "和 Qwen 一样吗？"}]]
    for messages in prompts:
        want = tok.render_text(messages, add_generation_prompt=True)
        assert fmt(messages=messages).prompt == want   # llama-cpp-python's Jinja rendering of the GGUF's template
        assert llama_cpp_chat_text(llama_cpp, llm, messages) == want   # llama.cpp's own C++ renderer
    ours = complete_chats(trained, tok, prompts[:2], max_new_tokens=64)
    for messages, reply in zip(prompts[:2], ours):
        r = llm.create_chat_completion(messages, temperature=0.0, max_tokens=64)
        choice = r["choices"][0]
        assert choice["message"]["content"] == reply == messages_reply(messages)
        assert choice["finish_reason"] == "stop"   # ended by <|im_end|>, not by max_tokens
        assert "<|im_end|>" not in choice["message"]["content"]


def llama_cpp_chat_text(llama_cpp, llm, messages) -> str:
    """llama_chat_apply_template: how llama.cpp's own programs (llama-cli, llama-server without --jinja) render a
    chat with the GGUF's template (it recognises ChatML from the template text)."""
    import ctypes
    template = llama_cpp.llama_model_chat_template(llm._model.model, None)
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode("utf-8")


def messages_reply(messages):
    """The memorised reply of a training chat."""
    return next(c[1]["content"] for c in CHATS if c[0] == messages[0])


# ---------------------------------------------------------------------------------------------------------------
# Refusals, atomic writes and the command line
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    (dict(use_moe=True, norm_topk_prob=False), "norm_topk_prob"),
    (dict(use_moe=True, qk_norm=False), "q/k norm"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), "yarn"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(tok, tmp_path, kw, words):
    with pytest.raises(UsageError, match=words):
        gguf_export.export_gguf(MiniMindForCausalLM(gguf_config(**kw)), tok, str(tmp_path / "m.gguf"))
    assert list(tmp_path.iterdir()) == []


def test_unknown_pre_tokenizer_is_refused(tok, tmp_path):
    from tokenizers import pre_tokenizers
    other = Tokenizer.load(DEFAULT_TOKENIZER)
    other.tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UsageError, match="pre-tokenizer .* has no llama.cpp twin"):
        gguf_export.export_gguf(MiniMindForCausalLM(gguf_config()), other, str(tmp_path / "m.gguf"))


def test_failed_write_leaves_no_file(tok, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        gguf_export.export_gguf(MiniMindForCausalLM(gguf_config()), tok, str(tmp_path / "m.gguf"))
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_package_is_one_line(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)   # import gguf -> ImportError
    with pytest.raises(UsageError, match="pip install gguf"):
        gguf_export.export_gguf(MiniMindForCausalLM(gguf_config()), tok, str(tmp_path / "m.gguf"))


def run_convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert_model.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_convert_cli_writes_gguf_and_modelfile(tok, tmp_path):
    save_model(perturbed(gguf_config(), 3), tok, str(tmp_path / "model"))
    out = tmp_path / "gguf"
    out.mkdir()
    r = run_convert(tmp_path / "model", "--to", "gguf", "--outtype", "q8_0", "--out_path", out / "m.gguf")
    assert r.returncode == 0, r.stderr
    assert "qwen3, q8_0" in r.stdout and "ollama create" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "m.gguf"]
    assert read_fields(out / "m.gguf")[0]["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


@pytest.mark.parametrize("args, words", [
    (["--to", "gguf"], "--out_path"),
    (["--to", "gguf", "--out_path", "/nonexistent-dir/m.gguf"], "does not exist"),
    (["--to", "gguf", "--out_path", "m.gguf", "--dtype", "float16"], "--outtype"),
    (["--out_path", "m.gguf"], "--out_dir is required"),
])
def test_convert_cli_bad_gguf_flags_are_one_line(tok, tmp_path, capsys, args, words):
    import convert_model   # in-process (tests/conftest.py puts the repo root on sys.path): no torch start-up
    from minimind import cli
    save_model(MiniMindForCausalLM(gguf_config()), tok, str(tmp_path / "model"))
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: convert_model.main([str(tmp_path / "model"), *args]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err
    assert err.count("\n") == 1 and err.startswith("error: ")
