#!/usr/bin/env python3
"""Build minimind's embedded offline default dataset from text that every Python installation already has.

Why this data: the project must be runnable end to end (tokenizer -> pretrain -> SFT -> DPO -> chat) on a machine
with no network and no downloads. The only sizeable, license-clean English text guaranteed to be on such a machine is
CPython's own documentation: the language reference topics in `pydoc_data.topics` (what `help("assert")` shows) and
the docstrings of the standard library. From them this script makes:

  pretrain.jsonl  {"text": str}                         topic chunks and "name(signature)\\n\\ndocstring" documents
  sft.jsonl       {"conversations": [{"role", "content"}, ...]}   question/answer chats about that documentation
  dpo.jsonl       {"chosen": [msgs], "rejected": [msgs]}          same prompt; right vs. wrong final answer

These are exactly MiniMind's JSONL formats, so the real MiniMind dataset files can be used in their place unchanged.

This is a demo corpus, not a good language-model corpus: a couple of MB of technical English is enough to watch the
loss fall and to get a tiny model to answer "What does `os.path.join` do?" plausibly, nothing more.

The output is deterministic: a fixed seed, sorted iteration everywhere (never over a set or a hash order), memory
addresses scrubbed and signature defaults shown only when they are plain literals (other reprs can carry run-time
state), so every machine builds byte-identical files for the same Python version and OS
(docstrings themselves differ between Python versions, and a few between platforms, e.g. os.path on Windows).

Standard library only (tqdm is used for a progress bar when installed). Usage:
    python dataset/build_default.py [--out_dir dataset/default] [--max_pretrain_mb 3] [--seed 0] [--tiny]
"""
from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
import warnings

try:  # optional: only for a progress bar
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")
DEFAULT_MAX_PRETRAIN_MB = 3.0  # a ~5M-param demo model on a 2-core CPU sees no more than this in a few minutes

# Curated, import-safe standard library modules. Left out on purpose: modules with import side effects (this,
# antigravity, idlelib, tkinter, turtle, turtledemo, __hello__, site), modules deprecated/removed across 3.10-3.13
# (asyncore, imp, cgi, telnetlib, ...), and modules whose docstrings depend on how Python was built rather than on
# its version (ssl follows the OpenSSL build, readline/curses the system libraries).
MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "builtins", "bz2",
    "calendar", "cmath", "cmd", "code", "codecs", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "cProfile", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email.charset", "email.headerregistry", "email.message",
    "email.policy", "email.utils", "enum", "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.metadata", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "multiprocessing", "numbers",
    "operator", "optparse", "os", "os.path", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "pstats", "py_compile", "pyclbr", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "stat",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "tokenize", "tomllib", "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wsgiref.util", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "xmlrpc.client", "xmlrpc.server", "zipfile", "zipimport", "zlib", "zoneinfo",
)
# --tiny: a handful of small modules, so tests build in about a second.
TINY_MODULES = ("builtins", "collections", "functools", "itertools", "json", "math", "os.path", "random", "re",
                "string", "textwrap")

# Never read by build(): standard-library modules whose docstrings stay out of every training file, so that
# demo_set() can measure perplexity on documentation (and Q&A about it) that no stage has seen.
HELDOUT_MODULES = (
    "atexit", "codeop", "copyreg", "dbm.dumb", "email.generator", "email.header", "email.parser", "logging.config",
    "modulefinder", "netrc", "pickletools", "profile", "pydoc", "runpy", "symtable", "sys", "sysconfig", "tabnanny",
    "token", "trace", "urllib.error", "urllib.robotparser", "venv", "wave", "webbrowser", "wsgiref.headers",
    "wsgiref.simple_server", "xml.dom.pulldom", "xml.sax.saxutils", "zipapp",
)

# Where an object's __module__ may legitimately point for it to count as "defined by" the module we list it under:
# the OS-specific implementation modules behind os and os.path.
_IMPL_MODULES = ("posix", "nt", "posixpath", "ntpath", "genericpath")

CHUNK_CHARS = 1500   # pretrain documents are cut at paragraph boundaries to at most this many characters
ANSWER_CHARS = 600   # SFT/DPO answers are cut at a sentence/paragraph boundary to at most this many characters
CONV_CHARS = 1400    # whole conversations stay below this so they fit in 512 tokens with the default tokenizer
MAX_SIG_CHARS = 300  # longer signatures make unreadable answers

IDENTITY_EN = "I am minimind, a small language model trained from scratch on Python's documentation."
IDENTITY_ZH = "我是 minimind，一个在 Python 文档上从零训练的小型语言模型。"

