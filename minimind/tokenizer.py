"""Byte-level BPE tokenizer (trained with `tokenizers`) and the chat renderer.

Byte-level: text is first turned into UTF-8 bytes, so any string (Chinese, emoji, odd whitespace) round-trips
exactly and there is never an unknown token.

The chat renderer writes a conversation exactly as the tokenizer's own Jinja chat template does (the one in
tokenizer_config.json that transformers' apply_chat_template, vLLM and llama.cpp run), and returns the token ids
AND the loss mask in one pass. It is plain Python, not a Jinja interpreter: it knows two layouts, plain ChatML and
the Qwen3 family (tools, tool calls, tool responses, <think> blocks; Qwen3's, MiniMind-3's and our own templates
are members), and chat_format() checks once, by rendering probe conversations with Jinja, which layout a
template is and with which switches. A template that matches neither is refused rather than guessed at.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import CheckpointError, DataError
from .jsonio import read_json_object

# Same ids as MiniMind's tokenizer: 0 pads/separates, 1 opens a turn, 2 closes it (and ends generation).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Markup of thinking and tool use, one token each (as in Qwen3's and MiniMind-3's vocabularies). They are added
# tokens that BPE never splits, but not "special" ones: decode(skip_special_tokens=True) keeps them, so a reply's
# <think> block and <tool_call> stay visible to whoever parses it (vLLM's and llama.cpp's parsers rely on that).
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
CHAT_TOKENS = [THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE]
ROLES = ("system", "user", "assistant", "tool")

# The system-turn text the Qwen3 family writes around the tool list (Qwen3's wording, kept verbatim: models
# trained on it, Qwen3 and MiniMind-3 included, expect exactly these words).
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>")

# Plain ChatML, what minimind wrote into tokenizer_config.json before it had tool/think tokens (older model
# directories still carry it, and they keep rendering exactly as they were trained).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Our chat template: Qwen3's layout for tools, tool calls and tool responses, and a <think> block only in the
# assistant turns that have reasoning (no empty blocks: a plain conversation renders as plain ChatML). Thinking
# is off unless enable_thinking (Qwen3's name) or open_thinking (MiniMind-3's) is true; then the generation prompt
# opens the think block. Every tag strips the whitespace before it ({%- / {{-), so the output is the same with or
# without Jinja's trim_blocks/lstrip_blocks, as vLLM, llama.cpp and transformers each configure it.
# render_chat() is its Python twin; tests/test_chat_format.py checks the two agree through transformers.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if reasoning.strip('\\n') %}
            {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if (enable_thinking is defined and enable_thinking is true) or \
(open_thinking is defined and open_thinking is true) %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""


@dataclass(frozen=True)
class ChatFormat:
    """How a chat template lays a conversation out; chat_format() finds it, render_chat() follows it.

    style "chatml": <|im_start|>ROLE\\nCONTENT<|im_end|>\\n per turn, with two possible quirks: default_system
      (Qwen2.5 inserts "You are Qwen, ..." when a chat has no system turn) and reply_prefix (text written before
      every assistant reply, e.g. an empty think block). No tools; reasoning is folded into the reply text.
      tool_turns: whether the template writes a `tool` turn as plain ChatML too.
    style "qwen3": Qwen3's layout of tools, tool calls and tool responses; `think` says which assistant turns
      get a <think> block: "always" (MiniMind-3: every turn, empty or not), "after_query" (Qwen3: only the
      turns after the last user query, and there only the last one or those with reasoning), "reasoning" (ours:
      every turn that has reasoning, none otherwise).
    prompt: what the template writes after '<|im_start|>assistant\\n' at the generation prompt with thinking
      (default, on, off): Qwen3 ("", "", "<think>\\n\\n</think>\\n\\n"); MiniMind-3 ("<think>\\n\\n</think>\\n\\n",
      "<think>\\n", "<think>\\n\\n</think>\\n\\n"); ours ("", "<think>\\n", "").
    """
    style: str = "chatml"
    default_system: str | None = None
    reply_prefix: str = ""
    tool_turns: bool = True
    think: str = "reasoning"
    prompt: tuple = ("", "", "")


PLAIN_CHATML = ChatFormat("chatml")
OURS = ChatFormat("qwen3", think="reasoning", prompt=("", THINK + "\n", ""))


def tojson(value) -> str:
    """The `tojson` filter of transformers' chat templates: json.dumps, non-ASCII kept, Python's separators."""
    return json.dumps(value, ensure_ascii=False)


def fold_reasoning(reasoning: str, content: str) -> str:
    """A reply with its reasoning in front, the way the Qwen3 family writes a think block:

        <think>\\n{reasoning}\\n</think>\\n\\n{content}

    Every template minimind renders reads this back out of the content (Qwen3's, MiniMind-3's and ours split at
    </think>), so folding changes nothing for them; plain ChatML templates just show it as text.
    """
    return f"{THINK}\n{reasoning.strip(chr(10))}\n{END_THINK}\n\n{content.lstrip(chr(10))}"


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning, reply) of an assistant turn, as the Qwen3-family templates take it apart.

    `reasoning_content` when it is a string; otherwise a <think>...</think> block at the start of the content is
    cut out of it. (None, content) when there is neither.
    """
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content
    if END_THINK in content:
        head, _, _ = content.partition(END_THINK)
        return head.rstrip("\n").split(THINK)[-1].lstrip("\n"), content.split(END_THINK)[-1].lstrip("\n")
    return None, content


