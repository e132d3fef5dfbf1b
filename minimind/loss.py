"""Losses: next-token cross-entropy (chunked, so full-vocabulary logits never sit in memory at once) and DPO."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # targets with this value carry no loss (prompt tokens, padding)


def _chunk_rows(vocab: int) -> int:
    return max(1, (1 << 25) // vocab)  # ~32M logits per chunk: 128 MB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean CE(h @ w.T, targets), computed chunk by chunk (h and w share one dtype).

    Why: logits are (tokens x vocab); for a 151k vocabulary and 16k tokens that is 10 GB in fp32. We compute each
    chunk's logits, its loss and its gradient (softmax - onehot) right away, keep only dL/dh and dL/dw, and free
    the logits. Backward then only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, h, w, targets):
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax in fp32 at least (fp64 in reference tests)
        n_valid = (targets != IGNORE).sum().clamp(min=1).to(acc)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        step = _chunk_rows(w.shape[0])
        for s in range(0, h.shape[0], step):
            hc, tc = h[s:s + step], targets[s:s + step]
            logits = (hc @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            valid = tc != IGNORE
            tgt = tc.clamp(min=0)
            total += ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
            g = torch.exp(logits - lse[:, None])                       # softmax
            g[torch.arange(len(tc), device=g.device), tgt] -= 1.0      # minus one-hot
            g *= valid[:, None]
            g = g.to(hc.dtype)
            grad_h[s:s + step] = g @ w
            grad_w += (g.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype), n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None


def cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over positions whose target is not -100. hidden (..., H), targets (...)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if not torch.compiler.is_compiling():
        # Rows without a target (SFT prompts, padding) need no logits at all: dropping them first saves the head
        # matmul and softmax there (about half of an SFT batch). Skipped under torch.compile (data-dependent shape).
        keep = (t != IGNORE).nonzero().squeeze(1)
        if len(keep) < len(t):
            h, t = h.index_select(0, keep), t.index_select(0, keep)
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        if torch.is_autocast_enabled(h.device.type):  # run the chunked matmuls in the autocast dtype
            dt = torch.get_autocast_dtype(h.device.type)
            with torch.autocast(h.device.type, enabled=False):
                return _LinearCrossEntropy.apply(h.to(dt), head_weight.to(dt), t).float()
        return _LinearCrossEntropy.apply(h, head_weight, t)
    # No gradient needed (evaluation): plain chunked loss.
    acc = torch.promote_types(h.dtype, torch.float32)
    total, step = h.new_zeros((), dtype=acc), _chunk_rows(head_weight.shape[0])
    for s in range(0, h.shape[0], step):
        logits = (h[s:s + step] @ head_weight.t()).to(acc)
        total += F.cross_entropy(logits, t[s:s + step], ignore_index=IGNORE, reduction="sum")
    return total / (t != IGNORE).sum().clamp(min=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | prefix) for each position (0 where target is -100). logits (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return picked * (targets != IGNORE)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0, ipo: bool = False):
    """Direct Preference Optimization (Rafailov et al. 2023) on summed sequence log-probs (B,).

    The implicit reward of a reply is beta * (log pi(y|x) - log pi_ref(y|x)); the loss pushes the chosen reply's
    reward above the rejected one's: -log sigmoid(r_chosen - r_rejected). Returns (loss, chosen_reward,
    rejected_reward), rewards detached for logging.
    label_smoothing: conservative DPO (assume that share of labels is flipped). ipo: the IPO squared loss.
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    chosen_reward = beta * (policy_chosen - ref_chosen).detach()
    rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_reward, rejected_reward


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float = 1.0, alpha: float = 0.5):
    """Knowledge distillation (Hinton et al. 2015): match the teacher's softened next-token distribution.

    loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, targets), both averaged over the
    positions whose target is not -100 (assistant tokens in SFT data). p_T = softmax(logits / T): a temperature
    T > 1 flattens both distributions so the student also learns how the teacher ranks the wrong tokens; the
    T^2 factor keeps the KL gradient's size independent of T. logits (..., V), targets (...).
    Returns (loss, kl, ce), the last two detached for logging.
    """
    valid = targets != IGNORE
    acc = torch.promote_types(student_logits.dtype, torch.float32)  # softmax in fp32 at least (fp64 in tests)
    s = student_logits[valid].to(acc)
    t = teacher_logits[valid].to(acc).detach()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() if len(s) else s.sum()
    ce = F.cross_entropy(s, targets[valid]) if len(s) else s.sum()
    loss = alpha * kl * temperature ** 2 + (1 - alpha) * ce
    return loss, kl.detach(), ce.detach()
