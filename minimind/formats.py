"""Formats in, one format inside: alpaca, sharegpt and column-mapped records -> MiniMind's conversations.

Users arrive with data shaped by other tools. The three shapes almost everyone ships (the names LLaMA-Factory's
`dataset_info.json` uses, so its users can describe their data the way they already do):

  alpaca    {"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [[q, a], ...]}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value": ...}],
             "system": ..., "tools": "[...]"}
  columns   any flat record, with --map naming which column is the prompt and which the response, e.g.
            AdvertiseGen's {"content": ..., "summary": ...} with --map prompt=content,response=summary

and for DPO: the string form {"prompt": str, "chosen": str, "rejected": str}, alpaca ranking records
(instruction/input + chosen/rejected strings) and sharegpt pairs (conversations + chosen/rejected turns).

Everything becomes the one format the trainers read (minimind/data.py):

  sft  {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}]}
  dpo  {"chosen": [messages], "rejected": [messages]}

sharegpt tool turns map to OpenAI / MiniMind-3 shapes: a `function_call` turn becomes an assistant message with
`tool_calls` (empty content), an `observation` turn a `tool` message, and the `tools` column rides on the system
turn as a list. Conversion is per record, streaming: `Converter(spec).convert(obj, where)` returns a record, or
raises Skip (a record LLaMA-Factory would also drop: empty reply, roles out of order), or DataError (the mapping
cannot be right: a missing column, a wrong type). Files may be JSON Lines or one JSON array (LLaMA-Factory's
`.json` files); `iter_json` streams both with line numbers.

The file-level command (prepare_data.py convert) lives in minimind/datatools.py; the train scripts get the same
choice through add_format_args + record_reader, which feed load_sft/load_dpo converted records on the fly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from .data import validate
from .errors import DataError, UsageError
from .jsonio import json_lines, read_json_object

FORMATS = ("auto", "minimind", "alpaca", "sharegpt", "columns")

# Column roles and their default column names, per format (LLaMA-Factory's names for the roles).
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history", "chosen": "chosen", "rejected": "rejected"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools",
                    "chosen": "chosen", "rejected": "rejected"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# The OpenAI "messages" layout is sharegpt with other tag names (LLaMA-Factory describes it exactly like this).
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
# Columns other tools know that a text-only trainer cannot use: refused by name instead of silently ignored.
UNSUPPORTED = {"images", "videos", "audios", "kto_tag"}


class Skip(Exception):
    """This record cannot become a training example (e.g. an empty reply); str(e) is the reason, counted."""


# ---------------------------------------------------------------------------------------------------------------
# Reading: JSON Lines or one JSON array, streamed, each record with its line number
# ---------------------------------------------------------------------------------------------------------------
def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            s = chunk.lstrip()
            if s:
                return s[:1].decode("latin-1")
    return ""


def is_json_array(path: str) -> bool:
    """True for a file holding one JSON array (LLaMA-Factory's .json), False for JSON Lines."""
    return _first_char(path) == "["


def iter_json(path: str, chunk_chars: int = 1 << 20, with_raw: bool = False, progress: bool = True):
    """Yield (line number, record) from a JSON Lines file or a file holding one JSON array of records.

    A JSON array is decoded element by element from a sliding buffer (json.JSONDecoder.raw_decode), so a
    multi-GB LLaMA-Factory `.json` file never sits in memory whole. The line number is where the record starts.
    with_raw: yield (line number, the line's bytes, record) instead; the bytes are None for a JSON array.
    progress: a tqdm bar over the file's bytes (files of 1 MB and more).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    size = os.path.getsize(path)
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"read {os.path.basename(path)}", leave=False,
              disable=not progress or size < (1 << 20)) as bar:
        yield from _iter_json(path, chunk_chars, with_raw, bar)


def _iter_json(path: str, chunk_chars: int, with_raw: bool, bar):
    if not is_json_array(path):
        for lineno, raw, obj in json_lines(path):
            bar.update(len(raw))
            yield (lineno, raw, obj) if with_raw else (lineno, obj)
        return
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="strict") as f:
        buf, pos, line, counted, eof = "", 0, 1, 0, False

        def line_at(p: int) -> int:  # line number of buf[p]; p never moves backwards, so count only the new part
            nonlocal line, counted
            line += buf.count("\n", counted, p)
            counted = p
            return line

        def fill():  # append the next chunk; drop what is already consumed
            nonlocal buf, pos, counted, eof
            line_at(pos)
            buf, pos, counted = buf[pos:], 0, 0
            try:
                more = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
            eof = not more
            buf += more
            if not bar.disable:
                bar.update(len(more.encode("utf-8")))

        def skip_space(also: str = ""):
            nonlocal pos
            while True:
                while pos < len(buf) and (buf[pos].isspace() or buf[pos] in also):
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        def where():
            return f"{path}:{line_at(pos)}"

        fill()
        skip_space()
        pos += 1  # the '['
        expect_comma = False
        while True:
            skip_space()
            if pos >= len(buf):
                raise DataError(f"{where()}: the JSON array is not closed (file cut short?)")
            if buf[pos] == "]":
                return
            if expect_comma:
                if buf[pos] != ",":
                    raise DataError(f"{where()}: invalid JSON (expected ',' or ']' between array elements)")
                pos += 1
                skip_space()
            while True:  # decode one element; a failure at the buffer's end only means: read more
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise DataError(f"{path}:{line_at(max(e.pos, pos))}: invalid JSON ({e.msg})") from None
                fill()
            at = line_at(pos)
            yield (at, None, obj) if with_raw else (at, obj)
            pos, expect_comma = end, True


# ---------------------------------------------------------------------------------------------------------------
# What the user told us: a format, a column map, tags, DPO or not
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """How to read one file: format, column names (role -> column), sharegpt tags, and whether it is DPO."""
    format: str
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    ranking: bool | None = None   # None = decide from the record (chosen/rejected present -> DPO)
    source: str = ""              # how the spec came about, for messages ("--map", "dataset_info.json 'x'")

    def resolved(self) -> "Spec":
        """Fill in the format's defaults under what the user gave."""
        base = dict(SHAREGPT_COLUMNS if self.format == "sharegpt" else ALPACA_COLUMNS)
        if self.format == "columns":
            base = {k: v for k, v in base.items() if k not in ("prompt", "response")}  # must be mapped
        tags = {**SHAREGPT_TAGS, **self.tags} if self.format == "sharegpt" else {}
        return Spec(self.format, {**base, **self.columns}, tags, self.ranking, self.source)


def parse_map(text: str, fmt: str) -> dict:
    """'prompt=content,response=summary' -> {'prompt': 'content', 'response': 'summary'}; UsageError if malformed.

    Keys are column roles (prompt, query, response, system, history, chosen, rejected for alpaca/columns;
    messages, system, tools, chosen, rejected and the sharegpt tags role_tag, content_tag, user_tag, ... for
    sharegpt); values are the column (or tag) names in the user's file.
    """
    allowed = set(SHAREGPT_COLUMNS) | set(SHAREGPT_TAGS) if fmt == "sharegpt" else set(ALPACA_COLUMNS)
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise UsageError(f"--map {text!r}: {part!r} is not ROLE=COLUMN (e.g. --map prompt=content,"
                             f"response=summary)")
        if key in UNSUPPORTED:
            raise UsageError(f"--map {key}=...: minimind trains on text only; drop the {key} column")
        if key not in allowed:
            raise UsageError(f"--map {key}=...: unknown for --format {fmt}; use one of {', '.join(sorted(allowed))}")
        out[key] = value
    return out


def split_tags(mapping: dict) -> tuple[dict, dict]:
    """(columns, tags) of a --map for sharegpt: the *_tag keys are tags."""
    return ({k: v for k, v in mapping.items() if not k.endswith("_tag")},
            {k: v for k, v in mapping.items() if k.endswith("_tag")})


def load_dataset_info(path: str, name: str) -> tuple[str, Spec]:
    """(data file, Spec) of entry `name` in a LLaMA-Factory dataset_info.json; UsageError naming what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"--dataset_info {path}: no such file")
    info = read_json_object(path, DataError, "--dataset_info expects LLaMA-Factory's dataset_info.json (one JSON "
                                             "object of dataset entries)")
    if name not in info:
        names = ", ".join(list(info)[:20])
        raise UsageError(f"--dataset {name}: no such entry in {path} (it has: {names})")
    entry = info[name]
    where = f"{path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object")
    if "file_name" not in entry:
        hub = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                    if k in entry), None)
        why = f"it names {hub}={entry[hub]!r}, which needs a download" if hub else "it has no file_name"
        raise UsageError(f"--dataset {name}: {why}; download the file yourself and add \"file_name\" to the entry")
    file = os.path.join(os.path.dirname(os.path.abspath(path)), entry["file_name"])
    if os.path.isdir(file):
        raise UsageError(f"--dataset {name}: file_name {entry['file_name']!r} is a directory; minimind reads one "
                         f"file per dataset (concatenate them, or mix them with prepare_data.py mix)")
    fmt = entry.get("formatting", "alpaca")
    if fmt not in ("alpaca", "sharegpt"):
        raise UsageError(f"{where}: formatting {fmt!r} is not supported (alpaca or sharegpt)")
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: 'columns' and 'tags' must be objects")
    bad = UNSUPPORTED & set(columns)
    if bad:
        raise UsageError(f"{where}: columns {', '.join(sorted(bad))} are not text; minimind trains on text only "
                         f"(remove them from the entry)")
    allowed = set(SHAREGPT_COLUMNS if fmt == "sharegpt" else ALPACA_COLUMNS)
    unknown = set(columns) - allowed - ({"tools"} if fmt == "alpaca" else set())
    if unknown:
        raise UsageError(f"{where}: unknown column role(s) {', '.join(sorted(unknown))} for {fmt} "
                         f"(known: {', '.join(sorted(allowed))})")
    unknown = set(tags) - set(SHAREGPT_TAGS)
    if unknown:
        raise UsageError(f"{where}: unknown tag(s) {', '.join(sorted(unknown))} (known: {', '.join(SHAREGPT_TAGS)})")
    return file, Spec(fmt, dict(columns), dict(tags), bool(entry.get("ranking", False)),
                      f"{os.path.basename(path)} '{name}'")


def detect(obj, where: str) -> Spec:
    """Spec for --format auto, from the keys of the first record. DataError saying what to pass if unclear."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def is_messages(v, a="role", b="content"):
        return isinstance(v, list) and bool(v) and all(isinstance(m, dict) and a in m and b in m for m in v)

    if isinstance(obj.get("text"), str) and not {"conversations", "messages", "instruction", "prompt"} & set(obj):
        return Spec("minimind", source="auto")   # pretraining text (extra keys such as "source" are harmless)
    if "prompt" in obj and "chosen" in obj and "rejected" in obj:  # before ours: TRL's lists look like our DPO
        return Spec("alpaca", {"prompt": "prompt"}, ranking=True, source="auto (prompt/chosen/rejected)")
    if is_messages(obj.get("conversations")) or (is_messages(obj.get("chosen")) and is_messages(obj.get("rejected"))):
        return Spec("minimind", source="auto")
    if is_messages(obj.get("conversations"), "from", "value"):
        return Spec("sharegpt", source="auto")
    if is_messages(obj.get("messages")):
        return Spec("sharegpt", {"messages": "messages"}, dict(OPENAI_TAGS), source="auto (OpenAI messages)")
    if "instruction" in obj and ("output" in obj or "chosen" in obj):
        return Spec("alpaca", source="auto")
    keys = ", ".join(list(obj)[:12])
    raise DataError(f"{where}: cannot tell the format from the keys ({keys}); pass --format alpaca|sharegpt, or "
                    f"--format columns --map prompt=COLUMN,response=COLUMN naming your columns")


# ---------------------------------------------------------------------------------------------------------------
# Converting one record
# ---------------------------------------------------------------------------------------------------------------
def _text(obj: dict, column: str, role: str, where: str, spec: Spec, required: bool) -> str:
    """The string in `column`; '' when optional and absent. DataError when the mapping cannot be right."""
    if column not in obj or obj[column] is None:
        if required:
            keys = ", ".join(list(obj)[:12])
            raise DataError(f"{where}: no column '{column}' (the {role}, {spec.source or 'the default'}); this record "
                            f"has: {keys}. Name the right one with --map {role}=COLUMN")
        return ""
    v = obj[column]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)   # a numeric answer column ("output": 42) is text that happens to parse as a number
    if not isinstance(v, str):
        raise DataError(f"{where}: column '{column}' (the {role}) must be a string, got {type(v).__name__}")
    return v


