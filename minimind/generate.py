"""Text generation: prefill the prompts once, then decode one token per step against a preallocated KV cache.

Bottom up:
  SamplingParams   temperature / top-k / top-p / repetition penalty / max tokens / stop ids / seed of one request
  sample()         picks the next token of every row, each row with its own settings (0 temperature = greedy)
  SlotCache        the static KV cache; every row ("slot") has its own write column, so rows join and leave freely
  Engine           slots decoded together: add() prefills prompts into free slots, step() decodes one token for
                   every busy slot, release() frees one. On CUDA the decode step is replayed as a CUDA graph.
  generate()       prompts (token ids) -> completions, batched, with more prompts than slots if you like
  TextStream       token ids -> text pieces that never split a multi-byte character, cut at stop strings
  stream_chat()    a conversation -> the assistant's reply as streamed text pieces
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .model import AttentionMask, KVCache, MiniMindForCausalLM
from .tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How one request picks its tokens. The defaults are greedy decoding with no limit but max_new_tokens."""
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy (argmax); 1 = the model's own distribution
    top_k: int = 0                    # keep only the k most likely tokens (0 = all)
    top_p: float = 1.0                # nucleus: keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0   # > 1 makes tokens already in the prompt or reply less likely (CTRL-style)
    stop_ids: tuple[int, ...] = ()    # generation ends when one of these is sampled (it is not returned)
    seed: int | None = None           # a private random stream for this request: same seed, same reply

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 <= self.top_k < 2**62:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.stop_ids = tuple(self.stop_ids)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token per row. logits (B, V); temperature, top_p (B,) float; top_k (B,) long (0 = off).

    Rows with temperature 0 take the argmax. The others: divide by the temperature, drop tokens outside the top-k
    and outside the top-p nucleus (Hugging Face's order), then draw from what is left. The draw is the
    "exponential race": argmax(p / E) with E ~ Exp(1) picks token i with probability p_i, and lets every row take
    its noise from its own generator, so a seeded request gets the same tokens whatever else shares the batch.
    """
    greedy = temperature <= 0
    best = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return best
    B, V = logits.shape
    scaled = logits.float() / torch.where(greedy, 1.0, temperature.float())[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))       # top-k
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                                          # mass of better tokens
    outside = (mass_before >= top_p[:, None].float()) & (top_p[:, None] < 1)            # top-p (nucleus)
    probs = probs.masked_fill(outside, 0.0)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators or ()):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    picked = order.gather(-1, (probs / noise.clamp_(min=1e-20)).argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(greedy, best, picked)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: where seen (B, V) is True, divide positive logits by the penalty and multiply negative ones."""
    penalty = penalty.to(logits.dtype)[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


# ---------------------------------------------------------------------------------------------------------------
# Weight-only int8 for CPU decoding
# ---------------------------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8, one scale per output row (max |w| / 127). Inference only.

    Decoding one token at a time reads every weight once per step, so a CPU is limited by memory traffic, not
    arithmetic: int8 moves 4x fewer bytes than fp32 (measured in bench/README.md). The matmul takes bf16 input
    (PyTorch's int8 kernel is fast only for that); everything around it (norms, RoPE, attention, the KV cache)
    stays fp32, where CPU attention kernels are fastest.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scale.dtype).contiguous(), self.weight,
                                      self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """In place: every Linear (the output head too) becomes an Int8Linear; the rest stays as it is (fp32 on a
    CPU). CPU, inference only."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 weight-only quantization is a CPU option (on a GPU use bf16)")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------------
# The engine: a static KV cache whose rows are independent slots
# ---------------------------------------------------------------------------------------------------------------
class SlotCache(KVCache):
    """KVCache where row b writes its next token at its own column `col[b]`, and attention reads a fixed number of
    columns (`view`) with a validity mask. Every decode step then has the same shapes, and the write position is a
    tensor, not a Python int: that is what a CUDA graph (or torch.compile without recompiles) needs."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_len, device, dtype)
        self.col = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)
        self.view = max_len               # columns attention reads
        self.n = batch_size               # rows computed (the eager path skips idle slots at the end)
        self.lockstep: int | None = None  # eager path, all rows at this same column: a plain slice write is cheaper

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (n, kv_heads, 1, head_dim): row b goes to column col[b]; return the first `view` columns."""
        n = self.n
        if self.lockstep is not None:
            self.k[layer, :n, :, self.lockstep] = k[:, :, 0]
            self.v[layer, :n, :, self.lockstep] = v[:, :, 0]
        else:
            self.k[layer][self.rows[:n], :, self.col[:n]] = k[:, :, 0]     # index_put: no host sync, capturable
            self.v[layer][self.rows[:n], :, self.col[:n]] = v[:, :, 0]
        return self.k[layer, :n, :, :self.view], self.v[layer, :n, :, :self.view]


@dataclass
class _Slot:
    params: SamplingParams
    stop_ids: frozenset
    generator: torch.Generator | None
    start: int            # first cache column holding a real token (> 0 when the prompt was left-padded)
    col: int              # the column the next decode step writes (mirrors SlotCache.col without a device sync)
    prompt_len: int
    new_tokens: int = 0


@dataclass
class Event:
    """What one step produced for one slot: a token (None when the step ended the row on a stop id) and, when the
    row is done, why: 'stop' (a stop id) or 'length' (max_new_tokens or the cache is full)."""
    slot: int
    token: int | None
    finish_reason: str | None = None


class Engine:
    """Rows ("slots") of a static KV cache decoded together.

    add(prompts, params) prefills new prompts into free slots in one left-padded batch and returns each one's first
    token; step() decodes one token for every busy slot; finished rows free their slot at once, so new requests can
    join while others are mid-reply (continuous batching). RoPE positions are per row (its own token count), cache
    columns are just storage, so a row's position never depends on the others.

    Decode paths: CPU (default) computes only the slots up to the last busy one (new requests take the lowest free
    slot), attends over the columns in use (`view` = longest row), and with no padding passes no mask at all
    (SDPA's fastest path). CUDA (default): the step is captured once per view bucket (powers of
    two) as a CUDA graph and replayed: one launch per token instead of hundreds. `static=True` forces the
    graph's fixed-shape step without capturing (this is how the CPU tests check the graph path's maths).
    `compile=True` runs the step through torch.compile (kernel fusion) first.
    """

    def __init__(self, model: MiniMindForCausalLM, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 static: bool | None = None, compile: bool = False):
        self.model = model.eval()
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch_size, self.max_len = batch_size, min(max_len, cfg.max_position_embeddings)
        if batch_size < 1 or self.max_len < 1:
            raise ValueError(f"Engine needs batch_size >= 1 and max_len >= 1 (got {batch_size}, {max_len})")
        # MoE routing reads expert counts on the host (a sync), which a CUDA graph cannot contain.
        self.cuda_graph = (self.device.type == "cuda" and not cfg.use_moe) if cuda_graph is None else cuda_graph
        self.static = self.cuda_graph if static is None else static or self.cuda_graph
        dev, B = self.device, batch_size
        with torch.inference_mode(False):  # plain tensors: they are updated in place from inference mode
            self.cache = SlotCache(cfg, B, self.max_len, dev, self.dtype)
            self.valid = torch.zeros(B, self.max_len, dtype=torch.bool, device=dev)  # columns holding real tokens
            self.true = torch.ones((), dtype=torch.bool, device=dev)  # (a device tensor: no host copy in a graph)
            self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)            # what each row feeds next
            self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)         # ... and its RoPE position
            self.busy = torch.zeros(B, dtype=torch.long, device=dev)                 # 1 = slot in use
            self.seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=dev)  # for repetition penalty
            self.temperature = torch.zeros(B, device=dev)
            self.top_k = torch.zeros(B, dtype=torch.long, device=dev)
            self.top_p = torch.ones(B, device=dev)
            self.penalty = torch.ones(B, device=dev)
        self.slots: list[_Slot | None] = [None] * B
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._step = torch.compile(self._forward_step, dynamic=False) if compile else self._forward_step

    # --- bookkeeping --------------------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def release(self, slot: int) -> None:
        """Free a slot (finished, or its client went away). Its stale cache columns are masked out on reuse."""
        if self.slots[slot] is not None:
            self.slots[slot] = None
            self.busy[slot] = 0
            self.cache.col[slot] = 0       # idle rows keep writing garbage somewhere harmless
            self.positions[slot] = 0

    # --- prefill ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Event]:
        """Prefill prompts into free slots (one forward, left-padded); returns each prompt's first Event, in order."""
        free = self.free_slots()
        if len(prompts) > len(free):
            raise ValueError(f"{len(prompts)} prompts but only {len(free)} free slots")
        if not prompts:
            return []
        lengths = [len(p) for p in prompts]
        P, n = max(lengths), len(prompts)
        if min(lengths) < 1:
            raise ValueError("a prompt must have at least one token")
        if P > self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit the cache ({self.max_len} positions)")
        slots = free[:n]
        rows = torch.tensor(slots, device=self.device)
        ids = torch.zeros(n, P, dtype=torch.long)
        attn = torch.zeros(n, P, dtype=torch.long)
        for i, p in enumerate(prompts):   # left padding: every prompt ends at column P-1
            ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
            attn[i, P - len(p):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        padded = min(lengths) != P
        position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)     # each row counts its own tokens from 0
        tmp = KVCache(self.model.config, n, P, self.device, self.dtype)
        logits = self.model(ids, cache=tmp, attention_mask=attn if padded else None, position_ids=position_ids,
                            logits_to_keep=1)[:, -1]
        self.cache.k[:, rows, :, :P] = tmp.k
        self.cache.v[:, rows, :, :P] = tmp.v
        self.valid[rows] = False
        self.valid[rows, :P] = attn.bool()
        self.cache.col[rows] = P
        self.positions[rows, 0] = torch.tensor(lengths, device=self.device)
        self.busy[rows] = 1
        seen = torch.zeros(n, self.seen.shape[1], device=self.device).scatter_add_(1, ids, attn.float())
        self.seen[rows] = seen > 0
        for i, (slot, sp) in enumerate(zip(slots, params)):
            gen = None
            if sp.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(sp.seed)
            self.slots[slot] = _Slot(sp, frozenset(sp.stop_ids), gen, start=P - lengths[i], col=P,
                                     prompt_len=lengths[i])
            self.temperature[slot], self.top_k[slot] = sp.temperature, sp.top_k
            self.top_p[slot], self.penalty[slot] = sp.top_p, sp.repetition_penalty
        # A request for zero new tokens finishes at once.
        events = [Event(s, None, "length") for s in slots if self.slots[s].params.max_new_tokens == 0]
        for e in events:
            self.release(e.slot)
        live = [s for s in slots if self.slots[s] is not None]
        idx = torch.tensor([slots.index(s) for s in live], device=self.device)
        events += self._pick(logits[idx] if len(live) < n else logits, live) if live else []
        order = {s: i for i, s in enumerate(slots)}
        return sorted(events, key=lambda e: order[e.slot])

    # --- decode -------------------------------------------------------------------------------------------
    def _forward_step(self, view: int, masked: bool, n: int | None = None) -> torch.Tensor:
        """One token for each of the first n rows (all by default), against the first `view` cache columns:
        (n, V) logits.

        The same Decoder.forward as training runs, but the positions, the write column and the mask are tensors
        that live in the engine, so a captured graph can be replayed with new values.
        """
        m, c = self.model, self.cache
        n = n or self.batch_size
        c.view, c.n = view, n
        if masked:
            self.valid.index_put_((c.rows[:n], c.col[:n]), self.true)   # each row may see its own new token
        mask = AttentionMask.padded(self.valid[:n, None, None, :view]) if masked else AttentionMask.causal()
        x, _ = m.model(self.tokens[:n], self.positions[:n], mask, self.cache)
        return m.lm_head(x)[:, -1]

    def _graph_step(self, view: int) -> torch.Tensor:
        """Replay the CUDA graph for this view size, capturing it the first time. The warm-up runs repeat the
        very step about to be taken (same inputs, same cache column), so they change nothing."""
        if view not in self.graphs:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(view, True)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(view, True)
            self.graphs[view] = (graph, out)
        graph, out = self.graphs[view]
        graph.replay()
        return out

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Decode one token for every busy slot."""
        live = self.active()
        if not live:
            return []
        need = max(self.slots[s].col for s in live) + 1
        if self.static:  # fixed shapes: a few view buckets so short replies do not attend over the whole cache
            view = min(self.max_len, max(64, 1 << (need - 1).bit_length()))
            logits = self._graph_step(view) if self.cuda_graph else self._step(view, True)
        else:
            n = live[-1] + 1                        # idle slots after the last busy one cost nothing
            cols = {self.slots[s].col for s in live}
            dense = len(cols) == 1 and all(self.slots[s].start == 0 for s in live)
            self.cache.lockstep = need - 1 if dense else None
            logits = self._step(need, not dense, n)   # no padding and rows in lockstep: plain attention, no mask
            self.cache.lockstep = None
        self.cache.col += self.busy
        self.positions[:, 0] += self.busy
        for s in live:
            self.slots[s].col += 1
        return self._pick(logits if len(live) == logits.shape[0] else logits[live], live)

    def _pick(self, logits: torch.Tensor, live: list[int]) -> list[Event]:
        """Sample the next token of the rows `live` (logits has one row each) and update their state."""
        rows = None if len(live) == self.batch_size else torch.tensor(live, device=self.device)
        sel = (lambda t: t[rows]) if rows is not None else (lambda t: t)
        penalty = sel(self.penalty)
        if bool((penalty != 1).any()):
            logits = apply_repetition_penalty(logits, sel(self.seen), penalty)
        gens = [self.slots[s].generator for s in live]
        toks = sample(logits, sel(self.temperature), sel(self.top_k), sel(self.top_p),
                      gens if any(g is not None for g in gens) else None)
        if rows is None:
            self.tokens[:, 0] = toks
            self.seen[self.cache.rows, toks] = True
        else:
            self.tokens[rows, 0] = toks
            self.seen[rows, toks] = True
        events = []
        for s, tok in zip(live, toks.tolist()):   # the one host sync per step
            slot = self.slots[s]
            if tok in slot.stop_ids:
                events.append(Event(s, None, "stop"))
            else:
                slot.new_tokens += 1
                done = slot.new_tokens >= slot.params.max_new_tokens or slot.col >= self.max_len
                events.append(Event(s, tok, "length" if done else None))
            if events[-1].finish_reason:
                self.release(s)
        return events


# ---------------------------------------------------------------------------------------------------------------
# Batched generation on top of the engine
# ---------------------------------------------------------------------------------------------------------------
def _params_list(n: int, params: SamplingParams | Sequence[SamplingParams] | None, sampling: dict):
    if params is None:
        seed = sampling.pop("seed", None)
        # One private stream per prompt (seed, seed+1, ...): a prompt's sample does not depend on its batch.
        return [SamplingParams(**sampling, seed=None if seed is None else seed + i) for i in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} SamplingParams")
    return list(params)


@torch.inference_mode()
def generate_stream(model: MiniMindForCausalLM, prompts: Sequence[Sequence[int]],
                    params: SamplingParams | Sequence[SamplingParams] | None = None, batch_size: int | None = None,
                    cuda_graph: bool | None = None, static: bool | None = None, compile: bool = False,
                    cancelled: set[int] | None = None, **sampling) -> Iterator[tuple[int, int | None, str | None]]:
    """Yield (prompt index, new token or None, finish reason or None) as tokens come out.

    Sampling settings come as `params` or as SamplingParams keywords (max_new_tokens=..., temperature=..., seed=...:
    prompt i then uses seed + i). batch_size: slots decoded together (default: all prompts at once); with fewer
    slots than prompts, a waiting prompt takes the slot of the first one to finish. cancelled: a set the caller
    may add prompt indices to (e.g. a stop string matched): those rows free their slot and yield nothing more.
    """
    if not prompts:
        return
    plist = _params_list(len(prompts), params, dict(sampling))
    slots = max(1, min(batch_size or len(prompts), len(prompts)))
    limit = model.config.max_position_embeddings
    max_len = min(limit, max(len(p) for p in prompts) + max(p.max_new_tokens for p in plist))
    engine = Engine(model, slots, max_len, cuda_graph=cuda_graph, static=static, compile=compile)
    waiting = deque(range(len(prompts)))
    owner: dict[int, int] = {}
    while waiting or owner:
        for slot, i in list(owner.items()):
            if cancelled and i in cancelled:
                engine.release(slot)
                del owner[slot]
        free = engine.free_slots()
        if waiting and free:
            take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
            events = engine.add([prompts[i] for i in take], [plist[i] for i in take])
            for i, e in zip(take, events):
                owner[e.slot] = i
        else:
            events = engine.step()
        for e in events:
            i = owner[e.slot]
            if e.finish_reason:
                del owner[e.slot]
            if not (cancelled and i in cancelled):
                yield i, e.token, e.finish_reason


def generate(model: MiniMindForCausalLM, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, batch_size: int | None = None,
             return_finish_reasons: bool = False, **kwargs):
    """Prompts (lists of token ids) -> the new token ids of each (stop ids excluded), in prompt order."""
    out: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    for i, tok, reason in generate_stream(model, prompts, params, batch_size, **kwargs):
        if tok is not None:
            out[i].append(tok)
        if reason:
            reasons[i] = reason
    return (out, reasons) if return_finish_reasons else out


def generate_ids(model: MiniMindForCausalLM, prompt: Sequence[int], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop_ids: tuple[int, ...] = (), seed: int | None = None, **engine_kw) -> Iterator[int]:
    """Yield the new token ids of one prompt, one by one, until a stop id (not yielded) or max_new_tokens."""
    sp = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids, seed)
    for _, tok, _ in generate_stream(model, [list(prompt)], sp, **engine_kw):
        if tok is not None:
            yield tok


# ---------------------------------------------------------------------------------------------------------------
# Token ids -> text
# ---------------------------------------------------------------------------------------------------------------
class TextStream:
    """Turns a stream of token ids into text pieces: never splits a multi-byte character, and cuts the text at the
    first stop string (which is not returned), holding back any tail that could be the start of one."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop if s]
        self.pending: list[int] = []   # ids whose text is not out yet (an unfinished UTF-8 character)
        self.held = ""                 # decoded text held back: it may be the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (often '')."""
        if self.stopped:
            return ""
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        # Byte-level BPE: a character can span tokens; U+FFFD at the end means its last bytes have not come yet.
        # (8 tokens without completing one is not a character in progress but invalid bytes: let them through.)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return ""
        self.pending = []
        return self._cut(text)

    def _cut(self, text: str) -> str:
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out
        keep = 0   # the longest tail of `held` that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        """The generation ended: return whatever is still held back."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        out = self._cut(text)
        if not self.stopped:
            out, self.held = out + self.held, ""
        return out


