"""Chat format, exactly: tools, tool calls, tool turns, reasoning and the thinking switch, rendered as each
tokenizer's own template does, checked against transformers' apply_chat_template on the real tokenizer.

Templates: MiniMind-3's (its tokenizer from ../shared/tokenizers, skipped where absent), Qwen3's two published
templates (tests/fixtures, applied to a tokenizer with the same special tokens) and our own (the bundled default
tokenizer and a freshly trained one, saved and read back by transformers). Supervision is checked against
MiniMind's own label rule: what MiniMind-3 trains on, less what the template itself writes.
"""
import copy
import json
import shutil
from pathlib import Path

import pytest

from minimind import DEFAULT_TOKENIZER
from minimind.data import DataError, load_sft, read_jsonl, sft_example, with_reasoning
from minimind.loss import IGNORE
from minimind.tokenizer import (CHAT_TEMPLATE, CHAT_TOKENS, CHATML_TEMPLATE, ChatFormat, Tokenizer, chat_format,
                                train_bpe)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MINIMIND3 = ROOT.parent / "shared" / "tokenizers" / "minimind3"

transformers = pytest.importorskip("transformers", reason="chat-format tests compare with transformers")

TOOLS = [{"type": "function", "function": {
    "name": "calculate_math", "description": "计算数学表达式",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

# Conversations in the shapes MiniMind-3's SFT files and OpenAI clients use.
CASES = {
    # MiniMind's README record: tools as JSON text on the system turn, tool_calls as JSON text, no wrapper
    "minimind_tool_record": [
        {"role": "system", "content": "# Tools ...", "tools": json.dumps(TOOLS, ensure_ascii=False)},
        {"role": "user", "content": "帮我算一下 256 乘以 37 等于多少"},
        {"role": "assistant", "content": "",
         "tool_calls": "[{\"name\":\"calculate_math\",\"arguments\":{\"expression\":\"256 * 37\"}}]"},
        {"role": "tool", "content": "{\"result\":\"9472\"}"},
        {"role": "assistant", "content": "256 乘以 37 等于 9472。"}],
    # OpenAI's shape: a list, the function wrapper, arguments as JSON text; two parallel calls, two tool turns
    "openai_parallel_calls": [
        {"role": "system", "content": "You are helpful.", "tools": TOOLS},
        {"role": "user", "content": "Weather in Paris and 2*21?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "calculate_math",
                                                          "arguments": {"expression": "2*21"}}}]},
        {"role": "tool", "content": "{\"temp\": 18}"}, {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "Paris: 18 °C; 2*21 = 42.", "reasoning_content": "Both tools answered."}],
    # multi-turn tool use: two queries, each with calls, reasoning on several steps
    "multi_turn_tools": [
        {"role": "system", "content": "", "tools": TOOLS},
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the calculator.",
         "tool_calls": [{"name": "calculate_math", "arguments": {"expression": "3+4"}}]},
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "7.", "reasoning_content": "\nIt said 7.\n"},
        {"role": "user", "content": "And the weather in 北京?"},
        {"role": "assistant", "content": "\nChecking.", "reasoning_content": "call get_weather",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"晴\"}"},
        {"role": "assistant", "content": "北京 21 °C，晴。🎉"}],
    # reasoning in every turn (Qwen3 keeps only the last query's), inline in the content, empty, padded
    "reasoning_multi_turn": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "\n5", "reasoning_content": "\nadd them\n"},
        {"role": "user", "content": "times 2?"},
        {"role": "assistant", "content": "<think>\ndouble it\n</think>\n\n10"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Done.", "reasoning_content": ""}],
    "plain_chat": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "介绍一下列表推导式。\nline 2"},
        {"role": "assistant", "content": "[x * x for x in range(10)] 🎉\n\n    code()"},
        {"role": "user", "content": "谢谢！"}],
    # tools without a system turn; an assistant turn that ends the chat with a call; a trailing tool response
    "tools_no_system_pending_call": [
        {"role": "user", "content": "Weather?", "tools": None},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {}}]},
        {"role": "tool", "content": "sunny"}],
}
CASE_TOOLS = {"tools_no_system_pending_call": TOOLS}     # given as render_chat(tools=...)