# ---------------------------------------------------------------------------------------------------------------
# Checking a conversation: what the renderer can represent, in the shapes MiniMind's data uses
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Turn:
    role: str
    content: str                  # as written in the record
    reasoning: str | None         # the reasoning_content field (assistant turns), None if absent
    calls: list                   # [(name, arguments as the template writes them)], assistant turns only

    def split(self) -> tuple[str, str]:
        """(reasoning, reply) as the Qwen3-family templates take them: see split_reasoning."""
        reasoning, content = split_reasoning({"content": self.content, "reasoning_content": self.reasoning})
        return reasoning or "", content


def _json_field(value, what: str):
    """MiniMind's files store tools / tool_calls as JSON text inside the record; lists may also come as is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{what} is a string but not valid JSON ({e.msg}); write a JSON list") from None
    return value


def _strict_json(value, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} cannot be written as JSON ({e}); use plain JSON values (no NaN/Infinity)") from None


def check_chat(messages, tools=None, name: str = "messages") -> tuple[list[_Turn], list | None]:
    """Every field MiniMind-3's data uses, checked and parsed: (turns, tools).

    tools: list of tool schemas (objects), from the argument or else from a system turn's `tools` field (a list,
      or JSON text of one, as MiniMind's SFT files store it).
    tool_calls (assistant turns only): a list (or JSON text of one) of {"name", "arguments"}, optionally wrapped
      as {"type": "function", "function": {...}} (OpenAI's shape); arguments an object or JSON text of one.
    reasoning_content (assistant turns only): a string.
    Raises DataError('{name}[i]: what is wrong; what to do') for anything the templates cannot write faithfully.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{name}: expected a non-empty list of messages")
    turns, found_tools = [], None
    for i, m in enumerate(messages):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            hint = ' (use "" for an assistant turn whose work is in tool_calls)' if content is None else ""
            raise DataError(f"{at}: content must be a string, got {type(content).__name__}{hint}")
        # Fields on the wrong turn would be dropped by every template: say so instead of training without them.
        for field, home in (("tools", "system"), ("tool_calls", "assistant"), ("reasoning_content", "assistant")):
            if m.get(field) not in (None, "", []) and role != home:
                raise DataError(f"{at}: '{field}' on a {role} turn is never rendered; it belongs on the {home} turn")
        if m.get("tools") not in (None, "", []):
            if found_tools is not None:
                raise DataError(f"{at}: a second turn with 'tools'; give the tool list once, on the system turn")
            value = _json_field(m["tools"], f"{at}: tools")
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise DataError(f"{at}: tools must be a list of tool objects (JSON schemas), got "
                                f"{type(value).__name__}")
            _strict_json(value, f"{at}: tools")
            found_tools = value
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{at}: reasoning_content must be a string")
        calls = []
        if role == "assistant":
            if isinstance(reasoning, str) and END_THINK in content:
                raise DataError(f"{at}: has reasoning_content and also a </think> block in its content; keep one "
                                f"(the templates would write the reasoning twice)")
            raw_calls = m.get("tool_calls")
            if raw_calls not in (None, "", []):
                raw_calls = _json_field(raw_calls, f"{at}: tool_calls")
                if not isinstance(raw_calls, list):
                    raise DataError(f"{at}: tool_calls must be a list of calls, got {type(raw_calls).__name__} "
                                    f"(wrap a single call in [ ])")
                for k, call in enumerate(raw_calls):
                    calls.append(_check_call(call, f"{at}: tool_calls[{k}]"))
        turns.append(_Turn(role, content, reasoning if role == "assistant" else None, calls))
    if tools not in (None, []):
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError("tools must be a list of tool objects (JSON schemas)")
        _strict_json(tools, "tools")
        found_tools = tools
    return turns, found_tools or None


def _check_call(call, at: str) -> tuple[str, str]:
    if not isinstance(call, dict):
        raise DataError(f"{at}: expected an object with 'name' and 'arguments'")
    fn = call.get("function") or call           # OpenAI's {"type": "function", "function": {...}} or bare
    if not isinstance(fn, dict):
        raise DataError(f"{at}: 'function' must be an object with 'name' and 'arguments'")
    name, args = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not name:
        raise DataError(f"{at}: needs a non-empty string 'name'")
    if any(c in name for c in '"\\\n'):      # the templates paste the name between quotes, unescaped
        raise DataError(f"{at}: name {name!r} has a quote, backslash or newline, which would break the call's JSON")
    if args is None:
        raise DataError(f"{at}: has no 'arguments' (use {{}} for a call without arguments)")
    if isinstance(args, str):                   # written verbatim by the templates: it must already be JSON
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: arguments is a string but not valid JSON ({e.msg}); the model would learn "
                            f"to write broken calls") from None
        if not isinstance(parsed, dict):
            raise DataError(f"{at}: arguments must be a JSON object, got {type(parsed).__name__}")
        _strict_json(parsed, f"{at}: arguments")
        return name, args
    if not isinstance(args, dict):
        raise DataError(f"{at}: arguments must be an object (or JSON text of one), got {type(args).__name__}")
    _strict_json(args, f"{at}: arguments")
    return name, tojson(args)