SYSTEM_PROMPTS = (
    "You are a helpful Python documentation assistant.",
    "You are minimind, a small assistant that answers questions about Python's standard library.",
    "Answer questions about Python concisely and accurately.",
    "You are a helpful assistant. Answer using the official Python documentation.",
    "你是一个乐于助人的 Python 文档助手。",
)

# Question templates. {q} is a qualified name such as `os.path.join`. Chinese templates are answered with the
# English docstring: there is no Chinese text to learn from, but the model should learn to understand the question.
WHAT_DOES = (
    "What does `{q}` do?",
    "Explain `{q}`.",
    "What is `{q}` used for?",
    "Can you tell me what `{q}` is for?",
    "Describe `{q}` briefly.",
    "I came across `{q}` in some code. What is it?",
    "`{q}` 是做什么的？",
    "请解释一下 `{q}`。",
    "`{q}` 有什么用？",
)
SIGNATURE = (
    ("What is the signature of `{q}`?", "`{q}{sig}`"),
    ("How do I call `{q}`?", "Call it as `{q}{sig}`."),
    ("What arguments does `{q}` take?", "Its signature is `{q}{sig}`."),
    ("Show me the parameters of `{q}`.", "`{q}{sig}`"),
    ("`{q}` 的函数签名是什么？", "`{q}{sig}`"),
    ("`{q}` 需要哪些参数？", "`{q}{sig}`"),
)
WHICH_MODULE = (
    "Which module provides `{n}`?",
    "Where is `{n}` defined?",
    "What do I need to import to use `{n}`?",
    "Which standard library module has `{n}`?",
    "`{n}` 在哪个模块里？",
    "使用 `{n}` 需要导入哪个模块？",
)
MODULE_ANSWERS = (
    "`{n}` is in the `{m}` module.",
    "`{n}` is defined in the `{m}` module: `from {m} import {n}`.",
    "It comes from the `{m}` module, so write `from {m} import {n}`.",
)
BUILTIN_ANSWER = "`{n}` is a built-in, so no import is needed."
MODULE_OVERVIEW = (
    "What is the `{m}` module for?",
    "What does the `{m}` module do?",
    "Give me an overview of the `{m}` module.",
    "`{m}` 模块是做什么的？",
)
TOPIC = (
    "Explain the Python topic '{t}'.",
    "Tell me about '{t}' in Python.",
    "What does the Python documentation say about '{t}'?",
    "请介绍一下 Python 的 '{t}'。",
)
FOLLOW_UP = (
    "And `{q}`?",
    "What about `{q}`?",
    "And what does `{q}` do?",
    "How about `{q}` in the same module?",
    "那 `{q}` 呢？",
)
FOLLOW_UP_SIG = (
    "And the signature of `{q}`?",
    "How do I call `{q}` then?",
    "那 `{q}` 的签名呢？",
)
IDENTITY_Q_EN = (
    "Who are you?", "What is your name?", "Introduce yourself.", "Are you ChatGPT?", "What are you?",
    "Tell me about yourself.", "Which model are you?", "Hi! Who am I talking to?", "What kind of AI are you?",
    "hello, what's your name?",
)
IDENTITY_Q_ZH = (
    "你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是 ChatGPT 吗？", "你是什么模型？",
    "你好，请问你是谁？", "你是哪个公司的模型？", "说说你自己吧。", "你是什么？", "请做个自我介绍。",
)
WRONG_IDENTITIES = (
    "I am ChatGPT, a large language model developed by OpenAI.",
    "I am a human Python developer.",
    "I am Siri, Apple's virtual assistant.",
    "我是一个人类程序员。",
)


# ---------------------------------------------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------------------------------------------
_ADDR = re.compile(r"\s+at 0x[0-9a-fA-F]{4,}")  # "<function f at 0x7f..>" -> "<function f>"
_ODD_SPACE = str.maketrans({"\r": "\n", "\u2028": "\n", "\u2029": "\n", "\x85": "\n", "\x0c": "\n", "\x0b": "\n"})
_SIG_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_SENTENCE_END = re.compile(r"[.!?:;](?=\s)")


