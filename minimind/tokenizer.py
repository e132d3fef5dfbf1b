"""Byte-level BPE tokenizer (trained with `tokenizers`) and the ChatML chat renderer.

Byte-level: text is first turned into UTF-8 bytes, so any string (Chinese, emoji, odd whitespace) round-trips
exactly and there is never an unknown token. The chat renderer returns the token ids AND the loss mask in one
pass: the mask comes from where the assistant replies sit in the rendered text, not from scanning ids.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import CheckpointError

# Same ids as MiniMind's tokenizer: 0 pads/separates, 1 opens a turn, 2 closes it (and ends generation).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
ROLES = ("system", "user", "assistant", "tool")

# Jinja twin of render_chat(), stored in tokenizer_config.json so transformers' apply_chat_template matches us.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with our special tokens and chat rendering."""

    def __init__(self, tok: HFTokenizer, chat_template: str = CHAT_TEMPLATE, source_config: dict | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.source_config = source_config   # tokenizer_config.json it was loaded with (kept on save)
        self._chat_profile = None            # how chat_template differs from plain ChatML (see chatml_profile)
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
        """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per turn (same as CHAT_TEMPLATE)."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    last_reply_only: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat, and a 0/1 mask that is 1 on every assistant reply and its <|im_end|>.

        last_reply_only: mask only the final assistant reply (DPO scores just the reply being compared).
        A model's own ChatML-style template is followed: its default system prompt (Qwen2.5) and reply prefix
        (MiniMind-3's empty think block) are added, see chatml_profile; other templates are refused.
        """
        default_system, reply_prefix = self.chat_profile()
        if default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": default_system}, *messages]   # e.g. Qwen2.5's template
        # Encode the template's pieces and each message body separately. Why not one encode of the whole text:
        # BPE would merge the '\n' after 'assistant' with a reply's leading whitespace into one token, so training
        # would see a token that inference never does (the prompt ends with 'assistant\n'). Apart from such
        # leading whitespace, the ids equal encode(chat_text(messages)).
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        pieces = []  # (text, supervised)
        for i, m in enumerate(messages):
            reply = m["role"] == "assistant" and (not last_reply_only or i == last)
            head = f"{IM_START}{m['role']}\n" + (reply_prefix if m["role"] == "assistant" else "")
            # the reply prefix is written by the template, not by the model: left out of the mask
            pieces += [(head, False), (m["content"], reply), (f"{IM_END}", reply), ("\n", False)]
        if add_generation_prompt:
            pieces.append((f"{IM_START}assistant\n{reply_prefix}", False))
        ids, mask = [], []
        for (text, supervised), enc in zip(pieces, self.tok.encode_batch([t for t, _ in pieces],
                                                                         add_special_tokens=False)):
            ids += enc.ids
            mask += [int(supervised)] * len(enc.ids)
        return ids, mask

    def chat_profile(self) -> tuple[str | None, str]:
        """(default system prompt, reply prefix) that make render_chat equal this tokenizer's chat_template."""
        if self._chat_profile is None:
            try:
                self._chat_profile = chatml_profile(self.chat_template)
            except ValueError as e:
                    raise CheckpointError(f"tokenizer chat_template: {e}; minimind renders ChatML conversations only "
                                      f"(put a ChatML chat_template in tokenizer_config.json)") from None
        return self._chat_profile

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
            "added_tokens_decoder": {str(self._id(t)): {"content": t, "special": True, "lstrip": False,
                                                         "rstrip": False, "normalized": False,
                                                         "single_word": False} for t in SPECIAL_TOKENS},
        }
        # A tokenizer loaded from a model (e.g. Qwen's) keeps its own settings and special tokens.
        cfg = {**cfg, **(self.source_config or {}), "chat_template": self.chat_template}
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
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
            template = cfg.get("chat_template")
            if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(folder, "chat_template.jinja")   # where transformers >= 4.50 saves it
        if not template and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        return cls(HFTokenizer.from_file(file), template or CHAT_TEMPLATE, cfg)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges: caches and resumes check it."""
        import hashlib
        return hashlib.sha1(self.tok.to_str().encode()).hexdigest()[:16]


# Probe conversations for chatml_profile: every role, multi-turn, multi-line and non-ASCII content.
_PROBES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1 中文\nline 2"},
     {"role": "assistant", "content": "A1\n\ncode"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2 🎉"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
]


def chatml_profile(template: str) -> tuple[str | None, str]:
    """How a model's Jinja chat template relates to our ChatML renderer: (default_system, reply_prefix).

    default_system: the system prompt the template inserts when a conversation has none (Qwen2.5: "You are
    Qwen, ..."). reply_prefix: text the template writes at the start of every assistant turn (MiniMind-3: an empty
    "<think>...</think>" block). The template is rendered on probe conversations with jinja2, the engine
    transformers uses (it ships with torch); if ChatML plus these two quirks does not reproduce it exactly on
    every probe, raises ValueError saying where they differ.
    """
    if template == CHAT_TEMPLATE:
        return None, ""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # no jinja2: trust a template that speaks ChatML
        if IM_START in template and IM_END in template:
            return None, ""
        raise ValueError("not a ChatML template (no <|im_start|>/<|im_end|>)") from None

    def raise_exception(message):
        raise TemplateError(message)

    # The same environment transformers' apply_chat_template builds.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        jinja = env.from_string(template)
        render = lambda messages, gen: jinja.render(messages=messages, add_generation_prompt=gen)  # noqa: E731
        first = render(_PROBES[0], False)
        with_prompt = render(_PROBES[0], True)
    except Exception as e:  # noqa: BLE001 - any template failure means we cannot vouch for it
        raise ValueError(f"cannot render it ({type(e).__name__}: {e})") from None
    plain = Tokenizer.chat_text(_PROBES[0])
    default_system = None
    m = re.fullmatch(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END) + r"\n", first[:-len(plain)], re.S)
    if first != plain and first.endswith(plain) and m:
        default_system = m.group(1)
    head = first + f"{IM_START}assistant\n"
    reply_prefix = with_prompt[len(head):] if with_prompt.startswith(head) else None
    if reply_prefix is None:
        raise ValueError(f"not ChatML: it renders {first!r} for one user turn")

    def ours(messages, gen):
        if default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": default_system}, *messages]
        text = "".join(f"{IM_START}{m['role']}\n{reply_prefix if m['role'] == 'assistant' else ''}"
                       f"{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n{reply_prefix}" if gen else "")

    for probe in _PROBES:
        for gen in (False, True):
            want, got = render(probe, gen), ours(probe, gen)
            if want != got:
                at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                raise ValueError(f"not ChatML-compatible: for a {len(probe)}-message conversation it renders "
                                 f"{want[at:at + 40]!r} where ChatML has {got[at:at + 40]!r}")
    return default_system, reply_prefix


def train_bpe(texts: Iterator[str], vocab_size: int = 6400, min_frequency: int = 2,
              show_progress: bool = True) -> Tokenizer:
    """Train byte-level BPE on an iterator of strings. Special tokens get ids 0, 1, 2."""
    tok = HFTokenizer(models.BPE())
    # ByteLevel pre-tokenizer: split on the GPT-2 regex (words, numbers, punctuation, spaces), map bytes to
    # printable characters. No prefix space: " x" and "x" stay different, so decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
