"""Optimizers and schedules (minimind/optim.py): Newton-Schulz against a float64 SVD, one Muon step against a
hand-written float64 reference, Muon's AdamW half against torch.optim.AdamW, a tiny model learning with Muon, an
exact resume with Muon's momentum, the WSD shape, --time_budget ending on the floor LR, and --batch_tokens."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from minimind.config import ModelConfig
from minimind.errors import UsageError
from minimind.flags import apply_batch_tokens
from minimind.model import MiniMindForCausalLM
from minimind.optim import CUBIC, QUINTIC, MuonWithAdamW, configure_optimizer, lr_at, lr_schedule, newton_schulz
from minimind.resume import RunState
from minimind.runtime import Runtime
from minimind.train import prepare_model, train_step

CPU = torch.device("cpu")
F64 = torch.float64


def scalar_iteration(s: torch.Tensor, coefficients, steps: int) -> torch.Tensor:
    """What Newton-Schulz does to each singular value: s -> a s + b s^3 + c s^5, `steps` times."""
    a, b, c = coefficients
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


# ---------------------------------------------------------------------------------------------------------------
# Newton-Schulz against the SVD
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_is_the_polynomial_of_the_singular_values(shape):
    """In float64 the matrix iteration equals U p(S/|G|_F) V^T exactly (to 1e-10): same singular vectors, each
    singular value through the scalar polynomial. Checks the matrix code, the normalisation and the tall path."""
    G = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    for coefficients, steps in ((QUINTIC, 5), (CUBIC, 7)):
        ref = U @ torch.diag(scalar_iteration(S / (G.norm() + 1e-7), coefficients, steps)) @ Vh
        assert torch.allclose(newton_schulz(G, steps, coefficients), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_approximates_u_vt(shape):
    """Against U V^T from a float64 SVD. The quintic (Muon's 5 steps) does not converge exactly, by design: the
    singular values land in ~[0.68, 1.14] (stated tolerance: [0.6, 1.2], spectral error <= 0.35). The classic
    cubic iteration does converge: 40 steps reach U V^T to 1e-9."""
    G = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    O = newton_schulz(G, 5, QUINTIC)
    sv = torch.linalg.svdvals(O)
    assert 0.6 <= sv.min() and sv.max() <= 1.2, sv
    assert torch.linalg.matrix_norm(O - U @ Vh, 2) <= 0.35
    assert torch.allclose(newton_schulz(G, 40, CUBIC), U @ Vh, atol=1e-9, rtol=0)
    # fp32 (what runs on the CPU) stays within 1e-4 of the float64 iteration
    assert torch.allclose(newton_schulz(G.float(), 5).double(), O, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# One Muon step against a hand-written float64 reference
# ---------------------------------------------------------------------------------------------------------------
def reference_ns(G, steps=5):
    """Newton-Schulz written out again, independently, in float64 (no transposition trick: always X X^T)."""
    a, b, c = QUINTIC
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (torch.sqrt((X * X).sum()) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def test_two_muon_steps_match_float64_reference():
    torch.manual_seed(0)
    W0 = torch.randn(12, 8)                                  # tall: exercises the sqrt(rows/cols) scale
    grads = [torch.randn(12, 8), torch.randn(12, 8)]
    lr, beta, wd = 0.02, 0.95, 0.1
    w = torch.nn.Parameter(W0.clone())
    opt = MuonWithAdamW([{"params": [w], "muon": True, "weight_decay": wd}], lr=lr, momentum=beta,
                        ns_dtype=torch.float32)
    fast = torch.nn.Parameter(W0.clone())             # the same in bf16 Newton-Schulz (the default where it is fast)
    opt16 = MuonWithAdamW([{"params": [fast], "muon": True, "weight_decay": wd}], lr=lr, momentum=beta,
                          ns_dtype=torch.bfloat16)
    for g in grads:
        w.grad, fast.grad = g.clone(), g.clone()
        opt.step(), opt16.step()
    # the reference, in float64: momentum EMA, Nesterov look-ahead, orthogonalise, scale, decoupled decay
    W, M = W0.double(), torch.zeros(12, 8, dtype=F64)
    for g in grads:
        g = g.double()
        M = beta * M + (1 - beta) * g
        u = beta * M + (1 - beta) * g
        W = W * (1 - lr * wd) - lr * math.sqrt(12 / 8) * reference_ns(u)
    assert torch.allclose(w.detach().double(), W, atol=1e-6, rtol=0)
    assert torch.allclose(opt.state[w]["momentum_buffer"].double(), M, atol=1e-6, rtol=0)
    # bf16: the two steps move the weights within 6% of the float64 steps (Frobenius; measured ~3%)
    assert (fast.detach().double() - W).norm() <= 0.06 * (W - W0.double()).norm()


def test_muons_adamw_half_equals_torch_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(10, 6)
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    a = MuonWithAdamW([{"params": [ours], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    b = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(10, 6)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step(), b.step()
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def tiny_model(**kw):
    cfg = ModelConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64), **kw})
    torch.manual_seed(0)
    return MiniMindForCausalLM(cfg)


def test_muon_gets_the_hidden_matrices_adamw_the_rest():
    model = tiny_model(attention_bias=True)
    opt = configure_optimizer(model, 1e-3, 0.1, CPU, kind="muon", muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    adam = [names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert muon and all(".layers." in n and n.endswith("weight") and "norm" not in n for n in muon)
    assert any("embed_tokens" in n for n in adam) and any("norm" in n for n in adam) and any("bias" in n for n in adam)
    assert {g["lr_scale"] for g in opt.param_groups if g["muon"]} == {0.02 / 1e-3}
    with pytest.raises(UsageError):
        configure_optimizer(model, 1e-3, 0.1, CPU, kind="muon", muon_lr=0)


def test_tiny_model_learns_with_muon():
    model = tiny_model()
    opt = configure_optimizer(model, 3e-3, 0.0, CPU, kind="muon", muon_lr=0.02)
    run = RunState(argparse.Namespace(grad_clip=1.0), Runtime(0, 0, 1, CPU, torch.float32), model, opt,
                   torch.amp.GradScaler("cpu", enabled=False), tokenizer=None)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = [train_step(run, [(x[:, :-1], x[:, 1:])], 3e-3).loss.item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    # train_step gives each group its scheduled LR times lr_scale: Muon's groups run at muon_lr
    assert {round(g["lr"], 9) for g in opt.param_groups} == {0.02, 3e-3}


def test_fsdp_with_muon_is_refused():
    args = argparse.Namespace(fsdp=1, optimizer="muon", batch_tokens=0, grad_checkpointing=0, use_compile=0)
    with pytest.raises(UsageError, match="--optimizer muon: not supported with --fsdp 1"):
        prepare_model(tiny_model(), args, Runtime(0, 0, 1, CPU, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
def test_wsd_shape():
    total, warm, peak, floor, decay = 100, 10, 1e-3, 0.1, 0.2
    lrs = [lr_at(s, total, warm, peak, floor, shape="wsd", decay_ratio=decay) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)])     # linear warm-up
    span = total - 1 - warm                                                               # progress = (s-warm)/span
    stable = [s for s in range(warm, total) if (s - warm) / span <= 1 - decay]
    assert stable and all(lrs[s] == peak for s in stable)                                 # flat at the peak
    tail = range(stable[-1] + 1, total)
    for s in tail:                                                                        # a straight line down
        p = (s - warm) / span
        assert lrs[s] == pytest.approx(peak * (floor + (1 - floor) * (1 - p) / decay))
    assert lrs[-1] == pytest.approx(peak * floor) and lrs[-2] > peak * floor              # the last step: floor
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    with pytest.raises(UsageError):
        lr_at(50, total, warm, peak, shape="linear")
    for bad in (dict(decay_ratio=0.0), dict(decay_ratio=1.5), dict(time_budget=-1)):
        args = argparse.Namespace(**{**dict(lr_schedule="wsd", decay_ratio=0.2, time_budget=0, warmup_iters=0,
                                            learning_rate=1e-3, min_lr_ratio=0.1), **bad})
        with pytest.raises(UsageError, match="--" + next(iter(bad))):
            lr_schedule(args)


# ---------------------------------------------------------------------------------------------------------------
# --batch_tokens
# ---------------------------------------------------------------------------------------------------------------
def batch_args(**kw):
    return argparse.Namespace(**{**dict(batch_tokens=0, max_seq_len=340, batch_size=16, accumulation_steps=1), **kw})


def test_batch_tokens_sets_micro_batch_and_accumulation():
    a = batch_args(batch_tokens=2040)            # 6 rows: one micro-batch of 6 (MiniMind's real tokens per step)
    apply_batch_tokens(a, 1)
    assert (a.batch_size, a.accumulation_steps) == (6, 1)
    a = batch_args(batch_tokens=40 * 340)         # 40 rows, micro-batches of at most 16: 3 x 13
    apply_batch_tokens(a, 1)
    assert (a.batch_size, a.accumulation_steps) == (13, 3)
    a = batch_args(batch_tokens=40 * 340)         # 4 ranks: 10 rows each
    apply_batch_tokens(a, 4)
    assert (a.batch_size, a.accumulation_steps) == (10, 1)
    a = batch_args()                              # 0 = off: the flags as given
    apply_batch_tokens(a, 1)
    assert (a.batch_size, a.accumulation_steps) == (16, 1)
    with pytest.raises(UsageError, match="--batch_tokens 100: less than one row"):
        apply_batch_tokens(batch_args(batch_tokens=100), 1)
    with pytest.raises(UsageError, match="drop one"):
        apply_batch_tokens(batch_args(batch_tokens=4000, accumulation_steps=2), 1)


# ---------------------------------------------------------------------------------------------------------------
# The real script: exact resume with Muon, and a time budget
# ---------------------------------------------------------------------------------------------------------------
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "32", "--num_threads", "1",
        "--batch_size", "4"]


def pretrain(data, out, *extra, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), "--data_path", data, "--out_dir", str(out),
                        *TINY, *map(str, extra)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_muon_run_resumes_bit_identically(tiny_data, tmp_path):
    """Muon's momentum is optimizer state: a run resumed from step 3 must end with the very weights of one never
    stopped. The first run goes through (its checkpoint at step 3 changes nothing: tests/test_engine.py); the
    second, in the same folder, starts from that checkpoint and recomputes steps 3-5."""
    data, flags = tiny_data["pretrain"], ["--optimizer", "muon", "--max_steps", "6", "--log_interval", "100",
                                          "--save_interval", "3"]
    out = tmp_path / "run"
    pretrain(data, out, *flags)
    a = load_file(str(out / "model.safetensors"))
    r = pretrain(data, out, *flags, "--from_resume", "1")
    assert "(step 3," in r.stdout
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_ends_on_the_floor_lr(tiny_data, tmp_path):
    """A 3-second budget, far fewer seconds than --epochs would take: the run stops when the time is up, on (or
    within one step of) the floor LR, and its checkpoints keep the time used: a resumed run gets only what was
    left, not a new budget."""
    out = tmp_path / "budget"
    peak, floor = 1e-3, 0.1
    flags = ["--time_budget", "0.05", "--epochs", "10000", "--lr_schedule", "wsd", "--learning_rate", peak,
             "--min_lr_ratio", floor, "--log_interval", "1", "--save_interval", "5", "--keep_checkpoints", "0"]
    r = pretrain(tiny_data["pretrain"], out, *flags)
    assert "time budget: 0.05 min used after step" in r.stdout
    final = int(r.stdout.split("used after step ")[1].split("/")[0])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if "lr" in x]
    assert lrs[0] == peak and max(lrs) == peak and all(a >= b for a, b in zip(lrs, lrs[1:]))  # WSD, monotone
    assert lrs[-1] <= peak * (floor + 0.1 * (1 - floor))        # the floor, or within a step of it
    assert 2.5 <= lines[-1]["time"] <= 30
    ckpts = sorted((out / "checkpoints").iterdir())
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert 0 < state["flags"]["time_used_s"] <= 3.0 + 5
    # resume from the newest checkpoint (step k): only the time left runs, ~final - k steps, not a new budget
    k = state["step"]
    assert final >= 10 and k > final // 2
    r = pretrain(tiny_data["pretrain"], out, *flags, "--from_resume", "1")
    assert f"(step {k}," in r.stdout and "time budget: 0.05 min used after step" in r.stdout
    again = int(r.stdout.split("used after step ")[1].split("/")[0])
    assert again - k <= (final - k) + final // 2, (k, final, again)


@pytest.mark.slow
def test_time_budget_under_ddp_stops_every_rank_together(tiny_data, tmp_path):
    """2 CPU ranks (gloo) with Muon and a 3-second budget: the ranks agree on the clock (a max all-reduce each
    step), so they stop at the same step; a rank that stopped alone would leave the other waiting in an
    all-reduce until the timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + (os.getpid() + 500) % 1000), str(ROOT / "train_pretrain.py"), "--data_path",
                        tiny_data["pretrain"], "--out_dir", str(tmp_path / "ddp"), *TINY, "--batch_size", "2",
                        "--time_budget", "0.05", "--epochs", "100", "--optimizer", "muon", "--log_interval", "5"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranks 2" in r.stdout and r.stdout.count("time budget: 0.05 min used after step") == 1


def test_resumed_muon_groups_take_the_muon_lr_of_the_flags(tmp_path):
    """load_state_dict restores each group's saved lr_scale; RunControl sets it from --muon_lr / --learning_rate
    again, so a changed --muon_lr on resume wins (as a changed --weight_decay does in resume.py)."""
    from minimind.train import RunControl
    model = tiny_model()
    opt = configure_optimizer(model, 1e-3, 0.0, CPU, kind="muon", muon_lr=0.02)
    opt.load_state_dict(opt.state_dict())                          # what resume() does
    args = argparse.Namespace(out_dir=str(tmp_path), muon_lr=0.04, learning_rate=1e-3, grad_clip=1.0)
    run = RunState(args, Runtime(0, 0, 1, CPU, torch.float32), model, opt,
                   torch.amp.GradScaler("cpu", enabled=False), tokenizer=None)
    import signal
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}   # RunControl installs its own
    try:
        with RunControl(run, steps=1):
            assert [g["lr_scale"] for g in opt.param_groups if g["muon"]] == [pytest.approx(40.0)]
            assert [g["lr_scale"] for g in opt.param_groups if not g["muon"]] == [1.0] * (len(opt.param_groups) - 1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
