"""Reinforcement learning with verifiable rewards: prompts, rollouts, group-relative advantages, GRPO/CISPO loss.

One RL step, bottom up (train_grpo.py runs them in this order):
  load_prompts()      MiniMind's rlaif.jsonl / agent_rl*.jsonl and prompt+answer JSONL -> rendered prompts
  rollout()           num_generations replies per prompt from the batched static-cache Engine (generate.py)
  rollout_turns()     the same, multi-turn: tool calls are run (tools.py) and the model continues (train_agent)
  group_advantages()  GRPO: advantage = (r - mean) / std within each prompt's group of replies
  pack_rollouts()     prompt+reply sequences packed end to end in ONE row, doc_ids per sequence (as SFT packing):
                      attention stays inside each sequence and nothing is padded, so memory grows with real tokens
  reply_logprobs()    log p(token) of the reply tokens only (the head runs on no prompt position)
  policy_loss()       the clipped GRPO or the CISPO objective, + beta * KL(k3) to a frozen reference, token-level
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError
from .generate import SamplingParams, generate
from .jsonio import json_lines
from .loss import IGNORE, token_logprobs
from .tokenizer import Tokenizer, check_chat
from .tools import ToolRegistry, parse_reply


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]                # the rendered prompt, ending with the assistant header (generation prompt)
    messages: list[dict]          # the turns before the reply
    reference: str | None         # the answer to compare with (prompt+answer files, GSM8K '#### 42')
    gt: list | None               # MiniMind agent_rl: values the final reply must contain
    tools: list | None            # tool schemas on the system turn
    think_opened: bool            # the prompt ends inside '<think>\n' (thinking switched on)
    record: dict                  # the JSONL record, for a user's reward function


def _record_prompt(rec, where: str) -> tuple[list[dict], str | None, list | None]:
    """(prompt turns, reference, gt) of one record, in any of the accepted shapes (see load_prompts)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    answer = rec.get("answer", rec.get("reference"))
    if "prompt" in rec or "question" in rec:
        text = rec.get("prompt", rec.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": text}]
    elif "conversations" in rec:
        messages = rec["conversations"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of messages")
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]   # MiniMind's RL files end with the reply slot; the policy writes its own
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") not in ("user", "tool"):
            raise DataError(f"{where}: 'conversations' must end with a user (or tool) turn for the model to answer")
    else:
        raise DataError(f"{where}: expected 'prompt' (+ 'answer') or 'conversations' (+ 'answer' or 'gt'); "
                        f"found keys {sorted(rec)[:6]}")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number")
    gt = rec.get("gt")
    if gt is not None:
        gt = gt if isinstance(gt, list) else [gt]
    return messages, None if answer is None else str(answer), gt


def load_prompts(path: str, tokenizer: Tokenizer, max_prompt_len: int, thinking_ratio: float = 0.0,
                 seed: int = 0, need_reference: bool = True) -> tuple[list[Prompt], int]:
    """Every prompt of an RL file, rendered once; and how many were dropped (longer than max_prompt_len tokens).

    Accepted lines:
      {"prompt": "...", "answer": "..."}               ours (also "question"; GSM8K's "... #### 72" answers)
      {"conversations": [...], "answer": "..."}        a conversation to continue, with its reference
      {"conversations": [... tools on system ...], "gt": [...]}   MiniMind's agent_rl.jsonl / agent_rl_math.jsonl
      {"conversations": [...]}                         MiniMind's rlaif.jsonl: NO answer (MiniMind scores these
                                                       with a reward model): needs --reward module:function
    A trailing assistant turn is the reply slot and is dropped. thinking_ratio: share of prompts rendered with
    thinking on (MiniMind's --thinking_ratio), chosen by a seeded generator so a resumed run renders the same.
    """
    rng = np.random.default_rng(seed)
    prompts, dropped, unanswered = [], 0, None
    for lineno, _, rec in json_lines(path):
        where = f"{path}:{lineno}"
        messages, reference, gt = _record_prompt(rec, where)
        if reference is None and not gt and unanswered is None:
            unanswered = where
        try:
            _, tools = check_chat(messages, name="conversations")
            think = bool(rng.random() < thinking_ratio)
            ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, thinking=think or None)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        think_opened = tokenizer.decode(ids[-4:]).rstrip().endswith("<think>")
        prompts.append(Prompt(ids, messages, reference, gt, tools, think_opened, rec))
    if not prompts:
        raise DataError(f"{path}: no prompt fits --max_seq_len {max_prompt_len} tokens (or the file is empty)")
    if need_reference and unanswered:
        raise DataError(f"{unanswered}: this record has no 'answer' or 'gt' (MiniMind's rlaif.jsonl scores such "
                        f"prompts with a reward model): pass --reward module:function to score replies, or add "
                        f"answers")
    return prompts, dropped


