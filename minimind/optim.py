"""Optimizers and learning-rate schedules: AdamW, Muon (written out by hand), cosine and warmup-stable-decay.

Two ideas a reader can take away from this file:

* **Muon** (Keller Jordan, 2024: github.com/KellerJordan/Muon) updates each hidden weight *matrix* with its
  momentum made orthogonal: the momentum M = U S V^T is replaced by (roughly) U V^T, every singular value pushed to
  ~1. A plain gradient step is dominated by a few large directions; the orthogonalised one moves every direction
  the gradient points in by the same amount. U V^T is computed without an SVD, by a few matrix products (the
  Newton-Schulz iteration below), so it runs fast on any accelerator. Embeddings, the output head, norms' gains
  and biases are not hidden matrices (a row lookup, a read-out, vectors): they keep AdamW.
* **The schedule is a function of progress in [0, 1]**, not of the step number. Progress is normally step/total;
  with --time_budget it is the share of the time budget spent (whichever is further), so a run that is given ten
  minutes lands on its floor LR when the ten minutes are up, however fast the machine is.
"""
from __future__ import annotations

import functools
import math
import time

import torch

from .errors import UsageError

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")

# ---------------------------------------------------------------------------------------------------------------
# Newton-Schulz: an orthogonal matrix from a few matrix products
# ---------------------------------------------------------------------------------------------------------------
# Why it works: X -> a X + b (X X^T) X + c (X X^T)^2 X only ever multiplies X by polynomials of X X^T, so it keeps
# X's singular VECTORS and maps every singular value s to p(s) = a s + b s^3 + c s^5. Start with all s in (0, 1]
# (divide by the Frobenius norm, which is >= the largest singular value) and iterate: every s is driven towards a
# fixed point near 1, i.e. X -> U V^T.
#   The classic cubic iteration (a, b, c) = (1.5, -0.5, 0) converges to exactly 1, but slowly for small s
#   (p(s) ~ 1.5 s). Keller Jordan's quintic coefficients make p'(0) = 3.4445: small singular values grow fast,
#   and 5 steps are enough, at the price of not converging exactly: the singular values end up spread over about
#   [0.7, 1.2] instead of at 1. For an optimizer step that is fine (the update's scale is set by the LR anyway);
#   tests/test_optim.py checks both facts against a float64 SVD.
QUINTIC = (3.4445, -4.7750, 2.0315)   # Keller Jordan's Muon
CUBIC = (1.5, -0.5, 0.0)              # textbook Newton-Schulz: exact in the limit, slow


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=QUINTIC, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T of the matrix G = U S V^T, in G's dtype, by `steps` Newton-Schulz iterations."""
    a, b, c = coefficients
    X = G
    tall = G.size(-2) > G.size(-1)
    if tall:                      # work on the wide orientation: X X^T is then the smaller square matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)   # every singular value now in [0, 1]
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


