"""Tokenizer: exact round trips, special-token ids, and the chat renderer's assistant-only loss mask."""
import json

import jinja2
import pytest

from minimind.tokenizer import CHAT_TEMPLATE, CHAT_TOKENS, Tokenizer, train_bpe

ROUND_TRIP = [
    "Hello, world! def f(x): return x ** 2  # ASCII",
    "机器学习是人工智能的一个分支。你好，世界！",
    "emoji 🎉👍🏽🇨🇳 family 👨‍👩‍👧 and ✔️",
    "   leading spaces", "trailing spaces   ", "a  b   c    d",
    "\t\ttabs\tinside\t", "\n\nnewlines\n\n\n", "\r\nwindows\r\nline ends\r\n",
    " \t \n\t\n  \n", "    def f():\n\tif x:\n\t\treturn 1\n",
    "mixed 中文 and English, 日本語 テキスト, Русский, العربية 123.45e-6",
    "", " ", "\n", "\u00a0non-breaking\u3000ideographic space", "\x00\x7f control \u200b zero width",
]


@pytest.mark.parametrize("s", ROUND_TRIP)
def test_decode_encode_round_trip(tokenizer, s):
    ids = tokenizer.encode(s)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == s
    assert tokenizer.encode_batch([s, s + "x"]) == [ids, tokenizer.encode(s + "x")]


def test_special_tokens_have_ids_0_1_2(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tokenizer.tok.token_to_id(t) == i
        assert tokenizer.encode(t) == [i]              # one token in running text, never split into bytes
        assert tokenizer.decode([i]) == t
    assert tokenizer.decode([1, 2, 0], skip_special_tokens=True) == ""
    # MiniMind's 6400 BPE entries (ChatML's three included), then the six think/tool tokens appended after them,
    # so every id of the original 6400 is unchanged (models trained before keep their meaning).
    assert tokenizer.vocab_size == 6406
    for i, t in enumerate(["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                           "</tool_response>"], 6400):
        assert tokenizer.tok.token_to_id(t) == i and tokenizer.encode(f"a{t}b")[1] == i    # never split
        assert tokenizer.decode([i], skip_special_tokens=True) == t   # not "special": decoding keeps them


def test_freshly_trained_tokenizer_round_trips_and_reserves_special_ids():
    texts = ["hello world " * 20, "你好世界，机器学习 " * 20, "def f(x):\n    return x\n" * 20, "🎉 emoji 👍 " * 5]
    tok = train_bpe(iter(texts), vocab_size=300, show_progress=False)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size <= 300
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("hello world ")) < len("hello world ".encode())   # it did learn merges


CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What does `os.path.join` do?"},
     {"role": "assistant", "content": "It joins path components with the right separator."},
     {"role": "user", "content": "And on Windows?"},
     {"role": "assistant", "content": "It uses a backslash:\n\n    os.path.join('a', 'b')  # 'a\\\\b'\n"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "介绍一下 Python 的列表推导式。"},
     {"role": "assistant", "content": "列表推导式用一行创建列表：[x * x for x in range(10)] 🎉"},
     {"role": "user", "content": "谢谢！"},
     {"role": "assistant", "content": "不客气。"},
     {"role": "user", "content": "one more, with a trailing user turn"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},          # an empty reply
     {"role": "user", "content": "again?"}, {"role": "assistant", "content": "Yes."}],
]