# ---------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """num_generations replies to each prompt, prompt-major: reply i answers prompt i // num_generations."""
    prompt_ids: list[list[int]]
    reply_ids: list[list[int]]     # the sampled tokens, plus the stop token (<|im_end|>) when the reply ended
    texts: list[str]               # the reply as text (stop token not included); multi-turn: the turns joined
    seconds: float                 # wall time of generation (rollout tokens/s = new tokens / seconds)
    new_tokens: int                # tokens the model sampled
    reply_masks: list[list[int]] | None = None   # multi-turn: 1 = the model wrote it, 0 = a tool result


def rollout_seeds(seed: int, step: int, slot: int, n: int) -> list[int]:
    """One sampling seed per reply, a pure function of where it is in the run: a resumed run draws the same.

    slot: the micro-batch's place in the step over all ranks (micro * world + rank, the Sampler's order), so 2
    ranks x 1 micro-batch draw exactly what 1 rank x 2 micro-batches draws for the same prompts."""
    return [int(s) for s in np.random.SeedSequence([seed, step, slot]).generate_state(n, dtype=np.uint64)
            .astype(np.int64) & 0x7FFF_FFFF_FFFF_FFFF]


def rollout(model, tokenizer: Tokenizer, prompts: list[list[int]], num_generations: int, max_gen_len: int,
            temperature: float = 1.0, top_p: float = 1.0, seeds: list[int] | None = None,
            batch_size: int | None = None) -> Rollouts:
    """Sample num_generations replies to every prompt through the batched static-cache Engine.

    The model's own distribution (temperature 1, no top-k) keeps the ratio pi/pi_old meaningful; every reply has
    its own seeded stream, so a reply does not depend on what else shares the batch.
    """
    expanded = [p for p in prompts for _ in range(num_generations)]
    seeds = seeds or [None] * len(expanded)
    params = [SamplingParams(max_new_tokens=max_gen_len, temperature=temperature, top_p=top_p,
                             stop_ids=(tokenizer.eos_id,), seed=s) for s in seeds]
    t0 = time.perf_counter()
    was_training = model.training
    out, reasons = generate(model, expanded, params, batch_size=batch_size, return_finish_reasons=True)
    model.train(was_training)
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(ids) for ids in out]
    # A reply that ended on <|im_end|> is trained on that token too: the policy must learn when to stop.
    replies = [ids + [tokenizer.eos_id] if why == "stop" else ids for ids, why in zip(out, reasons)]
    return Rollouts(expanded, replies, texts, seconds, sum(len(ids) for ids in out))


