"""Training throughput of the real pretraining path: tokens/s, MFU and peak memory, on CPU or GPU.

    python bench/train_throughput.py --preset 26M --batch_size 8 --max_seq_len 340          # CPU, defaults
    python bench/train_throughput.py --preset 64M --batch_size 32 --use_compile 1           # one GPU
    python bench/train_throughput.py --preset 64M --hidden_size 512 --batch_size 8 \\
        --variants base loss=plain gc=1 num_threads=1 use_compile=1 grad_checkpointing=1    # levers, side by side

Each step is what train_pretrain.py runs: packed windows cut from the token memmap (PackedWindows) -> Sampler ->
Prefetcher (background thread) -> train_step (autocast, fused chunked loss, clipping, AdamW). The flags are
train_pretrain.py's own (same defaults), plus --variants: each variant changes flags (name=value, comma-separated)
and gets its own model and optimizer; their timed rounds are interleaved (A B C A B C ...) so that machine noise
hits them alike, and ratios are against the first variant. Pseudo-flags for levers that are not training flags:
  loss=plain     full logits + F.cross_entropy in fp32 instead of the fused chunked loss (minimind/loss.py)
  gc=1           gc.freeze() + gc.disable() around the hot loop (no garbage-collector pauses)
  prefetch=0     build batches inline on the main thread instead of the background Prefetcher
  doc_mask=0     plain causal attention over each window (train_pretrain.py --doc_mask 0); the default, 1, keeps
                 attention inside each document of the window, as train_pretrain.py does

GFLOP/s = tokens/s x ModelConfig.flops_per_token(T) (6N + 12*L*d*T per token); MFU = that / peak FLOP/s. Peaks (dense bf16): H100 SXM 989e12 datasheet and
787e12 measured ceiling (the issue's definition), H200 989e12 (datasheet), A100 312e12; CPU: n/a unless
--peak_flops is given. Peak memory: torch.cuda.max_memory_allocated per variant on GPU; on CPU the process's max
RSS (ru_maxrss, shared by all variants in one run).
"""
import os

# OpenMP threads spin while waiting for work; on a CPU shared with other processes that stalls every parallel op
# (2 threads measured up to 2.7x slower on a loaded 2-core machine). libgomp reads this when torch is imported, so
# it is set before that; an OMP_WAIT_POLICY already in the environment wins. (dev/LOG.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy
import gc
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimind import DEFAULT_TOKENIZER  # noqa: E402
from minimind.checkpoint import unwrap  # noqa: E402
from minimind.data import PackedWindows, Prefetcher, Sampler, pretokenize  # noqa: E402
from minimind.flags import add_common_args  # noqa: E402
from minimind.loss import IGNORE  # noqa: E402
from minimind.resume import RunState  # noqa: E402
from minimind.runtime import Runtime, pick_device, pick_dtype, seed_everything, setup_hardware  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402
from minimind.train import build_model, configure_optimizer, lm_loss, lr_at, prepare_model, train_step  # noqa: E402

PEAKS = {"H100": (989e12, 787e12), "H200": (989e12, None), "A100": (312e12, None)}  # (datasheet, measured)
PSEUDO = {"loss": "fused", "gc": 0, "prefetch": 1, "doc_mask": 1}


def peak_flops(device, override: float):
    """(peak, measured ceiling or None, name) for MFU; peak None when unknown (CPU)."""
    if override:
        return override, None, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak, measured) in PEAKS.items():
            if key in name:
                return peak, measured, name
        return None, None, name
    return None, None, "cpu"


def plain_loss(model, batch):
    """The unfused baseline: all (B, T, V) logits, upcast to fp32, then F.cross_entropy."""
    x, y, *doc_ids = batch
    logits = model(x, doc_ids=doc_ids[0] if doc_ids else None)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE), {}


