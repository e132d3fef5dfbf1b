"""Text generation: prefill the prompt once, then decode one token at a time against the KV cache."""
from __future__ import annotations

from typing import Iterator

import torch

from .model import KVCache, MiniMindForCausalLM
from .tokenizer import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:  # keep only the k most likely tokens
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability adds up to top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # tokens entirely past the nucleus
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: make already-generated tokens less likely (divide positive logits, multiply negative)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


@torch.inference_mode()
def generate_ids(model: MiniMindForCausalLM, prompt: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop_ids: tuple[int, ...] = (), seed: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one until a stop id (not yielded) or max_new_tokens."""
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    max_new_tokens = max(0, min(max_new_tokens, limit - len(prompt)))
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, next(model.parameters()).dtype)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt], device=device)
    seen = ids
    logits = model(ids, cache=cache, logits_to_keep=1)[:, -1]              # prefill: the whole prompt at once
    for _ in range(max_new_tokens):
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        tok = int(nxt)
        if tok in stop_ids:
            return
        yield tok
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        logits = model(nxt[:, None], cache=cache)[:, -1]                  # decode: one token, cache grows by one


class TextStream:
    """Turns a stream of token ids into text pieces, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next bytes
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stream_chat(model, tokenizer: Tokenizer, messages: list[dict], **sampling) -> Iterator[str]:
    """Render the conversation, generate the assistant's reply, and yield it as text pieces."""
    prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    stream = TextStream(tokenizer)
    stops = (tokenizer.eos_id, tokenizer.pad_id)
    for tok in generate_ids(model, prompt, stop_ids=stops, **sampling):
        piece = stream.push(tok)
        if piece:
            yield piece
