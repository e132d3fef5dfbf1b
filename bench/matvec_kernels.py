"""Batch-1 decoding's weight reads, kernel by kernel: every weight matrix of the model applied to one vector, per
weight format PyTorch offers on a CPU. It says what each kernel allows before any other per-token work.

    python bench/matvec_kernels.py                      # the 30M shape of generate_throughput.py, 1 thread
    python bench/matvec_kernels.py --hidden_size 768 --rounds 30

Rows (random weights; time does not depend on the values), min over --rounds interleaved rounds:
  fp32        F.linear on fp32 weights (what fp32 decoding runs)
  int8        torch._weight_int8pack_mm: int8 weights + one scale per row, bf16 activations
              (minimind.generate.Int8Linear, what `--quantize int8` runs)
  int8 fbgemm torch.ao dynamic quantization: int8 weights per channel AND activations quantized per call (not
              weight-only, so less exact: the error column)
  int4 g32    torch._weight_int4pack_mm_for_cpu: 4-bit weights, one scale and zero per group of 32
The error column: relative error of one MLP matrix's product against fp32. `--minimind_tok_s N` adds what 4x that
decoding speed would leave per token (issue 11's int8 goal) next to each kernel's time.
"""
import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--num_attention_heads", type=int, default=8)
    p.add_argument("--num_key_value_heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=6400)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds; each kernel's best is kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minimind_tok_s", type=float, default=0,
                   help="MiniMind's measured batch-1 tokens/s (generate_throughput.py): prints the 4x budget")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    # The model's matrices, in decode order: q, k, v, o, gate, up, down per layer, then the (tied) output head.
    H, hd = args.hidden_size, args.hidden_size // args.num_attention_heads
    inter = math.ceil(H * math.pi / 64) * 64
    layer = [(args.num_attention_heads * hd, H), (args.num_key_value_heads * hd, H), (args.num_key_value_heads * hd, H),
             (H, args.num_attention_heads * hd), (inter, H), (inter, H), (H, inter)]
    shapes = layer * args.num_hidden_layers + [(args.vocab_size, H)]
    torch.manual_seed(0)
    ws = [torch.randn(o, i) * 0.02 for o, i in shapes]          # distinct tensors: no cache reuse between layers
    xs = {i: torch.randn(1, i) for _, i in shapes}
    mb = sum(w.numel() for w in ws) * 4 / 1e6
    print(f"{len(ws)} matrices ({mb:.0f} MB in fp32), batch 1, {args.threads} thread(s), torch {torch.__version__}")

    kernels, errors = {}, {}
    probe = 4                                                    # the first gate matrix: error against fp32
    x = torch.randn(1, ws[probe].shape[1])
    ref = F.linear(x, ws[probe])

    def rel(y):
        return ((y.float() - ref).norm() / ref.norm()).item()

    kernels["fp32"] = lambda: [F.linear(xs[w.shape[1]], w) for w in ws]
    errors["fp32"] = 0.0

    scales = [w.abs().amax(dim=1) / 127 for w in ws]            # as Int8Linear: one scale per output row
    q8 = [(w / s[:, None]).round().clamp(-127, 127).to(torch.int8) for w, s in zip(ws, scales)]
    s8 = [s.bfloat16() for s in scales]
    xb = {i: v.bfloat16() for i, v in xs.items()}
    kernels["int8"] = lambda: [torch._weight_int8pack_mm(xb[w.shape[1]], w, s) for w, s in zip(q8, s8)]
    errors["int8"] = rel(torch._weight_int8pack_mm(x.bfloat16(), q8[probe], s8[probe]))

    try:  # torch.ao's dynamic quantization (fbgemm); deprecated in newer torch, so optional
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch.ao.nn.quantized.dynamic as nnqd
            fb = []
            for w in ws:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w
                lin.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
                fb.append((nnqd.Linear.from_float(lin), w.shape[1]))
        kernels["int8 fbgemm"] = lambda: [m(xs[i]) for m, i in fb]
        errors["int8 fbgemm"] = rel(fb[probe][0](x))
    except Exception as e:  # noqa: BLE001 - a missing backend is a row we skip, not a failure
        print(f"int8 fbgemm skipped: {type(e).__name__}: {e}")

    try:  # int4 weight-only, asymmetric per group of 32 (values 0..15 around a per-group zero point)
        g = 32
        packed = []
        for w in ws:
            wg = w.reshape(w.shape[0], -1, g)
            lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            scale = (hi - lo).clamp(min=1e-8) / 15
            q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(w.shape)
            # the kernel's zero is the value of code 8: lo + 8 * scale
            sz = torch.stack([scale[..., 0].t(), (lo + 8 * scale)[..., 0].t()], dim=-1).bfloat16().contiguous()
            packed.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz, w.shape[1]))
        kernels["int4 g32"] = lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xb[i], pk, g, sz)
                                       for pk, sz, i in packed]
        pk, sz, _ = packed[probe]
        errors["int4 g32"] = rel(torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), pk, g, sz))
    except Exception as e:  # noqa: BLE001
        print(f"int4 skipped: {type(e).__name__}: {e}")

    best = {k: float("inf") for k in kernels}
    for fn in kernels.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    budget = 1e3 / (4 * args.minimind_tok_s) if args.minimind_tok_s else None
    print(f"{'kernel':12} {'ms/token':>9} {'tok/s ceiling':>14} {'vs fp32':>8} {'rel. error':>11}"
          + (f" {'of the 4x budget':>17}" if budget else ""))
    for name, t in best.items():
        line = f"{name:12} {t * 1e3:9.2f} {1 / t:14.0f} {best['fp32'] / t:7.2f}x {errors[name]:11.4f}"
        if budget:
            line += f" {t * 1e3 / budget:16.0%}"
        print(line)
    if budget:
        print(f"4x MiniMind's {args.minimind_tok_s:g} tok/s = {budget:.2f} ms per token for everything; a kernel "
              f"at or above 100% cannot reach it even with no other per-token work")


if __name__ == "__main__":
    main()
