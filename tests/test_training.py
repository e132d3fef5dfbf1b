"""Training: the real pieces (optimizer, schedule, train_step, losses) learn, accumulate and compare correctly."""
import copy
import json
import math
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from minimind.config import ModelConfig
from minimind.data import PackedWindows, load_dpo, pad_batch, pretokenize
from minimind.loss import dpo_loss, token_logprobs
from minimind.model import MiniMindForCausalLM
from minimind.resume import RunState
from minimind.runtime import Runtime
from minimind.train import configure_optimizer, lr_at, train_step

CPU = torch.device("cpu")


def no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


def run_of(model, opt, grad_clip: float) -> RunState:
    """The run state train_step reads: one fp32 CPU process."""
    import argparse
    return RunState(argparse.Namespace(grad_clip=grad_clip), Runtime(0, 0, 1, CPU, torch.float32), model, opt,
                    no_scaler(), tokenizer=None)


def tiny_config(vocab, **kw):
    return ModelConfig(**{**dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128), **kw})


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------
def test_lr_warmup_then_cosine():
    total, warm, peak, ratio = 100, 10, 1e-3, 0.1
    lrs = [lr_at(s, total, warm, peak, ratio) for s in range(total + 1)]
    for s in range(warm):
        assert lrs[s] == pytest.approx(peak * (s + 1) / warm)
    for s in range(warm, total + 1):
        p = min(1.0, (s - warm) / (total - 1 - warm))  # steps run are 0..total-1: the last one is on the floor
        assert lrs[s] == pytest.approx(peak * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p))))
    assert lrs[warm - 1] == pytest.approx(peak) and lrs[total - 1] == pytest.approx(peak * ratio)
    assert lrs[total - 2] > peak * ratio
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))


def test_optimizer_decays_matrices_only():
    model = MiniMindForCausalLM(tiny_config(50, attention_bias=True))
    opt = configure_optimizer(model, 1e-3, 0.1, CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_parameters()          # every parameter once (the tied head is not counted twice)


# ---------------------------------------------------------------------------------------------------------------
# Overfitting a tiny corpus
# ---------------------------------------------------------------------------------------------------------------
def test_tiny_model_overfits_a_tiny_corpus(tokenizer, tiny_data):
    """A 2-layer d64 model memorises 8 windows x 32 tokens of the default data.

    Stated bound: the loss starts near ln(V) = ln(6400) ~ 8.8 and must end below 0.5 after 120 steps
    (measured: ~0.001; it passes 0.5 around step 60).
    """
    torch.manual_seed(0)
    stream = pretokenize(tiny_data["pretrain"], tokenizer)
    windows = PackedWindows(stream, 32)
    x, y = windows.get(range(8))
    model = MiniMindForCausalLM(tiny_config(tokenizer.vocab_size)).train()
    opt = configure_optimizer(model, 1e-2, 0.0, CPU)
    steps = 120
    losses = []
    for step in range(steps):
        out = train_step(run_of(model, opt, grad_clip=1.0), [(x, y)], lr_at(step, steps, 10, 1e-2))
        loss, norm = out.loss, out.grad_norm
        assert opt.param_groups[0]["lr"] == out.lr == lr_at(step, steps, 10, 1e-2)
        losses.append(loss.item())
        assert math.isfinite(losses[-1]) and math.isfinite(norm.item())
    assert abs(losses[0] - math.log(tokenizer.vocab_size)) < 0.5       # started from chance
    assert losses[-1] < 0.5, losses[::10]
    with torch.no_grad():                                            # eval-mode loss agrees
        assert model.eval()(x, targets=y).item() < 0.5


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_moe", [False, True])
def test_two_micro_batches_equal_one_double_batch(use_moe):
    torch.manual_seed(0)
    extra = dict(use_moe=True, num_experts=2, num_experts_per_tok=1, router_aux_loss_coef=0.0) if use_moe else {}
    base = MiniMindForCausalLM(tiny_config(61, **extra)).double().train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 61, (4, 12), generator=g), torch.randint(0, 61, (4, 12), generator=g)
    deltas, norms = [], []
    for micro in ([(x[:2], y[:2]), (x[2:], y[2:])], [(x, y)]):
        model = copy.deepcopy(base)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)     # param change = -gradient
        out = train_step(run_of(model, opt, grad_clip=0.0), micro, lr=1.0)
        norm = out.grad_norm
        assert out.tokens == 4 * 12                              # input positions of both micro-batches
        deltas.append({n: before[n] - p.detach() for n, p in model.named_parameters()})
        norms.append(norm.item())
        assert all(p.grad is None for p in model.parameters())   # zeroed after the step
    # Reference: autograd of the full-batch mean loss, computed directly.
    ref = copy.deepcopy(base)
    torch.nn.functional.cross_entropy(ref(x).reshape(-1, 61), y.reshape(-1)).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(deltas[0][n], deltas[1][n], rtol=0, atol=1e-12, msg=n)
        torch.testing.assert_close(deltas[1][n], p.grad, rtol=0, atol=1e-12, msg=n)
    assert norms[0] == pytest.approx(norms[1], rel=1e-10) and norms[0] > 0


