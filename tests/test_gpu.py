"""The CUDA paths, on a real GPU: bf16 and fp16+GradScaler steps, FlexAttention packed rows equal to the dense
mask, CUDA-graph decoding equal to eager, the torch.compile path, fused AdamW, and Muon's bf16 Newton-Schulz.

Marked `gpu` and skipped without CUDA (`pytest -m gpu` selects them; bench/gpu_check.sh runs them first); the
last test, unmarked, runs bench/gpu_check.sh itself at its CPU smoke sizes, so CI proves the script works. Every
comparison is against a reference computed on the same GPU in fp32 (or float64), with the tolerance stated.
Models are tiny: the whole file should take well under a minute plus torch.compile's first compiles.
"""
import argparse
import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from minimind.config import ModelConfig
from minimind.model import AttentionMask, MiniMindForCausalLM, document_positions, flex_attention
from minimind.optim import MuonWithAdamW, configure_optimizer
from minimind.resume import RunState
from minimind.runtime import Runtime
from minimind.train import prepare_model, train_step

CUDA = torch.device("cuda")


def on_gpu(test):
    """Marked `gpu` (pytest -m gpu selects it) and skipped where CUDA is absent."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def tiny(vocab=256, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=384, max_position_embeddings=512), **kw})
    return MiniMindForCausalLM(cfg).to(CUDA)


def run_of(model, dtype, opt=None, scaler=None, grad_clip=1.0) -> RunState:
    opt = opt or configure_optimizer(model, 1e-3, 0.0, CUDA)
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return RunState(argparse.Namespace(grad_clip=grad_clip), Runtime(0, 0, 1, CUDA, dtype), model, opt, scaler,
                    tokenizer=None)


def batch(B=4, T=64, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T + 1), generator=g).to(CUDA)
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision steps
# ---------------------------------------------------------------------------------------------------------------
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_steps_learn_and_track_fp32(dtype):
    """bf16 (no scaler) and fp16 (GradScaler): the first loss is fp32's within 2% (rounding of matmul inputs),
    every step is finite (fp16: the scaler skips at most 2 while it finds its scale), and the loss falls."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    ref = run_of(tiny(), torch.float32)
    run = run_of(tiny(), dtype)
    x, y = batch()
    first_ref = train_step(ref, [(x, y)], 1e-3).loss.item()
    losses = [train_step(run, [(x, y)], 1e-3).loss.item() for _ in range(20)]
    assert abs(losses[0] - first_ref) <= 0.02 * first_ref
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    if dtype == torch.float16:
        assert run.scaler.is_enabled() and run.scaler.get_scale() >= 2.0 ** 10  # no run of overflows shrank it
        assert run.optimizer.state_dict()["state"][0]["step"].item() >= 18       # at most 2 steps skipped


