"""Data: read and validate MiniMind's JSONL formats, pre-tokenize once, and serve batches.

Formats (one JSON object per line):
  pretrain  {"text": str}
  sft       {"conversations": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  dpo       {"chosen": [messages...], "rejected": [messages...]}

Every batch is addressed by (epoch, step): the same (epoch, step) always gives the same batch, on any rank.
That makes exact resume a matter of remembering two integers, and DDP sharding a matter of arithmetic.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from queue import Queue

import numpy as np
import torch
from tqdm import tqdm

from .loss import IGNORE
from .tokenizer import ROLES, Tokenizer


class DataError(ValueError):
    """Bad input data. str(e) is 'FILE:LINE: what is wrong' (the CLI prints 'error: ' + that)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating JSONL
# ---------------------------------------------------------------------------------------------------------------
def _check_messages(msgs, where: str, field: str) -> None:
    if not isinstance(msgs, list):
        raise DataError(f"{where}: '{field}' must be a list of messages, got {type(msgs).__name__}")
    if not msgs:
        raise DataError(f"{where}: '{field}' is empty")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            raise DataError(f"{where}: {field}[{i}] is missing '{missing}'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {field}[{i}] content must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: '{field}' has no assistant turn to learn from")


def validate(obj, kind: str, where: str) -> None:
    """Raise DataError naming `where` (FILE:LINE) if obj is not a valid record of `kind`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if kind == "pretrain":
        if "text" not in obj:
            raise DataError(f"{where}: missing field 'text'")
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
    elif kind == "sft":
        if "conversations" not in obj:
            raise DataError(f"{where}: missing field 'conversations'")
        _check_messages(obj["conversations"], where, "conversations")
    elif kind == "dpo":
        for field in ("chosen", "rejected"):
            if field not in obj:
                raise DataError(f"{where}: missing field '{field}'")
            _check_messages(obj[field], where, field)
            if obj[field][-1]["role"] != "assistant":
                raise DataError(f"{where}: '{field}' must end with an assistant turn")
    else:
        raise ValueError(f"unknown data kind {kind!r}")


def read_jsonl(path: str, kind: str, progress: bool = True):
    """Yield validated records from a JSONL file; stop with DataError('FILE:LINE: ...') on the first bad line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"read {os.path.basename(path)}",
                                     disable=not progress or size < (1 << 20), leave=False) as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue  # blank lines are harmless
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: invalid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
            validate(obj, kind, where)
            yield obj


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: tokenize once into a flat memmap, then cut fixed windows (packing: no padding at all)
# ---------------------------------------------------------------------------------------------------------------
def cache_dir() -> str:
    return os.environ.get("MINIMIND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minimind"))


def pretokenize(path: str, tokenizer: Tokenizer, batch_lines: int = 1024) -> np.ndarray:
    """Token stream of a pretrain JSONL: [bos] text [eos] per document, concatenated. Cached as a .bin memmap.

    The cache key covers the file (path, size, mtime) and the tokenizer, so changing either re-tokenizes.
    The file is written to a temp name and renamed: an interrupted run never leaves a half-written cache.
    """
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{tokenizer.fingerprint()}"
                       .encode()).hexdigest()[:16]
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    out = os.path.join(cache_dir(), f"{os.path.basename(path)}.{key}.{np.dtype(dtype).name}.bin")
    if not os.path.exists(out):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                batch = []

                def flush():
                    for ids in tokenizer.encode_batch(batch):
                        np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype).tofile(f)
                    batch.clear()

                for rec in read_jsonl(path, "pretrain"):
                    batch.append(rec["text"])
                    if len(batch) == batch_lines:
                        flush()
                flush()
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return np.memmap(out, dtype=dtype, mode="r")