def rollout_turns(model, tokenizer: Tokenizer, prompts: list[Prompt], num_generations: int, max_gen_len: int,
                  registry: ToolRegistry, max_turns: int, temperature: float = 1.0, top_p: float = 1.0,
                  seeds: list[int] | None = None, batch_size: int | None = None) -> Rollouts:
    """Multi-turn rollouts (MiniMind's train_agent.py): a reply that calls tools gets their results and writes
    the next turn, up to max_turns replies per conversation.

    Token-exact: every turn is generated from the conversation's token ids so far (prompt, the model's own
    sampled tokens, the tool results), and those same ids are what the policy is trained on; nothing is
    re-rendered from text. A tool result enters as the template writes it after an assistant turn (tool turns +
    the next generation prompt) and is masked out of the loss (reply_masks 0). Tools run through `registry`
    (opt-in, tools.py); a call to a tool it lacks gets {"error": ...} back, as at inference.
    """
    G, eos = num_generations, tokenizer.eos_id
    convs = [prompts[i // G] for i in range(len(prompts) * G)]
    seqs = [list(p.ids) for p in convs]                   # each conversation's ids so far
    masks: list[list[int]] = [[] for _ in convs]          # over seqs[i][len(prompt):]
    history = [list(p.messages) for p in convs]           # the same conversation as messages (for the template)
    texts: list[list[str]] = [[] for _ in convs]
    seeds = seeds or [None] * len(convs)
    limit = model.config.max_position_embeddings - max_gen_len
    active, new_tokens, t0 = list(range(len(convs))), 0, time.perf_counter()
    was_training = model.training
    for turn in range(max_turns):
        params = [SamplingParams(max_new_tokens=max_gen_len, temperature=temperature, top_p=top_p, stop_ids=(eos,),
                                 seed=None if seeds[i] is None else (seeds[i] + 7919 * turn) & 0x7FFF_FFFF_FFFF_FFFF)
                  for i in active]
        out, reasons = generate(model, [seqs[i] for i in active], params, batch_size=batch_size,
                                return_finish_reasons=True)
        going = []
        for i, ids, why in zip(active, out, reasons):
            reply = ids + [eos] if why == "stop" else ids
            seqs[i] += reply
            masks[i] += [1] * len(reply)
            new_tokens += len(ids)
            text = tokenizer.decode(ids)
            texts[i].append(text)
            parsed = parse_reply(text, thinking=convs[i].think_opened)
            if why != "stop" or not parsed.tool_calls or turn == max_turns - 1:
                continue                                   # answered, cut off, or out of turns
            said = parsed.message()
            results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                        "content": registry.run(c)} for c in parsed.tool_calls]
            think = convs[i].think_opened or None
            before = tokenizer.render_text(history[i] + [said], tools=convs[i].tools, thinking=think)
            after = tokenizer.render_text(history[i] + [said] + results, add_generation_prompt=True,
                                          tools=convs[i].tools, thinking=think)
            if not after.startswith(before) or not before.endswith("\n"):
                continue                                   # a template that rewrites earlier turns: stop here
            # our ids end at <|im_end|>; the template's text continues with "\n", the tool turns, the next prompt
            observed = tokenizer.encode(after[len(before) - 1:])
            if len(seqs[i]) + len(observed) > limit:
                continue
            seqs[i] += observed
            masks[i] += [0] * len(observed)
            history[i] += [said] + results
            going.append(i)
        active = going
        if not active:
            break
    model.train(was_training)
    replies = [s[len(p.ids):] for s, p in zip(seqs, convs)]
    return Rollouts([p.ids for p in convs], replies, ["\n".join(t) for t in texts], time.perf_counter() - t0,
                    new_tokens, masks)


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO: advantage = (r - mean) / std within each prompt's group of num_generations replies.

    The group's mean is the baseline (no value network); a group whose replies all score the same carries no
    signal (advantage 0). scale=False: r - mean only (Dr. GRPO: no bias toward low-variance prompts).
    rewards (B * G,), prompt-major -> (B * G,)."""
    groups = rewards.view(-1, num_generations)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Packing rollouts for the policy's forward
# ---------------------------------------------------------------------------------------------------------------
def pack_rollouts(prompt_ids: list[list[int]], reply_ids: list[list[int]], advantages: torch.Tensor,
                  reply_masks: list[list[int]] | None = None):
    """All prompt+reply sequences end to end in one row: (x, targets, doc_ids) each (1, N), and the advantage of
    each scored token (K,), in the order reply_logprobs returns them.

    targets[t] = x[t+1] where token t+1 belongs to a reply, else -100: prompt tokens are context, never trained.
    doc_ids numbers the sequences, so attention stays inside each (AttentionMask.documents) and positions restart
    at 0 per sequence: each sequence is computed exactly as if alone, with no padding anywhere (a padded batch
    would be B x max_len, and its attention B x max_len^2).
    reply_masks (multi-turn): 0 marks reply positions the model did not write (tool results): no loss there.
    """
    xs, ys, docs, adv = [], [], [], []
    for d, (p, r) in enumerate(zip(prompt_ids, reply_ids)):
        seq = p + r
        m = reply_masks[d] if reply_masks is not None else [1] * len(r)
        xs += seq[:-1]
        ys += [IGNORE] * (len(p) - 1) + [t if keep else IGNORE for t, keep in zip(r, m)]
        docs += [d] * (len(seq) - 1)
        adv += [float(advantages[d])] * sum(m)
    row = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    return row(xs), row(ys), row(docs), torch.tensor(adv, dtype=torch.float32)


def reply_logprobs(model, x: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """log pi(token) of every reply token of a packed row: (K,). Only those K positions go through the output
    head and the softmax (logits_to_keep), so prompts cost attention and MLPs but no vocabulary-sized logits."""
    keep = (targets[0] != IGNORE).nonzero().squeeze(1)
    logits = model(x, doc_ids=doc_ids, logits_to_keep=keep)          # (1, K, V)
    return token_logprobs(logits, targets[:, keep])[0]


# ---------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                ref_logp: torch.Tensor | None = None, loss_type: str = "grpo", epsilon: float = 0.2,
                epsilon_high: float = 5.0, beta: float = 0.0, num_tokens: float | None = None):
    """The GRPO or CISPO loss over K reply tokens (all (K,)): (loss, metrics).

    ratio_t = pi(t) / pi_old(t) = exp(logp - old_logp)   (1 on the first update of a rollout, not its gradient)
    GRPO  (PPO's clipped surrogate, per token):  l_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
    CISPO (MiniMax-M1): clip the importance weight, not the update, so every token keeps its gradient:
          l_t = -sg(min(ratio_t, epsilon_high)) * A * logp_t          (MiniMind's --epsilon_high, default 5)
    KL to the reference (k3 estimator, unbiased and >= 0):  kl_t = exp(ref - logp) - (ref - logp) - 1
    loss = sum_t (l_t + beta * kl_t) / num_tokens      token-level: a long reply weighs by its tokens, not 1/len
    num_tokens: the normaliser (default K); train_grpo passes the step's token count over all micro-batches and
    ranks, so the gradient is the mean over every reply token of the step.
    """
    ratio = torch.exp(logp - old_logp)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=epsilon_high).detach()
        per_token = -weight * advantages * logp
        clipped = ratio > epsilon_high
    elif loss_type == "grpo":
        unclipped = ratio * advantages
        per_token = -torch.min(unclipped, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
        clipped = (ratio - 1).abs() > epsilon
    else:
        raise ValueError(f"loss_type must be 'grpo' or 'cispo', got {loss_type!r}")
    metrics = {"clip_frac": clipped.float().mean() if len(ratio) else ratio.sum()}
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        metrics["kl"] = kl.detach().mean() if len(kl) else kl.sum()
        if beta:
            per_token = per_token + beta * kl
    n = float(num_tokens) if num_tokens is not None else max(1, len(per_token))
    return per_token.sum() / n, metrics


# ---------------------------------------------------------------------------------------------------------------
# Held-out reward
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_reward(model, tokenizer: Tokenizer, prompts: list[Prompt], reward_fn, max_gen_len: int,
                   temperature: float = 0.0, samples: int = 1, seed: int = 0, batch_size: int | None = None):
    """(mean reward, mean correctness) of the model's replies to held-out prompts (greedy by default).

    reward_fn(reply_text, Prompt) -> (reward, parts) as rewards.score. Correctness averages the prompts that have
    a reference or gt (None if none has)."""
    ro = rollout(model, tokenizer, [p.ids for p in prompts], samples, max_gen_len, temperature,
                 seeds=[seed + i for i in range(len(prompts) * samples)], batch_size=batch_size)
    scored = [reward_fn(text, prompts[i // samples]) for i, text in enumerate(ro.texts)]
    correct = [parts["correct"] for _, parts in scored if parts.get("correct") is not None]
    return (sum(r for r, _ in scored) / len(scored), sum(correct) / len(correct) if correct else None)
