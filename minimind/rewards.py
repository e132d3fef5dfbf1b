"""Rewards for RL: verifiable scores of one reply (answer, format, tool calls, repetition) and a user's own function.

A reward is a number per reply; GRPO only compares replies to the SAME prompt (rl.group_advantages), so what
matters is which replies score higher, not the scale. The built-in reward (score) adds up:
  correct     1 if the final answer equals the reference (numbers compared as numbers: "1,234" == "1234.0"),
              or the share of `gt` items found in it (MiniMind's agent_rl files)
  format      -format_weight if the <think> / <tool_call> tags are unbalanced (a block opened and never closed)
  tools       +-tool_weight/2: the share of <tool_call> bodies that are valid (JSON object, a tool that exists,
              arguments an object), mapped to [-1, 1]; only when the reply calls tools
  repetition  -repetition_weight * the share of repeated word 3-grams (a degenerate loop scores down)
plus, with `--reward module:function`, the user's own function (for rlaif.jsonl: prompts without answers).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass

from .errors import UsageError
from .tokenizer import END_THINK, END_TOOL_CALL, THINK, TOOL_CALL
from .tools import parse_call


# A number as people write it: sign, thousands commas, decimals, a fraction. (?<![\w.]) keeps "x2" or "v1.2.3"
# pieces from counting as numbers.
_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?![\w])")
_MARKED = [re.compile(p, re.IGNORECASE) for p in (r"####\s*([^\n]*)", r"\\boxed\{([^{}]*)\}",
                                                  r"answer(?: is|:)\s*([^\n]*)")]


# ---------------------------------------------------------------------------------------------------------------
# Reading an answer
# ---------------------------------------------------------------------------------------------------------------
def _to_float(s: str) -> float | None:
    s = s.replace(",", "").replace("−", "-").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num) / float(den) if float(den) else None
        return float(s)
    except ValueError:
        return None


def numbers_in(text: str) -> list[float]:
    """Every number in the text, in order ("1,234" -> 1234.0, "3/4" -> 0.75, "-2.5" -> -2.5)."""
    return [v for v in (_to_float(m.group(0)) for m in _NUMBER.finditer(text)) if v is not None]


def final_text(reply: str) -> str:
    """The part of a reply that answers: after the last </think>, tool-call blocks removed."""
    text = reply.rsplit(END_THINK, 1)[-1]
    return re.sub(r"<tool_call>.*?(?:</tool_call>|$)", " ", text, flags=re.DOTALL).strip()


def parse_number(text: str) -> float | None:
    """The answer of a text as a number: a marked one first (GSM8K's '#### 42', '\\boxed{42}', 'answer is 42'),
    else the LAST number in the text (a model's reasoning states intermediate numbers before the result)."""
    for pattern in _MARKED:
        found = pattern.findall(text)
        if found:
            nums = numbers_in(found[-1])
            if nums:
                return nums[0]
    nums = numbers_in(text)
    return nums[-1] if nums else None


def reference_answer(answer) -> str:
    """The reference of a record's answer: GSM8K's '... #### 72' -> '72'; anything else as it is, stripped."""
    answer = str(answer)
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".。!！").lower())


def correctness(reply: str, reference: str) -> float:
    """1.0 if the reply's final answer equals the reference, else 0.0.

    A numeric reference is compared as a number with the reply's answer (parse_number); any other reference is
    compared as text (case and surrounding whitespace/full stops ignored)."""
    answer, ref = final_text(reply), reference_answer(reference)
    ref_num = _to_float(ref) if _NUMBER.fullmatch(ref.strip()) else None
    if ref_num is not None:
        got = parse_number(answer)
        return float(got is not None and _same_number(got, ref_num))
    return float(_normalise(answer) == _normalise(ref))


def gt_hits(reply: str, gt: list) -> float:
    """Share of MiniMind's `gt` items (expected values) that the reply's final text contains: a number anywhere
    among its numbers, a string as a case-insensitive substring. (MiniMind's train_agent.py rule.)"""
    if not gt:
        return 0.0
    text = final_text(reply)
    nums = numbers_in(text)
    hit = 0
    for g in gt:
        s = str(g).strip()
        g_num = _to_float(s) if _NUMBER.fullmatch(s) else None
        if g_num is not None:
            hit += any(_same_number(n, g_num) for n in nums)
        else:
            hit += bool(s) and s.lower() in text.lower()
    return hit / len(gt)