class PackedWindows:
    """Consecutive windows of seq_len+1 tokens over the stream: x = w[:-1], y = w[1:].

    Window i starts at i*seq_len, so windows tile the stream with no gap and no padding (the last token of one
    window is the first of the next, used only as a target there).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"only {len(tokens)} tokens: fewer than one window of --max_seq_len {seq_len}")

    def __len__(self):
        return self.n

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        w = np.stack([np.asarray(self.tokens[i * T:i * T + T + 1], dtype=np.int64) for i in indices])
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# SFT and DPO: render conversations to ids + assistant-only labels
# ---------------------------------------------------------------------------------------------------------------
def sft_example(tokenizer: Tokenizer, messages: list[dict], max_seq_len: int, last_reply_only: bool = False):
    """(input ids, targets) for one conversation, or None if nothing supervised survives truncation.

    targets[t] = ids[t+1] where token t+1 is part of an assistant reply, else -100 (no loss on prompts).
    Truncation keeps the first max_seq_len+1 tokens; a reply cut at the end still trains on its first part.
    last_reply_only: supervise only the final reply (DPO: earlier turns are part of the prompt).
    """
    ids, mask = tokenizer.render_chat(messages, last_reply_only=last_reply_only)
    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if all(t == IGNORE for t in targets):
        return None
    return ids[:-1], targets


@dataclass
class Example:
    ids: list[int]
    targets: list[int]


def load_sft(path: str, tokenizer: Tokenizer, max_seq_len: int) -> tuple[list[Example], int]:
    """All SFT examples of a file, and how many were dropped because no reply fit in max_seq_len."""
    examples, dropped = [], 0
    for rec in tqdm(read_jsonl(path, "sft", progress=False), desc=f"tokenize {os.path.basename(path)}",
                    unit=" conv", leave=False):
        ex = sft_example(tokenizer, rec["conversations"], max_seq_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(Example(*ex))
    if not examples:
        raise DataError(f"{path}: no usable conversation (is --max_seq_len {max_seq_len} too small?)")
    return examples, dropped


def load_dpo(path: str, tokenizer: Tokenizer, max_seq_len: int) -> tuple[list[tuple[Example, Example]], int]:
    """(chosen, rejected) example pairs; a pair is dropped if either side has nothing supervised left."""
    pairs, dropped = [], 0
    for rec in tqdm(read_jsonl(path, "dpo", progress=False), desc=f"tokenize {os.path.basename(path)}",
                    unit=" pair", leave=False):
        c = sft_example(tokenizer, rec["chosen"], max_seq_len, last_reply_only=True)
        r = sft_example(tokenizer, rec["rejected"], max_seq_len, last_reply_only=True)
        if c is None or r is None:
            dropped += 1
        else:
            pairs.append((Example(*c), Example(*r)))
    if not pairs:
        raise DataError(f"{path}: no usable pair (is --max_seq_len {max_seq_len} too small?)")
    return pairs, dropped


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example in the batch (not to max_seq_len): pads get target -100."""
    T = max(len(e.ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, :len(e.ids)] = torch.tensor(e.ids)
        y[i, :len(e.targets)] = torch.tensor(e.targets)
    return x, y


# ---------------------------------------------------------------------------------------------------------------
# Batch addressing: (epoch, step) -> sample indices for this rank
# ---------------------------------------------------------------------------------------------------------------
class Sampler:
    """Shuffled, sharded, resumable: each epoch is a seeded permutation; step s of rank r takes a fixed slice.

    With world ranks and micro-batch b, one optimizer step consumes accumulation * world * b samples; rank r
    takes micro-batch m at offset ((step * accumulation + m) * world + r) * b of the epoch's permutation.
    """

    def __init__(self, n: int, batch_size: int, accumulation: int = 1, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.b, self.accum, self.world, self.rank = n, batch_size, accumulation, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = n // (batch_size * accumulation * world)
        if self.steps_per_epoch < 1:
            raise DataError(f"{n} samples are fewer than one optimizer step needs "
                            f"(batch_size {batch_size} x accumulation_steps {accumulation} x {world} ranks); "
                            f"lower --batch_size or --accumulation_steps")
        self._perm_epoch, self._perm = None, None

    def indices(self, epoch: int, step: int, micro: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = epoch
        start = ((step * self.accum + micro) * self.world + self.rank) * self.b
        return self._perm[start:start + self.b]


class Prefetcher:
    """Builds upcoming batches on a background thread so the model never waits for the data."""

    def __init__(self, make_batch, keys, device, depth: int = 4):
        self.queue: Queue = Queue(maxsize=depth)
        self.device = device
        pin = torch.device(device).type == "cuda"

        def work():
            for key in keys:
                batch = make_batch(*key)
                if pin:
                    batch = tuple(t.pin_memory() for t in batch)
                self.queue.put(batch)
            self.queue.put(None)

        threading.Thread(target=work, daemon=True).start()

    def __iter__(self):
        while (batch := self.queue.get()) is not None:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)