# ---------------------------------------------------------------------------------------------------------------
# Rendering: pieces of text, each either written by the template or by the model
# ---------------------------------------------------------------------------------------------------------------
def _thinking_index(thinking) -> int:
    return 0 if thinking is None else 1 if thinking else 2


def _head(body: str, fmt: ChatFormat) -> str:
    """The start of an assistant turn that the template itself writes: the longest generation-prompt text (any
    thinking setting) the turn begins with. At inference that text is in the prompt, so the model never produces
    it and must not be trained to (MiniMind-3's empty think block; the '<think>\\n' a thinking prompt opens)."""
    if fmt.style == "chatml":
        return fmt.reply_prefix
    return max((p for p in fmt.prompt if body.startswith(p)), key=len, default="")


def _qwen3_pieces(fmt: ChatFormat, turns: list[_Turn], tools, gen: bool, thinking) -> list[tuple[str, int]]:
    """(text, owner) pieces: owner is -1 for template text, else the index of the assistant turn that wrote it."""
    out = []
    first = turns[0]
    if tools:
        system = first.content + "\n\n" if first.role == "system" else ""
        out.append((f"{IM_START}system\n{system}{TOOLS_HEAD}" + "".join("\n" + tojson(t) for t in tools)
                    + f"{TOOLS_TAIL}{IM_END}\n", -1))
    elif first.role == "system":
        out.append((f"{IM_START}system\n{first.content}{IM_END}\n", -1))
    # Qwen3 keeps think blocks only after the last real user query (a user turn that is not a wrapped tool
    # response); earlier reasoning is dropped from the history.
    last_query = len(turns) - 1
    for i in range(len(turns) - 1, -1, -1):
        t = turns[i]
        if t.role == "user" and not (t.content.startswith(TOOL_RESPONSE) and t.content.endswith(END_TOOL_RESPONSE)):
            last_query = i
            break
    for i, t in enumerate(turns):
        if t.role == "user" or (t.role == "system" and i > 0):
            out.append((f"{IM_START}{t.role}\n{t.content}{IM_END}\n", -1))
        elif t.role == "assistant":
            reasoning, content = t.split()
            if fmt.think == "always":
                block = True
            elif fmt.think == "after_query":
                block = i > last_query and (i == len(turns) - 1 or bool(reasoning))
            else:
                block = bool(reasoning.strip("\n"))
            body = fold_reasoning(reasoning, content) if block else content
            for k, (name, args) in enumerate(t.calls):
                if k > 0 or content:   # the template tests the reply after the think block was cut out
                    body += "\n"
                body += f'{TOOL_CALL}\n{{"name": "{name}", "arguments": {args}}}\n{END_TOOL_CALL}'
            head = _head(body, fmt)
            out += [(f"{IM_START}assistant\n{head}", -1), (body[len(head):] + IM_END, i), ("\n", -1)]
        elif t.role == "tool":   # consecutive tool turns share one user turn of <tool_response> blocks
            opens = i == 0 or turns[i - 1].role != "tool"
            closes = i == len(turns) - 1 or turns[i + 1].role != "tool"
            out.append(((f"{IM_START}user" if opens else "") + f"\n{TOOL_RESPONSE}\n{t.content}\n{END_TOOL_RESPONSE}"
                        + (f"{IM_END}\n" if closes else ""), -1))
    if gen:
        out.append((f"{IM_START}assistant\n{fmt.prompt[_thinking_index(thinking)]}", -1))
    return out