def _tool_calls(value: str, where: str) -> list[dict]:
    """A sharegpt function_call value -> OpenAI tool_calls. The value is JSON: one {name, arguments} or a list."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        raise Skip("function_call value is not JSON") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise Skip("function_call has no 'name'")
        args = c.get("arguments", c.get("parameters", {}))
        out.append({"type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


def _tools(value, where: str) -> list:
    """The tools column: a list of tool definitions, or a JSON string of one (LLaMA-Factory's glaive data)."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Skip("tools column is not JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: the tools column must be a list of tool definitions (or a JSON string of one)")
    # OpenAI's shape, as MiniMind-3's template expects: {"type": "function", "function": {name, parameters...}}
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


class Converter:
    """Turns records of one Spec into MiniMind records: convert(obj, where) -> (kind, record).

    kind is 'sft' or 'dpo'. Raises Skip(reason) for a record that carries nothing to learn (counted by callers),
    DataError for one that shows the mapping is wrong.
    """

    def __init__(self, spec: Spec):
        self.spec = spec.resolved()

    def convert(self, obj, where: str) -> tuple[str, dict]:
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        s = self.spec
        if s.format == "minimind":
            kind = "dpo" if "chosen" in obj and "conversations" not in obj else \
                "pretrain" if "text" in obj and "conversations" not in obj else "sft"
            validate(obj, kind, where)
            return kind, obj
        ranking = s.ranking if s.ranking is not None else (s.columns["chosen"] in obj and
                                                            s.columns["rejected"] in obj)
        if s.format == "sharegpt":
            return self._sharegpt(obj, where, ranking)
        return self._alpaca(obj, where, ranking)

    # --- alpaca / columns ------------------------------------------------------------------------------------
    def _alpaca(self, obj: dict, where: str, ranking: bool) -> tuple[str, dict]:
        c, s = self.spec.columns, self.spec
        prefix = []
        system = _text(obj, c["system"], "system", where, s, False)
        if system.strip():
            prefix.append({"role": "system", "content": system})
        if c.get("tools") and obj.get(c["tools"]):
            tools = _tools(obj[c["tools"]], where)
            if tools:
                if not prefix:
                    prefix.append({"role": "system", "content": ""})
                prefix[0]["tools"] = tools
        history = obj.get(c["history"]) or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and
                                                    all(isinstance(x, str) for x in h) for h in history):
            raise DataError(f"{where}: column '{c['history']}' (the history) must be a list of [prompt, response] "
                            f"string pairs")
        for q, a in history:
            prefix += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt_value = obj.get(c["prompt"])
        if isinstance(prompt_value, list):   # TRL's conversational form: the prompt is already a message list
            prompt_turns = self._message_list(prompt_value, c["prompt"], where)
        else:
            prompt = _text(obj, c["prompt"], "prompt", where, s, True)
            query = _text(obj, c["query"], "query", where, s, False)
            # LLaMA-Factory joins instruction and input with a newline: the same text, so the same model behaviour
            user = "\n".join(p for p in (prompt, query) if p)
            if not user.strip():
                raise Skip("empty prompt")
            prompt_turns = [{"role": "user", "content": user}]
        prefix += prompt_turns
        if ranking:
            chosen = self._reply(obj, c["chosen"], "chosen", where)
            rejected = self._reply(obj, c["rejected"], "rejected", where)
            return "dpo", {"chosen": prefix + chosen, "rejected": prefix + rejected}
        reply = self._reply(obj, c["response"], "response", where)
        return "sft", {"conversations": prefix + reply}

    def _reply(self, obj: dict, column: str, role: str, where: str) -> list[dict]:
        v = obj.get(column)
        if isinstance(v, list):               # TRL conversational: [{"role": "assistant", "content": ...}]
            turns = self._message_list(v, column, where)
        elif isinstance(v, dict) and "content" in v:
            turns = self._message_list([v], column, where)
        else:
            text = _text(obj, column, role, where, self.spec, True)
            turns = [{"role": "assistant", "content": text}]
        if not turns or turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise Skip(f"empty {role}")
        return turns

    @staticmethod
    def _message_list(v: list, column: str, where: str) -> list[dict]:
        out = []
        for i, m in enumerate(v):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: {column}[{i}] must be an object with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    # --- sharegpt --------------------------------------------------------------------------------------------
    def _sharegpt(self, obj: dict, where: str, ranking: bool) -> tuple[str, dict]:
        c, t, s = self.spec.columns, self.spec.tags, self.spec
        msgs = obj.get(c["messages"])
        if msgs is None:
            keys = ", ".join(list(obj)[:12])
            raise DataError(f"{where}: no column '{c['messages']}' (the messages, {s.source or 'the default'}); this "
                            f"record has: {keys}. Name it with --map messages=COLUMN")
        if not isinstance(msgs, list):
            raise DataError(f"{where}: column '{c['messages']}' must be a list of turns")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or t["role_tag"] not in m or t["content_tag"] not in m:
                raise DataError(f"{where}: {c['messages']}[{i}] must be an object with '{t['role_tag']}' and "
                                f"'{t['content_tag']}' (set --map role_tag=...,content_tag=... if yours differ)")
        system = _text(obj, c["system"], "system", where, s, False)
        if msgs and msgs[0][t["role_tag"]] == t["system_tag"]:
            system = str(msgs[0][t["content_tag"]] or "")
            msgs = msgs[1:]
        turns = []
        if system.strip():
            turns.append({"role": "system", "content": system})
        tools = _tools(obj[c["tools"]], where) if obj.get(c["tools"]) else []
        if tools:
            if not turns:
                turns.append({"role": "system", "content": ""})
            turns[0]["tools"] = tools
        # Turns alternate: user (or a tool's observation) first, then assistant (or its function call), ...
        # LLaMA-Factory drops conversations that break this; so do we, counting them.
        odd, even = (t["user_tag"], t["observation_tag"]), (t["assistant_tag"], t["function_tag"])
        for i, m in enumerate(msgs):
            tag = m[t["role_tag"]]
            if tag not in (odd if i % 2 == 0 else even):
                belongs = "user/observation" if i % 2 == 0 else "assistant/function_call"
                raise Skip(f"turn order ('{tag}' where a {belongs} turn belongs)")
            turns.append(self._turn(tag, m[t["content_tag"]], where))
        if ranking:
            if len(msgs) % 2 == 0:
                raise Skip("DPO prompt must end with a user turn")
            chosen = self._pair_side(obj, c["chosen"], "chosen", where, even)
            rejected = self._pair_side(obj, c["rejected"], "rejected", where, even)
            return "dpo", {"chosen": turns + [chosen], "rejected": turns + [rejected]}
        if len(msgs) % 2 or not msgs:
            raise Skip("conversation does not end with an assistant turn")
        last = turns[-1]
        if not last.get("tool_calls") and not last["content"].strip():
            raise Skip("empty response")
        return "sft", {"conversations": turns}

    def _turn(self, tag: str, value, where: str) -> dict:
        t = self.spec.tags
        if not isinstance(value, str):
            if tag in (t["function_tag"], t["observation_tag"]) and isinstance(value, (dict, list)):
                value = json.dumps(value, ensure_ascii=False)
            else:
                raise DataError(f"{where}: a '{tag}' turn's '{t['content_tag']}' must be a string")
        if tag == t["user_tag"]:
            return {"role": "user", "content": value}
        if tag == t["assistant_tag"]:
            return {"role": "assistant", "content": value}
        if tag == t["observation_tag"]:
            return {"role": "tool", "content": value}
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(value, where)}

    def _pair_side(self, obj: dict, column: str, role: str, where: str, even: tuple) -> dict:
        t = self.spec.tags
        v = obj.get(column)
        if isinstance(v, str):  # some pair files keep the replies as plain strings
            v = {t["role_tag"]: t["assistant_tag"], t["content_tag"]: v}
        if not isinstance(v, dict) or t["role_tag"] not in v or t["content_tag"] not in v:
            raise DataError(f"{where}: column '{column}' (the {role} reply) must be a turn with '{t['role_tag']}' "
                            f"and '{t['content_tag']}'")
        if v[t["role_tag"]] not in even:
            raise Skip(f"{role} is not an assistant turn")
        turn = self._turn(v[t["role_tag"]], v[t["content_tag"]], where)
        if not turn.get("tool_calls") and not turn["content"].strip():
            raise Skip(f"empty {role}")
        return turn