def hf_inputs(messages, tools=None):
    """What MiniMind's SFTDataset hands apply_chat_template: tools from the system turn (JSON text parsed),
    tool_calls parsed from JSON text; everything else as is. Written here independently of minimind."""
    out = []
    for m in copy.deepcopy(messages):
        if m.get("role") == "system" and m.get("tools"):
            tools = json.loads(m["tools"]) if isinstance(m["tools"], str) else m["tools"]
        if isinstance(m.get("tool_calls"), str):
            m["tool_calls"] = json.loads(m["tool_calls"])
        out.append(m)
    return out, tools


def hf_ids(hf_tok, messages, gen=False, thinking=None, tools=None):
    msgs, tools = hf_inputs(messages, tools)
    kw = {} if thinking is None else {"enable_thinking": thinking, "open_thinking": thinking}
    out = hf_tok.apply_chat_template(msgs, tools=tools, tokenize=True, add_generation_prompt=gen, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_text(hf_tok, messages, gen=False, thinking=None, tools=None):
    msgs, tools = hf_inputs(messages, tools)
    kw = {} if thinking is None else {"enable_thinking": thinking, "open_thinking": thinking}
    return hf_tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen, **kw)


def tokenizer_dir(folder: Path, base: Path, template: str | None = None) -> Path:
    """A copy of a tokenizer directory, optionally with another chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "tokenizer.json", folder / "tokenizer.json")
    cfg = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return folder


QWEN3 = (FIXTURES / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
QWEN3_2507 = (FIXTURES / "qwen3_thinking_2507_chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (our Tokenizer, transformers' tokenizer) over the same files."""
    tmp = tmp_path_factory.mktemp("chat-format")
    ours_dir = tmp / "ours"
    Tokenizer.load(DEFAULT_TOKENIZER).save(str(ours_dir))      # as every train_*.py writes it into a model dir
    dirs = {"ours": ours_dir,
            "qwen3": tokenizer_dir(tmp / "qwen3", ours_dir, QWEN3),
            "qwen3-2507": tokenizer_dir(tmp / "qwen3-2507", ours_dir, QWEN3_2507)}
    if (MINIMIND3 / "tokenizer.json").is_file():
        dirs["minimind3"] = MINIMIND3
        dirs["qwen3@minimind3"] = tokenizer_dir(tmp / "qwen3mm3", MINIMIND3, QWEN3)
    return {k: (Tokenizer.load(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))) for k, d in dirs.items()}


NAMES = ["ours", "qwen3", "qwen3-2507", "minimind3", "qwen3@minimind3"]


def get(pairs, name):
    if name not in pairs:
        pytest.skip(f"MiniMind-3's tokenizer not found at {MINIMIND3}")
    return pairs[name]


# ---------------------------------------------------------------------------------------------------------------
# ids equal transformers' apply_chat_template, for every case, template and switch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_ids_equal_apply_chat_template(pairs, name):
    tok, hf_tok = get(pairs, name)
    checked = 0
    for case, conv in CASES.items():
        tools = CASE_TOOLS.get(case)
        for gen, thinking in [(False, None), (True, None), (True, True), (True, False)]:
            ids, mask = tok.render_chat(conv, add_generation_prompt=gen, tools=tools, thinking=thinking)
            want = hf_ids(hf_tok, conv, gen, thinking, tools)
            assert tok.render_text(conv, gen, tools, thinking) == hf_text(hf_tok, conv, gen, thinking, tools), case
            assert ids == want, f"{name} / {case} / gen={gen} thinking={thinking}"
            assert len(mask) == len(ids)
            checked += 1
    assert checked == 4 * len(CASES)


def test_detected_formats(pairs):
    assert chat_format(QWEN3) == ChatFormat("qwen3", think="after_query", prompt=("", "", "<think>\n\n</think>\n\n"))
    assert chat_format(QWEN3_2507) == ChatFormat("qwen3", think="after_query", prompt=("<think>\n",) * 3)
    assert chat_format("{#- a copy, so the fast path is skipped -#}" + CHAT_TEMPLATE) == chat_format(CHAT_TEMPLATE)
    assert chat_format(CHAT_TEMPLATE) == ChatFormat("qwen3", think="reasoning", prompt=("", "<think>\n", ""))
    if "minimind3" in pairs:
        think = "<think>\n\n</think>\n\n"
        assert pairs["minimind3"][0].chat_format() == ChatFormat("qwen3", think="always",
                                                                 prompt=(think, "<think>\n", think))
        assert pairs["minimind3"][0].chat_profile() == (None, think)