def _chatml_pieces(fmt: ChatFormat, turns: list[_Turn], tools, gen: bool, thinking) -> list[tuple[str, int]]:
    if tools or any(t.calls for t in turns):
        raise DataError("has tools or tool_calls, but this tokenizer's chat_template is plain ChatML and has no "
                        "place for them; use a tokenizer with a Qwen3-style template (minimind's default, "
                        "MiniMind-3's or Qwen3's)")
    if not fmt.tool_turns and any(t.role == "tool" for t in turns):
        raise DataError("has a tool turn, which this tokenizer's chat_template writes in a layout minimind does not "
                        "reproduce; use a tokenizer with a Qwen3-style template")
    if fmt.default_system is not None and turns[0].role != "system":
        turns = [_Turn("system", fmt.default_system, None, []), *turns]
    out = []
    for i, t in enumerate(turns):
        if t.role != "assistant":
            out.append((f"{IM_START}{t.role}\n{t.content}{IM_END}\n", -1))
            continue
        content = t.content if t.reasoning is None else fold_reasoning(t.reasoning, t.content)
        if END_THINK in content and END_THINK in fmt.reply_prefix:
            raise DataError("has reasoning, but this tokenizer's chat_template writes an empty think block before "
                            "every reply, so the reply would hold two; use the tokenizer's full template "
                            "(MiniMind-3's has reasoning_content support) or --reasoning drop")
        out += [(f"{IM_START}assistant\n{fmt.reply_prefix}", -1), (content + IM_END, i), ("\n", -1)]
    if gen:
        out.append((f"{IM_START}assistant\n{fmt.prompt[_thinking_index(thinking)]}", -1))
    return out