# ---------------------------------------------------------------------------------------------------------------
# Shape of a reply
# ---------------------------------------------------------------------------------------------------------------
def _balanced(text: str, open_tag: str, close_tag: str, at_most: int | None = None) -> bool:
    """Tags alternate open, close, open, close ... never nested, never left open (and at most `at_most` pairs)."""
    depth, pairs = 0, 0
    for m in re.finditer(re.escape(open_tag) + "|" + re.escape(close_tag), text):
        if m.group(0) == open_tag:
            if depth:
                return False
            depth = 1
        else:
            if not depth:
                return False
            depth, pairs = 0, pairs + 1
    return depth == 0 and (at_most is None or pairs <= at_most)


def format_ok(reply: str, think_opened: bool = False) -> bool:
    """<think> ... </think> at most once, and first; <tool_call> ... </tool_call> balanced and not nested.
    think_opened: the prompt already wrote '<think>\\n' (thinking switched on), so the reply starts inside it."""
    text = (THINK + reply) if think_opened else reply
    if not _balanced(text, THINK, END_THINK, at_most=1):
        return False
    if THINK in text and text.split(THINK, 1)[0].strip():   # reasoning comes before the answer, not after
        return False
    return _balanced(text, TOOL_CALL, END_TOOL_CALL)


def tool_names(tools) -> set[str]:
    """Names of the tools in an OpenAI-style list (with or without the 'function' wrapper; a JSON string too)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return set()
    names = set()
    for t in tools or []:
        if isinstance(t, dict):
            fn = t.get("function", t)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return names


def tool_calls_in(reply: str) -> list[str]:
    """The raw bodies of the reply's <tool_call> ... </tool_call> blocks (an unclosed last one included)."""
    return [m.strip() for m in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", reply, flags=re.DOTALL)]


def valid_tool_call(body: str, names: set[str]) -> bool:
    """A call the runtime could execute: what tools.parse_call accepts (the parser inference uses), naming a tool
    that exists."""
    call = parse_call(body)
    return call is not None and call["function"]["name"] in names


def tool_validity(reply: str, tools) -> float | None:
    """Share of the reply's tool calls that are valid (valid_tool_call); None when it calls no tool."""
    bodies = tool_calls_in(reply)
    if not bodies:
        return None
    names = tool_names(tools)
    return sum(valid_tool_call(b, names) for b in bodies) / len(bodies)


def repetition(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for varied text, -> 1 for a loop."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------------------------------
# The built-in reward, and a user's own
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RewardWeights:
    format: float = 0.5       # penalty for unbalanced <think>/<tool_call> tags
    tools: float = 0.5        # spread between all-valid and all-invalid tool calls
    repetition: float = 0.5   # penalty per share of repeated 3-grams


def score(reply: str, sample: dict, weights: RewardWeights = RewardWeights(), user_fn=None) -> tuple[float, dict]:
    """(reward, parts) of one reply to one sample.

    sample: {"messages": prompt turns, "reference": str | None, "gt": list | None, "tools": list | None,
             "think_opened": bool, "record": the JSONL record}. parts has 'correct' (None when the sample has no
    reference or gt) and each shaping term, for logging.
    """
    parts = {"correct": None}
    reward = 0.0
    if sample.get("reference") is not None:
        parts["correct"] = correctness(reply, sample["reference"])
    elif sample.get("gt"):
        parts["correct"] = gt_hits(reply, sample["gt"])
    if parts["correct"] is not None:
        reward += parts["correct"]
    parts["format"] = float(format_ok(reply, sample.get("think_opened", False)))
    reward -= weights.format * (1 - parts["format"])
    valid = tool_validity(reply, sample.get("tools"))
    if valid is not None:
        parts["tools"] = valid
        reward += weights.tools * (valid - 0.5)
    parts["repetition"] = repetition(final_text(reply))
    reward -= weights.repetition * parts["repetition"]
    if user_fn is not None:
        parts["user"] = float(user_fn(sample["messages"], reply, sample["record"]))
        reward += parts["user"]
    return reward, parts


def load_reward_fn(spec: str):
    """--reward module:function -> the function. module is a dotted module name or a path to a .py file; the
    function is called as fn(prompt_messages, reply_text, record) -> float."""
    if ":" not in spec:
        raise UsageError(f"--reward {spec}: expected module:function (e.g. my_rewards:score or path/to/r.py:score)")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
            if spec_ is None or not os.path.isfile(mod_name):
                raise FileNotFoundError(mod_name)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())   # a module next to where the user runs the script
            module = importlib.import_module(mod_name)
    except (ImportError, FileNotFoundError, SyntaxError) as e:
        raise UsageError(f"--reward {spec}: cannot import {mod_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {mod_name} has no function {fn_name!r}")
    return fn