# ---------------------------------------------------------------------------------------------------------------
# What is supervised
# ---------------------------------------------------------------------------------------------------------------
def minimind_labels(ids, tok):
    """MiniMind's SFT label rule (its dataset/lm_dataset.py, restated): every token from after each
    '<|im_start|>assistant\\n' up to and including the next '<|im_end|>\\n'."""
    start, end = tok.encode("<|im_start|>assistant\n"), tok.encode("<|im_end|>\n")
    labels, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(start)] == start:
            j = i + len(start)
            while j < len(ids) and ids[j:j + len(end)] != end:
                j += 1
            for k in range(i + len(start), min(j + len(end), len(ids))):
                labels[k] = 1
            i = j + len(end)
        else:
            i += 1
    return labels


def runs(tok, ids, mask):
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


CALL = '<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call>'


def test_minimind3_supervises_reasoning_reply_and_calls_never_tool_responses(pairs):
    tok, hf_tok = get(pairs, "minimind3")
    conv = CASES["multi_turn_tools"]
    ids, mask = tok.render_chat(conv)
    assert ids == hf_ids(hf_tok, conv)
    assert runs(tok, ids, mask) == [
        "I should call the calculator.\n</think>\n\n" + CALL.format("calculate_math", '{"expression": "3+4"}')
        + "<|im_end|>",
        "It said 7.\n</think>\n\n7.<|im_end|>",
        "call get_weather\n</think>\n\nChecking.\n" + CALL.format("get_weather", '{"city": "北京"}') + "<|im_end|>",
        "北京 21 °C，晴。🎉<|im_end|>"]              # a turn without reasoning: its empty think block is the template's
    # Against MiniMind's own rule: we supervise a subset of its labels, and what we leave out is only what the
    # template writes (the think-block head) and the '\n' after <|im_end|>.
    theirs = minimind_labels(ids, tok)
    assert all(t >= o for t, o in zip(theirs, mask))
    left_out = tok.decode([i for i, t, o in zip(ids, theirs, mask) if t and not o])
    assert left_out == "<think>\n\n" + "<think>\n\n" + "<think>\n\n" + "<think>\n\n</think>\n\n\n"
    text = tok.decode(ids)
    supervised = "".join(runs(tok, ids, mask))
    for never in ("<tool_response>", "</tool_response>", "9472", "\"temp\": 21", "# Tools", "<tools>", "What is 3+4"):
        assert never not in supervised
    assert text.count("<tool_response>") == 2


def test_minimind3_reasoning_record_gets_one_think_block_when_trained(pairs, tmp_path):
    """The issue's bug: the template's empty think block, then the reasoning folded in after it."""
    tok, hf_tok = get(pairs, "minimind3")
    conv = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "easy"}]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n", encoding="utf-8")
    (ex,), dropped = load_sft(str(path), tok, 256)              # the training path, --reasoning keep
    assert ex.ids == hf_ids(hf_tok, conv)[:len(ex.ids)]
    text = tok.decode(ex.ids)
    assert text.count("<think>") == 1 and "<think>\neasy\n</think>\n\n2" in text
    assert tok.decode([t for t in ex.targets if t != IGNORE]) == "easy\n</think>\n\n2<|im_end|>"
    (dropped_ex,), _ = load_sft(str(path), tok, 256, reasoning="drop")
    assert "easy" not in tok.decode(dropped_ex.ids)
    assert dropped_ex.ids == hf_ids(hf_tok, with_reasoning(conv, "drop"))[:len(dropped_ex.ids)]
    assert tok.decode([t for t in dropped_ex.targets if t != IGNORE]) == "2<|im_end|>"