def _pieces(fmt: ChatFormat, messages, tools, gen: bool, thinking) -> list[tuple[str, int]]:
    turns, tools = check_chat(messages, tools)
    build = _qwen3_pieces if fmt.style == "qwen3" else _chatml_pieces
    return build(fmt, turns, tools, gen, thinking)


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with our special tokens and chat rendering."""

    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, source_config: dict | None = None):
        self.tok = tok
        if chat_template is None:  # a tokenizer without the think/tool tokens keeps the plain ChatML of old
            chat_template = CHAT_TEMPLATE if all(tok.token_to_id(t) is not None for t in CHAT_TOKENS) \
                else CHATML_TEMPLATE
        self.chat_template = chat_template
        self.source_config = source_config   # tokenizer_config.json it was loaded with (kept on save)
        self._chat_format = None             # found on first use (see chat_format)
        self.pad_id = self._id(ENDOFTEXT)
        self.bos_id = self._id(IM_START)
        self.eos_id = self._id(IM_END)
        self.vocab_size = tok.get_vocab_size()

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer has no special token {token!r}: minimind's documents and chats are "
                                  f"ChatML ({', '.join(SPECIAL_TOKENS)}), as in Qwen's and MiniMind's tokenizers; "
                                  f"train one with train_tokenizer.py")
        return i

    # --- plain text ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------------------------------------
    @staticmethod
    def chat_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Roles and contents as plain ChatML (<|im_start|>role\\ncontent<|im_end|>\\n per turn), for statistics
        over a chat file. What a tokenizer trains on is render_text(): its own template, tools and all."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
                    thinking: bool | None = None) -> str:
        """The conversation exactly as this tokenizer's chat_template writes it (see render_chat)."""
        return "".join(t for t, _ in _pieces(self.chat_format(), messages, tools, add_generation_prompt, thinking))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, last_reply_only: bool = False,
                    tools: list | None = None, thinking: bool | None = None) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat, and a 0/1 mask that is 1 on what the model must learn to write.

        The ids equal transformers' apply_chat_template(messages, tools=tools, tokenize=True) on this tokenizer:
        the text is encoded in one piece, as there. Supervised (mask 1): each assistant turn's reasoning, reply and
        tool calls and its closing <|im_end|>. Not supervised: system/user turns, tool responses, the tools list,
        and the head of an assistant turn that the template writes itself (see _head).
        tools: tool schemas; default: a system turn's `tools` field (MiniMind's data keeps them there).
        thinking: the generation prompt's thinking switch (None: the template's default); passed to templates as
          both enable_thinking (Qwen3) and open_thinking (MiniMind-3).
        last_reply_only: mask only the final assistant turn (DPO scores just the reply being compared).
        Raises DataError for a conversation the template cannot write (see check_chat).
        """
        pieces = _pieces(self.chat_format(), messages, tools, add_generation_prompt, thinking)
        last = max((owner for _, owner in pieces), default=-1)
        spans, text, pos = [], [], 0   # character spans of supervised text
        for t, owner in pieces:
            if owner >= 0 and (not last_reply_only or owner == last):
                spans.append((pos, pos + len(t)))
            text.append(t)
            pos += len(t)
        enc = self.tok.encode("".join(text), add_special_tokens=False)
        # A token is supervised if any of its characters is (the rule of transformers' assistant mask). BPE may
        # merge across a boundary, e.g. the '\n' after 'assistant' with a reply's leading spaces: that token is
        # then the model's to write, as the reply's first characters are.
        mask, k = [], 0
        for start, end in enc.offsets:
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            mask.append(int(k < len(spans) and end > spans[k][0]))
        return enc.ids, mask

    def chat_format(self) -> ChatFormat:
        """How this tokenizer's chat_template lays conversations out (checked once, see chat_format())."""
        if self._chat_format is None:
            try:
                self._chat_format = chat_format(self.chat_template)
            except ValueError as e:
                raise CheckpointError(f"tokenizer chat_template: {e}; minimind renders ChatML and Qwen3-style "
                                      f"templates only (put one in tokenizer_config.json)") from None
        return self._chat_format

    def chat_profile(self) -> tuple[str | None, str]:
        """(default system prompt, reply prefix): plain conversations (no tools, no reasoning) are ChatML with
        these two quirks, e.g. for exporters that write a simpler template (Ollama's)."""
        fmt = self.chat_format()
        return fmt.default_system, (fmt.reply_prefix if fmt.style == "chatml" else
                                    THINK + "\n\n" + END_THINK + "\n\n" if fmt.think == "always" else "")

    # --- files --------------------------------------------------------------------------------------------
    def save(self, out_dir: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (Hugging Face's layout, read by AutoTokenizer)."""
        os.makedirs(out_dir, exist_ok=True)
        self.tok.save(os.path.join(out_dir, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": IM_START, "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 32768, "chat_template": self.chat_template,
            "added_tokens_decoder": {str(i): {"content": a.content, "special": a.special, "lstrip": a.lstrip,
                                              "rstrip": a.rstrip, "normalized": a.normalized,
                                              "single_word": a.single_word}
                                     for i, a in sorted(self.tok.get_added_tokens_decoder().items())},
        }
        # A tokenizer loaded from a model (e.g. Qwen's) keeps its own settings and special tokens.
        # The added tokens are always the tokenizer's own (the loaded config may predate tokens added since).
        cfg = {**cfg, **(self.source_config or {}), "chat_template": self.chat_template,
               "added_tokens_decoder": cfg["added_tokens_decoder"]}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json) or the file."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: no tokenizer.json (give a model directory written by a train_*.py, "
                                  f"or a tokenizer directory from train_tokenizer.py)")
        folder, cfg, template = os.path.dirname(file), None, None
        cfg_file = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            cfg = read_json_object(cfg_file, CheckpointError, "fix or delete it")
            template = cfg.get("chat_template")
            if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(folder, "chat_template.jinja")   # where transformers >= 4.50 saves it
        if not template and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001 - the Rust parser raises a plain Exception with its own message
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({reason}); copy it again from the model "
                                  f"it belongs to, or retrain it with train_tokenizer.py") from None
        return cls(tok, template or None, cfg)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges: caches and resumes check it."""
        import hashlib
        return hashlib.sha1(self.tok.to_str().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Which layout is a template? Render probe conversations with Jinja and compare
# ---------------------------------------------------------------------------------------------------------------
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气 / weather",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}}, "required": ["city"]}}},
          {"name": "add", "parameters": {"a": "number", "b": "number"}}]
# Plain chats: every role but tool, multi-turn, multi-line and non-ASCII content, a trailing user turn.
_CHATML_PROBES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1 中文\nline 2"},
     {"role": "assistant", "content": "A1\n\ncode"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2 🎉"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
]
_TOOL_TURN_PROBE = [{"role": "user", "content": "Q"}, {"role": "tool", "content": "{\"r\": 1}"},
                    {"role": "assistant", "content": "A"}]
# Everything the Qwen3 family writes: tools with and without a system turn, calls with and without the
# `function` wrapper and with object / string arguments, merged tool turns, reasoning in the field and inline,
# several steps after one query, reasoning in an early turn (Qwen3 drops it).
_QWEN3_PROBES = _CHATML_PROBES + [
    [{"role": "system", "content": "Use tools.", "tools": _TOOLS}, {"role": "user", "content": "Weather in 北京?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "assistant", "content": "21 °C.", "reasoning_content": "\nThe tool said 21.\n"},
     {"role": "user", "content": "And 2+3?"},
     {"role": "assistant", "content": "Adding.", "reasoning_content": "use add",
      "tool_calls": [{"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}, {"name": "add", "arguments": {"a": 0}}]},
     {"role": "tool", "content": "5"}, {"role": "tool", "content": "0"},
     {"role": "assistant", "content": "<think>\nsum\n</think>\n\n5"}],
    [{"role": "user", "content": "Q1", "tools": None},
     {"role": "assistant", "content": "\nA1", "reasoning_content": "r1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "\nA2", "reasoning_content": ""}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "",
                                        "tool_calls": [{"name": "add", "arguments": {}}]},
     {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "A", "reasoning_content": "r"},
     {"role": "user", "content": "<tool_response>\nlegacy\n</tool_response>"},
     {"role": "assistant", "content": "B"}],
]
_THINKING = ({}, {"enable_thinking": True, "open_thinking": True}, {"enable_thinking": False, "open_thinking": False})


def _jinja_renderer(template: str):
    """render(messages, gen, tools=None, **switches) -> text, with the Jinja setup transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    jinja = env.from_string(template)

    def render(messages, gen, **kw):
        tools = next((m["tools"] for m in messages if m.get("tools")), None)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
        return jinja.render(messages=messages, add_generation_prompt=gen, tools=tools, **kw)
    return render


