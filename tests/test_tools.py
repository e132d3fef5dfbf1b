"""Tools at inference (minimind/tools.py): the reply parser (think blocks, tool calls, broken and unclosed ones,
streamed piece by piece), the calculator (arithmetic only, bounded, time-limited), Python functions as tools, and
the tool loop on a tiny model trained here to call tools (eval_model.py --tools calculator too)."""
import json
import os
import time

import pytest
import torch

from conftest import ROOT, run_script
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.tools import (MAX_BITS, CalcError, Reply, ReplyParser, Tool, ToolRegistry, calculate, calculator,
                            chat_turn, collect, parse_reply, prompt_opens_thinking, tool_loop)

# ---------------------------------------------------------------------------------------------------------------
# A tiny model that has memorised a few tool-calling conversations (shared with tests/test_serve.py)
# ---------------------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def weather(city: str, temp: int) -> list[dict]:
    """Ask for the weather, call get_weather, answer from its result. Two of these with different temperatures:
    the first reply is the same, the final answer can only be right by reading the tool's result."""
    return [{"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "content": json.dumps({"city": city, "temp": temp})},
            {"role": "assistant", "content": f"It is {temp} °C in {city}."}]


MATH = [{"role": "user", "content": "What is 256 * 37?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}]},
        {"role": "tool", "content": '{"result": "9472"}'},
        {"role": "assistant", "content": "256 * 37 = 9472."}]
SKY = [{"role": "user", "content": "Why is the sky blue?"},
       {"role": "assistant", "content": "Because air scatters blue light the most.",
        "reasoning_content": "Sunlight scatters off air molecules; short wavelengths scatter most."}]


def training_set():
    """(conversation, tools) pairs, rendered by our template exactly as a request will render them."""
    return [(weather("Paris", 21), [WEATHER]), (weather("Paris", 5), [WEATHER]), (MATH, [calculator().schema()]),
            (SKY, None)]


_TRAINED = {}


def train_tool_model(tok, steps: int = 150):
    """A 0.5M-parameter model that memorises training_set() (full-batch AdamW, ~10 s on one core; trained once
    per test session, test_serve.py reuses it). A random model never calls a tool; this one has learnt, from
    conversations in our chat format, when to write a call, and what to say once the tool's result is in."""
    if steps in _TRAINED:
        return _TRAINED[steps]
    torch.manual_seed(0)
    seqs, masks = [], []
    for conv, tools in training_set():
        ids, mask = tok.render_chat(conv, tools=tools)
        seqs.append(ids)
        masks.append(mask)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    model = MiniMindForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    L = max(len(s) for s in seqs)
    x = torch.tensor([s[:-1] + [tok.pad_id] * (L - len(s)) for s in seqs])
    # loss on the supervised tokens only (what SFT trains): the model learns to write the calls and replies
    y = torch.tensor([[t if m else -100 for t, m in zip(s[1:], k[1:])] + [-100] * (L - len(s))
                      for s, k in zip(seqs, masks)])
    for _ in range(steps):
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"test model did not memorise its conversations (loss {loss.item():.3f})"
    _TRAINED[steps] = model.eval()
    return _TRAINED[steps]


@pytest.fixture(scope="module")
def tool_model(tokenizer):
    return train_tool_model(tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


def streamed(text: str, thinking=False, tools=True, step: int = 1) -> Reply:
    """The same text fed `step` characters at a time."""
    p = ReplyParser(thinking, tools)
    deltas = []
    for i in range(0, len(text), step):
        deltas += p.feed(text[i:i + step])
    reply = collect(deltas + p.finish(), Reply(""))
    if p.opened and reply.reasoning is None:
        reply.reasoning = ""
    return reply


def shape(r: Reply):
    return r.content, r.reasoning, [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                                    for c in r.tool_calls]


CASES = [  # (reply text, thinking opened by the prompt, (content, reasoning, calls))
    ("Hello\n\nworld\n", False, ("Hello\n\nworld\n", None, [])),                     # plain text: untouched
    ("\nleading newline", False, ("\nleading newline", None, [])),
    ("<think>\nlet me see\n</think>\n\nIt is 21.", False, ("It is 21.", "let me see", [])),
    ("let me see\n</think>\n\nIt is 21.", True, ("It is 21.", "let me see", [])),    # the prompt opened it
    ("cut off while thinking", True, ("", "cut off while thinking", [])),
    ("<think>\n\n</think>\n\nHi", False, ("Hi", "", [])),                            # an empty think block
    ("Let me check.\n" + CALL, False, ("Let me check.", None, [("function", "get_weather", {"city": "北京"})])),
    (CALL + "\n" + CALL.replace("北京", "Paris"), False,                              # several calls
     ("", None, [("function", "get_weather", {"city": "北京"}), ("function", "get_weather", {"city": "Paris"})])),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', False,   # arguments as JSON text
     ("", None, [("function", "f", {"x": 1})])),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', False, ("", None, [("function", "f", {})])),
    # broken calls stay in the content exactly as written, and a client never gets a call it cannot run
    ('<tool_call>\n{"name": "f", "arguments": {x: 1}}\n</tool_call>\nsorry', False,
     ('<tool_call>\n{"name": "f", "arguments": {x: 1}}\n</tool_call>sorry', None, [])),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', False, ('<tool_call>\n{"arguments": {}}\n</tool_call>', None, [])),
    ('<tool_call>\n["f"]\n</tool_call>', False, ('<tool_call>\n["f"]\n</tool_call>', None, [])),
    ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', False,
     ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', None, [])),
    ('ok\n<tool_call>\n{"name": "f", "argum', False, ('ok<tool_call>\n{"name": "f", "argum', None, [])),  # unclosed
    ("a <think> later is just text", False, ("a <think> later is just text", None, [])),
    ("ends with <tool_c", False, ("ends with <tool_c", None, [])),
]


@pytest.mark.parametrize("text,thinking,want", CASES)
def test_parse_reply(text, thinking, want):
    assert shape(parse_reply(text, thinking)) == want
    for step in (1, 2, 5):          # streamed in pieces of any size: the same result
        assert shape(streamed(text, thinking, step=step)) == want


def test_parser_details():
    r = parse_reply(CALL + CALL)
    ids = [c["id"] for c in r.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert r.tool_calls[0]["function"]["arguments"] == '{"city": "北京"}'      # JSON text, non-ASCII kept
    # without tools a <tool_call> is plain text, and plain text streams as it comes (nothing held back)
    assert parse_reply("x\n" + CALL, tools=False).content == "x\n" + CALL
    p = ReplyParser(tools=False)
    assert p.feed("a\n") == [{"content": "a\n"}]
    # with tools, a call's JSON is held until it closes, then comes out as one delta
    p = ReplyParser()
    assert p.feed('Hi\n<tool_call>\n{"name": "f",') == [{"content": "Hi"}]
    out = p.feed(' "arguments": {}}\n</tool_call>')
    assert len(out) == 1 and out[0]["tool_call"]["function"] == {"name": "f", "arguments": "{}"}
    assert prompt_opens_thinking("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")     # MiniMind-3, off
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------------
# The calculator
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,want", [
    ("256 * 37", 9472), ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("-2 ** 2", -4), ("(-2) ** 2", 4), ("--3", 3),
    ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1), ("2 ** 10", 1024), ("2 ** -1", 0.5), ("1 / 4", 0.25),
    ("3.5 * 2", 7.0), (" 10 - 2 - 3 ", 5), ("2 ** 4095 // 2 ** 4094", 2), ("1e3 + 1", 1001.0), ("+5", 5),
    ("1 ** 999999999999", 1), ("(-1) ** 12345678901", -1), ("2 ** -100000", 0.0), ("0.5 ** 2", 0.25),
])
def test_calculator_valid(expr, want):
    got = calculate(expr)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("expr,words", [
    ("__import__('os')", "found Call"),
    ("__import__('os').system('echo hacked')", "found"),
    ("().__class__.__bases__[0]", "found"),
    ("open('/etc/passwd')", "found Call"),
    ("(lambda: 1)()", "found"),
    ("x + 1", "found Name"),
    ("'a' * 3", "found 'a'"),
    ("True + 1", "found True"),
    ("[1, 2]", "found List"),
    ("1 if 1 else 2", "found IfExp"),
    ("2 << 10", "found BinOp"),
    ("1 < 2", "found Compare"),
    ("1j * 2", "found 1j"),
    ("9**9**9", "too large"),                        # 9**387420489 is refused, not computed
    ("10 ** 100000", "too large"),
    ("2 ** 4097", "too large"),
    ("(2 ** 4000) * (2 ** 4000)", "too large"),
    ("1e308 * 10", "not a finite number"),
    ("10.0 ** 400", "too large for a float"),
    ("(2 ** 4000) ** -2", "too large for a float"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("9" * 501, "longer than 500"),
    ("(" * 240 + "1" + ")" * 240, "not an arithmetic expression"),   # deeper than Python's parser allows
    ("", "not an arithmetic expression"),
    ("1 +", "not an arithmetic expression"),
    ("import os", "not an arithmetic expression"),
])
def test_calculator_refuses(expr, words):
    t0 = time.perf_counter()
    with pytest.raises(CalcError, match=words.replace("(", r"\(").replace("*", r"\*")):
        calculate(expr)
    assert time.perf_counter() - t0 < 0.5                # refused at once, never ground through


def test_calculator_bounds_and_time_limit():
    assert calculate("2 ** 4095").bit_length() == MAX_BITS     # up to the bound it computes exactly
    assert calculate("-" * 491 + "1") == -1                      # deep but legal: fine
    with pytest.raises(CalcError, match="more than"):
        calculate("2 ** 4095 * 4")
    # the deadline is checked between steps: a long sum with a tiny limit stops with the limit's message
    long_sum = "+".join(["1"] * 150)
    assert calculate(long_sum) == 150
    with pytest.raises(CalcError, match="took longer than the 1e-09 s limit"):
        calculate(long_sum, timeout=1e-9)
    with pytest.raises(CalcError, match="string"):
        calculate(12)


def test_calculator_tool():
    tool = calculator()
    s = tool.schema()
    assert s["function"]["name"] == "calculate_math"             # MiniMind-3's name for it
    assert s["function"]["parameters"]["required"] == ["expression"]
    reg = ToolRegistry([tool])
    call = {"type": "function", "function": {"name": "calculate_math", "arguments": '{"expression": "256 * 37"}'}}
    assert json.loads(reg.run(call)) == {"result": "9472"}
    assert json.loads(reg.run({"function": {"name": "calculate_math", "arguments": {"expression": "0.1 + 0.2"}}})) \
        == {"result": "0.3"}
    bad = json.loads(reg.run({"function": {"name": "calculate_math",
                                           "arguments": json.dumps({"expression": "__import__('os')"})}}))
    assert "found Call" in bad["error"]                          # the model sees why, nothing ran


# ---------------------------------------------------------------------------------------------------------------
# Python functions as tools
# ---------------------------------------------------------------------------------------------------------------
def test_register_python_functions():
    reg = ToolRegistry()

    @reg.register
    def get_weather(city: str, days: int = 1, metric: bool = True) -> dict:
        """The weather forecast for a city.

        Longer text that is not part of the description.

        Args:
            city: the city's name, e.g. 北京
            days (int): how many days ahead
        """
        return {"city": city, "days": days, "metric": metric}

    @reg.register(name="shout", description="Upper-case a text.",
                  parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
    def _upper(text):
        return text.upper()

    def boom():
        """Always fails."""
        raise RuntimeError("disk on fire")
    reg.add(Tool.from_function(boom))

    schema = reg.schemas()[0]
    assert schema == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather forecast for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city's name, e.g. 北京"},
            "days": {"type": "integer", "description": "how many days ahead"},
            "metric": {"type": "boolean"}}, "required": ["city"]}}}
    assert reg.schemas()[1]["function"]["name"] == "shout"

    def run(name, args):
        return reg.run({"id": "call_1", "type": "function",
                        "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}})
    assert json.loads(run("get_weather", {"city": "Paris", "days": 2})) == {"city": "Paris", "days": 2,
                                                                            "metric": True}
    assert run("shout", {"text": "hi"}) == "HI"                         # a string result is sent as is
    for name, args, words in [("nope", {}, "unknown tool 'nope'; available: get_weather, shout, boom"),
                              ("get_weather", "{not json", "not valid JSON"),
                              ("get_weather", "[1]", "must be a JSON object"),
                              ("get_weather", {}, "missing a required argument: 'city'"),
                              ("get_weather", {"city": "x", "town": "x"}, "town"),
                              ("boom", {}, "boom failed: RuntimeError: disk on fire")]:
        assert words in json.loads(run(name, args))["error"], (name, args)
    from minimind.errors import UsageError
    with pytest.raises(UsageError, match="already registered"):
        reg.register(get_weather)
    with pytest.raises(UsageError, match="tool name"):
        Tool.from_function(boom, name='bad"name')


def test_tools_module_does_not_import_training():
    from test_architecture import TRAINING, graph, reachable
    assert not reachable(graph(), {"tools"}) & TRAINING


# ---------------------------------------------------------------------------------------------------------------
# The loop, on a model that learnt to call tools
# ---------------------------------------------------------------------------------------------------------------
def test_tool_loop_with_the_calculator(tool_model, tokenizer):
    reg = ToolRegistry([calculator()])
    seen = []
    new = tool_loop(tool_model, tokenizer, [MATH[0]], reg, max_rounds=3, on_result=lambda c, r: seen.append(r),
                    max_new_tokens=40)
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant"]
    (call,) = new[0]["tool_calls"]
    assert call["function"]["name"] == "calculate_math"
    assert json.loads(call["function"]["arguments"]) == {"expression": "256 * 37"}
    assert new[0]["content"] == ""
    assert new[1] == {"role": "tool", "tool_call_id": call["id"], "name": "calculate_math",
                      "content": '{"result": "9472"}'} and seen == ['{"result": "9472"}']   # really computed
    assert new[2] == {"role": "assistant", "content": "256 * 37 = 9472."}
    # the loop's messages are valid history: they render back (render_chat accepts them as they are)
    tokenizer.render_chat([MATH[0], *new], tools=reg.schemas())
    # bounded: with one round the model's call is run, and the loop stops there
    assert [m["role"] for m in tool_loop(tool_model, tokenizer, [MATH[0]], reg, max_rounds=1,
                                         max_new_tokens=40)] == ["assistant", "tool"]


def test_chat_turn_thinking_and_tool_results(tool_model, tokenizer):
    deltas = []
    r = chat_turn(tool_model, tokenizer, [SKY[0]], thinking=True, on_delta=deltas.append, max_new_tokens=60)
    assert (r.reasoning, r.content) == (SKY[1]["reasoning_content"], SKY[1]["content"])
    assert sum("reasoning_content" in d for d in deltas) > 1 and sum("content" in d for d in deltas) > 1
    # the final answer follows the tool's result, not a memorised one
    for temp in (21, 5):
        conv = weather("Paris", temp)
        r = chat_turn(tool_model, tokenizer, conv[:3], tools=[WEATHER], max_new_tokens=30)
        assert (r.content, r.tool_calls) == (f"It is {temp} °C in Paris.", [])


def test_eval_model_shows_thinking_and_runs_the_calculator(tool_model, tokenizer, tmp_path, monkeypatch, capsys):
    import sys

    import eval_model
    from minimind.checkpoint import save_model
    from minimind.errors import UsageError
    save_model(tool_model, tokenizer, str(tmp_path / "m"))
    # as a user runs it (a subprocess): the model calls the calculator, the result goes back, it answers
    res = run_script("eval_model.py", "--load_from", tmp_path / "m", "--tools", "calculator", "--prompts",
                     MATH[0]["content"], "--max_new_tokens", "40", timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert '🔧 calculate_math({"expression": "256 * 37"})' in out
    assert '📎 {"result": "9472"}' in out
    assert out.index("📎") < out.index("256 * 37 = 9472.")
    # the thinking switch (in-process: a second interpreter start would cost more than the test itself)
    monkeypatch.setattr(sys, "argv", ["eval_model.py", "--load_from", str(tmp_path / "m"), "--open_thinking", "1",
                                      "--prompts", SKY[0]["content"], "--max_new_tokens", "60"])
    eval_model.main()
    out = capsys.readouterr().out
    assert "💭 " + SKY[1]["reasoning_content"] + "\n   " + SKY[1]["content"] in out
    monkeypatch.setattr(sys, "argv", ["eval_model.py", "--load_from", str(tmp_path / "m"), "--max_tool_rounds", "0"])
    with pytest.raises(UsageError, match="--max_tool_rounds"):
        eval_model.main()
    assert os.path.isfile(ROOT / "eval_model.py")