def test_grad_clip_caps_the_update():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(61)).double().train()
    x = torch.randint(0, 61, (2, 8))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    norm = train_step(run_of(model, opt, grad_clip=1e-3), [(x, x)], lr=1.0).grad_norm
    step = torch.sqrt(sum(((b - p.detach()) ** 2).sum() for b, p in zip(before, model.parameters())))
    assert norm.item() > 1e-3 and step.item() == pytest.approx(1e-3, rel=1e-6)


def test_step_metrics_are_the_mean_over_micro_batches():
    """A loss_fn's extra metrics (DPO's margin, distillation's KL) average over all micro-batches of the step,
    not just the last one's."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(61)).double().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randint(0, 61, (3, 8))
    seen = []

    def loss_fn(m, batch):
        loss = m(batch[0], targets=batch[1])
        seen.append(float(batch[0].shape[0]))
        return loss, {"rows": torch.tensor(float(batch[0].shape[0]))}
    micro = [(x[:1], x[:1]), (x[1:], x[1:])]      # 1 row, then 2 rows
    out = train_step(run_of(model, opt, grad_clip=0.0), micro, lr=0.0, loss_fn=loss_fn)
    assert seen == [1.0, 2.0] and out.metrics["rows"].item() == pytest.approx(1.5)
    assert out.loss.item() == pytest.approx(sum(model(b[0], targets=b[1]).item() for b in micro) / 2, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------------
PC, PR, RC, RR = [-12.0, -3.5, -40.0], [-15.0, -2.0, -41.5], [-13.0, -3.0, -40.0], [-14.0, -2.5, -42.0]


def hand_dpo(beta, ls=0.0, ipo=False):
    losses = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - rc) - (pr - rr)
        if ipo:
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            nls = lambda z: math.log(1 + math.exp(-z))       # noqa: E731  -log(sigmoid(z))
            losses.append((1 - ls) * nls(beta * h) + ls * nls(-beta * h))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("beta,ls,ipo", [(0.1, 0.0, False), (0.5, 0.0, False), (0.1, 0.2, False),
                                         (0.1, 0.0, True), (0.7, 0.0, True)])
def test_dpo_loss_equals_hand_computation(beta, ls, ipo):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)   # noqa: E731
    pc, pr, rc, rr = t(PC), t(PR), t(RC), t(RR)
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta, ls, ipo)
    assert loss.item() == pytest.approx(hand_dpo(beta, ls, ipo), rel=1e-12)
    assert r_c.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)], rel=1e-12)
    assert r_r.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PR, RR)], rel=1e-12)
    assert not r_c.requires_grad and not r_r.requires_grad
    loss.backward()
    for i in range(3):   # d loss / d policy_chosen_i, by hand
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        if ipo:
            want = 2 * (h - 1 / (2 * beta)) / 3
        else:
            sig = lambda z: 1 / (1 + math.exp(-z))   # noqa: E731
            want = (-(1 - ls) * beta * sig(-beta * h) + ls * beta * sig(beta * h)) / 3
        assert pc.grad[i].item() == pytest.approx(want, rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(-want, rel=1e-10)


def sequence_logprobs(model, x, y):
    """train_dpo.py's own function (loaded from the script, not copied)."""
    return runpy.run_path(str(ROOT / "train_dpo.py"))["sequence_logprobs"](model, x, y)