# ---------------------------------------------------------------------------------------------------------------
# Muon for hidden matrices + AdamW for the rest, as one torch optimizer
# ---------------------------------------------------------------------------------------------------------------
class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules, chosen per parameter group by group["muon"]:

    muon=True (2-D hidden matrices):        M <- beta M + (1 - beta) g            (momentum, an EMA of gradients)
                                            u <- beta M + (1 - beta) g            (Nesterov: look one step ahead)
                                            W <- W (1 - lr wd) - lr * sqrt(max(1, rows/cols)) * NS(u)
    muon=False (embeddings, head, norms, biases): AdamW, written out as torch.optim.AdamW does it.

    The sqrt(max(1, rows/cols)) factor (Keller Jordan's) keeps the update's RMS per element alike for tall and wide
    matrices. ns_dtype: the precision of Newton-Schulz (None = fp32). bf16 is what Keller Jordan's code uses: the
    iteration tolerates it (~3% from the float64 result, tests/test_optim.py), and its matrix products are the
    cost of Muon: O(rows^2 cols) per matrix per step, whatever the batch. All state (Muon's momentum, AdamW's
    moments and step count) lives in self.state, so state_dict() / load_state_dict() carry it through a
    checkpoint like any torch optimizer.
    """

    def __init__(self, groups: list[dict], lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, ns_dtype=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, muon=False)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype or torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        g, state, beta = p.grad, self.state[p], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m = state["momentum_buffer"]
        m.lerp_(g, 1 - beta)                                  # M = beta M + (1 - beta) g
        u = g.lerp(m, beta) if group["nesterov"] else m       # beta M + (1 - beta) g: the look-ahead
        o = newton_schulz(u.to(self.ns_dtype), group["ns_steps"]).to(p.dtype)
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])      # decoupled weight decay, as AdamW's
        p.add_(o, alpha=-group["lr"] * scale)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        g, state = p.grad, self.state[p]
        (b1, b2), lr = group["betas"], group["lr"]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - lr * group["weight_decay"])
        m.lerp_(g, 1 - b1)                                    # first moment: mean of gradients
        v.mul_(b2).addcmul_(g, g, value=1 - b2)               # second moment: mean of squared gradients
        denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])  # bias-corrected RMS of the gradient
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


@functools.lru_cache(maxsize=None)
def fast_bf16(device_type: str) -> bool:
    """Are bf16 matrix products faster than fp32 here? Always on CUDA (tensor cores). On a CPU it depends on the
    chip (native bf16 instructions or not), so it is measured once: a 512x512 product in each precision. On this
    project's CPU (avx512_bf16) Newton-Schulz of a 512x1408 matrix took 11 ms in bf16 and 59 ms in fp32."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # not the global stream: runs stay seeded
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x                                          # warm-up (kernel selection)
        t = time.perf_counter()
        for _ in range(3):
            x @ x
        times[dt] = time.perf_counter() - t
    return times[torch.bfloat16] < times[torch.float32]


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Muon's share: 2-D weights inside the blocks. The token embedding (a lookup table: each step touches a
    few rows) and the output head (it reads out logits; tied to the embedding here by default) keep AdamW."""
    return p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name


# ---------------------------------------------------------------------------------------------------------------
# Building the optimizer from the flags
# ---------------------------------------------------------------------------------------------------------------
def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                        betas=(0.9, 0.95), kind: str = "adamw", muon_lr: float = 0.02) -> torch.optim.Optimizer:
    """AdamW (kind='adamw') or Muon + AdamW (kind='muon'); weight decay on matrices only (decaying norms' gains and
    biases only hurts).

    Every group carries lr_scale: train_step sets group lr = scheduled lr * lr_scale, so one schedule drives both
    rules (Muon's groups: muon_lr / lr; AdamW's: 1).
    """
    if kind not in OPTIMIZERS:
        raise UsageError(f"--optimizer {kind}: use {' or '.join(OPTIMIZERS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "adamw":
        decay = [p for _, p in named if p.dim() >= 2]
        no_decay = [p for _, p in named if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        # fused: one kernel per step updates every parameter (instead of several passes over each tensor): on GPU
        # it saves launches; on CPU it measured 5.8x faster than foreach for a 24M-parameter AdamW step (dev/LOG.md).
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    if muon_lr <= 0:
        raise UsageError(f"--muon_lr {muon_lr}: must be > 0 (Keller Jordan's default is 0.02)")
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
    groups = [{"params": hidden, "muon": True, "weight_decay": weight_decay, "lr_scale": muon_lr / lr},
              {"params": [p for _, p in other if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": [p for _, p in other if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    ns_dtype = torch.bfloat16 if fast_bf16(device.type) else torch.float32
    return MuonWithAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, ns_dtype=ns_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Schedules: warm-up in steps, then a shape over progress p in [0, 1]
# ---------------------------------------------------------------------------------------------------------------
def lr_factor(progress: float, shape: str = "cosine", min_ratio: float = 0.1, decay_ratio: float = 0.2) -> float:
    """The LR as a share of the peak at progress p (0 = end of warm-up, 1 = the last step: the floor).

    cosine: half a cosine from 1 to min_ratio over the whole run.
    wsd (warmup-stable-decay): 1 until p = 1 - decay_ratio, then a straight line down to min_ratio. The stable part
    needs no end point fixed in advance, and the short final decay is where most of the loss drop shows; it is
    the schedule that fits a run cut by a clock (MiniCPM, 2024; nanochat's "warmdown").
    """
    p = min(1.0, max(0.0, progress))
    if shape == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if shape == "wsd":
        if p <= 1 - decay_ratio:
            return 1.0
        return min_ratio + (1 - min_ratio) * (1 - p) / decay_ratio
    raise UsageError(f"--lr_schedule {shape}: use {' or '.join(SCHEDULES)}")


def step_progress(step: int, total: int, warmup: int) -> float:
    return (step - warmup) / max(1, total - 1 - warmup)  # the last step (total - 1) lands on the floor


def lr_at(step: int, total: int, warmup: int, max_lr: float, min_ratio: float = 0.1, shape: str = "cosine",
          decay_ratio: float = 0.2) -> float:
    """Linear warm-up, then `shape` (cosine by default) from max_lr to max_lr * min_ratio at the last step."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    return max_lr * lr_factor(step_progress(step, total, warmup), shape, min_ratio, decay_ratio)


def time_progress(args) -> float:
    """Share of --time_budget the NEXT step will have used when it ends: the time used so far plus one mean step
    (both kept on args by train.RunControl, so checkpoints save them with the flags). 0 without a budget."""
    budget = 60.0 * getattr(args, "time_budget", 0.0)
    if budget <= 0:
        return 0.0
    return (getattr(args, "time_used_s", 0.0) + getattr(args, "step_time_s", 0.0)) / budget


def lr_schedule(args):
    """The LR of each step under this run's flags: (step, total) -> lr.

    Progress is step/total, or, with --time_budget, the share of the budget spent if that is further: the run
    reaches its floor LR at whichever end comes first (the clock, or --epochs / --max_steps).
    """
    shape, decay = getattr(args, "lr_schedule", "cosine"), getattr(args, "decay_ratio", 0.2)
    warmup, peak, floor = args.warmup_iters, args.learning_rate, args.min_lr_ratio
    if not 0 < decay <= 1:
        raise UsageError(f"--decay_ratio {decay}: must be in (0, 1] (the share of the run spent decaying)")
    if getattr(args, "time_budget", 0) < 0:
        raise UsageError(f"--time_budget {args.time_budget}: minutes, >= 0 (0 = no budget)")

    def at(step: int, total: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = max(step_progress(step, total, warmup), time_progress(args))
        return peak * lr_factor(progress, shape, floor, decay)
    return at
