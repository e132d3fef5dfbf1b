"""Data: read and validate MiniMind's JSONL formats, pre-tokenize once, and serve batches.

Formats (one JSON object per line):
  pretrain  {"text": str}
  sft       {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
  dpo       {"chosen": [messages...], "rejected": [messages...]}
Messages may carry MiniMind-3's fields: `tools` (system turn), `tool_calls` and `reasoning_content` (assistant
turns); tokenizer.check_chat says what is accepted, docs/en/thinking_tools.md how they are rendered.

Every batch is addressed by (epoch, step): the same (epoch, step) always gives the same batch, on any rank.
That makes exact resume a matter of remembering two integers, and DDP sharding a matter of arithmetic.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from queue import Queue

import numpy as np
import torch
from tqdm import tqdm

from .errors import DataError, UsageError
from .jsonio import check_file, json_lines
from .loss import IGNORE
from .tokenizer import END_THINK, ROLES, Tokenizer, check_chat, fold_reasoning, split_reasoning




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
            hint = ' (use "" for an assistant turn whose work is in tool_calls)' if m["content"] is None else ""
            raise DataError(f"{where}: {field}[{i}] content must be a string{hint}")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise DataError(f"{where}: {field}[{i}] reasoning_content must be a string")
        # An SFT reply with nothing in it teaches the model to answer nothing (e.g. a tool-call turn whose
        # tool_calls a converter lost). DPO keeps empty replies: a rejected empty answer is a real signal.
        if (field == "conversations" and m["role"] == "assistant" and not m["content"].strip()
                and not m.get("tool_calls") and not m.get("reasoning_content")):
            raise DataError(f"{where}: {field}[{i}] is an assistant turn with no content, tool_calls or "
                            f"reasoning_content: nothing to learn; fill it in or drop the turn")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: '{field}' has no assistant turn to learn from")
    try:  # tools, tool_calls, tool turns: anything the chat templates cannot write faithfully (tokenizer.py)
        check_chat(msgs, name=field)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


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


def read_jsonl(path: str, kind: str, progress: bool = True, with_lines: bool = False):
    """Yield validated records from a JSONL file; stop with DataError('FILE:LINE: ...') on the first bad line.

    with_lines: yield (line number, raw line bytes, record) instead, for tools that copy lines unchanged.
    """
    check_file(path)
    size, records = os.path.getsize(path), 0
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"read {os.path.basename(path)}",
              disable=not progress or size < (1 << 20), leave=False) as bar:
        for lineno, raw, obj in json_lines(path):
            bar.update(len(raw))
            where = f"{path}:{lineno}"
            validate(obj, kind, where)
            records += 1
            yield (lineno, raw, obj) if with_lines else obj
    if records == 0:
        raise DataError(f"{path}: no records: the file is empty or has only blank lines (expected one JSON "
                        f"object per line)")



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
    check_file(path)
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{tokenizer.fingerprint()}"
                       .encode()).hexdigest()[:16]
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    out = os.path.join(cache_dir(), f"{os.path.basename(path)}.{key}.{np.dtype(dtype).name}.bin")
    if not os.path.exists(out):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared cache directory must be readable by others
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
    window is the first of the next, used only as a target there). With bos_id, get() also returns doc_ids (a
    new document at every BOS), so the model keeps attention inside each document, as MiniMind's one-document rows do.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, bos_id: int | None = None):
        self.tokens, self.seq_len, self.bos_id = tokens, seq_len, bos_id
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"only {len(tokens)} tokens: fewer than one window of --max_seq_len {seq_len}")

    def __len__(self):
        return self.n

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        w = np.stack([np.asarray(self.tokens[i * T:i * T + T + 1], dtype=np.int64) for i in indices])
        w = torch.from_numpy(w)
        x, y = w[:, :-1], w[:, 1:]
        if self.bos_id is None:
            return x, y
        return x, y, torch.cumsum(x == self.bos_id, dim=1)   # doc_ids: the tail of an earlier document is 0

    def mean_document(self, eos_id: int) -> float:
        """Mean tokens of a document as MiniMind's trainer sees it: one document per padded row, cut at seq_len
        (measured on the first 10M tokens; 0.0 if no document ends there)."""
        ends = np.flatnonzero(np.asarray(self.tokens[:10_000_000]) == eos_id)
        return float(np.minimum(np.diff(ends, prepend=-1), self.seq_len).mean()) if len(ends) else 0.0

    def rows_for_documents(self, documents: int, mean: float) -> int:
        """Windows that carry as many real tokens as `documents` of MiniMind's padded rows of `mean` tokens
        (mean_document): its --batch_size counts documents, and a packed window holds several short ones (poetry:
        2.7), so the same number of windows would be 2.7x the tokens and 2.7x fewer steps per epoch (issue 11)."""
        return max(1, min(documents, round(documents * (mean or self.seq_len) / self.seq_len)))


# ---------------------------------------------------------------------------------------------------------------
# SFT and DPO: render conversations to ids + assistant-only labels
# ---------------------------------------------------------------------------------------------------------------
REASONING = ("keep", "drop")


def with_reasoning(messages: list[dict], reasoning: str = "keep") -> list[dict]:
    """The assistant turns' reasoning kept in the text, or dropped.

    keep: each `reasoning_content` folded into its reply as one think block (tokenizer.fold_reasoning),
          <think>\n{reasoning}\n</think>\n\n{content}
      the text form, for tools that read a chat as text (datatools). Training renders the record itself: the
      tokenizer's template writes reasoning_content where it belongs (see _render_example).
    drop: reasoning removed, the field and a <think>...</think> block at the start of the content alike
      (tokenizer.split_reasoning): the model learns the answer alone.
    Turns without reasoning are unchanged.
    """
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {REASONING}, got {reasoning!r}")
    out = []
    for m in messages:
        field = m.get("reasoning_content")
        if m["role"] == "assistant" and (isinstance(field, str) or (reasoning == "drop" and END_THINK in m["content"])):
            thought, reply = split_reasoning(m)
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = reply if reasoning == "drop" else fold_reasoning(thought, reply)
        out.append(m)
    return out


def _render_example(tokenizer: Tokenizer, messages: list[dict], max_seq_len: int, last_reply_only: bool,
                    reasoning: str, where: str | None = None):
    """(ids, targets, truncated) or None. See sft_example for the rules. where: FILE:LINE for errors."""
    try:
        # keep: the record as it is, so the ids are exactly what the tokenizer's own template makes of it
        kept = messages if reasoning == "keep" else with_reasoning(messages, reasoning)
        ids, mask = tokenizer.render_chat(kept, last_reply_only=last_reply_only)
    except DataError as e:  # e.g. tool calls for a tokenizer whose template has no place for them
        if where is None:
            raise
        raise DataError(f"{where}: {e}") from None
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    # Positions after the last supervised target (the '\n' after the final <|im_end|>, a trailing user turn)
    # teach nothing: drop them, so packing spends no window space on them.
    end = len(targets)
    while end and targets[end - 1] == IGNORE:
        end -= 1
    truncated = end > max_seq_len          # some supervised token lies beyond the window: the reply is cut
    end = min(end, max_seq_len)
    if end == 0 or all(t == IGNORE for t in targets[:end]):
        return None
    return ids[:end], targets[:end], truncated


def sft_example(tokenizer: Tokenizer, messages: list[dict], max_seq_len: int, last_reply_only: bool = False,
                reasoning: str = "keep"):
    """(input ids, targets) for one conversation, or None if nothing supervised survives truncation.

    targets[t] = ids[t+1] where token t+1 is part of an assistant reply (its <|im_end|> included), else -100.
    Truncation policy: a conversation longer than max_seq_len is cut at the END: the last reply loses its tail
    and its <|im_end|> (callers count these: Example.truncated); one with no supervised token left is dropped.
    last_reply_only: supervise only the final reply (DPO: earlier turns are part of the prompt).
    reasoning: 'keep' or 'drop' the assistant turns' `reasoning_content` (see with_reasoning).
    """
    ex = _render_example(tokenizer, messages, max_seq_len, last_reply_only, reasoning)
    return None if ex is None else ex[:2]


@dataclass
class Example:
    ids: list[int]
    targets: list[int]
    truncated: bool = False  # the conversation was longer than max_seq_len and lost supervised tokens


def _numbered(path: str, kind: str, reader=None):
    """(where, record) pairs: FILE:LINE from read_jsonl; 'FILE: record N' from another reader (whose records need
    not be lines of the file)."""
    if reader is None:
        for lineno, _, rec in read_jsonl(path, kind, progress=False, with_lines=True):
            yield f"{path}:{lineno}", rec
    elif getattr(reader, "yields_lines", False):   # e.g. formats.make_reader: converted records keep their line
        for lineno, rec in reader(path, kind, progress=False, with_lines=True):
            yield f"{path}:{lineno}", rec
    else:
        for k, rec in enumerate(reader(path, kind, progress=False), 1):
            yield f"{path}: record {k}", rec


def load_sft(path: str, tokenizer: Tokenizer, max_seq_len: int, reasoning: str = "keep",
             reader=None) -> tuple[list[Example], int]:
    """All SFT examples of a file, and how many were dropped because no reply fit in max_seq_len.

    Examples cut at max_seq_len (reply tail lost) are kept and flagged: sum(e.truncated for e in examples).
    reader: reader(path, kind, progress=...) yielding validated records, in place of read_jsonl; e.g.
    minimind.formats.record_reader converts alpaca/sharegpt/column files on the fly.
    """
    examples, dropped = [], 0
    for where, rec in tqdm(_numbered(path, "sft", reader), desc=f"tokenize {os.path.basename(path)}",
                           unit=" conv", leave=False):
        ex = _render_example(tokenizer, rec["conversations"], max_seq_len, False, reasoning, where)
        if ex is None:
            dropped += 1
        else:
            examples.append(Example(*ex))
    if not examples:
        raise DataError(f"{path}: no usable conversation (is --max_seq_len {max_seq_len} too small?)")
    return examples, dropped


def load_dpo(path: str, tokenizer: Tokenizer, max_seq_len: int, reasoning: str = "keep",
             reader=None) -> tuple[list[tuple[Example, Example]], int]:
    """(chosen, rejected) example pairs; a pair is dropped if either side has nothing supervised left.

    reader: as in load_sft (records converted on the fly from another format)."""
    pairs, dropped = [], 0
    for where, rec in tqdm(_numbered(path, "dpo", reader), desc=f"tokenize {os.path.basename(path)}",
                           unit=" pair", leave=False):
        c = _render_example(tokenizer, rec["chosen"], max_seq_len, True, reasoning, where)
        r = _render_example(tokenizer, rec["rejected"], max_seq_len, True, reasoning, where)
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
# SFT without padding waste: pack conversations into windows (document masking), or group by length
# ---------------------------------------------------------------------------------------------------------------
def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: item indices grouped into bins whose lengths sum to <= capacity.

    Longest items first; each goes into the open bin with the LEAST room that still fits it (a new bin if none).
    Deterministic (ties broken by index). Open bins are kept in buckets keyed by their room, with a sorted list of
    the rooms present, so each item costs one binary search: a million conversations pack in seconds.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}    # room left -> open bins with exactly that room
    rooms: list[int] = []                 # sorted rooms that have at least one open bin
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):                # best fit: the tightest bin that still has room
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:                             # nothing fits: open a new bin
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        room -= n
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            by_room[room].append(b)
    return bins


class PackedConversations:
    """--packing 1: conversations packed into fixed windows of seq_len tokens, packed once, shuffled by Sampler.

    get(window indices) -> (x, y, doc_ids), each (B, seq_len). doc_ids numbers the conversations inside a window
    (0, 1, 2, ...; -1 on the padding left at its end). The model turns doc_ids into document masking (a token
    attends only to earlier tokens of ITS conversation) and positions that restart at 0 per conversation, so each
    conversation is computed exactly as if it were alone. Targets come from each conversation on its own: a
    conversation's last token never predicts the next conversation's first.
    """

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.windows = pack([len(e.ids) for e in examples], seq_len)

    def __len__(self):
        return len(self.windows)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T = len(indices), self.seq_len
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), IGNORE, dtype=np.int64)
        doc = np.full((B, T), -1, dtype=np.int64)
        for row, w in enumerate(indices):
            pos = 0
            for d, i in enumerate(self.windows[w]):
                e = self.examples[i]
                n = len(e.ids)
                x[row, pos:pos + n] = e.ids
                y[row, pos:pos + n] = e.targets
                doc[row, pos:pos + n] = d
                pos += n
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(doc)

    def stats(self) -> dict:
        """Share of window positions that hold real tokens / supervised targets."""
        cells = len(self.windows) * self.seq_len
        real = sum(len(e.ids) for e in self.examples)
        supervised = sum(sum(t != IGNORE for t in e.targets) for e in self.examples)
        return {"windows": len(self.windows), "real": real / cells, "supervised": supervised / cells}


class LengthGroupedBatches:
    """--packing 0: batches of conversations of similar length, each padded only to its own longest.

    Groups are fixed (sorted by length, cut every batch_size), and Sampler shuffles their order per epoch:
    address group g with Sampler(len(groups), 1, ...). get([g, ...]) -> (x, y) padded on the right.
    """

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int):
        self.examples, self.pad_id = examples, pad_id
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i].ids), i))
        self.groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def __len__(self):
        return len(self.groups)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch([self.examples[i] for g in indices for i in self.groups[g]], self.pad_id)

    def stats(self) -> dict:
        cells = sum(len(g) * max(len(self.examples[i].ids) for i in g) for g in self.groups)
        real = sum(len(e.ids) for e in self.examples)
        supervised = sum(sum(t != IGNORE for t in e.targets) for e in self.examples)
        return {"batches": len(self.groups), "real": real / cells, "supervised": supervised / cells}


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


def step_batches(get, sampler: Sampler, start: int, steps: int, device):
    """(step, micro_batches) for every optimizer step from `start` to `steps`, in order.

    get(indices) -> batch (a tuple of tensors) builds one micro-batch; the sampler says which indices each
    (epoch, step, micro) takes, so a resumed run sees exactly the batches an uninterrupted one would. Batches are
    built ahead on a background thread (Prefetcher) and arrive on `device`.
    """
    spe, accum = sampler.steps_per_epoch, sampler.accum
    keys = [(s, m) for s in range(start, steps) for m in range(accum)]
    batches = iter(Prefetcher(lambda s, m: get(sampler.indices(s // spe, s % spe, m)), keys, device))
    for step in range(start, steps):
        yield step, [next(batches) for _ in range(accum)]


# ---------------------------------------------------------------------------------------------------------------
# Held-out data for --eval_interval
# ---------------------------------------------------------------------------------------------------------------
def holdout(n: int, val_ratio: float, enabled: bool, min_val: int = 1) -> int:
    """How many of n samples to hold out for validation (the last ones). 0 when evaluation is off."""
    if not enabled:
        return 0
    if not 0 < val_ratio < 1:
        raise UsageError(f"--val_ratio {val_ratio}: must be between 0 and 1")
    n_val = max(min_val, int(n * val_ratio))
    if n - n_val < 1:
        raise UsageError(f"--val_ratio {val_ratio}: only {n} samples, nothing left to train on")
    return n_val


def batches_over(get, start: int, stop: int, batch_size: int, limit: int) -> list:
    """The first `limit` batches of samples start..stop-1, in order (held-out batches are never shuffled)."""
    return [get(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)][:limit]


def split_validation(examples: list[Example], n_val: int, batch_size: int, limit: int, pad_id: int):
    """(training examples, held-out batches): the last n_val conversations, padded, at most `limit` batches."""
    train, held_out = examples[:len(examples) - n_val], examples[len(examples) - n_val:]
    return train, batches_over(lambda idx: pad_batch([held_out[i] for i in idx], pad_id), 0, n_val, batch_size,
                               limit)


def sft_batches(examples: list[Example], packing: bool, batch_size: int, seq_len: int, pad_id: int):
    """(data, samples per micro-batch) for conversations: packed windows of seq_len (batch_size of them per
    micro-batch), or --packing 0's fixed groups of batch_size similar-length conversations (one group each)."""
    if packing:
        return PackedConversations(examples, seq_len, pad_id), batch_size
    return LengthGroupedBatches(examples, batch_size, pad_id), 1
