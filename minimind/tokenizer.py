"""Byte-level BPE tokenizer (trained with `tokenizers`) and the ChatML chat renderer.

Byte-level: text is first turned into UTF-8 bytes, so any string (Chinese, emoji, odd whitespace) round-trips
exactly and there is never an unknown token. The chat renderer returns the token ids AND the loss mask in one
pass: the mask comes from where the assistant replies sit in the rendered text, not from scanning ids.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

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

    def __init__(self, tok: HFTokenizer, chat_template: str = CHAT_TEMPLATE):
        self.tok = tok
        self.chat_template = chat_template
        self.pad_id = self._id(ENDOFTEXT)
        self.bos_id = self._id(IM_START)
        self.eos_id = self._id(IM_END)
        self.vocab_size = tok.get_vocab_size()

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no special token {token!r}; train it with train_tokenizer.py")
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
        """
        text, spans, pos = [], [], 0
        for m in messages:
            head = f"{IM_START}{m['role']}\n"
            body = f"{m['content']}{IM_END}"
            if m["role"] == "assistant":
                spans.append((pos + len(head), pos + len(head) + len(body)))
            piece = head + body + "\n"
            text.append(piece)
            pos += len(piece)
        if last_reply_only:
            spans = spans[-1:]
        if add_generation_prompt:
            text.append(f"{IM_START}assistant\n")
        enc = self.tok.encode("".join(text), add_special_tokens=False)
        # A token is supervised when it starts inside an assistant span (offsets are character positions).
        mask, j = [], 0
        for start, _ in enc.offsets:
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            mask.append(int(j < len(spans) and spans[j][0] <= start < spans[j][1]))
        return enc.ids, mask

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
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json) or the file."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        template = CHAT_TEMPLATE
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                template = json.load(f).get("chat_template") or CHAT_TEMPLATE
        return cls(HFTokenizer.from_file(file), template)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges: caches and resumes check it."""
        import hashlib
        return hashlib.sha1(self.tok.to_str().encode()).hexdigest()[:16]


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
