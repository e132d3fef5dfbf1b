"""Tools at inference: read a reply's <think> block and <tool_call>s, run tools, and loop until the model answers.

Bottom up:
  ReplyParser      reply text, piece by piece -> reasoning / content / tool-call deltas (the server streams these)
  parse_reply()    a whole reply -> Reply(reasoning, content, tool_calls), by the same parser (one home for it)
  calculate()      arithmetic parsed with `ast` and evaluated by hand: never eval, bounded sizes, a time limit
  Tool, ToolRegistry   Python functions as tools: a JSON schema from the signature and docstring, and run(call)
  chat_turn()      one assistant turn: render with tools, generate, parse (streaming deltas to a callback)
  tool_loop()      generate -> run the tools it asked for -> append `tool` turns -> generate again (bounded)

The reply format is the one the Qwen3-family templates teach (docs/en/thinking_tools.md):

    <think>\\n{reasoning}\\n</think>\\n\\n{content}\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>

Tool calls come out in OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments": JSON text}}.
"""
from __future__ import annotations

import ast
import inspect
import itertools
import json
import math
import operator
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import UsageError
from .generate import stream_text
from .tokenizer import END_THINK, END_TOOL_CALL, IM_START, THINK, TOOL_CALL, Tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Parsing a reply (streamed or whole)
# ---------------------------------------------------------------------------------------------------------------
def prompt_opens_thinking(prompt_text: str) -> bool:
    """Does the generation prompt end inside an open think block? (Our template and MiniMind-3's write
    '<think>\\n' after '<|im_start|>assistant\\n' when thinking is on: the reply then starts with reasoning.)"""
    tail = prompt_text.rsplit(IM_START, 1)[-1]
    return tail.count(THINK) > tail.count(END_THINK)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str) -> dict | None:
    """The JSON inside <tool_call>...</tool_call> -> an OpenAI-shaped call, or None if it is not a valid call
    ({"name": non-empty string, "arguments": an object, or JSON text of one; missing = {}})."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):   # some models write the arguments as JSON text, as OpenAI transports them
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ReplyParser:
    """Splits a reply, as it streams in, into reasoning, content and tool calls.

    feed(text) and finish() return a list of deltas, each one of
        {"reasoning_content": str}   text inside the <think> block
        {"content": str}             the reply itself
        {"tool_call": call}          a complete, valid call (OpenAI shape), emitted when its </tool_call> arrives
    Rules (the template's layout, read back):
    - a think block is recognised only as the reply's first characters (Qwen3 opens it so), or is already open
      when the prompt opened it (`thinking=True`); a reply that ends inside it is all reasoning.
    - the newlines the template writes around tags are not part of the text: after <think>, before </think>,
      after </think> and </tool_call>, before <tool_call>. Plain text without tags passes through untouched, and
      with `tools=False` as soon as it comes (with tools, trailing newlines wait: a <tool_call> may follow).
    - a call whose JSON is broken, or that never closes, stays in the content as the model wrote it: nothing the
      model said is lost, and a client never gets a call it cannot run.
    - `tools=False`: <tool_call> is just text (the request had no tools, or tool_choice "none").
    Text that could be the start of a tag is held back until it is clear (as TextStream does for stop strings).
    """

    def __init__(self, thinking: bool = False, tools: bool = True):
        self.mode = "reasoning" if thinking else "start"
        self.tools = tools
        self.buf = ""          # text not yet handed out (a possible tag start, held newlines, a call's body)
        self.lead = True       # at the start of a segment: leading newlines are the template's, drop them
        self.opened = thinking   # a think block was open at some point (reasoning may still be empty)

    def _tag(self) -> str | None:
        return {"start": THINK, "reasoning": END_THINK, "content": TOOL_CALL if self.tools else None,
                "call": END_TOOL_CALL}[self.mode]

    def _text(self, kind: str, text: str, final: bool) -> list[dict]:
        """Hand out segment text, minus the template's newlines: leading ones always, trailing ones unless the
        segment is over for good (final) -- they are held until more text shows they were the model's."""
        if self.lead:
            text = text.lstrip("\n")
            self.lead = not text
        if not final and (kind == "reasoning_content" or self.tools):   # a tag that eats them may follow
            stripped = text.rstrip("\n")
            self.buf, text = text[len(stripped):] + self.buf, stripped
        return [{kind: text}] if text else []

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        out = []
        while True:
            tag = self._tag()
            if self.mode == "start":          # a think block may open only here, as the reply's first characters
                head = self.buf
                if head.startswith(THINK):
                    self.buf, self.mode, self.lead, self.opened = head[len(THINK):], "reasoning", True, True
                    continue
                if THINK.startswith(head):    # '', '<', '<th', ...: not decided yet
                    return out
                self.mode, self.lead = "content", False   # plain text from the first character: keep it all
                continue
            at = self.buf.find(tag) if tag else -1
            if at < 0:
                if self.mode == "call":       # a call's body is held whole until it closes
                    return out
                keep = _partial_tag(self.buf, tag) if tag else 0
                body, tail = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                self.buf = ""
                out += self._text("reasoning_content" if self.mode == "reasoning" else "content", body, False)
                self.buf += tail              # (after any newlines _text held back)
                return out
            before, self.buf = self.buf[:at], self.buf[at + len(tag):]
            if self.mode == "reasoning":
                out += self._text("reasoning_content", before.rstrip("\n"), True)
                self.mode, self.lead = "content", True
            elif self.mode == "content":
                out += self._text("content", before.rstrip("\n"), True)   # the '\n' before <tool_call> is markup
                self.mode = "call"
            else:   # the call is complete
                call = parse_call(before.strip())
                if call is None:              # broken: keep it as text, exactly as written
                    self.lead = False
                    out += self._text("content", f"{TOOL_CALL}{before}{END_TOOL_CALL}", True)
                else:
                    out.append({"tool_call": call})
                self.mode, self.lead = "content", True

    def finish(self) -> list[dict]:
        """The reply ended: hand out what is held (an unclosed call as text; trailing newlines are kept)."""
        rest, self.buf = self.buf, ""
        if self.mode == "call":
            self.lead = False
            return self._text("content", TOOL_CALL + rest, True)
        if self.mode == "start":
            self.mode, self.lead = "content", False
        return self._text("reasoning_content" if self.mode == "reasoning" else "content", rest, True)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag (it may become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@dataclass
class Reply:
    """A parsed assistant reply. reasoning is None when there was no think block."""
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)

    def message(self) -> dict:
        """As an assistant message for the next turn's history (render_chat takes it back as is)."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            m["reasoning_content"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


def collect(deltas: Sequence[dict], reply: Reply) -> Reply:
    """Accumulate parser deltas into a Reply (in place; returned for convenience)."""
    for d in deltas:
        if "content" in d:
            reply.content += d["content"]
        elif "reasoning_content" in d:
            reply.reasoning = (reply.reasoning or "") + d["reasoning_content"]
        else:
            reply.tool_calls.append(d["tool_call"])
    return reply


def parse_reply(text: str, thinking: bool = False, tools: bool = True) -> Reply:
    """A whole reply -> Reply. thinking: the prompt opened the think block (see prompt_opens_thinking)."""
    p = ReplyParser(thinking, tools)
    reply = collect(p.feed(text) + p.finish(), Reply(""))
    if p.opened and reply.reasoning is None:
        reply.reasoning = ""
    return reply


# ---------------------------------------------------------------------------------------------------------------
# The calculator: arithmetic only, evaluated node by node
# ---------------------------------------------------------------------------------------------------------------
class CalcError(ValueError):
    """An expression the calculator refuses or cannot compute; the message says why."""


MAX_EXPRESSION = 500      # characters
MAX_BITS = 4096           # integers up to about 1,233 digits: beyond that a result is refused, not computed
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _bits(x) -> int:
    return abs(int(x)).bit_length() if isinstance(x, int) else 0


def calculate(expression: str, timeout: float = 1.0):
    """Evaluate arithmetic: numbers, + - * / // % **, parentheses, unary + and -. Returns an int or a float.

    Never eval(): the text is parsed with `ast`, and only the node types above are evaluated, by hand, so a name,
    a call, an attribute (`__import__('os')`) is refused before anything runs. Sizes are bounded *before* each
    operation: an integer product or power whose result would pass MAX_BITS bits (`9**9**9`) is refused, not
    attempted, so every step is fast, and the time limit is checked between steps (a cooperative deadline:
    there is no step that could run long in between).
    """
    if not isinstance(expression, str):
        raise CalcError("the expression must be a string")
    if len(expression) > MAX_EXPRESSION:
        raise CalcError(f"the expression is longer than {MAX_EXPRESSION} characters")
    start = time.monotonic()
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalcError(f"not an arithmetic expression ({type(e).__name__}: {getattr(e, 'msg', e)})") from None

    def ev(node):
        if time.monotonic() - start > timeout:
            raise CalcError(f"took longer than the {timeout:g} s limit")
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if _bits(node.value) > MAX_BITS:
                raise CalcError(f"a number has more than {MAX_BITS} bits")
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                # int ** int is exact and can be huge: estimate its bits first (float powers are one O(1)
                # operation that overflows with an error, so they need no bound)
                if isinstance(a, int) and isinstance(b, int) and b > 0 and b * max(_bits(a) - 1, 0) > MAX_BITS:
                    raise CalcError(f"the power is too large (more than {MAX_BITS} bits)")
            if isinstance(node.op, ast.Mult) and _bits(a) + _bits(b) > MAX_BITS + 1:
                raise CalcError(f"the product is too large (more than {MAX_BITS} bits)")
            try:
                out = _BINARY[type(node.op)](a, b)
            except ZeroDivisionError:
                raise CalcError("division by zero") from None
            except OverflowError:
                raise CalcError("the result is too large for a float") from None
            if isinstance(out, complex):      # (-8) ** 0.5
                raise CalcError("the result is not a real number")
            if isinstance(out, float) and not math.isfinite(out):
                raise CalcError("the result is not a finite number")
            if _bits(out) > MAX_BITS:
                raise CalcError(f"the result has more than {MAX_BITS} bits")
            return out
        what = type(node).__name__ if not isinstance(node, ast.Constant) else repr(node.value)
        raise CalcError(f"only numbers, + - * / // % **, parentheses and unary minus are allowed (found {what})")

    try:
        return ev(tree)
    except RecursionError:
        raise CalcError("the expression is nested too deeply") from None


def format_number(x) -> str:
    """12 significant digits for floats (0.1 + 0.2 -> '0.3'), integers exactly."""
    if isinstance(x, float):
        return format(x, ".12g")
    return str(x)


# ---------------------------------------------------------------------------------------------------------------
# Tools: a Python function with a JSON schema
# ---------------------------------------------------------------------------------------------------------------
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


def _doc_parts(fn) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a docstring: the first paragraph, and `name: text` lines
    (Google style 'Args:' sections, or plain lines)."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    params = {}
    for line in doc.splitlines()[1:]:
        m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", line)
        if m:
            params[m.group(1)] = m.group(2).strip()
    return description, params


def schema_from_signature(fn) -> dict:
    """JSON-schema `parameters` of a function: one property per argument (type from its annotation: int,
    float, str, bool, list, dict; description from the docstring), required = arguments without a default."""
    _, docs = _doc_parts(fn)
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        if isinstance(ann, str):  # `from __future__ import annotations`: annotations are text
            ann = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(ann)
        prop = {"type": _JSON_TYPES[ann]} if ann in _JSON_TYPES else {}
        if name in docs:
            prop["description"] = docs[name]
        props[name] = prop
        if p.default is p.empty:
            required.append(name)
    return {"type": "object", "properties": props, "required": required}


@dataclass
class Tool:
    """A function the model may call: its name, what it does, its JSON-schema parameters, and the function."""
    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]

    @classmethod
    def from_function(cls, fn, name: str | None = None, description: str | None = None,
                      parameters: dict | None = None) -> "Tool":
        name = name or fn.__name__
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", name or ""):
            raise UsageError(f"tool name {name!r}: use letters, digits, _ . - (it is pasted into JSON unescaped)")
        return cls(name, description if description is not None else _doc_parts(fn)[0],
                   parameters if parameters is not None else schema_from_signature(fn), fn)

    def schema(self) -> dict:
        """OpenAI's tool shape, which the chat template writes into the system turn."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _calculator_tool(expression: str):
    """Evaluate an arithmetic expression / 计算数学表达式: numbers, + - * / // % **, parentheses.

    expression: the expression, e.g. 256 * 37 or (2 + 3) ** 2
    """
    return {"result": format_number(calculate(expression))}


def calculator() -> Tool:
    """The built-in calculator as a tool. Named `calculate_math` with argument `expression`, the names in
    MiniMind-3's ~100K tool-calling SFT conversations, so a model trained on them calls it without a prompt
    change; it answers {"result": "9472"} as those conversations do."""
    return Tool.from_function(_calculator_tool, name="calculate_math")


BUILTIN = {"calculator": calculator}   # opt-in by name: eval_model.py --tools calculator


class ToolRegistry:
    """The tools a conversation may use. Nothing is registered by default: every tool is opt-in.

        reg = ToolRegistry([calculator()])
        @reg.register
        def get_weather(city: str) -> dict:
            '''The weather in a city.

            city: the city's name
            '''
            return {"city": city, "temp": 21}
        reg.schemas()                  # -> the `tools` list for the template / an OpenAI request
        reg.run(call)                  # -> the text of the `tool` message (errors too: the model should see them)
    """

    def __init__(self, tools: Sequence[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise UsageError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool
        return tool

    def register(self, fn=None, *, name: str | None = None, description: str | None = None,
                 parameters: dict | None = None):
        """Register a function (usable as @reg.register or @reg.register(name=...)); returns the function."""
        def deco(f):
            self.add(Tool.from_function(f, name, description, parameters))
            return f
        return deco(fn) if fn is not None else deco

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self.tools.values()]

    def run(self, call: dict) -> str:
        """Run one OpenAI-shaped call; the result as text (JSON unless the tool returned a string). A failure is
        returned as {"error": ...} rather than raised: it goes back to the model, which may correct itself."""
        fn = call.get("function", call)
        name = fn.get("name")
        tool = self.tools.get(name)
        if tool is None:
            return _error(f"unknown tool {name!r}; available: {', '.join(self.tools) or 'none'}")
        try:
            args = json.loads(fn.get("arguments") or "{}") if isinstance(fn.get("arguments"), str) \
                else fn.get("arguments") or {}
        except json.JSONDecodeError as e:
            return _error(f"arguments are not valid JSON ({e.msg})")
        if not isinstance(args, dict):
            return _error("arguments must be a JSON object")
        try:
            inspect.signature(tool.fn).bind(**args)
        except TypeError as e:
            return _error(f"{name}: {e}")
        try:
            result = tool.fn(**args)
        except Exception as e:  # noqa: BLE001 - any tool failure goes back to the model as text
            return _error(f"{name} failed: {type(e).__name__}: {e}")
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------------
# Generating with tools
# ---------------------------------------------------------------------------------------------------------------
def chat_turn(model, tokenizer: Tokenizer, messages: list[dict], tools: Sequence[dict] | None = None,
              thinking: bool | None = None, stop: Sequence[str] = (), on_delta: Callable[[dict], None] | None = None,
              **sampling) -> Reply:
    """Generate one assistant turn and parse it. on_delta gets each parser delta as it streams (to print it).
    tools: tool schemas to put in the system turn (their calls are parsed); thinking: the template's switch."""
    tools = list(tools) if tools else None
    prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools, thinking=thinking)
    parser, reply = ReplyParser(prompt_opens_thinking(tokenizer.decode(prompt[-16:])), bool(tools)), Reply("")
    for piece in itertools.chain(stream_text(model, tokenizer, prompt, stop, **sampling), [None]):  # None: the end
        for d in parser.feed(piece) if piece is not None else parser.finish():
            collect([d], reply)
            if on_delta:
                on_delta(d)
    if parser.opened and reply.reasoning is None:
        reply.reasoning = ""
    return reply


def tool_loop(model, tokenizer: Tokenizer, messages: list[dict], registry: ToolRegistry, max_rounds: int = 4,
              thinking: bool | None = None, on_delta: Callable[[dict], None] | None = None,
              on_result: Callable[[dict, str], None] | None = None, **sampling) -> list[dict]:
    """Answer with tools: generate; if the reply calls tools, run them, append the `tool` turns, generate again.

    At most max_rounds generations. Returns the new messages (assistant turns and tool turns); the last one is
    the final answer, or a `tool` message if the rounds ran out while the model still asked for tools.
    on_result(call, result) is called after each tool runs (to show it).
    """
    if max_rounds < 1:
        raise UsageError("max_rounds must be at least 1")
    new: list[dict] = []
    for _ in range(max_rounds):
        reply = chat_turn(model, tokenizer, messages + new, registry.schemas(), thinking, on_delta=on_delta,
                          **sampling)
        new.append(reply.message())
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            result = registry.run(call)
            if on_result:
                on_result(call, result)
            new.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                        "content": result})
    return new