@pytest.mark.parametrize("name", ["ours", "qwen3"])
def test_supervision_follows_the_template_head(pairs, name):
    """Ours: a reasoning turn's '<think>\\n' is the thinking prompt's, so it is not supervised. Qwen3 (thinking
    on by default, its prompt writes nothing): the model opens the think block itself, so '<think>' is
    supervised; an empty block is its enable_thinking=False prompt, so it is not."""
    tok, _ = get(pairs, name)
    ids, mask = tok.render_chat(CASES["reasoning_multi_turn"])
    got = runs(tok, ids, mask)
    if name == "ours":
        assert got == ["add them\n</think>\n\n5<|im_end|>", "double it\n</think>\n\n10<|im_end|>", "Done.<|im_end|>"]
    else:   # only the turns after the last query keep their reasoning; earlier ones are plain replies
        assert got == ["\n5<|im_end|>", "10<|im_end|>", "Done.<|im_end|>"]
        ids, mask = tok.render_chat(CASES["openai_parallel_calls"])
        assert runs(tok, ids, mask)[-1] == "<think>\nBoth tools answered.\n</think>\n\nParis: 18 °C; 2*21 = 42.<|im_end|>"


def test_last_reply_only_and_generation_prompt_thinking_switch(pairs):
    tok, _ = get(pairs, "ours")
    conv = CASES["openai_parallel_calls"]
    ids, mask = tok.render_chat(conv, last_reply_only=True)
    assert runs(tok, ids, mask) == ["Both tools answered.\n</think>\n\nParis: 18 °C; 2*21 = 42.<|im_end|>"]
    prompt = [{"role": "user", "content": "hi"}]
    assert tok.render_text(prompt, True).endswith("<|im_start|>assistant\n")
    assert tok.render_text(prompt, True, thinking=False).endswith("<|im_start|>assistant\n")
    assert tok.render_text(prompt, True, thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    ids, mask = tok.render_chat(prompt, add_generation_prompt=True, thinking=True)
    assert ids[-2:] == [tok.tok.token_to_id("<think>"), tok.encode("\n")[0]] and not any(mask)


# ---------------------------------------------------------------------------------------------------------------
# Our own template: one token per markup tag, and transformers renders it as we do
# ---------------------------------------------------------------------------------------------------------------
def test_our_template_is_engine_setup_independent_and_plain_chats_stay_chatml(pairs):
    import jinja2
    tok, _ = get(pairs, "ours")
    env = jinja2.Environment()                                         # no trim_blocks / lstrip_blocks
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)  # the tojson every chat engine defines
    plain = env.from_string(CHAT_TEMPLATE)
    for case, conv in CASES.items():
        msgs, tools = hf_inputs(conv, CASE_TOOLS.get(case))
        for gen in (False, True):
            assert plain.render(messages=msgs, tools=tools, add_generation_prompt=gen) == \
                tok.render_text(conv, gen, CASE_TOOLS.get(case))
    conv = CASES["plain_chat"]                    # no tools, no reasoning: exactly the ChatML of old
    assert tok.render_text(conv) == Tokenizer.chat_text(conv)
    ids, _ = tok.render_chat(CASES["openai_parallel_calls"])
    for t in CHAT_TOKENS[:4]:
        assert tok.tok.token_to_id(t) in ids      # <think>, <tool_call> ... are single tokens in the chat