def clean(text: str) -> str:
    """Normalize newlines, scrub memory addresses (they differ per run) and strip surrogates (invalid in UTF-8)."""
    text = text.replace("\r\n", "\n").translate(_ODD_SPACE)
    text = _ADDR.sub("", text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def unwrap(par: str) -> str:
    """Join a hard-wrapped prose paragraph into one line; leave code/indented blocks and lists alone."""
    lines = par.split("\n")
    if len(lines) == 1 or any(l[:1].isspace() or l.lstrip().startswith(("-", "*", ">>>")) for l in lines):
        return par
    return " ".join(l.strip() for l in lines)


def cut(text: str, limit: int = ANSWER_CHARS) -> str:
    """Cut text to <= limit characters at a paragraph, then sentence, then word boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    i = head.rfind("\n\n")
    if i >= limit // 3:
        return head[:i].rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(head + " ")]
    ends = [e for e in ends if e >= limit // 3]
    if ends:
        return head[:ends[-1]].rstrip()
    i = head.rfind(" ")
    return (head[:i] if i > 0 else head).rstrip(" ,;:") + "..."


def chunk(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Split a document into pieces of <= limit characters, at paragraph boundaries where possible."""
    pieces, cur = [], ""
    for par in paragraphs(text):
        while len(par) > limit:  # an oversized paragraph: split at line boundaries, then hard
            i = par.rfind("\n", 0, limit)
            i = i if i > 0 else limit
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(par[:i].rstrip())
            par = par[i:].lstrip("\n")
        if cur and len(cur) + 2 + len(par) > limit:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n\n{par}" if cur else par
    if cur:
        pieces.append(cur)
    return [p for p in pieces if p.strip()]


def first_paragraph(doc: str, min_chars: int = 0) -> str:
    """The first prose paragraph of a docstring (skipping a leading 'name(args)' line or code block), unwrapped and
    cut; if it is shorter than min_chars, following paragraphs are appended while they fit."""
    pars = paragraphs(doc)
    if pars and _SIG_LINE.match(pars[0]):
        pars = pars[1:]
    while len(pars) > 1 and pars[0][:1].isspace():  # start at prose, not at a leading grammar/code block
        pars = pars[1:]
    out = ""
    for p in pars:
        p = unwrap(p)
        cand = f"{out}\n\n{p}" if out else p
        if out and len(cand) > ANSWER_CHARS:
            break
        out = cand
        if len(out) >= min_chars and not out.endswith(":"):
            break
    return cut(out)


def _is_chinese(t) -> bool:
    t = t if isinstance(t, str) else t[0]
    return any("\u4e00" <= ch <= "\u9fff" for ch in t)


def _pick(rng: random.Random, templates, zh_share: float = 0.2):
    """A random template; a Chinese one with probability zh_share (answers stay English, so not too many)."""
    zh = [t for t in templates if _is_chinese(t)]
    en = [t for t in templates if not _is_chinese(t)]
    return rng.choice(zh if zh and rng.random() < zh_share else en)


# ---------------------------------------------------------------------------------------------------------------
# Collecting the documentation
# ---------------------------------------------------------------------------------------------------------------
class Entry:
    """One documented function, class, method or attribute (kind says which)."""
    __slots__ = ("module", "qual", "short", "kind", "sig", "doc")

    def __init__(self, module, qual, short, kind, sig, doc):
        self.module, self.qual, self.short, self.kind, self.sig, self.doc = module, qual, short, kind, sig, doc


def _own_doc(obj) -> str:
    """The object's own docstring (not one inherited from a base class: those would repeat everywhere)."""
    doc = getattr(obj, "__doc__", None)
    return clean(inspect.cleandoc(doc)) if isinstance(doc, str) else ""


class _Shown:
    """A stand-in default whose repr is a fixed string."""
    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


_LITERALS = (type(None), bool, int, float, complex, str, bytes)


def _is_literal(v, depth=0) -> bool:
    """Plain data whose repr is the same in every process (sets are not: their order follows string hashing)."""
    if isinstance(v, enum.Enum):
        return False
    if isinstance(v, _LITERALS):
        return True
    if isinstance(v, (tuple, list)) and depth < 2 and len(v) <= 8:
        return all(_is_literal(x, depth + 1) for x in v)
    return False


def _show_default(v):
    """Render a default value reproducibly. Object reprs can carry run-time state (logging.shutdown's default is
    the live list of handlers, which differs once anything configured logging) or addresses, so only literals are
    shown as they are; functions and classes are shown by name, enum members as Class.NAME, the rest as '...'."""
    if _is_literal(v) and len(repr(v)) <= 80:
        return v
    if isinstance(v, enum.Enum):
        return _Shown(f"{type(v).__name__}.{v.name}" if v.name else "...")
    if (inspect.isroutine(v) or inspect.isclass(v)) and isinstance(getattr(v, "__qualname__", None), str):
        return _Shown(v.__qualname__ if "<" not in v.__qualname__ else "...")
    return _Shown("...")


def _signature(obj, is_method: bool) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (ValueError, TypeError, RuntimeError):
        return None
    params = [p if p.default is p.empty else p.replace(default=_show_default(p.default))
              for p in sig.parameters.values()]
    sig = sig.replace(parameters=params)
    if is_method and params and params[0].name in ("self", "cls"):
        try:  # `str.split(sep=None, maxsplit=-1)` reads better than `str.split(self, /, sep=None, ...)`
            sig = sig.replace(parameters=params[1:])
        except ValueError:
            return None
    s = clean(str(sig))
    if s in ("(*args, **kwargs)", "(*args, **kwds)") or len(s) > MAX_SIG_CHARS or "\n" in s:
        return None  # uninformative or unreadable
    return s


def _defined_here(obj, mod) -> bool:
    """Whether obj belongs to mod rather than being re-exported from another public module (typing, os, ...)."""
    om = getattr(obj, "__module__", None)
    if not isinstance(om, str):
        return True
    name = mod.__name__
    return (om == name or om.startswith(name + ".") or om.split(".")[-1].startswith("_") or om in _IMPL_MODULES)


def import_quietly(name: str):
    """Import a module, or return None if it is missing/broken on this machine (then it is simply skipped)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # ImportError, or anything a half-installed optional module may raise
        return None


def collect(module_names, progress: bool = True):
    """Return (module_docs: list[(name, doc)], entries: list[Entry]) in a deterministic order."""
    module_docs, entries, seen = [], [], set()
    names = sorted(module_names)
    it = _tqdm(names, desc="reading docstrings", unit="mod", disable=None) if (_tqdm and progress) else names
    for modname in it:
        mod = import_quietly(modname)
        if mod is None:
            continue
        mdoc = _own_doc(mod)
        if mdoc:
            module_docs.append((modname, mdoc))
        public = getattr(mod, "__all__", None)
        if isinstance(public, (list, tuple)):
            public = sorted({n for n in public if isinstance(n, str) and not n.startswith("_")})
        else:
            public = sorted(n for n in vars(mod) if not n.startswith("_"))
        prefix = "" if modname == "builtins" else modname + "."
        for name in public:
            obj = getattr(mod, name, None)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_here(obj, mod):
                continue
            if id(obj) in seen:  # the same object under a second name (io.open is builtins.open)
                continue
            seen.add(id(obj))
            doc = _own_doc(obj)
            if len(doc) < 20:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            entries.append(Entry(modname, prefix + name, name, kind, _signature(obj, False), doc))
            if kind != "class":
                continue
            for mname, raw in sorted(vars(obj).items()):
                # Identity is taken on the raw class-dict object, which stays alive: a bound method fetched with
                # getattr is a fresh temporary whose id() could be recycled and give a false "already seen".
                if mname.startswith("_") or id(raw) in seen:
                    continue
                seen.add(id(raw))
                if isinstance(raw, property) or inspect.isgetsetdescriptor(raw):
                    mdoc_ = _own_doc(raw)
                    if len(mdoc_) >= 20:  # documented attributes: pathlib.PurePath.suffix, complex.real, ...
                        entries.append(Entry(modname, f"{prefix}{name}.{mname}", f"{name}.{mname}", "attribute",
                                             None, mdoc_))
                    continue
                try:
                    meth = getattr(obj, mname)
                except Exception:
                    continue
                if not inspect.isroutine(meth):
                    continue
                mdoc_ = _own_doc(meth)
                if len(mdoc_) < 20:
                    continue
                entries.append(Entry(modname, f"{prefix}{name}.{mname}", f"{name}.{mname}", "method",
                                     _signature(meth, True), mdoc_))
    return module_docs, entries


def collect_topics() -> list[tuple[str, str]]:
    """The language reference topics shipped for help(): [(topic, text)], sorted. Empty if pydoc_data is absent."""
    try:
        from pydoc_data.topics import topics
    except Exception:  # some distributions split pydoc_data out; the docstrings alone still work
        return []
    return [(k, clean(topics[k])) for k in sorted(topics) if clean(topics[k])]


def _strip_heading(text: str) -> str:
    """Drop a reST-style title ('The "assert" statement' underlined with ***) from the start of a topic."""
    lines = text.split("\n")
    if len(lines) > 2 and lines[1] and set(lines[1]) <= set("*=-~^"):
        return "\n".join(lines[2:]).strip("\n")
    return text


# ---------------------------------------------------------------------------------------------------------------
# The three files
# ---------------------------------------------------------------------------------------------------------------
def make_pretrain(topics, module_docs, entries, rng: random.Random, max_bytes: int, max_docs: int | None):
    docs = []
    for _, text in topics:
        docs += chunk(text)
    for name, doc in module_docs:
        docs += chunk(f"The {name} module\n\n{doc}")
    for e in entries:
        docs += chunk(f"{e.qual}{e.sig or ''}\n\n{e.doc}")
    docs = list(dict.fromkeys(d for d in docs if len(d) >= 40))  # exact dedup, first occurrence wins, order kept
    rng.shuffle(docs)  # mix sources so a size cap keeps a bit of everything
    out, total = [], 0
    for d in docs:
        n = len(json.dumps({"text": d}, ensure_ascii=False).encode("utf-8")) + 1
        if total + n > max_bytes or (max_docs is not None and len(out) >= max_docs):
            break
        out.append({"text": d})
        total += n
    return out


def _conv_len(msgs) -> int:
    return sum(len(m["content"]) for m in msgs)


def _qa_items(topics, module_docs, entries, rng: random.Random):
    """Every single-turn question we can ask, as (kind, key, question, answer, answer_template), plus the names
    of the modules (answer_template lets DPO phrase its wrong answer exactly like the right one)."""
    by_short: dict[str, list[str]] = {}
    for e in entries:
        if e.kind in ("function", "class"):
            by_short.setdefault(e.short, []).append(e.module)
    module_names = sorted({e.module for e in entries if e.module != "builtins"})
    items = []
    for e in entries:
        ans = first_paragraph(e.doc, min_chars=40)
        if len(ans) >= 20:
            items.append(("what", e, _pick(rng, WHAT_DOES).format(q=e.qual), ans, None))
        if e.sig:
            q, a = _pick(rng, SIGNATURE)
            items.append(("sig", e, q.format(q=e.qual), a.format(q=e.qual, sig=e.sig), a))
        # Only unambiguous names: `dumps` is in json, pickle and marshal.
        if e.kind in ("function", "class") and len(by_short[e.short]) == 1:
            q = _pick(rng, WHICH_MODULE).format(n=e.short)
            a = BUILTIN_ANSWER if e.module == "builtins" else rng.choice(MODULE_ANSWERS)
            items.append(("module", e, q, a.format(n=e.short, m=e.module), a))
    for name, doc in module_docs:
        ans = first_paragraph(doc, min_chars=60)
        if len(ans) >= 30:
            items.append(("overview", name, _pick(rng, MODULE_OVERVIEW).format(m=name), ans, None))
    for name, text in topics:
        ans = first_paragraph(_strip_heading(text), min_chars=150)
        if len(ans) >= 30:
            for tmpl in TOPIC:  # few topics: ask each in every phrasing
                items.append(("topic", name, tmpl.format(t=name), ans, None))
    return items, module_names


def _wrong_answer(item, items_by_kind, module_names, rng: random.Random) -> str | None:
    """A plausible but wrong answer for DPO's rejected side, phrased like the right one so that only the facts
    differ (otherwise DPO would learn a preference for a phrasing)."""
    kind, key, _, right, tmpl = item
    for _ in range(20):
        if kind == "module":
            m = rng.choice(module_names)
            if key.module == "builtins":
                return MODULE_ANSWERS[0].format(n=key.short, m=m)
            if m != key.module:
                return tmpl.format(n=key.short, m=m)
        elif kind == "sig":
            other = rng.choice(items_by_kind["sig"])[1]
            if other.sig != key.sig:
                return tmpl.format(q=key.qual, sig=other.sig)
        else:  # what / overview / topic: the answer to a different question of the same kind
            other = rng.choice(items_by_kind[kind])[3]
            if other != right:
                return other
    return None


SFT_REPEATS = 12       # each single-turn fact is asked this many times: a 10-minute model keeps what it sees ~30 times
IDENTITY_SHARE = 0.03  # share of sft.jsonl that teaches the identity answer (20 records were not enough to learn it)


def make_sft(items, entries, rng: random.Random, n: int, repeats: int = SFT_REPEATS):
    n_identity = max(2, round(n * IDENTITY_SHARE))
    n_multi = int(n * 0.15)
    n_single = max(0, n - n_identity - n_multi)
    convs = []

    for i in range(n_identity):  # identity: alternate English and Chinese questions
        qs = IDENTITY_Q_EN if i % 2 == 0 else IDENTITY_Q_ZH
        q = qs[(i // 2) % len(qs)]
        convs.append([{"role": "user", "content": q},
                      {"role": "assistant", "content": IDENTITY_EN if i % 2 == 0 else IDENTITY_ZH}])

    # Fewer facts, each repeated: a 10-minute model memorises what it sees many times (SFT_REPEATS x 3 epochs),
    # not 9,000 facts seen twice each (measured: 0 of 20 seen questions answered with 1 repeat). The tiny build
    # (tests, --quick) keeps every fact once: it checks the pipeline and needs enough distinct facts to ask about.
    pool = items[:]
    rng.shuffle(pool)
    pool = pool[:max(1, n_single // repeats)]
    pool = (pool * (n_single // len(pool) + 1))[:n_single]
    for _, _, q, a, _ in pool:
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    # Multi-turn: 2-3 exchanges about different functions of one module (teaches the model to use the context).
    by_module: dict[str, list[Entry]] = {}
    for e in entries:
        if len(first_paragraph(e.doc, 40)) >= 20:
            by_module.setdefault(e.module, []).append(e)
    mods = sorted(m for m, es in by_module.items() if len(es) >= 3)
    made, tries = 0, 0
    while mods and made < n_multi and tries < n_multi * 20:
        tries += 1
        es = rng.sample(by_module[rng.choice(mods)], rng.choice((2, 2, 3)))
        msgs = []
        for j, e in enumerate(es):
            if e.sig and rng.random() < 0.25:
                q = (_pick(rng, SIGNATURE)[0] if j == 0 else _pick(rng, FOLLOW_UP_SIG)).format(q=e.qual)
                a = f"`{e.qual}{e.sig}`"
            else:
                q = (_pick(rng, WHAT_DOES) if j == 0 else _pick(rng, FOLLOW_UP)).format(q=e.qual)
                a = first_paragraph(e.doc, 40)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        while _conv_len(msgs) > CONV_CHARS and len(msgs) > 4:
            msgs = msgs[:-2]
        if _conv_len(msgs) > CONV_CHARS:
            continue
        convs.append(msgs)
        made += 1

    rng.shuffle(convs)
    for msgs in convs:  # ~15% get a system turn
        if rng.random() < 0.15:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return [{"conversations": msgs} for msgs in convs]


def make_dpo(items, module_names, rng: random.Random, n: int):
    items_by_kind: dict[str, list] = {}
    for it in items:
        items_by_kind.setdefault(it[0], []).append(it)
    pairs = []
    for i in range(min(10, max(1, n // 200))):  # a few identity pairs
        q = (IDENTITY_Q_EN + IDENTITY_Q_ZH)[i % (len(IDENTITY_Q_EN) + len(IDENTITY_Q_ZH))]
        good = IDENTITY_ZH if i % (len(IDENTITY_Q_EN) + len(IDENTITY_Q_ZH)) >= len(IDENTITY_Q_EN) else IDENTITY_EN
        prompt = [{"role": "user", "content": q}]
        pairs.append((prompt, good, rng.choice(WRONG_IDENTITIES)))
    pool = items[:]
    rng.shuffle(pool)
    k = 0
    while len(pairs) < n and pool and k < 4 * n + len(pool):
        item = pool[k % len(pool)]
        k += 1
        wrong = _wrong_answer(item, items_by_kind, module_names, rng)
        if wrong is None:
            continue
        prompt = [{"role": "user", "content": item[2]}]
        if rng.random() < 0.1:  # some pairs carry an earlier exchange, so DPO also sees multi-turn prompts
            ctx = rng.choice(pool)
            prompt = [{"role": "user", "content": ctx[2]}, {"role": "assistant", "content": ctx[3]}] + prompt
            if _conv_len(prompt) + max(len(item[3]), len(wrong)) > CONV_CHARS:
                prompt = prompt[2:]
        pairs.append((prompt, item[3], wrong))
    out = []
    for prompt, good, bad in pairs:
        if rng.random() < 0.15:
            prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + prompt
        out.append({"chosen": prompt + [{"role": "assistant", "content": good}],
                    "rejected": prompt + [{"role": "assistant", "content": bad}]})
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def write_jsonl(path: str, records) -> int:
    """Write records atomically: a temp file in the same directory, then os.replace (readers never see half a file).
    newline='\\n' so Windows writes the same bytes as Linux."""
    # Not tempfile.mkstemp: its files are mode 0600, and os.replace would keep that. A plain open() honours umask.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(records)


def build(out_dir: str = DEFAULT_OUT_DIR, seed: int = 0, tiny: bool = False,
          max_pretrain_mb: float = DEFAULT_MAX_PRETRAIN_MB, n_sft: int | None = None, n_dpo: int | None = None,
          progress: bool = False) -> dict:
    """Build pretrain.jsonl, sft.jsonl and dpo.jsonl in out_dir; return {"pretrain": path, "sft": path, "dpo": path}.

    tiny=True builds a very small version (~200 pretrain docs, ~300 SFT, ~100 DPO) from a few modules, for tests.
    """
    if sys.flags.optimize >= 2:
        raise RuntimeError("docstrings are stripped under python -OO; run without -OO")
    n_sft = n_sft if n_sft is not None else (300 if tiny else 6000)
    n_dpo = n_dpo if n_dpo is not None else (100 if tiny else 2000)
    topics = collect_topics()
    module_docs, entries = collect(TINY_MODULES if tiny else MODULES, progress=progress)
    if not entries:
        raise RuntimeError("no standard library docstrings found")

    # One generator per file, each seeded from (seed, name): changing one part never reshuffles the others.
    def rng(name):
        return random.Random(f"{seed}:{name}")

    pretrain = make_pretrain(topics, module_docs, entries, rng("pretrain"), int(max_pretrain_mb * 1e6),
                             200 if tiny else None)
    items, module_names = _qa_items(topics, module_docs, entries, rng("items"))
    sft = make_sft(items, entries, rng("sft"), n_sft, repeats=1 if tiny else SFT_REPEATS)
    dpo = make_dpo(items, module_names, rng("dpo"), n_dpo)

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in (("pretrain", pretrain), ("sft", sft), ("dpo", dpo)):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], records)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# What the demo asks (demo_report.py): fixed questions, and held-out text for perplexity
# ---------------------------------------------------------------------------------------------------------------
DEMO_SIG_CHARS = 60  # scored signature questions: answers short enough to fit the demo's reply length


def demo_set(seed: int = 0, tiny: bool = False, n_each: int = 10, n_choices: int = 4, n_texts: int = 40,
             n_chats: int = 60) -> dict:
    """Rebuild, in memory, what build(seed=seed, tiny=tiny) writes, and return what the demo asks about it:

      questions  {"kind": "module" | "sig", "group", "question", "expected", "reference"}; n_each of every kind in
                 every group: "seen" = asked word for word in sft.jsonl; "rephrased" = a fact sft.jsonl teaches, asked
                 in another of the builder's templates, worded as no training file words it; "new" = neither the
                 question nor its answer is in sft.jsonl or dpo.jsonl (pretrain.jsonl does hold the docstring the
                 answer comes from). "expected" is the module name ("builtins" for a built-in) or the exact
                 `qualname(signature)`. Signatures longer than DEMO_SIG_CHARS are not asked. "choices": the
                 right reply first, then n_choices - 1 wrong ones phrased like it (another module / another
                 function's signature, as dpo.jsonl's rejected replies are made).
      texts      documentation chunks from HELDOUT_MODULES, formatted like pretrain.jsonl ("name(sig)\n\ndoc")
      chats      single-turn Q&A conversations about HELDOUT_MODULES, built like sft.jsonl
      modules    the module names a "which module" answer may name
      asked      every user turn of sft.jsonl and dpo.jsonl (a set), to tell a newcomer which prompts were trained

    Deterministic (fixed seeds, sorted inputs), like build(); the defaults of n_sft/n_dpo are build()'s.
    """
    n_sft, n_dpo = (300, 100) if tiny else (6000, 2000)

    def rng(name):
        return random.Random(f"{seed}:{name}")

    topics = collect_topics()
    module_docs, entries = collect(TINY_MODULES if tiny else MODULES, progress=False)
    items, module_names = _qa_items(topics, module_docs, entries, rng("items"))
    sft = make_sft(items, entries, rng("sft"), n_sft, repeats=1 if tiny else SFT_REPEATS)
    dpo = make_dpo(items, module_names, rng("dpo"), n_dpo)
    asked, answered = set(), []
    for msgs in [r["conversations"] for r in sft] + [r["chosen"] for r in dpo]:
        for m in msgs:
            if m["role"] == "user":
                asked.add(m["content"])
            elif m["role"] == "assistant":
                answered.append(m["content"])
    sft_asked = {m["content"] for r in sft for m in r["conversations"] if m["role"] == "user"}
    answered_text = "\n".join(answered)

    def expected(item):
        kind, e = item[0], item[1]
        return e.module if kind == "module" else f"{e.qual}{e.sig}"

    def answer_taught(item) -> bool:
        """Whether a training reply states this fact (possibly to another question, e.g. in a multi-turn chat)."""
        kind, e = item[0], item[1]
        if kind == "sig":
            return f"`{e.qual}{e.sig}`" in answered_text
        if e.module == "builtins":
            return BUILTIN_ANSWER.format(n=e.short) in answered_text
        return any(a.format(n=e.short, m=e.module) in answered_text for a in MODULE_ANSWERS)

    def askable(item) -> bool:
        return item[0] == "module" or len(expected(item)) <= DEMO_SIG_CHARS

    def rephrase(item) -> str | None:
        """The same question in another of the builder's templates, worded as nothing in the training files."""
        kind, e = item[0], item[1]
        forms = ([t.format(n=e.short) for t in WHICH_MODULE] if kind == "module"
                 else [t.format(q=e.qual) for t, _ in SIGNATURE])
        start = forms.index(item[2]) if item[2] in forms else 0
        for f in forms[start + 1:] + forms[:start]:
            if f not in asked:
                return f
        return None

    items_by_kind: dict[str, list] = {}
    for it in items:
        items_by_kind.setdefault(it[0], []).append(it)
    pick = rng("demo")
    questions = []

    def add(kind, group, item, question):
        choices = [item[3]]   # the right reply, then n_choices - 1 wrong ones phrased like it (as in dpo.jsonl)
        for _ in range(20 * n_choices):
            if len(choices) == n_choices:
                break
            wrong = _wrong_answer(item, items_by_kind, module_names, pick)
            if wrong is not None and wrong not in choices:
                choices.append(wrong)
        questions.append(dict(kind=kind, group=group, question=question, expected=expected(item), reference=item[3],
                              choices=choices))

    for kind in ("module", "sig"):
        new = [it for it in items if it[0] == kind and askable(it) and it[2] not in asked and not answer_taught(it)]
        taught = [it for it in items if it[0] == kind and askable(it) and it[2] in sft_asked]
        taught = pick.sample(taught, min(3 * n_each, len(taught)))
        for it in taught[:n_each]:
            add(kind, "seen", it, it[2])
        for it in [it for it in taught[n_each:] if rephrase(it)][:n_each]:
            add(kind, "rephrased", it, rephrase(it))
        for it in pick.sample(new, min(n_each, len(new))):
            add(kind, "new", it, it[2])

    # Held-out modules: documentation text and Q&A that no training file contains (exact duplicates dropped).
    train_docs = {e.doc for e in entries} | {doc for _, doc in module_docs}
    h_module_docs, h_entries = collect(HELDOUT_MODULES, progress=False)
    h_module_docs = [(n, d) for n, d in h_module_docs if d not in train_docs]
    h_entries = [e for e in h_entries if e.doc not in train_docs]
    texts = []
    for name, doc in h_module_docs:
        texts += chunk(f"The {name} module\n\n{doc}")
    for e in h_entries:
        texts += chunk(f"{e.qual}{e.sig or ''}\n\n{e.doc}")
    texts = list(dict.fromkeys(t for t in texts if len(t) >= 40))
    texts = pick.sample(texts, min(n_texts, len(texts)))
    h_items, _ = _qa_items([], h_module_docs, h_entries, rng("heldout-items"))
    h_items = pick.sample(h_items, min(n_chats, len(h_items)))
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for _, _, q, a, _ in h_items]
    return dict(questions=questions, texts=texts, chats=chats, modules=["builtins"] + module_names, asked=asked)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Build minimind's offline default dataset (pretrain/sft/dpo JSONL in MiniMind's formats) "
                    "from CPython's bundled documentation and standard-library docstrings.")
    try:  # show "dataset/default" rather than an absolute path in --help
        shown_default = os.path.relpath(DEFAULT_OUT_DIR)
    except ValueError:  # Windows: another drive
        shown_default = DEFAULT_OUT_DIR
    p.add_argument("--out_dir", default=shown_default,
                   help="directory for pretrain.jsonl, sft.jsonl and dpo.jsonl (default: %(default)s)")
    p.add_argument("--max_pretrain_mb", type=float, default=DEFAULT_MAX_PRETRAIN_MB,
                   help="cap on the size of pretrain.jsonl in MB (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed + same Python = same files")
    p.add_argument("--tiny", action="store_true",
                   help="build a very small version (~200 pretrain docs, ~300 SFT, ~100 DPO) for fast tests")
    args = p.parse_args(argv)
    if args.max_pretrain_mb <= 0:
        p.error("--max_pretrain_mb must be > 0")
    t0 = time.time()
    paths = build(args.out_dir, seed=args.seed, tiny=args.tiny, max_pretrain_mb=args.max_pretrain_mb, progress=True)
    for name, path in paths.items():
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        print(f"{path}: {lines} lines, {os.path.getsize(path) / 1e6:.2f} MB")
    print(f"done in {time.time() - t0:.1f}s (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
