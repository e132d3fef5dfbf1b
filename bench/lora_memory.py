"""Peak training memory: full SFT vs LoRA on the same model, each in its own fresh process.

    python bench/lora_memory.py                                   # 64M preset, batch 4 x 256 tokens, 3 steps
    python bench/lora_memory.py --preset 26M --modes full lora    # another size / fewer variants
    python bench/lora_memory.py --device cuda                     # GPU: torch.cuda.max_memory_allocated

Each mode runs in a separate subprocess (peak RSS is per process and never goes down, so sharing one would
mix them up), builds the model from the preset (random weights: memory does not depend on their values), and
runs a few optimizer steps through minimind.train.train_step (autocast, fused chunked loss, clipping, AdamW),
i.e. what train_full_sft.py / train_lora.py run. Modes:
  full           every parameter trains: fp32 weights + fp32 grads + AdamW's two fp32 moments (16 bytes/param)
  lora           train_lora.py's defaults: r=8 on q,k,v,o,gate,up,down; frozen Linear weights stored in the
                 autocast dtype (--base_dtype auto: bf16 on CPU/modern GPUs)
  lora_fp32base  the same with the frozen weights kept fp32 (--base_dtype float32)
Reported: trainable parameters, bytes of weights / gradients / optimizer state (counted from the tensors), the
process's peak memory (CPU: ru_maxrss; GPU: max_memory_allocated) and its rise over the process's baseline after
imports, and seconds per step.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("full", "lora", "lora_fp32base")


def worker(args) -> dict:
    import torch

    from minimind.config import preset
    from minimind.lora import cast_frozen, inject_lora
    from minimind.model import MiniMindForCausalLM
    from minimind.resume import RunState
    from minimind.runtime import Runtime, pick_device, pick_dtype, setup_hardware
    from minimind.train import configure_optimizer, train_step

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    setup_hardware(device)

    def peak_mb():
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    base_mb = peak_mb()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset(args.preset)).to(device)
    if args.mode != "full":
        inject_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank)
        if args.mode == "lora" and dtype != torch.float32:
            cast_frozen(model, dtype)
    optimizer = configure_optimizer(model, 1e-4, 0.01, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run = RunState(argparse.Namespace(grad_clip=1.0), Runtime(0, 0, 1, device, dtype), model, optimizer, scaler, None)
    V, B, T = model.config.vocab_size, args.batch_size, args.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, V, (B, T + 1), generator=g)
    batch = (x[:, :-1].to(device), x[:, 1:].to(device))
    times = []
    grad_bytes = 0
    for step in range(args.steps + 1):  # step 0 warms up (allocator, optimizer state), not timed
        t = time.perf_counter()
        loss = train_step(run, [batch], 1e-4).loss
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
    params = list(model.parameters())  # a tied matrix counts once
    trainable = [p for p in params if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)  # one gradient per trainable tensor
    optim_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v))
    return {"mode": args.mode, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "weights_mb": sum(p.numel() * p.element_size() for p in params) / 2 ** 20, "grads_mb": grad_bytes / 2 ** 20,
            "optimizer_mb": optim_bytes / 2 ** 20, "peak_mb": peak_mb(), "baseline_mb": base_mb,
            "step_s": sum(times) / len(times), "loss": loss.item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="64M", help="model size preset (minimind.config.PRESETS)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # set in the worker subprocesses
    args = p.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return

    rows = []
    for mode in args.modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + \
              [a for a in sys.argv[1:] if a not in ("--modes", *MODES)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: mode {mode} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"preset {args.preset} ({first['params'] / 1e6:.1f}M params) | batch {args.batch_size} x {args.max_seq_len} "
          f"tokens | {args.steps} steps | device {first['device']} | autocast {first['dtype']} | "
          f"peak = {'torch.cuda.max_memory_allocated' if first['device'].startswith('cuda') else 'ru_maxrss'}")
    head = ("mode", "trainable", "weights MB", "grads MB", "AdamW MB", "state MB", "peak MB", "peak-base MB",
            "vs full", "s/step")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    full = next((r for r in rows if r["mode"] == "full"), None)
    for r in rows:
        state = r["weights_mb"] + r["grads_mb"] + r["optimizer_mb"]
        rise = r["peak_mb"] - r["baseline_mb"]
        ratio = f"{rise / (full['peak_mb'] - full['baseline_mb']):.2f}x" if full else "-"
        print(f"| {r['mode']} | {r['trainable'] / 1e6:.2f}M | {r['weights_mb']:.0f} | {r['grads_mb']:.1f} | "
              f"{r['optimizer_mb']:.1f} | {state:.0f} | {r['peak_mb']:.0f} | {rise:.0f} | {ratio} | "
              f"{r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