def _first_difference(want: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"it renders {want[at:at + 40]!r} where minimind would write {got[at:at + 40]!r}"


def chat_format(template: str) -> ChatFormat:
    """The ChatFormat whose rendering equals `template` on every probe conversation, or ValueError saying where
    the closest one differs. Rendered with jinja2, the engine transformers uses (it ships with torch)."""
    if template == CHAT_TEMPLATE:
        return OURS
    if template == CHATML_TEMPLATE:
        return PLAIN_CHATML
    try:
        render = _jinja_renderer(template)
    except ImportError:  # no jinja2: trust a template that speaks ChatML
        if IM_START in template and IM_END in template:
            return PLAIN_CHATML
        raise ValueError("not a ChatML template (no <|im_start|>/<|im_end|>)") from None
    except Exception as e:  # noqa: BLE001 - a template that does not even compile
        raise ValueError(f"cannot compile it ({type(e).__name__}: {e})") from None

    def ours(fmt, probe, gen, kw):
        thinking = None if not kw else kw["enable_thinking"]
        return "".join(t for t, _ in _pieces(fmt, probe, None, gen, thinking))

    def mismatch(fmt, probes):
        for probe in probes:
            for gen in (False, True):
                for kw in _THINKING if gen else _THINKING[:1]:
                    want, got = render(probe, gen, **kw), ours(fmt, probe, gen, kw)
                    if want != got:
                        return f"for a {len(probe)}-message conversation {_first_difference(want, got)}"
        return None

    try:
        probe = _CHATML_PROBES[0]
        first = render(probe, False)
        prompts = []
        for kw in _THINKING:
            with_prompt, head = render(probe, True, **kw), first + f"{IM_START}assistant\n"
            if not with_prompt.startswith(head):
                raise ValueError(f"not ChatML: it renders {first!r} for one user turn")
            prompts.append(with_prompt[len(head):])
        prompts = tuple(prompts)
        for think in ("reasoning", "always", "after_query"):
            fmt = ChatFormat("qwen3", think=think, prompt=prompts)
            if mismatch(fmt, _QWEN3_PROBES) is None:
                return fmt
        plain = Tokenizer.chat_text(probe)
        default_system = None
        m = re.fullmatch(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END) + r"\n", first[:-len(plain)],
                         re.S)
        if first != plain and first.endswith(plain) and m:
            default_system = m.group(1)
        fmt = ChatFormat("chatml", default_system=default_system, reply_prefix=prompts[0], prompt=prompts)
        problem = mismatch(fmt, _CHATML_PROBES)
        if problem:
            raise ValueError(f"not ChatML-compatible: {problem}")
        return ChatFormat("chatml", default_system=default_system, reply_prefix=prompts[0], prompt=prompts,
                          tool_turns=mismatch(fmt, [_TOOL_TURN_PROBE]) is None)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any template failure means we cannot vouch for it
        raise ValueError(f"cannot render it ({type(e).__name__}: {e})") from None