class Runner:
    """One variant: its own model, optimizer and batch stream; step() runs one optimizer step."""

    def __init__(self, base_args, overrides: dict, tokenizer, windows, device, world=1, rank=0):
        args = copy.copy(base_args)
        self.pseudo = dict(PSEUDO)
        for k, v in overrides.items():
            if k in self.pseudo:
                self.pseudo[k] = type(self.pseudo[k])(v)
            elif not hasattr(args, k):
                raise SystemExit(f"error: --variants: unknown flag {k!r}")
            else:
                default = getattr(args, k)
                setattr(args, k, type(default)(v) if default is not None else v)
        self.args, self.device = args, device
        self.dtype = pick_dtype(args.dtype, device)
        seed_everything(args.seed)
        rt = Runtime(rank, 0, world, device, self.dtype)
        self.model = prepare_model(build_model(args, tokenizer.vocab_size).to(device), args, rt)
        self.optimizer = configure_optimizer(self.model, args.learning_rate, args.weight_decay, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.model.train()
        self.run_state = RunState(args, rt, self.model, self.optimizer, self.scaler, tokenizer)
        if self.pseudo["doc_mask"]:   # train_pretrain.py's default: doc_ids with every batch
            windows = PackedWindows(windows.tokens, windows.seq_len, bos_id=tokenizer.bos_id)
        self.sampler = Sampler(len(windows), args.batch_size, args.accumulation_steps, world, rank, seed=args.seed)
        spe = self.sampler.steps_per_epoch
        self.total = 10 ** 6
        keys = ((s // spe, s % spe, m) for s in range(self.total) for m in range(args.accumulation_steps))
        make = lambda e, s, m: windows.get(self.sampler.indices(e, s, m))  # noqa: E731
        if self.pseudo["prefetch"]:
            self.batches = iter(Prefetcher(make, keys, device))
        else:
            self.batches = (tuple(t.to(device) for t in make(*k)) for k in keys)
        self.loss_fn = plain_loss if self.pseudo["loss"] == "plain" else lm_loss
        self.tokens_per_step = args.batch_size * args.max_seq_len * args.accumulation_steps * world
        self.flops_per_token = unwrap(self.model).config.flops_per_token(args.max_seq_len)
        self.n = 0
        self.times, self.peak_mem = [], 0

    def step(self):
        a = self.args
        lr = lr_at(self.n, self.total, a.warmup_iters, a.learning_rate, a.min_lr_ratio)
        micro = [next(self.batches) for _ in range(a.accumulation_steps)]
        loss = train_step(self.run_state, micro, lr, self.loss_fn).loss
        self.n += 1
        return loss

    def run(self, steps: int, record: bool = True):
        """Run `steps` steps; record their wall time (with a device sync at both ends)."""
        old_threads = torch.get_num_threads()
        if self.args.num_threads:
            torch.set_num_threads(self.args.num_threads)
        if self.pseudo["gc"]:
            gc.collect()
            gc.freeze()
            gc.disable()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()  # wait for the last step
        dt = time.perf_counter() - t0
        if self.pseudo["gc"]:
            gc.enable()
            gc.unfreeze()
        torch.set_num_threads(old_threads)
        if record:
            self.times.append(dt / steps)
            if self.device.type == "cuda":
                self.peak_mem = max(self.peak_mem, torch.cuda.max_memory_allocated())
        return loss.item()


def parse_variant(text: str) -> dict:
    if text == "base":
        return {}
    return dict(kv.split("=", 1) for kv in text.split(","))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_args(p, data_path="dataset/default/pretrain.jsonl", out_dir="/tmp/minimind-bench", from_weight="none",
                    epochs=1, batch_size=32, learning_rate=5e-4, max_seq_len=340)
    g = p.add_argument_group("benchmark")
    g.add_argument("--variants", nargs="+", default=["base"],
                   help="flag sets to compare, e.g. base loss=plain use_compile=1 'dtype=float32,batch_size=4'")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compile, allocator)")
    g.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    g.add_argument("--peak_flops", type=float, default=0, help="peak FLOP/s for MFU (default: by GPU name)")
    args = p.parse_args()

    device = pick_device(args.device)
    setup_hardware(device, args.num_threads)
    tokenizer = Tokenizer.load(args.tokenizer or DEFAULT_TOKENIZER)
    windows = PackedWindows(pretokenize(args.data_path, tokenizer), args.max_seq_len)
    runners = []
    for text in args.variants:
        r = Runner(args, parse_variant(text), tokenizer, windows, device)
        r.name = text
        r.run(args.warmup, record=False)
        runners.append(r)
    peak, measured, peak_name = peak_flops(device, args.peak_flops)
    m = unwrap(runners[0].model)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | device {peak_name} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | model {m.num_parameters() / 1e6:.2f}M (d{m.config.hidden_size} "
          f"L{m.config.num_hidden_layers}) | batch {args.batch_size} x {args.max_seq_len} x "
          f"{args.accumulation_steps} accum | data {args.data_path}")
    for _ in range(args.rounds):
        for r in runners:
            r.run(args.steps)
    base = None
    print(f"{'variant':34s} {'tokens/s':>10s} {'ratio':>6s} {'ms/step':>9s} {'GFLOP/s':>9s} {'MFU':>14s} "
          f"{'peak mem':>10s} {'spread':>7s}")
    for r in runners:
        t = statistics.median(r.times)
        tps = r.tokens_per_step / t
        base = base or tps
        if peak:
            mfu = f"{tps * r.flops_per_token / peak:6.1%}" + (f"/{tps * r.flops_per_token / measured:5.1%}"
                                                             if measured else "")
        else:
            mfu = "n/a"
        mem = (f"{r.peak_mem / 2**30:.2f} GiB" if device.type == "cuda"
               else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB*")
        spread = (max(r.times) - min(r.times)) / t
        print(f"{r.name:34s} {tps:10.0f} {tps / base:6.2f} {t * 1e3:9.1f} {tps * r.flops_per_token / 1e9:9.1f} "
              f"{mfu:>14s} {mem:>10s} {spread:7.0%}")
    if device.type != "cuda":
        print("* CPU: max RSS of the whole process (all variants together)")
    if measured:
        print(f"MFU: of the datasheet peak {peak / 1e12:.0f} TFLOP/s / of the measured ceiling {measured / 1e12:.0f}")


if __name__ == "__main__":
    main()