def stream_text(model, tokenizer: Tokenizer, prompt: Sequence[int], stop: Sequence[str] = (),
                stop_ids: tuple[int, ...] | None = None, **sampling) -> Iterator[str]:
    """Generate from token ids and yield the text as it comes (stops at <|im_end|>/<|endoftext|> by default)."""
    stream = TextStream(tokenizer, stop)
    stops = (tokenizer.eos_id, tokenizer.pad_id) if stop_ids is None else stop_ids
    for tok in generate_ids(model, prompt, stop_ids=stops, **sampling):
        piece = stream.push(tok)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.flush()
    if tail:
        yield tail


def stream_chat(model, tokenizer: Tokenizer, messages: list[dict], stop: Sequence[str] = (), tools=None,
                thinking: bool | None = None, **sampling) -> Iterator[str]:
    """Render the conversation, generate the assistant's reply, and yield it as text pieces. tools / thinking go
    to the chat template (render_chat); tools.py parses the reply's think block and tool calls."""
    prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools, thinking=thinking)
    yield from stream_text(model, tokenizer, prompt, stop, **sampling)


def complete_chats(model, tokenizer: Tokenizer, conversations: Sequence[list[dict]], stop: Sequence[str] = (),
                   batch_size: int = 16, tools=None, thinking: bool | None = None, **sampling) -> list[str]:
    """The assistant's reply to each conversation, generated in batches (evaluation, fixed prompts); tools and
    thinking as in stream_chat (the same for every conversation)."""
    prompts = [tokenizer.render_chat(c, add_generation_prompt=True, tools=tools, thinking=thinking)[0]
               for c in conversations]
    sampling.setdefault("stop_ids", (tokenizer.eos_id, tokenizer.pad_id))
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    done: set[int] = set()
    for i, tok, reason in generate_stream(model, prompts, batch_size=batch_size, cancelled=done, **sampling):
        if tok is not None:
            texts[i].append(streams[i].push(tok))
        if streams[i].stopped:
            done.add(i)          # a stop string matched: free the slot now
        elif reason:
            texts[i].append(streams[i].flush())
    return ["".join(t) for t in texts]