def test_dpo_gradients_flow_only_through_the_policy():
    torch.manual_seed(0)
    policy = MiniMindForCausalLM(tiny_config(53)).double().train()
    reference = copy.deepcopy(policy).eval()     # requires_grad left on: the no_grad scoring alone must protect it
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 53, (4, 10), generator=g)
    y = torch.randint(0, 53, (4, 10), generator=g)
    y[:, :4] = -100
    # token_logprobs against a direct log_softmax gather
    logits = policy(x)
    want = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    torch.testing.assert_close(token_logprobs(logits, y).double(), want, rtol=0, atol=1e-6)
    pol = sequence_logprobs(policy, x, y)
    with torch.no_grad():
        ref = sequence_logprobs(reference, x, y)
    loss, _, _ = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta=0.1)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    grads = [p.grad for p in policy.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0


DPO_PAIRS = [
    ("What does `len` do?", "It returns the number of items in a container.", "It deletes the file system."),
    ("用一句话介绍 Python。", "Python 是一种易读的编程语言。", "Python 是一种蛇，不会编程。"),
    ("What is 2 + 2?", "4", "22"),
    ("Name a sorting function.", "`sorted` returns a new sorted list.", "`shuffle` sorts nothing at all."),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory):
    from minimind.checkpoint import save_model
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("model") / "tiny")
    save_model(MiniMindForCausalLM(tiny_config(tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1)), tokenizer, out)
    return out


def pair_margins(policy, reference, pairs, pad_id):
    """Mean of beta-free reward margins: (log pi - log ref)(chosen) - (log pi - log ref)(rejected)."""
    x, y = pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    with torch.no_grad():
        lp = token_logprobs(policy(x), y).sum(-1) - token_logprobs(reference(x), y).sum(-1)
    b = len(pairs)
    return lp[:b] - lp[b:]


def test_dpo_script_raises_the_chosen_vs_rejected_margin(tokenizer, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from minimind.checkpoint import load_model
    data = tmp_path / "dpo.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q, good, bad in DPO_PAIRS:
            prompt = [{"role": "user", "content": q}]
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": good}],
                                "rejected": prompt + [{"role": "assistant", "content": bad}]},
                               ensure_ascii=False) + "\n")
    out_dir = str(tmp_path / "dpo")
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--from_weight", tiny_model_dir, "--data_path", str(data),
                                      "--out_dir", out_dir, "--batch_size", "4", "--max_steps", "12",
                                      "--epochs", "20", "--learning_rate", "3e-3", "--beta", "0.1",
                                      "--device", "cpu", "--dtype", "float32", "--num_workers", "0",
                                      "--log_interval", "1", "--grad_clip", "1.0"])
    try:
        runpy.run_path(str(ROOT / "train_dpo.py"), run_name="__main__")
    except SystemExit as e:
        pytest.fail(f"train_dpo.py exited with {e.code}: {capsys.readouterr().err[-2000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    margins = [r["reward_margin"] for r in rows]
    assert len(rows) == 12
    assert margins[0] == pytest.approx(0.0, abs=1e-5)      # policy == reference before the first update
    assert margins[-1] > 0.05 and rows[-1]["reward_accuracy"] == 1.0, margins
    assert rows[-1]["loss"] < math.log(2) - 0.02                # below the starting -log sigmoid(0)
    # Independent check on the saved model: every pair now prefers the chosen reply more than the reference does.
    pairs, _ = load_dpo(str(data), tokenizer, 256)
    policy, reference = load_model(out_dir).eval(), load_model(tiny_model_dir).eval()
    assert (pair_margins(policy, reference, pairs, tokenizer.pad_id) > 0).all()
    assert np.allclose(pair_margins(reference, reference, pairs, tokenizer.pad_id).numpy(), 0.0)