# ---------------------------------------------------------------------------------------------------------------
# Streams of converted records, with the count of what was skipped and why
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What a conversion did: records read, converted, and skipped per reason (with the first FILE:LINE)."""
    path: str
    format: str
    read: int = 0
    converted: int = 0
    skipped: dict = field(default_factory=dict)    # reason -> count
    first: dict = field(default_factory=dict)      # reason -> first FILE:LINE

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def summary(self) -> str:
        lines = [f"{self.path} ({self.format}): {self.read:,} records read, {self.converted:,} converted, "
                 f"{sum(self.skipped.values()):,} skipped"]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n:,}: {reason} (first at {self.first[reason]})")
        return "\n".join(lines)


def convert_records(path: str, spec: Spec, kind: str | None = None, report: Report | None = None,
                    strict: bool = False, progress: bool = True):
    """Yield (line number, MiniMind record) for every usable record of `path`; Skip reasons go to `report`.

    kind: 'sft' or 'dpo' to insist (a DPO file fed to SFT is a DataError naming the line), None = any.
    spec.format 'auto' is resolved from the first record. strict: a skipped record is a DataError instead.
    """
    report = report if report is not None else Report(path, spec.format)
    converter = None
    for lineno, obj in iter_json(path, progress=progress):
        where = f"{path}:{lineno}"
        if converter is None:
            if spec.format == "auto":
                spec = detect(obj, where)
            converter = Converter(spec)
            report.format = spec.format if not spec.source.startswith("auto") else f"{spec.format}, {spec.source}"
        report.read += 1
        try:
            got_kind, rec = converter.convert(obj, where)
        except Skip as e:
            if strict:
                raise DataError(f"{where}: {e} (--strict 1 stops here; 0 skips and counts such records)") from None
            report.skip(str(e), where)
            continue
        if kind and got_kind != kind:
            hint = {"dpo": "DPO pairs (chosen/rejected) go to train_dpo.py",
                    "sft": "conversations go to train_full_sft.py / train_lora.py",
                    "pretrain": "text records go to train_pretrain.py"}[got_kind]
            raise DataError(f"{where}: this is a {got_kind} record but {kind} data is needed here; {hint}")
        validate(rec, got_kind, where)
        report.converted += 1
        yield lineno, rec
    if converter is None:
        raise DataError(f"{path}: the file has no records")


# ---------------------------------------------------------------------------------------------------------------
# The same choice for the train scripts: --format and friends, and a reader load_sft / load_dpo can use
# ---------------------------------------------------------------------------------------------------------------
def add_format_args(p: argparse.ArgumentParser, flag: str = "--format") -> None:
    """--format, --map, --dataset_info, --dataset (and --strict): train on alpaca/sharegpt/column files directly."""
    g = p.add_argument_group("input format (see docs/en/data_formats.md)")
    names = [flag] if flag == "--format" else [flag, "--format"]
    g.add_argument(*names, dest="format", default="auto", choices=FORMATS,
                   help="shape of the data file: minimind ({'conversations': [{'role', 'content'}]}), alpaca "
                        "(instruction/input/output), sharegpt (conversations of {'from', 'value'}), columns "
                        "(your own column names, given by --map); auto = from the first record's keys")
    g.add_argument("--map", default="",
                   help="column roles for alpaca/columns/sharegpt, ROLE=COLUMN,...: e.g. prompt=content,"
                        "response=summary (AdvertiseGen); roles: prompt, query, response, system, history, chosen, "
                        "rejected; sharegpt: messages, system, tools, chosen, rejected, role_tag, content_tag, "
                        "user_tag, assistant_tag, observation_tag, function_tag, system_tag")
    g.add_argument("--dataset_info", default=None,
                   help="a LLaMA-Factory dataset_info.json; with --dataset NAME its entry gives the file (this "
                        "replaces --data_path), formatting, columns, tags and ranking")
    g.add_argument("--dataset", default=None, help="the entry of --dataset_info to read")
    g.add_argument("--strict", type=int, default=0, choices=[0, 1],
                   help="1 = stop at the first record that cannot be converted (empty reply, turns out of order); "
                        "0 = skip and count them (the summary names the first line of each reason)")


def spec_from_args(args) -> tuple[str | None, Spec]:
    """(data file named by --dataset_info or None, Spec) from parsed add_format_args flags; UsageError if unclear."""
    fmt, mapping = args.format, args.map
    if bool(args.dataset_info) != bool(args.dataset):
        raise UsageError("--dataset_info and --dataset go together (the file and the entry in it)")
    if args.dataset_info:
        if mapping:
            raise UsageError("--map: the dataset_info.json entry already maps the columns; edit its \"columns\"")
        if fmt not in ("auto",):
            raise UsageError(f"--format {fmt}: the dataset_info.json entry already says its formatting; drop --format")
        return load_dataset_info(args.dataset_info, args.dataset)
    if fmt == "columns" and not mapping:
        raise UsageError("--format columns needs --map naming the columns, e.g. --map prompt=content,response=summary")
    if mapping and fmt in ("auto", "minimind"):
        raise UsageError(f"--map needs --format alpaca, sharegpt or columns (not {fmt})")
    columns = parse_map(mapping, fmt) if mapping else {}
    if fmt == "columns" and "prompt" not in columns:
        raise UsageError("--format columns: --map must name the prompt column (prompt=COLUMN)")
    if fmt == "columns" and "response" not in columns and not ("chosen" in columns and "rejected" in columns):
        raise UsageError("--format columns: --map must name response=COLUMN (or chosen=... and rejected=... for DPO)")
    columns, tags = split_tags(columns) if fmt == "sharegpt" else (columns, {})
    return None, Spec(fmt, columns, tags, source=f"--map {mapping}" if mapping else "")


def resolve(path: str, spec: Spec) -> Spec:
    """spec, with format 'auto' decided from the first record of `path` (a JSON array is never 'minimind': our
    readers read JSON Lines, so an array of MiniMind records goes through the converter)."""
    if spec.format != "auto":
        return spec
    first = next(iter_json(path, progress=False), None)
    if first is None:
        raise DataError(f"{path}: the file has no records")
    got = detect(first[1], f"{path}:{first[0]}")
    return got if got.format != "minimind" or not is_json_array(path) else Spec("minimind", source="auto")


def convert_kind(path: str, spec: Spec) -> str:
    """'sft', 'dpo' (or 'pretrain') from the first record of `path` that converts."""
    for _, rec in convert_records(path, spec, None, Report(path, spec.format), progress=False):
        return "dpo" if "chosen" in rec else "sft" if "conversations" in rec else "pretrain"
    raise DataError(f"{path}: no record could be converted; check --format and --map")


def make_reader(spec: Spec, strict: bool = False, kind: str | None = None):
    """reader(path, kind, progress) for load_sft / load_dpo / compute_stats: validated MiniMind records
    converted on the fly; prints the Report's summary (converted, skipped and why) when the file is done."""
    def reader(path: str, want: str | None = kind, progress: bool = False, with_lines: bool = False):
        report = Report(path, spec.format)
        for lineno, rec in convert_records(path, spec, want, report, strict, progress):
            yield (lineno, rec) if with_lines else rec
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once
            print(report.summary(), file=sys.stderr if report.skipped else sys.stdout, flush=True)
    reader.yields_lines = True  # load_sft / load_dpo then name FILE:LINE in their errors, as for our own files
    return reader


def record_reader(args, kind: str):
    """The `reader` for load_sft / load_dpo from the add_format_args flags, or None for MiniMind's own JSONL.

    With --dataset_info, args.data_path is set to the entry's file first. --format auto looks at the file's
    first record: a MiniMind JSONL file keeps exactly the path it always had (None is returned).
    """
    file, spec = spec_from_args(args)
    if file is not None:
        args.data_path = file
    spec = resolve(args.data_path, spec) if os.path.isfile(args.data_path) else spec
    if spec.format == "minimind" and not is_json_array(args.data_path):
        return None
    return make_reader(spec, bool(args.strict), kind)