@on_gpu
@pytest.mark.parametrize("dtype,optimizer", [("float16", "adamw"), ("bfloat16", "muon")])
def test_script_runs_end_to_end(dtype, optimizer, tiny_data, tmp_path):
    """train_pretrain.py on the GPU: fp16 with GradScaler (AdamW), and bf16 with Muon; autocast, a checkpoint, a
    resume from it and the final save together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train_pretrain.py"), "--data_path", tiny_data["pretrain"], "--out_dir",
           str(tmp_path / dtype), "--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "64",
           "--batch_size", "8", "--max_steps", "6", "--device", "cuda", "--dtype", dtype, "--optimizer", optimizer,
           "--save_interval", "3", "--log_interval", "1"]
    for extra in ([], ["--from_resume", "1"]):
        r = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert f"dtype {dtype}" in r.stdout and "(step 3," in r.stdout
    assert (tmp_path / dtype / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# FlexAttention for packed rows
# ---------------------------------------------------------------------------------------------------------------
@on_gpu
@pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch >= 2.5")
def test_flex_attention_packed_rows_equal_the_dense_mask():
    """Packed SFT rows: the FlexAttention BlockMask gives the logits, loss and gradients of the dense (B,1,T,T)
    SDPA mask, in fp32 (tolerance 1e-4: the kernels sum in different orders)."""
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 products in both kernels (the default; made explicit)
    model = tiny().float()
    x, y = batch(B=2, T=256)
    lengths = [[40, 100, 16, 100], [256]]                     # documents per row; the second row: one document
    doc = torch.cat([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))[None] for r in lengths]).to(CUDA)
    pos = document_positions(doc)
    out = {}
    for backend in ("flex", "sdpa"):
        model.zero_grad(set_to_none=True)
        mask = AttentionMask.documents(doc, backend)
        logits = model(x, mask=mask, position_ids=pos)
        loss = model(x, targets=y, mask=AttentionMask.documents(doc, backend), position_ids=pos)
        loss.backward()
        out[backend] = (logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()])
    (lf, sf, gf), (ld, sd, gd) = out["flex"], out["sdpa"]
    assert torch.allclose(lf, ld, atol=1e-4, rtol=1e-4)
    assert torch.allclose(sf, sd, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(gf, gd))
    # the doc_ids path picks flex on CUDA by itself
    assert AttentionMask.documents(doc).block is not None


# ---------------------------------------------------------------------------------------------------------------
# Decoding: CUDA graphs
# ---------------------------------------------------------------------------------------------------------------
@on_gpu
def test_cuda_graph_decode_equals_eager():
    """Greedy decoding replayed from captured CUDA graphs gives exactly the tokens of the same fixed-shape step run
    eagerly (static=True: the graph's own maths), and the tokens of the default eager path (which slices the
    cache to the columns in use) for at least the first 16 tokens of every row (fp32; later near-ties may part)."""
    from minimind.generate import generate
    model = tiny(vocab=512).float().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 9)]  # ragged: left padding
    kw = dict(max_new_tokens=48, temperature=0.0)
    graph = generate(model, prompts, cuda_graph=True, **kw)
    static = generate(model, prompts, cuda_graph=False, static=True, **kw)
    eager = generate(model, prompts, cuda_graph=False, static=False, **kw)
    assert graph == static
    assert all(a[:16] == b[:16] for a, b in zip(graph, eager))
    assert all(len(r) == 48 for r in graph)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, fused AdamW, Muon on the GPU
# ---------------------------------------------------------------------------------------------------------------
@on_gpu
def test_compile_path_matches_eager():
    """prepare_model(--use_compile 1) then train_step: the compiled model's losses follow the eager ones (fp32,
    TF32 off; 1e-4 relative over 3 steps: fused kernels round differently)."""
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        args = argparse.Namespace(fsdp=0, optimizer="adamw", batch_tokens=0, grad_checkpointing=0, use_compile=1,
                                  max_seq_len=64, batch_size=4, accumulation_steps=1)
        eager = tiny()
        compiled = prepare_model(copy.deepcopy(eager), args, Runtime(0, 0, 1, CUDA, torch.float32))
        assert compiled is not eager and hasattr(compiled, "_orig_mod")
        a, b = run_of(eager, torch.float32), run_of(compiled, torch.float32)
        x, y = batch()
        for _ in range(3):
            la, lb = train_step(a, [(x, y)], 1e-3).loss.item(), train_step(b, [(x, y)], 1e-3).loss.item()
            assert abs(la - lb) <= 1e-4 * la, (la, lb)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@on_gpu
def test_fused_adamw_on_cuda_equals_foreach():
    model = tiny()
    opt = configure_optimizer(model, 1e-3, 0.1, CUDA)
    assert opt.defaults["fused"] is True
    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW([{"params": [p for p in ref_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ref_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), foreach=True)
    x, y = batch()
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(3):
            m(x, targets=y).backward()
            o.step()
            o.zero_grad()
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(model.parameters(), ref_model.parameters()))


@on_gpu
def test_muon_step_on_cuda_in_bf16_matches_float64():
    """On CUDA Newton-Schulz runs in bf16 (8 mantissa bits) on tensor cores: one Muon step stays within 6%
    (relative, Frobenius) of the float64 update (bf16 Newton-Schulz on the CPU measured 2.6-3.0% on these shapes)."""
    from test_optim import reference_ns
    torch.manual_seed(0)
    W0, g = torch.randn(256, 96), torch.randn(256, 96)
    w = torch.nn.Parameter(W0.clone().to(CUDA))
    opt = configure_optimizer(torch.nn.Linear(96, 256, bias=False).to(CUDA), 1e-3, 0.0, CUDA, kind="muon")
    assert opt.ns_dtype == torch.bfloat16                                 # what configure_optimizer picks on CUDA
    opt = MuonWithAdamW([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=0.02, momentum=0.95,
                        ns_dtype=opt.ns_dtype)
    w.grad = g.clone().to(CUDA)
    opt.step()
    u = 0.95 * (0.05 * g.double()) + 0.05 * g.double()                 # Nesterov look-ahead after one EMA step
    expect = -0.02 * (256 / 96) ** 0.5 * reference_ns(u)
    got = (w.detach().cpu().double() - W0.double())
    assert (got - expect).norm() <= 0.06 * expect.norm()


# ---------------------------------------------------------------------------------------------------------------
# bench/gpu_check.sh itself, at CPU smoke sizes (not marked gpu: it runs everywhere, and the check never runs it)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    """The one-command GPU check works end to end on CPU: every step runs (GPU tests skip), one table comes out."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = (tmp_path / "summary.md").read_text()
    for name in ("tests", "train 26M", "train 64M", "sft packing", "generate"):
        assert f"| {name} " in table
    assert "FAILED" not in table and "TIMEOUT" not in table and "tokens/s" in table