def chatml_profile(template: str) -> tuple[str | None, str]:
    """(default_system, reply_prefix) of a ChatML-style template; see chat_format and Tokenizer.chat_profile."""
    fmt = chat_format(template)
    return fmt.default_system, (fmt.reply_prefix if fmt.style == "chatml" else
                                THINK + "\n\n" + END_THINK + "\n\n" if fmt.think == "always" else "")


def train_bpe(texts: Iterator[str], vocab_size: int = 6400, min_frequency: int = 2,
              show_progress: bool = True) -> Tokenizer:
    """Train byte-level BPE on an iterator of strings. ChatML's tokens get ids 0, 1, 2, the think/tool tokens
    3..8 (vocab_size counts them all)."""
    tok = HFTokenizer(models.BPE())
    # ByteLevel pre-tokenizer: split on the GPT-2 regex (words, numbers, punctuation, spaces), map bytes to
    # printable characters. No prefix space: " x" and "x" stay different, so decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(mark_chat_tokens(tok))


def mark_chat_tokens(tok: HFTokenizer) -> HFTokenizer:
    """The think/tool tokens as Qwen3 and MiniMind-3 mark them: added (never split), not special (decoding with
    skip_special_tokens keeps them). Ids of tokens the tokenizer already has are kept; missing ones are appended
    after the last id, so every other id stays what it was."""
    missing = [t for t in CHAT_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    d = json.loads(tok.to_str())
    for a in d["added_tokens"]:
        if a["content"] in CHAT_TOKENS:
            a["special"] = False
    return HFTokenizer.from_str(json.dumps(d, ensure_ascii=False))