def test_freshly_trained_tokenizer_has_chat_tokens_and_matches_transformers(tmp_path):
    texts = ["hello world, the weather is sunny " * 20, "你好世界 " * 20, '{"city": "Paris"} 42 ' * 20]
    tok = train_bpe(iter(texts), vocab_size=320, show_progress=False)
    assert [tok.tok.token_to_id(t) for t in CHAT_TOKENS] == [3, 4, 5, 6, 7, 8] and tok.vocab_size <= 320
    assert tok.chat_template == CHAT_TEMPLATE
    tok.save(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert [cfg["added_tokens_decoder"][str(i)]["special"] for i in range(9)] == [True] * 3 + [False] * 6
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    fast.chat_template = cfg["chat_template"]
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for case, conv in CASES.items():
        tools = CASE_TOOLS.get(case)
        ids, _ = tok.render_chat(conv, tools=tools)
        assert ids == hf_ids(fast, conv, tools=tools) == hf_ids(auto, conv, tools=tools), case


def test_plain_chatml_tokenizer_refuses_tool_records_naming_the_line(tmp_path):
    folder = tokenizer_dir(tmp_path / "old", Path(DEFAULT_TOKENIZER), CHATML_TEMPLATE)
    tok = Tokenizer.load(str(folder))
    assert tok.chat_format().style == "chatml"
    path = tmp_path / "sft.jsonl"
    good = {"conversations": CASES["plain_chat"][:3]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"conversations": CASES["minimind_tool_record"]}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:3: .*tool_calls.*plain ChatML") as e:
        load_sft(str(path), tok, 256)
    assert "\n" not in str(e.value)
    # reasoning still works there: folded into the reply, as before
    ids, targets = sft_example(tok, [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a", "reasoning_content": "r"}], 64)
    assert tok.decode([t for t in targets if t != IGNORE]) == "<think>\nr\n</think>\n\na<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------
# Records the renderer cannot represent: one line naming FILE:LINE, never trained on
# ---------------------------------------------------------------------------------------------------------------
def conv_with(**assistant):
    return {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", **assistant}]}


BAD = [
    ({"conversations": [{"role": "user", "content": "q", "tool_calls": [{"name": "f", "arguments": {}}]},
                        {"role": "assistant", "content": "a"}]}, r"conversations\[0\]: 'tool_calls' on a user turn"),
    ({"conversations": [{"role": "user", "content": "q", "tools": TOOLS}, {"role": "assistant", "content": "a"}]},
     r"'tools' on a user turn .* system turn"),
    ({"conversations": [{"role": "system", "content": "s", "tools": "[{oops"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}, r"conversations\[0\]: tools is a string but not valid"),
    ({"conversations": [{"role": "system", "content": "s", "tools": {"name": "f"}}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}, r"tools must be a list"),
    (conv_with(tool_calls={"name": "f", "arguments": {}}), r"tool_calls must be a list .*wrap"),
    (conv_with(tool_calls=[{"name": "f", "arguments": "{not json"}]), r"tool_calls\[0\]: arguments is a string but not"),
    (conv_with(tool_calls=[{"name": "f", "arguments": "[1, 2]"}]), r"arguments must be a JSON object"),
    (conv_with(tool_calls=[{"name": "f", "arguments": {"x": float("nan")}}]), r"cannot be written as JSON"),
    (conv_with(tool_calls=[{"arguments": {}}]), r"tool_calls\[0\]: needs a non-empty string 'name'"),
    (conv_with(tool_calls=[{"name": 'say"hi', "arguments": {}}]), r"has a quote, backslash or newline"),
    (conv_with(tool_calls=[{"name": "f", "arguments": "{\"x\": NaN}"}]), r"arguments cannot be written as JSON"),
    (conv_with(tool_calls=[{"type": "function", "function": {"name": "f"}}]), r"has no 'arguments'"),
    (conv_with(tool_calls="[{\"name\": \"f\", \"arguments\": {}}"), r"tool_calls is a string but not valid JSON"),
    (conv_with(), r"conversations\[1\] is an assistant turn with no content, tool_calls or reasoning"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {}}]}]},
     r'conversations\[1\] content must be a string.*use ""'),
    (conv_with(content="<think>\nx\n</think>\n\na", reasoning_content="y"), r"reasoning_content and also a </think>"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "content": {"r": 1}},
                        {"role": "assistant", "content": "a"}]}, r"conversations\[1\] content must be a string"),
    ({"conversations": [{"role": "user", "content": "q", "reasoning_content": "r"},
                        {"role": "assistant", "content": "a"}]}, r"'reasoning_content' on a user turn"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_unrepresentable_record_is_a_data_error_naming_file_and_line(tmp_path, record, message):
    path = tmp_path / "sft.jsonl"
    good = {"conversations": CASES["minimind_tool_record"]}
    # json.dumps writes NaN as the (Python-readable) literal NaN: the record reaches validation
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(record, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=message) as e:
        list(read_jsonl(str(path), "sft"))
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)