def runs(ids, mask):
    """Maximal runs of masked tokens, as id lists."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chat_mask_covers_exactly_the_assistant_replies(tokenizer, conv):
    ids, mask = tokenizer.render_chat(conv)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    replies = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
    masked = [tokenizer.decode(r) for r in runs(ids, mask)]
    assert masked == replies                            # each reply + its end token, one contiguous run each
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "".join(replies)
    # Everything unmasked is the rest of the rendered text: roles, prompts, separators.
    text = Tokenizer.chat_text(conv)
    assert tokenizer.decode(ids) == text
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    rest = "".join(f"<|im_start|>{m['role']}\n" + ("" if m["role"] == "assistant" else m["content"] + "<|im_end|>")
                   + "\n" for m in conv)
    assert unmasked == rest
    # The end token of every assistant turn is supervised, and no user/system <|im_end|> is.
    ends = [k for k, i in enumerate(ids) if i == tokenizer.eos_id]
    roles = [m["role"] for m in conv]
    assert [mask[k] for k in ends] == [int(r == "assistant") for r in roles]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_render_chat_ids_equal_encode_of_chat_text(tokenizer, conv, gen):
    ids, mask = tokenizer.render_chat(conv, add_generation_prompt=gen)
    text = Tokenizer.chat_text(conv, add_generation_prompt=gen)
    assert ids == tokenizer.encode(text)
    # chat_text is the ChatML layout, written out here independently
    want = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
    assert text == want + ("<|im_start|>assistant\n" if gen else "")
    if gen:
        tail = tokenizer.encode("<|im_start|>assistant\n")
        assert ids[-len(tail):] == tail and not any(mask[-len(tail):])
    # The Jinja chat template (what transformers' apply_chat_template runs) renders the same text.
    rendered = jinja2.Environment().from_string(tokenizer.chat_template).render(messages=conv,
                                                                               add_generation_prompt=gen)
    assert rendered == text


def test_last_reply_only_masks_just_the_final_reply(tokenizer):
    conv = CONVERSATIONS[0]
    ids, mask = tokenizer.render_chat(conv, last_reply_only=True)
    ids_all, mask_all = tokenizer.render_chat(conv)
    assert ids == ids_all
    assert [tokenizer.decode(r) for r in runs(ids, mask)] == [conv[-1]["content"] + "<|im_end|>"]
    assert all(a >= b for a, b in zip(mask_all, mask))            # a subset of the full mask
    assert sum(mask) < sum(mask_all)


def test_no_assistant_turn_means_empty_mask(tokenizer):
    ids, mask = tokenizer.render_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert len(ids) > 3 and not any(mask)


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert {int(k): (v["content"], v["special"]) for k, v in cfg["added_tokens_decoder"].items()} == \
        {0: ("<|endoftext|>", True), 1: ("<|im_start|>", True), 2: ("<|im_end|>", True),
         **{6400 + i: (t, False) for i, t in enumerate(CHAT_TOKENS)}}
    for source in (str(tmp_path), str(tmp_path / "tokenizer.json")):   # a directory or the file itself
        back = Tokenizer.load(source)
        assert back.vocab_size == tokenizer.vocab_size
        assert back.fingerprint() == tokenizer.fingerprint()
        assert back.chat_template == tokenizer.chat_template == CHAT_TEMPLATE
        for s in ROUND_TRIP:
            assert back.encode(s) == tokenizer.encode(s)
        assert back.render_chat(CONVERSATIONS[0]) == tokenizer.render_chat(CONVERSATIONS[0])
    from minimind.checkpoint import CheckpointError  # a one-line `error:` for the CLI, not a traceback
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.load(str(tmp_path / "missing"))


def test_fingerprint_changes_with_the_vocabulary(tokenizer):
    other = train_bpe(iter(["some other text " * 10]), vocab_size=270, show_progress=False)
    assert other.fingerprint() != tokenizer.fingerprint()
    assert len(tokenizer.fingerprint()) == 16


def test_mask_covers_a_reply_that_starts_with_whitespace(tokenizer):
    """The chat is encoded in one piece (as transformers' apply_chat_template does), so BPE may merge the '\n'
    after 'assistant' with the reply's leading spaces into one token. That token holds reply characters, so it is
    supervised: every character of the reply is learnt, none is lost to the prompt side."""
    conv = [{"role": "user", "content": "indent it"}, {"role": "assistant", "content": "    return x\n"}]
    ids, mask = tokenizer.render_chat(conv)
    assert ids == tokenizer.encode(tokenizer.render_text(conv))
    (run,) = runs(ids, mask)
    assert tokenizer.decode(run) in ("    return x\n<|im_end|>", "\n    return x\n<|im_end|>")
    assert tokenizer.decode(run).endswith("    return x\n<|im_end|>")
    first = ids.index(run[0])
    assert tokenizer.decode(ids[:first]).endswith(("<|im_start|>assistant\n", "<|im_start|>assistant"))