def test_minimind_shapes_are_valid(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in CASES.values()),
                    encoding="utf-8")
    assert len(list(read_jsonl(str(path), "sft"))) == len(CASES)
    dpo = tmp_path / "dpo.jsonl"       # DPO may reject an empty reply: that is a signal, not a broken record
    dpo.write_text(json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]})
                   + "\n")
    assert len(list(read_jsonl(str(dpo), "dpo"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Random conversations: every combination the probes and cases might have missed
# ---------------------------------------------------------------------------------------------------------------
def random_conversation(rng):
    """A valid record: random roles in a sensible order, whitespace-heavy and non-ASCII text, reasoning in the
    field or inline (or empty), calls with or without the wrapper and with object or text arguments."""
    words = ["hi", " 你好", "\n", "  x = 1", "🎉", "\n\ncode", "a\tb", " ", "end\n", "<tool_response>", "json {}"]
    text = lambda: "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))   # noqa: E731
    conv = []
    if rng.random() < 0.6:
        conv.append({"role": "system", "content": text(), **({"tools": TOOLS} if rng.random() < 0.5 else {})})
    for _ in range(rng.randint(1, 3)):
        user = text() or "q"
        if rng.random() < 0.1:
            user = "<tool_response>\nold\n</tool_response>"   # Qwen3 treats this as a tool result, not a query
        conv.append({"role": "user", "content": user})
        for _ in range(rng.randint(1, 3)):
            turn = {"role": "assistant", "content": text() or "a"}
            r = rng.random()
            if r < 0.3:
                turn["reasoning_content"] = rng.choice(["", "\n", "think", "\nstep 1\nstep 2\n", " 想一想 "])
            elif r < 0.45:
                turn["content"] = f"<think>{rng.choice(['', chr(10), 'inline'])}</think>{text()}"
            if rng.random() < 0.4:
                calls = []
                for k in range(rng.randint(1, 2)):
                    args = rng.choice([{}, {"city": "北京"}, '{"a": 1}', {"nested": {"x": [1, 2.5, None, True]}}])
                    call = {"name": f"fn{k}", "arguments": args}
                    calls.append({"type": "function", "function": call} if rng.random() < 0.5 else call)
                turn["tool_calls"] = calls if rng.random() < 0.7 else json.dumps(calls, ensure_ascii=False)
                conv.append(turn)
                for _ in range(rng.randint(0, 2)):
                    conv.append({"role": "tool", "content": text() or "ok"})
                continue
            conv.append(turn)
    return conv


@pytest.mark.parametrize("name", NAMES)
def test_random_conversations_equal_apply_chat_template(pairs, name):
    import random
    tok, hf_tok = get(pairs, name)
    rng = random.Random(sum(map(ord, name)))          # a fixed seed per template
    for n in range(60):
        conv = random_conversation(rng)
        gen, thinking = rng.choice([(False, None), (True, None), (True, True), (True, False)])
        ids, mask = tok.render_chat(conv, add_generation_prompt=gen, thinking=thinking)
        assert ids == hf_ids(hf_tok, conv, gen, thinking), f"{name} #{n}: {conv}"
        supervised = runs(tok, ids, mask)
        assert all(r.endswith("<|im_end|>") for r in supervised)        # each turn ends where the model stops
        assert len(supervised) <= sum(m["role"] == "assistant" for m in conv)
        if name == "minimind3":
            assert all(t >= o for t, o in zip(minimind_labels(ids, tok), mask))


def test_train_full_sft_on_a_minimind3_tool_and_reasoning_file(tmp_path):
    """The issue's 'done when': a MiniMind-3 SFT file with tool calls and reasoning trains, end to end, on
    MiniMind-3's tokenizer (ours where it is absent), with every record kept and rendered by its template."""
    import torch
    from conftest import run_script
    from minimind.checkpoint import save_model
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    tok = Tokenizer.load(str(MINIMIND3) if (MINIMIND3 / "tokenizer.json").is_file() else DEFAULT_TOKENIZER)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    save_model(model, tok, str(tmp_path / "base"))
    records = [CASES["minimind_tool_record"], CASES["multi_turn_tools"], CASES["openai_parallel_calls"],
               CASES["reasoning_multi_turn"]] * 4
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in records),
                    encoding="utf-8")
    r = run_script("train_full_sft.py", "--from_weight", tmp_path / "base", "--data_path", path, "--out_dir",
                   tmp_path / "out", "--max_seq_len", 512, "--batch_size", 2, "--max_steps", 2, "--device", "cpu",
                   "--dtype", "float32", "--num_threads", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 dropped" in r.stdout and (tmp_path / "out" / "model.safetensors").is_file()
    examples, dropped = load_sft(str(path), tok, 512)
    assert dropped == 0 and len(examples) == len(records)
    for ex, conv in zip(examples, records):     # what was trained is the template's rendering, up to the last target
        full, _ = tok.render_chat(conv)
        assert ex.ids == full[:len(ex.ids)] and not any(e.truncated for e in examples)
